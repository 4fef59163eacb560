"""Scheduling policy for the batch loop: pure Python, no torch, no asyncio.

The scheduler owns the sequences' *bookkeeping* (block tables, how much of the
prompt is in the KV cache, paused or not) and decides what each engine step
computes. It never touches tensors; the runner does, from the plan it returns.
KV memory is a pool of fixed-size blocks (:mod:`rtws.kv_blocks`); without a
pool (``kv=None``, pure-policy tests) memory is unbounded.

Policy, in order, at every step boundary:

1. Running sequences, highest priority and oldest first: each decode needs
   room for one more position, each unfinished prompt gets a chunk (oldest
   first, up to ``prefill_budget`` prompt tokens per step in total, so a long
   prompt never stalls running decodes for more than one budget's worth of
   work). When the pool is short, the lowest-priority, newest running
   sequence (a paused one first) is *preempted*: it gives its blocks back and
   waits to be recomputed from its prompt plus the tokens it already
   produced, so its stream goes on with nothing lost or repeated.
2. Admission: waiting sequences take the remaining room, highest effective
   priority first. Effective priority ages: a sequence's class improves by
   one level per ``aging_s`` seconds waited, so ``low`` never starves behind a
   stream of ``high``. Admission is capped by ``max_batch_size`` running
   sequences and by free blocks (the prefix cache first gives a sequence the
   blocks an earlier identical prefix left behind) and, when nothing is
   running, may wait up to ``max_batch_wait_s`` to group arrivals.
3. Decode: every running sequence that has its prompt cached and is not paused
   contributes one token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from .generation import SamplingParams
from .kv_blocks import KVCacheManager

PRIORITY_LEVELS: Final = {"high": 0, "normal": 1, "low": 2}


@dataclass(slots=True, eq=False)
class Sequence:
    """One generation as the engine sees it.

    ``prefill_len`` is how many tokens must be in the KV cache before it
    decodes: its prompt, or after a preemption its prompt plus every token it
    produced (recomputed as one prompt). ``cached_tokens`` is how much of the
    prompt the prefix cache supplied when it was first admitted.
    """

    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 1
    arrival: float = 0.0
    deadline: float | None = None
    num_cached: int = 0
    output_ids: list[int] = field(default_factory=list)
    paused: bool = False
    first_token_at: float | None = None
    admitted_at: float | None = None
    prefill_len: int = -1
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_committed: int = 0
    cached_tokens: int | None = None
    preemptions: int = 0

    def __post_init__(self) -> None:
        if self.prefill_len < 0:
            self.prefill_len = len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < self.prefill_len

    def next_input(self) -> int:
        """The token to feed at the next decode step (the last one produced)."""
        return self.output_ids[-1]

    def tokens(self, start: int, end: int) -> list[int]:
        """Token ids at positions ``start..end-1`` of prompt + output."""
        p = len(self.prompt_ids)
        if end <= p:
            return self.prompt_ids[start:end]
        head = self.prompt_ids[start:] if start < p else []
        return head + self.output_ids[max(0, start - p):end - p]


@dataclass(slots=True, frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == self.seq.prefill_len


@dataclass(slots=True)
class StepPlan:
    """One step's work. ``exhausted``: sequences that cannot get one more block even alone (the engine ends
    them with ``length``); they are not part of the computation."""

    prefill: list[PrefillChunk]
    decode: list[Sequence]
    exhausted: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    def rows(self) -> list[Sequence]:
        return [c.seq for c in self.prefill] + self.decode

    def subset(self, keep: set[int]) -> StepPlan:
        """The same plan restricted to the sequences whose rid is in ``keep``."""
        return StepPlan(prefill=[c for c in self.prefill if c.seq.rid in keep],
                        decode=[s for s in self.decode if s.rid in keep])


class Scheduler:
    """Admission, prefill chunking, decode selection and preemption over a pool of KV blocks.

    ``num_slots`` caps how many sequences run at once (``max_batch_size``
    may lower it); memory is bounded by ``kv`` (None: unbounded).
    """

    def __init__(
        self,
        num_slots: int,
        *,
        max_batch_size: int | None = None,
        prefill_budget: int = 512,
        max_batch_wait_s: float = 0.0,
        aging_s: float = 2.0,
        kv: KVCacheManager | None = None,
    ) -> None:
        if num_slots < 1:
            raise ValueError("num_slots must be >= 1")
        if prefill_budget < 1:
            raise ValueError("prefill_budget must be >= 1")
        if max_batch_wait_s < 0:
            raise ValueError("max_batch_wait_s must be >= 0")
        if aging_s <= 0:
            raise ValueError("aging_s must be > 0")
        self.num_slots = num_slots
        self.max_batch_size = min(max_batch_size or num_slots, num_slots)
        self.prefill_budget = prefill_budget
        self.max_batch_wait_s = max_batch_wait_s
        self.aging_s = aging_s
        self.kv = kv
        self._waiting: dict[int, Sequence] = {}
        self._running: dict[int, Sequence] = {}
        self.num_preemptions = 0
        self._preempted_now: set[int] = set()
        self.prefill_tokens = 0  # prompt tokens computed (prefix-cache hits excluded)

    # ------------------------------------------------------------------ queries

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_paused(self) -> int:
        return sum(1 for s in self._running.values() if s.paused)

    @property
    def num_free_slots(self) -> int:
        return self.num_slots - len(self._running)

    def get(self, rid: int) -> Sequence | None:
        return self._running.get(rid) or self._waiting.get(rid)

    def is_waiting(self, rid: int) -> bool:
        """True while ``rid`` waits for admission (new, or preempted and not yet recomputed)."""
        return rid in self._waiting

    def all_sequences(self) -> list[Sequence]:
        return [*self._running.values(), *self._waiting.values()]

    # ------------------------------------------------------------------ mutations

    def add(self, seq: Sequence) -> None:
        self._waiting[seq.rid] = seq

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, cancelled or failed) and give back its blocks. Idempotent."""
        self._waiting.pop(seq.rid, None)
        self._running.pop(seq.rid, None)
        if self.kv is not None:
            self.kv.release(seq)

    def set_paused(self, rid: int, paused: bool) -> None:
        """A paused sequence keeps its blocks; it is the first to be preempted when the pool is short."""
        seq = self.get(rid)
        if seq is not None:
            seq.paused = paused

    def commit(self, plan: StepPlan) -> None:
        """Record that the runner computed ``plan``: advance ``num_cached`` and index full blocks."""
        for seq in plan.decode:
            seq.num_cached += 1
        for chunk in plan.prefill:
            chunk.seq.num_cached = chunk.end
            self.prefill_tokens += chunk.end - chunk.start
        if self.kv is not None:
            for seq in plan.rows():
                self.kv.commit(seq)

    def preempt(self, seq: Sequence) -> None:
        """Give back a running sequence's blocks; it waits to be recomputed (prompt + its tokens so far)."""
        if self._running.pop(seq.rid, None) is None:
            return
        if self.kv is not None:
            self.kv.release(seq)
        seq.num_cached = 0
        seq.prefill_len = seq.num_tokens
        seq.preemptions += 1
        self.num_preemptions += 1
        self._preempted_now.add(seq.rid)
        self._waiting[seq.rid] = seq

    # ------------------------------------------------------------------ policy

    def effective_priority(self, seq: Sequence, now: float) -> float:
        return seq.priority - (now - seq.arrival) / self.aging_s

    def admission_deadline(self) -> float | None:
        """When idle-batching admission will proceed anyway.

        None when no timed admission is pending: nothing admissible waits, or
        admission does not hold back (something runs, or no batch wait). The
        engine sleeps until this time or the next command, so it must not be in
        the past while nothing can be admitted (a busy loop).
        """
        if self._running or self.max_batch_wait_s <= 0:
            return None
        arrivals = [s.arrival for s in self._waiting.values() if not s.paused]
        if not arrivals:
            return None
        return min(arrivals) + self.max_batch_wait_s

    def _victim(self, protect: set[int]) -> Sequence | None:
        """The running sequence to preempt: paused first, then lowest priority, then newest."""
        best: Sequence | None = None
        for s in self._running.values():
            if s.rid in protect:
                continue
            if best is None or (s.paused, s.priority, s.arrival, s.rid) > (best.paused, best.priority, best.arrival,
                                                                         best.rid):
                best = s
        return best

    def _room(self, seq: Sequence, num_tokens: int, protect: set[int]) -> bool:
        """Make the pool hold ``num_tokens`` positions for ``seq``, preempting others if needed."""
        kv = self.kv
        if kv is None:
            return True
        while not kv.ensure(seq, num_tokens):
            victim = self._victim(protect | {seq.rid})
            if victim is None:
                return False
            self.preempt(victim)
        return True

    def _fit_chunk(self, seq: Sequence, want: int) -> int:
        """The longest prefill chunk (at most ``want`` tokens) the free blocks allow, blocks taken."""
        kv = self.kv
        if kv is None:
            return want
        held = len(seq.block_table) * kv.block_size - seq.num_cached
        n = min(want, held + kv.pool.num_free * kv.block_size)
        if n > 0 and not kv.ensure(seq, seq.num_cached + n):  # pragma: no cover - sized to fit above
            return 0
        return max(0, n)

    def schedule(self, now: float) -> StepPlan:
        """Decide the next step. Mutates admission state, block tables and preemptions."""
        prefill: list[PrefillChunk] = []
        decode: list[Sequence] = []
        exhausted: list[Sequence] = []
        budget = self.prefill_budget
        scheduled: set[int] = set()
        for seq in sorted(self._running.values(), key=lambda s: (s.priority, s.arrival, s.rid)):
            if seq.paused or seq.rid not in self._running:  # paused, or preempted earlier in this loop
                continue
            if seq.in_prefill:
                if budget <= 0:
                    continue
                want = min(seq.prefill_len - seq.num_cached, budget)
                n = self._fit_chunk(seq, want)  # what free blocks allow, preempting no one
                if n <= 0:
                    if not self._room(seq, seq.num_cached + want, scheduled):
                        if len(self._running) == 1:
                            exhausted.append(seq)  # alone and the pool cannot hold its prompt
                        continue  # everything else is scheduled: wait for blocks to come back
                    n = want
                prefill.append(PrefillChunk(seq, seq.num_cached, seq.num_cached + n))
                budget -= n
            else:
                if not self._room(seq, seq.num_cached + 1, scheduled):
                    if len(self._running) > 1:
                        self.preempt(seq)  # the others come first; it is recomputed when blocks come back
                    else:
                        exhausted.append(seq)  # alone, and the pool cannot hold one more token
                    continue
                decode.append(seq)
            scheduled.add(seq.rid)
        self._admit(now, budget, prefill)
        self._preempted_now.clear()
        return StepPlan(prefill=prefill, decode=decode, exhausted=exhausted)

    def _admit(self, now: float, budget: int, prefill: list[PrefillChunk]) -> int:
        if not self._waiting or budget <= 0:
            return budget
        if (
            not self._running
            and self.max_batch_wait_s > 0
            and len(self._waiting) < self.max_batch_size
            and now < (self.admission_deadline() or now)
        ):
            return budget  # idle: wait a little to group arrivals into one batch
        room = self.max_batch_size - len(self._running)
        if room <= 0:
            return budget
        candidates = [s for s in self._waiting.values() if not s.paused and s.rid not in self._preempted_now]
        candidates.sort(key=lambda s: (self.effective_priority(s, now), s.arrival, s.rid))
        kv = self.kv
        for seq in candidates[:room]:
            if budget <= 0:
                break
            if kv is not None:
                first = seq.cached_tokens is None
                hit = kv.match_prefix(seq, seq.prefill_len, count=first)
                if first:
                    seq.cached_tokens = hit
                want = min(seq.prefill_len - seq.num_cached, budget)
                # Keep one block per running sequence in reserve, so admitting does not force a preemption
                # at the very next decode step.
                reserve = min(len(self._running), kv.pool.capacity // 4)
                need = kv.can_hold(seq, seq.num_cached + want)
                while need > kv.pool.num_free - reserve:  # memory is short: paused sequences give way
                    victim = self._victim(set())
                    if victim is None or not victim.paused:
                        break
                    self.preempt(victim)
                    reserve = min(len(self._running), kv.pool.capacity // 4)
                if need > kv.pool.num_free - reserve and not self._running:  # alone: start with what fits
                    held = len(seq.block_table) * kv.block_size - seq.num_cached
                    want = min(want, held + max(0, kv.pool.num_free - reserve) * kv.block_size)
                if want <= 0 or not kv.ensure(seq, seq.num_cached + want):
                    kv.release(seq)
                    seq.num_cached = 0
                    break  # the head of the queue waits; admitting others behind it would starve it
            else:
                if seq.cached_tokens is None:
                    seq.cached_tokens = 0
                want = min(seq.prefill_len - seq.num_cached, budget)
            del self._waiting[seq.rid]
            if seq.admitted_at is None:
                seq.admitted_at = now
            self._running[seq.rid] = seq
            prefill.append(PrefillChunk(seq, seq.num_cached, seq.num_cached + want))
            budget -= want
        return budget
