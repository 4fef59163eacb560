"""The package is mypy --strict clean (config in pyproject.toml)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_mypy_strict_clean() -> None:
    pytest.importorskip("mypy")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "mypy", "rtws"], cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-1000:]
