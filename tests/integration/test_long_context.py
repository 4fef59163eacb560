"""Long context at a small KV budget: memory follows the budget, not max_len, and a 32k-context model serves
64 short streams and one long prompt at the same time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import pytest
import torch
from tests.helpers.http import post
from tests.helpers.models import build_model
from tests.helpers.server import UNIT, ServerFactory
from tests.integration.test_engine import Collector, reference

from rtws.engine import Engine, EngineConfig
from rtws.generation import SamplingParams
from rtws.runner import ModelRunner, load_model

CONTEXT = 32768


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama-32k"), "llama", context=CONTEXT, eos=False)


def test_pool_size_follows_the_budget_not_max_len(long_dir: Path) -> None:
    model, _ = load_model(str(long_dir), torch.device("cpu"), torch.float32)
    small = ModelRunner(model, 64, 512, torch.device("cpu"), static_decode=True, kv_cache_gb=0.01)
    big = ModelRunner(model, 64, CONTEXT, torch.device("cpu"), static_decode=True, kv_cache_gb=0.01)
    assert small.num_blocks == big.num_blocks and small.kv_cache_bytes == big.kv_cache_bytes <= 0.01 * 2**30
    layer = big.cache.layers[0]
    assert layer.k_pool is not None and layer.k_pool.shape[0] == big.num_blocks * big.block_size  # type: ignore[union-attr]
    # The static (CUDA-graph) path reads the length bucket of the longest live row, not max_len.
    assert big._static is not None and small._static is not None
    assert big._static.kv_bucket(130) == small._static.kv_bucket(130) == 256
    assert big._static.len_buckets[-1] == CONTEXT
    # 64 short rows beside one long one are decoded as two groups, each reading up to its own longest row.
    from rtws.generation import SamplingParams
    from rtws.scheduler import Sequence

    rows = [Sequence(rid=i, prompt_ids=[1], params=SamplingParams(), num_cached=20 + i % 5) for i in range(64)]
    rows.append(Sequence(rid=99, prompt_ids=[1], params=SamplingParams(), num_cached=20_000))
    groups = big._length_groups(rows)
    assert [len(g) for g in groups] == [64, 1] and groups[1][0].rid == 99
    assert big._length_groups(rows[:64]) == [rows[:64]]  # similar lengths: one group
    # Prefill likewise: 12-token chunks are not padded to a 512-token chunk of the long prompt.
    from rtws.scheduler import PrefillChunk

    chunks = [PrefillChunk(rows[-1], 19_488, 20_000)] + [PrefillChunk(q, 0, 12) for q in rows[:64]]
    pg = big._prefill_groups(chunks)
    assert [len(g) for g in pg] == [1, 64] and pg[0][0].seq.rid == 99
    similar = [PrefillChunk(q, 0, 20 + i % 9) for i, q in enumerate(rows[:32])]
    assert big._prefill_groups(similar) == [sorted(similar, key=lambda c: (c.end - c.start) * c.end, reverse=True)]


@pytest.mark.slow
@pytest.mark.parametrize("static_decode", [False, True], ids=["dynamic", "static"])
def test_64_short_streams_and_one_long_prompt_together(long_dir: Path, static_decode: bool) -> None:
    model, tok = load_model(str(long_dir), torch.device("cpu"), torch.float32)
    per_token = 2 * 2 * 2 * 16 * 4
    budget_tokens = 12_000  # far below 65 x 32k; enough for what is live at once
    runner = ModelRunner(model, 72, CONTEXT, torch.device("cpu"), static_decode=static_decode,
                         kv_cache_gb=budget_tokens * per_token / 2**30)
    eng = Engine(runner, tok, EngineConfig(num_slots=72, max_len=CONTEXT, prefill_budget=1024))
    g = torch.Generator().manual_seed(3)
    long_prompt = torch.randint(1, 400, (7000,), generator=g).tolist()
    shorts = [torch.randint(1, 400, (8 + i % 8,), generator=g).tolist() for i in range(64)]
    prev = torch.get_num_threads()
    torch.set_num_threads(1)

    async def main() -> tuple[Collector, list[Collector], int]:
        loop = asyncio.get_running_loop()
        eng.start(loop)
        big = Collector(loop)
        eng.submit(long_prompt, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True), big)
        cols = [Collector(loop) for _ in shorts]
        for p, c in zip(shorts, cols):
            eng.submit(p, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True), c)
        peak = 0
        while not (big.done.done() and all(c.done.done() for c in cols)):
            peak = max(peak, eng.stats().running)
            await asyncio.sleep(0.01)
        return big, cols, peak

    try:
        big, cols, peak = asyncio.run(asyncio.wait_for(main(), 300 * UNIT))
    finally:
        eng.stop()
        torch.set_num_threads(prev)
    assert peak >= 60  # they really ran together
    assert big.done.result().finish == "length" and len(big.ids) == 8
    assert all(c.done.result().finish == "length" and len(c.ids) == 24 for c in cols)
    with torch.inference_mode():
        assert big.ids == reference(model, long_prompt, 8)
        assert cols[5].ids == reference(model, shorts[5], 24)
    assert eng.stats().kv_blocks_used == 0


def test_a_prompt_that_can_never_fit_the_pool_is_refused_at_submit(server_factory: ServerFactory,
                                                                   tiny_llama_dir: Path) -> None:
    per_token = 2 * 2 * 2 * 16 * 4
    gb = 5 * 16 * per_token / 2**30  # 5 blocks: 4 usable = 64 positions
    srv = server_factory(tiny_llama_dir, model_name="tiny", kv_cache_gb=gb)
    long_text = "But soft, what light through yonder window breaks? " * 8  # about 88 tokens: over 64, under 255
    r = post(srv.http, "/infer", {"prompt": long_text, "max_tokens": 2})
    assert r.status == 400
    body = msgspec.json.decode(r.body)
    assert "KV cache" in body["error"]["message"] and "64 token positions" in body["error"]["message"]
    assert post(srv.http, "/infer", {"prompt": "hi", "max_tokens": 2, "stream": False}).status == 200
