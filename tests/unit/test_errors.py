"""The one error tree and code->status table, and the HTTP error boundary once a response has started."""

from __future__ import annotations

import asyncio
from typing import Any

from rtws.app import App
from rtws.config import ServerConfig
from rtws.conversations import ConversationError
from rtws.errors import STATUS_FOR_CODE, RtwsError, status_for
from rtws.http.errors import Rejection
from rtws.protocol import ErrorCode, ProtocolError
from rtws.registry import RegistryError, SwapError


def test_every_refusal_is_an_rtws_error_with_the_table_status() -> None:
    for exc in (ProtocolError(ErrorCode.RATE_LIMITED, "slow down", "g", retry_after=1.5),
                Rejection("payload_too_large", "too big"), RegistryError("conflict", "exists"),
                ConversationError("unknown_id", "no item")):
        assert isinstance(exc, RtwsError)
        assert exc.http_status == STATUS_FOR_CODE[exc.code]
    assert issubclass(SwapError, RegistryError)
    assert isinstance(ConversationError("invalid_params", "x"), ValueError)
    assert status_for("no_such_code") == 400


def test_protocol_error_keeps_its_enum_code_and_renders_retry_after() -> None:
    exc = ProtocolError(ErrorCode.RATE_LIMITED, "slow down", "g", retry_after=1.23456)
    assert exc.code is ErrorCode.RATE_LIMITED
    frame = exc.to_frame()
    assert (frame.code, frame.id, frame.retry_after) == ("rate_limited", "g", 1.235)
    assert ProtocolError(ErrorCode.BAD_FRAME, "x").to_frame().retry_after is None


def test_rejection_headers_and_param() -> None:
    r = Rejection("rate_limited", "max_tokens must be <= 5", retry_after=0.2, close=True)
    assert r.param == "max_tokens" and r.metric == "rate_limited"
    assert (b"retry-after", b"1") in r.headers() and (b"connection", b"close") in r.headers()
    assert Rejection.of(RegistryError("conflict", "x")).http_status == 409


def _call(app: App, path: str) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "client": ("127.0.0.1", 1)}
    asyncio.run(app(scope, receive, send))
    return sent


def test_a_handler_failing_before_its_response_gets_a_500() -> None:
    app = App(ServerConfig())

    async def broken(scope: Any, receive: Any, send: Any) -> None:
        raise RuntimeError("bug")

    app.route("GET", "/broken", broken)
    sent = _call(app, "/broken")
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[0]["status"] == 500 and b"bug" not in sent[1]["body"]


def test_a_handler_failing_mid_response_never_sends_a_second_status_line() -> None:
    app = App(ServerConfig())

    async def half(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        raise RuntimeError("bug")

    app.route("GET", "/half", half)
    sent = _call(app, "/half")
    assert [m["type"] for m in sent].count("http.response.start") == 1
    assert sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}  # no transport: body ends
