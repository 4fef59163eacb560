"""Wire protocol v1: frames, codecs and validation.

Pure: no I/O, no asyncio, no torch. Every frame is a msgspec Struct defined
once here; the msgpack and JSON codecs share them. :meth:`Codec.decode_client`
raises nothing but :class:`ProtocolError` (an :class:`~rtws.errors.RtwsError`):
a frame that cannot be accepted becomes one, carrying the error code the client
must receive.

The protocol is documented in ``docs/protocol.md``.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec

from .errors import RtwsError
from .generation import FinishReason

SUBPROTOCOL_MSGPACK: Final = "rtws.v1.msgpack"
SUBPROTOCOL_JSON: Final = "rtws.v1.json"
SUBPROTOCOLS: Final = (SUBPROTOCOL_MSGPACK, SUBPROTOCOL_JSON)

MAX_ID_LENGTH: Final = 128
MAX_STOP_STRINGS: Final = 16
MAX_STOP_LENGTH: Final = 256
MAX_SEED: Final = 2**63 - 1
# Numeric bounds, declared once: the WebSocket frames and the HTTP bodies (rtws/http/schemas.py) use the same
# annotated types below, so a value is valid over HTTP exactly when it is valid over the WebSocket. They bound
# what msgspec accepts (no unbounded ints reach torch); the server's configured limits are checked after decoding.
MAX_INT32: Final = 2**31 - 1
MAX_TOP_K: Final = MAX_INT32  # 0 = off; values above the vocabulary mean "the whole vocabulary"
MAX_TEMPERATURE: Final = 100.0
MAX_MESSAGES: Final = 1024  # chat turns per request
MAX_ROLE_LENGTH: Final = 64
MAX_NAME_LENGTH: Final = 64
MAX_MODEL_NAME_LENGTH: Final = 256
MAX_TOKEN_LENGTH: Final = 4096  # API key in hello
MAX_RESUME_LENGTH: Final = 256
# A prompt longer than max_prompt_tokens x this many characters cannot fit and is refused before tokenizing
# (no tokenizer in use packs more than a few characters into a token on real text; documented in docs/protocol.md).
DEFAULT_CHARS_PER_TOKEN: Final = 32


class ErrorCode(str, enum.Enum):
    """Codes carried by ``error`` frames (and HTTP error bodies)."""

    BAD_FRAME = "bad_frame"
    UNKNOWN_TYPE = "unknown_type"
    INVALID_PARAMS = "invalid_params"
    DUPLICATE_ID = "duplicate_id"
    UNKNOWN_ID = "unknown_id"
    UNKNOWN_MODEL = "unknown_model"
    TOO_MANY_GENERATIONS = "too_many_generations"
    RATE_LIMITED = "rate_limited"
    UNAUTHORIZED = "unauthorized"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"
    # sessions that outlive a socket (docs/protocol.md, "Resume" and "Conversations")
    RESUME_FAILED = "resume_failed"
    UNKNOWN_CONVERSATION = "unknown_conversation"
    TOO_MANY_CONVERSATIONS = "too_many_conversations"
    CONVERSATION_BUSY = "conversation_busy"


Priority: TypeAlias = Literal["high", "normal", "low"]
GenId: TypeAlias = (Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
                    | Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)])
MaxTokens: TypeAlias = Annotated[int, msgspec.Meta(ge=1, le=MAX_INT32)]
Temperature: TypeAlias = Annotated[float, msgspec.Meta(ge=0.0, le=MAX_TEMPERATURE)]
TopP: TypeAlias = Annotated[float, msgspec.Meta(gt=0.0, le=1.0)]
TopK: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=MAX_TOP_K)]
Seed: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
StopString: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_STOP_LENGTH)]
StopList: TypeAlias = Annotated[list[StopString], msgspec.Meta(max_length=MAX_STOP_STRINGS)]
Role: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ROLE_LENGTH)]
Name: TypeAlias = Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)]
ModelName: TypeAlias = Annotated[str, msgspec.Meta(max_length=MAX_MODEL_NAME_LENGTH)]
ConversationId: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
FrameCount: TypeAlias = Annotated[int, msgspec.Meta(ge=0, le=2**53)]

# --------------------------------------------------------------------------- client frames


class Message(msgspec.Struct, frozen=True):
    """One chat turn for ``generate.messages``."""

    role: Role
    content: str
    name: Name | None = None


Messages: TypeAlias = Annotated[list[Message], msgspec.Meta(max_length=MAX_MESSAGES)]


class Hello(msgspec.Struct, tag="hello", tag_field="type", frozen=True, omit_defaults=True):
    """``token`` authenticates; ``resume`` (a ``ready.resume_token``) with ``received`` (the number of
    frames the client got from that session, ``ready`` frames not counted) reattaches a held session."""

    token: Annotated[str, msgspec.Meta(max_length=MAX_TOKEN_LENGTH)] | None = None
    resume: Annotated[str, msgspec.Meta(max_length=MAX_RESUME_LENGTH)] | None = None
    received: FrameCount | None = None
    # Optional (v1-compatible): true opts this socket in to batch messages (an array of frames in one
    # WebSocket message, docs/protocol.md "Batches"); send it only to a server whose ready.limits.batch is true.
    batch: bool | None = None


class Generate(msgspec.Struct, tag="generate", tag_field="type", frozen=True):
    id: GenId
    prompt: str | None = None
    messages: Messages | None = None
    model: ModelName | None = None
    max_tokens: MaxTokens = 128
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    top_k: TopK = 0
    seed: Seed | None = None
    stop: StopList = []
    priority: Priority = "normal"
    conversation: ConversationId | None = None


class Cancel(msgspec.Struct, tag="cancel", tag_field="type", frozen=True):
    id: GenId


class Ack(msgspec.Struct, tag="ack", tag_field="type", frozen=True):
    """The client has received ``received`` frames of this session (``ready`` not counted). Cumulative.

    The first ``ack`` turns the acknowledgement window on for the session (send ``ack {received: 0}``
    right after ``ready``); only acking sessions are held for resume.
    """

    received: FrameCount


class Forget(msgspec.Struct, tag="forget", tag_field="type", frozen=True):
    """Delete one server-held conversation (its live generations are cancelled)."""

    conversation: ConversationId


class History(msgspec.Struct, tag="history", tag_field="type", frozen=True):
    """Ask for one conversation's turns; answered by a ``conversation`` frame."""

    conversation: ConversationId


