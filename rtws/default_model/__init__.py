"""The small GPT-style model bundled with rtws.

``DEFAULT_MODEL_PATH`` points at a standard Hugging Face folder (Llama
architecture, byte-level BPE tokenizer, chat template) that loads offline
with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained``. The weights are stored in bfloat16; load
them with an explicit ``dtype``.

Importing this module is cheap: it does not import torch or transformers.
The folder is produced by ``python -m rtws.default_model.train``; see
``weights/README.md`` for the model card.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["DEFAULT_MODEL_PATH"]

DEFAULT_MODEL_PATH: Path = Path(__file__).resolve().parent / "weights"
