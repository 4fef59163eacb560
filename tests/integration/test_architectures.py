"""Compatibility matrix: tiny random configs of real architectures served by the engine vs ``model.generate``.

Every windowed architecture gets a window of 16 and sequences of about 100
tokens, so outputs past the window are checked. Six greedy requests of
different prompt lengths join a running batch one after another, on the
dynamic path and on the static (CUDA-graph-shaped) path run eagerly on CPU.
Architectures rtws cannot serve are refused at load with "not supported".
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.helpers.models import build_tokenizer
from tests.helpers.server import UNIT

from rtws.engine import Engine, EngineConfig
from rtws.generation import SamplingParams, TokenEvent
from rtws.runner import ModelRunner, UnsupportedModelError, check_supported

W = 16  # sliding window
TOTAL = 100  # prompt + completion tokens per request
VOCAB = 400
BASE: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
MOE: dict[str, Any] = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def _cfg(name: str) -> Any:
    import transformers as tf

    b = dict(BASE)
    table: dict[str, Any] = {
        "llama": lambda: tf.LlamaConfig(**b),
        "qwen2": lambda: tf.Qwen2Config(**b),
        "qwen3": lambda: tf.Qwen3Config(**b, head_dim=8),
        "qwen3_moe": lambda: tf.Qwen3MoeConfig(**b, **MOE, head_dim=8),  # type: ignore[call-arg]
        "phi3": lambda: tf.Phi3Config(**b, pad_token_id=0),
        "gemma": lambda: tf.GemmaConfig(**b, head_dim=8),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**b),
        "falcon": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                          num_attention_heads=4, max_position_embeddings=256),
        "opt": lambda: tf.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                    num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=32),
        "stablelm": lambda: tf.StableLmConfig(**b),
        "olmo": lambda: tf.OlmoConfig(**b),
        "olmo2": lambda: tf.Olmo2Config(**b),
        "granite": lambda: tf.GraniteConfig(**b),
        "smollm3": lambda: tf.SmolLM3Config(**b, pad_token_id=0),
        "mixtral": lambda: tf.MixtralConfig(**b, num_local_experts=4, num_experts_per_tok=2),
        "gpt_bigcode": lambda: tf.GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                                   n_positions=256, multi_query=True),
        "cohere": lambda: tf.CohereConfig(**b),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**b, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=32),
        "deepseek_v3": lambda: tf.DeepseekV3Config(**{**b, "num_key_value_heads": 4}, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                                   qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                                                   num_experts_per_tok=2, moe_intermediate_size=32,
                                                   first_k_dense_replace=1, n_group=1, topk_group=1),
        # windowed
        "mistral": lambda: tf.MistralConfig(**b, sliding_window=W),
        "qwen2_window": lambda: tf.Qwen2Config(**b, use_sliding_window=True, sliding_window=W, max_window_layers=1),
        "phi3_window": lambda: tf.Phi3Config(**b, sliding_window=W, pad_token_id=0),
        "gemma2": lambda: tf.Gemma2Config(**b, head_dim=8, sliding_window=W),
        "gemma3_text": lambda: tf.Gemma3TextConfig(**b, head_dim=8, sliding_window=W, sliding_window_pattern=2),  # type: ignore[call-arg]
        "cohere2": lambda: tf.Cohere2Config(**b, sliding_window=W),
    }
    return table[name]()


SERVED = ["llama", "qwen2", "qwen3", "qwen3_moe", "phi3", "gemma", "gpt2", "gpt_neox", "falcon", "opt", "stablelm",
          "olmo", "olmo2", "granite", "smollm3", "mixtral", "gpt_bigcode", "cohere", "qwen2_moe", "deepseek_v3",
          "mistral", "qwen2_window", "phi3_window", "gemma2", "gemma3_text", "cohere2"]
WINDOWED = {"mistral", "qwen2_window", "phi3_window", "gemma2", "gemma3_text", "cohere2"}


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Any:
    """Tiny models on a shared CPU: one torch thread is ~50x faster than two contending ones."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("arch-tok")
    build_tokenizer(d, vocab_size=VOCAB, eos=False)
    return AutoTokenizer.from_pretrained(d)


def _model(name: str) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _cfg(name)
    for k in ("eos_token_id", "bos_token_id"):
        setattr(config, k, None)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # sharper logits than the default init, so greedy choices are not near-ties
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(4.0)
    return model.eval()


