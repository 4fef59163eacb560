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

Acknowledgement window and resume (one mechanism): every frame but ``ready``
is numbered 1, 2, ... in the order it is written. A client that sends ``ack
{received: n}`` opts in (with ``require_ack`` every session is in from its first
frame): from then on every written frame is *retained* until acknowledged, and the retained bytes count against the same watermarks, so a
reader that does not ack pauses its own generations even behind a buffering
proxy. When the socket drops uncleanly the session can be held
(:meth:`detach`); generations keep running into the pending buffer until the
high watermark pauses them. :meth:`attach` on a new socket replays exactly the
retained frames after the client's ``received`` count, then goes on live.
Frame state (seq, tokens sent, conversation reply) is updated *before* a frame
is written, so a write cut by a dropped socket is never half-counted.
"""

from __future__ import annotations

import collections
import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from .admission import Admission, AdmissionError, deadline, encoder, record_template
from .auth import key_id, key_ok
from .conversations import Conversation, ConversationError, ConversationStore, Mode, NewItem
from .generation import SamplingParams, TokenEvent
from .hooks import Hooks
from .limits import ClientQuota, RateLimiter
from .protocol import (
    Ack,
    Cancel,
    Codec,
    ConversationFrame,
    ConversationItem,
    Delta,
    Done,
    Error,
    ErrorCode,
    Forget,
    Generate,
    GenId,
    Hello,
    History,
    Limits,
    ProtocolError,
    Ready,
    Usage,
    codec_for_frame,
)

if TYPE_CHECKING:
    import asyncio

log = logging.getLogger("rtws.session")

_FRAME_OVERHEAD = 48  # approximate encoded bytes of a delta/done frame around its text
_RECENT_IDS = 1024
# A plain prompt up to this many characters is tokenized on the event loop: tens of microseconds, less than the
# hop to the tokenizer thread and back (and the GIL handoffs with it), which a burst of 1,000 short generate
# frames turns into loop lag. Longer prompts, chat messages and conversations go to the thread, and so does any
# prompt that arrives while an earlier one of the same session is still there (frames stay in order).
INLINE_PROMPT_CHARS = 2048
# Runs a blocking callable off the event loop (tokenizing, chat templates) and resolves on the loop.
Offload = Callable[[Callable[[], Any]], "asyncio.Future[Any]"]


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
    max_conversations: int = 16
    max_conversation_generations: int = 1
    resume_window_s: float = 30.0

    @property
    def retained_cap(self) -> int:
        """Unacknowledged bytes past which an acking client is closed (1008): it acks nothing at all."""
        return 4 * self.high_watermark + self.max_frame_bytes
    # Control and error frames: queued-but-unsent bytes at most (a client that sends frames without reading
    # the answers is closed 1008 past it), and a token bucket of error frames (burst, then per second).
    max_control_bytes: int = 256 * 1024
    error_burst: int = 256
    error_rate: float = 64.0
    chars_per_token: int = 32  # refuse prompts longer than max_prompt_tokens x this before tokenizing
    replica: str | None = None  # announced as ready.replica


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
    quota_key: str | None = None  # the ClientQuota key this generation counts against, until released
    cached_tokens: int | None = None

    @property
    def submitted(self) -> bool:
        return self.rid >= 0
    conversation: Conversation | None = None
    new_items: list[NewItem] = field(default_factory=list)  # turns added to the conversation at submit
    committed: bool = False  # the new turns are in the conversation (the reply will be appended)
    dropped: int = 0
    delivered: list[str] = field(default_factory=list)


@dataclass(slots=True, frozen=True)
class _Sent:
    """A written frame kept until acknowledged: its number, bytes, and the generation id if it is a done."""

    n: int
    data: bytes
    done: GenId | None = None


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
        store: Any = None,
        on_resume: Callable[[Session, Hello], Error | None] | None = None,
        offload: Offload | None = None,
        quota: ClientQuota | None = None,
        on_authenticated: Callable[[Session], str | None] | None = None,
        transport: str = "ws",
        send_many: Callable[[list[bytes]], Awaitable[None]] | None = None,
        require_ack: bool = False,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.transport = transport  # the metrics label and log field ("ws"; "realtime" for /v1/realtime)
        self._send = send
        self._send_many = send_many  # several frames, each its own message, in one transport write (corked)
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
        self.writes = 0  # transport writes: fewer than frames_sent when frames ready together went out corked
        self.num_pauses = 0
        self.rate_key = client
        self.key = ""  # key id of the API key that opened the session ("" when auth is off)
        self.store = store  # rtws.session_store.SessionStore, or None: no resume tokens
        self.on_resume = on_resume
        self.started = False
        self.attached = True
        self.conversations = ConversationStore(limits.max_conversations)
        # acknowledgement window / retained frames. require_ack: acking from the first frame, as if the
        # client had sent ack {received: 0} right after ready (ready is not numbered: frame 1 is the first
        # retained), announced as ready.limits.ack_required.
        self.ack_required = require_ack
        self.acking = require_ack
        self.frames_numbered = 0
        self.acked = 0
        self.unacked = 0
        self.max_held = 0
        self._retain_from = 1
        self._retained: collections.deque[_Sent] = collections.deque()
        self._first: collections.deque[bytes] = collections.deque()  # unnumbered (ready), sent before all else
        self._replay: collections.deque[bytes] = collections.deque()
        self._offload = offload
        self._tokenizing = 0  # prompts of this session in the tokenizer thread (a short one waits behind them)
        self.quota = quota
        self.admission = Admission(models, max_tokens=limits.max_tokens, chars_per_token=limits.chars_per_token,
                                   rate_limiter=rate_limiter, quota=quota)
        self._on_authenticated = on_authenticated
        self.control_bytes = 0  # encoded control/error frames queued, not yet written
        self._error_tokens = float(limits.error_burst)
        self._error_at = time.monotonic()
        self.refusing = False  # a policy close is under way: frames are ignored, nothing more is queued
        self.bytes_sent = 0  # written to the socket (for the watchdog's throughput window)
        self.blocked_s = 0.0  # total time spent inside completed sends (less any pacing: set_pacing_clock)
        self.pacing_clock: Callable[[], float] | None = None
        self._paced_seen = 0.0
        self.batch = False  # hello {batch: true}: frames ready together leave as one batch message
        self.reader_behind = False  # the watchdog's lead rule holds the generations (App._watch_once)
        self.behind_since: float | None = None  # when the lead rule last held them; counts as blocked time
        self.lead_until: int | None = None  # resumed by the lead rule: held again once bytes_sent reaches this
        self.paused_at = 0.0  # when the session last paused (the watchdog's acknowledgement-stall rule)
        self.acked_at = 0.0  # when an ack last advanced the window

    # ------------------------------------------------------------------ inbound

    def start(self) -> None:
        """Queue ``ready`` (call once the socket is accepted and authenticated)."""
        self.started = True
        self._queue_first(self._ready())

    def _ready(self, resumed: bool = False, live: list[GenId] | None = None, replay: int = 0) -> Ready:
        token = self.store.issue(self, self.key) if self.store is not None else None
        return Ready(session=self.id, models=self.models.names(), limits=self._limits_frame(),
                     resume_token=token, resumed=resumed, live=live, replay=replay,
                     replica=self.limits.replica)

    def _limits_frame(self) -> Limits:
        default = self.models.get(None)
        prompt_cap = default.max_prompt_tokens if default is not None else 0
        lim = self.limits
        resume = self.store is not None and self.store.enabled
        return Limits(max_generations=lim.max_generations, max_tokens=lim.max_tokens,
                      max_prompt_tokens=prompt_cap, max_frame_bytes=lim.max_frame_bytes,
                      window=lim.high_watermark, resume_window_s=lim.resume_window_s if resume else None,
                      max_conversations=lim.max_conversations,
                      max_conversation_generations=lim.max_conversation_generations, batch=True,
                      ack_required=True if self.ack_required else None)

    def on_frame(self, data: bytes | str) -> None:
        """Handle one client frame. Never raises for bad input: answers with an ``error`` frame."""
        if self.closed or self.refusing:
            return
        self.last_activity = time.monotonic()
        frame: Any = None
        try:
            # Decode by frame kind (binary = msgpack, text = JSON); replies use the negotiated codec.
            frame = codec_for_frame(data).decode_client(data)
            if isinstance(frame, Generate):
                self._generate(frame)
            elif isinstance(frame, Cancel):
                self._cancel(frame.id)
            elif isinstance(frame, Ack):
                self._ack(frame.received)
            elif isinstance(frame, Hello):
                self._hello(frame)
            elif isinstance(frame, Forget):
                self._forget(frame.conversation)
            elif isinstance(frame, History):
                self._history(frame.conversation)
        except ConversationError as exc:  # forget / history
            self.hooks.rejected(exc.code)
            cid = frame.conversation if isinstance(frame, (Forget, History)) else None
            self._queue_control(Error(code=exc.code, message=exc.message, conversation=cid))
        except ProtocolError as exc:
            self.hooks.rejected(exc.code.value)
            self._queue_control(exc.to_frame())
            if exc.code is ErrorCode.UNAUTHORIZED:
                self._policy_close(1008, "unauthorized")
        except Exception:
            # A bug, not bad input: log the cause, answer `internal`, keep the socket and every other generation.
            gid = getattr(frame, "id", None)
            log.exception("frame handling failed", extra={"event": "frame_error", "session": self.id,
                                                          "client": self.client})
            self.hooks.rejected("internal")
            self._queue_control(Error(code=ErrorCode.INTERNAL.value, message="internal error handling the frame",
                                      id=gid if isinstance(gid, (str, int)) else None))

    def _policy_close(self, code: int, reason: str) -> None:
        """Ask the owner to close the socket (once); from now on frames are ignored and nothing is queued."""
        if self.refusing:
            return
        self.refusing = True
        if self._on_policy_close is not None:
            self._on_policy_close(code, reason)

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
        if not self.authenticated:
            if frame.token is None or not key_ok(frame.token, self.limits.api_keys):
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "missing or invalid API key")
            key = "key:" + key_id(frame.token)
            if self._on_authenticated is not None:
                refusal = self._on_authenticated_check(key)
                if refusal is not None:
                    self._queue_control(Error(code=ErrorCode.OVERLOADED.value, message=refusal))
                    self._policy_close(1013, refusal[:100])
                    return
            self.authenticated = True
            self.rate_key = key
            self.key = key_id(frame.token)
        if frame.batch is not None:
            self.batch = frame.batch
        if frame.resume is None:
            if not self.started:
                self.start()
            return
        failure = self._resume(frame)
        if failure is None:
            return  # a held session took over this socket; this one is closed
        if not self.started:
            self.start()  # the client gets a fresh session: ready first, then the error
        self._queue_control(failure)

    def _resume(self, frame: Hello) -> Error | None:
        if self.frames_numbered or self.live or self._pending or len(self.conversations):
            reason = "not_first"
            self.hooks.resume_failed(reason)
            return Error(code=ErrorCode.RESUME_FAILED.value, reason=reason,
                         message="resume must be the first thing a socket asks; this session keeps going")
        if self.on_resume is None:
            self.hooks.resume_failed("off")
            return Error(code=ErrorCode.RESUME_FAILED.value, reason="off",
                         message="resume is off on this server; this is a fresh session")
        return self.on_resume(self, frame)

    def _on_authenticated_check(self, key: str) -> str | None:
        assert self._on_authenticated is not None
        old, self.rate_key = self.rate_key, key
        refusal = self._on_authenticated(self)
        if refusal is not None:
            self.rate_key = old
        return refusal

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
        mode: Mode = "text" if f.prompt is not None else "chat"
        found: list[tuple[Conversation, list[NewItem]]] = []

        def conversation_check(model: Any) -> None:  # between the rate limit and the quota (rtws.admission)
            if f.conversation is None:
                return
            try:
                conv = self.conversations.get_or_create(f.conversation)
            except ConversationError as exc:
                raise ProtocolError(ErrorCode(exc.code), exc.message, f.id) from None
            if conv.live >= self.limits.max_conversation_generations:
                raise ProtocolError(ErrorCode.CONVERSATION_BUSY,
                                    f"conversation {f.conversation!r} already has {conv.live} generation(s) running "
                                    f"(at most {self.limits.max_conversation_generations})", f.id)
            if conv.mode is not None and conv.mode != mode:
                raise ProtocolError(ErrorCode.INVALID_PARAMS, f"conversation {f.conversation!r} was started with "
                                    f"{'prompt' if conv.mode == 'text' else 'messages'}; keep using it", f.id)
            new = ([NewItem("user", f.prompt)] if f.prompt is not None else
                   [NewItem(m.role, m.content, m.name) for m in f.messages or ()])
            if not new and not conv.items:
                raise ProtocolError(ErrorCode.INVALID_PARAMS, "the conversation is empty: send messages", f.id)
            found.append((conv, new))

        try:
            admitted = self.admission.admit(f, self.rate_key, extra=conversation_check)
        except AdmissionError as exc:
            if exc.code == ErrorCode.RATE_LIMITED.value:  # answered, not raised (Session.handle's contract)
                self.hooks.rejected(exc.metric)
                self._queue_control(Error(code=exc.code, id=f.id, message=exc.message,
                                          retry_after=None if exc.retry_after is None else round(exc.retry_after, 3)))
                return
            raise ProtocolError(ErrorCode(exc.code), exc.message, f.id) from None
        model, params, quota_key = admitted.model, admitted.params, admitted.quota_key
        conv, new = found[0] if found else (None, [])
        now = time.monotonic()
        gen = Generation(id=f.id, rid=-1, engine=model.engine, model=model, prompt_tokens=0, started=now,
                         quota_key=quota_key)
        self.live[f.id] = gen  # counts against the limits (and is cancellable) while it is being tokenized
        work: Callable[[], list[int]]
        if conv is not None:
            # Render a snapshot (the tokenizer thread must not read a list the loop appends to); the new
            # turns and the drops are committed in _submit, once the engine has the prompt.
            conv.mode = mode
            conv.live += 1
            gen.conversation, gen.new_items = conv, new
            snap = conv.snapshot()
            limit = _prompt_target(model, f.max_tokens)

            def work() -> list[int]:
                ids, gen.dropped = snap.fit(new, lambda c, extra, skip: _encode(model, mode, c, extra, skip), limit)
                return ids
        else:
            work = encoder(model, admitted.request)
        if self._offload is None or (conv is None and self._tokenizing == 0 and f.messages is None
                                     and f.prompt is not None and len(f.prompt) <= INLINE_PROMPT_CHARS):
            try:
                ids = work()
            except ValueError as exc:
                self._drop(gen)
                raise ProtocolError(ErrorCode.INVALID_PARAMS, str(exc), f.id) from None
            except BaseException:
                self._drop(gen)
                raise
            self._submit(gen, ids, params, f.priority)
            return
        self._tokenizing += 1
        fut = self._offload(work)
        fut.add_done_callback(lambda fut: self._encoded(gen, fut, params, f.priority))

    def _encoded(self, gen: Generation, fut: Any, params: SamplingParams, priority: str) -> None:
        """The worker thread tokenized ``gen``'s prompt (on the loop): submit it, unless it ended meanwhile."""
        self._tokenizing -= 1
        if gen.finished or self.closed or self.live.get(gen.id) is not gen:
            return  # cancelled (its done is queued) or the socket is gone
        if fut.cancelled():
            self._drop(gen)
            return
        exc = fut.exception()
        if exc is not None:
            self._drop(gen)
            if isinstance(exc, ValueError):
                self.hooks.rejected(ErrorCode.INVALID_PARAMS.value)
                self._queue_control(Error(code=ErrorCode.INVALID_PARAMS.value, message=str(exc), id=gen.id))
            else:
                log.error("tokenization failed", exc_info=exc, extra={"event": "frame_error", "session": self.id})
                self.hooks.rejected("internal")
                self._queue_control(Error(code=ErrorCode.INTERNAL.value, message="internal error tokenizing the prompt",
                                          id=gen.id))
            return
        try:
            self._submit(gen, fut.result(), params, priority)
        except Exception:
            log.exception("submit failed", extra={"event": "frame_error", "session": self.id})
            self._queue_control(Error(code=ErrorCode.INTERNAL.value, message="internal error starting the generation",
                                      id=gen.id))

    def _submit(self, gen: Generation, ids: list[int], params: SamplingParams, priority: str) -> None:
        gen.prompt_tokens = len(ids)
        try:
            gen.rid = gen.engine.submit(ids, params, lambda ev, g=gen: self._on_event(g, ev), priority=priority,
                                        deadline=deadline(gen.started, self.limits.request_timeout))
        except BaseException:
            self._drop(gen)
            raise
        conv = gen.conversation
        if conv is not None:
            conv.drop_oldest(gen.dropped)
            conv.extend(gen.new_items)
            gen.committed = True
        if self.paused:
            gen.engine.pause((gen.rid,))
        self.hooks.generation_started(gen.model.name, self.transport)

    def _drop(self, gen: Generation) -> None:
        """Forget a generation that never reached the engine (refused while tokenizing): no ``done`` follows."""
        if self.live.get(gen.id) is gen:
            del self.live[gen.id]
        gen.finished = True
        self._release(gen)
        conv, gen.conversation = gen.conversation, None
        if conv is not None:
            conv.live -= 1
            if not conv.items and not conv.live and self.conversations.get_or_none(conv.id) is conv:
                self.conversations.forget(conv.id)  # created by this refused generate: leave no trace

    def _release(self, gen: Generation) -> None:
        self.admission.release(gen.quota_key)
        gen.quota_key = None

    def _stop(self, gen: Generation) -> None:
        """Cancel ``gen`` in its engine (if it got there) and release its client quota."""
        if gen.submitted:
            gen.engine.cancel(gen.rid)
        gen.finished = True
        self._release(gen)

    def _cancel(self, gid: GenId) -> None:
        gen = self.live.pop(gid, None)
        if gen is None:
            if gid in self._recent:
                return  # already finished: cancelling it is a no-op
            raise ProtocolError(ErrorCode.UNKNOWN_ID, f"no live generation {gid!r}", gid)
        self._stop(gen)
        self._remember(gid)
        old = self._pending.pop(gid, None)
        if old is not None:
            self.buffered -= old.nbytes
        self._pending[gid] = _Pending(gen=gen, done="cancelled", nbytes=_FRAME_OVERHEAD)
        self.buffered += _FRAME_OVERHEAD
        self._wakeup()

    def _forget(self, cid: str) -> None:
        conv = self.conversations.get(cid)
        for gid, gen in list(self.live.items()):
            if gen.conversation is conv:
                self._cancel(gid)
        self.conversations.forget(cid)

    def _history(self, cid: str) -> None:
        conv = self.conversations.get(cid)
        items = [ConversationItem(id=it.id, role=it.role, content=it.content, name=it.name, truncated=it.truncated)
                 for it in conv.items]
        self._queue_control(ConversationFrame(id=conv.id, items=items, dropped=conv.dropped))

    def _finish_conversation(self, gen: Generation, reason: str) -> None:
        """Append the reply as delivered to its conversation (once, when its ``done`` is written)."""
        conv, gen.conversation = gen.conversation, None
        if conv is None:
            return
        conv.live -= 1
        if not gen.committed or self.conversations.get_or_none(conv.id) is not conv:
            return  # cancelled before it reached the engine, or forgotten meanwhile
        conv.add("assistant", "".join(gen.delivered), truncated=reason in ("cancelled", "timeout", "error"))

    # ------------------------------------------------------------------ acknowledgement window

    @property
    def held(self) -> int:
        """Bytes this session holds for its client: queued, plus written but not acknowledged."""
        return self.buffered + self.unacked

    def _ack(self, received: int) -> None:
        if received > self.frames_numbered:
            raise ProtocolError(ErrorCode.INVALID_PARAMS,
                                f"ack.received is {received} but only {self.frames_numbered} frames were sent")
        if not self.acking:
            self.acking = True
            self._retain_from = self.frames_numbered + 1
        self._ack_to(received)

    def _ack_to(self, received: int) -> None:
        if received > self.acked:
            self.acked = received
            self.acked_at = time.monotonic()
        retained = self._retained
        while retained and retained[0].n <= received:
            self.unacked -= len(retained.popleft().data)
        if self.paused and not self.reader_behind and self.held <= self._resume_below:
            self._set_paused(False)

    @property
    def resumable(self) -> bool:
        """Can be held after an unclean disconnect: it acks (so replay is exact) and a store issued a token."""
        return self.acking and not self.closed and self.store is not None and self.store.enabled

    def resume_check(self, received: int, codec: str) -> str | None:
        """Why a client that has ``received`` frames, speaking ``codec``, cannot resume this session (None: it can)."""
        if self.closed:
            return "expired"
        if codec != self.codec.name:
            return "codec"
        if not self.acking:
            return "gap"
        if received > self.frames_numbered or received < self.acked or received < self._retain_from - 1:
            return "gap"
        return None

    def detach(self) -> None:
        """The socket dropped but the session is held: stop writing, keep generating (up to the watermark)."""
        self.attached = False
        self.send_started = None
        self._replay.clear()
        while self._first:
            self.buffered -= len(self._first.popleft())
        self._wakeup()

    def attach(self, send: Callable[[bytes | str], Awaitable[None]], received: int, *,
               on_policy_close: Callable[[int, str], None] | None,
               on_resume: Callable[[Session, Hello], Error | None] | None,
               send_many: Callable[[list[bytes]], Awaitable[None]] | None = None) -> tuple[int, int]:
        """Take a new socket: queue ``ready {resumed}``, then every retained frame after ``received``.

        ``received`` must have passed :meth:`resume_check`. Run :meth:`run_writer` afterwards.
        Returns ``(frames, bytes)`` queued for replay.
        """
        self.detach()
        self._send = send
        self._send_many = send_many
        self._on_policy_close = on_policy_close
        self.on_resume = on_resume
        self._ack_to(received)
        self._replay.extend(f.data for f in self._retained)
        live: dict[GenId, None] = dict.fromkeys(self.live)
        for gid, p in self._pending.items():
            if p.done is not None:
                live[gid] = None
        self.attached = True
        self.last_activity = time.monotonic()
        self._queue_first(self._ready(resumed=True, live=list(live), replay=len(self._replay)))
        return len(self._replay), sum(len(d) for d in self._replay)

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
            self._release(gen)
            self.live.pop(gen.id, None)
            self._remember(gen.id)
            gen.queue_s = ev.queue_s
            gen.cached_tokens = ev.cached_tokens
        if self.buffered > self.max_buffered:
            self.max_buffered = self.buffered
        held = self.buffered + self.unacked
        if held > self.max_held:
            self.max_held = held
        if not self.paused and held > self.limits.high_watermark:
            self._set_paused(True)
        self._wakeup()

    def set_reader_behind(self, behind: bool, credit: int | None = None) -> None:
        """The watchdog's lead rule: pause the generations while the reader has not taken what the socket already
        holds for it (beyond the rule's allowance); resume them for ``credit`` more bytes once it has caught up
        (and the send buffer allows)."""
        if behind == self.reader_behind:
            return
        self.lead_until = None if behind or credit is None else self.bytes_sent + credit
        self.reader_behind = behind
        now = time.monotonic()
        if behind:
            self.behind_since = now
        elif self.behind_since is not None:
            self.blocked_s += now - self.behind_since  # held on the reader, as if inside a send
            self.behind_since = None
        if behind and not self.paused:
            self._set_paused(True, "reader_behind")
        elif not behind and self.paused and self.held <= self._resume_below:
            self._set_paused(False)

    def _set_paused(self, paused: bool, reason: str = "send_buffer") -> None:
        self.paused = paused
        by_engine: dict[int, tuple[Any, list[int]]] = {}
        for gen in self.live.values():
            if gen.submitted:
                by_engine.setdefault(id(gen.engine), (gen.engine, []))[1].append(gen.rid)
        for engine, rids in by_engine.values():
            (engine.pause if paused else engine.resume)(rids)
        if paused:
            self.paused_at = time.monotonic()
            self.num_pauses += 1
            self.hooks.paused(reason)

    # ------------------------------------------------------------------ outbound

    def _queue_control(self, frame: Any) -> None:
        """Queue one control/error frame, within the socket's budget; past it the socket is closed 1008."""
        if self.refusing or self.closed:
            return
        if isinstance(frame, Error) and not self._take_error_token():
            log.warning("closing socket over its error budget", extra={"event": "error_budget", "session": self.id,
                                                                       "client": self.client})
            self.hooks.rejected("error_budget")
            self._policy_close(1008, "too many errors")
            return
        try:
            data = self.codec.encode(frame)
        except (TypeError, ValueError, OverflowError) as exc:  # e.g. an id this codec cannot carry
            log.error("control frame not encodable: %r", exc, extra={"event": "frame_error", "session": self.id})
            data = self.codec.encode(Error(code=ErrorCode.INTERNAL.value, message="reply could not be encoded"))
        if self.control_bytes + len(data) > self.limits.max_control_bytes:
            log.warning("closing socket over its control budget", extra={
                "event": "control_budget", "session": self.id, "client": self.client, "queued": self.control_bytes})
            self.hooks.rejected("control_budget")
            self._policy_close(1008, "control frames not read")
            return
        self._control.append(data)
        self.control_bytes += len(data)
        self.buffered += len(data)
        self._wakeup()

    def _queue_first(self, frame: Ready) -> None:
        data = self.codec.encode(frame)
        self._first.append(data)
        self.buffered += len(data)
        self._wakeup()
    def _take_error_token(self) -> bool:
        now = time.monotonic()
        lim = self.limits
        self._error_tokens = min(float(lim.error_burst), self._error_tokens + (now - self._error_at) * lim.error_rate)
        self._error_at = now
        if self._error_tokens < 1.0 or math.isnan(self._error_tokens):
            return False
        self._error_tokens -= 1.0
        return True

    def _wakeup(self) -> None:
        if self._wake is not None:
            self._wake.set()

    @property
    def idle(self) -> bool:
        """Nothing live and nothing left to send."""
        return not self.live and not self._pending and not self._control and not self._first

    def _number(self, data: bytes, done: GenId | None = None) -> None:
        self.frames_numbered += 1
        if self.acking:
            self._retained.append(_Sent(self.frames_numbered, data, done))
            self.unacked += len(data)

    async def run_writer(self) -> None:
        """Send queued frames until :meth:`close` or :meth:`detach`. Returns when the socket fails or either happens."""
        import asyncio

        self._wake = asyncio.Event()
        self._wake.set()
        encode = self.codec.encode
        while not self.closed and self.attached:
            await self._wake.wait()
            self._wake.clear()
            while not self.closed and self.attached:
                if self._first:
                    data = self._first.popleft()
                    self.buffered -= len(data)
                    await self._write(data)
                    continue
                if self._replay:
                    await self._write(self._replay.popleft())
                    continue
                if self.batch and (self._control or self._pending):
                    frames, tokens = self._take_batch(encode)
                    if frames:
                        await self._write(frames[0] if len(frames) == 1 else self.codec.batch(frames), tokens)
                    self._after_write()
                    continue
                if self._send_many is not None and len(self._control) + len(self._pending) > 1:
                    # Several frames ready (a step's deltas for this socket's streams): the same messages,
                    # written together.
                    frames, tokens = self._take_batch(encode)
                    if frames:
                        await self._write_many(frames, tokens)
                    self._after_write()
                    continue
                if self._control:
                    data = self._control.popleft()
                    self.buffered -= len(data)
                    self.control_bytes -= len(data)
                    self._number(data)
                    await self._write(data)
                    self._after_write()
                    continue
                if not self._pending:
                    break
                gid = next(iter(self._pending))
                delta, done, tokens = self._take_pending(gid, encode)
                if delta is not None:
                    await self._write(delta, tokens)
                if done is not None:
                    await self._write(done)
                self._after_write()

    _BATCH_FRAMES = 64
    _BATCH_BYTES = 64 * 1024

    def _take_batch(self, encode: Callable[[Any], bytes]) -> tuple[list[bytes], int]:
        """Everything ready now (control frames first, then each generation's delta/done), up to a bound,
        numbered and retained like single frames: the frames of one batch message, and the tokens they carry."""
        frames: list[bytes] = []
        size = tokens = 0
        while self._control and len(frames) < self._BATCH_FRAMES and size < self._BATCH_BYTES:
            data = self._control.popleft()
            self.buffered -= len(data)
            self.control_bytes -= len(data)
            self._number(data)
            frames.append(data)
            size += len(data)
        while self._pending and len(frames) < self._BATCH_FRAMES - 1 and size < self._BATCH_BYTES:
            delta, done, n = self._take_pending(next(iter(self._pending)), encode)
            tokens += n
            for frame in (delta, done):
                if frame is not None:
                    frames.append(frame)
                    size += len(frame)
        return frames, tokens

    def _take_pending(self, gid: GenId, encode: Callable[[Any], bytes]) -> tuple[bytes | None, bytes | None, int]:
        """Pop one generation's pending output: its encoded (delta, done) frames and the delta's tokens."""
        p = self._pending.pop(gid)
        self.buffered -= p.nbytes
        gen = p.gen
        # Count and retain both frames before writing either: a write cut by a dropped socket
        # leaves them retained for replay, never half-counted.
        delta: bytes | None = None
        done: bytes | None = None
        if p.tokens or p.text:
            text = "".join(p.text)
            delta = encode(Delta(id=gid, seq=gen.seq, text=text, tokens=p.tokens))
            gen.seq += 1
            gen.sent_tokens += p.tokens
            gen.delivered.append(text)
            self._number(delta)
            if gen.first_sent is None:
                gen.first_sent = time.monotonic()
                self.hooks.first_token(gen.model.name, gen.first_sent - gen.started)
        if p.done is not None:
            usage = Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.sent_tokens,
                          cached_tokens=gen.cached_tokens)
            done = encode(Done(id=gid, reason=p.done, usage=usage, dropped=gen.dropped))  # type: ignore[arg-type]
            self._finish_conversation(gen, p.done)
            self._record(gen, p.done)
            self._number(done, gid)
        return delta, done, p.tokens

    def ack_stalled(self, now: float, timeout: float) -> bool:
        """Paused at the acknowledgement window, with no ack for ``timeout`` seconds: a client that stopped
        acknowledging (behind a proxy whose ``send`` never blocks, the only sign that it stopped reading)."""
        return (self.acking and self.paused and self.unacked > 0
                and now - max(self.paused_at, self.acked_at) > timeout)

    @property
    def _resume_below(self) -> int:
        # An acking client acks at least every window/8 bytes (and at every done); resuming at window/4 or
        # more means a paused session always gets the ack that wakes it: no window deadlock.
        lim = self.limits
        return max(lim.low_watermark, lim.high_watermark // 4) if self.acking else lim.low_watermark

    def _after_write(self) -> None:
        if self.lead_until is not None and self.bytes_sent >= self.lead_until:
            self.lead_until = None  # the credit the reader's progress bought is spent: held until it reads more
            self.set_reader_behind(True)
        if self.paused and not self.reader_behind and self.held <= self._resume_below:
            self._set_paused(False)
        if self.acking and self.unacked > self.limits.retained_cap:
            self._policy_close(1008, "acknowledgement window exceeded")

    async def _write(self, data: bytes, tokens: int = 0) -> None:
        t0 = self.send_started = time.monotonic()
        await self._send(data)
        self._written(t0, (data,), tokens)

    async def _write_many(self, frames: list[bytes], tokens: int) -> None:
        assert self._send_many is not None
        t0 = self.send_started = time.monotonic()
        await self._send_many(frames)
        self._written(t0, frames, tokens)

    def set_pacing_clock(self, clock: Callable[[], float] | None) -> None:
        """``clock()``: seconds a pacing wrapper around this socket's ``send`` has held it (rtws.ray's frame pacing),
        which is not time blocked on the reader."""
        self.pacing_clock = clock
        self._paced_seen = clock() if clock is not None else 0.0

    def _written(self, t0: float, frames: Sequence[bytes], tokens: int) -> None:
        """Account one transport write of ``frames`` (each its own message) that started at ``t0``."""
        self.send_started = None
        blocked = time.monotonic() - t0
        if self.pacing_clock is not None:
            paced = self.pacing_clock()
            blocked -= paced - self._paced_seen
            self._paced_seen = paced
        self.blocked_s += max(0.0, blocked)
        self.writes += 1
        self.frames_sent += len(frames)
        for data in frames:
            self.bytes_sent += len(data)
            self.hooks.frame_sent(len(data), tokens)
            tokens = 0  # the write's tokens, counted once

    def _record(self, gen: Generation, reason: str) -> None:
        rec = record_template(gen.model, gen.id, client=self.client, session=self.id, transport=self.transport)
        self.hooks.generation_finished(rec.finish(
            request_id=gen.rid, reason=reason, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.sent_tokens,
            started=gen.started, first_at=gen.first_sent, now=time.monotonic(), queue_s=gen.queue_s))

    async def flush(self, timeout: float) -> bool:
        """Wait until everything queued has been written (or ``timeout``). True when empty."""
        import asyncio

        deadline = time.monotonic() + timeout
        while ((self._first or self._replay or self._control or self._pending or self.send_started is not None)
               and not self.closed and self.attached):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def cancel_all(self, reason: str = "cancelled") -> None:
        """End every live generation with ``done {reason}`` (drain, timeout). The frames are queued."""
        for gid in list(self.live):
            gen = self.live.pop(gid)
            self._stop(gen)
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
            self._stop(gen)
            self._record(gen, "cancelled")
        self.live.clear()
        self._pending.clear()
        self._control.clear()
        self._first.clear()
        self._replay.clear()
        self._retained.clear()
        self.conversations.clear()
        self.buffered = self.unacked = 0
        if self.store is not None:
            self.store.discard(self)
        self.control_bytes = 0
        self.buffered = 0
        self._wakeup()


def _prompt_target(model: Any, max_tokens: int) -> int:
    """Longest conversation prompt to aim for: the model's prompt cap, leaving room to answer.

    Room is ``min(max_tokens, context / 4)`` tokens, so a long ``max_tokens`` does not wipe the history.
    """
    cap: int = model.max_prompt_tokens
    ctx = getattr(model, "context_len", None)
    if isinstance(ctx, int) and ctx > 0:
        cap = min(cap, ctx - min(max_tokens, ctx // 4))
    return max(1, cap)


def _encode(model: Any, mode: str, conv: Conversation, extra: Any, skip: int) -> list[int]:
    if mode == "text":
        ids: list[int] = model.encode(conv.text(extra, skip), None)
    else:
        ids = model.encode(None, conv.messages(extra, skip))
    return ids
