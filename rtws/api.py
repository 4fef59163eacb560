"""The seed's Python API: ``InferenceServer`` and ``ModelConfig``.

    from rtws import InferenceServer, ModelConfig

    server = InferenceServer(max_connections=256, request_timeout=30.0, max_batch_size=32, max_batch_wait_ms=50)
    server.register_model(ModelConfig(name="gpt2", version="1.0.0", model_path="/path/to/model", device="cuda"))
    asyncio.run(server.start(host="0.0.0.0", port=8000))   # serves until stopped (SIGINT/SIGTERM drain)

It is a thin shell over :mod:`rtws.server`: the same app, the same uvicorn
server, the same configuration (:class:`~rtws.config.ServerConfig`), so
everything ``rtws serve`` can do, this can do.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, TypeVar, cast

from .config import QUANTIZATIONS, ServerConfig
from .model import ModelSpec
from .server import Server

log = logging.getLogger("rtws.api")

T = TypeVar("T")

DEVICE_HELP: Final = "must be auto, cpu, cuda or cuda:N"
DTYPES: Final = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


class _Default:
    """A keyword default that yields to ``RTWS_*`` variables (an explicit argument does not)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __repr__(self) -> str:
        return repr(self.value)


def _default(value: T) -> T:
    return cast(T, _Default(value))


def _valid_device(device: object) -> bool:
    if not isinstance(device, str):
        return False
    if device in ("auto", "cpu", "cuda"):
        return True
    return device.startswith("cuda:") and device[5:].isdigit()


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelConfig:
    """One model to serve. Validated on construction: bad values raise ``ValueError`` naming the field.

    - ``name``: what clients send as ``model``; the first registered model is the default.
    - ``model_path``: a Hugging Face model folder or hub id (loaded with ``AutoModelForCausalLM``).
    - ``version``: reported by ``GET /v1/models`` and in logs.
    - ``device``: ``auto`` (the server's ``device`` setting, itself ``auto`` = CUDA when present),
      ``cpu``, ``cuda`` or ``cuda:N``. A CUDA device on a machine without CUDA falls back to the CPU
      with a warning, so a config written for a GPU box still starts on a laptop.
    - ``dtype``: ``auto`` (the server's ``dtype`` setting: bf16/fp16 on CUDA, fp32 on CPU),
      ``float32``, ``bfloat16`` or ``float16``.
    - ``quantization``: ``None``/``"none"``, ``"int8"`` (weight-only, CPU or CUDA) or ``"int4"`` (weight-only,
      CUDA), through torchao (``rtws[quant]``). A pre-quantized checkpoint (GPTQ, AWQ, ...) loads as is
      with ``None``.
    - ``warmup``: run one real generation before the model takes traffic.
    """

    name: str
    model_path: str
    version: str = "1"
    device: str = "auto"
    dtype: str = "auto"
    quantization: str | None = None
    warmup: bool = True
    compile: str | None = None  # auto | on | off for this model; None: the server's setting

    def __post_init__(self) -> None:
        if isinstance(self.model_path, os.PathLike):
            object.__setattr__(self, "model_path", os.fspath(self.model_path))
        if not isinstance(self.name, str) or not self.name.strip() or len(self.name) > 256:
            raise ValueError(f"name: must be a non-empty string of at most 256 characters (got {self.name!r})")
        if not isinstance(self.model_path, str) or not self.model_path:
            raise ValueError(f"model_path: must be a model folder or hub id (got {self.model_path!r})")
        if not isinstance(self.version, str) or not self.version:
            raise ValueError(f"version: must be a non-empty string (got {self.version!r})")
        if not _valid_device(self.device):
            raise ValueError(f"device: {DEVICE_HELP} (got {self.device!r})")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype: must be auto, float32, bfloat16 or float16 (got {self.dtype!r})")
        if self.quantization is not None and (not isinstance(self.quantization, str)
                                              or self.quantization.lower() not in QUANTIZATIONS):
            raise ValueError(
                f"quantization: {self.quantization!r} is not supported; valid values: {', '.join(QUANTIZATIONS)} "
                "(a pre-quantized checkpoint such as GPTQ or AWQ loads as is with 'none')")
        if not isinstance(self.warmup, bool):
            raise ValueError(f"warmup: must be a bool (got {self.warmup!r})")
        if self.compile is not None and self.compile not in ("auto", "on", "off"):
            raise ValueError(f"compile: must be auto, on or off (got {self.compile!r})")

    def to_spec(self, config: ServerConfig, device: str | None = None) -> ModelSpec:
        """The engine's :class:`~rtws.model.ModelSpec`, with the server's engine settings."""

        dev = device if device is not None else (None if self.device == "auto" else self.device)
        spec = ModelSpec.from_config(config, name=self.name, path=self.model_path, version=self.version, device=dev,
                                dtype=None if self.dtype == "auto" else self.dtype)
        if self.quantization is not None:
            spec = dataclasses.replace(spec, quantization=self.quantization.lower())
        if self.compile is not None:
            spec = dataclasses.replace(spec, compile=self.compile)
        return spec


