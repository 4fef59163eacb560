#!/usr/bin/env bash
# rtws on one GPU (H100 / H200): the GPU tests and the benchmarks, in under 8 minutes, short table last.
#
#   bench/gpu_wheels.sh        # HERE, once: saves the wheels the GPU image lacks into .whl/ (git-ignored)
#   bench/gpu.sh               # THERE, from the repository root; carry ".whl" with the device call
#
# Installs nothing from the network (the GPU machine reaches none). Uses the image's python3 (torch,
# transformers, tokenizers, safetensors, uvloop, pytest); msgspec, uvicorn, websockets and httptools come
# from .whl/ when the image lacks them. rtws itself is imported from this tree (PYTHONPATH: no build step).
# Workload: gpt2-random (the GPT-2 124M architecture, random weights, the bundled tokenizer), bfloat16,
# 32-token prompts, 128 new tokens, 256 concurrent streams; plus one stream for per-token latency.
# Logs and outputs go to $OUT (the device tool's folder) or /tmp/rtws-gpu.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
OUT="${OUT:-/tmp/rtws-gpu}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Overridable for a dry run on a CPU machine, e.g.
#   PYTHON=.venv/bin/python BENCH_DEVICE=cpu BENCH_DTYPE=float32 BENCH_MODEL=/tmp/tiny BENCH_STREAMS=4 bench/gpu.sh
DEVICE="${BENCH_DEVICE:-cuda}"
C="${BENCH_STREAMS:-256}"
MODEL=(--model "${BENCH_MODEL:-gpt2-random}" --device "$DEVICE" --dtype "${BENCH_DTYPE:-bfloat16}" --prompt-len 32)
start=$(date +%s)
step() { echo; echo "=== $1  (t+$(( $(date +%s) - start ))s)"; }

step "environment"
if [ "$DEVICE" != cpu ]; then nvidia-smi -L || { echo "no GPU visible"; exit 1; }; fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import msgspec, uvicorn, websockets, httptools" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "msgspec/uvicorn/websockets/httptools missing and no .whl/: run bench/gpu_wheels.sh here and carry .whl"; exit 1; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rtws-site .whl/*.whl \
    || { echo "installing .whl/ failed"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/rtws-site"
fi
"$PY" - "$DEVICE" <<'PY' || exit 1
import sys, torch, transformers, msgspec, uvicorn, websockets, httptools, uvloop
import rtws.server, rtws.runner
cuda = torch.cuda.is_available()
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
      f"cuda {cuda} {torch.cuda.get_device_name(0) if cuda else ''}")
assert cuda or sys.argv[1] == "cpu", "CUDA not available to torch"
PY

step "GPU tests (pytest -m gpu)"
gpu_files=$(grep -rl --include="*.py" "mark.gpu" tests 2>/dev/null || true)
if [ -n "$gpu_files" ]; then
  timeout 150 "$PY" -m pytest -m gpu -q -p no:cacheprovider $gpu_files 2>&1 | tee "$OUT/pytest_gpu.txt"
  echo "pytest exit ${PIPESTATUS[0]}" | tee -a "$OUT/pytest_gpu.txt"
else
  echo "no test is marked gpu" | tee "$OUT/pytest_gpu.txt"
fi

step "engine vs model.generate, $C streams"
timeout 150 "$PY" bench/engine_bench.py "${MODEL[@]}" --concurrency "$C" --requests "$C" --max-tokens 128 \
  --workload both 2>&1 | tee "$OUT/engine_256.txt"

step "engine vs model.generate, 1 stream"
timeout 90 "$PY" bench/engine_bench.py "${MODEL[@]}" --concurrency 1 --requests 4 --max-tokens 128 \
  --workload uniform 2>&1 | tee "$OUT/engine_1.txt"

step "end to end over WebSockets, $C streams (+ 1-stream sweep, 100 cancels)"
timeout 240 "$PY" bench/e2e_bench.py "${MODEL[@]}" --concurrency "$C" --requests $(( 2 * C )) --max-tokens 128 \
  --sweep 1 --cancels 100 --procs 8 --repeat 3 2>&1 | tee "$OUT/e2e_256.txt"

step "summary"
"$PY" bench/gpu_summary.py "$OUT" "$C" 2>&1 | tee "$OUT/summary.txt"
echo "total $(( $(date +%s) - start )) s"
