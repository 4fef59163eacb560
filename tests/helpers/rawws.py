"""Raw-socket WebSocket client for hostile tests: frames written by hand, reads only when asked.

Nothing here hides the server's behaviour: a test decides when (and whether) to read, can send pings or text
frames on a msgpack socket, and can shrink its receive buffer so the server's send path fills up.
"""

from __future__ import annotations

import base64
import os
import socket
import struct
import time
from typing import Any

import msgspec

OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x1, 0x2, 0x8, 0x9, 0xA


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One masked, final client frame."""
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload)) if n < 4096 else _mask_fast(payload, mask)
    return head + mask + masked


def _mask_fast(payload: bytes, mask: bytes) -> bytes:
    n = len(payload)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    return (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big")


def open_socket(port: int, rcvbuf: int | None = None, timeout: float = 10.0) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: it bounds the TCP window
    s.settimeout(timeout)
    s.connect(("127.0.0.1", port))
    return s


def handshake(port: int, *, path: str = "/ws", headers: dict[str, str] | None = None,
              subprotocol: str | None = "rtws.v1.msgpack", rcvbuf: int | None = None,
              timeout: float = 10.0) -> tuple[socket.socket, int, bytes]:
    """Open a socket and send a WebSocket upgrade. Returns (socket, HTTP status, bytes read past the headers)."""
    headers = dict(headers or {})
    s = open_socket(port, rcvbuf, timeout)
    key = base64.b64encode(os.urandom(16)).decode()
    host = (headers or {}).pop("Host", f"127.0.0.1:{port}")
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if subprotocol:
        lines.append(f"Sec-WebSocket-Protocol: {subprotocol}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(4096)
        if not chunk:
            break
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return s, status, rest


class FrameReader:
    """Reads server frames (unmasked) from a raw socket."""

    def __init__(self, sock: socket.socket, initial: bytes = b"") -> None:
        self.sock = sock
        self.buf = initial
        self.closed_code: int | None = None
        self.eof = False

    def _fill(self, deadline: float) -> bool:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            chunk = self.sock.recv(65536)
        except (TimeoutError, socket.timeout):
            return False
        except OSError:
            self.eof = True
            return False
        if not chunk:
            self.eof = True
            return False
        self.buf += chunk
        return True

    def frame(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """(opcode, payload) of the next frame, or None on timeout/EOF."""
        deadline = time.monotonic() + timeout
        while True:
            parsed = self._parse()
            if parsed is not None:
                op, payload = parsed
                if op == OP_CLOSE:
                    self.closed_code = struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                return parsed
            if self.eof or time.monotonic() >= deadline or not self._fill(deadline):
                if self.eof or time.monotonic() >= deadline:
                    return None

    def _parse(self) -> tuple[int, bytes] | None:
        b = self.buf
        if len(b) < 2:
            return None
        op, n = b[0] & 0x0F, b[1] & 0x7F
        off = 2
        if n == 126:
            if len(b) < 4:
                return None
            n, off = struct.unpack("!H", b[2:4])[0], 4
        elif n == 127:
            if len(b) < 10:
                return None
            n, off = struct.unpack("!Q", b[2:10])[0], 10
        if len(b) < off + n:
            return None
        self.buf = b[off + n:]
        return op, b[off:off + n]

    def frames_until(self, pred: Any, timeout: float = 30.0) -> list[Any]:
        """Decoded msgpack/JSON data frames until ``pred(frame)`` is true (inclusive) or the socket ends."""
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = self.frame(deadline - time.monotonic())
            if f is None:
                break
            op, payload = f
            if op == OP_BINARY:
                out.append(msgspec.msgpack.decode(payload))
            elif op == OP_TEXT:
                out.append(msgspec.json.decode(payload))
            elif op == OP_CLOSE:
                break
            else:
                continue
            if pred(out[-1]):
                break
        return out

    def wait_closed(self, timeout: float) -> bool:
        """Drain frames until the server closes (close frame or EOF/reset). True if it did within ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            f = self.frame(deadline - time.monotonic())
            if f is None:
                if self.eof:
                    return True
                continue
            if f[0] == OP_CLOSE:
                return True
        return False


def send_msgpack(sock: socket.socket, obj: Any) -> None:
    sock.sendall(client_frame(OP_BINARY, msgspec.msgpack.encode(obj)))


def send_text(sock: socket.socket, text: str) -> None:
    sock.sendall(client_frame(OP_TEXT, text.encode()))


def rss_mib() -> float:
    """This process's resident set (the in-thread test server lives here)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0
