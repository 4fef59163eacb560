"""Scheduling policy for the batch loop: pure Python, no torch, no asyncio.

The scheduler owns the sequences' *bookkeeping* (which slot, how much of the
prompt is in the KV cache, paused or not) and decides what each engine step
computes. It never touches tensors; the runner does, from the plan it returns.

Policy, in order, at every step boundary:

1. Admission: waiting sequences take free KV slots, highest effective priority
   first. Effective priority ages: a sequence's class improves by one level per
   ``aging_s`` seconds waited, so ``low`` never starves behind a stream of
   ``high``. Admission is capped by ``max_batch_size`` running sequences and,
   when nothing is running, may wait up to ``max_batch_wait_s`` to group
   arrivals into one prefill.
2. Prefill: sequences whose prompt is not fully cached get chunks, oldest
   first, up to ``prefill_budget`` prompt tokens per step in total, so a long
   prompt never stalls running decodes for more than one budget's worth of work.
3. Decode: every running sequence that has its prompt cached and is not paused
   contributes one token.
"""

from __future__ import annotations

import enum
import heapq
import itertools
from dataclasses import dataclass, field
from typing import Final

PRIORITY_LEVELS: Final = {"high": 0, "normal": 1, "low": 2}


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(slots=True, eq=False)
class Sequence:
    """One generation as the engine sees it."""

    rid: int
    prompt_ids: list[int]
    params: SamplingParams
    priority: int = 1
    arrival: float = 0.0
    deadline: float | None = None
    status: SeqStatus = SeqStatus.WAITING
    slot: int = -1
    num_cached: int = 0
    output_ids: list[int] = field(default_factory=list)
    paused: bool = False
    first_token_at: float | None = None
    admitted_at: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def in_prefill(self) -> bool:
        return self.num_cached < len(self.prompt_ids)

    def next_input(self) -> int:
        """The token to feed at the next decode step (the last one produced)."""
        return self.output_ids[-1]


@dataclass(slots=True, frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def is_last(self) -> bool:
        return self.end == len(self.seq.prompt_ids)


@dataclass(slots=True)
class StepPlan:
    prefill: list[PrefillChunk]
    decode: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    """Admission, prefill chunking and decode selection over a fixed pool of KV slots."""

    def __init__(
        self,
        num_slots: int,
        *,
        max_batch_size: int | None = None,
        prefill_budget: int = 512,
        max_batch_wait_s: float = 0.0,
        aging_s: float = 2.0,
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
        self._free_slots: list[int] = list(range(num_slots))
        heapq.heapify(self._free_slots)
        self._waiting: dict[int, Sequence] = {}
        self._running: dict[int, Sequence] = {}
        self._order = itertools.count()
        self._moves: list[tuple[int, int, int]] = []

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
        return len(self._free_slots)

    def has_work(self) -> bool:
        return bool(self._waiting) or any(not s.paused for s in self._running.values())

    def get(self, rid: int) -> Sequence | None:
        return self._running.get(rid) or self._waiting.get(rid)

    def running(self) -> list[Sequence]:
        return list(self._running.values())

    def all_sequences(self) -> list[Sequence]:
        return [*self._running.values(), *self._waiting.values()]

    # ------------------------------------------------------------------ mutations

    def add(self, seq: Sequence) -> None:
        seq.status = SeqStatus.WAITING
        self._waiting[seq.rid] = seq

    def finish(self, seq: Sequence) -> None:
        """Remove a sequence (finished, cancelled or failed) and free its slot. Idempotent.

        Keeps running sequences in the lowest slots: when a hole opens below the
        highest used slot, that slot's sequence moves into the hole, and the
        move is queued for the runner (:meth:`take_moves`), which copies its KV
        rows. Decode batches then read the cache as one contiguous view
        instead of gathering scattered slots.
        """
        if self._waiting.pop(seq.rid, None) is None and self._running.pop(seq.rid, None) is not None:
            freed = seq.slot
            top = max(self._running.values(), key=lambda s: s.slot, default=None)
            if top is not None and top.slot > freed:
                self._moves.append((top.slot, freed, top.num_cached))
                freed, top.slot = top.slot, freed
            heapq.heappush(self._free_slots, freed)
        seq.status = SeqStatus.FINISHED
        seq.slot = -1

    def take_moves(self) -> list[tuple[int, int, int]]:
        """KV moves ``(src_slot, dst_slot, length)`` to apply, in order, before the next step."""
        moves, self._moves = self._moves, []
        return moves

    def set_paused(self, rid: int, paused: bool) -> None:
        seq = self.get(rid)
        if seq is not None:
            seq.paused = paused

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

    def _admit(self, now: float) -> None:
        if not self._waiting or not self._free_slots:
            return
        if (
            not self._running
            and self.max_batch_wait_s > 0
            and len(self._waiting) < self.max_batch_size
            and now < (self.admission_deadline() or now)
        ):
            return  # idle: wait a little to group arrivals into one batch
        room = min(len(self._free_slots), self.max_batch_size - len(self._running))
        if room <= 0:
            return
        candidates = [s for s in self._waiting.values() if not s.paused]
        if len(candidates) > room:
            candidates.sort(key=lambda s: (self.effective_priority(s, now), s.arrival, s.rid))
            candidates = candidates[:room]
        else:
            candidates.sort(key=lambda s: (self.effective_priority(s, now), s.arrival, s.rid))
        for seq in candidates:
            del self._waiting[seq.rid]
            seq.slot = heapq.heappop(self._free_slots)
            seq.status = SeqStatus.RUNNING
            seq.admitted_at = now
            self._running[seq.rid] = seq

    def schedule(self, now: float) -> StepPlan:
        """Decide the next step. Mutates only admission state (slots, status)."""
        self._admit(now)
        prefill: list[PrefillChunk] = []
        decode: list[Sequence] = []
        budget = self.prefill_budget
        for seq in self._running.values():
            if seq.paused:
                continue
            if seq.in_prefill:
                if budget <= 0:
                    continue
                end = min(len(seq.prompt_ids), seq.num_cached + budget)
                prefill.append(PrefillChunk(seq, seq.num_cached, end))
                budget -= end - seq.num_cached
            else:
                decode.append(seq)
        decode.sort(key=lambda s: s.slot)  # ascending slots: usually 0..n-1, read as a view
        return StepPlan(prefill=prefill, decode=decode)
