"""Slot compaction in the scheduler (pure, no model)."""

from __future__ import annotations

from rtws.scheduler import SamplingParams, Scheduler, Sequence


def seq(rid: int, n: int = 4) -> Sequence:
    return Sequence(rid=rid, prompt_ids=[1] * n, params=SamplingParams(), arrival=float(rid))


def test_finishing_a_middle_sequence_moves_the_top_one_into_the_hole() -> None:
    s = Scheduler(8)
    seqs = [seq(i) for i in range(5)]
    for q in seqs:
        s.add(q)
    s.schedule(now=10.0)
    assert sorted(q.slot for q in seqs) == [0, 1, 2, 3, 4]
    seqs[4].num_cached = 7
    s.finish(seqs[1])  # hole at slot 1; slot 4 moves down
    assert s.take_moves() == [(4, 1, 7)]
    assert s.take_moves() == []
    live = [q for q in seqs if q is not seqs[1]]
    assert sorted(q.slot for q in live) == [0, 1, 2, 3]
    s.finish(seqs[3])  # the top one itself: no move needed
    assert s.take_moves() == []
    plan = s.schedule(now=11.0)
    assert [q.slot for q in plan.decode] == sorted(q.slot for q in plan.decode)
    new = seq(9)
    s.add(new)
    s.schedule(now=12.0)
    assert new.slot == 3  # the lowest free slot
    assert s.num_free_slots == 4


def test_decode_rows_come_in_slot_order() -> None:
    s = Scheduler(4)
    qs = [seq(i) for i in range(4)]
    for q in qs:
        s.add(q)
    s.schedule(now=5.0)
    for q in qs:
        q.num_cached = len(q.prompt_ids)
        q.output_ids.append(3)
    s.finish(qs[0])
    plan = s.schedule(now=6.0)
    assert [q.slot for q in plan.decode] == [0, 1, 2]
