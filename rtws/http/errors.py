"""HTTP refusals: :class:`Rejection`, the :class:`~rtws.errors.RtwsError` an HTTP route answers before any engine
work, and :class:`ClientGone`, the end of a response whose client left."""

from __future__ import annotations

import math
import re

from ..admission import AdmissionError
from ..errors import RtwsError

_PARAM_AT = re.compile(r"at `\$\.([A-Za-z_][A-Za-z0-9_]*)|^([a-z_]+) must be ")


def param_of(message: str) -> str | None:
    """The top-level field a message names (msgspec's ``... - at `$.max_tokens```, or ``max_tokens must be``)."""
    m = _PARAM_AT.search(message)
    return (m.group(1) or m.group(2)) if m else None


class Rejection(RtwsError):
    """A request refused before it reached the engine: becomes an error response with ``code``.

    ``metric`` is the label ``hooks.rejected()`` gets (default ``code``); ``close`` says the request body was
    left unread, so the connection cannot be reused; ``param`` is the request field at fault (OpenAI's "param").
    """

    def __init__(self, code: str, message: str, *, retry_after: float | None = None,
                 metric: str | None = None, close: bool = False, param: str | None = None,
                 status: int | None = None) -> None:
        super().__init__(code, message, status=status, retry_after=retry_after)
        self.param = param or param_of(message)
        self.metric = metric or code
        self.close = close

    @classmethod
    def of(cls, exc: RtwsError) -> Rejection:
        """``exc`` as a Rejection (the same code, message, status and retry_after)."""
        if isinstance(exc, Rejection):
            return exc
        return cls(exc.code, exc.message, retry_after=exc.retry_after, status=exc.http_status,
                   metric=exc.metric if isinstance(exc, AdmissionError) else None)

    def headers(self) -> list[tuple[bytes, bytes]]:
        out: list[tuple[bytes, bytes]] = []
        if self.retry_after is not None:
            out.append((b"retry-after", str(max(1, math.ceil(self.retry_after))).encode()))
        if self.http_status == 401:
            out.append((b"www-authenticate", b'Bearer realm="rtws"'))
        if self.close:
            out.append((b"connection", b"close"))
        return out


class ClientGone(Exception):
    """The HTTP client disconnected, or stopped reading for longer than the stall timeout."""
