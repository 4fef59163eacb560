"""Weight quantization (torchao int8 weight-only on CPU) and its refusals.

int8 runs on the bundled model and on a tiny random Llama: weight memory is measured and must fall, and
greedy agreement with float32 through the real engine is reported (printed) and bounded from below.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.server import ServerFactory

from rtws.load_errors import ModelLoadError
from rtws.loading import checked_load
from rtws.model import ModelSpec

PROMPTS = ["ROMEO:", "JULIET:\nO Romeo", "First Citizen:\nBefore we proceed", "KING HENRY:", "To be, or not"]


def _greedy(served: Any, prompts: list[str], n: int) -> list[list[int]]:
    """Greedy continuations (``n`` tokens, EOS ignored) of each prompt, by the served model's own weights."""
    import torch

    outs: list[list[int]] = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([served.encode(p)])
            out = served.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                        pad_token_id=served.tokenizer.eos_token_id or 0)
            outs.append(out[0, ids.shape[1]:].tolist())
    return outs


def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Share of positions where the two greedy runs agree, counted up to each pair's first divergence."""
    same = total = 0
    for x, y in zip(a, b, strict=True):
        n = max(len(x), len(y))
        total += n
        for i in range(min(len(x), len(y))):
            if x[i] != y[i]:
                break
            same += 1
    return same / max(1, total)


def _compare(path: Path, tokens: int) -> tuple[int, int, float]:
    from rtws.quant import weight_bytes

    ref = checked_load(ModelSpec(name="f32", path=str(path), num_slots=4, dtype="float32"))
    q = checked_load(ModelSpec(name="i8", path=str(path), num_slots=4, dtype="float32", quantization="int8"))
    before, after = weight_bytes(ref.model), weight_bytes(q.model)
    try:
        a, b = _greedy(ref, PROMPTS, tokens), _greedy(q, PROMPTS, tokens)
    finally:
        ref.stop()
        q.stop()
    return before, after, agreement(a, b)


def test_int8_bundled_model_uses_less_memory_and_agrees(default_model_dir: Path) -> None:
    pytest.importorskip("torchao")
    before, after, agree = _compare(default_model_dir, 32)
    print(f"\nbundled model: weights {before} -> {after} bytes ({after / before:.2f}x), "
          f"greedy agreement {agree:.3f} over {len(PROMPTS)} prompts x 32 tokens")
    assert after < 0.7 * before
    assert agree >= 0.5  # 0.98 measured on the 2-core VM; broken int8 weights agree on ~nothing


def test_int8_tiny_random_llama(tiny_llama_dir: Path) -> None:
    pytest.importorskip("torchao")
    before, after, agree = _compare(tiny_llama_dir, 16)
    print(f"\ntiny random llama: weights {before} -> {after} bytes ({after / before:.2f}x), "
          f"greedy agreement {agree:.3f} over {len(PROMPTS)} prompts x 16 tokens")
    assert after < before
    assert agree > 0.0  # random weights: near-tied logits may diverge early; the first tokens agree


def test_int8_server_serves_and_reports_it(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    pytest.importorskip("torchao")
    from openai import OpenAI

    srv = server_factory(tiny_llama_dir, model_name="tiny", quantization="int8")
    client = OpenAI(base_url=srv.http + "/v1", api_key="none", max_retries=0)
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=5, temperature=0)
    assert out.usage is not None and out.usage.completion_tokens >= 1
    models = client.models.list()
    card = models.data[0].model_dump()
    assert card["quantization"] == "int8" and card["dtype"] == "float32"


# --------------------------------------------------------------------------- refusals


def test_int4_on_cpu_is_refused(tiny_llama_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="int4 weight-only quantization needs a CUDA device"):
        checked_load(ModelSpec(name="t", path=str(tiny_llama_dir), device="cpu", quantization="int4"))


def test_unknown_value_is_refused_listing_the_valid_ones(tiny_llama_dir: Path) -> None:
    from rtws.config import ServerConfig

    with pytest.raises(ValueError, match="quantization: must be one of none, int8, int4"):
        ServerConfig(quantization="fp3")
    with pytest.raises(ModelLoadError, match="unknown quantization 'fp3'; valid values: none, int8, int4"):
        checked_load(ModelSpec(name="t", path=str(tiny_llama_dir), quantization="fp3"))


def test_quantization_with_cuda_graphs_is_refused_clearly() -> None:
    from rtws.quant import QuantizationError, check

    with pytest.raises(QuantizationError, match="--no-cuda-graphs"):
        check("int8", "cuda", True)
    check("int8", "cuda", False) if _has_torchao() else None


def _has_torchao() -> bool:
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def _prequantized(src: Path, dst: Path, method: str) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": method, "bits": 4}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("method,package", [("gptq", "gptqmodel"), ("awq", "gptqmodel"),
                                            ("compressed-tensors", "compressed-tensors"),
                                            ("bitsandbytes", "bitsandbytes")])
def test_prequantized_checkpoint_without_its_package_is_refused_naming_it(
        tiny_llama_dir: Path, tmp_path: Path, method: str, package: str) -> None:
    from rtws.quant import missing_packages

    if package not in missing_packages(method):
        pytest.skip(f"{package} is installed here")
    d = _prequantized(tiny_llama_dir, tmp_path / "m", method)
    with pytest.raises(ModelLoadError, match=f"pre-quantized with {method}.*pip install .*{package}"):
        checked_load(ModelSpec(name="t", path=str(d)))


def test_prequantized_checkpoint_with_int8_on_top_is_refused(tiny_llama_dir: Path, tmp_path: Path) -> None:
    d = _prequantized(tiny_llama_dir, tmp_path / "m", "gptq")
    with pytest.raises(ModelLoadError, match=r"already quantized \(gptq\); pass --quantization none"):
        checked_load(ModelSpec(name="t", path=str(d), quantization="int8"))


def test_checkpoint_method_reads_configs() -> None:
    from rtws.quant import checkpoint_method

    assert checkpoint_method({"model_type": "llama"}) is None
    assert checkpoint_method({"quantization_config": {"quant_method": "bitsandbytes_4bit"}}) == "bitsandbytes"
    assert checkpoint_method({"quantization_config": {"quant_method": "gptq"}}) == "gptq"


def test_prefix_cache_key_includes_the_quantization() -> None:
    from rtws.model import cache_salt

    base = ModelSpec(name="m", path="/p")
    assert cache_salt(base) != cache_salt(ModelSpec(name="m", path="/p", quantization="int8"))
