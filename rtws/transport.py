"""uvicorn protocol classes with rtws's connection-level guards (slowloris, raw-connection caps, ping floods).

ASGI sees a request only once its headers are complete, and never sees
WebSocket pings at all, so these guards live one level down, in subclasses of
uvicorn's own protocols (``httptools`` for HTTP and the upgrade request,
``websockets-sansio`` for WebSockets). ``rtws.server`` installs them; under
another ASGI server they are simply absent.

- **Raw connections**: every TCP connection takes a slot in a
  :class:`~rtws.limits.ConnectionGuard` (in total and per peer address) from
  ``connection_made`` to ``connection_lost``, whatever it does; past the cap it
  is aborted at once. The slot follows a connection through a WebSocket upgrade.
- **Header deadline**: a request's headers (a WebSocket upgrade included) must
  be complete ``header_timeout_s`` after its first byte, or after the
  connection opened for the first request; otherwise the connection is closed
  (``408`` when it can still be written). Idle keep-alive connections are
  closed by uvicorn's ``timeout_keep_alive``; bodies have their own deadline
  (``body_timeout_s``, enforced by :func:`rtws.http.asgi.read_body`).
- **Pings**: each WebSocket may send ``ping_burst`` pings, refilled at
  ``ping_rate_per_s``; past that, and whenever its transport holds more than
  ``max_transport_buffer`` unsent bytes (pongs to a client that stopped
  reading), it is closed with 1008 and aborted: uvicorn answers pings without
  flow control, so this is what bounds a ping flood's memory.
- **Abuse cooldown**: a WebSocket closed here for abuse (ping flood, send
  buffer full) puts its *upgrade identity* (peer address, ``Authorization``
  and ``Sec-WebSocket-Protocol`` headers) in a penalty box for
  ``abuse_cooldown_s``. Upgrades with that identity are answered ``429`` (with
  ``retry-after``) as soon as their headers are parsed, before any WebSocket
  handshake or ASGI work, so a client that reconnects to flood again costs the
  server one header parse per attempt. Other clients on the same address with
  other credentials are not affected. Refusals are logged at most once a
  second (``ws_refused`` / ``upgrade_cooldown`` events, with running counts).
"""

from __future__ import annotations

import asyncio
import collections
import fcntl
import logging
import struct
import termios
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import InvalidState

from .limits import ConnectionGuard

log = logging.getLogger("rtws.transport")

_TIMEOUT_408 = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
                b"content-length: 0\r\nconnection: close\r\n\r\n")

# In a WebSocket scope: a callable returning the seconds a pacing wrapper (rtws.ray.FramePacing) has held this
# socket's sends. The session does not count them as time blocked on the reader (the slow-reader rule).
PACING_SCOPE_KEY = "rtws.pacing_s"


@dataclass(slots=True)
class GuardSettings:
    """What the protocols enforce; one object per server, reached through the uvicorn config."""

    guard: ConnectionGuard = field(default_factory=ConnectionGuard)
    header_timeout_s: float = 10.0
    ping_rate_per_s: float = 10.0
    ping_burst: int = 50
    max_transport_buffer: int = 1 << 20
    frames_per_s: float = 200.0  # inbound WebSocket frames per socket, sustained (then reads pause)
    frame_burst: int = 1000
    refusals_logged_at: float = 0.0  # rate-limits the "connection refused" warning to one a second
    abuse_cooldown_s: float = 5.0  # upgrades from an identity just closed for abuse get 429 this long (0: off)
    max_penalties: int = 4096  # identities in the penalty box (oldest dropped first): bounded memory
    penalties: collections.OrderedDict[tuple[str, bytes, bytes], float] = field(
        default_factory=collections.OrderedDict)
    cooldown_refused: int = 0
    cooldown_logged_at: float = 0.0
    ws_refused: int = 0
    ws_refused_logged_at: float = 0.0

    def penalize(self, identity: tuple[str, bytes, bytes] | None) -> None:
        """Refuse this upgrade identity's next upgrades for ``abuse_cooldown_s``."""
        if identity is None or self.abuse_cooldown_s <= 0:
            return
        self.penalties.pop(identity, None)
        self.penalties[identity] = time.monotonic() + self.abuse_cooldown_s
        while len(self.penalties) > self.max_penalties:
            self.penalties.popitem(last=False)

    def penalized(self, identity: tuple[str, bytes, bytes]) -> float:
        """Seconds left in the penalty box for this identity (0.0: none). Expired entries are dropped."""
        until = self.penalties.get(identity)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self.penalties[identity]
            return 0.0
        return left


