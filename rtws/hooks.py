"""Observation points for metrics and logs. The default implementation does nothing.

The app holds one ``Hooks`` object; sessions, HTTP handlers and engines call
it. ``rtws.metrics`` provides the Prometheus implementation. Pure: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class GenerationRecord:
    """One finished generation, as logged and measured (times in seconds)."""

    id: Any
    request_id: int
    model: str
    version: str
    client: str
    session: str
    transport: str  # "ws" or "http"
    reason: str
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float | None
    total_s: float
    queue_s: float | None = None


class Hooks:
    """Override what you need. Called on the event loop, except ``step_observer`` (engine thread)."""

    step_observer: Any = None

    def connection(self, delta: int) -> None:
        """A WebSocket opened (+1) or closed (-1)."""

    def generation_started(self, model: str, transport: str) -> None: ...

    def first_token(self, model: str, ttft_s: float) -> None: ...

    def generation_finished(self, rec: GenerationRecord) -> None: ...

    def rejected(self, code: str) -> None:
        """A request, frame or connection refused (error code or limit name)."""

    def frame_sent(self, nbytes: int, tokens: int) -> None: ...

    def paused(self, reason: str) -> None:
        """A session's generations paused for backpressure."""

    def resumed(self, nbytes: int) -> None:
        """A held session was resumed; ``nbytes`` of retained frames are being replayed."""

    def resume_failed(self, reason: str) -> None:
        """A ``hello {resume}`` was refused (``rtws.session_store.REASONS``)."""

    def session_expired(self) -> None:
        """A session held without a socket ended unresumed (window passed, or drain)."""
