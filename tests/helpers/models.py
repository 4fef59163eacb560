"""Tiny real models for tests: a byte-level BPE tokenizer and random-weight Llama (GQA) / GPT-2 folders.

They are real Hugging Face folders, loaded through AutoModelForCausalLM /
AutoTokenizer exactly like a user's model; only the weights are random.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rtws.default_model.corpus import FALLBACK_TEXT, SHAKESPEARE_PATH
from rtws.default_model.corpus import corpus_text as _corpus

CHAT_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n{% else %}"
    "{{ (m['name'] or ('ROMEO' if m['role'] == 'user' else 'JULIET')) | upper }}:\n{{ m['content'] }}\n\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}JULIET:\n{% endif %}"
)


def corpus_text(limit: int = 200_000) -> str:
    """What the tiny tokenizers train on: the corpus's head plus some non-ASCII text, or the fallback text."""
    if SHAKESPEARE_PATH.exists():
        return _corpus(limit) + FALLBACK_TEXT[:2000]
    return _corpus(limit)


def build_tokenizer(out: Path, vocab_size: int = 400, eos: bool = True) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([corpus_text()], trainer)
    special = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"} if eos else {}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, clean_up_tokenization_spaces=False, **special)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)


def build_model(out: Path, arch: str = "llama", seed: int = 0, context: int = 256, eos: bool = True) -> Path:
    """``eos=False``: no end-of-sequence token at all, so streams run to max_tokens (long-stream tests)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(out, eos=eos)
    torch.manual_seed(seed)
    special = dict(eos_token_id=0, bos_token_id=0, pad_token_id=0) if eos else dict(
        eos_token_id=None, bos_token_id=None, pad_token_id=None)
    config: Any
    if arch == "llama":
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=400, max_position_embeddings=context,
                             tie_word_embeddings=True, **special)
    else:
        config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=400, n_positions=context, **special)
    model = AutoModelForCausalLM.from_config(config)
    # Sharper logits than the default init, so greedy choices are not near-ties.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8.0 if arch == "llama" else 4.0)
    model.save_pretrained(out)
    return out
