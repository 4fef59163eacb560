"""The OpenAI Realtime API (text) on ``/v1/realtime``: Realtime events <-> rtws session calls.

Only the edges translate. A Realtime connection is an ordinary
:class:`rtws.session.Session` (same generation table, limits, bounded send
buffer, backpressure, cancel, metrics and log line, with
``transport="realtime"``); this module adds:

- :class:`RealtimeConnection`, which parses client events, keeps the
  per-response state, and turns ``response.create`` / ``response.cancel``
  into the session's ``generate`` / ``cancel``; the conversation itself is
  one conversation of the session's store (:mod:`rtws.conversations`, the
  one behind ``generate {conversation}``), seen through
  :class:`ConversationView`;
- :class:`RealtimeCodec`, the session's codec for this transport: it turns
  the session's native server frames (``ready``, ``delta``, ``done``,
  ``error``) into the Realtime event sequence, one JSON event per line; the
  socket writer sends each line as one text message;
- :func:`serve`, the ASGI handler the app routes ``/v1/realtime`` to.

Ordering: a response's opening events are queued as one control frame right
after the engine accepted it, so they precede its first delta (control frames
are written before pending deltas, and engine events arrive on a later loop
turn). Its closing events are produced when its ``done`` is written, so the
assistant item holds exactly the text that was delivered.

The supported subset is documented in ``docs/realtime.md``.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import msgspec

from . import protocol
from . import realtime_events as ev
from .auth import key_id, key_ok
from .conversations import Conversation, ConversationError
from .conversations import Item as StoredItem
from .errors import RtwsError
from .http.asgi import Receive, Scope, Send, bearer_token, client_address
from .protocol import Cancel, Delta, Done, Error, Generate, Message, ProtocolError, Ready

if TYPE_CHECKING:
    from .app import App, Connection
    from .registry import Served
    from .session import Offload, Session

log = logging.getLogger("rtws.realtime")

PATH: Final = "/v1/realtime"
SUBPROTOCOL: Final = "realtime"
KEY_SUBPROTOCOL_PREFIX: Final = "openai-insecure-api-key."
AUDIO_MESSAGE: Final = "audio is not supported by this server (text only)"
MAX_ITEMS: Final = 1024
MAX_CONVERSATION_CHARS: Final = 4 << 20
_RECENT_RESPONSES: Final = 1024

_STATUS_FOR_REASON: Final = {
    "stop": ("completed", None), "length": ("incomplete", "max_output_tokens"),
    "cancelled": ("cancelled", "client_cancelled"), "error": ("failed", None), "timeout": ("failed", None),
}
_ERROR_TYPE_FOR_CODE: Final = {
    "rate_limited": "rate_limit_error", "overloaded": "server_error", "internal": "server_error",
}


class RealtimeError(Exception):
    """A client event that must be answered with an ``error`` event (the connection stays open)."""

    def __init__(self, code: str, message: str, param: str | None = None,
                 type: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.type = type


def part_type(role: str) -> str:
    """The Realtime content type of a stored item's text: ``output_text`` for the assistant, else ``input_text``."""
    return "output_text" if role == "assistant" else "input_text"


class ConversationView:
    """The Realtime view of one server-held conversation (:class:`rtws.conversations.Conversation`).

    The items live in the session's conversation store; this adds what the
    Realtime API shows on top (``in_progress`` status of the reply being
    generated, ``incomplete`` for replies cut short or truncated, content
    part types) and its bounds (items, characters: nothing is dropped silently).
    """

    def __init__(self, conv: Conversation, max_items: int = MAX_ITEMS, max_chars: int = MAX_CONVERSATION_CHARS) -> None:
        self.conv = conv
        self.max_items = min(max_items, conv.max_items)
        self.max_chars = max_chars
        self.in_progress: set[str] = set()

    @property
    def id(self) -> str:
        return self.conv.id

    def get(self, item_id: str, param: str = "item_id") -> StoredItem:
        try:
            return self.conv.get(item_id)
        except ConversationError:
            raise RealtimeError("item_not_found", f"no item {item_id[:64]!r} in the conversation", param) from None

    def out(self, item: StoredItem) -> ev.ItemOut:
        status = "in_progress" if item.id in self.in_progress else "incomplete" if item.truncated else "completed"
        content = [] if item.id in self.in_progress else [ev.ContentOut(type=part_type(item.role), text=item.content)]
        return ev.ItemOut(id=item.id, role=item.role, status=status, content=content)

    def insert(self, role: str, text: str, item_id: str | None, previous_item_id: str | None) -> StoredItem:
        """Add an item after ``previous_item_id`` (``"root"``: first; None: last)."""
        if item_id is not None and any(it.id == item_id for it in self.conv.items):
            raise RealtimeError("duplicate_item_id", f"item id {item_id!r} is already in the conversation", "item.id")
        if len(self.conv.items) >= self.max_items:
            raise RealtimeError("conversation_full", f"at most {self.max_items} items per conversation")
        if sum(len(it.content) for it in self.conv.items) + len(text) > self.max_chars:
            raise RealtimeError("conversation_full", f"at most {self.max_chars} characters per conversation")
        after = None if previous_item_id is None else "" if previous_item_id == "root" else previous_item_id
        if after:
            self.get(after, "previous_item_id")
        return self.conv.add(role, text, after=after, item_id=item_id or self.fresh_id())

    def fresh_id(self) -> str:
        """A new ``item_<n>`` that no client-chosen id already took."""
        while True:
            item_id = self.conv.new_id()
            if not any(it.id == item_id for it in self.conv.items):
                return item_id

    def previous_id(self, item: StoredItem) -> str | None:
        pos = self.conv.index(item.id)
        return self.conv.items[pos - 1].id if pos > 0 else None

    def messages(self) -> list[Message]:
        return [Message(role=it.role, content=it.content) for it in self.conv.items if it.id not in self.in_progress]


