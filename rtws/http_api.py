"""HTTP APIs on the shared engines: ``POST /infer`` and the OpenAI-compatible ``/v1/*`` routes.

Every request passes the same admission steps as a WebSocket ``generate``, in
this order: draining (503), API key (401), body size (413), JSON and
parameter validation (400), model (404), capacity (503), rate limit (429,
``Retry-After``), prompt (400). An admitted request becomes one
:class:`HttpGeneration`: the engine's events are coalesced into chunks for the
response writer, and a watcher task reads the request's ``receive`` channel so
that ``http.disconnect`` cancels the generation in the engine at once (the slot
is free at the next step boundary). A reader that takes no data for
``stall_timeout_s`` is dropped the same way; one that reads slowly pauses only
its own generation (``send_high_watermark``).

The request and response formats are documented in ``docs/http.md``.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

import msgspec

from . import protocol
from .admission import HTTP_FRONT, AdmissionError, Request, deadline, encoder, record_template, request_of
from .generation import SamplingParams, TokenEvent
from .http.asgi import (
    BodyTimeout,
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    client_address,
    header,
    read_body,
    send_error,
    send_json,
)
from .http.errors import ClientGone, Rejection
from .transport import abort_http

if TYPE_CHECKING:
    from .app import App

log = logging.getLogger("rtws.http_api")

KEEPALIVE_S: Final = 15.0  # an SSE comment this often while a stream waits, so proxies keep it open

# --------------------------------------------------------------------------- request bodies
#
# The constraints are protocol.Generate's (tests/test_http_api.py checks that
# they stay identical), so a request is valid over HTTP exactly when it would be
# valid over the WebSocket.

MaxTokens = protocol.MaxTokens
Temperature = protocol.Temperature
TopP = protocol.TopP
TopK = protocol.TopK
Seed = protocol.Seed
StopString = protocol.StopString
StopList = protocol.StopList
Role = protocol.Role
Name = protocol.Name


class InferRequest(msgspec.Struct, frozen=True):
    """``POST /infer``: a protocol ``generate`` frame without ``type``/``id``, plus ``stream``."""

    prompt: str | None = None
    messages: protocol.Messages | None = None
    model: protocol.ModelName | None = None
    max_tokens: MaxTokens = 128
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    stop: StopString | StopList = []
    priority: protocol.Priority = "normal"
    stream: bool = True


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool | None = None


class _OpenAIRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Fields both OpenAI endpoints share. Unknown fields are ignored; known ones we cannot honour are refused."""

    model: str | None = None
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None  # extension (as in vLLM)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: StopString | StopList | None = None
    seed: Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    priority: protocol.Priority = "normal"  # extension: the rtws priority class


class CompletionRequest(_OpenAIRequest, frozen=True, kw_only=True):
    prompt: str | list[Any]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, frozen=True):
    role: Role
    content: str | list[ContentPart] | None = None
    name: Name | None = None


class ResponseFormat(msgspec.Struct, frozen=True):
    type: str


class ChatRequest(_OpenAIRequest, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=protocol.MAX_MESSAGES)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None


# --------------------------------------------------------------------------- response bodies


