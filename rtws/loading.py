"""Loading a model with checks, one-line errors and progress: :func:`checked_load`.

``checked_load(spec)`` runs :func:`rtws.load_errors.preflight`, then
:func:`rtws.model.load`, and turns any failure into a
:class:`~rtws.load_errors.ModelLoadError` (its cause chained). While it runs,
a :class:`LoadProgress` (stage and percentage) is kept in the ``progress``
mapping the caller passes (``App.loading``, shown by ``/readyz``) and
``model_loading`` events are logged: at each stage, and every 25 % of the
weights. On a terminal (the ``rtws`` log handler is a text handler on a TTY)
transformers' own "Loading weights" bar is shown; elsewhere no bar.
Blocking: call it from a worker thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator, MutableMapping, Sized
from dataclasses import dataclass, field
from typing import Any

from .engine import StepObserver
from .load_errors import ModelLoadError, classify, preflight
from .logs import terminal_stream
from .model import ModelSpec, ServedModel

log = logging.getLogger("rtws.loading")

WEIGHTS_FROM, WEIGHTS_TO = 5.0, 90.0  # the percentage span of the weight loading stage


@dataclass(slots=True)
class LoadProgress:
    """One model version's load: ``stage`` (checking, weights, warm-up) and ``percent`` (0-100)."""

    model: str
    version: str
    stage: str = "checking"
    percent: float = 0.0
    started: float = field(default_factory=time.monotonic)
    board: MutableMapping[str, dict[str, Any]] | None = None  # where as_dict() is published under the model name
    _logged: float = -1.0

    def as_dict(self) -> dict[str, Any]:
        return {"version": self.version, "stage": self.stage, "percent": round(self.percent, 1),
                "seconds": round(time.monotonic() - self.started, 1)}

    def set(self, stage: str, percent: float, *, quiet: bool = False) -> None:
        """Record a new stage/percentage; log a ``model_loading`` event at stage changes and every 25 %."""
        changed = stage != self.stage
        self.stage, self.percent = stage, max(self.percent, min(100.0, percent))
        if self.board is not None:
            self.board[self.model] = self.as_dict()
        if changed or (not quiet and self.percent - self._logged >= 25.0) or self._logged < 0:
            self._logged = self.percent
            log.info("loading model", extra={"event": "model_loading", "model": self.model, "version": self.version,
                                            "stage": stage, "percent": round(self.percent, 1)})


class _Tracked:
    """Wraps transformers' weight-loading tqdm: counts items into a :class:`LoadProgress`, delegates the rest."""

    def __init__(self, bar: Any, total: int, progress: LoadProgress, quiet: bool) -> None:
        self._bar, self._total, self._progress, self._quiet = bar, max(1, total), progress, quiet

    def __iter__(self) -> Iterator[Any]:
        span = WEIGHTS_TO - WEIGHTS_FROM
        for i, item in enumerate(self._bar, 1):
            yield item
            self._progress.set("weights", WEIGHTS_FROM + span * i / self._total, quiet=self._quiet)
        self._progress.set("warm-up", WEIGHTS_TO)

    def __enter__(self) -> _Tracked:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        close = getattr(self._bar, "close", None)
        if close is not None:
            close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._bar, name)


class _Hook:
    """A transformers tqdm hook (``set_tqdm_hook``) that tracks the "Loading weights" loop of one thread."""

    def __init__(self, progress: LoadProgress, stream: Any, previous: Any) -> None:
        self.progress, self.stream, self.previous = progress, stream, previous
        self.thread = threading.get_ident()

    def __call__(self, factory: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if threading.get_ident() != self.thread or kwargs.get("desc") != "Loading weights":
            return self.previous(factory, args, kwargs) if self.previous is not None else factory(*args, **kwargs)
        iterable = args[0] if args else kwargs.get("iterable")
        total = kwargs.get("total") or (len(iterable) if isinstance(iterable, Sized) else 0)
        if self.stream is not None:
            from tqdm.auto import tqdm

            bar: Any = tqdm(*args, **{**kwargs, "file": self.stream, "leave": False})
        else:  # silent, but with every method a tqdm has (transformers' shim when bars are off)
            bar = factory(*args, **{**kwargs, "disable": True})
        self.progress.set("weights", WEIGHTS_FROM)
        return _Tracked(bar, int(total), self.progress, quiet=self.stream is not None)


def checked_load(spec: ModelSpec, observer: StepObserver | None = None,
                 progress: MutableMapping[str, dict[str, Any]] | None = None) -> ServedModel:
    """Preflight and load ``spec`` (a ModelSpec) into a ServedModel; raise :class:`ModelLoadError` on failure.

    ``progress[spec.name]`` holds the load's :meth:`LoadProgress.as_dict` while it runs.
    """
    from transformers.utils import logging as hf_logging

    from .model import load

    board: MutableMapping[str, dict[str, Any]] = progress if progress is not None else {}
    state = LoadProgress(spec.name, spec.version, board=board)
    hook = _Hook(state, terminal_stream(), None)
    state.set("checking", 0.0)
    try:
        preflight(spec)
        set_hook = getattr(hf_logging, "set_tqdm_hook", None)  # transformers >= 5.x; without it, no weight %
        if set_hook is not None:
            hook.previous = set_hook(hook)
        try:
            served = load(spec, observer)
        finally:
            if set_hook is not None:
                set_hook(hook.previous)
        state.set("ready", 100.0)
        return served
    except ModelLoadError:
        raise
    except Exception as exc:
        raise classify(exc, spec) from exc
    finally:
        board.pop(spec.name, None)