@dataclass(slots=True, eq=False)
class Response:
    """A live response: what its closing events need. ``item`` is in the conversation unless out of band."""

    id: str
    item: StoredItem
    conversation: ConversationView | None
    max_output_tokens: int | str
    metadata: dict[str, str] | None
    event_id: str | None = None  # the response.create's, for errors that end the response late
    fitting: bool = False  # its prompt is being fitted to the context in the tokenizer thread (not in the engine)
    text: list[str] = field(default_factory=list)


@dataclass(slots=True)
class SessionConfig:
    """``session.update`` state; response defaults."""

    model: str
    instructions: str = ""
    max_output_tokens: int | str = "inf"
    truncation: str = "auto"  # "auto": the oldest items leave the prompt (not the conversation) when it is too long
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None


class RealtimeCodec(protocol.Codec):
    """The session codec for ``/v1/realtime``: native server frames in, Realtime JSON events out.

    Stateful (one per connection, unlike the shared native codecs): it
    delegates to its :class:`RealtimeConnection`. ``encode`` returns the
    events one per line (``\\n`` never occurs inside msgspec's JSON); an empty
    result means nothing to send.
    """

    def __init__(self, conn: RealtimeConnection) -> None:
        super().__init__(protocol.SUBPROTOCOL_JSON)
        self.conn = conn

    def encode(self, frame: Any) -> bytes:
        return self.conn.translate(frame)


