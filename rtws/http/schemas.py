"""The HTTP bodies: ``/infer`` and OpenAI request and response Structs, and their decoders. Pure: no I/O.

Request fields reuse :mod:`rtws.protocol`'s annotated types (``tests/test_http_api.py`` checks that they stay
identical), so a request is valid over HTTP exactly when it would be valid over the WebSocket. The formats are
documented in ``docs/http.md``.
"""

from __future__ import annotations

from typing import Annotated, Any, Final

import msgspec

from .. import protocol

encode = msgspec.json.Encoder().encode

# --------------------------------------------------------------------------- request bodies
#
# Every bound is protocol.Generate's own annotated type, used as is: declared once, in rtws/protocol.py.


class InferRequest(msgspec.Struct, frozen=True):
    """``POST /infer``: a protocol ``generate`` frame without ``type``/``id``, plus ``stream``."""

    prompt: str | None = None
    messages: protocol.Messages | None = None
    model: protocol.ModelName | None = None
    max_tokens: protocol.MaxTokens = 128
    temperature: protocol.Temperature = 1.0
    top_p: protocol.TopP = 1.0
    top_k: protocol.TopK = 0
    seed: protocol.Seed | None = None
    stop: protocol.StopString | protocol.StopList = []
    priority: protocol.Priority = "normal"
    stream: bool = True


class StreamOptions(msgspec.Struct, frozen=True):
    include_usage: bool | None = None


class OpenAIRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Fields both OpenAI endpoints share. Unknown fields are ignored; known ones we cannot honour are refused."""

    model: str | None = None
    max_tokens: protocol.MaxTokens | None = None
    temperature: protocol.Temperature | None = None
    top_p: protocol.TopP | None = None
    top_k: protocol.TopK | None = None  # extension (as in vLLM)
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    stop: protocol.StopString | protocol.StopList | None = None
    seed: protocol.Seed | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    priority: protocol.Priority = "normal"  # extension: the rtws priority class
    ignore_eos: bool = False  # extension (as in vLLM; benchmark clients such as guidellm send it)


class CompletionRequest(OpenAIRequest, frozen=True, kw_only=True):
    prompt: str | list[Any]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, frozen=True):
    type: str
    text: str | None = None


class ChatMessage(msgspec.Struct, frozen=True):
    role: protocol.Role
    content: str | list[ContentPart] | None = None
    name: protocol.Name | None = None


class ResponseFormat(msgspec.Struct, frozen=True):
    type: str


class ChatRequest(OpenAIRequest, frozen=True, kw_only=True):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=protocol.MAX_MESSAGES)]
    max_completion_tokens: protocol.MaxTokens | None = None
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


INFER: Final = msgspec.json.Decoder(InferRequest)
COMPLETION: Final = msgspec.json.Decoder(CompletionRequest)
CHAT: Final = msgspec.json.Decoder(ChatRequest)

# rtws finish reasons in OpenAI's vocabulary: anything cut short by a server
# limit (a timeout, a drain) reads as "length"; "error" never becomes a
# finish_reason (it is an error response or an error event instead).
OPENAI_FINISH: Final = {"stop": "stop", "length": "length", "timeout": "length", "cancelled": "length"}

# HTTP status -> OpenAI's error "type"
OPENAI_ERROR_TYPE: Final = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                            413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error",
                            503: "service_unavailable"}
