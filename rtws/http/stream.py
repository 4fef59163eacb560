"""HTTP generation streams: one admitted request as an :class:`HttpGeneration`, and one way to write it.

Every request passes the same steps, in this order: draining (503), API key
(401), body size (413), JSON and parameter validation (400), then
:mod:`rtws.admission` (model 404, capacity 503, prompt length 400, rate limit
429 with ``Retry-After``, quota 429). An admitted request becomes one
:class:`HttpGeneration`: the engine's events are coalesced into chunks for the
response writer, and a watcher task reads the request's ``receive`` channel so
that ``http.disconnect`` cancels the generation in the engine at once (the slot
is free at the next step boundary). A reader that takes no data for
``stall_timeout_s`` is dropped the same way; one that reads slowly pauses only
its own generation (``send_high_watermark``).

A route supplies a :class:`StreamFormat` (how its chunks read on the wire);
:meth:`HttpStreams.serve` writes either the one SSE loop or the one
single-document response with it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

import msgspec

from ..admission import HTTP_FRONT, AdmissionError, RequestLike, deadline, encoder, record_template
from ..generation import SamplingParams, TokenEvent
from ..transport import abort_http, write_paused
from .asgi import (
    BodyTimeout,
    BodyTooLarge,
    Receive,
    Scope,
    Send,
    client_address,
    header,
    read_body,
    send_bytes,
    send_error,
    send_json,
)
from .errors import ClientGone, Rejection
from .schemas import OPENAI_ERROR_TYPE, OpenAIError, OpenAIErrorDetail, UsageOut

if TYPE_CHECKING:
    from ..app import App

log = logging.getLogger("rtws.http")

KEEPALIVE_S: Final = 15.0  # an SSE comment this often while a stream waits, so proxies keep it open

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
    :meth:`close` in a ``finally``. While it runs it is in its
    :class:`HttpStreams`' ``live`` set, which ``app.num_http_streams`` counts
    (so drains wait for it and ``max_connections`` counts it).
    """

    def __init__(self, streams: HttpStreams, scope: Scope, receive: Receive, model: Any, prompt_ids: list[int],
                 params: SamplingParams, priority: str, request_id: str) -> None:
        self.streams = streams
        self.app = streams.app
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
        # Keepalive: one timer per generation, re-armed when it fires (not one timeout per token).
        self._keepalive: asyncio.TimerHandle | None = None
        self._keepalive_s = 0.0
        self._keepalive_due = False
        self._last_out = 0.0  # when next() last returned (a chunk or a keepalive)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Submit to the engine and start watching for a disconnect. Call on the loop, once."""
        cfg = self.app.config
        self.started = time.monotonic()
        self.rid = self.engine.submit(self.prompt_ids, self.params, self._on_event, priority=self.priority,
                                      deadline=deadline(self.started, cfg.request_timeout))
        self.streams.live.add(self)
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
        self.streams.live.discard(self)
        rec = record_template(self.model, self.request_id, client=self.client, session="", transport="http")
        self.app.hooks.generation_finished(rec.finish(
            request_id=self.rid, reason=reason, prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens, started=self.started, first_at=self.first_at,
            now=time.monotonic(), queue_s=self.queue_s))

    def close(self) -> None:
        """End as ``cancelled`` unless already ended, and stop the watcher. Idempotent."""
        self.end("cancelled")
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
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
        if keepalive is not None and self._keepalive is None:
            self._keepalive_s = keepalive
            self._last_out = time.monotonic()
            self._keepalive = asyncio.get_running_loop().call_later(keepalive, self._keepalive_check)
        while not (self._text or self._tokens or self._finish is not None):
            if self.disconnected:
                raise ClientGone()
            if self._keepalive_due:
                self._keepalive_due = False
                self._last_out = time.monotonic()
                return None
            self._wake.clear()
            await self._wake.wait()
        if self.disconnected:
            raise ClientGone()
        self._last_out = time.monotonic()
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

    def _keepalive_check(self) -> None:
        """The keepalive timer: past ``keepalive`` seconds with nothing returned, wake :meth:`next` to return
        None (the writer sends a keepalive); else look again when that much time will have passed."""
        if self.reason is not None:
            self._keepalive = None
            return
        idle = time.monotonic() - self._last_out
        loop = asyncio.get_running_loop()
        if idle >= self._keepalive_s:
            self._keepalive_due = True
            self._wake.set()
            idle = 0.0
        self._keepalive = loop.call_later(self._keepalive_s - idle, self._keepalive_check)

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


