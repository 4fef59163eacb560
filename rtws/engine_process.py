"""The engine in a process of its own (``--engine-process auto|on|off``).

In one process the engine thread and the event loop share one GIL: every frame
the loop encodes and every socket write it makes is time the engine's Python
(scheduling, sampling set-up, detokenizing) waits for, and an engine step that
is ready to go waits for the loop to drop the GIL. On a CPU box that costs
throughput (end to end against engine-only) and tail latency under load
(docs/engine.md, "Engine process").

Here the model, its runner, the scheduler and the detokenizers run in a child
started as ``python -m rtws.engine_child``; the server process keeps sockets, sessions and the
tokenizer for prompts. :class:`RemoteEngine` has :class:`~rtws.engine.Engine`'s
front door (``submit``, ``cancel``, ``pause``, ``resume``, ``stats``,
``wait_idle``, ``start``, ``stop``), so nothing above the engine changes.

Two pipes carry length-prefixed pickles:

* server to child: ``submit`` (rid, prompt ids, params, priority, deadline,
  arrival), ``cancel``, ``pause``, ``prefault``. The server writes without ever
  blocking its loop: what the pipe does not take waits in a buffer and goes
  out when the pipe is writable.
* child to server: ``ready`` (or the load's ``error``) once, then per engine
  step one ``out`` message with the step's token events, the stats snapshot
  when it changed, and what the step observer needs (step time, rows). The
  loop reads it with ``add_reader``: no thread in the server process.

The child reads commands at step boundaries (one non-blocking read) and sleeps
in ``select`` when idle. It ignores SIGINT and SIGTERM (the server drains and
then stops it) and stops when its command pipe closes, so a server that dies
takes its engine with it. If the child dies, every live generation ends with
``done {error}`` and the engine reports not running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from .engine import Cancel, Engine, EngineStats, SetPaused, Sink, StepObserver, Submit, _dispatch
from .generation import SamplingParams, TokenEvent
from .scheduler import PRIORITY_LEVELS, PrefillChunk, Sequence, StepPlan

log = logging.getLogger("rtws.engine")

ENGINE_PROCESS_MIN_BYTES = 4_000_000  # auto: weights below this (test-sized models, ~1M fp32 parameters) stay in-process
READY_TIMEOUT_S = 1800.0  # load + warm-up + compile in the child, at most
_HDR = struct.Struct("<Q")
_READ_CHUNK = 1 << 20
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# --------------------------------------------------------------------------- the choice (pure)


def engine_process_choice(mode: str, device_type: str, cores: int, weights: int | None) -> tuple[bool, str]:
    """Whether a model's engine runs in its own process, and why (for the startup log). A pure function.

    ``on`` always; ``off`` never; ``auto`` on a CPU with at least 2 usable cores (the engine gets its own
    core's worth of GIL-free Python) for models with at least :data:`ENGINE_PROCESS_MIN_BYTES` of weights
    (``weights`` None: not a local folder, a hub id or a benchmark aid, counts as large). On CUDA ``auto``
    stays in-process: not measured there yet.
    """
    if mode == "off":
        return False, "engine_process=off"
    if mode == "on":
        return True, "engine_process=on"
    if device_type != "cpu":
        return False, f"engine_process=auto: in-process on {device_type} (measured on CPU only)"
    if cores < 2:
        return False, "engine_process=auto: 1 core, the engine and the event loop share it either way"
    if weights is not None and weights < ENGINE_PROCESS_MIN_BYTES:
        return False, f"engine_process=auto: {weights} bytes of weights < {ENGINE_PROCESS_MIN_BYTES} (a test-sized model)"
    return True, f"engine_process=auto: {cores} cores on cpu, the engine runs in its own process"


def weight_bytes(path: str) -> int | None:
    """Bytes of weight files in the model folder ``path``; None when ``path`` is not a local folder."""
    p = Path(path)
    if not p.is_dir():
        return None
    total = 0
    for f in p.rglob("*"):
        if f.suffix in _WEIGHT_SUFFIXES and f.is_file():
            total += f.stat().st_size
    return total


# --------------------------------------------------------------------------- framing


def _frame(msg: Any) -> bytes:
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _HDR.pack(len(payload)) + payload


class _FrameReader:
    """Length-prefixed pickles from ``fd``: :meth:`read` returns the complete ones (None at end of file)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.buf = bytearray()

    def read(self) -> list[Any] | None:
        try:
            chunk = os.read(self.fd, _READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return []
        if not chunk:
            return None
        self.buf += chunk
        out: list[Any] = []
        buf, pos, n_hdr = self.buf, 0, _HDR.size
        while len(buf) - pos >= n_hdr:
            (n,) = _HDR.unpack_from(buf, pos)
            if len(buf) - pos - n_hdr < n:
                break
            out.append(pickle.loads(buf[pos + n_hdr:pos + n_hdr + n]))
            pos += n_hdr + n
        if pos:
            del buf[:pos]
        return out


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _event_tuple(ev: TokenEvent) -> tuple[Any, ...]:
    """A TokenEvent as a tuple in its field order (``TokenEvent(*t)`` rebuilds it): cheaper to pickle."""
    return (ev.rid, ev.text, ev.tokens, ev.finish, ev.prompt_tokens, ev.completion_tokens, ev.ttft_s, ev.queue_s,
            ev.error, ev.token_ids, ev.cached_tokens)


# --------------------------------------------------------------------------- child


def _no_sink(ev: TokenEvent) -> None:  # the child's requests: events go to the pipe, not to a sink
    pass


class PipedEngine(Engine):
    """The child's engine: :class:`Engine`'s loop on the child's main thread, fed and drained by the pipes."""

    def attach(self, rfd: int, wfd: int, steps: bool) -> None:
        os.set_blocking(rfd, False)
        self._rfd, self._wfd = rfd, wfd
        self._in = _FrameReader(rfd)
        self._out_events: list[TokenEvent] = []
        self._out_steps: list[tuple[Any, ...]] = []
        self._sent_stats: EngineStats | None = None
        if steps:
            self.observer = self

    def send(self, msg: Any) -> None:
        try:
            _write_all(self._wfd, _frame(msg))
        except (BrokenPipeError, OSError):  # the server is gone
            self._stopping = True

    def on_step(self, engine: Engine, plan: StepPlan, seconds: float, events: list[TokenEvent]) -> None:
        self._out_steps.append((seconds, tuple(s.rid for s in plan.decode),
                                tuple((c.seq.rid, c.start, c.end, c.seq.prefill_len) for c in plan.prefill)))

    def _intake(self) -> None:
        msgs = self._in.read()
        if msgs is None:  # the server closed its end: stop after this turn
            self._stopping = True
            return
        for m in msgs:
            self._command(m)

    def _command(self, m: tuple[Any, ...]) -> None:
        kind = m[0]
        if kind == "submit":
            _, rid, ids, params, priority, deadline, arrival = m
            seq = Sequence(rid=rid, prompt_ids=ids, params=params, priority=PRIORITY_LEVELS[priority],
                           arrival=arrival, deadline=deadline)
            self._commands.append(Submit(seq, _no_sink))
        elif kind == "cancel":
            self._commands.append(Cancel(m[1]))
        elif kind == "pause":
            self._commands.append(SetPaused(m[1], m[2]))
        elif kind == "prefault":
            prefault = getattr(self.runner, "prefault_kv", None)
            self.send(("prefaulted", prefault() if prefault is not None else 0))

    def _deliver(self, events: list[TokenEvent]) -> None:
        if events:
            for ev in events:
                if ev.finish is not None:
                    self._requests.pop(ev.rid, None)
            self._out_events += events

    def _flush(self) -> None:
        stats = self._stats
        fresh = stats != self._sent_stats
        if not (self._out_events or self._out_steps or fresh):
            return
        events = [_event_tuple(ev) for ev in self._out_events]
        self.send(("out", events, stats if fresh else None, self._out_steps))
        self._sent_stats = stats
        self._out_events = []
        self._out_steps = []

    def _wait(self, now: float) -> None:
        self._flush()
        if self._commands or self._stopping:
            return
        try:
            select.select([self._rfd], [], [], self._wait_timeout(now))
        except InterruptedError:  # pragma: no cover - a signal; the loop turns again
            pass


# --------------------------------------------------------------------------- server side


def _exited(rid: int) -> TokenEvent:
    """The last event of a generation whose engine process is gone."""
    return TokenEvent(rid=rid, text="", tokens=0, finish="error", error="engine process exited")


class _Row:
    """What the step observer reads of a sequence in a child's step: its rid and prompt length."""

    __slots__ = ("rid", "prefill_len")

    def __init__(self, rid: int, prefill_len: int = 0) -> None:
        self.rid, self.prefill_len = rid, prefill_len


def _plan_view(decode: tuple[int, ...], prefill: tuple[tuple[int, int, int, int], ...]) -> StepPlan:
    rows: Any = [_Row(r) for r in decode]
    chunks: Any = [PrefillChunk(_Row(r, n), a, b) for r, a, b, n in prefill]  # type: ignore[arg-type]
    return StepPlan(prefill=chunks, decode=rows)


class RemoteEngine:
    """:class:`~rtws.engine.Engine`'s front door over a child process that runs the model and the engine loop.

    Create (spawns the child, which starts loading), :meth:`wait_ready` (blocking, a worker thread),
    :meth:`start` on the loop, :meth:`stop` when done. ``submit``/``cancel``/``pause``/``resume`` are called on
    the loop (from another thread they are handed to it); events reach their sinks on the loop.
    """

    def __init__(self, spec: Any, observer: StepObserver | None = None) -> None:  # spec: rtws.model.ModelSpec
        from .logs import TextFormatter
        from .threads import current_threads

        self.name = spec.name
        self.observer = observer
        self._ids = itertools.count(1)
        self._sinks: dict[int, Sink] = {}
        self._stats = EngineStats()
        self._idle = threading.Event()
        self._idle.set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._out = bytearray()  # commands the pipe has not taken yet
        self._gone = False
        self._closed = False
        self._prefaulted: tuple[threading.Event, list[int]] | None = None
        self.info: dict[str, Any] = {}
        self.runner: Any = SimpleNamespace(prefault_kv=self.prefault_kv)
        self.kv_capacity_tokens = 0
        # A fresh interpreter (``python -m rtws.engine_child``), not multiprocessing's spawn: that re-imports
        # the caller's __main__, which a script without a main guard, a notebook or a Ray worker may not allow.
        p2c_r, p2c_w = os.pipe()
        c2p_r, c2p_w = os.pipe()
        lg = logging.getLogger("rtws")
        fmt = "text" if any(isinstance(h.formatter, TextFormatter) for h in lg.handlers) else "json"
        level = logging.getLevelName(lg.getEffectiveLevel())
        try:
            self._proc = subprocess.Popen([sys.executable, "-m", "rtws.engine_child", str(p2c_r), str(c2p_w)],
                                          pass_fds=(p2c_r, c2p_w), stdin=subprocess.DEVNULL)
        finally:
            os.close(p2c_r)
            os.close(c2p_w)
        self._wfd, self._rfd = p2c_w, c2p_r
        self._reader = _FrameReader(self._rfd)
        _write_all(self._wfd, _frame(("init", spec, current_threads(), level, fmt, observer is not None)))

    @property
    def pid(self) -> int:
        return self._proc.pid

    # ------------------------------------------------------------------ lifecycle

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> dict[str, Any]:
        """Block until the child has loaded and warmed the model; raise its load error if it failed."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"engine process for {self.name!r} not ready after {timeout:.0f} s")
            ready, _, _ = select.select([self._rfd], [], [], min(left, 1.0))
            if not ready:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"engine process for {self.name!r} exited with code {self._proc.returncode} "
                                       "while loading")
                continue
            msgs = self._reader.read()
            if msgs is None:
                raise RuntimeError(f"engine process for {self.name!r} exited with code {self._wait_exit(5.0)} "
                                   "while loading")
            for m in msgs:
                if m[0] == "error":
                    raise m[1]
                if m[0] == "ready":
                    info: dict[str, Any] = m[1]
                    self.info = info
                    self._stats = info["stats"]
                    self.kv_capacity_tokens = int(info["kv_capacity_tokens"])
                    self.runner = SimpleNamespace(prefault_kv=self.prefault_kv, **info["runner"])
                    return info

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Begin delivering events on ``loop`` (call it on that loop's thread)."""
        if self._loop is not None:
            raise RuntimeError("engine already started")
        self._loop = loop
        self._loop_thread = threading.get_ident()
        os.set_blocking(self._rfd, False)
        os.set_blocking(self._wfd, False)
        loop.add_reader(self._rfd, self._on_readable)
        if self._out:
            loop.add_writer(self._wfd, self._drain_out)

    def stop(self, timeout: float = 10.0) -> None:
        """Close the command pipe (the child stops after its current step) and reap the child. Any thread."""
        loop = self._loop
        if loop is not None and not loop.is_closed() and threading.get_ident() != self._loop_thread:
            done = threading.Event()

            def close_on_loop() -> None:
                self._close_pipes()
                done.set()

            try:
                loop.call_soon_threadsafe(close_on_loop)
            except RuntimeError:  # closed meanwhile
                self._close_pipes()
            else:
                if not done.wait(min(timeout, 5.0)):  # the loop is not running: close from here
                    self._close_pipes()
        else:
            self._close_pipes()
        if self._wait_exit(timeout) is None:
            log.warning("engine process did not stop; killing it",
                        extra={"event": "engine_process_kill", "model": self.name, "pid": self._proc.pid})
            self._proc.kill()
            self._wait_exit(5.0)
        self._sinks.clear()

    def _wait_exit(self, timeout: float) -> int | None:
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def _close_pipes(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.remove_reader(self._rfd)
            loop.remove_writer(self._wfd)
        for fd in (self._rfd, self._wfd):
            try:
                os.close(fd)
            except OSError:
                pass

    @property
    def running(self) -> bool:
        return not self._gone and not self._closed and self._proc.poll() is None

    # ------------------------------------------------------------------ front door

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Sink, *, priority: str = "normal",
               deadline: float | None = None) -> int:
        """Queue a generation; return its request id. ``sink`` receives its events on the loop."""
        PRIORITY_LEVELS[priority]  # an unknown priority raises here, as Engine.submit does
        rid = next(self._ids)
        if self._gone or self._closed:  # no child to run it: its one event is the error, and the engine stays idle
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(sink, _exited(rid))
            return rid
        self._sinks[rid] = sink
        self._idle.clear()
        self._send(("submit", rid, list(prompt_ids), params, priority, deadline, time.monotonic()))
        return rid

    def cancel(self, rid: int) -> None:
        """Drop generation ``rid``: no further event reaches its sink; the child frees its blocks."""
        if self._sinks.pop(rid, None) is not None:
            self._send(("cancel", rid))

    def pause(self, rids: Iterable[int]) -> None:
        self._send(("pause", tuple(rids), True))

    def resume(self, rids: Iterable[int]) -> None:
        self._send(("pause", tuple(rids), False))

    def stats(self) -> EngineStats:
        """The child's snapshot from its last step boundary (as received)."""
        return self._stats

    def wait_idle(self, timeout: float) -> bool:
        return self._idle.wait(timeout)

    def prefault_kv(self) -> int:
        """Have the child make its KV pool resident (``ModelRunner.prefault_kv``); blocking, not on the loop."""
        done: tuple[threading.Event, list[int]] = (threading.Event(), [])
        self._prefaulted = done
        self._send(("prefault",))
        if not done[0].wait(600.0):
            raise TimeoutError("engine process did not prefault its KV pool")
        return done[1][0]

    # ------------------------------------------------------------------ pipes (on the loop)

    def _send(self, msg: Any) -> None:
        loop = self._loop
        if loop is not None and threading.get_ident() != self._loop_thread:
            if not loop.is_closed():
                loop.call_soon_threadsafe(self._send, msg)
            return
        if self._closed or self._gone:
            return
        data = _frame(msg)
        if loop is None:  # before start: the child reads at its own pace, this thread may block
            _write_all(self._wfd, data)
            return
        if self._out:
            self._out += data
            return
        try:
            n = os.write(self._wfd, data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self._child_gone()
            return
        if n < len(data):
            self._out += data[n:]
            loop.add_writer(self._wfd, self._drain_out)

    def _drain_out(self) -> None:
        try:
            n = os.write(self._wfd, self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._child_gone()
            return
        del self._out[:n]
        if not self._out and self._loop is not None:
            self._loop.remove_writer(self._wfd)

    def _on_readable(self) -> None:
        msgs = self._reader.read()
        if msgs is None:
            self._child_gone()
            return
        for m in msgs:
            kind = m[0]
            if kind == "out":
                self._on_out(m[1], m[2], m[3])
            elif kind == "prefaulted" and self._prefaulted is not None:
                self._prefaulted[1].append(int(m[1]))
                self._prefaulted[0].set()

    def _on_out(self, rows: list[tuple[Any, ...]], stats: EngineStats | None, steps: list[tuple[Any, ...]]) -> None:
        if stats is not None:
            self._stats = stats
        sinks = self._sinks
        events = [TokenEvent(*t) for t in rows]
        _dispatch([(sinks.pop(ev.rid, None) if ev.finish is not None else sinks.get(ev.rid), ev) for ev in events])
        if steps and self.observer is not None:
            for seconds, decode, prefill in steps:
                self.observer.on_step(self, _plan_view(decode, prefill), seconds, events)  # type: ignore[arg-type]
        if stats is not None and not (stats.running or stats.waiting) and not sinks:
            self._idle.set()

    def _child_gone(self) -> None:
        if self._gone:
            return
        self._gone = True
        code = self._wait_exit(1.0)
        log.error("engine process exited (code %s); failing its %d live generations", code, len(self._sinks),
                  extra={"event": "engine_process_exit", "model": self.name, "pid": self._proc.pid,
                         "exit_code": code})
        self._close_pipes()
        sinks, self._sinks = self._sinks, {}
        _dispatch([(sink, _exited(rid)) for rid, sink in sinks.items()])
        self._idle.set()