class UsageOut(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int


class InferDelta(msgspec.Struct, frozen=True):
    text: str
    tokens: int


class InferDone(msgspec.Struct, frozen=True, omit_defaults=True):
    reason: str
    usage: UsageOut
    model: str
    error: str | None = None


class InferResult(msgspec.Struct, frozen=True):
    text: str
    reason: str
    usage: UsageOut
    model: str


class PromptTokensDetails(msgspec.Struct, frozen=True):
    cached_tokens: int = 0


class OpenAIUsage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(msgspec.Struct, frozen=True):
    text: str
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class Completion(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: OpenAIUsage | None = None


class ChatMessageOut(msgspec.Struct, frozen=True):
    role: str
    content: str


class ChatChoice(msgspec.Struct, frozen=True):
    message: ChatMessageOut
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletion(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChoice]
    system_fingerprint: str | None = None
    usage: OpenAIUsage | None = None


class ChatDelta(msgspec.Struct, frozen=True, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct, frozen=True):
    delta: ChatDelta
    index: int = 0
    logprobs: None = None
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    object: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    system_fingerprint: str | None = None
    usage: OpenAIUsage | None = None


class ModelCard(msgspec.Struct, frozen=True):
    """One ``/v1/models`` entry: OpenAI's fields, then rtws's health fields."""

    id: str
    object: str
    created: int
    owned_by: str
    version: str
    ready: bool
    status: str
    default: bool
    device: str | None
    context_length: int | None
    max_prompt_tokens: int | None
    running: int
    waiting: int
    quantization: str | None = None  # none, int8, int4, or a pre-quantized checkpoint's method (gptq, ...)
    dtype: str | None = None


class ModelList(msgspec.Struct, frozen=True):
    object: str
    data: list[ModelCard]


class OpenAIErrorDetail(msgspec.Struct, frozen=True):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIError(msgspec.Struct, frozen=True):
    error: OpenAIErrorDetail


_encode = msgspec.json.Encoder().encode
_INFER: Final = msgspec.json.Decoder(InferRequest)
_COMPLETION: Final = msgspec.json.Decoder(CompletionRequest)
_CHAT: Final = msgspec.json.Decoder(ChatRequest)

# rtws finish reasons in OpenAI's vocabulary: anything cut short by a server
# limit (a timeout, a drain) reads as "length"; "error" never becomes a
# finish_reason (it is an error response or an error event instead).
OPENAI_FINISH: Final = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "length"}

_OPENAI_TYPE: Final = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                       413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                       503: "service_unavailable"}


# --------------------------------------------------------------------------- one generation


@dataclass(slots=True)
class Chunk:
    """What a generation produced since the writer last asked, coalesced."""

    text: str
    tokens: int
    finish: str | None = None
    error: str | None = None