def _generate(model: Any, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()  # type: ignore[no-any-return]


def _serve(model: Any, tok: Any, prompts: list[list[int]], lengths: list[int], static: bool) -> list[list[int]]:
    """Request i+1 joins once request i has 2 tokens; all greedy; returns each request's token ids."""
    runner = ModelRunner(model, 8, 256, torch.device("cpu"), static_decode=static, kv_cache_gb=0.01)
    eng = Engine(runner, tok, EngineConfig(num_slots=8, max_len=256, prefill_budget=32))

    async def main() -> list[list[int]]:
        loop = asyncio.get_running_loop()
        eng.start(loop)
        outs: list[list[int]] = [[] for _ in prompts]
        futs = [loop.create_future() for _ in prompts]
        started = [False] * len(prompts)

        def submit(i: int) -> None:
            started[i] = True

            def sink(ev: TokenEvent) -> None:
                outs[i].extend(ev.token_ids or [])
                if i + 1 < len(prompts) and len(outs[i]) >= 2 and not started[i + 1]:
                    submit(i + 1)
                if ev.finish is not None and not futs[i].done():
                    futs[i].set_result(ev.finish)

            eng.submit(prompts[i], SamplingParams(max_tokens=lengths[i], temperature=0.0, ignore_eos=True), sink)

        submit(0)
        while not all(started):
            await asyncio.sleep(0.002)
        await asyncio.wait_for(asyncio.gather(*futs), 120 * UNIT)
        return outs

    try:
        return asyncio.run(main())
    finally:
        eng.stop()


@pytest.mark.parametrize("name", SERVED)
def test_architecture_matches_generate_on_both_paths(name: str, tokenizer: Any) -> None:
    model = _model(name)
    if name in WINDOWED:
        assert model.config.sliding_window == W
    g = torch.Generator().manual_seed(1)
    prompt_lens = [3, 9, 17, 26, 34, 45]  # staggered; with the completions, every request reaches TOTAL tokens
    prompts = [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in prompt_lens]
    lengths = [TOTAL - n for n in prompt_lens]
    with torch.inference_mode():
        ref = [_generate(model, p, n) for p, n in zip(prompts, lengths)]
    for static in (False, True):
        got = _serve(model, tokenizer, prompts, lengths, static)
        for i, (a, b) in enumerate(zip(got, ref)):
            assert a == b, f"{name} {'static' if static else 'dynamic'}: request {i} diverged at token " \
                           f"{next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), len(a))}"


def _refused_cfg(name: str) -> Any:
    import transformers as tf

    return {
        "mamba": lambda: tf.MambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, state_size=4),
        "falcon_mamba": lambda: tf.FalconMambaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                     state_size=4),
        "bloom": lambda: tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4),
        "falcon_alibi": lambda: tf.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=4, alibi=True),
        "mpt": lambda: tf.MptConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=4),
    }[name]()


@pytest.mark.parametrize("name,feature", [("mamba", "state-space"), ("falcon_mamba", "state-space"),
                                          ("bloom", "ALiBi"), ("falcon_alibi", "ALiBi"), ("mpt", "ALiBi")])
def test_unservable_architectures_are_refused_with_a_reason(name: str, feature: str) -> None:
    config = _refused_cfg(name)
    with pytest.raises(UnsupportedModelError, match="not supported") as info:
        check_supported(config)
    assert feature in str(info.value) and config.model_type in str(info.value)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)  # also refused by the runner itself, model in hand
    with pytest.raises(UnsupportedModelError, match="not supported"):
        ModelRunner(model, 4, 64, torch.device("cpu"), kv_cache_gb=0.001)


def test_server_refuses_a_state_space_model_at_load_and_exits_nonzero(tmp_path: Path) -> None:
    import transformers as tf

    d = tmp_path / "mamba"
    build_tokenizer(d, vocab_size=VOCAB)
    torch.manual_seed(0)
    tf.AutoModelForCausalLM.from_config(_refused_cfg("mamba")).save_pretrained(d)
    out = subprocess.run([sys.executable, "-m", "rtws", "serve", "--model", str(d), "--port", "0", "--device", "cpu"],
                         capture_output=True, text=True, timeout=120 * UNIT)
    assert out.returncode != 0
    assert "not supported" in out.stderr and "Mamba" in out.stderr
