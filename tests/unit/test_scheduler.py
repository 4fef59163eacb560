"""The scheduler over a KV block pool (pure, no model): block tables, preemption, prefix hits, admission."""

from __future__ import annotations

from rtws.generation import SamplingParams
from rtws.kv_blocks import KVCacheManager
from rtws.scheduler import PRIORITY_LEVELS, Scheduler, Sequence, StepPlan


def seq(rid: int, n: int = 4, priority: str = "normal", tokens: list[int] | None = None) -> Sequence:
    return Sequence(rid=rid, prompt_ids=tokens if tokens is not None else [rid + 1] * n, params=SamplingParams(),
                    arrival=float(rid), priority=PRIORITY_LEVELS[priority])


def run_step(s: Scheduler, plan: StepPlan, token: int = 7) -> None:
    """What the engine does after the runner computed ``plan``: commit, then one token per sampling row."""
    s.commit(plan)
    for c in plan.prefill:
        if c.is_last:
            c.seq.output_ids.append(token)
    for q in plan.decode:
        q.output_ids.append(token)


def test_block_tables_grow_as_sequences_decode() -> None:
    kv = KVCacheManager(num_blocks=9, block_size=4)
    s = Scheduler(8, kv=kv, prefill_budget=64)
    a, b = seq(0, n=6), seq(1, n=3)
    s.add(a)
    s.add(b)
    plan = s.schedule(0.0)
    assert [(c.seq.rid, c.start, c.end) for c in plan.prefill] == [(0, 0, 6), (1, 0, 3)]
    assert len(a.block_table) == 2 and len(b.block_table) == 1
    assert len(set(a.block_table + b.block_table)) == 3 and 0 not in a.block_table + b.block_table
    run_step(s, plan)
    for _ in range(3):  # a: 6 -> 9 positions (3 blocks); b: 3 -> 6 (2 blocks)
        plan = s.schedule(1.0)
        assert {q.rid for q in plan.decode} == {0, 1}
        run_step(s, plan)
    plan = s.schedule(2.0)
    assert len(a.block_table) == 3 and len(b.block_table) == 2
    assert kv.pool.num_free == 8 - 5
    s.finish(a)
    assert kv.pool.num_free == 8 - 2 and a.block_table == []


def test_preemption_takes_the_newest_lowest_priority_and_recomputes_prompt_plus_output() -> None:
    kv = KVCacheManager(num_blocks=5, block_size=4, prefix_cache=False)  # 4 usable blocks = 16 positions
    s = Scheduler(8, kv=kv, prefill_budget=64)
    old, new = seq(0, n=4, priority="normal"), seq(1, n=4, priority="normal")
    low = seq(2, n=4, priority="low")
    for q in (old, new, low):
        s.add(q)
    plan = s.schedule(0.0)
    run_step(s, plan)
    assert kv.pool.num_free == 1
    # Each needs a second block to decode: one left; the low-priority one is preempted first.
    plan = s.schedule(1.0)
    assert s.is_waiting(low.rid) and low.num_cached == 0 and low.block_table == []
    assert low.prefill_len == 5 and low.preemptions == 1  # prompt (4) + the token it produced
    assert {q.rid for q in plan.decode} == {0, 1}
    run_step(s, plan)
    assert s.num_preemptions == 1
    s.finish(old)
    s.finish(new)
    plan = s.schedule(2.0)  # room again: low comes back as a 5-token prefill of prompt + output
    chunks = {c.seq.rid: (c.start, c.end) for c in plan.prefill}
    assert chunks == {2: (0, 5)} and low.tokens(0, 5) == [3, 3, 3, 3, 7]
    assert plan.prefill[0].is_last


def test_paused_sequences_keep_blocks_until_memory_is_short_and_go_first() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, prefix_cache=False)  # 3 usable blocks
    s = Scheduler(8, kv=kv, prefill_budget=64)
    a, b = seq(0, n=4), seq(1, n=4)
    s.add(a)
    s.add(b)
    run_step(s, s.schedule(0.0))
    s.set_paused(0, True)  # the older one is paused
    plan = s.schedule(1.0)
    assert [q.rid for q in plan.decode] == [1] and a.block_table  # plenty: it keeps its blocks
    run_step(s, plan)
    for t in range(3):
        run_step(s, s.schedule(2.0 + t))
    plan = s.schedule(9.0)  # b needs a third block: the paused one goes, though it is older
    assert s.is_waiting(a.rid) and a.block_table == [] and [q.rid for q in plan.decode] == [1]