class RealtimeConnection:
    """One Realtime connection's state, on top of one :class:`Session`. Create, then :meth:`attach`."""

    def __init__(self, config: SessionConfig, max_tokens_limit: int,
                 rate_limit: Callable[[], ev.RateLimit | None] | None = None, *,
                 max_item_bytes: int = 64 * 1024, offload: Offload | None = None) -> None:
        self.config = config
        self.offload = offload  # the tokenizer thread: fits long conversations to the context (truncation "auto")
        self.max_tokens_limit = max_tokens_limit
        self.rate_limit = rate_limit
        # Events a client asks for (item echoes, retrieves, errors) are control frames, bounded by the
        # session's control and error budgets (past them the socket is closed 1008). An item's text is
        # capped so that its echo (added + done) always fits in that budget.
        self.max_item_bytes = max_item_bytes
        self._error_ctx: tuple[str, str | None, str | None] | None = None
        self.codec = RealtimeCodec(self)
        self.session: Session | None = None
        self._conversation: ConversationView | None = None
        self.responses: dict[str, Response] = {}
        self.active: Response | None = None  # the in-conversation response, at most one
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._events = 0
        self._creating: tuple[str, str | None] | None = None  # (response id, client event id) during submit
        self._encode = msgspec.json.Encoder().encode
        self._decoder = msgspec.json.Decoder(ev.ClientEvent)
        self._raw = msgspec.json.Decoder()

    def attach(self, session: Session) -> None:
        """Bind to the session; the Realtime conversation is one conversation of its store."""
        self.session = session
        self._conversation = ConversationView(session.conversations.get_or_create("conv_" + secrets.token_hex(12)))

    @property
    def conversation(self) -> ConversationView:
        assert self._conversation is not None, "attach() first"
        return self._conversation

    # ------------------------------------------------------------------ ids and output

    def _eid(self) -> str:
        self._events += 1
        return f"event_{self._events:x}"

    def _emit(self, *events: Any) -> None:
        """Queue events ahead of pending deltas (one control frame)."""
        assert self.session is not None
        self.session.queue(events)

    def _join(self, events: tuple[Any, ...] | list[Any]) -> bytes:
        return b"\n".join(self._encode(e) for e in events)

    def _error(self, err: RealtimeError, event_id: str | None) -> None:
        """Queue an ``error`` event as the session's own ``error`` frame, so its error budget applies."""
        session = self.session
        assert session is not None
        session.hooks.rejected(err.code)
        self._error_ctx = (err.type, err.param, event_id[:128] if event_id is not None else None)
        try:
            session.queue(Error(code=err.code, message=err.message))
        finally:
            self._error_ctx = None

    def session_out(self) -> ev.SessionOut:
        c = self.config
        assert self.session is not None
        return ev.SessionOut(id="sess_" + self.session.id, model=c.model, instructions=c.instructions,
                             max_output_tokens=c.max_output_tokens, output_modalities=["text"],
                             truncation=c.truncation, temperature=c.temperature)

    # ------------------------------------------------------------------ inbound

    def on_message(self, data: bytes | str) -> None:
        """Handle one client message. Never raises for bad input: answers with an ``error`` event."""
        session = self.session
        if session is None or session.closed:
            return
        session.last_activity = time.monotonic()
        event_id: str | None = None
        try:
            try:
                event = self._decoder.decode(data)
            except msgspec.ValidationError as exc:
                raise self._classify(data, exc) from None
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
                raise RealtimeError("invalid_json", "the message is not valid JSON") from None
            event_id = event.event_id
            self._dispatch(event)
        except RealtimeError as err:
            self._error(err, event_id if event_id is not None else self._raw_event_id(data))
        except ProtocolError as exc:
            self._error(RealtimeError(exc.code.value, exc.message), event_id)
        except Exception:
            # A bug, not bad input: log the cause, answer `internal`, keep the connection and its responses.
            log.exception("realtime event handling failed", extra={"event": "frame_error", "session": session.id})
            self._error(RealtimeError("internal", "internal error handling the event", type="server_error"),
                        event_id)

    def _raw_event_id(self, data: bytes | str) -> str | None:
        try:
            raw = self._raw.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
            return None
        eid = raw.get("event_id") if isinstance(raw, dict) else None
        return eid[:128] if isinstance(eid, str) else None

    def _classify(self, data: bytes | str, exc: msgspec.ValidationError) -> RealtimeError:
        try:
            raw = self._raw.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError):
            return RealtimeError("invalid_json", "the message is not valid JSON")
        if not isinstance(raw, dict):
            return RealtimeError("invalid_event", "an event must be a JSON object")
        etype = raw.get("type")
        if not isinstance(etype, str):
            return RealtimeError("invalid_event", "an event needs a string field 'type'", "type")
        short = etype[:64]
        if etype in ev.AUDIO_TYPES:
            return RealtimeError("audio_not_supported", f"{short}: {AUDIO_MESSAGE}", "type")
        if etype not in ev.CLIENT_TYPES:
            return RealtimeError("unknown_event", f"unknown event type {short!r}", "type")
        # msgspec names the path: "Expected `str`, got `int` - at `$.item.role`"
        text = str(exc)
        param = text.rpartition("at `$.")[2].rstrip("`") if "at `$." in text else None
        code = "invalid_value"
        if text.startswith("Object missing required field"):
            code = "missing_required_parameter"
            name = text.split("`")[1] if "`" in text else None
            param = f"{param}.{name}" if param and name else name
        return RealtimeError(code, f"{short}: {text}", param)

    def _dispatch(self, event: ev.ClientEvent) -> None:
        if isinstance(event, ev.ResponseCreate):
            self._response_create(event)
        elif isinstance(event, ev.ResponseCancel):
            self._response_cancel(event)
        elif isinstance(event, ev.ItemCreate):
            self._item_create(event)
        elif isinstance(event, ev.SessionUpdate):
            self._session_update(event)
        elif isinstance(event, ev.ItemRetrieve):
            conv = self.conversation
            self._emit(ev.ItemRetrieved(event_id=self._eid(), item=conv.out(conv.get(event.item_id))))
        elif isinstance(event, ev.ItemDelete):
            self._item_delete(event)
        elif isinstance(event, ev.ItemTruncate):
            self._item_truncate(event)

    # ------------------------------------------------------------------ session and items

    def _session_update(self, event: ev.SessionUpdate) -> None:
        s, c = event.session, self.config
        if s.type is not None and s.type != "realtime":
            raise RealtimeError("audio_not_supported", f"session type {s.type[:32]!r}: {AUDIO_MESSAGE}",
                                "session.type")
        _check_modalities(s.output_modalities, "session.output_modalities")
        _check_tools(s.tools, "session.tools")
        if s.model is not None and s.model != c.model:
            assert self.session is not None
            if self.session.models.get(s.model) is None:
                raise RealtimeError("model_not_found", f"unknown model {s.model[:64]!r}", "session.model")
        self._check_max_tokens(s.max_output_tokens, "session.max_output_tokens")
        truncation = _truncation(s.truncation)
        # Validated: apply all at once.
        if truncation is not None:
            c.truncation = truncation
        if s.model is not None:
            c.model = s.model
        if s.instructions is not None:
            c.instructions = s.instructions
        if s.max_output_tokens is not None:
            c.max_output_tokens = s.max_output_tokens
        if s.temperature is not None:
            c.temperature = s.temperature
        if s.top_p is not None:
            c.top_p = s.top_p
        if s.top_k is not None:
            c.top_k = s.top_k
        if s.seed is not None:
            c.seed = s.seed
        self._emit(ev.SessionUpdated(event_id=self._eid(), session=self.session_out()))

    def _check_max_tokens(self, value: int | str | None, param: str) -> None:
        if isinstance(value, int) and value > self.max_tokens_limit:
            raise RealtimeError("invalid_value", f"max_output_tokens must be <= {self.max_tokens_limit}", param)

    def _item_create(self, event: ev.ItemCreate) -> None:
        role, text = _message(event.item, "item")
        if len(self._encode(text)) > self.max_item_bytes:
            raise RealtimeError("item_too_large", f"an item's text is at most {self.max_item_bytes} bytes as JSON "
                                "(its echo must fit in the connection's control budget)", "item.content")
        conv = self.conversation
        item = conv.insert(role, text, event.item.id, event.previous_item_id)
        prev = conv.previous_id(item)
        out = conv.out(item)
        self._emit(ev.ItemAdded(event_id=self._eid(), previous_item_id=prev, item=out),
                   ev.ItemDone(event_id=self._eid(), previous_item_id=prev, item=out))

    def _item_delete(self, event: ev.ItemDelete) -> None:
        conv = self.conversation
        item = conv.get(event.item_id)
        if item.id in conv.in_progress:
            raise RealtimeError("item_in_progress", "cancel the response before deleting its item", "item_id")
        conv.conv.delete(item.id)
        self._emit(ev.ItemDeleted(event_id=self._eid(), item_id=item.id))

    def _item_truncate(self, event: ev.ItemTruncate) -> None:
        conv = self.conversation
        item = conv.get(event.item_id)
        if item.role != "assistant":
            raise RealtimeError("invalid_value", "only assistant items can be truncated", "item_id")
        if item.id in conv.in_progress:
            raise RealtimeError("item_in_progress", "cancel the response before truncating its item", "item_id")
        if event.content_index != 0:
            raise RealtimeError("invalid_value", "a text item has one content part (index 0)", "content_index")
        text = item.content
        # Text has no playback position: audio_end_ms counts characters of the text kept.
        if event.audio_end_ms > len(text):
            raise RealtimeError("invalid_value", f"audio_end_ms ({event.audio_end_ms}) is past the end of the "
                                f"text ({len(text)} characters)", "audio_end_ms")
        conv.conv.truncate(item.id, text[:event.audio_end_ms])
        self._emit(ev.ItemTruncated(event_id=self._eid(), item_id=item.id, content_index=event.content_index,
                                    audio_end_ms=event.audio_end_ms))

    # ------------------------------------------------------------------ responses

    def _response_create(self, event: ev.ResponseCreate) -> None:
        session = self.session
        assert session is not None
        r = event.response or ev.ResponseIn()
        c = self.config
        _check_modalities(r.output_modalities, "response.output_modalities")
        _check_tools(r.tools, "response.tools")
        if r.conversation not in (None, "auto", "none"):
            raise RealtimeError("invalid_value", "conversation must be 'auto' or 'none'", "response.conversation")
        if r.metadata is not None and (len(r.metadata) > ev.MAX_METADATA_KEYS or any(
                len(k) > 64 or len(v) > ev.MAX_METADATA_VALUE for k, v in r.metadata.items())):
            raise RealtimeError("invalid_value", f"metadata: at most {ev.MAX_METADATA_KEYS} keys, keys up to 64 "
                                f"and values up to {ev.MAX_METADATA_VALUE} characters", "response.metadata")
        self._check_max_tokens(r.max_output_tokens, "response.max_output_tokens")
        in_conversation = r.conversation != "none"
        if in_conversation and self.active is not None:
            raise RealtimeError("conversation_already_has_active_response",
                                f"response {self.active.id} is in progress in this conversation; cancel it or "
                                "wait for response.done (out-of-band responses, conversation 'none', may overlap)")
        if in_conversation and len(self.conversation.conv.items) >= self.conversation.max_items:
            raise RealtimeError("conversation_full", f"at most {self.conversation.max_items} items per conversation: "
                                "delete some before the reply is added")
        instructions = r.instructions if r.instructions is not None else c.instructions
        messages = [Message(role="system", content=instructions)] if instructions else []
        if r.input is not None:
            for i, given in enumerate(r.input):
                param = f"response.input[{i}]"
                if given.type == "item_reference":
                    if given.id is None:
                        raise RealtimeError("missing_required_parameter", "item_reference needs an id", param)
                    ref = self.conversation.get(given.id, param + ".id")
                    if ref.id in self.conversation.in_progress:
                        raise RealtimeError("item_in_progress", "that item is still being generated", param + ".id")
                    messages.append(Message(role=ref.role, content=ref.content))
                else:
                    role, text = _message(given, param)
                    messages.append(Message(role=role, content=text))
        elif in_conversation:
            messages += self.conversation.messages()
        else:
            raise RealtimeError("missing_required_parameter", "an out-of-band response (conversation 'none') "
                                "needs its own 'input' items", "response.input")
        if not messages:
            raise RealtimeError("empty_conversation", "nothing to respond to: the conversation is empty and "
                                "there are no instructions", "response")
        limit = r.max_output_tokens if r.max_output_tokens is not None else c.max_output_tokens
        max_tokens = limit if isinstance(limit, int) else self.max_tokens_limit
        rid = "resp_" + secrets.token_hex(10)
        frame = Generate(
            id=rid, messages=messages, model=c.model, max_tokens=max_tokens,
            temperature=r.temperature if r.temperature is not None else c.temperature,
            top_p=r.top_p if r.top_p is not None else c.top_p,
            top_k=r.top_k if r.top_k is not None else c.top_k,
            seed=r.seed if r.seed is not None else c.seed)
        model = session.models.get(c.model)
        if in_conversation and r.input is None and c.truncation == "auto" and self.offload is not None \
                and model is not None:
            # Fit the history to the context first (tokenizer thread), then generate: see _fitted.
            resp = self._open(rid, True, limit, r.metadata, event.event_id, accepted=False)
            resp.fitting = True
            system = messages[:1] if instructions else []
            history = self.conversation.conv.snapshot()
            history.items = [it for it in history.items if it.id not in self.conversation.in_progress]
            target = _prompt_target(model, max_tokens)

            def work() -> int:
                def encode(cv: Conversation, extra: Any, skip: int) -> list[int]:
                    ids: list[int] = model.encode(None, [{"role": m.role, "content": m.content} for m in system]
                                                  + cv.messages(skip=skip))
                    return ids

                return history.fit((), encode, target)[1]

            fut = self.offload(work)
            fut.add_done_callback(lambda f: self._fitted(resp, frame, system, history, f))
            return
        self._creating = (rid, event.event_id)
        try:
            session.handle(frame)
        finally:
            self._creating = None
        if rid not in session.live:
            return  # refused by the session (rate limit): the error event is queued
        self._open(rid, in_conversation, limit, r.metadata, event.event_id)

    def _fitted(self, resp: Response, frame: Generate, system: list[Message], history: Conversation,
                fut: Any) -> None:
        """The tokenizer thread fitted ``resp``'s history (on the loop): generate, unless it ended meanwhile."""
        session = self.session
        if session is None or session.closed or self.responses.get(resp.id) is not resp:
            return  # cancelled (its response.done is queued) or the socket is gone
        resp.fitting = False
        exc = None if fut.cancelled() else fut.exception()
        if fut.cancelled() or exc is not None:
            code = "invalid_params" if isinstance(exc, ValueError) else "internal"
            if code == "internal":
                log.error("fitting a conversation failed", exc_info=exc, extra={"event": "frame_error",
                                                                                "session": session.id})
            session.queue(Error(code=code, message=str(exc)[:300] if code == "invalid_params" else
                                "internal error preparing the prompt", id=resp.id))
            return
        skip: int = fut.result()
        messages = system + [Message(role=m["role"], content=m["content"]) for m in history.messages(skip=skip)]
        try:
            session.handle(msgspec.structs.replace(frame, messages=messages))
        except ProtocolError as err:  # refused now (too many generations, draining, ...): end it failed
            session.hooks.rejected(err.code.value)
            session.queue(Error(code=err.code.value, message=err.message, id=resp.id))
            return
        if resp.id in session.live:
            events = self._rate_limits()
            if events:
                self._emit(*events)
        # else: a rate-limited generate queued an error with resp's id: _native_error ended the response.

    def _open(self, rid: str, in_conversation: bool, limit: int | str, metadata: dict[str, str] | None,
              event_id: str | None, accepted: bool = True) -> Response:
        """Register a response and queue its opening events (before any of its deltas)."""
        conv = self.conversation if in_conversation else None
        prev: str | None = None
        if conv is not None:
            # Placed now, filled with the delivered text at done (its limits were checked above: no text yet).
            item = conv.conv.add("assistant", "", item_id=conv.fresh_id())
            conv.in_progress.add(item.id)
            prev = conv.previous_id(item)
        else:
            item = StoredItem(id=f"item_{rid[5:]}", role="assistant", content="")
        resp = Response(id=rid, item=item, conversation=conv, max_output_tokens=limit, metadata=metadata,
                        event_id=event_id)
        self.responses[rid] = resp
        if conv is not None:
            self.active = resp
        out = _out(conv, item, in_progress=True)
        events: list[Any] = [
            ev.ResponseCreated(event_id=self._eid(), response=self._response_out(resp, "in_progress")),
            ev.OutputItemAdded(event_id=self._eid(), response_id=rid, output_index=0, item=out)]
        if conv is not None:
            events.append(ev.ItemAdded(event_id=self._eid(), previous_item_id=prev, item=out))
        events.append(ev.ContentPartAdded(event_id=self._eid(), response_id=rid, item_id=item.id, output_index=0,
                                          content_index=0, part=ev.PartOut(text="")))
        if accepted:
            events += self._rate_limits()
        self._emit(*events)
        return resp

    def _rate_limits(self) -> list[Any]:
        rl = self.rate_limit() if self.rate_limit is not None else None
        return [ev.RateLimitsUpdated(event_id=self._eid(), rate_limits=[rl])] if rl is not None else []

    def _response_out(self, resp: Response, status: str, details: ev.StatusDetails | None = None,
                      usage: ev.UsageOut | None = None) -> ev.ResponseOut:
        return ev.ResponseOut(
            id=resp.id, status=status, status_details=details,
            conversation_id=resp.conversation.id if resp.conversation is not None else None,
            output=[_out(resp.conversation, resp.item)] if status != "in_progress" else [],
            max_output_tokens=resp.max_output_tokens,
            metadata=resp.metadata, usage=usage)

    def _response_cancel(self, event: ev.ResponseCancel) -> None:
        session = self.session
        assert session is not None
        rid = event.response_id
        if rid is None:
            resp = self.active or (next(reversed(self.responses.values())) if self.responses else None)
            if resp is None:
                raise RealtimeError("response_cancel_not_active", "there is no response in progress to cancel")
            rid = resp.id
        elif rid not in self.responses:
            if rid in self._recent:
                return  # already done: cancelling it is a no-op
            raise RealtimeError("response_not_found", f"no response {rid[:64]!r}", "response_id")
        resp = self.responses.get(rid)
        if resp is not None and resp.fitting:  # not in the engine yet: it ends here
            del self.responses[rid]
            self._emit(*self._close_response(resp, "cancelled", None))
        elif rid in session.live:
            session.handle(Cancel(id=rid))
        # else: finished in the engine, its done is queued and about to be written

    # ------------------------------------------------------------------ outbound (called by the session's codec)

    def translate(self, frame: Any) -> bytes:
        """Native server frame (or a tuple of Realtime events queued by this class) -> JSON lines."""
        if isinstance(frame, Delta):
            resp = self.responses.get(str(frame.id))
            if resp is None or not frame.text:
                return b""
            resp.text.append(frame.text)
            return self._encode(ev.TextDelta(event_id=self._eid(), response_id=resp.id, item_id=resp.item.id,
                                             output_index=0, content_index=0, delta=frame.text))
        if isinstance(frame, tuple):
            return self._join(frame)
        if isinstance(frame, Done):
            return self._done(frame)
        if isinstance(frame, Error):
            return self._native_error(frame)
        if isinstance(frame, Ready):
            return self._encode(ev.SessionCreated(event_id=self._eid(), session=self.session_out()))
        return b""

    def _done(self, frame: Done) -> bytes:
        resp = self.responses.pop(str(frame.id), None)
        if resp is None:
            return b""
        u = frame.usage
        cached = u.cached_tokens or 0
        usage = ev.UsageOut(
            total_tokens=u.prompt_tokens + u.completion_tokens, input_tokens=u.prompt_tokens,
            output_tokens=u.completion_tokens,
            input_token_details=ev.InputTokenDetails(cached_tokens=cached, text_tokens=u.prompt_tokens),
            output_token_details=ev.OutputTokenDetails(text_tokens=u.completion_tokens))
        return self._join(self._close_response(resp, frame.reason, usage))

    def _close_response(self, resp: Response, reason: str, usage: ev.UsageOut | None,
                        error: ev.StatusError | None = None) -> list[Any]:
        """The closing events of ``resp`` (popped from the table by the caller); fills its conversation item."""
        self._recent[resp.id] = None
        if len(self._recent) > _RECENT_RESPONSES:
            self._recent.popitem(last=False)
        text = "".join(resp.text)
        item = resp.item
        status, why = _STATUS_FOR_REASON.get(reason, ("failed", None))
        if status == "failed" and error is None:
            error = ev.StatusError(type="server_error", code=reason)
        details = ev.StatusDetails(type=status, reason=why, error=error)
        conv = resp.conversation
        # The reply as delivered; cut short (cancelled, failed) it is kept and marked truncated.
        item.content = text
        item.truncated = status in ("cancelled", "failed")
        if conv is not None:
            conv.in_progress.discard(item.id)
            if self.active is resp:
                self.active = None
        rid, iid = resp.id, item.id
        out = _out(conv, item)
        events: list[Any] = [
            ev.TextDone(event_id=self._eid(), response_id=rid, item_id=iid, output_index=0, content_index=0,
                        text=text),
            ev.ContentPartDone(event_id=self._eid(), response_id=rid, item_id=iid, output_index=0,
                               content_index=0, part=ev.PartOut(text=text)),
            ev.OutputItemDone(event_id=self._eid(), response_id=rid, output_index=0, item=out)]
        if conv is not None and any(it is item for it in conv.conv.items):
            events.append(ev.ItemDone(event_id=self._eid(), previous_item_id=conv.previous_id(item), item=out))
        events.append(ev.ResponseDone(event_id=self._eid(),
                                      response=self._response_out(resp, status, details, usage)))
        return events

    def _native_error(self, frame: Error) -> bytes:
        if self._error_ctx is not None:  # one of ours (see _error)
            etype, param, client_event = self._error_ctx
            return self._encode(ev.ErrorEvent(event_id=self._eid(), error=ev.ErrorBody(
                type=etype, code=frame.code, message=frame.message, param=param, event_id=client_event)))
        event_id = None
        if self._creating is not None and frame.id == self._creating[0]:
            event_id = self._creating[1]
        elif frame.id is not None and str(frame.id) in self.responses:
            event_id = self.responses[str(frame.id)].event_id
        message = frame.message
        if frame.retry_after is not None:
            message = f"{message} (retry_after {frame.retry_after} s)"
        code = frame.code
        err = ev.ErrorEvent(event_id=self._eid(), error=ev.ErrorBody(
            type=_ERROR_TYPE_FOR_CODE.get(code, "invalid_request_error"), code=code, message=message,
            event_id=event_id))
        # A response already announced that the session refuses late (its prompt failed to tokenize, say)
        # gets no native done: close it here, failed.
        resp = self.responses.pop(str(frame.id), None) if frame.id is not None else None
        if resp is None:
            return self._encode(err)
        return self._join([err, *self._close_response(resp, "error", None, ev.StatusError(type=err.error.type,
                                                                                            code=code))])