def _settings(config: Any) -> GuardSettings | None:
    settings = getattr(config, "rtws_guard", None)
    return settings if isinstance(settings, GuardSettings) else None


def _warn_refused(g: GuardSettings, address: str) -> None:
    now = time.monotonic()
    if now - g.refusals_logged_at >= 1.0:
        g.refusals_logged_at = now
        log.warning("TCP connection refused: raw connection cap", extra={
            "event": "raw_connection_refused", "client": address, "refused_total": g.guard.refused,
            "open": g.guard.total})


def upgrade_identity(address: str, headers: list[tuple[bytes, bytes]]) -> tuple[str, bytes, bytes]:
    """Who is asking for a WebSocket, as far as the raw request says: (address, Authorization,
    Sec-WebSocket-Protocol). Not verified: it only keys the abuse cooldown, which then costs nobody else."""
    auth = proto = b""
    for name, value in headers:
        if name == b"authorization":
            auth = value
        elif name == b"sec-websocket-protocol":
            proto = value
    return address, auth[:512], proto[:512]


def _abort_if_open(transport: asyncio.BaseTransport) -> None:
    """A transport still closing after its grace (the peer never read the rest): drop it."""
    if transport.is_closing() and isinstance(transport, asyncio.WriteTransport):
        transport.abort()


class GuardedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol plus the raw-connection slot and the header deadline."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._g = _settings(self.config)
        self._slot: str | None = None
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        g = self._g
        if g is None:
            return
        address = self.client[0] if self.client else "unknown"
        if not g.guard.open(address):
            _warn_refused(g, address)
            transport.abort()
            return
        self._slot = address
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._slot is not None and self._g is not None:
            self._g.guard.close(self._slot)
            self._slot = None
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        super().on_headers_complete()

    def handle_websocket_upgrade(self) -> None:
        self._disarm()
        g = self._g
        identity = None
        if g is not None and g.abuse_cooldown_s > 0:
            identity = upgrade_identity(self._slot or "unknown", self.headers)
            left = g.penalized(identity)
            if left > 0:
                self._refuse_upgrade(g, left)
                return
        super().handle_websocket_upgrade()
        proto = self.transport.get_protocol()
        if isinstance(proto, GuardedWebSocketProtocol):
            proto._slot, self._slot = self._slot, None  # the WebSocket now holds the raw-connection slot
            proto._identity = identity

    def _refuse_upgrade(self, g: GuardSettings, left: float) -> None:
        """429 for an upgrade from an identity in the penalty box: no handshake, no ASGI, one short write."""
        g.cooldown_refused += 1
        now = time.monotonic()
        if now - g.cooldown_logged_at >= 1.0:
            g.cooldown_logged_at = now
            log.warning("WebSocket upgrade refused: abuse cooldown", extra={
                "event": "upgrade_cooldown", "client": self._slot, "refused_total": g.cooldown_refused})
        transport = self.transport
        try:
            transport.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: text/plain; charset=utf-8\r\n"
                            b"retry-after: " + str(max(1, round(left))).encode() + b"\r\ncontent-length: 0\r\n"
                            b"connection: close\r\n\r\n")
        except (OSError, RuntimeError):
            pass
        transport.close()
        self.loop.call_later(1.0, _abort_if_open, transport)

    def _arm(self) -> None:
        if self._g is not None and self.transport is not None and not self.transport.is_closing():
            self._header_timer = self.loop.call_later(self._g.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        log.info("closing connection: request headers not complete in time", extra={
            "event": "header_timeout", "client": self._slot})
        try:
            if transport.get_write_buffer_size() == 0:
                transport.write(_TIMEOUT_408)
        except (OSError, RuntimeError):
            pass
        transport.close()
        self.loop.call_later(1.0, _abort_if_open, transport)


class GuardedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol plus a ping budget, a transport-buffer bound and quiet refusals."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._g = _settings(self.config)
        self._slot: str | None = None
        self._identity: tuple[str, bytes, bytes] | None = None  # set by GuardedHttpProtocol at the upgrade
        self._refused = False
        self._frame_tokens = float(self._g.frame_burst) if self._g is not None else 0.0
        self._frame_at = time.monotonic()
        self._backlog = b""
        self._pings = 0
        self._throttle: asyncio.TimerHandle | None = None
        self._ping_tokens = float(self._g.ping_burst) if self._g is not None else 0.0
        self._ping_at = time.monotonic()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._slot is not None and self._g is not None:
            self._g.guard.close(self._slot)
            self._slot = None
        if self._throttle is not None:
            self._throttle.cancel()
            self._throttle = None
        self._backlog = b""
        super().connection_lost(exc)

    _SLICE = 8 * 1024

    def stop_reading(self) -> None:
        """Parse nothing more from this peer (it is being closed for abuse): its data is dropped unread."""
        self._refused = True
        self._backlog = b""
        if not self.transport.is_closing():
            self.transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        """Parse in slices within the socket's inbound frame budget; past it, keep the rest of this read and
        pause reading until the budget refills (a flood slows itself down, costing the loop a bounded amount).
        Nothing is parsed once the socket was refused."""
        if self._g is None:
            super().data_received(data)
            return
        if self._refused:
            return
        if self._throttle is not None or self._backlog:
            self._backlog += data  # arrived before the pause took effect; bounded by one read
            self.transport.pause_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        g = self._g
        assert g is not None
        view = memoryview(data)
        pos = 0
        while pos < len(data):
            if self._refused:
                self._backlog = b""
                return
            now = time.monotonic()
            self._frame_tokens = min(float(g.frame_burst), self._frame_tokens + (now - self._frame_at) * g.frames_per_s)
            self._frame_at = now
            if self._frame_tokens <= 0:
                self._backlog = bytes(view[pos:])
                self.transport.pause_reading()
                delay = max(0.01, (1.0 - self._frame_tokens) / g.frames_per_s)
                self._throttle = self.loop.call_later(delay, self._unthrottle)
                return
            before = self.queue.qsize() + self._pings
            super().data_received(bytes(view[pos:pos + self._SLICE]))
            self._frame_tokens -= self.queue.qsize() + self._pings - before
            pos += self._SLICE

    def _unthrottle(self) -> None:
        self._throttle = None
        if self._refused or self.transport.is_closing():
            return
        data, self._backlog = self._backlog, b""
        if data:
            self._feed(data)
        if self._throttle is None and not self.read_paused:
            self.transport.resume_reading()

    async def receive(self) -> Any:
        message = await super().receive()
        if self._throttle is not None or self._refused:
            self.transport.pause_reading()  # uvicorn resumes reading once its queue is empty: not while throttled
        return message

    def handle_ping(self) -> None:
        g = self._g
        if g is None:
            super().handle_ping()
            return
        if self._refused or self.close_sent or self.transport.is_closing():
            return
        now = time.monotonic()
        self._ping_tokens = min(float(g.ping_burst), self._ping_tokens + (now - self._ping_at) * g.ping_rate_per_s)
        self._ping_at = now
        self._pings += 1
        if self._ping_tokens < 1.0:
            self._refuse("ping flood")
            return
        self._ping_tokens -= 1.0
        super().handle_ping()
        if self.transport.get_write_buffer_size() > g.max_transport_buffer:
            self._refuse("send buffer full")

    def _refuse(self, reason: str) -> None:
        """Close 1008 now; abort (dropping whatever is buffered) when the peer is not reading anyway."""
        self._refused = True
        g = self._g
        if g is not None:
            g.penalize(self._identity)
            g.ws_refused += 1
            now = time.monotonic()
            if now - g.ws_refused_logged_at >= 1.0:  # at most one line a second: refusals cannot flood the log
                g.ws_refused_logged_at = now
                log.warning("closing WebSocket: %s", reason, extra={
                    "event": "ws_refused", "client": self._slot, "reason": reason, "refused_total": g.ws_refused})
        self.queue.put_nowait({"type": "websocket.disconnect", "code": 1008, "reason": reason})
        try:
            self.conn.send_close(1008, reason)
            self.transport.write(b"".join(self.conn.data_to_send()))
        except Exception:  # noqa: BLE001 - the connection may already be failing: closing is all that is left
            pass
        self.close_sent = True
        transport = self.transport
        if g is not None and transport.get_write_buffer_size() > g.max_transport_buffer:
            transport.abort()
        else:
            transport.close()
            self.loop.call_later(1.0, _abort_if_open, transport)

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message.get("type") == "websocket.http.response.body" and not message.get("more_body", False):
            # A refused upgrade is complete once its response is written; without this uvicorn logs an ERROR
            # ("returned without completing handshake") for every refusal, which lets a client flood the log.
            self.handshake_complete = True


# =========================================================================== uvicorn internals, in one place
#
# ASGI offers no abort, no write-buffer limits and no "is this socket writable". rtws reaches one level down for
# them, through the object that owns the bound ``send`` callable uvicorn hands the app: for HTTP a
# ``RequestResponseCycle`` (``transport``, ``response_started``), for a WebSocket the protocol object itself
# (``transport``, ``conn``, ``close_sent``, ``writable``, and :class:`GuardedWebSocketProtocol`'s
# ``stop_reading``). Everything below degrades to a no-op (or to plain ASGI messages) under another ASGI host
# (Ray Serve's replica). ``tests/test_imports.py::test_uvicorn_internals_rtws_reaches_for_exist`` fails when a
# uvicorn upgrade moves any of them.


def send_owner(send: Any) -> Any:
    """The uvicorn object behind an ASGI ``send`` (None under another host). Unwraps :class:`TrackedSend`."""
    return getattr(getattr(send, "inner", send), "__self__", None)


def transport_of(send: Any) -> Any:
    """The asyncio transport under ``send`` (None when unreachable)."""
    return getattr(send_owner(send), "transport", None)


class TrackedSend:
    """An ASGI HTTP ``send`` that remembers whether the response has started (its status line is out).

    The app's error boundary reads :attr:`started`: after the start a 500 can no longer be sent.
    """

    __slots__ = ("inner", "started")

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.started = False

    async def __call__(self, message: Any) -> None:
        if message["type"] == "http.response.start":
            self.started = True
        await self.inner(message)


async def abort_response(send: Any) -> None:
    """End an HTTP response that failed after it started: drop the connection (the client sees a truncated
    response, never a second status line); under a host without a reachable transport, end the body."""
    transport = transport_of(send)
    if transport is not None:
        transport.abort()
        return
    try:
        await send({"type": "http.response.body", "body": b"", "more_body": False})
    except Exception:
        pass


def abort_http(send: Any) -> None:
    """Drop the connection under a response whose writes no longer drain (uvicorn's transport, if reachable)."""
    transport = transport_of(send)
    if transport is not None:
        transport.abort()


def tune_socket(send: Any, high_water: int, sndbuf: int | None) -> None:
    """Bound what the transport and the kernel buffer for one socket, so backpressure reaches the session early.

    Uses uvicorn's protocol object (the bound ``send``'s owner); a no-op under another ASGI server.
    """
    import socket

    transport = transport_of(send)
    if transport is None:
        return
    try:
        transport.set_write_buffer_limits(high=high_water)
        if sndbuf is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    except (OSError, AttributeError, ValueError) as exc:
        log.debug("socket tuning failed: %r", exc)


def stop_reading(send: Any) -> None:
    """Tell :class:`GuardedWebSocketProtocol` to parse nothing more from this peer."""
    stop = getattr(send_owner(send), "stop_reading", None)
    if callable(stop):
        stop()


def writable(send: Any) -> bool:
    """False when uvicorn's protocol has paused writing (its transport is above the high-water mark)."""
    ev = getattr(send_owner(send), "writable", None)
    return bool(ev.is_set()) if ev is not None else True


def write_paused(send: Any) -> bool | None:
    """For an HTTP ``send``: whether uvicorn's flow control has paused writing (its ``send`` would wait for the
    transport to drain). None when unknown (another host): the caller must assume it may wait."""
    flow = getattr(send_owner(send), "flow", None)
    paused = getattr(flow, "write_paused", None)
    return paused if isinstance(paused, bool) else None


def buffered(send: Any) -> int:
    """Bytes the socket's transport holds unsent (0 when unknown)."""
    transport = transport_of(send)
    try:
        return int(transport.get_write_buffer_size()) if transport is not None else 0
    except (AttributeError, RuntimeError, ValueError):
        return 0


def unread(send: Any) -> int | None:
    """Bytes written to the socket that its peer has not taken yet: the transport's buffer plus the kernel's
    send queue (``SIOCOUTQ``: not yet sent, or sent and not acknowledged). None when there is no socket to ask
    (a proxy's ``send``, a closed transport)."""
    transport = transport_of(send)
    if transport is None:
        return None
    try:
        sock = transport.get_extra_info("socket")
        fd = sock.fileno() if sock is not None else -1
        if fd < 0:
            return None
        queued = struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0]
        return int(queued) + int(transport.get_write_buffer_size())
    except (AttributeError, OSError, RuntimeError, ValueError):
        return None