ClientFrame: TypeAlias = Hello | Generate | Cancel | Ack | Forget | History
CLIENT_TYPES: Final = frozenset({"hello", "generate", "cancel", "ack", "forget", "history"})

# --------------------------------------------------------------------------- server frames


class Limits(msgspec.Struct, frozen=True, omit_defaults=True):
    max_generations: int
    max_tokens: int
    max_prompt_tokens: int
    max_frame_bytes: int
    window: int | None = None  # acknowledgement window, bytes sent but not acked
    resume_window_s: float | None = None  # how long a session is held after an unclean disconnect
    max_conversations: int | None = None
    max_conversation_generations: int | None = None
    batch: bool | None = None  # true: this server sends batch messages to a socket that sent hello {batch: true}
    # true: acknowledgements are required (server setting require_ack, on under rtws.ray): the session acks
    # from its first frame, as if the client had sent ack {received: 0}; a client that never acks is paused
    # at the window and closed 1008 after stall_timeout_s. Omitted when off.
    ack_required: bool | None = None


class Usage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int | None = None  # prompt tokens served from the prefix cache (optional, v1-compatible)


class Ready(msgspec.Struct, tag="ready", tag_field="type", frozen=True, omit_defaults=True):
    session: str
    models: list[str]
    limits: Limits
    resume_token: str | None = None  # present when resume is on; a new one in every ready
    resumed: bool = False  # this ready reattached a held session
    replay: int = 0  # on resume: this many retained frames follow at once, numbered from hello.received + 1
    live: list[GenId] | None = None  # on resume: generations running or with a done not yet written
    replica: str | None = None  # which server/replica holds this session (ServerConfig.replica_id); optional


class Delta(msgspec.Struct, tag="delta", tag_field="type", frozen=True, array_like=False):
    id: GenId
    seq: int
    text: str
    tokens: int


class Done(msgspec.Struct, tag="done", tag_field="type", frozen=True, omit_defaults=True):
    id: GenId
    reason: FinishReason
    usage: Usage
    dropped: int = 0  # conversation turns dropped from the front to fit this prompt in the context


class Error(msgspec.Struct, tag="error", tag_field="type", frozen=True, omit_defaults=True):
    code: str
    message: str
    id: GenId | None = None
    retry_after: float | None = None
    reason: str | None = None  # resume_failed: unknown, expired, resumed, gap, codec, off, not_first, draining
    conversation: str | None = None  # errors about one conversation (forget, history)


class ConversationItem(msgspec.Struct, frozen=True, omit_defaults=True):
    id: str
    role: str
    content: str
    name: str | None = None
    truncated: bool = False  # an assistant reply cut short (cancelled, timeout, error), kept as delivered


class ConversationFrame(msgspec.Struct, tag="conversation", tag_field="type", frozen=True):
    """Answer to ``history``: the turns the server holds, oldest first; ``dropped`` counts turns dropped so far."""

    id: str
    items: list[ConversationItem]
    dropped: int = 0


