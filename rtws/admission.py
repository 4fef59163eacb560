"""One way in: every generation request, from any transport, is admitted here.

Pure: no torch, no asyncio, no server code. A transport adapter (the WebSocket
:class:`~rtws.session.Session`, and through it the Realtime edge; ``POST
/infer``; the OpenAI routes) decodes and validates its own wire format, turns
it into a :class:`RequestLike` (a ``generate`` frame and an ``/infer`` body are
one as decoded; the OpenAI routes build a :class:`Request`), and calls
:meth:`Admission.admit`. That runs the
checks in one order, the same for every transport:

1. ``max_tokens`` within the server's limit (``invalid_params``);
2. the model exists (``unknown_model``);
3. capacity, when the transport counts it per request (HTTP: ``overloaded``, ``Retry-After``);
4. the prompt can fit, by length, before any tokenizing (``invalid_params``);
5. the rate limit (``rate_limited``, ``retry_after``);
6. the transport's own checks, if any (WebSocket conversations), given as ``extra``;
7. the per-client generation quota (``too_many_generations``).

A refusal raises :class:`AdmissionError` (an :class:`~rtws.errors.RtwsError`
with the ``hooks.rejected`` label in ``metric``); the adapter renders it once,
in its own shape. An admitted request is an :class:`Admitted`: the model, the
:class:`~rtws.generation.SamplingParams` (a random seed when none was given),
the quota key to :meth:`Admission.release` when the generation ends, and a
:class:`RecordTemplate` for its :class:`~rtws.hooks.GenerationRecord`. Token
ids come from :func:`encoder` (run it off the event loop: tokenizers and chat
templates block), and the engine deadline from :func:`deadline`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .errors import RtwsError
from .generation import SamplingParams
from .hooks import GenerationRecord
from .limits import ClientQuota, RateLimiter
from .protocol import DEFAULT_CHARS_PER_TOKEN, Message, check_prompt_chars


class AdmissionError(RtwsError):
    """A request refused by :meth:`Admission.admit`. ``metric`` is the label ``hooks.rejected()`` gets."""

    def __init__(self, code: str, message: str, *, retry_after: float | None = None,
                 metric: str | None = None) -> None:
        super().__init__(code, message, retry_after=retry_after)
        self.metric = metric or code


class ModelLookup(Protocol):
    def get(self, name: str | None) -> Any: ...


@dataclass(frozen=True, slots=True)
class Request:
    """A validated generation request built by a transport whose wire fields differ (OpenAI). The WebSocket
    ``generate`` frame and the ``/infer`` body are :class:`RequestLike` as decoded (bounds checked by msgspec)."""

    model: str | None
    prompt: str | None
    messages: list[dict[str, Any]] | None
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    priority: str = "normal"
    ignore_eos: bool = False  # OpenAI extension; the WebSocket frame and /infer have no such field


class RequestLike(Protocol):
    """What admission reads from a request: a ``protocol.Generate`` frame, an ``/infer`` body and a
    :class:`Request` all have these fields, so the WebSocket and ``/infer`` are admitted as decoded."""

    @property
    def model(self) -> str | None: ...
    @property
    def prompt(self) -> str | None: ...
    @property
    def messages(self) -> Sequence[Message] | Sequence[dict[str, Any]] | None: ...
    @property
    def max_tokens(self) -> int: ...
    @property
    def temperature(self) -> float: ...
    @property
    def top_p(self) -> float: ...
    @property
    def top_k(self) -> int: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def stop(self) -> str | Sequence[str]: ...
    @property
    def priority(self) -> str: ...


def message_dicts(messages: Iterable[Message | dict[str, Any]]) -> list[dict[str, Any]]:
    """Chat turns as the dicts chat templates take (``name`` only when set); dicts pass as they are."""
    return [m if isinstance(m, dict) else {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})}
            for m in messages]


def sampling(req: RequestLike) -> SamplingParams:
    """The engine's sampling parameters for ``req``; a random 63-bit seed when the client sent none."""
    stop = req.stop
    return SamplingParams(max_tokens=req.max_tokens, temperature=req.temperature, top_p=req.top_p, top_k=req.top_k,
                          seed=req.seed if req.seed is not None else secrets.randbits(63),
                          stop=(stop,) if isinstance(stop, str) else tuple(stop),
                          ignore_eos=bool(getattr(req, "ignore_eos", False)))


def deadline(started: float, request_timeout: float | None) -> float | None:
    """The engine deadline (monotonic seconds) of a generation that started at ``started``; None: no timeout."""
    return started + request_timeout if request_timeout else None


