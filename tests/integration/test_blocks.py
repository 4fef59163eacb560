"""The KV block pool: allocation, freeing, hash chains, eviction order; preemption against generate."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from tests.integration.test_engine import Collector, reference

from rtws.engine import Engine, EngineConfig
from rtws.generation import SamplingParams
from rtws.kv_blocks import NULL_BLOCK, BlockPool, block_hash, root_hash
from rtws.runner import ModelRunner, load_model


def test_allocate_and_free_never_hand_out_the_null_block() -> None:
    pool = BlockPool(5, 16)
    assert pool.capacity == 4 and pool.num_free == 4
    got = pool.allocate(4)
    assert got is not None and sorted(got) == [1, 2, 3, 4] and NULL_BLOCK not in got
    assert pool.allocate(1) is None and pool.num_used == 4
    pool.free(got[:2])
    assert pool.num_free == 2
    with pytest.raises(RuntimeError):
        pool.free(got[:1])  # already at zero references
    assert pool.allocate(3) is None and pool.num_free == 2  # all or nothing


def test_hash_chain_depends_on_the_whole_prefix_and_the_salt() -> None:
    r1, r2 = root_hash("model\0" "1\0none"), root_hash("model\0" "2\0none")
    a = block_hash(r1, [1, 2, 3, 4])
    assert a == block_hash(r1, [1, 2, 3, 4])
    assert a != block_hash(r2, [1, 2, 3, 4])  # another version: another chain
    assert block_hash(a, [5, 6, 7, 8]) != block_hash(block_hash(r1, [9, 2, 3, 4]), [5, 6, 7, 8])
    assert root_hash("m\0" "1\0none") != root_hash("m\0" "1\0int8")  # quantization is part of the identity


def test_cached_blocks_are_evicted_least_recently_freed_first_and_tail_before_head() -> None:
    pool = BlockPool(6, 4)
    blocks = pool.allocate(5)
    assert blocks is not None
    keys = [bytes([i]) * 16 for i in range(5)]
    for b, k in zip(blocks, keys):
        pool.register(b, k)
    pool.free(blocks[:3])  # one sequence ends: its blocks 2, 1, 0 become evictable in that order
    pool.free(blocks[3:])  # then another: 4, 3
    assert pool.num_free == 5 and pool.num_cached == 5
    pool.acquire(blocks[0])  # a prefix hit takes the head block back: no longer evictable
    got = pool.allocate(2)
    assert got == [blocks[2], blocks[1]]  # oldest freed first, the sequence's tail before its head
    assert pool.lookup(keys[2]) is None and pool.lookup(keys[1]) is None and pool.lookup(keys[0]) == blocks[0]
    assert pool.stats.evictions == 2
    got2 = pool.allocate(2)
    assert got2 == [blocks[4], blocks[3]]


def test_uncached_free_blocks_are_used_before_evicting_cached_ones() -> None:
    pool = BlockPool(4, 4)
    a = pool.allocate(2)
    assert a is not None
    pool.register(a[0], b"k" * 16)
    pool.free(a)
    got = pool.allocate(2)
    assert got is not None and a[0] not in got and pool.lookup(b"k" * 16) == a[0]


def test_preempted_streams_recompute_and_still_equal_generate(tiny_llama_dir: Path) -> None:
    """A pool too small for all streams at once: the newest are preempted mid-way, recomputed from prompt
    plus output, and every stream still equals model.generate token for token, nothing lost or repeated."""
    model, tok = load_model(str(tiny_llama_dir), torch.device("cpu"), torch.float32)
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (k, v) x kv heads x head dim x fp32
    runner = ModelRunner(model, 8, 256, torch.device("cpu"), block_size=4, kv_cache_gb=13 * 4 * per_token / 2**30)
    assert runner.num_blocks == 13  # 12 usable blocks = 48 positions
    eng = Engine(runner, tok, EngineConfig(num_slots=8, max_len=256, prefill_budget=64),
                 eos_ids={tok.eos_token_id})
    text = tok.encode("ROMEO:\nBut soft, what light through yonder window breaks?")
    prompts = [text[: 4 + 2 * i] for i in range(4)]
    n = 24  # each stream needs up to 8 blocks; four of them need ~28

    async def main() -> list[Collector]:
        loop = asyncio.get_running_loop()
        eng.start(loop)
        cols = [Collector(loop) for _ in prompts]
        for p, c in zip(prompts, cols):
            eng.submit(p, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), c)
        await asyncio.wait_for(asyncio.gather(*(c.done for c in cols)), 120)
        return cols

    try:
        cols = asyncio.run(main())
    finally:
        eng.stop()
    st = eng.stats()
    assert st.preemptions >= 1
    for p, c in zip(prompts, cols):
        assert c.done.result().finish == "length"
        assert c.ids == reference(model, p, n)
        assert sum(ev.tokens for ev in c.events) == n  # the client saw each token exactly once
    assert st.kv_blocks_used == 0 and st.kv_blocks == 12


def test_prefault_kv_makes_the_whole_pool_resident_and_changes_no_output(tiny_llama_dir: Path) -> None:
    """prefault_kv writes every pool position once before traffic: RSS grows by about the pool, a second call
    adds nothing, the byte count is the pool's, and greedy output is unchanged."""
    import os

    def rss_mib() -> float:
        for line in Path(f"/proc/{os.getpid()}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    model, tok = load_model(str(tiny_llama_dir), torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, 4, 256, torch.device("cpu"), kv_cache_gb=0.125)
    before = rss_mib()
    touched = runner.prefault_kv()
    grown = rss_mib() - before
    assert touched == runner.num_blocks * runner.block_size * 2 * 2 * 2 * 16 * 4  # layers x k,v x heads x dim x 4
    assert touched / 2**20 >= 100 and grown >= 0.8 * touched / 2**20, (touched, grown)
    assert rss_mib() - before - grown < 8 and runner.prefault_kv() == touched
    eng = Engine(runner, tok, EngineConfig(num_slots=4, max_len=256), eos_ids={tok.eos_token_id})
    prompt = tok.encode("ROMEO:\nBut soft")

    async def main() -> Collector:
        loop = asyncio.get_running_loop()
        eng.start(loop)
        col = Collector(loop)
        eng.submit(prompt, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True), col)
        await asyncio.wait_for(col.done, 60)
        return col

    try:
        col = asyncio.run(main())
    finally:
        eng.stop()
    assert col.ids == reference(model, prompt, 16)