AnyFrame: TypeAlias = (Hello | Generate | Cancel | Ack | Forget | History | Ready | Delta | Done | Error
                       | ConversationFrame)


class ProtocolError(RtwsError):
    """A client frame that must be answered with an ``error`` frame (the session renders it).

    ``id`` is the generation id when one could be read from the frame, so the
    error can be attributed to it; ``retry_after`` is set for refusals that can
    succeed later (``rate_limited``).
    """

    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str, id: GenId | None = None, *,
                 retry_after: float | None = None) -> None:
        super().__init__(code.value, message, retry_after=retry_after)
        self.code = code
        self.id = id

    def to_frame(self) -> Error:
        return Error(code=self.code.value, message=self.message, id=self.id,
                     retry_after=None if self.retry_after is None else round(self.retry_after, 3))


# --------------------------------------------------------------------------- batch messages


def batch_message(frames: list[bytes], binary: bool) -> bytes:
    """Concatenate encoded frames into one array message: a msgpack array header + the frames, or ``[a,b]``."""
    if not binary:
        return b"[" + b",".join(frames) + b"]"
    n = len(frames)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 1 << 16:
        head = b"\xdc" + n.to_bytes(2, "big")
    else:
        head = b"\xdd" + n.to_bytes(4, "big")
    return head + b"".join(frames)


def is_batch(data: bytes | str) -> bool:
    """True for a batch message: a msgpack array (a frame alone is always a map) or a JSON array."""
    if isinstance(data, str):
        return data.lstrip()[:1] == "["
    if not data:
        return False
    b = data[0]
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        return True
    return b in (0x5B, 0x20, 0x0A, 0x0D, 0x09) and data.lstrip()[:1] == b"["


# --------------------------------------------------------------------------- codecs


class Codec:
    """Encoder/decoder pair for one subprotocol. Instances are shared, stateless."""

    __slots__ = ("name", "binary", "_decoder", "_encoder", "_raw_decoder", "_any_decoder", "_list_decoder")

    def __init__(self, name: str) -> None:
        self.name = name
        self.binary = name == SUBPROTOCOL_MSGPACK
        if self.binary:
            self._decoder: Any = msgspec.msgpack.Decoder(ClientFrame)
            self._raw_decoder: Any = msgspec.msgpack.Decoder()
            self._any_decoder: Any = msgspec.msgpack.Decoder(AnyFrame)
            self._list_decoder: Any = msgspec.msgpack.Decoder(list[AnyFrame])
            self._encoder: Any = msgspec.msgpack.Encoder()
        else:
            self._decoder = msgspec.json.Decoder(ClientFrame)
            self._raw_decoder = msgspec.json.Decoder()
            self._any_decoder = msgspec.json.Decoder(AnyFrame)
            self._list_decoder = msgspec.json.Decoder(list[AnyFrame])
            self._encoder = msgspec.json.Encoder()

    def encode(self, frame: AnyFrame) -> bytes:
        """Encode any frame (server frames in production, client frames in clients)."""
        return self._encoder.encode(frame)  # type: ignore[no-any-return]

    def decode_any(self, data: bytes | str) -> AnyFrame:
        """Decode a frame of either direction (clients and tests). Raises msgspec errors."""
        return self._any_decoder.decode(data)  # type: ignore[no-any-return]

    def decode_message(self, data: bytes | str) -> list[AnyFrame]:
        """Decode one WebSocket message into its frames: a batch message (an array) gives each of its frames,
        in order; any other message is one frame. Raises msgspec errors."""
        if is_batch(data):
            return self._list_decoder.decode(data)  # type: ignore[no-any-return]
        return [self._any_decoder.decode(data)]

    def batch(self, frames: list[bytes]) -> bytes:
        """One batch message from already encoded frames (a msgpack array / JSON array of them), no re-encoding."""
        return batch_message(frames, self.binary)

    def decode_client(self, data: bytes | str) -> ClientFrame:
        """Decode and validate one client frame.

        Raises :class:`ProtocolError` with ``bad_frame`` (not this codec's
        encoding, not a map, no string ``type``), ``unknown_type`` or
        ``invalid_params`` (wrong types, missing fields, out-of-range values).
        """
        try:
            frame: ClientFrame = self._decoder.decode(data)
        except msgspec.ValidationError as exc:
            raise self._classify(data, exc) from None
        except (msgspec.DecodeError, UnicodeDecodeError, RecursionError, ValueError, TypeError):
            # ValueError covers msgspec's odd corners (invalid UTF-8 in a msgpack str, bad ext types);
            # TypeError a str handed to the msgpack decoder (callers should pick the codec by frame kind).
            raise ProtocolError(ErrorCode.BAD_FRAME, f"frame is not valid {self._kind()}") from None
        if isinstance(frame, Generate):
            _check_generate(frame)
        return frame

    def _kind(self) -> str:
        return "msgpack" if self.binary else "JSON"

    def _classify(self, data: bytes | str, exc: msgspec.ValidationError) -> ProtocolError:
        try:
            raw = self._raw_decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError, RecursionError, ValueError,
                TypeError):
            return ProtocolError(ErrorCode.BAD_FRAME, f"frame is not valid {self._kind()}")
        if not isinstance(raw, dict):
            return ProtocolError(ErrorCode.BAD_FRAME, "frame must be a map")
        ftype = raw.get("type")
        if not isinstance(ftype, str):
            return ProtocolError(ErrorCode.BAD_FRAME, "frame needs a string field 'type'")
        if ftype not in CLIENT_TYPES:
            return ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown frame type {_short(ftype)!r}")
        gid = raw.get("id")
        if not _valid_id(gid):
            gid = None
        # msgspec's message names the field path, e.g. "Expected `int`, got `str` - at `$.max_tokens`".
        return ProtocolError(ErrorCode.INVALID_PARAMS, str(exc), id=gid)


