"""OpenAI Realtime API (text subset): the JSON events, as msgspec Structs. Pure: no I/O, no torch.

Client events are decoded into the ``*In`` Structs (unknown fields are
ignored, as msgspec does by default; what rtws refuses is checked in
:mod:`rtws.realtime`). Server events are the ``*Out`` Structs; their fields
and names follow the official ``openai`` SDK's types
(``openai.types.realtime``), which the tests parse every server event with.

The supported subset is documented field by field in ``docs/realtime.md``.
"""

from __future__ import annotations

from typing import Annotated, Any, Final, Literal, TypeAlias

import msgspec

MAX_ID_LENGTH: Final = 64
MAX_METADATA_KEYS: Final = 16
MAX_METADATA_VALUE: Final = 512

ItemId: TypeAlias = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LENGTH)]
MaxOutputTokens: TypeAlias = Annotated[int, msgspec.Meta(ge=1)] | Literal["inf"]

# --------------------------------------------------------------------------- client events


class ContentIn(msgspec.Struct, frozen=True):
    """One content part of a client item: ``input_text`` / ``output_text`` / ``text`` are read."""

    type: str
    text: str | None = None
    audio: Any = None
    transcript: Any = None
    image_url: Any = None


class ItemIn(msgspec.Struct, frozen=True):
    """A client item: a ``message`` (roles user/system/assistant) or, in ``response.input``, an ``item_reference``."""

    type: str = "message"
    id: ItemId | None = None
    role: str | None = None
    content: list[ContentIn] | None = None


class SessionIn(msgspec.Struct, frozen=True):
    type: str | None = None
    model: str | None = None
    instructions: str | None = None
    output_modalities: list[str] | None = None
    max_output_tokens: MaxOutputTokens | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    audio: Any = None
    truncation: Any = None  # "auto" | "disabled" | {"type": "retention_ratio", ...} (read as "auto")
    # Sampling: not in OpenAI's GA session object (its beta one had ``temperature``); rtws extensions.
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None


class ResponseIn(msgspec.Struct, frozen=True):
    conversation: str | None = None
    input: list[ItemIn] | None = None
    instructions: str | None = None
    output_modalities: list[str] | None = None
    max_output_tokens: MaxOutputTokens | None = None
    metadata: dict[str, str] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    audio: Any = None
    temperature: Annotated[float, msgspec.Meta(ge=0.0, le=100.0)] | None = None
    top_p: Annotated[float, msgspec.Meta(gt=0.0, le=1.0)] | None = None
    top_k: Annotated[int, msgspec.Meta(ge=0)] | None = None
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] | None = None


class SessionUpdate(msgspec.Struct, tag="session.update", tag_field="type", frozen=True):
    session: SessionIn
    event_id: str | None = None


class ItemCreate(msgspec.Struct, tag="conversation.item.create", tag_field="type", frozen=True):
    item: ItemIn
    previous_item_id: str | None = None
    event_id: str | None = None


class ItemRetrieve(msgspec.Struct, tag="conversation.item.retrieve", tag_field="type", frozen=True):
    item_id: str
    event_id: str | None = None


class ItemDelete(msgspec.Struct, tag="conversation.item.delete", tag_field="type", frozen=True):
    item_id: str
    event_id: str | None = None


class ItemTruncate(msgspec.Struct, tag="conversation.item.truncate", tag_field="type", frozen=True):
    item_id: str
    content_index: Annotated[int, msgspec.Meta(ge=0)]
    audio_end_ms: Annotated[int, msgspec.Meta(ge=0)]
    event_id: str | None = None


class ResponseCreate(msgspec.Struct, tag="response.create", tag_field="type", frozen=True):
    response: ResponseIn | None = None
    event_id: str | None = None


class ResponseCancel(msgspec.Struct, tag="response.cancel", tag_field="type", frozen=True):
    response_id: str | None = None
    event_id: str | None = None


ClientEvent: TypeAlias = (
    SessionUpdate | ItemCreate | ItemRetrieve | ItemDelete | ItemTruncate | ResponseCreate | ResponseCancel
)
CLIENT_TYPES: Final = frozenset({
    "session.update", "conversation.item.create", "conversation.item.retrieve", "conversation.item.delete",
    "conversation.item.truncate", "response.create", "response.cancel",
})
# Client events of the Realtime API that need audio: answered with an ``error`` saying so.
AUDIO_TYPES: Final = frozenset({
    "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "output_audio_buffer.clear", "transcription_session.update",
})

# --------------------------------------------------------------------------- server events


class ContentOut(msgspec.Struct, frozen=True):
    type: str
    text: str