def encoder(model: Any, req: RequestLike) -> Callable[[], list[int]]:
    """A blocking call returning ``req``'s prompt token ids (raises ``ValueError`` for a prompt the model
    refuses: too long, no chat template, a template failure). Run it in the tokenizer thread (the chat turns
    become dicts there too, off the event loop)."""
    prompt, messages = req.prompt, req.messages

    def work() -> list[int]:
        ids: list[int] = model.encode(prompt, None if messages is None else message_dicts(messages))
        return ids

    return work


@dataclass(frozen=True, slots=True)
class RecordTemplate:
    """What a :class:`~rtws.hooks.GenerationRecord` knows at admission; :meth:`finish` adds the outcome."""

    id: Any
    model: str
    version: str
    client: str
    session: str
    transport: str

    def finish(self, *, request_id: int, reason: str, prompt_tokens: int, completion_tokens: int, started: float,
               first_at: float | None, now: float, queue_s: float | None) -> GenerationRecord:
        return GenerationRecord(
            id=self.id, request_id=request_id, model=self.model, version=self.version, client=self.client,
            session=self.session, transport=self.transport, reason=reason, prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens, ttft_s=None if first_at is None else round(first_at - started, 6),
            total_s=round(now - started, 6), queue_s=queue_s)


def record_template(model: Any, id: Any, *, client: str, session: str, transport: str) -> RecordTemplate:
    return RecordTemplate(id=id, model=model.name, version=str(getattr(model, "version", "")), client=client,
                          session=session, transport=transport)


@dataclass(slots=True)
class Admitted:
    """A request past every check: submit ``params`` to ``model.engine`` with the encoded prompt."""

    request: RequestLike
    model: Any
    params: SamplingParams
    quota_key: str | None  # counted in the ClientQuota until Admission.release


@dataclass(frozen=True, slots=True)
class Front:
    """How one transport words its refusals (the codes and the order are the same everywhere)."""

    unknown_model_hint: str = ""  # appended to "unknown model 'x'" (HTTP: where to list the models)
    no_model: str | None = None  # the message when no model was named and none is loaded (None: as unknown)


WS_FRONT = Front()
HTTP_FRONT = Front(unknown_model_hint="; see GET /v1/models", no_model="no model is loaded")


class Admission:
    """The server's admission policy: limits, the rate limiter and the per-client quota. One per app."""

    def __init__(self, models: ModelLookup, *, max_tokens: int, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN,
                 rate_limiter: RateLimiter | None = None, quota: ClientQuota | None = None) -> None:
        self.models = models
        self.max_tokens = max_tokens
        self.chars_per_token = chars_per_token
        self.rate_limiter = rate_limiter
        self.quota = quota if quota is not None and quota.max_generations is not None else None

    def admit(self, req: RequestLike, key: str, *, front: Front = WS_FRONT, at_capacity: bool = False,
              extra: Callable[[Any], None] | None = None) -> Admitted:
        """Run the checks (module docstring) for the client ``key``. Raises :class:`AdmissionError`
        (or whatever ``extra`` raises, before the quota is taken). Synchronous: no await between the checks."""
        if req.max_tokens > self.max_tokens:
            raise AdmissionError("invalid_params", f"max_tokens must be <= {self.max_tokens}")
        model = self.models.get(req.model)
        if model is None:
            if req.model is None and front.no_model is not None:
                raise AdmissionError("unknown_model", front.no_model)
            raise AdmissionError("unknown_model", f"unknown model {str(req.model)[:64]!r}{front.unknown_model_hint}")
        if at_capacity:
            raise AdmissionError("overloaded", "too many open connections and streams; retry later", retry_after=1.0,
                                 metric="max_connections")
        max_prompt = getattr(model, "max_prompt_tokens", None)
        if isinstance(max_prompt, int):  # refused by length before any tokenizing: a 1 MiB prompt costs nothing
            too_long = check_prompt_chars(req.prompt, req.messages, max_prompt, self.chars_per_token)
            if too_long is not None:
                raise AdmissionError("invalid_params", too_long)
        if self.rate_limiter is not None:
            wait = self.rate_limiter.acquire(key)
            if wait > 0:
                raise AdmissionError("rate_limited", f"rate limit exceeded; retry in {wait:.2f} s", retry_after=wait)
        if extra is not None:
            extra(model)
        quota_key: str | None = None
        if self.quota is not None:
            over = self.quota.start_generation(key)
            if over is not None:
                raise AdmissionError("too_many_generations", over, retry_after=1.0)
            quota_key = key
        return Admitted(request=req, model=model, params=sampling(req), quota_key=quota_key)

    def release(self, quota_key: str | None) -> None:
        """The generation admitted under ``quota_key`` ended (or never started): give its quota back."""
        if quota_key is not None and self.quota is not None:
            self.quota.end_generation(quota_key)