def frame_writer(send: Any, binary: bool) -> Callable[[list[bytes]], Awaitable[None]] | None:
    """A corked writer for uvicorn's websockets-sansio protocol: several frames, each still its own WebSocket
    message, framed together and handed to the transport in one ``write`` (one syscall and one wake-up of the
    reader instead of one per frame). It waits on the same flow control as ASGI ``send`` (``writable``). ``frames``
    are encoded frames: msgpack bytes, or UTF-8 JSON for text messages. None under another host, whose ``send``
    is the only way in.
    """
    proto = send_owner(send)
    if not isinstance(proto, WebSocketsSansIOProtocol):
        return None
    kind = "bytes" if binary else "text"

    async def write(frames: list[bytes]) -> None:
        await proto.writable.wait()
        if proto.disconnected:
            raise ClientDisconnected()
        if proto.close_sent or not proto.handshake_complete or proto.initial_response is not None:
            for data in frames:  # not a plain open socket: uvicorn's own send says what is wrong
                await send({"type": "websocket.send", kind: data if binary else data.decode()})
            return
        conn = proto.conn
        try:
            for data in frames:
                if binary:
                    conn.send_binary(data)
                else:
                    conn.send_text(data)
        except InvalidState:
            raise ClientDisconnected() from None
        proto.transport.write(b"".join(conn.data_to_send()))

    return write