class ItemOut(msgspec.Struct, frozen=True):
    id: str
    role: str
    status: str
    content: list[ContentOut]
    type: str = "message"
    object: str = "realtime.item"


class InputTokenDetails(msgspec.Struct, frozen=True):
    cached_tokens: int
    text_tokens: int
    audio_tokens: int = 0
    image_tokens: int = 0


class OutputTokenDetails(msgspec.Struct, frozen=True):
    text_tokens: int
    audio_tokens: int = 0


class UsageOut(msgspec.Struct, frozen=True):
    total_tokens: int
    input_tokens: int
    output_tokens: int
    input_token_details: InputTokenDetails
    output_token_details: OutputTokenDetails


class StatusError(msgspec.Struct, frozen=True):
    type: str
    code: str


class StatusDetails(msgspec.Struct, frozen=True, omit_defaults=True):
    type: str
    reason: str | None = None
    error: StatusError | None = None


class ResponseOut(msgspec.Struct, frozen=True):
    id: str
    status: str
    conversation_id: str | None
    output: list[ItemOut]
    max_output_tokens: int | str
    metadata: dict[str, str] | None
    status_details: StatusDetails | None = None
    usage: UsageOut | None = None
    object: str = "realtime.response"
    output_modalities: list[str] = msgspec.field(default_factory=lambda: ["text"])


class SessionOut(msgspec.Struct, frozen=True):
    id: str
    model: str
    instructions: str
    max_output_tokens: int | str
    output_modalities: list[str]
    type: str = "realtime"
    object: str = "realtime.session"
    tools: list[Any] = []
    tool_choice: str = "auto"
    truncation: str = "auto"
    temperature: float | None = None


class SessionCreated(msgspec.Struct, tag="session.created", tag_field="type", frozen=True):
    event_id: str
    session: SessionOut


class SessionUpdated(msgspec.Struct, tag="session.updated", tag_field="type", frozen=True):
    event_id: str
    session: SessionOut


class ItemAdded(msgspec.Struct, tag="conversation.item.added", tag_field="type", frozen=True):
    event_id: str
    previous_item_id: str | None
    item: ItemOut


class ItemDone(msgspec.Struct, tag="conversation.item.done", tag_field="type", frozen=True):
    event_id: str
    previous_item_id: str | None
    item: ItemOut


class ItemRetrieved(msgspec.Struct, tag="conversation.item.retrieved", tag_field="type", frozen=True):
    event_id: str
    item: ItemOut


class ItemDeleted(msgspec.Struct, tag="conversation.item.deleted", tag_field="type", frozen=True):
    event_id: str
    item_id: str


class ItemTruncated(msgspec.Struct, tag="conversation.item.truncated", tag_field="type", frozen=True):
    event_id: str
    item_id: str
    content_index: int
    audio_end_ms: int


class ResponseCreated(msgspec.Struct, tag="response.created", tag_field="type", frozen=True):
    event_id: str
    response: ResponseOut


class ResponseDone(msgspec.Struct, tag="response.done", tag_field="type", frozen=True):
    event_id: str
    response: ResponseOut


class OutputItemAdded(msgspec.Struct, tag="response.output_item.added", tag_field="type", frozen=True):
    event_id: str
    response_id: str
    output_index: int
    item: ItemOut


class OutputItemDone(msgspec.Struct, tag="response.output_item.done", tag_field="type", frozen=True):
    event_id: str
    response_id: str
    output_index: int
    item: ItemOut


class PartOut(msgspec.Struct, frozen=True):
    text: str
    type: str = "text"


class ContentPartAdded(msgspec.Struct, tag="response.content_part.added", tag_field="type", frozen=True):
    event_id: str
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: PartOut


class ContentPartDone(msgspec.Struct, tag="response.content_part.done", tag_field="type", frozen=True):
    event_id: str
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    part: PartOut


class TextDelta(msgspec.Struct, tag="response.output_text.delta", tag_field="type", frozen=True):
    event_id: str
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    delta: str


class TextDone(msgspec.Struct, tag="response.output_text.done", tag_field="type", frozen=True):
    event_id: str
    response_id: str
    item_id: str
    output_index: int
    content_index: int
    text: str


class RateLimit(msgspec.Struct, frozen=True):
    name: str
    limit: int
    remaining: int
    reset_seconds: float


class RateLimitsUpdated(msgspec.Struct, tag="rate_limits.updated", tag_field="type", frozen=True):
    event_id: str
    rate_limits: list[RateLimit]


class ErrorBody(msgspec.Struct, frozen=True):
    type: str
    code: str
    message: str
    param: str | None = None
    event_id: str | None = None


class ErrorEvent(msgspec.Struct, tag="error", tag_field="type", frozen=True):
    event_id: str
    error: ErrorBody
