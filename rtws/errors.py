"""The one exception tree of rtws, and the one table from error code to HTTP status.

Pure: no I/O, no torch. Every refusal rtws answers a client with is an
:class:`RtwsError` carrying the wire ``code`` (``docs/protocol.md``,
``docs/http.md``), a client-safe ``message``, the HTTP ``status`` that code
maps to, and ``retry_after`` seconds when retrying later can succeed::

    RtwsError
    ├── ProtocolError        (rtws.protocol)       a frame or request answered with an ``error`` frame
    ├── AdmissionError       (rtws.admission)      a request refused by the one admission path
    ├── Rejection            (rtws.http.errors)    an HTTP request refused before it reached an engine
    ├── RegistryError        (rtws.registry)       an admin registry operation refused
    │   └── SwapError                              loading or warming a new version failed
    └── ConversationError    (rtws.conversations)  a conversation store refusal (also a ValueError)

Each transport renders these in one place: the WebSocket session as an
``error`` frame, the HTTP routes as an error body (rtws's or OpenAI's shape),
the Realtime edge as an ``error`` event. A bug (any other exception) is never
rendered with its text: it is logged and answered with code ``internal``.
"""

from __future__ import annotations

from typing import Final

# Wire code -> HTTP status. The only such table: the WebSocket upgrade refusals, /infer, the OpenAI routes and the
# admin API all read it (a code not listed is a client error, 400).
STATUS_FOR_CODE: Final[dict[str, int]] = {
    "bad_frame": 400,
    "bad_request": 400,
    "invalid_params": 400,
    "unknown_type": 400,
    "duplicate_id": 409,
    "conflict": 409,
    "unknown_id": 404,
    "unauthorized": 401,
    "forbidden": 403,
    "unknown_model": 404,
    "not_found": 404,
    "method_not_allowed": 405,
    "request_timeout": 408,
    "payload_too_large": 413,
    "bad_host": 421,
    "load_failed": 422,
    "too_many_generations": 429,
    "rate_limited": 429,
    "internal": 500,
    "overloaded": 503,
}


def status_for(code: str) -> int:
    """The HTTP status for a wire error ``code`` (400 for a code the table does not list)."""
    return STATUS_FOR_CODE.get(code, 400)


class RtwsError(Exception):
    """A refusal with a wire ``code`` and a client-safe ``message``.

    ``http_status`` is ``status`` when given, else :func:`status_for` ``(code)`` (named so that it cannot
    clash with a subclass's own ``status``, such as :class:`~rtws.registry.SwapError`'s version status);
    ``retry_after`` (seconds) is set when the same request can succeed later (rate limits, capacity, draining).
    """

    def __init__(self, code: str, message: str, *, status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.http_status = status if status is not None else status_for(code)
        self.retry_after = retry_after