def test_alone_and_out_of_blocks_is_exhausted_not_looping() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=2, prefix_cache=False)  # 4 positions in all
    s = Scheduler(4, kv=kv)
    a = seq(0, n=3)
    s.add(a)
    run_step(s, s.schedule(0.0))
    plan = s.schedule(1.0)
    run_step(s, plan)  # position 3: the last one
    plan = s.schedule(2.0)
    assert plan.decode == [] and plan.exhausted == [a]


def test_prefix_hit_skips_cached_blocks_and_never_the_last_token() -> None:
    kv = KVCacheManager(num_blocks=32, block_size=4, salt="m\0001")
    s = Scheduler(8, kv=kv, prefill_budget=64)
    system = list(range(100, 110))  # 10 tokens: 2 full blocks + 2
    first = seq(0, tokens=system + [1, 2, 3])
    s.add(first)
    run_step(s, s.schedule(0.0))
    s.finish(first)
    assert kv.pool.num_cached == 3  # blocks of positions 0..11 are full and indexed
    second = seq(1, tokens=system + [1, 2, 9, 9, 9])
    s.add(second)
    plan = s.schedule(1.0)
    assert [(c.start, c.end) for c in plan.prefill] == [(12, 15)]  # 3 blocks reused, only the rest computed
    assert second.cached_tokens == 12
    assert kv.pool.stats.hits == 12 and kv.pool.stats.queries == 13 + 15
    run_step(s, plan)
    exact = seq(2, tokens=system + [1, 2])  # 12 tokens = exactly 3 full cached blocks
    s.add(exact)
    plan = s.schedule(2.0)
    assert [(c.seq.rid, c.start, c.end) for c in plan.prefill] == [(2, 8, 12)]  # the last block is recomputed
    other = KVCacheManager(num_blocks=32, block_size=4, salt="m\0002")
    assert other.root != kv.root


def test_admission_respects_max_batch_size_and_free_blocks() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, prefix_cache=False)
    s = Scheduler(8, kv=kv, max_batch_size=8, prefill_budget=64)
    for i in range(4):
        s.add(seq(i, n=6))  # 2 blocks each: only one fits (3 usable)
    plan = s.schedule(0.0)
    assert [c.seq.rid for c in plan.prefill] == [0] and s.num_waiting == 3


def test_a_waiting_request_preempts_paused_sequences_when_memory_is_short() -> None:
    kv = KVCacheManager(num_blocks=4, block_size=4, prefix_cache=False)  # 3 usable blocks
    s = Scheduler(8, kv=kv, prefill_budget=64)
    a = seq(0, n=8)  # 2 blocks
    s.add(a)
    run_step(s, s.schedule(0.0))
    s.set_paused(0, True)
    b = seq(1, n=8)  # needs 2 blocks; 1 free: the paused one gives way
    s.add(b)
    plan = s.schedule(1.0)
    assert [c.seq.rid for c in plan.prefill] == [1] and s.is_waiting(a.rid) and a.paused
    run_step(s, plan)
    s.set_paused(0, False)
    s.finish(b)
    plan = s.schedule(2.0)  # resumed: recomputed from prompt + its token
    assert [(c.seq.rid, c.start, c.end) for c in plan.prefill] == [(0, 0, 9)]


def test_a_prompt_larger_than_the_pool_is_exhausted_not_stuck() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4, prefix_cache=False)  # 8 positions
    s = Scheduler(4, kv=kv, prefill_budget=64)
    a = seq(0, n=20)
    s.add(a)
    plan = s.schedule(0.0)
    assert [(c.start, c.end) for c in plan.prefill] == [(0, 8)]  # what fits
    s.commit(plan)
    plan = s.schedule(1.0)
    assert plan.prefill == [] and plan.exhausted == [a]
