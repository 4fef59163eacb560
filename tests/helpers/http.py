"""HTTP client helpers for the integration tests: one request per fresh connection, and an SSE parser."""

from __future__ import annotations

import http.client
from typing import Any
from urllib.parse import urlsplit

import msgspec
from tests.helpers.server import UNIT


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return msgspec.json.decode(self.body)

    def events(self) -> list[tuple[str, str]]:
        return parse_sse(self.body)


def connect(base: str, timeout: float = 10 * UNIT) -> http.client.HTTPConnection:
    u = urlsplit(base)
    return http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port, timeout=timeout)


def post(base: str, path: str, body: Any, headers: dict[str, str] | None = None,
         timeout: float = 10 * UNIT, chunked: bool = False) -> Response:
    """One request on a fresh connection; ``body`` is bytes, an iterable of bytes (chunked) or JSON-able."""
    conn = connect(base, timeout)
    hdrs = {"content-type": "application/json", **(headers or {})}
    data: Any = body if isinstance(body, bytes) or chunked else msgspec.json.encode(body)
    try:
        conn.request("POST", path, body=data, headers=hdrs, encode_chunked=chunked)
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def get(base: str, path: str, headers: dict[str, str] | None = None) -> Response:
    conn = connect(base)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


def parse_sse(raw: bytes) -> list[tuple[str, str]]:
    """(event, data) per SSE event; comments are skipped. Asserts the framing: LF line ends, blank-line separated."""
    text = raw.decode("utf-8")
    assert "\r" not in text
    assert text.endswith("\n\n"), text[-80:]
    out = []
    for block in text.split("\n\n")[:-1]:
        event, data = "message", []
        for line in block.split("\n"):
            if line.startswith(":"):
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "event":
                event = value
            elif key == "data":
                data.append(value)
            else:
                raise AssertionError(f"unexpected SSE line {line!r}")
        if data:
            out.append((event, "\n".join(data)))
    return out
