"""Small ASGI HTTP helpers: JSON responses, bounded body reads, error bodies. No framework.

Error statuses come from the one code table, :data:`rtws.errors.STATUS_FOR_CODE`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

from ..errors import status_for

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_json = msgspec.json.Encoder()


class BodyTooLarge(Exception):
    pass


class BodyTimeout(Exception):
    """The request body did not arrive in time (a slowloris body)."""


def header(scope: Scope, name: bytes) -> str | None:
    """First value of a request header (lower-case ``name``), decoded as latin-1."""
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")  # type: ignore[no-any-return]
    return None


def bearer_token(scope: Scope) -> str | None:
    value = header(scope, b"authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else ""


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


async def read_body(receive: Receive, limit: int, timeout: float | None = None) -> bytes:
    """Read the whole request body; raise :class:`BodyTooLarge` past ``limit`` bytes, :class:`BodyTimeout` when
    it is not complete within ``timeout`` seconds (one deadline for the whole body, however it is trickled)."""
    if timeout is None:
        return await _read_body(receive, limit)
    import asyncio

    try:
        async with asyncio.timeout(timeout):
            return await _read_body(receive, limit)
    except TimeoutError:
        raise BodyTimeout() from None


async def _read_body(receive: Receive, limit: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ConnectionResetError("client disconnected")
        chunk = msg.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge()
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


async def send_bytes(send: Send, status: int, body: bytes, content_type: str,
                     headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                    *(headers or [])],
    })
    await send({"type": "http.response.body", "body": body})


async def send_json(send: Send, status: int, obj: Any, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    await send_bytes(send, status, _json.encode(obj), "application/json", headers)


async def send_error(send: Send, code: str, message: str, status: int | None = None,
                     headers: list[tuple[bytes, bytes]] | None = None, **extra: Any) -> None:
    """``{"error": {"code", "message", ...}}`` with the status that matches ``code``."""
    body = {"error": {"code": code, "message": message, **extra}}
    await send_json(send, status or status_for(code), body, headers)
