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
from dataclasses import dataclass

LOOP_CORE_FROM = 2  # from this many usable cores on, the event loop keeps one (measured: docs/operations.md)


@dataclass(frozen=True, slots=True)
class ThreadChoice:
    """Threads to set; None leaves torch's default. ``reason`` says why, for the startup log."""

    intra: int | None
    interop: int | None
    reason: str


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def choose_threads(cores: int, device: str, torch_threads: int | None = None,
                   torch_interop_threads: int | None = None) -> ThreadChoice:
    """The torch thread counts for serving on ``device`` (auto, cpu, cuda[:N]) with ``cores`` usable CPUs.

    ``device="auto"`` counts as CPU unless the caller resolved it: pass the resolved device where known.
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
    return ThreadChoice(intra, interop, reason)


def apply_threads(choice: ThreadChoice) -> tuple[int, int]:
    """Set torch's intra-op and inter-op thread counts; return what torch now reports (intra, interop).

    The inter-op count can only be set before torch's first parallel work; later it is left as is.
    """
    import torch

    if choice.intra is not None:
        torch.set_num_threads(choice.intra)
    if choice.interop is not None and choice.interop != torch.get_num_interop_threads():
        try:
            torch.set_num_interop_threads(choice.interop)
        except RuntimeError:  # parallel work already started in this process
            pass
    return torch.get_num_threads(), torch.get_num_interop_threads()


def current_threads() -> tuple[int, int]:
    """Torch's intra-op and inter-op thread counts in this process (what an engine process is given)."""
    import torch

    return torch.get_num_threads(), torch.get_num_interop_threads()
