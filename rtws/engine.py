"""The batch loop: a dedicated thread that runs the model, and a thread-safe front door.

Everything the event loop calls (:meth:`Engine.submit`, ``cancel``, ``pause``,
``resume``, ``stats``) only appends to a command queue or reads a snapshot:
it never blocks on the model. The engine thread applies commands at step
boundaries, asks the scheduler for a plan, has the runner compute it, turns
tokens into text, and hands each step's events back to the event loop with a
single ``loop.call_soon_threadsafe``.

This module imports no torch: the runner is passed in.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from .detok import TextStream
from .generation import SamplingParams, TokenEvent
from .kv_blocks import KVCacheManager
from .scheduler import PRIORITY_LEVELS, Scheduler, Sequence, StepPlan

log = logging.getLogger("rtws.engine")


Sink = Callable[[TokenEvent], None]


@dataclass(slots=True, frozen=True)
class Submit:
    """Engine command: queue ``seq``; its events go to ``sink``."""

    seq: Sequence
    sink: Sink


@dataclass(slots=True, frozen=True)
class Cancel:
    """Engine command: drop generation ``rid`` (no further event)."""

    rid: int


@dataclass(slots=True, frozen=True)
class SetPaused:
    """Engine command: pause (``paused``) or resume the generations ``rids``."""

    rids: tuple[int, ...]
    paused: bool


Command = Submit | Cancel | SetPaused


@dataclass(slots=True)
class _Request:
    """The engine thread's state for one generation: where its events go, its detokenizer, how many of its
    tokens no event has carried yet, and whether its last event is made (it stays until that is delivered)."""

    sink: Sink
    stream: TextStream
    unsent: int = 0
    finished: bool = False


@dataclass(slots=True, frozen=True)
class EngineStats:
    running: int = 0
    waiting: int = 0
    paused: int = 0
    slots_in_use: int = 0
    num_slots: int = 0
    steps: int = 0
    tokens_generated: int = 0
    step_errors: int = 0
    kv_blocks: int = 0
    kv_blocks_used: int = 0
    kv_blocks_free: int = 0
    kv_blocks_cached: int = 0
    kv_block_size: int = 0
    preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefill_tokens: int = 0
    elastic_steps: int = 0  # steps run at the elastic top thread count (rtws.threads.ElasticThreads)

    @property
    def kv_usage(self) -> float:
        """Fraction of the KV pool held by live sequences (0..1), as vLLM's ``kv_cache_usage_perc``."""
        return self.kv_blocks_used / self.kv_blocks if self.kv_blocks else 0.0


class Runner(Protocol):
    """What the engine needs from a runner: steps, and the size of its KV block pool."""

    num_blocks: int
    block_size: int

    def step(self, plan: StepPlan) -> Any: ...


@dataclass(slots=True)
class EngineConfig:
    """Engine knobs. ``num_blocks`` (at most the runner's) defaults to the runner's pool; ``cache_salt`` (model name,
    version, quantization) keys the prefix cache so different weights never share KV blocks."""

    num_slots: int = 64
    max_len: int = 2048
    prefill_budget: int = 512
    max_batch_size: int | None = None
    max_batch_wait_s: float = 0.0
    aging_s: float = 2.0
    num_blocks: int | None = None
    prefix_cache: bool = True
    cache_salt: str = ""


class StepObserver(Protocol):
    """Optional hook for metrics: called on the engine thread after every step."""

    def on_step(self, engine: Engine, plan: StepPlan, seconds: float, events: list[TokenEvent]) -> None: ...


