#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), not on the GPU machine: saves into .whl/ (git-ignored) the wheels
# rtws needs that the GPU image lacks (its python3 is CPython 3.12 with torch, transformers, tokenizers,
# safetensors, uvloop, click, h11, prometheus-client, pytest already installed). bench/gpu.sh installs them
# from .whl/ with --no-index; carry ".whl" with the device call.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
  msgspec==0.22.0 uvicorn==0.54.0 websockets==17.4 httptools==0.9.0
ls -la .whl
