"""Automatic prefix caching: hits skip prefill, outputs are unchanged, versions never share, and the
reuse is reported (``cached_tokens``) over WebSocket, OpenAI and /metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import openai
import torch
from tests.helpers.metrics import scrape, total
from tests.helpers.server import UNIT, ServerFactory, run
from tests.integration.test_engine import Collector, reference

from rtws.client import Client
from rtws.engine import Engine, EngineConfig
from rtws.generation import SamplingParams
from rtws.model import ModelSpec, ServedModel, cache_salt, load
from rtws.runner import ModelRunner, load_model

SYSTEM = ("You are a careful assistant who speaks in the manner of the Bard. " * 4).strip()


def engine_for(path: Path, prefix_cache: bool = True, salt: str = "tiny\0001") -> tuple[Engine, Any, Any]:
    model, tok = load_model(str(path), torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, 8, 256, torch.device("cpu"), kv_cache_gb=0.01)
    eng = Engine(runner, tok, EngineConfig(num_slots=8, max_len=256, prefill_budget=64, prefix_cache=prefix_cache,
                                           cache_salt=salt), eos_ids={tok.eos_token_id})
    return eng, model, tok


Prompt = list[int] | Callable[[list[Collector]], list[int]]


def serve_in_turn(eng: Engine, prompts: list[Prompt], n: int | list[int]) -> list[Collector]:
    """One request at a time (each after the previous ended), greedy. A prompt may be built from the
    collectors of the earlier ones (the next turn of a chat)."""
    ns = n if isinstance(n, list) else [n] * len(prompts)

    async def main() -> list[Collector]:
        loop = asyncio.get_running_loop()
        eng.start(loop)
        out: list[Collector] = []
        for p, k in zip(prompts, ns):
            c = Collector(loop)
            ids = p(out) if callable(p) else p
            eng.submit(ids, SamplingParams(max_tokens=k, temperature=0.0, ignore_eos=True), c)
            await asyncio.wait_for(c.done, 60 * UNIT)
            out.append(c)
        return out

    try:
        return asyncio.run(main())
    finally:
        eng.stop()


def test_a_shared_prefix_is_not_prefilled_again_and_outputs_are_identical(tiny_llama_dir: Path) -> None:
    eng, model, tok = engine_for(tiny_llama_dir)
    system = tok.encode(SYSTEM)[:120]
    first, second = system + tok.encode("ROMEO:"), system + tok.encode("JULIET: wherefore")
    cols = serve_in_turn(eng, [first, second, second], 12)
    st = eng.stats()
    bs = st.kv_block_size
    hit = (len(system) // bs) * bs  # the full blocks of the shared system prompt
    done = [c.done.result() for c in cols]
    assert done[0].cached_tokens == 0
    assert done[1].cached_tokens >= hit > 0  # type: ignore[operator]
    assert done[2].cached_tokens == ((len(second) - 1) // bs) * bs  # the same prompt again: all but its tail
    computed = len(first) + (len(second) - done[1].cached_tokens) + (len(second) - done[2].cached_tokens)  # type: ignore[operator]
    assert st.prefill_tokens == computed  # hits were not prefilled
    assert st.prefix_cache_hits == done[1].cached_tokens + done[2].cached_tokens  # type: ignore[operator]
    assert st.prefix_cache_queries == len(first) + 2 * len(second)
    # Identical greedy outputs with and without the cache (and equal to generate).
    off, _, _ = engine_for(tiny_llama_dir, prefix_cache=False)
    cold = serve_in_turn(off, [first, second, second], 12)
    assert [c.ids for c in cols] == [c.ids for c in cold]
    assert cols[1].ids == reference(model, second, 12) == cols[2].ids
    assert off.stats().prefix_cache_hits == 0 and all(c.done.result().cached_tokens == 0 for c in cold)
    assert off.stats().prefill_tokens == len(first) + 2 * len(second)


def test_generated_tokens_are_cached_for_the_next_turn(tiny_llama_dir: Path) -> None:
    """A chat's next turn re-sends the previous reply: its blocks (prompt and generated) are reused."""
    eng, _, tok = engine_for(tiny_llama_dir)
    turn1 = tok.encode(SYSTEM)[:40]
    _, c2 = serve_in_turn(eng, [turn1, lambda done: turn1 + done[0].ids + tok.encode("more")], [40, 4])
    bs = eng.stats().kv_block_size
    # KV exists for prompt + all generated tokens but the last one (never fed back)
    assert c2.done.result().cached_tokens == ((len(turn1) + 40 - 1) // bs) * bs


def test_versions_never_share_blocks(tiny_llama_dir: Path) -> None:
    v1 = ModelSpec(name="tiny", path=str(tiny_llama_dir), version="1", device="cpu", kv_cache_gb=0.01)
    v2 = ModelSpec(name="tiny", path=str(tiny_llama_dir), version="2", device="cpu", kv_cache_gb=0.01)
    q = ModelSpec(name="tiny", path=str(tiny_llama_dir), version="1", device="cpu", quantization="int8")
    assert len({cache_salt(v1), cache_salt(v2), cache_salt(q)}) == 3
    a, b = load(v1), load(v2)
    assert a.engine.kv.root != b.engine.kv.root and a.engine.kv.pool is not b.engine.kv.pool
    prompt = a.encode(SYSTEM)

    def serve(m: ServedModel) -> int:
        (c,) = serve_in_turn(m.engine, [prompt], 3)
        return c.done.result().cached_tokens or 0

    assert serve(a) == 0
    assert serve(b) == 0  # the other version computed this prefix, in its own pool under its own salt
    assert a.engine.stats().prefix_cache_hits == 0 and b.engine.stats().prefix_cache_hits == 0


def test_cached_tokens_are_reported_over_websocket_openai_and_metrics(server_factory: ServerFactory,
                                                                       tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir, model_name="tiny", kv_cache_gb=0.01)
    user = "Tell me of the stars."

    async def ws() -> list[int | None]:
        out = []
        async with await Client.connect(srv.url) as c:
            for _ in range(2):
                s = await c.generate(SYSTEM + " " + user, max_tokens=3, temperature=0.0)
                await s.result()
                assert s.usage is not None
                out.append(s.usage.cached_tokens)
        return out

    first, second = run(ws())
    assert first == 0 and second is not None and second >= 16
    client = openai.OpenAI(base_url=srv.http + "/v1", api_key="none", max_retries=0, timeout=10 * UNIT)
    try:
        msgs: Any = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
        r1 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0.0)
        r2 = client.chat.completions.create(model="tiny", messages=msgs, max_tokens=3, temperature=0.0)
    finally:
        client.close()
    assert r1.usage is not None and r2.usage is not None and r2.usage.prompt_tokens_details is not None
    assert r2.usage.prompt_tokens_details.cached_tokens >= 16  # type: ignore[operator]
    assert r2.usage.prompt_tokens_details.cached_tokens < r2.usage.prompt_tokens  # type: ignore[operator]
    samples = scrape(srv)
    assert total(samples, "rtws_prefix_cache_hits_total", model="tiny") >= second + 16
    assert total(samples, "rtws_prefix_cache_queries_total", model="tiny") > 0
    assert total(samples, "rtws_kv_blocks", model="tiny") > 0
    assert total(samples, "rtws_kv_blocks_cached", model="tiny") > 0
    assert 0.0 <= total(samples, "rtws_kv_cache_usage_perc", model="tiny") <= 1.0
    assert any(name == "rtws_num_preemptions_total" for name, _ in samples)


def test_no_prefix_cache_switch(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir, model_name="tiny", prefix_cache=False)

    async def ws() -> list[int | None]:
        out = []
        async with await Client.connect(srv.url) as c:
            for _ in range(2):
                s = await c.generate(SYSTEM, max_tokens=2, temperature=0.0)
                await s.result()
                assert s.usage is not None
                out.append(s.usage.cached_tokens)
        return out

    assert run(ws()) == [0, 0]
