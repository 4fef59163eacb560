"""Model registry: names clients ask for, the version serving each, and hot-swaps between versions.

Pure bookkeeping and asyncio, no torch: loading goes through a ``load``
coroutine the caller passes (``App.load_model``), so the registry never
imports the runner.

Routing is ``name -> served version``. A swap loads the new version in the
background while the old one keeps serving, then routes new requests to it
with one dictionary assignment on the event loop (a request goes wholly to the
old or the new version). The old version *drains*: generations already in its
engine finish there; when its engine is idle it is stopped and dropped. A load
or warm-up failure leaves the old version serving and keeps the reason in the
new version's status.

Version states: ``loading`` (weights loading and warm-up), ``warm`` (serving
new requests), ``failed`` (with ``reason``), ``draining`` (replaced or
removed, finishing in-flight generations), ``unloaded`` (engine stopped).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .errors import RtwsError
from .generation import SamplingParams, TokenEvent

if TYPE_CHECKING:
    from .engine import Engine
    from .model import ModelSpec

log = logging.getLogger("rtws.registry")

LOADING, WARM, FAILED, DRAINING, UNLOADED = "loading", "warm", "failed", "draining", "unloaded"
_HISTORY = 16  # finished (failed/unloaded) version records kept per model
_POLL_S = 0.02  # how often a draining engine's stats are read
_BARRIER_TIMEOUT_S = 30.0


class Served(Protocol):
    """One loaded model version, as the registry and the front ends use it (:class:`rtws.model.ServedModel`)."""

    @property
    def spec(self) -> ModelSpec: ...
    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def engine(self) -> Engine: ...
    @property
    def model(self) -> Any: ...  # the torch module (its dtype, its quantization)
    @property
    def device(self) -> str: ...
    @property
    def context_len(self) -> int: ...
    @property
    def max_prompt_tokens(self) -> int: ...
    @property
    def warm(self) -> bool: ...  # False while its warm-up generation runs
    @property
    def loaded_at(self) -> float: ...  # time.time() when it loaded

    def encode(self, prompt: str | None = ..., messages: list[dict[str, Any]] | None = ...) -> list[int]: ...

    def stop(self) -> None: ...


Loader = Callable[["ModelSpec"], Awaitable[Served]]  # a started, warm Served (App.load_model)


class RegistryError(RtwsError):
    """A registry operation refused. ``code`` is an error code for the admin API (``conflict``: 409)."""


class SwapError(RegistryError):
    """Loading or warming a new version failed; the previous version (if any) still serves."""

    def __init__(self, status: VersionStatus) -> None:
        super().__init__("load_failed", status.reason or "load failed")
        self.status = status


@dataclass(slots=True, eq=False)
class VersionStatus:
    """One version of one model, from the moment its load starts until it is unloaded."""

    name: str
    version: str
    path: str = ""
    device: str = ""
    dtype: str = ""
    state: str = LOADING
    reason: str | None = None
    created: float = field(default_factory=time.time)
    updated: float = field(default_factory=time.time)
    served: Served | None = field(default=None, repr=False)

    def set(self, state: str, reason: str | None = None) -> None:
        self.state = state
        self.reason = reason
        self.updated = time.time()

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "version": self.version, "status": self.state, "reason": self.reason, "path": self.path,
            "device": self.device, "dtype": self.dtype, "created": round(self.created, 3),
            "updated": round(self.updated, 3),
        }
        if self.served is not None:
            s = self.served.engine.stats()
            out.update(running=s.running, waiting=s.waiting, slots_in_use=s.slots_in_use, num_slots=s.num_slots)
        return out


@dataclass(slots=True, eq=False)
class _Entry:
    name: str
    versions: list[VersionStatus] = field(default_factory=list)
    loading: VersionStatus | None = None
    removed: bool = False  # retired by name: hidden from health once nothing of it drains

    def find(self, version: str) -> VersionStatus | None:
        for st in reversed(self.versions):
            if st.version == version:
                return st
        return None

    def trim(self) -> None:
        done = [st for st in self.versions if st.state in (FAILED, UNLOADED)]
        for st in done[:max(0, len(done) - _HISTORY)]:
            self.versions.remove(st)


def _status_for(served: Served) -> VersionStatus:
    spec = served.spec
    return VersionStatus(name=served.name, version=served.version, path=spec.path, device=served.device,
                         dtype=spec.dtype, state=WARM if served.warm else LOADING, served=served)


class ModelRegistry:
    """Routes a model name (or ``None`` for the default) to the version that serves new requests.

    Use from the event loop only. ``get``/``names``/``models``/``add``/``remove``
    are synchronous routing primitives; ``swap``/``start_swap``/``retire`` manage
    versions and their lifecycle; ``health`` reports it.
    """

    def __init__(self) -> None:
        self._current: dict[str, Served] = {}
        self._entries: dict[str, _Entry] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.default_name: str | None = None

    # ------------------------------------------------------------------ routing

    def add(self, served: Served, *, default: bool = False) -> None:
        """Route ``served.name`` to ``served`` (already started and warm).

        Replaces any current version without draining it: the caller owns (and stops) that one.
        """
        old = self._current.get(served.name)
        self._current[served.name] = served
        entry = self._entries.setdefault(served.name, _Entry(served.name))
        entry.removed = False
        if old is not None and old is not served:
            for st in entry.versions:
                if st.served is old:
                    st.served = None
                    st.set(UNLOADED, "replaced without draining")
        if not any(s.served is served for s in entry.versions):
            entry.versions.append(_status_for(served))
        if default or self.default_name is None:
            self.default_name = served.name

    def remove(self, name: str) -> Served | None:
        """Stop routing to ``name`` and forget its records. The caller owns (and stops) what it returns."""
        served = self._current.pop(name, None)
        self._entries.pop(name, None)
        if self.default_name == name:
            self.default_name = next(iter(self._current), None)
        return served

    def get(self, name: str | None) -> Served | None:
        if name is None:
            name = self.default_name
            if name is None:
                return None
        return self._current.get(name)

    def names(self) -> list[str]:
        return list(self._current)

    def models(self) -> list[Served]:
        return list(self._current.values())

    # ------------------------------------------------------------------ versions

    async def swap(self, spec: ModelSpec, load: Loader, *, default: bool = False) -> VersionStatus:
        """Load ``spec`` (a ``ModelSpec``) and route ``spec.name`` to it; return its status once it serves.

        A new name is added; an existing one is hot-swapped: its previous
        version drains in the background (see :meth:`settle`). Raises
        :class:`SwapError` when the load or warm-up fails (the previous version
        keeps serving; the status says why) and :class:`RegistryError`
        (``conflict``) when a load of that name is already running or the
        version already serves.
        """
        st = self._begin(spec)
        return await self._complete(st, spec, load, default)

    def start_swap(self, spec: ModelSpec, load: Loader, *, default: bool = False) -> VersionStatus:
        """:meth:`swap` in a background task. Returns the ``loading`` status at once; it updates in place.

        Raises :class:`RegistryError` synchronously for the same conflicts as :meth:`swap`.
        """
        st = self._begin(spec)
        self._spawn(self._complete(st, spec, load, default), swallow=SwapError)
        return st

    def retire(self, name: str) -> VersionStatus | None:
        """Stop routing ``name``; its version drains and unloads in the background. None if not serving."""
        served = self._current.pop(name, None)
        if self.default_name == name:
            self.default_name = next(iter(self._current), None)
        entry = self._entries.get(name)
        if entry is not None:
            entry.removed = True  # a load still running for it ends unloaded, never routed
        if served is None:
            return None if entry is None else entry.loading
        st = self._status_of(served)
        self._drain(served, st)
        log.info("model removed", extra={"event": "model_removed", "model": name, "version": st.version})
        return st

    def status(self, name: str, version: str) -> VersionStatus | None:
        entry = self._entries.get(name)
        return None if entry is None else entry.find(version)

    def known(self, name: str) -> bool:
        """Whether ``name`` is routed, loading, or has version records (and was not retired)."""
        entry = self._entries.get(name)
        return name in self._current or (entry is not None and not entry.removed)

    def served_versions(self) -> list[VersionStatus]:
        """Every version holding a started engine: serving and draining ones."""
        return [st for e in self._entries.values() for st in e.versions if st.served is not None]

    def health(self) -> list[dict[str, Any]]:
        """Per-model health, one dict per known model name (routed ones first, in routing order).

        ``{"name", "version", "status", "default", "running", "waiting",
        "slots_in_use", "num_slots", "versions": [...]}``: ``version``/``status``
        describe the version serving new requests (``version`` None and
        ``status`` ``loading`` or ``failed`` while no version of the name
        serves); the engine counts are that version's; ``versions`` lists every
        recorded version as ``{"version", "status", "reason", "path", "device",
        "dtype", "created", "updated"}`` plus its engine counts while it holds one.
        """
        out: list[dict[str, Any]] = []
        names = list(self._current) + [
            n for n, e in self._entries.items()
            if n not in self._current and (not e.removed or any(st.state == DRAINING for st in e.versions))]
        for name in names:
            entry = self._entries.get(name) or _Entry(name)
            served = self._current.get(name)
            item: dict[str, Any] = {"name": name, "default": name == self.default_name}
            if served is not None:
                st = self._status_of(served)
                s = served.engine.stats()
                item.update(version=st.version, status=WARM if served.warm else LOADING,
                            running=s.running, waiting=s.waiting, slots_in_use=s.slots_in_use,
                            num_slots=s.num_slots)
            else:
                last = entry.loading or (entry.versions[-1] if entry.versions else None)
                item.update(version=None, status=LOADING if entry.loading else (last.state if last else FAILED),
                            running=0, waiting=0, slots_in_use=0, num_slots=0)
                if last is not None and last.state == FAILED:
                    item["reason"] = last.reason
            item["versions"] = [st.as_dict() for st in entry.versions]
            out.append(item)
        return out

    async def settle(self, timeout: float | None = None) -> bool:
        """Wait for every background load and drain to end. True if they did within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._tasks:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            await asyncio.wait(set(self._tasks), timeout=left)
        return True

    async def aclose(self) -> None:
        """Shutdown: cancel background loads and drains, stop every draining engine. Idempotent."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        loop = asyncio.get_running_loop()
        current = {id(s) for s in self._current.values()}
        for st in self.served_versions():
            served = st.served
            if served is not None and id(served) not in current:  # the app stops the routed ones itself
                await loop.run_in_executor(None, served.stop)
                st.served = None
                st.set(UNLOADED, "server shutdown")

    # ------------------------------------------------------------------ internals

    def _status_of(self, served: Served) -> VersionStatus:
        entry = self._entries.setdefault(served.name, _Entry(served.name))
        for st in entry.versions:
            if st.served is served:
                return st
        st = _status_for(served)
        entry.versions.append(st)
        return st

    def _begin(self, spec: ModelSpec) -> VersionStatus:
        name, version = str(spec.name), str(spec.version)
        entry = self._entries.setdefault(name, _Entry(name))
        if entry.loading is not None:
            raise RegistryError("conflict", f"model {name!r} is already loading version {entry.loading.version!r}")
        cur = self._current.get(name)
        if cur is not None and str(cur.version) == version:
            raise RegistryError("conflict", f"model {name!r} already serves version {version!r}")
        st = VersionStatus(name=name, version=version, path=str(spec.path), device=str(spec.device),
                           dtype=str(spec.dtype))
        entry.versions.append(st)
        entry.loading = st
        entry.removed = False
        entry.trim()
        log.info("swap started", extra={"event": "swap_started", "model": name, "version": version,
                                        "path": st.path, "replaces": None if cur is None else str(cur.version)})
        return st

    async def _complete(self, st: VersionStatus, spec: ModelSpec, load: Loader, default: bool) -> VersionStatus:
        name = st.name
        entry = self._entries[name]
        t0 = time.perf_counter()
        try:
            served = await load(spec)
        except asyncio.CancelledError:
            st.set(FAILED, "cancelled (server shutdown)")
            raise
        except Exception as exc:
            st.set(FAILED, f"{type(exc).__name__}: {exc}"[:1000])
            log.warning("swap failed", extra={"event": "swap_failed", "model": name, "version": st.version,
                                              "reason": st.reason})
            raise SwapError(st) from exc
        finally:
            if entry.loading is st:
                entry.loading = None
        if entry.removed or self._entries.get(name) is not entry:
            # Removed while it loaded: never route it.
            await asyncio.get_running_loop().run_in_executor(None, served.stop)
            st.set(UNLOADED, "model removed while loading")
            return st
        old = self._current.get(name)
        self._current[name] = served  # the swap: new requests go to the new version from here on
        if default or self.default_name is None:
            self.default_name = name
        st.served = served
        st.device = served.device
        st.set(WARM)
        if old is not None:
            self._drain(old, self._status_of(old))
        log.info("swap finished", extra={"event": "swap_finished", "model": name, "version": st.version,
                                         "replaced": None if old is None else str(old.version),
                                         "seconds": round(time.perf_counter() - t0, 3)})
        return st

    def _drain(self, served: Served, st: VersionStatus) -> None:
        st.set(DRAINING)
        self._spawn(self._retire(served, st))

    async def _retire(self, served: Served, st: VersionStatus) -> None:
        """Wait until the engine holds no generation, then stop it and drop the references."""
        engine = served.engine
        t0 = time.perf_counter()
        if engine.running:
            await _barrier(served)
        while True:
            s = engine.stats()
            if s.running + s.waiting == 0:
                break
            await asyncio.sleep(_POLL_S)
        await asyncio.get_running_loop().run_in_executor(None, served.stop)
        st.served = None
        st.set(UNLOADED)
        log.info("model unloaded", extra={"event": "model_unloaded", "model": st.name, "version": st.version,
                                          "drain_seconds": round(time.perf_counter() - t0, 3)})

    def _spawn(self, coro: Awaitable[Any], swallow: type[BaseException] | None = None) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._tasks.discard(t)
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None and not (swallow is not None and isinstance(exc, swallow)):
                log.error("registry task failed", exc_info=exc, extra={"event": "registry_error"})

        task.add_done_callback(done)


async def _barrier(served: Served) -> None:
    """Push one 1-token generation through ``served``'s engine and wait for it.

    Engine commands apply in order, so once it finishes, every generation
    submitted before it is in the engine's stats (``running``/``waiting``): a
    stats snapshot can no longer miss a submit still in the command queue.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def sink(ev: TokenEvent) -> None:
        if ev.finish is not None and not done.done():
            done.set_result(None)

    try:
        ids = served.encode("Hello")
    except Exception:
        ids = [0]
    served.engine.submit(ids, SamplingParams(max_tokens=1, temperature=0.0), sink, priority="high")
    try:
        await asyncio.wait_for(done, _BARRIER_TIMEOUT_S)
    except TimeoutError:
        log.warning("drain barrier timed out", extra={"event": "drain_barrier_timeout", "model": served.name})
