"""rtws.default_model.corpus: one path and one fallback text for training, tests and benchmarks; torch-free."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from rtws.default_model.corpus import FALLBACK_TEXT, SHAKESPEARE_PATH, corpus_text


def test_the_corpus_sits_in_shared_next_to_the_checkout() -> None:
    root = Path(__file__).resolve().parents[2]
    assert SHAKESPEARE_PATH == root.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def test_a_missing_corpus_falls_back_and_a_present_one_is_cut_at_the_limit(tmp_path: Path) -> None:
    assert corpus_text(path=tmp_path / "absent.txt") == FALLBACK_TEXT
    assert corpus_text(10, path=tmp_path / "absent.txt") == FALLBACK_TEXT
    f = tmp_path / "input.txt"
    f.write_text("ROMEO:\nCaf\u00e9?\n" * 3, encoding="utf-8")
    assert corpus_text(path=f) == "ROMEO:\nCaf\u00e9?\n" * 3
    assert corpus_text(9, path=f) == "ROMEO:\nCa"
    assert any(ord(c) > 0xFFFF for c in FALLBACK_TEXT) and FALLBACK_TEXT.startswith("ROMEO:\n")


def test_import_leaves_torch_unloaded() -> None:
    code = ("import sys, rtws.default_model.corpus\n"
            "assert not {'torch', 'transformers'} & set(sys.modules), 'heavy import'\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
