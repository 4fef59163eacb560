"""Running the app under uvicorn (uvloop, httptools, websockets-sansio), with a graceful drain on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any

import uvicorn

from . import metrics, realtime
from .app import App
from .auth import key_ok
from .config import ServerConfig
from .http import routes as http_routes
from .http.admin import mount_admin
from .http.asgi import Receive, Scope, Send, bearer_token, send_error
from .limits import ConnectionGuard
from .logs import setup_logging
from .model import ModelSpec
from .transport import GuardedHttpProtocol, GuardedWebSocketProtocol, GuardSettings

log = logging.getLogger("rtws.server")

BUNDLED_MODEL_NAME = "shakespeare"


def default_spec(config: ServerConfig) -> ModelSpec:
    """The model ``rtws serve`` loads: ``config.model`` or the bundled one."""
    if config.model is None:
        from .default_model import DEFAULT_MODEL_PATH

        path, name = str(DEFAULT_MODEL_PATH), BUNDLED_MODEL_NAME
    else:
        path = config.model
        name = Path(path.rstrip("/")).name or path
    return ModelSpec.from_config(config, name=config.model_name or name, path=path)


def build_app(config: ServerConfig, specs: list[ModelSpec] | None = None, *,
              on_startup: Iterable[Callable[[], Awaitable[None]]] = ()) -> App:
    """The ASGI app with every HTTP API mounted. ``specs`` defaults to the config's one model; ``on_startup``
    runs at startup before any hook added later (:class:`~rtws.api.InferenceServer` loads its models there)."""
    return App(config, specs if specs is not None else [default_spec(config)],
               hooks=metrics.hooks_for,  # generation logs always; Prometheus hooks when enable_metrics
               routes=[metrics.mount, mount_admin, http_routes.mount, realtime.mount, protect_metrics],
               on_startup=on_startup)


def metrics_keys(config: ServerConfig) -> frozenset[str]:
    """Keys that may read ``/metrics``: ``metrics_api_keys``, else the API keys; empty = open (auth off)."""
    return frozenset(config.metrics_api_keys or config.api_keys)


def protect_metrics(app: App) -> None:
    """Put ``GET /metrics`` behind ``Authorization: Bearer`` with a metrics key whenever one is configured."""
    handler = app.routes.get(("GET", "/metrics"))
    keys = metrics_keys(app.config)
    if handler is None or not keys:
        return

    async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
        token = bearer_token(scope)
        if token is None or not key_ok(token, keys):
            app.hooks.rejected("unauthorized")
            await send_error(send, "unauthorized", "metrics need 'Authorization: Bearer <metrics key>'",
                             headers=[(b"www-authenticate", b'Bearer realm="rtws-metrics"')])
            return
        await handler(scope, receive, send)

    app.route("GET", "/metrics", guarded)


class RtwsUvicornConfig(uvicorn.Config):
    """uvicorn's config carrying rtws's connection guards to the protocol classes (:mod:`rtws.transport`)."""

    rtws_guard: GuardSettings | None = None


def uvicorn_config(app: App, config: ServerConfig, sock: socket.socket | None = None) -> uvicorn.Config:
    """uvicorn's settings for ``config``. Proxy headers (X-Forwarded-For/-Proto) are honoured only from
    ``forwarded_allow_ips`` (default: none, unlike uvicorn's own default of 127.0.0.1)."""
    ucfg = RtwsUvicornConfig(
        app,
        host=config.host,
        port=config.port,
        loop="uvloop" if sys.platform != "win32" else "asyncio",
        http=GuardedHttpProtocol,
        ws=GuardedWebSocketProtocol,
        proxy_headers=bool(config.forwarded_allow_ips),
        forwarded_allow_ips=list(config.forwarded_allow_ips) or None,
        lifespan="on",
        ws_max_size=config.max_frame_bytes,
        ws_ping_interval=config.ping_interval_s,
        ws_ping_timeout=config.ping_timeout_s,
        ws_per_message_deflate=False,
        log_config=None,
        access_log=config.access_log,
        timeout_graceful_shutdown=5,
        backlog=4096,
    )
    ucfg.rtws_guard = GuardSettings(
        guard=ConnectionGuard(config.max_raw_connections, config.max_connections_per_address),
        header_timeout_s=config.header_timeout_s, ping_rate_per_s=config.ping_rate_per_s,
        ping_burst=config.ping_burst, max_transport_buffer=config.max_transport_buffer,
        frames_per_s=config.ws_frames_per_s, frame_burst=config.ws_frame_burst,
        abuse_cooldown_s=config.abuse_cooldown_s)
    return ucfg


class Server(uvicorn.Server):
    """uvicorn's server with rtws's drain: the first SIGTERM/SIGINT drains, a second one exits at once."""

    def __init__(self, config: uvicorn.Config, app: App) -> None:
        super().__init__(config)
        self.app = app
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self.ready = threading.Event()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.should_exit:
            return
        for srv in getattr(self, "servers", []):
            for s in srv.sockets:
                self.port = s.getsockname()[1]
                break
        log.info("listening", extra={"event": "listening", "host": self.config.host, "port": self.port})
        from .banner import announce

        announce(self.app, self.config.host, self.port)
        if threading.current_thread() is threading.main_thread():
            freeze_startup_heap()
        self.ready.set()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._drain_requested or self._loop is None or not self.started:
            super().handle_exit(sig, frame)
            return
        self._drain_requested = True
        self._loop.call_soon_threadsafe(self.request_drain)

    def request_drain(self) -> None:
        """Start the graceful drain from the loop thread; the server exits when it is done."""
        assert self._loop is not None
        self._drain_requested = True
        self._loop.create_task(self._drain())

    async def _drain(self) -> None:
        try:
            await self.app.drain()
        except Exception:
            log.exception("drain failed", extra={"event": "drain_error"})
        finally:
            self.should_exit = True


def freeze_startup_heap() -> None:
    """Move everything alive once the server is up (modules, tokenizers, configs: hundreds of thousands of
    objects that live as long as the process) out of the collector's sight (``gc.freeze``), so a full collection
    scans only what serving created. Without it, a generation-2 collection after a burst of connections walked
    the whole heap and held the GIL (and so the event loop) for 150 to 200 ms. Only for a server that owns its
    process (``rtws serve``): a server in a thread of someone else's process leaves their heap alone."""
    gc.collect()
    gc.freeze()
    log.info("startup heap frozen", extra={"event": "gc_freeze", "objects": gc.get_freeze_count()})


def serve(config: ServerConfig, specs: list[ModelSpec] | None = None) -> int:
    """Run until drained. Returns the process exit code: 0, 2 when a model cannot load, 1 on other failures.

    Before uvicorn starts: logging (``log_format``), torch threads (:mod:`rtws.threads`), and a preflight of
    every model (:mod:`rtws.load_errors`), so a model that cannot load fails in one line.
    """
    setup_logging(config.log_level, fmt=config.log_format)
    from .load_errors import ModelLoadError, check_device, preflight

    specs = specs if specs is not None else [default_spec(config)]
    try:
        for spec in specs:
            preflight(spec)
    except ModelLoadError as exc:
        log.error(str(exc), extra={"event": "load_failed", "model_path": exc.model, "error_kind": exc.kind})
        return 2
    set_threads(config, check_device(specs[0].path, specs[0].device) if specs else "cpu")
    app = build_app(config, specs)
    server = Server(uvicorn_config(app, config), app)
    try:
        server.run()
    except SystemExit as exc:  # uvicorn exits 3 when the lifespan startup (model loading) or the bind fails
        if isinstance(app.startup_error, ModelLoadError):
            return 2
        return exc.code if isinstance(exc.code, int) else 1
    if server.started:
        return 0
    return 2 if isinstance(app.startup_error, ModelLoadError) else 1


def set_threads(config: ServerConfig, device: str) -> None:
    from .threads import apply_threads, choose_threads, usable_cores

    cores = usable_cores()
    choice = choose_threads(cores, device, config.torch_threads, config.torch_interop_threads,
                            config.elastic_threads)
    intra, interop = apply_threads(choice)
    log.info("torch threads", extra={"event": "threads", "cores": cores, "device": device, "threads": intra,
                                     "interop_threads": interop, "elastic_top": choice.elastic_top,
                                     "reason": choice.reason})


def run_in_thread(config: ServerConfig, specs: list[ModelSpec] | None = None, app: App | None = None,
                  timeout: float = 300.0) -> tuple[Server, threading.Thread]:
    """Start a server on its own loop in a thread (tests, notebooks). Returns once it listens."""
    app = app or build_app(config, specs)
    server = Server(uvicorn_config(app, config), app)

    def target() -> None:
        server.run()

    thread = threading.Thread(target=target, name="rtws-server", daemon=True)
    thread.start()
    if not server.ready.wait(timeout):
        raise RuntimeError("server did not start in time")
    return server, thread


def stop_thread(server: Server, thread: threading.Thread, drain: bool = False, timeout: float = 60.0) -> None:
    loop: Any = server._loop
    if drain and loop is not None:
        loop.call_soon_threadsafe(server.request_drain)
    else:
        server.should_exit = True
    thread.join(timeout)
