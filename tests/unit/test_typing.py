"""The package, the tests and the benchmarks are mypy --strict clean and ruff clean (config in pyproject.toml).

Each check skips only where its tool is not installed (both are in the ``test`` extra, so CI runs them).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_mypy_strict_clean() -> None:
    pytest.importorskip("mypy")
    # No paths: pyproject's [tool.mypy] `files` names rtws, tests and bench, with strict = true.
    out = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]


def test_ruff_clean() -> None:
    pytest.importorskip("ruff")
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "rtws", "tests", "bench"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