def force_close(send: Any, code: int, reason: str, abort_after: float = 2.0) -> None:
    """Close a WebSocket whose ASGI ``send`` is blocked on flow control.

    ASGI has no abort, and ``websocket.close`` itself waits for the socket to
    drain, which a stalled reader never does. uvicorn's protocol object is the
    bound ``send``'s owner: queue the close frame on its transport, then close
    the transport (aborting if the peer never reads it).
    """
    proto = send_owner(send)
    transport = getattr(proto, "transport", None)
    conn = getattr(proto, "conn", None)
    if transport is None:
        # Not uvicorn (Ray Serve's replica): a close message is all ASGI offers. Such hosts queue sends without
        # blocking, so it goes out at once; a host whose send blocks leaves the task waiting until it drains.
        task = asyncio.ensure_future(send({"type": "websocket.close", "code": code, "reason": reason}))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        return
    try:
        if conn is not None and not getattr(proto, "close_sent", True):
            conn.send_close(code, reason)
            transport.write(b"".join(conn.data_to_send()))
            proto.close_sent = True
    except Exception:
        pass
    if abort_after <= 0:
        transport.abort()
    else:
        transport.close()
        loop = asyncio.get_running_loop()
        loop.call_later(abort_after, lambda: transport.is_closing() and transport.abort())
    # Let the protocol's writers and readers see the end now rather than after the abort.
    if hasattr(proto, "writable"):
        proto.writable.set()