class Engine:
    """Continuous batching over one model. Create, :meth:`start` on a loop, :meth:`stop` when done."""

    def __init__(
        self,
        runner: Runner,
        tokenizer: Any,
        config: EngineConfig,
        *,
        eos_ids: Iterable[int] = (),
        name: str = "model",
        observer: StepObserver | None = None,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.config = config
        self.name = name
        self.eos_ids = frozenset(eos_ids)
        self.observer = observer
        self.kv = KVCacheManager(
            min(config.num_blocks or runner.num_blocks, runner.num_blocks),
            runner.block_size,
            salt=config.cache_salt or name,
            prefix_cache=config.prefix_cache,
        )
        self.scheduler = Scheduler(
            config.num_slots,
            max_batch_size=config.max_batch_size,
            prefill_budget=config.prefill_budget,
            max_batch_wait_s=config.max_batch_wait_s,
            aging_s=config.aging_s,
            kv=self.kv,
        )
        self._commands: collections.deque[Command] = collections.deque()
        self._wake = threading.Event()
        self._ids = itertools.count(1)
        # Generations by rid, from submit until their last event is handed to the loop (or a cancel).
        self._requests: dict[int, _Request] = {}
        self._pieces: dict[int, str] = {}  # one-token decodes shared by the streams (at most the vocabulary)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stats = EngineStats(num_slots=config.num_slots, kv_blocks=self.kv.pool.capacity,
                                  kv_blocks_free=self.kv.pool.num_free, kv_block_size=self.kv.block_size)
        self._steps = 0
        self._tokens = 0
        self._step_errors = 0
        self._idle = threading.Event()
        self._idle.set()
        self.fault_injector: Callable[[StepPlan], None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._thread is not None:
            raise RuntimeError("engine already started")
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name=f"rtws-engine-{self.name}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread after the current step. Pending generations get no further events."""
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ front door (any thread)

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        sink: Sink,
        *,
        priority: str = "normal",
        deadline: float | None = None,
    ) -> int:
        """Queue a generation; return its request id. ``sink`` receives its events on the loop."""
        rid = next(self._ids)
        seq = Sequence(
            rid=rid,
            prompt_ids=list(prompt_ids),
            params=params,
            priority=PRIORITY_LEVELS[priority],
            arrival=time.monotonic(),
            deadline=deadline,
        )
        self._commands.append(Submit(seq, sink))
        self._wake.set()
        return rid

    @property
    def kv_capacity_tokens(self) -> int:
        """Token positions the KV pool holds in all (a prompt longer than this minus one can never run)."""
        return self.kv.capacity_tokens

    def cancel(self, rid: int) -> None:
        """Free the generation's blocks at the next step boundary. Idempotent; no event follows."""
        self._commands.append(Cancel(rid))
        self._wake.set()

    def pause(self, rids: Iterable[int]) -> None:
        """Leave these generations out of steps until :meth:`resume`. They keep their KV blocks unless the
        pool runs short, when they are the first preempted (recomputed on resume, nothing lost)."""
        self._commands.append(SetPaused(tuple(rids), True))
        self._wake.set()

    def resume(self, rids: Iterable[int]) -> None:
        self._commands.append(SetPaused(tuple(rids), False))
        self._wake.set()

    def stats(self) -> EngineStats:
        """A snapshot taken at the last step boundary."""
        return self._stats

    def wait_idle(self, timeout: float) -> bool:
        """Block (a test or shutdown helper, not for the event loop) until nothing is queued or running."""
        return self._idle.wait(timeout)

    # ------------------------------------------------------------------ engine thread

    def _apply_commands(self) -> None:
        sched = self.scheduler
        while self._commands:
            cmd = self._commands.popleft()
            if isinstance(cmd, Submit):
                stream = TextStream(self.tokenizer, cmd.seq.params.stop, self._pieces)
                self._requests[cmd.seq.rid] = _Request(cmd.sink, stream)
                sched.add(cmd.seq)
            elif isinstance(cmd, Cancel):
                seq = sched.get(cmd.rid)
                if seq is not None:
                    sched.finish(seq)
                    self._requests.pop(seq.rid, None)
            else:
                for rid in cmd.rids:
                    sched.set_paused(rid, cmd.paused)

    def _snapshot(self) -> None:
        s = self.scheduler
        pool = self.kv.pool
        self._stats = EngineStats(
            running=s.num_running,
            waiting=s.num_waiting,
            paused=s.num_paused,
            slots_in_use=s.num_slots - s.num_free_slots,
            num_slots=s.num_slots,
            steps=self._steps,
            tokens_generated=self._tokens,
            step_errors=self._step_errors,
            kv_blocks=pool.capacity,
            kv_blocks_used=pool.num_used,
            kv_blocks_free=pool.num_free,
            kv_blocks_cached=pool.num_cached,
            kv_block_size=self.kv.block_size,
            preemptions=s.num_preemptions,
            prefix_cache_queries=pool.stats.queries,
            prefix_cache_hits=pool.stats.hits,
            prefill_tokens=s.prefill_tokens,
            elastic_steps=getattr(getattr(self.runner, "elastic", None), "steps_at_top", 0),
        )
        if s.num_running or s.num_waiting:
            self._idle.clear()
        else:
            self._idle.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._intake()
                if self._commands:
                    self._apply_commands()
                    self._snapshot()  # cancels and frees are visible at this boundary, not after the next step
                now = time.monotonic()
                events: list[TokenEvent] = []
                self._expire(now, events)
                plan = self.scheduler.schedule(now)
                if plan.empty:
                    self._snapshot()
                    self._deliver(events)
                    self._wait(now)
                    continue
                t0 = time.perf_counter()
                self._step(plan, events)
                self._steps += 1
                self._snapshot()
                self._deliver(events)
                if self.observer is not None:
                    self.observer.on_step(self, plan, time.perf_counter() - t0, events)
                self._flush()
        except BaseException:  # pragma: no cover - a bug in the loop itself
            log.exception("engine loop crashed", extra={"event": "engine_crash", "model": self.name})
            raise

    def _intake(self) -> None:
        """Top of every loop turn: commands that arrive other than through the front door (a subclass's pipe)."""

    def _flush(self) -> None:
        """End of every step: a subclass that buffers what ``_deliver`` and the observer produced sends it."""

    def _wait_timeout(self, now: float) -> float | None:
        """How long an idle engine may sleep: until a batching wait ends, or a deadline poll (None: forever)."""
        timeout: float | None = None
        deadline = self.scheduler.admission_deadline()
        if deadline is not None:
            timeout = max(0.0, deadline - now)
        if any(s.deadline is not None for s in self.scheduler.all_sequences()):
            timeout = 0.05 if timeout is None else min(timeout, 0.05)
        return timeout

    def _wait(self, now: float) -> None:
        self._wake.wait(self._wait_timeout(now))
        self._wake.clear()

    def _expire(self, now: float, events: list[TokenEvent]) -> None:
        for seq in self.scheduler.all_sequences():
            if seq.deadline is not None and now >= seq.deadline:
                self._finish(seq, "timeout", events, now)

    def _step(self, plan: StepPlan, events: list[TokenEvent]) -> None:
        now = time.monotonic()
        for seq in plan.exhausted:  # the KV pool cannot hold one more token even for it alone
            if seq.in_prefill and not seq.output_ids:
                self._finish(seq, "error", events, now, error="prompt does not fit the KV cache")
            else:
                self._finish(seq, "length", events, now)
        if plan.empty:
            return
        tokens = self._compute(plan, events)
        now = time.monotonic()
        for seq, token in tokens:
            self._on_token(seq, token, events, now)

    def _attempt(self, plan: StepPlan) -> list[tuple[Sequence, int]]:
        if self.fault_injector is not None:
            self.fault_injector(plan)
        out = self.runner.step(plan)
        self.scheduler.commit(plan)
        return list(out.tokens)

    def _compute(self, plan: StepPlan, events: list[TokenEvent]) -> list[tuple[Sequence, int]]:
        """Run ``plan``; if the step raises, retry its halves (bisecting) so only the rows at fault fail.

        Retrying is safe: a failed step committed nothing, and a retried row
        writes the same KV positions again.
        """
        try:
            return self._attempt(plan)
        except Exception as exc:
            self._step_errors += 1
            rows = plan.rows()
            if len(rows) > 1:
                log.warning("model step failed; retrying its %d rows in halves", len(rows),
                            extra={"event": "step_retry", "model": self.name, "error": repr(exc)})
                half = len(rows) // 2
                out: list[tuple[Sequence, int]] = []
                for part in (rows[:half], rows[half:]):
                    out += self._compute(plan.subset({s.rid for s in part}), events)
                return out
            log.exception(
                "model step failed; failing generation %s", rows[0].rid if rows else None,
                extra={"event": "step_error", "model": self.name, "error": repr(exc)},
            )
            now = time.monotonic()
            for seq in rows:
                self._finish(seq, "error", events, now, error=type(exc).__name__)
            return []

    def _on_token(self, seq: Sequence, token: int, events: list[TokenEvent], now: float) -> None:
        req = self._requests.get(seq.rid)
        if req is None or req.finished:
            return
        if seq.first_token_at is None:
            seq.first_token_at = now
        p = seq.params
        if token in self.eos_ids and not p.ignore_eos:
            self._finish(seq, "stop", events, now)
            return
        seq.output_ids.append(token)
        self._tokens += 1
        req.unsent += 1
        text, stopped = req.stream.push(token)
        if stopped:
            self._finish(seq, "stop", events, now, text=text, flush=False)
        elif len(seq.output_ids) >= p.max_tokens or seq.num_tokens >= self.config.max_len:
            self._finish(seq, "length", events, now, text=text)
        elif text:
            events.append(self._event(seq, req, text))

    def _event(self, seq: Sequence, req: _Request, text: str) -> TokenEvent:
        n = req.unsent
        req.unsent = 0
        ids = seq.output_ids[len(seq.output_ids) - n:] if n else []
        return TokenEvent(rid=seq.rid, text=text, tokens=n, prompt_tokens=len(seq.prompt_ids),
                          completion_tokens=len(seq.output_ids), token_ids=ids)

    def _finish(
        self, seq: Sequence, reason: str, events: list[TokenEvent], now: float, text: str = "",
        error: str | None = None, flush: bool = True,
    ) -> None:
        req = self._requests.get(seq.rid)
        if req is None or req.finished:
            return
        if flush:
            text += req.stream.flush()
        ev = self._event(seq, req, text)
        ev.finish = reason
        ev.error = error
        ev.cached_tokens = seq.cached_tokens or 0
        if seq.first_token_at is not None:
            ev.ttft_s = seq.first_token_at - seq.arrival
        if seq.admitted_at is not None:
            ev.queue_s = seq.admitted_at - seq.arrival
        events.append(ev)
        req.finished = True
        self.scheduler.finish(seq)

    def _deliver(self, events: list[TokenEvent]) -> None:
        if not events:
            return
        reqs = self._requests
        batch = [(r.sink if (r := reqs.get(ev.rid)) is not None else None, ev) for ev in events]
        for ev in events:
            if ev.finish is not None:
                reqs.pop(ev.rid, None)
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(_dispatch, batch)
        except RuntimeError:  # loop closed between the check and the call
            pass


def _dispatch(batch: list[tuple[Sink | None, TokenEvent]]) -> None:
    for sink, ev in batch:
        if sink is None:
            continue
        try:
            sink(ev)
        except Exception:
            log.exception("event sink failed", extra={"event": "sink_error"})
