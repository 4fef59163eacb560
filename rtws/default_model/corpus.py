"""Tiny Shakespeare: where the corpus lives in a source checkout, and one fallback text when it is absent.

The training script (``python -m rtws.default_model.train``), the tests' tiny tokenizers and the benchmarks'
prompts all read the corpus through this module. Torch-free and cheap to import.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["FALLBACK_TEXT", "SHAKESPEARE_PATH", "corpus_text"]

# ``../shared/data/tinyshakespeare/input.txt`` next to the repository (the layout CI and development use).
SHAKESPEARE_PATH: Path = Path(__file__).resolve().parents[3] / "shared" / "data" / "tinyshakespeare" / "input.txt"

# Used where the corpus is not present: the corpus's speaker format, plus non-ASCII text (accents, CJK, an
# emoji) so that byte-level tokenizers trained on it see multi-byte characters.
FALLBACK_TEXT: str = (
    "ROMEO:\nBut soft, what light through yonder window breaks?\n\n"
    "JULIET:\nO Romeo, Romeo, wherefore art thou Romeo?\n\n"
    "Caf\u00e9 na\u00efve \u65e5\u672c\u8a9e \U0001F600 \u00fcber stra\u00dfe\n"
) * 200


def corpus_text(limit: int | None = None, path: Path = SHAKESPEARE_PATH) -> str:
    """The first ``limit`` characters (all when None) of the corpus at ``path``; ``FALLBACK_TEXT`` if unreadable."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return FALLBACK_TEXT
    return text if limit is None else text[:limit]
