"""The bundled default model (rtws/default_model/weights) loads offline,
generates deterministically, round-trips text through its tokenizer and
renders chats in the corpus's speaker format."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rtws.default_model import DEFAULT_MODEL_PATH
from rtws.default_model.corpus import SHAKESPEARE_PATH

REPO_ROOT = Path(__file__).resolve().parents[2]
CORPUS = SHAKESPEARE_PATH
MAX_BYTES = 10 * 1000 * 1000  # "at most 10 MB", read strictly (decimal megabytes)


@pytest.fixture(scope="module")
def offline_tokenizer() -> Iterator[Any]:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        from transformers import AutoTokenizer

        yield AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    finally:
        mp.undo()


@pytest.fixture(scope="module")
def offline_model() -> Iterator[Any]:
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("TRANSFORMERS_OFFLINE", "1")
    try:
        import torch
        from transformers import AutoModelForCausalLM

        model: Any = AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_PATH, dtype=torch.float32)
        model.eval()
        yield model
    finally:
        mp.undo()


def test_import_is_light() -> None:
    # The package module must not pull in torch/transformers at import time.
    code = (
        "import sys, rtws.default_model as m; "
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, sorted(sys.modules); "
        "print(m.DEFAULT_MODEL_PATH)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    assert Path(out.stdout.strip()) == DEFAULT_MODEL_PATH
    assert isinstance(DEFAULT_MODEL_PATH, Path) and DEFAULT_MODEL_PATH.is_dir()


def test_folder_contents_and_size() -> None:
    names = {p.name for p in DEFAULT_MODEL_PATH.iterdir() if p.is_file()}
    for required in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
    ):
        assert required in names
    total = sum(p.stat().st_size for p in DEFAULT_MODEL_PATH.rglob("*") if p.is_file())
    assert total <= MAX_BYTES, total


def test_config_is_llama_family() -> None:
    cfg = json.loads((DEFAULT_MODEL_PATH / "config.json").read_text())
    assert cfg["model_type"] in ("llama", "gpt2")
    assert cfg["architectures"] == ["LlamaForCausalLM"] or cfg["architectures"] == ["GPT2LMHeadModel"]
    tok_cfg = json.loads((DEFAULT_MODEL_PATH / "tokenizer_config.json").read_text())
    assert tok_cfg["eos_token"] == "<|endoftext|>"
    assert tok_cfg["pad_token"] == "<|endoftext|>"
    assert tok_cfg["clean_up_tokenization_spaces"] is False
    assert "chat_template" in tok_cfg
    gen_cfg = json.loads((DEFAULT_MODEL_PATH / "generation_config.json").read_text())
    assert gen_cfg["eos_token_id"] == cfg["eos_token_id"] == gen_cfg["pad_token_id"] == cfg["pad_token_id"]


def test_model_card_states_heldout_loss() -> None:
    card = (DEFAULT_MODEL_PATH / "README.md").read_text(encoding="utf-8")
    m = re.search(r"\*\*(\d+\.\d+) nats per character\*\*", card)
    assert m, "model card must state the held-out loss in nats per character"
    assert 0.5 < float(m.group(1)) < 5.0
    assert "python -m rtws.default_model.train" in card
    assert "parameters" in card and "Folder size" in card


def test_offline_load_and_greedy_generation(offline_model: Any, offline_tokenizer: Any) -> None:
    import torch

    tok, model = offline_tokenizer, offline_model
    assert tok.eos_token == "<|endoftext|>"
    assert tok.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tok.pad_token_id == model.generation_config.pad_token_id
    enc = tok("ROMEO:\n", return_tensors="pt")
    outs = []
    for _ in range(2):
        with torch.no_grad():
            ids = model.generate(**enc, max_new_tokens=40, do_sample=False)
        outs.append(tok.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))
    assert outs[0] == outs[1]
    text = outs[0]
    assert text.strip()
    assert text.replace("\n", "").isprintable(), repr(text)


def test_encode_adds_no_special_tokens(offline_tokenizer: Any) -> None:
    tok = offline_tokenizer
    ids = tok.encode("ROMEO:\nHello")
    assert tok.eos_token_id not in ids
    assert tok.decode(ids) == "ROMEO:\nHello"
    assert tok.decode(tok.encode("  spaced  ,  out . ")) == "  spaced  ,  out . "


@pytest.mark.skipif(not CORPUS.is_file(), reason="Tiny Shakespeare corpus not present")
def test_roundtrip_corpus(offline_tokenizer: Any) -> None:
    text = CORPUS.read_text(encoding="utf-8")
    # verbose=False: the whole corpus is far longer than model_max_length, which is fine here.
    ids = offline_tokenizer(text, verbose=False)["input_ids"]
    assert offline_tokenizer.eos_token_id not in ids
    assert offline_tokenizer.decode(ids) == text


@pytest.mark.parametrize(
    "s",
    [
        "",
        "\x00\r\n\t\x0b\x0c\x1b",
        "héllo wörld ñ ç",
        "日本語のテキスト、中文文本。한국어",
        "emoji 😀👍🏽👨‍👩‍👧‍👦 flags 🇬🇧",
        "combining e\u0301 a\u0308 \u0915\u094d\u0937",
        "\ufeffBOM and \u200b zero width \u00a0nbsp",
        "   leading and trailing   ",
        "\U0010ffff\ufffd",
    ],
)
def test_roundtrip_exotic(offline_tokenizer: Any, s: str) -> None:
    assert offline_tokenizer.decode(offline_tokenizer.encode(s)) == s


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"])))
def test_roundtrip_hypothesis(offline_tokenizer: Any, s: str) -> None:
    assert offline_tokenizer.decode(offline_tokenizer.encode(s)) == s


def test_chat_template_two_turns(offline_tokenizer: Any) -> None:
    messages = [
        {"role": "system", "content": "A street in Verona."},
        {"role": "user", "content": "Hello there."},
        {"role": "assistant", "content": "Good morrow, cousin."},
        {"role": "user", "content": "What news?", "name": "Benvolio"},
    ]
    rendered = offline_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "A street in Verona.\n\n"
        "ROMEO:\nHello there.\n\n"
        "JULIET:\nGood morrow, cousin.\n\n"
        "BENVOLIO:\nWhat news?\n\n"
        "JULIET:\n"
    )
    two = offline_tokenizer.apply_chat_template(messages[1:3], tokenize=False)
    assert two == "ROMEO:\nHello there.\n\nJULIET:\nGood morrow, cousin.\n\n"