class HttpGeneration:
    """One admitted HTTP generation: engine events in, :class:`Chunk` s out, cancelled if the client goes.

    Create, :meth:`start`, then call :meth:`next` until a chunk has ``finish``
    set (call :meth:`end` with it) or :class:`ClientGone` is raised; always
    :meth:`close` in a ``finally``. While it runs it is counted in
    ``app.num_http_streams`` (so drains wait for it and ``max_connections``
    counts it).
    """

    def __init__(self, api: HttpApi, scope: Scope, receive: Receive, model: Any, prompt_ids: list[int],
                 params: SamplingParams, priority: str, request_id: str) -> None:
        self.api = api
        self.app = api.app
        self.model = model
        self.engine = model.engine
        self.prompt_ids = prompt_ids
        self.params = params
        self.priority = priority
        self.request_id = request_id
        self.client = client_address(scope)
        self._receive = receive
        self.rid = 0
        self.started = 0.0
        self.first_at: float | None = None
        self.queue_s: float | None = None
        self.prompt_tokens = len(prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0
        self.reason: str | None = None  # set once, by end()
        self.quota_key: str | None = None  # counted in app.quota's generations until end()
        self.disconnected = False
        self._text: list[str] = []
        self._pending_chars = 0
        self._tokens = 0
        self._finish: str | None = None
        self._error: str | None = None
        self._engine_done = False
        self._paused = False
        self._wake = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Submit to the engine and start watching for a disconnect. Call on the loop, once."""
        cfg = self.app.config
        self.started = time.monotonic()
        self.rid = self.engine.submit(self.prompt_ids, self.params, self._on_event, priority=self.priority,
                                      deadline=deadline(self.started, cfg.request_timeout))
        self.app.num_http_streams += 1
        self.api.live.add(self)
        self.app.hooks.generation_started(self.model.name, "http")
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    def end(self, reason: str) -> None:
        """Record the outcome (first call wins), free the engine slot if it is still held, stop counting."""
        if self.reason is not None:
            return
        self.reason = reason
        self._stop_engine()
        self.app.admission.release(self.quota_key)
        self.quota_key = None
        self.app.num_http_streams -= 1
        self.api.live.discard(self)
        rec = record_template(self.model, self.request_id, client=self.client, session="", transport="http")
        self.app.hooks.generation_finished(rec.finish(
            request_id=self.rid, reason=reason, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, started=self.started, first_at=self.first_at,
            now=time.monotonic(), queue_s=self.queue_s))

    def close(self) -> None:
        """End as ``cancelled`` unless already ended, and stop the watcher. Idempotent."""
        self.end("cancelled")
        if self._watcher is not None:
            self._watcher.cancel()
            self._watcher = None

    def interrupt(self, reason: str = "cancelled") -> None:
        """Stop generating now; the writer's next chunk carries ``finish=reason`` (drain past its timeout)."""
        if self._finish is None and self.reason is None:
            self._stop_engine()
            self._finish = reason
            self._wake.set()

    def _stop_engine(self) -> None:
        if not self._engine_done:
            self._engine_done = True
            self.engine.cancel(self.rid)

    async def _watch(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass  # a body the handler already read; nothing else is expected
        except asyncio.CancelledError:
            raise
        except Exception:
            pass  # a receive channel that fails means the client is gone too
        self.disconnected = True
        self.end("cancelled")
        self._wake.set()

    # ------------------------------------------------------------------ engine side (on the loop)

    def _on_event(self, ev: TokenEvent) -> None:
        if self.reason is not None or self._finish is not None:
            return  # ended or interrupted: a step that was already on its way
        if ev.text:
            self._text.append(ev.text)
            self._pending_chars += len(ev.text)
        self._tokens += ev.tokens
        if ev.finish is not None:
            self._engine_done = True
            self._finish = ev.finish
            self._error = ev.error
            self.queue_s = ev.queue_s
            self.cached_tokens = ev.cached_tokens or 0
        elif not self._paused and self._pending_chars > self.app.config.send_high_watermark:
            self._paused = True  # the writer is behind: keep the slot, skip steps until it catches up
            self.engine.pause((self.rid,))
        self._wake.set()

    # ------------------------------------------------------------------ writer side

    async def next(self, keepalive: float | None = None) -> Chunk | None:
        """Everything produced since the last call, as one chunk (waits for something new).

        Returns None when ``keepalive`` seconds pass with nothing new. Raises
        :class:`ClientGone` once the client has disconnected.
        """
        while not (self._text or self._tokens or self._finish is not None):
            if self.disconnected:
                raise ClientGone()
            self._wake.clear()
            if keepalive is None:
                await self._wake.wait()
            else:
                try:
                    async with asyncio.timeout(keepalive):
                        await self._wake.wait()
                except TimeoutError:
                    return None
        if self.disconnected:
            raise ClientGone()
        chunk = Chunk("".join(self._text), self._tokens, self._finish, self._error)
        self._text.clear()
        self._pending_chars = 0
        self._tokens = 0
        if self._paused and not self._engine_done:
            self._paused = False
            self.engine.resume((self.rid,))
        self.completion_tokens += chunk.tokens
        if self.first_at is None and chunk.tokens:
            self.first_at = time.monotonic()
            self.app.hooks.first_token(self.model.name, self.first_at - self.started)
        return chunk

    async def collect(self) -> Chunk:
        """Wait for the end; return all the text and the finish reason in one chunk, and :meth:`end`."""
        parts: list[str] = []
        while True:
            chunk = await self.next()
            assert chunk is not None
            parts.append(chunk.text)
            if chunk.finish is not None:
                self.end(chunk.finish)
                return Chunk("".join(parts), self.completion_tokens, chunk.finish, chunk.error)

    @property
    def usage(self) -> UsageOut:
        return UsageOut(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens)


# --------------------------------------------------------------------------- the routes


class HttpApi:
    """The HTTP routes of one :class:`~rtws.app.App`. Created and mounted by :func:`mount`."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.live: set[HttpGeneration] = set()

    # ------------------------------------------------------------------ admission (shared)

    async def _read(self, scope: Scope, receive: Receive, decoder: msgspec.json.Decoder[Any]) -> Any:
        app = self.app
        if app.draining:
            raise Rejection("overloaded", "server is draining; retry on another replica or later",
                            retry_after=1.0, metric="draining", close=True)
        if not app.check_http_auth(scope):
            raise Rejection("unauthorized", "missing or invalid API key (send 'Authorization: Bearer <key>')",
                            close=True)
        limit = app.config.max_frame_bytes
        declared = header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise Rejection("payload_too_large", f"request body is larger than {limit} bytes", close=True)
        try:
            body = await read_body(receive, limit, timeout=app.config.body_timeout_s)
        except BodyTooLarge:
            raise Rejection("payload_too_large", f"request body is larger than {limit} bytes", close=True) from None
        except BodyTimeout:
            raise Rejection("request_timeout", f"request body not received within {app.config.body_timeout_s} s",
                            close=True) from None
        try:
            return decoder.decode(body)
        except msgspec.ValidationError as exc:
            if not body.lstrip().startswith(b"{"):
                raise Rejection("bad_request", "request body must be a JSON object") from None
            # msgspec names the field: "Expected `int`, got `str` - at `$.max_tokens`"
            raise Rejection("invalid_params", str(exc)) from None
        except (msgspec.DecodeError, RecursionError):
            raise Rejection("bad_request", "request body is not valid JSON") from None

    async def _admit(self, scope: Scope, receive: Receive, req: Request, request_id: str) -> HttpGeneration:
        """:meth:`rtws.admission.Admission.admit` (model, limits, capacity, prompt length, rate limit, quota);
        returns an unstarted generation. The checks run without an await; the request then counts in
        ``app.num_admitting`` while its prompt is tokenized in the tokenizer thread (never on the loop), so the
        capacity check stays exact."""
        app = self.app
        try:
            admitted = app.admission.admit(req, app.client_key(scope), front=HTTP_FRONT, at_capacity=app.at_capacity)
        except AdmissionError as exc:
            raise Rejection.of(exc) from None
        app.num_admitting += 1
        try:
            ids = await app.offload(encoder(admitted.model, req))
        except ValueError as exc:  # PromptError: too long, no chat template, template failure
            app.admission.release(admitted.quota_key)
            raise Rejection("invalid_params", str(exc)) from None
        except BaseException:
            app.admission.release(admitted.quota_key)
            raise
        finally:
            app.num_admitting -= 1
        gen = HttpGeneration(self, scope, receive, admitted.model, ids, admitted.params, req.priority, request_id)
        gen.quota_key = admitted.quota_key
        return gen

    # ------------------------------------------------------------------ writing

    async def _write(self, gen: HttpGeneration, send: Send, body: bytes, more: bool = True) -> None:
        """One body chunk, bounded by the stall timeout. Raises :class:`ClientGone` if it cannot be written."""
        try:
            async with asyncio.timeout(self.app.config.stall_timeout_s):
                await send({"type": "http.response.body", "body": body, "more_body": more})
        except TimeoutError:
            log.warning("dropping stalled HTTP reader", extra={"event": "stalled", "client": gen.client,
                                                               "request": gen.request_id})
            self.app.hooks.rejected("stalled")
            abort_http(send)
            raise ClientGone() from None
        except (OSError, RuntimeError):  # servers other than uvicorn raise once the peer is gone
            raise ClientGone() from None
        if gen.disconnected:
            raise ClientGone()

    @staticmethod
    async def _start_sse(send: Send, request_id: str) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), (b"x-request-id", request_id.encode())]})

    async def _run(self, gen: HttpGeneration, body: Callable[[], Awaitable[None]]) -> None:
        gen.start()
        try:
            await body()
        except ClientGone:
            pass
        finally:
            gen.close()

    # ------------------------------------------------------------------ POST /infer

    async def infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``POST /infer``: SSE by default, one JSON document with ``"stream": false``."""
        request_id = "infer-" + secrets.token_hex(12)
        try:
            req: InferRequest = await self._read(scope, receive, _INFER)
            problem = protocol.request_problem(req.prompt, req.messages, req.temperature, req.top_p)
            if problem is not None:
                raise Rejection("invalid_params", problem)
            gen = await self._admit(scope, receive, request_of(req), request_id)
        except Rejection as r:
            await self._reject(send, r)
            return
        except ConnectionResetError:
            return  # left while sending the body

        async def stream() -> None:
            await self._start_sse(send, request_id)
            name = gen.model.name
            while True:
                chunk = await gen.next(KEEPALIVE_S)
                if chunk is None:
                    await self._write(gen, send, b": keepalive\n\n")
                    continue
                out = b""
                if chunk.text or chunk.tokens:
                    out = b"data: " + _encode(InferDelta(text=chunk.text, tokens=chunk.tokens)) + b"\n\n"
                if chunk.finish is None:
                    await self._write(gen, send, out)
                    continue
                gen.end(chunk.finish)
                error = "generation failed (internal error)" if chunk.finish == "error" else None
                done = InferDone(reason=chunk.finish, usage=gen.usage, model=name, error=error)
                await self._write(gen, send, out + b"event: done\ndata: " + _encode(done) + b"\n\n", more=False)
                return

        async def single() -> None:
            result = await gen.collect()
            if result.finish == "error":
                await send_error(send, "internal", "generation failed (internal error)")
                return
            await send_json(send, 200, InferResult(text=result.text, reason=result.finish or "stop",
                                                   usage=gen.usage, model=gen.model.name),
                            [(b"x-request-id", request_id.encode())])

        await self._run(gen, stream if req.stream else single)

    async def _reject(self, send: Send, r: Rejection, openai: bool = False) -> None:
        self.app.hooks.rejected(r.metric)
        if openai:
            body = OpenAIError(OpenAIErrorDetail(message=r.message,
                                                 type=_OPENAI_TYPE.get(r.http_status, "server_error"),
                                                 param=r.param, code=r.code))
            await send_json(send, r.http_status, body, r.headers())
        elif r.retry_after is not None:
            await send_error(send, r.code, r.message, r.http_status, r.headers(), retry_after=round(r.retry_after, 3))
        else:
            await send_error(send, r.code, r.message, r.http_status, r.headers())

    # ------------------------------------------------------------------ OpenAI: shared

    def _openai_job(self, req: _OpenAIRequest, prompt: str | None, messages: list[dict[str, Any]] | None,
                    max_tokens: int | None) -> Request:
        if req.n not in (None, 1):
            raise Rejection("invalid_params", "only n=1 is supported", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(req, name) not in (None, 0, 0.0):
                raise Rejection("invalid_params", f"{name} is not supported (send 0 or omit it)", param=name)
        if req.logit_bias:
            raise Rejection("invalid_params", "logit_bias is not supported", param="logit_bias")
        if req.stream_options is not None and not req.stream:
            raise Rejection("invalid_params", "stream_options is only allowed when stream is true",
                            param="stream_options")
        temperature = 1.0 if req.temperature is None else req.temperature
        top_p = 1.0 if req.top_p is None else req.top_p
        problem = protocol.sampling_problem(temperature, top_p)
        if problem is not None:
            raise Rejection("invalid_params", problem)
        stop: tuple[str, ...] = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(
            req.stop)
        return Request(model=req.model, prompt=prompt, messages=messages,
                       max_tokens=max_tokens if max_tokens is not None else 16, temperature=temperature, top_p=top_p,
                       top_k=req.top_k or 0, seed=req.seed, stop=stop, priority=req.priority)

    @staticmethod
    def _usage(gen: HttpGeneration) -> OpenAIUsage:
        return OpenAIUsage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                           total_tokens=gen.prompt_tokens + gen.completion_tokens,
                           prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.cached_tokens))

    @staticmethod
    def _fingerprint(gen: HttpGeneration) -> str:
        return f"rtws-{gen.model.name}-{getattr(gen.model, 'version', '')}"[:128]

    async def _openai_error_event(self, gen: HttpGeneration, send: Send) -> None:
        err = OpenAIError(OpenAIErrorDetail(message="generation failed (internal error)", type="server_error",
                                            param=None, code="internal"))
        await self._write(gen, send, b"data: " + _encode(err) + b"\n\ndata: [DONE]\n\n", more=False)

    async def _openai_error_response(self, send: Send) -> None:
        await send_json(send, 500, OpenAIError(OpenAIErrorDetail(
            message="generation failed (internal error)", type="server_error", param=None, code="internal")))

    # ------------------------------------------------------------------ POST /v1/completions

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = "cmpl-" + secrets.token_hex(12)
        try:
            req: CompletionRequest = await self._read(scope, receive, _COMPLETION)
            prompt = req.prompt
            if isinstance(prompt, list):
                if len(prompt) != 1 or not isinstance(prompt[0], str):
                    raise Rejection("invalid_params",
                                    "prompt must be a string (or a list of one string); batched and token-id "
                                    "prompts are not supported")
                prompt = prompt[0]
            if req.echo:
                raise Rejection("invalid_params", "echo is not supported", param="echo")
            if req.logprobs:
                raise Rejection("invalid_params", "logprobs are not supported by rtws (omit logprobs or send 0)",
                                param="logprobs")
            if req.suffix:
                raise Rejection("invalid_params", "suffix is not supported", param="suffix")
            if req.best_of not in (None, 1):
                raise Rejection("invalid_params", "only best_of=1 is supported", param="best_of")
            request = self._openai_job(req, prompt, None, req.max_tokens)
            gen = await self._admit(scope, receive, request, request_id)
        except Rejection as r:
            await self._reject(send, r, openai=True)
            return
        except ConnectionResetError:
            return
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def completion(choices: list[CompletionChoice], usage: OpenAIUsage | None = None) -> bytes:
            return _encode(Completion(id=request_id, object="text_completion", created=created, model=gen.model.name,
                                      choices=choices, system_fingerprint=self._fingerprint(gen), usage=usage))

        async def stream() -> None:
            await self._start_sse(send, request_id)
            while True:
                chunk = await gen.next(KEEPALIVE_S)
                if chunk is None:
                    await self._write(gen, send, b": keepalive\n\n")
                    continue
                if chunk.finish is None:
                    if chunk.text:
                        await self._write(gen, send, b"data: " + completion([CompletionChoice(chunk.text)]) + b"\n\n")
                    continue
                gen.end(chunk.finish)
                if chunk.finish == "error":
                    await self._openai_error_event(gen, send)
                    return
                out = b"data: " + completion([CompletionChoice(chunk.text, finish_reason=OPENAI_FINISH[chunk.finish])])
                if include_usage:
                    out += b"\n\ndata: " + completion([], self._usage(gen))
                await self._write(gen, send, out + b"\n\ndata: [DONE]\n\n", more=False)
                return

        async def single() -> None:
            result = await gen.collect()
            if result.finish == "error":
                await self._openai_error_response(send)
                return
            body = completion([CompletionChoice(result.text, finish_reason=OPENAI_FINISH[result.finish or "stop"])],
                              self._usage(gen))
            await send_json_bytes(send, body, request_id)

        await self._run(gen, stream if req.stream else single)

    # ------------------------------------------------------------------ POST /v1/chat/completions

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = "chatcmpl-" + secrets.token_hex(12)
        try:
            req: ChatRequest = await self._read(scope, receive, _CHAT)
            if req.logprobs or req.top_logprobs:
                raise Rejection("invalid_params", "logprobs are not supported by rtws (omit logprobs and "
                                "top_logprobs, or send logprobs: false)",
                                param="logprobs" if req.logprobs else "top_logprobs")
            if req.tools or req.functions or req.tool_choice not in (None, "none", "auto"):
                raise Rejection("invalid_params", "tool and function calling are not supported",
                                param="tools" if req.tools else "functions" if req.functions else "tool_choice")
            if req.response_format is not None and req.response_format.type != "text":
                raise Rejection("invalid_params", "only response_format {\"type\": \"text\"} is supported",
                                param="response_format")
            messages = [_chat_message(m) for m in req.messages]
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if max_tokens is None:  # OpenAI's default for chat: as long as the context allows
                max_tokens = self.app.config.max_tokens_limit
            request = self._openai_job(req, None, messages, max_tokens)
            gen = await self._admit(scope, receive, request, request_id)
        except Rejection as r:
            await self._reject(send, r, openai=True)
            return
        except ConnectionResetError:
            return
        created = int(time.time())
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk_bytes(choices: list[ChatChunkChoice], usage: OpenAIUsage | None = None) -> bytes:
            return b"data: " + _encode(ChatCompletionChunk(
                id=request_id, object="chat.completion.chunk", created=created, model=gen.model.name,
                choices=choices, system_fingerprint=self._fingerprint(gen), usage=usage)) + b"\n\n"

        async def stream() -> None:
            await self._start_sse(send, request_id)
            await self._write(gen, send, chunk_bytes([ChatChunkChoice(ChatDelta(role="assistant", content=""))]))
            while True:
                chunk = await gen.next(KEEPALIVE_S)
                if chunk is None:
                    await self._write(gen, send, b": keepalive\n\n")
                    continue
                if chunk.finish is None:
                    if chunk.text:
                        await self._write(gen, send, chunk_bytes([ChatChunkChoice(ChatDelta(content=chunk.text))]))
                    continue
                gen.end(chunk.finish)
                if chunk.finish == "error":
                    await self._openai_error_event(gen, send)
                    return
                out = b""
                if chunk.text:
                    out += chunk_bytes([ChatChunkChoice(ChatDelta(content=chunk.text))])
                out += chunk_bytes([ChatChunkChoice(ChatDelta(), finish_reason=OPENAI_FINISH[chunk.finish])])
                if include_usage:
                    out += chunk_bytes([], self._usage(gen))
                await self._write(gen, send, out + b"data: [DONE]\n\n", more=False)
                return

        async def single() -> None:
            result = await gen.collect()
            if result.finish == "error":
                await self._openai_error_response(send)
                return
            body = _encode(ChatCompletion(
                id=request_id, object="chat.completion", created=created, model=gen.model.name,
                choices=[ChatChoice(ChatMessageOut(role="assistant", content=result.text),
                                    finish_reason=OPENAI_FINISH[result.finish or "stop"])],
                system_fingerprint=self._fingerprint(gen), usage=self._usage(gen)))
            await send_json_bytes(send, body, request_id)

        await self._run(gen, stream if req.stream else single)

    # ------------------------------------------------------------------ GET /v1/models

    def _health(self) -> dict[str, dict[str, Any]]:
        health = getattr(self.app.registry, "health", None)
        return {h["name"]: h for h in health()} if callable(health) else {}

    def _card(self, m: Any, health: dict[str, Any] | None = None) -> ModelCard:
        st = m.engine.stats()
        status = (health or {}).get("status", "warm" if getattr(m, "warm", True) else "loading")
        return ModelCard(
            id=m.name, object="model", created=int(getattr(m, "loaded_at", 0)), owned_by="rtws",
            version=str(getattr(m, "version", "")), ready=status == "warm" and not self.app.draining,
            status=status, default=m.name == self.app.registry.default_name, device=getattr(m, "device", None),
            context_length=getattr(m, "context_len", None), max_prompt_tokens=getattr(m, "max_prompt_tokens", None),
            running=st.running, waiting=st.waiting, **_weights_info(m))

    @staticmethod
    def _pending_card(h: dict[str, Any]) -> ModelCard:
        """A name that serves nothing yet (its first version loading, or failed)."""
        return ModelCard(id=h["name"], object="model", created=0, owned_by="rtws", version=str(h.get("version") or ""),
                         ready=False, status=str(h.get("status")), default=bool(h.get("default")), device=None,
                         context_length=None, max_prompt_tokens=None, running=0, waiting=0)

    async def list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/models``: every served model (and names still loading, ``ready: false``)."""
        if not self.app.check_http_auth(scope):
            await self._reject(send, Rejection("unauthorized", "missing or invalid API key"), openai=True)
            return
        health = self._health()
        served = self.app.registry.models()
        cards = [self._card(m, health.get(m.name)) for m in served]
        names = {m.name for m in served}
        cards += [self._pending_card(h) for name, h in health.items() if name not in names]
        await send_json(send, 200, ModelList(object="list", data=cards))

    async def get_model(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.app.check_http_auth(scope):
            await self._reject(send, Rejection("unauthorized", "missing or invalid API key"), openai=True)
            return
        name = scope["path"][len("/v1/models/"):]
        model = self.app.registry.get(name) if name else None
        health = self._health()
        if model is not None:
            await send_json(send, 200, self._card(model, health.get(name)))
        elif name in health:
            await send_json(send, 200, self._pending_card(health[name]))
        else:
            await self._reject(send, Rejection("unknown_model", f"unknown model {name[:64]!r}"), openai=True)

    # ------------------------------------------------------------------ drain

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /health`` as vLLM and TGI serve it (benchmark clients probe it): 200 with an empty body while
        serving, 503 while draining or before the models are up. ``/healthz`` and ``/readyz`` stay."""
        from .http.asgi import send_bytes

        app = self.app
        if app.draining or not app.started:
            await send_json(send, 503, {"status": "draining" if app.draining else "starting"})
            return
        await send_bytes(send, 200, b"", "application/json")

    def interrupt_all(self, reason: str = "cancelled") -> int:
        """End every live HTTP generation now with ``reason`` (each response still completes). Returns how many."""
        live = list(self.live)
        for gen in live:
            gen.interrupt(reason)
        return len(live)


def _weights_info(m: Any) -> dict[str, Any]:
    """``quantization`` and ``dtype`` of a served model for its ``/v1/models`` card (None when unknown)."""
    model = getattr(m, "model", None)
    if model is None:
        return {}
    from .quant import describe

    return {"quantization": describe(model, getattr(m, "spec", None)),
            "dtype": str(getattr(model, "dtype", "")).removeprefix("torch.") or None}


def _chat_message(m: ChatMessage) -> dict[str, Any]:
    if m.content is None:
        content = ""
    elif isinstance(m.content, str):
        content = m.content
    else:
        texts = []
        for part in m.content:
            if part.type != "text" or part.text is None:
                raise Rejection("invalid_params", f"content parts of type {part.type[:32]!r} are not supported")
            texts.append(part.text)
        content = "".join(texts)
    # Most chat templates know "system" but not OpenAI's newer "developer" role.
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content}
    if m.name:
        out["name"] = m.name
    return out


async def send_json_bytes(send: Send, body: bytes, request_id: str) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode())]})
    await send({"type": "http.response.body", "body": body})


def mount(app: App) -> HttpApi:
    """Register ``/infer`` and ``/v1/*`` on ``app``; HTTP generations still running when a drain times out
    are ended with reason ``cancelled`` (their responses complete normally)."""
    api = HttpApi(app)
    app.route("POST", "/infer", api.infer)
    app.route("POST", "/v1/completions", api.completions)
    app.route("POST", "/v1/chat/completions", api.chat_completions)
    app.route("GET", "/v1/models", api.list_models)
    app.route_prefix("GET", "/v1/models/", api.get_model)
    app.route("GET", "/health", api.health)

    drain = app.drain

    async def drain_then_interrupt(timeout: float | None = None) -> None:
        await drain(timeout)
        n = api.interrupt_all("cancelled")
        if n:
            log.info("cancelled HTTP generations at drain timeout", extra={"event": "drain_http", "cancelled": n})

    app.drain = drain_then_interrupt  # type: ignore[method-assign]
    app.http_api = api  # type: ignore[attr-defined]
    return api
