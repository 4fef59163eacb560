"""The ASGI application: wires config, models, sessions and HTTP routes. Nothing imports it but the server.

One :class:`App` object holds all state (no module globals), so several apps
can live in one process and the whole thing can run inside another host (a Ray
Serve deployment, a test).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import mimetypes
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import protocol
from .admission import Admission
from .auth import key_id, key_ok
from .config import ServerConfig
from .errors import RtwsError
from .hooks import Hooks
from .http.asgi import Receive, Scope, Send, bearer_token, client_address, header, send_bytes, send_error, send_json
from .limits import ClientQuota, RateLimiter
from .model import ModelSpec, ServedModel
from .registry import ModelRegistry
from .session import Session, SessionLimits
from .session_store import SessionStore
from .transport import (
    PACING_SCOPE_KEY,
    TrackedSend,
    abort_response,
    buffered,
    force_close,
    frame_writer,
    stop_reading,
    tune_socket,
    unread,
    writable,
)
from .wslimits import CLOSE_TOO_BIG, frame_too_big

log = logging.getLogger("rtws.app")

STATIC_DIR = Path(__file__).parent / "static"
Handler = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(eq=False)
class Connection:
    """A live WebSocket, as the watchdog and the drain see it."""

    session: Session
    send: Send
    opened: float
    closing: bool = False
    writer: asyncio.Task[None] | None = None
    preauth: bool = False  # counted in App.num_preauth (not yet in max_connections)
    quota_key: str | None = None  # counted in the ClientQuota's connections under this key
    # the watchdog's throughput window: when it began, and the session's counters then
    win_start: float = 0.0
    win_bytes: int = 0
    win_blocked: float = 0.0
    # the reader-lead rule: (time, bytes taken by the peer) at each tick of the last READER_LEAD_S seconds
    lead_hist: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)
    lead_taken: int = 0
    lead_moved_at: float = 0.0  # when the peer last took bytes (the lead rule's stall clock)
    moved: bool = False  # its session was resumed on another socket: leave the session alone at the end


class StreamOwner(Protocol):
    """Something that runs generations outside the WebSocket sessions (the HTTP routes' streams).

    The app counts ``num_live`` in ``num_http_streams`` (capacity, drain) and calls ``interrupt_all`` when a
    drain times out."""

    @property
    def num_live(self) -> int: ...

    def interrupt_all(self, reason: str = "cancelled") -> int: ...


Mount = Callable[["App"], object]  # registers routes (and stream owners, shutdown hooks) on a new App


class App:
    """ASGI 3 application. ``await app(scope, receive, send)``.

    Composition is given at construction: ``hooks`` (a :class:`~rtws.hooks.Hooks`, or a factory that takes the
    app, such as :func:`rtws.metrics.hooks_for`), ``routes`` (mount functions, called once in order at the end
    of ``__init__``; each registers its routes with :meth:`route` / :meth:`route_prefix` and its stream owners
    with :meth:`add_stream_owner`) and ``on_startup`` (coroutines run at startup, before any added later).
    """

    def __init__(self, config: ServerConfig, specs: list[ModelSpec] | None = None,
                 registry: ModelRegistry | None = None, *, hooks: Hooks | Callable[[App], Hooks] | None = None,
                 routes: Iterable[Mount] = (), on_startup: Iterable[Callable[[], Awaitable[None]]] = ()) -> None:
        self.config = config
        self.specs = list(specs or [])
        self.registry = registry or ModelRegistry()
        self.connections: set[Connection] = set()
        self._stream_owners: list[StreamOwner] = []
        self.draining = False
        self.started = False
        self.loading: dict[str, dict[str, Any]] = {}  # model name -> load progress while it loads (/readyz)
        self.startup_error: BaseException | None = None
        self.hooks: Hooks = Hooks()
        self.rate_limiter = (RateLimiter(config.rate_limit_per_minute, config.rate_limit_burst)
                             if config.rate_limit_per_minute else None)
        self.session_limits = SessionLimits(
            max_generations=config.max_generations_per_session,
            max_tokens=config.max_tokens_limit,
            max_frame_bytes=config.max_frame_bytes,
            high_watermark=config.send_high_watermark,
            low_watermark=config.low_watermark,
            request_timeout=config.request_timeout,
            api_keys=frozenset(config.api_keys),
            max_conversations=config.max_conversations_per_session,
            max_conversation_generations=config.max_generations_per_conversation,
            resume_window_s=config.resume_window_s,
            max_control_bytes=config.max_control_bytes,
            chars_per_token=config.prompt_chars_per_token,
            replica=config.replica_id,
        )
        self.quota = ClientQuota(config.max_connections_per_client, config.max_generations_per_client)
        self.admission = Admission(self.registry, max_tokens=config.max_tokens_limit,
                                   chars_per_token=config.prompt_chars_per_token, rate_limiter=self.rate_limiter,
                                   quota=self.quota)  # the HTTP routes' (each Session builds its own on the same)
        self.num_preauth = 0  # WebSockets waiting for hello {token}: their own budget
        self.num_admitting = 0  # HTTP requests past the capacity check, tokenizing
        # Tokenizing and chat templates run here, never on the event loop. One worker keeps frames in order.
        self._tokenize_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rtws-tokenize")
        self._tasks: set[asyncio.Task[Any]] = set()  # closes started by the watchdog (never awaited inline)
        self._log_budget = _LogBudget()
        self.sessions = SessionStore(config.resume_window_s)  # resume tokens and sessions held without a socket
        self.routes: dict[tuple[str, str], Handler] = {
            ("GET", "/healthz"): self._healthz,
            ("GET", "/readyz"): self._readyz,
        }
        self.prefix_routes: list[tuple[str, str, Handler]] = []
        self.ws_routes: dict[str, Handler] = {}  # WebSocket paths besides /ws; called after websocket.connect
        self._watchdog: asyncio.Task[None] | None = None
        self.on_startup: list[Callable[[], Awaitable[None]]] = list(on_startup)
        self.on_shutdown: list[Callable[[], Awaitable[None]]] = []
        if hooks is not None:
            self.hooks = hooks if isinstance(hooks, Hooks) else hooks(self)
        for mount in routes:
            mount(self)

    # ------------------------------------------------------------------ ASGI entry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # ------------------------------------------------------------------ lifespan

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await receive()
        try:
            await self.startup()
        except Exception as exc:
            from .load_errors import log_startup_failure

            self.startup_error = exc
            await send({"type": "lifespan.startup.failed", "message": log_startup_failure(log, exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()
        if not self.draining:  # a host that never called drain() (Ray Serve's replica shutdown, another server)
            await self.drain()
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    async def startup(self) -> None:
        """Load and warm every configured model, then start the watchdog. Idempotent."""
        if self.started:
            return
        loop = asyncio.get_running_loop()
        if self.config.torch_threads is not None:
            import torch  # only here: the app module itself stays torch-free

            torch.set_num_threads(self.config.torch_threads)
        for spec in self.specs:
            served = await self.load_model(spec)
            self.registry.add(served)
        for hook in self.on_startup:
            await hook()
        self.sessions.hooks = self.hooks
        self._watchdog = loop.create_task(self._watch())
        self.started = True
        log.info("server ready", extra={"event": "ready", "models": self.registry.names()})

    async def load_model(self, spec: ModelSpec) -> ServedModel:
        """Load (in a worker thread), start and warm one model version. Raises on failure."""
        from .loading import checked_load  # preflight, one-line ModelLoadError, progress in self.loading

        loop = asyncio.get_running_loop()
        observer = self.hooks.step_observer
        served = await loop.run_in_executor(None, lambda: checked_load(spec, observer, self.loading))
        served.start(loop)
        if self.config.warmup:
            try:
                await served.warmup()
            except Exception:
                served.stop()
                raise
        else:
            served.warm = True
        return served

    def offload(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run a blocking ``fn`` (tokenizing, chat templates) in the tokenizer thread; await the result on the loop."""
        return asyncio.get_running_loop().run_in_executor(self._tokenize_pool, fn)

    def spawn(self, coro: Awaitable[Any]) -> None:
        """Run ``coro`` as a task the app keeps a reference to (so it is not collected mid-flight)."""
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def shutdown(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        for hook in self.on_shutdown:
            await hook()
        for conn in list(self.connections):
            conn.session.close()
        self.sessions.close_all()
        for served in self.registry.models():
            await asyncio.get_running_loop().run_in_executor(None, served.stop)
        self._tokenize_pool.shutdown(wait=False, cancel_futures=True)
        self.started = False
        log.info("server stopped", extra={"event": "stopped"})

    # ------------------------------------------------------------------ drain

    def add_stream_owner(self, owner: StreamOwner) -> None:
        """Count ``owner``'s generations in :attr:`num_http_streams`, and interrupt them when a drain times out."""
        self._stream_owners.append(owner)

    @property
    def num_http_streams(self) -> int:
        """Live generations outside the WebSocket sessions (HTTP responses), summed over the stream owners."""
        return sum(owner.num_live for owner in self._stream_owners)

    def live_generations(self) -> int:
        return sum(len(c.session.live) for c in self.connections) + self.num_http_streams

    async def drain(self, timeout: float | None = None) -> None:
        """Stop accepting, let generations finish up to ``timeout``, cancel the rest, close sockets 1001."""
        timeout = self.config.drain_timeout_s if timeout is None else timeout
        self.draining = True
        log.info("draining", extra={"event": "drain_start", "live": self.live_generations(), "timeout_s": timeout})
        for conn in self.connections:
            conn.session.draining = True
        deadline = time.monotonic() + timeout
        self.sessions.drain(deadline)
        while self.live_generations() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        cancelled = 0
        for conn in list(self.connections):
            cancelled += len(conn.session.live)
            conn.session.cancel_all("cancelled")
        # Flush every socket at once under one deadline (a stalled reader costs the grace once, not per socket),
        # then close them all; whatever is still blocked is force-closed.
        grace = min(1.0, max(0.25, timeout / 4))
        conns = list(self.connections)

        closed_cleanly: set[Connection] = set()

        async def flush_and_close(conn: Connection) -> None:
            await conn.session.flush(grace)
            if await self.close_connection(conn, 1001, "server shutting down", deadline=0.5, abort_after=0.25):
                closed_cleanly.add(conn)

        if conns:
            try:
                async with asyncio.timeout(grace + 1.0):
                    await asyncio.gather(*(flush_and_close(c) for c in conns), return_exceptions=True)
            except TimeoutError:
                pass
            for conn in conns:
                if conn not in closed_cleanly and conn in self.connections:
                    conn.closing = True
                    conn.session.close()
                    force_close(conn.send, 1001, "server shutting down", abort_after=0.0)
        cancelled += sum(len(s.live) for s in self.sessions.held())
        self.sessions.close_all()
        for owner in self._stream_owners:  # HTTP responses still running: they end now, reason cancelled
            cancelled += owner.interrupt_all("cancelled")
        log.info("drained", extra={"event": "drain_done", "cancelled": cancelled})

    # ------------------------------------------------------------------ HTTP

    def route(self, method: str, path: str, handler: Handler) -> None:
        self.routes[(method, path)] = handler

    def route_prefix(self, method: str, prefix: str, handler: Handler) -> None:
        self.prefix_routes.append((method, prefix, handler))

    def websocket_route(self, path: str, handler: Handler) -> None:
        """Serve WebSockets at ``path`` with ``handler`` (it gets the scope after ``websocket.connect``)."""
        self.ws_routes[path] = handler

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        refusal = self.check_host_and_origin(scope, state_changing=method not in ("GET", "HEAD", "OPTIONS"))
        if refusal is not None:
            self.hooks.rejected(refusal[0])
            await send_error(send, "forbidden" if refusal[0] == "origin" else "bad_host", refusal[1],
                             403 if refusal[0] == "origin" else 421, [(b"connection", b"close")])
            return
        handler = self.routes.get((method, path))
        if handler is None:
            for m, prefix, h in self.prefix_routes:
                if m == method and path.startswith(prefix):
                    handler = h
                    break
        known = handler is None and any(p == path for (_, p) in self.routes)
        if handler is None and not known and method in ("GET", "HEAD"):
            handler = self._static
        if handler is None:
            allow = ", ".join(sorted({m for (m, p) in self.routes if p == path}))
            await send_error(send, "method_not_allowed" if known else "not_found",
                             f"{method} {path} is not allowed" if known else f"no route for {path}",
                             headers=[(b"allow", allow.encode())] if known else None)
            return
        tracked = TrackedSend(send)
        try:
            await handler(scope, receive, tracked)
        except Exception:
            # One error boundary per request: log the cause, tell the client nothing internal. Once the status
            # line is out a 500 cannot follow it: the connection is dropped instead (a truncated response).
            log.exception("HTTP handler failed", extra={"event": "http_error", "path": path})
            if tracked.started:
                await abort_response(send)
                return
            try:
                await send_error(send, "internal", "internal server error")
            except Exception:
                pass

    async def _healthz(self, scope: Scope, receive: Receive, send: Send) -> None:
        # 503 while draining so load balancers stop routing here before the sockets close.
        await send_json(send, 503 if self.draining else 200, {"status": "draining" if self.draining else "ok"})

    async def _readyz(self, scope: Scope, receive: Receive, send: Send) -> None:
        models = {m.name: m.warm for m in self.registry.models()}
        ready = self.started and not self.draining and bool(models) and all(models.values())
        body: dict[str, Any] = {"ready": ready, "models": models}
        if self.loading:
            body["loading"] = dict(self.loading)
        await send_json(send, 200 if ready else 503, body)

    async def _static(self, scope: Scope, receive: Receive, send: Send) -> None:
        rel = scope["path"].lstrip("/") or "index.html"
        try:
            if "\x00" in rel:
                raise ValueError("NUL in path")
            target = (STATIC_DIR / rel).resolve()
            found = STATIC_DIR.resolve() in target.parents and target.is_file()
        except (ValueError, OSError):  # NUL bytes, names too long, odd encodings: not a file we serve
            found = False
        if not found:
            await send_error(send, "not_found", f"no route for {scope['path']}")
            return
        ctype = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        if ctype.startswith("text/") or ctype in ("application/javascript", "application/json"):
            ctype += "; charset=utf-8"
        await send_bytes(send, 200, target.read_bytes(), ctype, [(b"cache-control", b"no-cache")])

    def check_http_auth(self, scope: Scope) -> bool:
        if not self.config.auth_enabled:
            return True
        token = bearer_token(scope)
        return token is not None and key_ok(token, frozenset(self.config.api_keys))

    def client_key(self, scope: Scope) -> str:
        """The client's *verified* identity (rate limits, quotas): its API key's id when auth is on and the key
        is valid, else its address (uvicorn rewrites it from X-Forwarded-For only for ``forwarded_allow_ips``)."""
        token = bearer_token(scope)
        if token and self.config.auth_enabled and key_ok(token, frozenset(self.config.api_keys)):
            return "key:" + key_id(token)
        return "addr:" + client_address(scope)

    def check_host_and_origin(self, scope: Scope, state_changing: bool) -> tuple[str, str] | None:
        """(metric, message) when the request must be refused: a Host not in ``allowed_hosts`` (DNS rebinding),
        or, for a state-changing request or a WebSocket, an Origin not in ``allowed_origins``."""
        cfg = self.config
        if cfg.allowed_hosts:
            host = (header(scope, b"host") or "").strip().lower()
            bare = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if host not in cfg.allowed_hosts and bare not in cfg.allowed_hosts:
                return "host", "Host header not allowed"
        if state_changing and cfg.allowed_origins:
            origin = header(scope, b"origin")
            if origin is not None and origin not in cfg.allowed_origins:
                return "origin", "origin not allowed"
        return None

    @property
    def at_capacity(self) -> bool:
        authenticated = len(self.connections) - self.num_preauth
        return authenticated + self.num_http_streams + self.num_admitting >= self.config.max_connections

    # ------------------------------------------------------------------ WebSocket

    async def reject_upgrade(self, send: Send, status: int, code: str, message: str) -> None:
        if self._log_budget.take():
            log.info("WebSocket upgrade refused", extra={"event": "ws_refused", "status": status, "code": code})
        body = protocol.JSON.encode(protocol.Error(code=code, message=message))
        await send({"type": "websocket.http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "websocket.http.response.body", "body": body})

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        await receive()  # websocket.connect
        ws_route = self.ws_routes.get(scope["path"])
        if ws_route is not None:  # another WebSocket protocol (rtws.realtime's OpenAI Realtime edge)
            await ws_route(scope, receive, send)
            return
        try:
            upgrade = self._admit_upgrade(scope)
        except RtwsError as exc:  # the one rendering of a refused upgrade: an HTTP error before the accept
            await self.reject_upgrade(send, exc.http_status, exc.code, exc.message)
            return
        authenticated, rate_key, token, quota_key = (upgrade.authenticated, upgrade.rate_key, upgrade.token,
                                                     upgrade.quota_key)
        subprotocol = protocol.choose_subprotocol(scope.get("subprotocols", []))
        codec = protocol.codec_for(subprotocol)
        await send({"type": "websocket.accept", "subprotocol": subprotocol})
        tune_socket(send, self.config.transport_high_water, self.config.socket_send_buffer)

        if codec.binary:
            async def send_frame(data: bytes | str) -> None:
                await send({"type": "websocket.send", "bytes": data})
        else:
            async def send_frame(data: bytes | str) -> None:
                await send({"type": "websocket.send", "text": data.decode() if isinstance(data, bytes) else data})

        send_many = frame_writer(send, codec.binary)
        conn: Connection | None = None

        def policy_close(code: int, reason: str) -> None:
            if conn is not None:
                if reason in _ABUSE_REASONS:
                    stop_reading(conn.send)  # parse nothing more from a flooder while its close runs
                self.spawn(self.close_connection(conn, code, reason, flush=True))

        def on_authenticated(s: Session) -> str | None:
            # hello {token} succeeded: move from the pre-auth budget into max_connections and the client's quota
            assert conn is not None
            if self.draining:
                return "server is draining"
            if conn.preauth and not self._fits_after_preauth():
                self.hooks.rejected("max_connections")
                return "too many connections"
            if self.quota.max_connections is not None:
                over = self.quota.open_connection(s.rate_key)
                if over is not None:
                    self.hooks.rejected("max_connections_per_client")
                    return over
                conn.quota_key = s.rate_key
            if conn.preauth:
                conn.preauth = False
                self.num_preauth -= 1
            return None

        def on_resume(fresh: Session, frame: protocol.Hello) -> protocol.Error | None:
            assert conn is not None
            return self._resume(conn, fresh, frame, send_frame, policy_close, on_resume, send_many)

        session = Session(send_frame, codec, self.registry, self.session_limits, client=client_address(scope),
                          authenticated=authenticated, rate_limiter=self.rate_limiter, hooks=self.hooks,
                          on_policy_close=policy_close, offload=self.offload,
                          quota=self.quota if self.quota.max_generations is not None else None,
                          on_authenticated=on_authenticated, store=self.sessions, on_resume=on_resume,
                          send_many=send_many,
                          require_ack=bool(self.config.require_ack))  # /ws only: Realtime has no acks
        session.rate_key = rate_key
        session.set_pacing_clock(scope.get(PACING_SCOPE_KEY))
        if self.config.auth_enabled and token is not None:
            session.key = key_id(token)
        session.draining = self.draining
        now = time.monotonic()
        conn = Connection(session=session, send=send, opened=now, preauth=not authenticated, quota_key=quota_key,
                          win_start=now)
        if conn.preauth:
            self.num_preauth += 1
        self.connections.add(conn)
        self.hooks_connection(+1)
        conn.writer = asyncio.get_running_loop().create_task(self._run_writer(conn))
        if authenticated:
            session.start()
        code = 1006
        try:
            handled = 0
            while True:
                msg = await receive()
                if msg["type"] == "websocket.receive":
                    data = msg.get("bytes")
                    frame = data if data is not None else msg.get("text", "")
                    if frame_too_big(frame, self.config.max_frame_bytes):  # a proxy may allow more (Ray: 16 MiB)
                        self.hooks.rejected("frame_too_big")
                        await self.close_connection(conn, CLOSE_TOO_BIG, "frame too big")
                        break
                    conn.session.on_frame(frame)
                    handled += 1
                    if handled % 32 == 0:
                        # receive() returns without suspending while frames are queued: let other sockets,
                        # the writers and the watchdog run between batches of a burst
                        await asyncio.sleep(0)
                elif msg["type"] == "websocket.disconnect":
                    code = msg.get("code", 1005)
                    break
        finally:
            if conn.writer is not None:
                conn.writer.cancel()
            # Resume: an acking session whose socket dropped uncleanly (not a client 1000, not a close we
            # sent) is held for resume_window_s; everything else ends now, as in protocol v1.
            if not conn.moved:
                s = conn.session
                if (code != 1000 and not conn.closing and not self.draining and s.resumable
                        and self.sessions.hold(s)):
                    s.detach()
                else:
                    s.close()
            self.connections.discard(conn)
            if conn.preauth:
                conn.preauth = False
                self.num_preauth -= 1
            if conn.quota_key is not None:
                self.quota.close_connection(conn.quota_key)
                conn.quota_key = None
            self.hooks_connection(-1)

    def check_upgrade(self, scope: Scope) -> None:
        """The checks every WebSocket upgrade passes first, whatever its path: not draining, and Host and
        Origin allowed. Raises :class:`~rtws.errors.RtwsError` with the HTTP status to refuse with."""
        if self.draining:
            raise RtwsError("overloaded", "server is draining", status=503)
        refusal = self.check_host_and_origin(scope, state_changing=True)
        if refusal is not None:
            self.hooks.rejected(refusal[0])
            raise RtwsError("unauthorized", refusal[1], status=403 if refusal[0] == "origin" else 421)

    def _admit_upgrade(self, scope: Scope) -> _Upgrade:
        """The checks a ``/ws`` upgrade passes before it is accepted. Raises :class:`~rtws.errors.RtwsError`
        carrying the HTTP status to refuse with (the refusal already counted in ``hooks.rejected``)."""
        if scope["path"] != "/ws":
            raise RtwsError("not_found", f"no WebSocket endpoint at {scope['path']}", status=404)
        self.check_upgrade(scope)
        authenticated = not self.config.auth_enabled
        rate_key = "addr:" + client_address(scope)
        token = bearer_token(scope)
        if self.config.auth_enabled and token is not None:
            if not key_ok(token, frozenset(self.config.api_keys)):
                self.hooks.rejected("unauthorized")
                raise RtwsError("unauthorized", "invalid API key", status=401)
            authenticated = True
            rate_key = "key:" + key_id(token)  # verified: only then does a token name the client
        if authenticated and self.at_capacity:
            self.hooks.rejected("max_connections")
            raise RtwsError("overloaded", "too many connections", status=503)
        if not authenticated and self.num_preauth >= self.config.max_preauth_connections:
            # The pre-auth budget is full: make room by closing the oldest socket still waiting. A flood of
            # keyless sockets then churns only among itself, and a real client (which sends hello at once)
            # gets its turn instead of a 503.
            self._evict_oldest_preauth()
        quota_key: str | None = None
        if authenticated and self.quota.max_connections is not None:
            over = self.quota.open_connection(rate_key)
            if over is not None:
                self.hooks.rejected("max_connections_per_client")
                raise RtwsError("overloaded", over, status=429)
            quota_key = rate_key
        return _Upgrade(authenticated, rate_key, token, quota_key)

    def attach_connection(self, session: Session, send: Send, quota_key: str | None) -> Connection:
        """Track an accepted socket of another WebSocket edge (Realtime) like a ``/ws`` one: in
        ``connections`` (watchdog, drain, ``max_connections``), with its writer task started. Pair with
        :meth:`detach_connection` in a ``finally``."""
        now = time.monotonic()
        conn = Connection(session=session, send=send, opened=now, quota_key=quota_key, win_start=now)
        self.connections.add(conn)
        self.hooks_connection(+1)
        conn.writer = asyncio.get_running_loop().create_task(self._run_writer(conn))
        return conn

    def detach_connection(self, conn: Connection) -> None:
        """The socket of :meth:`attach_connection` is gone: stop its writer, close its session, release it."""
        if conn.writer is not None:
            conn.writer.cancel()
        conn.session.close()
        self.connections.discard(conn)
        if conn.quota_key is not None:
            self.quota.close_connection(conn.quota_key)
            conn.quota_key = None
        self.hooks_connection(-1)

    def _evict_oldest_preauth(self) -> None:
        waiting = [c for c in self.connections if c.preauth and not c.closing]
        if not waiting:
            return
        oldest = min(waiting, key=lambda c: c.opened)
        oldest.preauth = False
        self.num_preauth -= 1
        oldest.session.refusing = True  # it may no longer authenticate: it is being closed
        self.hooks.rejected("max_preauth_connections")
        self._close_soon(oldest, 1008, "too many unauthenticated connections")

    def _resume(self, conn: Connection, fresh: Session, frame: protocol.Hello,
                send_frame: Callable[[bytes | str], Awaitable[None]], policy_close: Callable[[int, str], None],
                on_resume: Callable[[Session, protocol.Hello], protocol.Error | None],
                send_many: Callable[[list[bytes]], Awaitable[None]] | None = None) -> protocol.Error | None:
        """``hello {resume}`` on ``conn``: move the held session onto this socket, or say why not."""
        assert frame.resume is not None
        received = frame.received or 0
        claim = self.sessions.claim(frame.resume, fresh.key, received, fresh.codec.name)
        if claim.session is None:
            return protocol.Error(code="resume_failed", reason=claim.public_reason,
                                  message=f"cannot resume ({claim.public_reason}); this is a fresh session")
        held: Session = claim.session
        for other in list(self.connections):  # still attached to a half-open socket: take it over
            if other.session is held and other is not conn:
                other.moved = True
                if other.writer is not None:
                    other.writer.cancel()
                held.detach()
                force_close(other.send, 4001, "session resumed on another connection")
        if conn.writer is not None:
            conn.writer.cancel()
        fresh.close()
        conn.session = held
        held.set_pacing_clock(fresh.pacing_clock)
        frames, nbytes = held.attach(send_frame, received, on_policy_close=policy_close, on_resume=on_resume,
                                     send_many=send_many)
        conn.writer = asyncio.get_running_loop().create_task(self._run_writer(conn))
        self.sessions.resumed(held, frames, nbytes, claim.held_s)
        return None

    def _fits_after_preauth(self) -> bool:
        """Whether one pre-auth socket, once authenticated, still fits in ``max_connections``."""
        authenticated = len(self.connections) - self.num_preauth
        return authenticated + self.num_http_streams + self.num_admitting < self.config.max_connections

    def hooks_connection(self, delta: int) -> None:
        self.hooks.connection(delta)

    async def _run_writer(self, conn: Connection) -> None:
        try:
            await conn.session.run_writer()
        except asyncio.CancelledError:
            raise
        except Exception:
            # The socket failed under us (reset, closed): the receive loop sees the disconnect
            # (and holds the session for resume when it can).
            if not conn.session.resumable:
                conn.session.close()

    async def close_connection(self, conn: Connection, code: int, reason: str, flush: bool = False,
                     deadline: float = 1.0, abort_after: float = 2.0) -> bool:
        """Close one socket with ``code``, within ``deadline`` seconds (plus 1 s when ``flush``). Idempotent.

        True when the close frame was handed to the transport normally (False: force-closed, or already closing).

        Never waits on a socket that does not drain: a blocked writer, a paused transport (the peer stopped
        reading, e.g. after a ping flood) or a close frame that cannot be sent in time means a force-close.
        """
        if conn.closing:
            return False
        conn.closing = True
        if flush:
            await conn.session.flush(1.0)
        conn.session.close()
        if conn.session.send_started is not None or not writable(conn.send):
            force_close(conn.send, code, reason, abort_after)  # the writer is stuck on a full socket
            return False
        try:
            async with asyncio.timeout(deadline):
                await conn.send({"type": "websocket.close", "code": code, "reason": reason})
        except Exception:  # includes TimeoutError: the transport paused under us
            force_close(conn.send, code, reason, abort_after)
            return False
        return True

    def _close_soon(self, conn: Connection, code: int, reason: str) -> None:
        """Start closing ``conn`` without waiting for it: the watchdog must never block on one socket."""
        if not conn.closing:
            self.spawn(self.close_connection(conn, code, reason))

    async def _watch(self) -> None:
        """Once per tick: close stalled readers, unauthenticated and idle sessions. Never awaits a socket."""
        while True:
            await asyncio.sleep(0.1)
            try:
                self._watch_once(time.monotonic())
            except Exception:  # a bug here must not end the watchdog for every connection
                log.exception("watchdog tick failed", extra={"event": "watchdog_error"})

    def _reader_lead(self, conn: Connection, now: float) -> int | None:
        """Hold a socket's generations while its reader lags what the socket already holds for it.

        A reader that takes little (a trickle, a stalled tab) can leave everything the kernel's autotuned send
        buffer holds unread without ever making the socket unwritable, so the send-buffer watermark never
        trips and its generations decode at full speed for nobody. Here the unread bytes (transport buffer +
        ``SIOCOUTQ``) are held to ``reader_lead_bytes``, or to :data:`READER_LEAD_S` of the reader's own
        rate when that is more (a fast reader far away keeps its bandwidth-delay product in flight).

        Returns the credit in bytes a held session may resume with (its reader is back under half the
        allowance), else None; the caller decides which held sessions resume this tick.
        """
        s = conn.session
        pending = unread(conn.send)
        if pending is None:
            return None
        taken = s.bytes_sent - pending
        hist = conn.lead_hist
        if taken > conn.lead_taken or not hist:
            conn.lead_moved_at = now
        conn.lead_taken = taken
        hist.append((now, taken))
        while len(hist) > 1 and now - hist[1][0] >= READER_LEAD_S:
            hist.popleft()
        # What it took over the last second, not over one tick: a burst into the kernel's receive buffer at the
        # start is not a reading rate.
        allowed = max(self.config.reader_lead_bytes, taken - hist[0][1])
        if not s.reader_behind and pending > allowed:
            s.set_reader_behind(True)
        elif s.reader_behind and pending <= allowed // 2:
            return allowed - pending
        return None

    def _watch_once(self, now: float) -> None:
        cfg = self.config
        self.sessions.expire(now)
        window = cfg.stall_timeout_s
        lead_ready: list[tuple[float, Session, int]] = []
        for conn in list(self.connections):
            s = conn.session
            if conn.closing:
                continue
            if buffered(conn.send) > cfg.max_transport_buffer:
                log.warning("closing socket over its transport buffer", extra={
                    "event": "transport_buffer", "session": s.id, "client": s.client})
                self.hooks.rejected("transport_buffer")
                conn.closing = True
                s.close()
                force_close(conn.send, 1008, "send buffer full", abort_after=0.0)
                continue
            # One send blocked that long, or held by the lead rule with nothing taken since (a reader that stalled
            # without a send ever blocking).
            if ((s.send_started is not None and now - s.send_started > cfg.stall_timeout_s)
                    or (s.reader_behind
                        and now - max(conn.lead_moved_at, s.behind_since or now) > cfg.stall_timeout_s)):
                log.warning("closing stalled reader", extra={"event": "stalled", "session": s.id,
                                                             "client": s.client, "buffered": s.buffered})
                self.hooks.rejected("stalled")
                self._close_soon(conn, 1008, "reader stalled")
                continue
            if s.ack_stalled(now, cfg.stall_timeout_s):
                log.warning("closing socket: acknowledgements stalled", extra={
                    "event": "stalled", "session": s.id, "client": s.client, "unacked": s.unacked})
                self.hooks.rejected("stalled")
                self._close_soon(conn, 1008, "acknowledgements stalled")
                continue
            if now - conn.win_start >= window:
                # Throughput over the window: blocked on the reader for most of it, yet little taken.
                blocked = s.blocked_s - conn.win_blocked
                if s.send_started is not None:
                    blocked += now - max(s.send_started, conn.win_start)
                if s.behind_since is not None:  # held by the lead rule: blocked on the reader too
                    blocked += now - max(s.behind_since, conn.win_start)
                blocked = min(blocked, now - conn.win_start)
                sent = s.bytes_sent - conn.win_bytes
                conn.win_start, conn.win_bytes, conn.win_blocked = now, s.bytes_sent, s.blocked_s
                if blocked >= window / 2 and sent < cfg.stall_min_bytes_per_s * window:
                    log.warning("closing slow reader", extra={"event": "stalled", "session": s.id,
                                                              "client": s.client, "bytes": sent,
                                                              "blocked_s": round(blocked, 3)})
                    self.hooks.rejected("stalled")
                    self._close_soon(conn, 1008, "reader too slow")
                    continue
            if cfg.reader_lead_bytes and (s.live or s.reader_behind) and not s.acking:
                credit = self._reader_lead(conn, now)
                if credit is not None:
                    lead_ready.append((s.behind_since or now, s, credit))
            if not s.authenticated and now - conn.opened > cfg.auth_timeout_s:
                self._close_soon(conn, 1008, "authentication timeout")
            elif (cfg.idle_timeout_s is not None and s.idle
                  and now - s.last_activity > cfg.idle_timeout_s):
                self._close_soon(conn, 1000, "idle timeout")
        if lead_ready:
            resume_lead_held(lead_ready, READER_LEAD_RESUME_ROWS)


READER_LEAD_S = 1.0  # the lead rule allows a reader this many seconds of its own measured rate
READER_LEAD_RESUME_ROWS = 8  # generations the lead rule resumes per watchdog tick (10 ticks a second)


def resume_lead_held(ready: list[tuple[float, Session, int]], max_rows: int) -> list[Session]:
    """Resume sessions the lead rule holds whose readers caught up: ``(held since, session, credit bytes)``,
    longest held first, up to ``max_rows`` generations in all (always at least one session). Slow readers that
    catch up together (they read on the same clock) then re-enter the batch a few at a time instead of all in
    one step, which would make that step slower for every stream that reads. Returns the sessions resumed."""
    rows = 0
    resumed: list[Session] = []
    for _, s, credit in sorted(ready, key=lambda r: r[0]):
        if resumed and rows + len(s.live) > max_rows:
            break
        rows += len(s.live)
        s.set_reader_behind(False, credit)
        resumed.append(s)
    return resumed


@dataclass(frozen=True, slots=True)
class _Upgrade:
    """A ``/ws`` upgrade that passed :meth:`App._admit_upgrade`."""

    authenticated: bool
    rate_key: str  # the client's verified identity so far (its key's id, else its address)
    token: str | None  # the Authorization bearer token, if any
    quota_key: str | None  # counted in the ClientQuota's connections under this key


class _LogBudget:
    """At most ``burst`` log lines, refilled at ``per_s``: refused upgrades cannot flood the log."""

    def __init__(self, per_s: float = 1.0, burst: int = 10) -> None:
        self.per_s, self.burst = per_s, float(burst)
        self.tokens, self.at = float(burst), time.monotonic()
        self.dropped = 0

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.per_s)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.dropped += 1
        return False


_ABUSE_REASONS = frozenset({"too many errors", "control frames not read"})
