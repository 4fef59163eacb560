"""What a generation is, shared by every front end and the engine: torch-free, asyncio-free.

:class:`SamplingParams` is what a request asks for, :class:`TokenEvent` is
what one engine step produced for one generation, and :data:`FinishReason`
names how a generation can end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

FinishReason: TypeAlias = Literal["stop", "length", "cancelled", "error", "timeout"]


@dataclass(slots=True)
class SamplingParams:
    """Per-request sampling. ``temperature == 0`` means greedy."""

    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False


@dataclass(slots=True)
class TokenEvent:
    """What one step produced for one generation, delivered on the event loop.

    ``tokens`` counts the generated tokens this event accounts for (some
    tokens produce no text yet: an incomplete UTF-8 character, a possible stop
    string). ``finish`` is set on the generation's last event, which also
    carries ``cached_tokens``: how many prompt tokens the prefix cache supplied
    (computed by an earlier request, not by this one).
    """

    rid: int
    text: str
    tokens: int
    finish: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_s: float | None = None
    queue_s: float | None = None
    error: str | None = None
    token_ids: list[int] | None = None
    cached_tokens: int | None = None