def _short(s: str, n: int = 64) -> str:
    return s if len(s) <= n else s[:n] + "..."


def _valid_id(gid: object) -> bool:
    if isinstance(gid, bool):
        return False
    if isinstance(gid, int):
        return -(2**63) <= gid <= 2**63 - 1  # what GenId accepts (and every codec can echo back)
    return isinstance(gid, str) and 0 < len(gid) <= MAX_ID_LENGTH


def sampling_problem(temperature: float, top_p: float) -> str | None:
    """Why sampling values msgspec accepted are still refused (NaN passes its bounds), or None."""
    if not math.isfinite(temperature) or not math.isfinite(top_p):
        return "temperature and top_p must be finite"
    return None


def request_problem(prompt: str | None, messages: list[Message] | None, temperature: float, top_p: float,
                    conversation: str | None = None) -> str | None:
    """Cross-field checks msgspec constraints cannot express, for a ``generate`` frame and an ``/infer`` body
    alike: the ``invalid_params`` message, or None."""
    if (prompt is None) == (messages is None):
        return "exactly one of 'prompt' or 'messages' is required"
    if messages is not None and not messages and conversation is None:
        return "'messages' must not be empty"
    return sampling_problem(temperature, top_p)


def _check_generate(frame: Generate) -> None:
    problem = request_problem(frame.prompt, frame.messages, frame.temperature, frame.top_p, frame.conversation)
    if problem is not None:
        raise ProtocolError(ErrorCode.INVALID_PARAMS, problem, frame.id)


MSGPACK: Final = Codec(SUBPROTOCOL_MSGPACK)
JSON: Final = Codec(SUBPROTOCOL_JSON)


def codec_for(subprotocol: str | None) -> Codec:
    """The codec for a negotiated subprotocol (msgpack when none was offered)."""
    return JSON if subprotocol == SUBPROTOCOL_JSON else MSGPACK


def codec_for_frame(data: bytes | str) -> Codec:
    """The codec that decodes one incoming WebSocket frame, by frame kind: binary = msgpack, text = JSON.

    Replies always use the session's negotiated codec; this only decides how a frame is read.
    """
    return JSON if isinstance(data, str) else MSGPACK


def prompt_chars(prompt: str | None, messages: Sequence[Message] | Sequence[dict[str, Any]] | None) -> int:
    """Characters a request asks to tokenize: the prompt, or every message's role, name and content."""
    if messages is None:
        return len(prompt or "")
    n = 0
    for m in messages:
        if isinstance(m, Message):
            n += len(m.role) + len(m.content) + len(m.name or "")
        else:
            n += sum(len(v) for v in m.values() if isinstance(v, str))
    return n


def check_prompt_chars(prompt: str | None, messages: Sequence[Message] | Sequence[dict[str, Any]] | None,
                       max_prompt_tokens: int, chars_per_token: int = DEFAULT_CHARS_PER_TOKEN) -> str | None:
    """A refusal message when the request is too long to possibly fit ``max_prompt_tokens``, else None.

    Cheap (no tokenizer): meant to run on the event loop before any tokenization.
    """
    n = prompt_chars(prompt, messages)
    limit = max_prompt_tokens * chars_per_token
    if n > limit:
        return (f"prompt is {n} characters; at most {limit} can fit this model's {max_prompt_tokens} prompt tokens "
                f"({chars_per_token} characters per token at most)")
    return None


def choose_subprotocol(offered: list[str]) -> str | None:
    """Pick the first supported subprotocol the client offered, or None (msgpack by default)."""
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    return None