def _out(conv: ConversationView | None, item: StoredItem, in_progress: bool = False) -> ev.ItemOut:
    """An item as the Realtime API shows it (an out-of-band reply is in no conversation)."""
    if conv is not None:
        return conv.out(item)
    if in_progress:
        return ev.ItemOut(id=item.id, role=item.role, status="in_progress", content=[])
    return ev.ItemOut(id=item.id, role=item.role, status="incomplete" if item.truncated else "completed",
                      content=[ev.ContentOut(type=part_type(item.role), text=item.content)])


def _truncation(value: Any) -> str | None:
    """``session.truncation`` -> "auto" / "disabled" (None: not given). A retention ratio reads as "auto"."""
    if value is None:
        return None
    if value in ("auto", "disabled"):
        return str(value)
    if isinstance(value, dict) and value.get("type") == "retention_ratio":
        return "auto"
    raise RealtimeError("invalid_value", "truncation must be 'auto', 'disabled' or a retention_ratio object",
                        "session.truncation")


def _prompt_target(model: Any, max_tokens: int) -> int:
    """Longest prompt to fit a conversation into: the model's prompt cap, leaving ``min(max_tokens, context/4)``
    tokens to answer (the rule ``generate {conversation}`` uses, so both front doors keep the same history)."""
    cap: int = model.max_prompt_tokens
    ctx = getattr(model, "context_len", None)
    if isinstance(ctx, int) and ctx > 0:
        cap = min(cap, ctx - min(max_tokens, ctx // 4))
    return max(1, cap)


def _check_modalities(mods: list[str] | None, param: str) -> None:
    if mods is None:
        return
    if "audio" in mods:
        raise RealtimeError("audio_not_supported", f"output_modalities {mods[:4]!r}: {AUDIO_MESSAGE}", param)
    if mods != ["text"]:
        raise RealtimeError("invalid_value", "output_modalities must be ['text']", param)


def _check_tools(tools: list[Any] | None, param: str) -> None:
    if tools:
        raise RealtimeError("tools_not_supported", "tools (function calling, MCP) are not supported by this server",
                            param)


_PART_TYPES: Final = {"user": ("input_text", "text"), "system": ("input_text", "text"),
                      "assistant": ("output_text", "text")}


def _message(item: ev.ItemIn, param: str) -> tuple[str, str]:
    """A client ``message`` item -> ``(role, text)`` (text parts joined by newlines). Raises naming the field."""
    if item.type != "message":
        code = "audio_not_supported" if "audio" in item.type else "unsupported_item_type"
        raise RealtimeError(code, f"item type {item.type[:64]!r} is not supported (only 'message')",
                            param + ".type")
    if item.role not in _PART_TYPES:
        raise RealtimeError("invalid_value", "role must be 'user', 'system' or 'assistant'", param + ".role")
    if item.content is None:
        raise RealtimeError("missing_required_parameter", "a message item needs 'content'", param + ".content")
    allowed = _PART_TYPES[item.role]
    texts: list[str] = []
    for i, part in enumerate(item.content):
        where = f"{param}.content[{i}]"
        if "audio" in part.type or part.audio is not None:
            raise RealtimeError("audio_not_supported", f"content type {part.type[:32]!r}: {AUDIO_MESSAGE}",
                                where + ".type")
        if part.type not in allowed:
            raise RealtimeError("invalid_value", f"content type for role {item.role!r} must be one of "
                                f"{list(allowed)}, not {part.type[:32]!r}", where + ".type")
        if part.text is None:
            raise RealtimeError("missing_required_parameter", "a text part needs 'text'", where + ".text")
        texts.append(part.text)
    return item.role, "\n".join(texts)


# --------------------------------------------------------------------------- ASGI edge


def offered_key(subprotocols: list[str]) -> str | None:
    """The API key a browser passes as a subprotocol (``openai-insecure-api-key.<key>``), if any."""
    for name in subprotocols:
        if name.startswith(KEY_SUBPROTOCOL_PREFIX):
            return name[len(KEY_SUBPROTOCOL_PREFIX):]
    return None


def rate_limit_probe(app: App, key: str) -> Callable[[], ev.RateLimit | None] | None:
    limiter = app.rate_limiter
    if limiter is None:
        return None

    def probe() -> ev.RateLimit:
        remaining, reset_s = limiter.peek(key)
        return ev.RateLimit(name="requests", limit=int(limiter.burst), remaining=int(remaining),
                            reset_seconds=round(reset_s, 3))

    return probe


def mount(app: App) -> None:
    """Serve the Realtime edge at ``/v1/realtime`` on ``app`` (pass it in ``App(routes=[...])``)."""

    async def handler(scope: Scope, receive: Receive, send: Send) -> None:
        await serve(app, scope, receive, send)

    app.websocket_route("/v1/realtime", handler)


async def serve(app: App, scope: Scope, receive: Receive, send: Send) -> None:
    """ASGI handler for ``/v1/realtime?model=NAME`` (``websocket.connect`` already received).

    Admission as for ``/ws`` (draining, Host and Origin allow-lists,
    ``max_connections``, the per-client connection quota); the API key comes
    from ``Authorization: Bearer`` or the browser subprotocol
    ``openai-insecure-api-key.<key>`` and is required when auth is on (there is
    no ``hello`` in this protocol). An unknown model is refused with 404.
    The session gets the same tokenizer thread, rate limiter and generation
    quota as a ``/ws`` session; it is never held for resume.
    """
    from .session import Session
    from .transport import tune_socket

    cfg = app.config
    try:
        model_name, served, rate_key, quota_key = _admit_upgrade(app, scope)
    except RtwsError as exc:  # the one rendering of a refused upgrade, as for /ws
        await app.reject_upgrade(send, exc.http_status, exc.code, exc.message)
        return
    offered = list(scope.get("subprotocols", []))
    try:
        await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL if SUBPROTOCOL in offered else None})
    except BaseException:
        if quota_key is not None:
            app.quota.close_connection(quota_key)
        raise
    tune_socket(send, cfg.transport_high_water, cfg.socket_send_buffer)

    async def send_events(data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        if raw:
            for line in raw.split(b"\n"):
                await send({"type": "websocket.send", "text": line.decode()})

    conn: Connection | None = None

    def policy_close(code: int, reason: str) -> None:
        if conn is not None:
            app.spawn(app.close_connection(conn, code, reason, flush=True))

    limits = app.session_limits
    rt = RealtimeConnection(SessionConfig(model=model_name or served.name), limits.max_tokens,
                            rate_limit_probe(app, rate_key), max_item_bytes=limits.max_control_bytes // 4,
                            offload=app.offload)
    session = Session(send_events, rt.codec, app.registry, limits, client=client_address(scope),
                      authenticated=True, rate_limiter=app.rate_limiter, hooks=app.hooks,
                      on_policy_close=policy_close, offload=app.offload,
                      quota=app.quota if app.quota.max_generations is not None else None, transport="realtime")
    rt.attach(session)
    session.rate_key = rate_key
    session.draining = app.draining
    conn = app.attach_connection(session, send, quota_key)
    session.start()
    try:
        while True:
            msg = await receive()
            if msg["type"] == "websocket.receive":
                data = msg.get("text")
                rt.on_message(data if data is not None else msg.get("bytes", b""))
            elif msg["type"] == "websocket.disconnect":
                break
    finally:
        app.detach_connection(conn)


def _admit_upgrade(app: App, scope: Scope) -> tuple[str | None, Served, str, str | None]:
    """The checks a ``/v1/realtime`` upgrade passes before it is accepted: (model name, model, rate key,
    quota key). Raises :class:`~rtws.errors.RtwsError` carrying the HTTP status to refuse with (the refusal
    already counted in ``hooks.rejected``). A quota slot taken here is the caller's to release."""
    cfg = app.config
    app.check_upgrade(scope)
    token = bearer_token(scope) or offered_key(list(scope.get("subprotocols", [])))
    if cfg.auth_enabled and not (token and key_ok(token, frozenset(cfg.api_keys))):
        app.hooks.rejected("unauthorized")
        raise RtwsError("unauthorized", "missing or invalid API key", status=401)
    if app.at_capacity:
        app.hooks.rejected("max_connections")
        raise RtwsError("overloaded", "too many connections", status=503)
    query = urllib.parse.parse_qs(scope.get("query_string", b"").decode("latin-1"))
    model_name = (query.get("model") or [None])[0]
    served = app.registry.get(model_name)
    if served is None:
        app.hooks.rejected("unknown_model")
        raise RtwsError("unknown_model", f"unknown model {str(model_name)[:64]!r}", status=404)
    # Only a verified key names the client; otherwise its address does.
    rate_key = "key:" + key_id(token) if token and cfg.auth_enabled else "addr:" + client_address(scope)
    quota_key: str | None = None
    if app.quota.max_connections is not None:
        over = app.quota.open_connection(rate_key)
        if over is not None:
            app.hooks.rejected("max_connections_per_client")
            raise RtwsError("overloaded", over, status=429)
        quota_key = rate_key
    return model_name, served, rate_key, quota_key


__all__ = ["PATH", "RealtimeCodec", "RealtimeConnection", "RealtimeError", "serve"]