class InferenceServer:
    """An rtws server you configure and run from Python.

    Keyword arguments are :class:`~rtws.config.ServerConfig` fields (see
    ``rtws serve --help`` for all of them). Precedence: an argument you pass >
    its ``RTWS_<FIELD>`` environment variable > the defaults in the signature
    (the seed's) > ServerConfig's defaults. Invalid values raise ``ValueError``
    naming the field.

    Lifecycle: :meth:`register_model` (any number, before starting), then
    ``await start(host, port)``, which serves until :meth:`stop` or
    SIGINT/SIGTERM (both drain: in-flight generations may finish, up to
    ``drain_timeout_s``). ``async with server:`` starts it in the background,
    waits until it listens, and stops it on exit. An instance runs once.
    """

    def __init__(
        self,
        *,
        max_connections: int = _default(256),
        request_timeout: float | None = _default(30.0),
        max_batch_size: int | None = _default(32),
        max_batch_wait_ms: float = _default(50.0),
        enable_metrics: bool = _default(True),
        log_level: str = _default("INFO"),
        rate_limit_per_minute: int | None = _default(1000),
        env: Mapping[str, str] | None = None,
        **options: Any,
    ) -> None:
        seeded = {"max_connections": max_connections, "request_timeout": request_timeout,
                  "max_batch_size": max_batch_size, "max_batch_wait_ms": max_batch_wait_ms,
                  "enable_metrics": enable_metrics, "log_level": log_level,
                  "rate_limit_per_minute": rate_limit_per_minute}
        environ = os.environ if env is None else env
        explicit: dict[str, Any] = {}
        for key, value in seeded.items():
            if not isinstance(value, _Default):
                explicit[key] = value
            elif "RTWS_" + key.upper() not in environ:
                explicit[key] = value.value
        explicit.update(options)
        self.config: ServerConfig = ServerConfig.from_sources(explicit, environ)
        self.models: list[ModelConfig] = []
        self._server: Any = None  # rtws.server.Server once start() runs
        self._ready = asyncio.Event()
        self._done = asyncio.Event()
        self._startup_error: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ configuration

    def register_model(self, model: ModelConfig) -> None:
        """Add a model to load at start. Raises ``ValueError`` for a duplicate name, ``RuntimeError`` once started."""
        if not isinstance(model, ModelConfig):
            raise TypeError(f"register_model() takes a ModelConfig, not {type(model).__name__}")
        if self._server is not None:
            raise RuntimeError("register models before start(); a running server changes models through the "
                               "admin endpoints")
        if any(m.name == model.name for m in self.models):
            raise ValueError(f"name: a model named {model.name!r} is already registered")
        self.models.append(model)

    # ------------------------------------------------------------------ running

    @property
    def app(self) -> Any:
        """The ASGI :class:`~rtws.app.App` (None before :meth:`start`)."""
        return None if self._server is None else self._server.app

    @property
    def port(self) -> int | None:
        """The bound TCP port once listening (useful with ``port=0``), else None."""
        return None if self._server is None else self._server.port

    @property
    def started(self) -> bool:
        """True while the server listens."""
        return self._ready.is_set() and not self._done.is_set()

    async def start(self, host: str | None = None, port: int | None = None) -> None:
        """Load the models, listen on ``host:port`` and serve until stopped; return after the drain.

        ``host``/``port`` default to the config's (``RTWS_HOST``/``RTWS_PORT``,
        else 127.0.0.1:8000). With no registered model, serves ``config.model``
        or the bundled one. Raises ``OSError`` if the address cannot be bound,
        ``RuntimeError`` if a model fails to load or the instance already ran.
        """
        from .logs import setup_logging
        from .server import build_app, uvicorn_config

        if self._server is not None:
            raise RuntimeError("this InferenceServer already ran; create a new one")
        overrides: dict[str, Any] = {}
        if host is not None:
            overrides["host"] = host
        if port is not None:
            overrides["port"] = port
        config = dataclasses.replace(self.config, **overrides) if overrides else self.config
        self.config = config
        setup_logging(config.log_level)
        sock = _bind(config.host, config.port)  # fail fast, before minutes of model loading
        app = build_app(config, specs=[], on_startup=[lambda: self._load_models(app)])
        server = _Server(uvicorn_config(app, config), app, self._ready)
        self._server = server
        try:
            await server.serve(sockets=[sock])
        finally:
            sock.close()
            self._done.set()
        if self._startup_error is not None:
            raise RuntimeError(f"server failed to start: {self._startup_error}") from self._startup_error
        if not server.started:
            raise RuntimeError("server failed to start; see the log")

    async def _load_models(self, app: Any) -> None:
        try:
            plan: list[tuple[ModelSpec, bool]] = [
                (mc.to_spec(self.config, _fallback_device(mc.device, self.config.device)), mc.warmup)
                for mc in self.models]
            if not plan:  # nothing registered: the config's model (or the bundled one)
                from .server import default_spec

                plan.append((default_spec(self.config), True))
            for spec, warm in plan:
                if warm:
                    served = await app.load_model(spec)
                else:
                    served = await _load_cold(app, spec)
                app.registry.add(served)
        except BaseException as exc:
            self._startup_error = exc
            for served in app.registry.models():  # the ones that did load: stop their engine threads
                app.registry.remove(served.name)
                served.stop()
            raise

    async def wait_started(self, timeout: float | None = None) -> None:
        """Return once the server listens. Raises ``RuntimeError`` if it stopped (or failed) first."""
        waiters = [asyncio.ensure_future(self._ready.wait()), asyncio.ensure_future(self._done.wait())]
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if self._done.is_set() or not self._ready.is_set():
            if self._task is not None and self._task.done() and not self._task.cancelled() \
                    and self._task.exception() is not None:
                raise RuntimeError(f"server failed to start: {self._task.exception()}") from self._task.exception()
            raise RuntimeError("server is not running" if self._ready.is_set() else "server did not start")

    async def stop(self, timeout: float | None = None) -> None:
        """Drain (stop accepting; let generations finish up to ``timeout``, default ``drain_timeout_s``;
        cancel the rest), then shut down. Returns when stopped. Idempotent; a no-op before :meth:`start`."""
        server = self._server
        if server is None or self._done.is_set():
            return
        if self._ready.is_set() and not server.should_exit:
            try:
                await server.app.drain(timeout)
            finally:
                server.should_exit = True
        else:
            server.should_exit = True  # still starting: stop as soon as startup ends
        await self._done.wait()

    async def __aenter__(self) -> InferenceServer:
        """Start in the background (config host/port) and wait until listening."""
        self._task = asyncio.get_running_loop().create_task(self.start())
        try:
            await self.wait_started()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()
        if self._task is not None:
            try:
                await self._task
            except RuntimeError:
                pass  # a startup failure was already raised from __aenter__


