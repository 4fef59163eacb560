"""Torch thread defaults for ``rtws serve``: leave the event loop a core.

:func:`choose_threads` is a pure function of (usable cores, device, settings).
On CPU the engine's forward runs on ``cores - 1`` intra-op threads (at least
one) so that the asyncio loop thread (frames, tokenization, sockets) keeps a
core; inter-op threads are 1, since the engine runs one forward at a time and
torch's default inter-op pool (one thread per core) only adds idle threads.
An explicit ``torch_threads`` / ``torch_interop_threads`` wins. On CUDA the
host threads matter little: torch's defaults stay unless set explicitly.
:func:`apply_threads` sets them (torch imported there, lazily).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

LOOP_CORE_FROM = 2  # from this many usable cores on, the event loop keeps one (measured: docs/operations.md)


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """Threads to set; None leaves torch's default. ``reason`` says why, for the startup log."""

    intra: int | None
    interop: int | None
    reason: str
    elastic_top: int | None = None  # an engine process may borrow up to this many while a core is spare


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(cores: int, device: str, torch_threads: int | None = None,
                   torch_interop_threads: int | None = None, elastic: bool = True) -> ThreadChoice:
    """The torch thread counts for serving on ``device`` (auto, cpu, cuda[:N]) with ``cores`` usable CPUs.

    ``device="auto"`` counts as CPU unless the caller resolved it: pass the resolved device where known.
    Where rtws leaves the loop a core itself (not configured), ``elastic`` lets an engine process borrow that
    core for large steps while nothing else uses it (:class:`ElasticThreads`): ``elastic_top`` = ``cores``.
    """
    cores = max(1, cores)
    if device.startswith("cuda"):
        return ThreadChoice(torch_threads, torch_interop_threads,
                            "CUDA device: torch's host thread defaults" if torch_threads is None else "configured")
    keep_one = cores >= LOOP_CORE_FROM
    intra = torch_threads if torch_threads is not None else (cores - 1 if keep_one else cores)
    interop = torch_interop_threads if torch_interop_threads is not None else 1
    if torch_threads is not None:
        reason = "configured"
    elif keep_one:
        reason = f"{cores} cores: {intra} for the forward, 1 for the event loop"
    else:
        reason = f"{cores} core: the forward and the event loop share it"
    top = cores if elastic and keep_one and torch_threads is None else None
    if top is not None:
        reason += f" (an engine process takes up to {top} for large steps while a core is idle)"
    return ThreadChoice(intra, interop, reason, top)


def apply_threads(choice: ThreadChoice) -> tuple[int, int]:
    """Set torch's intra-op and inter-op thread counts; return what torch now reports (intra, interop).

    The inter-op count can only be set before torch's first parallel work; later it is left as is.
    """
    import torch

    global _elastic_top
    _elastic_top = choice.elastic_top
    if choice.intra is not None:
        torch.set_num_threads(choice.intra)
    if choice.interop is not None and choice.interop != torch.get_num_interop_threads():
        try:
            torch.set_num_interop_threads(choice.interop)
        except RuntimeError:  # parallel work already started in this process
            pass
    return torch.get_num_threads(), torch.get_num_interop_threads()


_elastic_top: int | None = None  # the last applied choice's (torch's own thread counts are process-wide too)


def current_threads() -> tuple[int, int, int | None]:
    """What an engine process is given: torch's intra-op and inter-op thread counts in this process, and the
    elastic top of the choice :func:`apply_threads` applied here last (None: fixed threads)."""
    import torch

    intra = torch.get_num_threads()
    top = _elastic_top if _elastic_top is not None and _elastic_top > intra else None
    return intra, torch.get_num_interop_threads(), top


# --------------------------------------------------------------------------- elastic threads (engine process)

SPARE_UP = 0.35  # take the spare core when the rest of the machine used under this many cores
SPARE_DOWN = 0.6  # give it back above this many (hysteresis: the two differ so a busy moment does not flap it)


def read_proc_stat(path: str = "/proc/stat") -> float | None:
    """Seconds of busy CPU time, all cores together, since boot (``/proc/stat``'s first line); None off Linux."""
    try:
        with open(path, "rb") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if len(fields) < 8 or fields[0] != b"cpu":
        return None
    ticks = [int(x) for x in fields[1:]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    busy = sum(ticks[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / _clock_ticks()


def _clock_ticks() -> int:
    try:
        return int(os.sysconf("SC_CLK_TCK"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return 100


class SpareCore:
    """Is a core idle apart from this process? From the machine's busy time (``/proc/stat``) minus this
    process's own CPU time, over windows of ``window_s``; rising above :data:`SPARE_DOWN` cores of other
    work ends it, falling below :data:`SPARE_UP` starts it. Off Linux (no ``/proc/stat``) never spare.

    This process's own time is taken out, so the extra thread it runs never counts against itself.
    ``busy``/``own``/``clock`` are injectable for tests.
    """

    def __init__(self, cores: int, window_s: float = 0.2, *, busy: Any = read_proc_stat,
                 own: Any = time.process_time, clock: Any = time.monotonic) -> None:
        self.cores = cores
        self.window_s = window_s
        self._busy, self._own, self._clock = busy, own, clock
        self.others = float(cores)  # cores' worth of CPU the rest of the machine used in the last window
        self.spare = False
        self._mark = self._sample()

    def _sample(self) -> tuple[float, float, float] | None:
        b = self._busy()
        return None if b is None else (self._clock(), b, self._own())

    def poll(self) -> bool:
        """Update at most once a window; return whether a core is spare now."""
        if self._mark is None:
            return False
        now = self._clock()
        if now - self._mark[0] < self.window_s:
            return self.spare
        cur = self._sample()
        if cur is None:
            self._mark = None
            self.spare = False
            return False
        wall = cur[0] - self._mark[0]
        self.others = max(0.0, ((cur[1] - self._mark[1]) - (cur[2] - self._mark[2])) / wall)
        self._mark = cur
        limit = SPARE_DOWN if self.spare else SPARE_UP
        self.spare = self.others < limit and self.cores >= 2
        return self.spare


class ElasticThreads:
    """The engine process's intra-op threads, step by step: ``base`` (the startup choice, which leaves the
    event loop a core) normally; ``top`` for an eager step while :class:`SpareCore` says the rest of the
    machine leaves a core idle (a burst on one socket, say), so the server's core is borrowed only while its
    owner does not use it. Compiled steps stay at ``base``: inductor built their kernels for it, and they
    ran 0.5 to 0.8x as fast at 2 threads (the bundled model, 1 to 8 rows), while eager steps ran 1.1 to 1.5x
    as fast at 2 threads as at 1 from 1 row to 32."""

    def __init__(self, base: int, top: int, spare: SpareCore, set_threads: Any = None, min_rows: int = 1) -> None:
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.base, self.top = base, top
        self.min_rows = max(1, min_rows)  # smaller steps stay at base (measured slower at top: ModelRunner)
        self.spare = spare
        self._set = set_threads
        self.current = base
        self.steps_at_top = 0

    def for_step(self, rows: int, compiled: bool = False) -> int:
        """Set (if it changes) and return the thread count for a step of ``rows`` rows."""
        want = self.top if rows >= self.min_rows and not compiled and self.spare.poll() else self.base
        if want != self.current:
            self._set(want)
            self.current = want
        if want == self.top:
            self.steps_at_top += 1
        return want