class StreamFormat(Protocol):
    """How one route's generation reads on the wire. Each method returns the bytes to write."""

    def preamble(self) -> bytes:
        """SSE: written right after the headers (b"" for none)."""

    def delta(self, chunk: Chunk) -> bytes:
        """SSE: a chunk without ``finish`` (b"" writes nothing)."""

    def final(self, chunk: Chunk) -> bytes:
        """SSE: the last chunk (``finish`` set, the generation already ended), the stream's end included."""

    def result(self, result: Chunk) -> bytes:
        """``stream: false``: the 200 JSON document for a generation that did not fail."""

    def failed(self) -> bytes:
        """``stream: false``: the 500 JSON document for a generation that ended with ``error``."""


class HttpStreams:
    """The HTTP generation streams of one app: reading and admitting requests, writing responses, and ending
    them at a drain. It owns the ``live`` set; the app counts it (``App.num_http_streams``) and, at a drain
    timeout, calls :meth:`interrupt_all`."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.live: set[HttpGeneration] = set()

    @property
    def num_live(self) -> int:
        return len(self.live)

    def interrupt_all(self, reason: str = "cancelled") -> int:
        """End every live HTTP generation now with ``reason`` (each response still completes). Returns how many."""
        live = list(self.live)
        for gen in live:
            gen.interrupt(reason)
        if live:
            log.info("cancelled HTTP generations at drain timeout", extra={"event": "drain_http", "cancelled": len(live)})
        return len(live)

    # ------------------------------------------------------------------ reading and admission

    async def read(self, scope: Scope, receive: Receive, decoder: msgspec.json.Decoder[Any]) -> Any:
        """Draining, the API key, the body (size, deadline) and its JSON; raises :class:`Rejection`."""
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

    async def admit(self, scope: Scope, receive: Receive, req: RequestLike, request_id: str) -> HttpGeneration:
        """:meth:`rtws.admission.Admission.admit`, then the prompt tokenized; returns an unstarted generation.

        The checks run without an await; the request then counts in ``app.num_admitting`` while its prompt is
        tokenized in the tokenizer thread (never on the loop), so the capacity check stays exact. Raises
        :class:`Rejection`."""
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

    async def reject(self, send: Send, r: Rejection, openai: bool = False) -> None:
        """The one rendering of a refused request: rtws's ``{"error": {...}}`` or OpenAI's error body."""
        self.app.hooks.rejected(r.metric)
        if openai:
            body = OpenAIError(OpenAIErrorDetail(message=r.message,
                                                 type=OPENAI_ERROR_TYPE.get(r.http_status, "server_error"),
                                                 param=r.param, code=r.code))
            await send_json(send, r.http_status, body, r.headers())
        elif r.retry_after is not None:
            await send_error(send, r.code, r.message, r.http_status, r.headers(), retry_after=round(r.retry_after, 3))
        else:
            await send_error(send, r.code, r.message, r.http_status, r.headers())

    # ------------------------------------------------------------------ writing

    async def serve(self, gen: HttpGeneration, send: Send, fmt: StreamFormat, request_id: str, stream: bool) -> None:
        """Start ``gen`` and write its whole response (SSE when ``stream``), then close it, whatever happens."""
        gen.start()
        try:
            if stream:
                await self._sse(gen, send, fmt, request_id)
            else:
                await self._single(gen, send, fmt, request_id)
        except ClientGone:
            pass
        finally:
            gen.close()

    async def _sse(self, gen: HttpGeneration, send: Send, fmt: StreamFormat, request_id: str) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"), (b"x-request-id", request_id.encode())]})
        preamble = fmt.preamble()
        if preamble:
            await self.write(gen, send, preamble)
        while True:
            chunk = await gen.next(KEEPALIVE_S)
            if chunk is None:
                await self.write(gen, send, b": keepalive\n\n")
                continue
            if chunk.finish is None:
                body = fmt.delta(chunk)
                if body:
                    await self.write(gen, send, body)
                continue
            gen.end(chunk.finish)
            await self.write(gen, send, fmt.final(chunk), more=False)
            return

    @staticmethod
    async def _single(gen: HttpGeneration, send: Send, fmt: StreamFormat, request_id: str) -> None:
        result = await gen.collect()
        if result.finish == "error":
            await send_bytes(send, 500, fmt.failed(), "application/json")
            return
        await send_bytes(send, 200, fmt.result(result), "application/json", [(b"x-request-id", request_id.encode())])

    async def write(self, gen: HttpGeneration, send: Send, body: bytes, more: bool = True) -> None:
        """One body chunk, bounded by the stall timeout. Raises :class:`ClientGone` if it cannot be written."""
        message = {"type": "http.response.body", "body": body, "more_body": more}
        try:
            if write_paused(send) is False:  # uvicorn's transport takes it now: no wait to bound
                await send(message)
            else:
                async with asyncio.timeout(self.app.config.stall_timeout_s):
                    await send(message)
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
