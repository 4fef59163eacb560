"""One WebSocket session: the generation table, limits, and the bounded send buffer.

Knows the protocol and an engine *interface*; never imports torch. The ASGI
layer feeds it frames (:meth:`Session.on_frame`, synchronous) and runs
:meth:`Session.run_writer`, the only coroutine that writes to the socket.

Send buffer: pending output is kept per generation, in arrival order. While
the socket is busy (``await send`` blocks on TCP flow control), new tokens for
the same generation append to its pending entry, so they leave as one
``delta``. The buffer is bounded in bytes: above the high watermark the
session pauses its generations in the engine (they keep their KV slot but skip
steps), below the low watermark it resumes them. A slow reader therefore
slows only itself.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from .auth import key_id, key_ok
from .engine import TokenEvent
from .hooks import GenerationRecord, Hooks
from .limits import RateLimiter
from .protocol import (
    Cancel,
    Codec,
    Delta,
    Done,
    Error,
    ErrorCode,
    Generate,
    GenId,
    Hello,
    Limits,
    ProtocolError,
    Ready,
    Usage,
)
from .scheduler import SamplingParams

log = logging.getLogger("rtws.session")

_FRAME_OVERHEAD = 48  # approximate encoded bytes of a delta/done frame around its text
_RECENT_IDS = 1024


class EngineLike(Protocol):
    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[TokenEvent], None], *,
               priority: str = ..., deadline: float | None = ...) -> int: ...

    def cancel(self, rid: int) -> None: ...

    def pause(self, rids: Any) -> None: ...

    def resume(self, rids: Any) -> None: ...


class ModelsLike(Protocol):
    def get(self, name: str | None) -> Any: ...

    def names(self) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class SessionLimits:
    max_generations: int = 64
    max_tokens: int = 4096
    max_frame_bytes: int = 1 << 20
    high_watermark: int = 256 * 1024
    low_watermark: int = 64 * 1024
    request_timeout: float | None = None
    api_keys: frozenset[str] = frozenset()


@dataclass(slots=True, eq=False)
class Generation:
    id: GenId
    rid: int
    engine: Any
    model: Any
    prompt_tokens: int
    started: float
    seq: int = 0
    sent_tokens: int = 0
    finished: bool = False
    first_sent: float | None = None
    queue_s: float | None = None


@dataclass(slots=True, eq=False)
class _Pending:
    gen: Generation
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    done: str | None = None
    nbytes: int = 0


class Session:
    """Protocol state for one socket. Create, then run :meth:`run_writer` and feed :meth:`on_frame`."""

    def __init__(
        self,
        send: Callable[[bytes | str], Awaitable[None]],
        codec: Codec,
        models: ModelsLike,
        limits: SessionLimits,
        *,
        client: str = "",
        authenticated: bool = True,
        rate_limiter: RateLimiter | None = None,
        hooks: Hooks | None = None,
        on_policy_close: Callable[[int, str], None] | None = None,
        transport: str = "ws",
    ) -> None:
        self.id = secrets.token_hex(8)
        self.transport = transport  # the metrics label and log field ("ws"; "realtime" for /v1/realtime)
        self._send = send
        self.codec = codec
        self.models = models
        self.limits = limits
        self.client = client
        self.authenticated = authenticated
        self.rate_limiter = rate_limiter
        self.hooks = hooks or Hooks()
        self._on_policy_close = on_policy_close
        self.live: dict[GenId, Generation] = {}
        self._recent: collections.OrderedDict[GenId, None] = collections.OrderedDict()
        self._pending: dict[GenId, _Pending] = {}
        self._control: collections.deque[bytes] = collections.deque()
        self.buffered = 0
        self.max_buffered = 0
        self.paused = False
        self.closed = False
        self.draining = False
        self._wake: Any = None  # asyncio.Event, created in run_writer (needs a running loop)
        self.send_started: float | None = None
        self.last_activity = time.monotonic()
        self.frames_sent = 0
        self.num_pauses = 0
        self.rate_key = client

    # ------------------------------------------------------------------ inbound

    def start(self) -> None:
        """Queue ``ready`` (call once the socket is accepted and authenticated)."""
        self._queue_control(Ready(session=self.id, models=self.models.names(), limits=self._limits_frame()))

    def _limits_frame(self) -> Limits:
        default = self.models.get(None)
        prompt_cap = default.max_prompt_tokens if default is not None else 0
        return Limits(max_generations=self.limits.max_generations, max_tokens=self.limits.max_tokens,
                      max_prompt_tokens=prompt_cap, max_frame_bytes=self.limits.max_frame_bytes)

    def on_frame(self, data: bytes | str) -> None:
        """Handle one client frame. Never raises for bad input: answers with an ``error`` frame."""
        if self.closed:
            return
        self.last_activity = time.monotonic()
        codec = self.codec
        try:
            frame = codec.decode_client(data)
            if isinstance(frame, Generate):
                self._generate(frame)
            elif isinstance(frame, Cancel):
                self._cancel(frame.id)
            elif isinstance(frame, Hello):
                self._hello(frame)
        except ProtocolError as exc:
            self.hooks.rejected(exc.code.value)
            self._queue_control(exc.to_frame())
            if exc.code is ErrorCode.UNAUTHORIZED and self._on_policy_close is not None:
                self._on_policy_close(1008, "unauthorized")

    def handle(self, frame: Generate | Cancel) -> None:
        """Apply one already-decoded ``generate`` or ``cancel`` (for adapters such as :mod:`rtws.realtime`).

        Raises :class:`ProtocolError` for a refused frame; a rate-limited
        ``generate`` is answered with a queued ``error`` frame instead.
        """
        self.last_activity = time.monotonic()
        if isinstance(frame, Generate):
            self._generate(frame)
        else:
            self._cancel(frame.id)

    def queue(self, frame: Any) -> None:
        """Queue a frame ahead of pending deltas; the codec encodes it now (adapters' own events)."""
        self._queue_control(frame)

    def _hello(self, frame: Hello) -> None:
        if self.authenticated:
            return
        if frame.token is not None and key_ok(frame.token, self.limits.api_keys):
            self.authenticated = True
            self.rate_key = "key:" + key_id(frame.token)
            self.start()
            return
        raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or invalid API key")

    def _generate(self, f: Generate) -> None:
        if not self.authenticated:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "authenticate first: send hello {token}", f.id)
        if self.draining:
            raise ProtocolError(ErrorCode.OVERLOADED, "server is draining; reconnect later", f.id)
        if f.id in self.live:
            raise ProtocolError(ErrorCode.DUPLICATE_ID, f"generation {f.id!r} is still running", f.id)
        if len(self.live) >= self.limits.max_generations:
            raise ProtocolError(ErrorCode.TOO_MANY_GENERATIONS,
                                f"at most {self.limits.max_generations} live generations per session", f.id)
        if f.max_tokens > self.limits.max_tokens:
            raise ProtocolError(ErrorCode.INVALID_PARAMS, f"max_tokens must be <= {self.limits.max_tokens}", f.id)
        model = self.models.get(f.model)
        if model is None:
            raise ProtocolError(ErrorCode.UNKNOWN_MODEL, f"unknown model {str(f.model)[:64]!r}", f.id)
        if self.rate_limiter is not None:
            wait = self.rate_limiter.acquire(self.rate_key)
            if wait > 0:
                self.hooks.rejected("rate_limited")
                self._queue_control(Error(code=ErrorCode.RATE_LIMITED.value, id=f.id,
                                          message=f"rate limit exceeded; retry in {wait:.2f} s",
                                          retry_after=round(wait, 3)))
                return
        try:
            messages = None if f.messages is None else [
                {"role": m.role, "content": m.content, **({"name": m.name} if m.name else {})} for m in f.messages]
            ids = model.encode(f.prompt, messages)
        except ValueError as exc:
            raise ProtocolError(ErrorCode.INVALID_PARAMS, str(exc), f.id) from None
        params = SamplingParams(
            max_tokens=f.max_tokens,
            temperature=f.temperature,
            top_p=f.top_p,
            top_k=f.top_k,
            seed=f.seed if f.seed is not None else secrets.randbits(63),
            stop=tuple(f.stop),
        )
        now = time.monotonic()
        deadline = now + self.limits.request_timeout if self.limits.request_timeout else None
        engine = model.engine
        gen = Generation(id=f.id, rid=0, engine=engine, model=model, prompt_tokens=len(ids), started=now)
        gen.rid = engine.submit(ids, params, lambda ev, g=gen: self._on_event(g, ev), priority=f.priority,
                                deadline=deadline)
        if self.paused:
            engine.pause((gen.rid,))
        self.live[f.id] = gen
        self.hooks.generation_started(model.name, self.transport)

    def _cancel(self, gid: GenId) -> None:
        gen = self.live.pop(gid, None)
        if gen is None:
            if gid in self._recent:
                return  # already finished: cancelling it is a no-op
            raise ProtocolError(ErrorCode.UNKNOWN_ID, f"no live generation {gid!r}", gid)
        gen.engine.cancel(gen.rid)
        gen.finished = True
        self._remember(gid)
        old = self._pending.pop(gid, None)
        if old is not None:
            self.buffered -= old.nbytes
        self._pending[gid] = _Pending(gen=gen, done="cancelled", nbytes=_FRAME_OVERHEAD)
        self.buffered += _FRAME_OVERHEAD
        self._wakeup()

    def _remember(self, gid: GenId) -> None:
        self._recent[gid] = None
        if len(self._recent) > _RECENT_IDS:
            self._recent.popitem(last=False)

    # ------------------------------------------------------------------ engine events (on the loop)

    def _on_event(self, gen: Generation, ev: TokenEvent) -> None:
        if gen.finished or self.closed:
            return
        p = self._pending.get(gen.id)
        if p is None:
            p = self._pending[gen.id] = _Pending(gen=gen, nbytes=_FRAME_OVERHEAD)
            self.buffered += _FRAME_OVERHEAD
        if ev.text:
            p.text.append(ev.text)
            n = len(ev.text)  # chars; close enough to bytes for a watermark, and cheap
            p.nbytes += n
            self.buffered += n
        p.tokens += ev.tokens
        if ev.finish is not None:
            p.done = ev.finish
            gen.finished = True
            self.live.pop(gen.id, None)
            self._remember(gen.id)
            gen.queue_s = ev.queue_s
        if self.buffered > self.max_buffered:
            self.max_buffered = self.buffered
        if not self.paused and self.buffered > self.limits.high_watermark:
            self._set_paused(True)
        self._wakeup()

    def _set_paused(self, paused: bool) -> None:
        self.paused = paused
        by_engine: dict[int, tuple[Any, list[int]]] = {}
        for gen in self.live.values():
            by_engine.setdefault(id(gen.engine), (gen.engine, []))[1].append(gen.rid)
        for engine, rids in by_engine.values():
            (engine.pause if paused else engine.resume)(rids)
        if paused:
            self.num_pauses += 1
            self.hooks.paused("send_buffer")

    # ------------------------------------------------------------------ outbound

    def _queue_control(self, frame: Any) -> None:
        data = self.codec.encode(frame)
        self._control.append(data)
        self.buffered += len(data)
        self._wakeup()

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    @property
    def idle(self) -> bool:
        """Nothing live and nothing left to send."""
        return not self.live and not self._pending and not self._control

    async def run_writer(self) -> None:
        """Send queued frames until :meth:`close`. Returns when the socket fails or the session closes."""
        import asyncio

        self._wake = asyncio.Event()
        self._wake.set()
        encode = self.codec.encode
        while not self.closed:
            await self._wake.wait()
            self._wake.clear()
            while (self._control or self._pending) and not self.closed:
                if self._control:
                    data = self._control.popleft()
                    self.buffered -= len(data)
                    await self._write(data)
                    continue
                gid = next(iter(self._pending))
                p = self._pending.pop(gid)
                self.buffered -= p.nbytes
                gen = p.gen
                if p.tokens or p.text:
                    text = "".join(p.text)
                    await self._write(encode(Delta(id=gid, seq=gen.seq, text=text, tokens=p.tokens)), p.tokens)
                    gen.seq += 1
                    gen.sent_tokens += p.tokens
                    if gen.first_sent is None:
                        gen.first_sent = time.monotonic()
                        self.hooks.first_token(gen.model.name, gen.first_sent - gen.started)
                if p.done is not None:
                    usage = Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.sent_tokens)
                    await self._write(encode(Done(id=gid, reason=p.done, usage=usage)))  # type: ignore[arg-type]
                    self._record(gen, p.done)
                if self.paused and self.buffered <= self.limits.low_watermark:
                    self._set_paused(False)

    async def _write(self, data: bytes, tokens: int = 0) -> None:
        self.send_started = time.monotonic()
        await self._send(data)
        self.send_started = None
        self.frames_sent += 1
        self.hooks.frame_sent(len(data), tokens)

    def _record(self, gen: Generation, reason: str) -> None:
        now = time.monotonic()
        self.hooks.generation_finished(GenerationRecord(
            id=gen.id, request_id=gen.rid, model=gen.model.name, version=str(getattr(gen.model, "version", "")),
            client=self.client, session=self.id, transport=self.transport, reason=reason, prompt_tokens=gen.prompt_tokens,
            completion_tokens=gen.sent_tokens,
            ttft_s=None if gen.first_sent is None else round(gen.first_sent - gen.started, 6),
            total_s=round(now - gen.started, 6), queue_s=gen.queue_s))

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been written (or ``timeout``). True when empty."""
        import asyncio

        deadline = time.monotonic() + timeout
        while (self._control or self._pending or self.send_started is not None) and not self.closed:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def cancel_all(self, reason: str = "cancelled") -> None:
        """End every live generation with ``done {reason}`` (drain, timeout). The frames are queued."""
        for gid in list(self.live):
            gen = self.live.pop(gid)
            gen.engine.cancel(gen.rid)
            gen.finished = True
            self._remember(gid)
            old = self._pending.pop(gid, None)
            p = _Pending(gen=gen, done=reason, nbytes=_FRAME_OVERHEAD)
            if old is not None:  # keep the text already produced: it was generated before the cut
                self.buffered -= old.nbytes
                p.text, p.tokens, p.nbytes = old.text, old.tokens, old.nbytes
            self._pending[gid] = p
            self.buffered += p.nbytes
        self._wakeup()

    def close(self) -> None:
        """The socket is gone: cancel every live generation in its engine. Idempotent."""
        if self.closed:
            return
        self.closed = True
        for gen in self.live.values():
            gen.engine.cancel(gen.rid)
            gen.finished = True
            self._record(gen, "cancelled")
        self.live.clear()
        self._pending.clear()
        self._control.clear()
        self.buffered = 0
        self._wakeup()