def _fallback_device(device: str, server_device: str) -> str | None:
    """``device`` as given, unless it names CUDA on a machine without it (then the CPU, with a warning)."""
    wanted = server_device if device == "auto" else device
    if not wanted.startswith("cuda"):
        return None if device == "auto" else device
    import torch

    if torch.cuda.is_available():
        return None if device == "auto" else device
    log.warning("CUDA is not available; serving on the CPU instead",
                extra={"event": "device_fallback", "requested": wanted})
    return "cpu"


async def _load_cold(app: Any, spec: ModelSpec) -> Any:
    """Load and start a model without the warm-up generation (``ModelConfig(warmup=False)``)."""
    from .model import load

    loop = asyncio.get_running_loop()
    served = await loop.run_in_executor(None, lambda: load(spec, app.hooks.step_observer))
    served.start(loop)
    served.warm = True
    return served


def _bind(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (IPv4 or IPv6). Raises ``OSError``."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Server(Server):
    """rtws's uvicorn server that also sets an asyncio event once listening."""

    def __init__(self, config: Any, app: Any, ready: asyncio.Event) -> None:
        super().__init__(config, app)
        self._ready_event = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:
            # uvicorn exits the process when the lifespan startup fails; a library call raises instead
            # (InferenceServer.start turns "not started" into RuntimeError).
            self.should_exit = True
            return
        if self.started and not self.should_exit:
            self._ready_event.set()
