"""The OpenAI-compatible routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``
(and ``/v1/models/{name}``), and ``GET /health`` as vLLM and TGI serve it.

Unknown request fields are ignored; known ones rtws cannot honour are refused (``invalid_params`` naming the
``param``). Errors use OpenAI's ``{"error": {"message", "type", "param", "code"}}``. The format is documented
in ``docs/http.md``.
"""

from __future__ import annotations

import secrets
import time
from typing import TYPE_CHECKING, Any

from .. import protocol
from ..admission import Request
from .asgi import Receive, Scope, Send, send_bytes, send_json
from .errors import Rejection
from .schemas import (
    CHAT,
    COMPLETION,
    OPENAI_FINISH,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatMessage,
    ChatMessageOut,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    OpenAIError,
    OpenAIErrorDetail,
    OpenAIRequest,
    OpenAIUsage,
    PromptTokensDetails,
    encode,
)
from .stream import Chunk, HttpGeneration, HttpStreams

if TYPE_CHECKING:
    from ..app import App
    from ..registry import Served

_FAILED = encode(OpenAIError(OpenAIErrorDetail(message="generation failed (internal error)", type="server_error",
                                               param=None, code="internal")))


def _usage(gen: HttpGeneration) -> OpenAIUsage:
    return OpenAIUsage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                       total_tokens=gen.prompt_tokens + gen.completion_tokens,
                       prompt_tokens_details=PromptTokensDetails(cached_tokens=gen.cached_tokens))


def _fingerprint(gen: HttpGeneration) -> str:
    return f"rtws-{gen.model.name}-{gen.model.version}"[:128]


class _OpenAIFormat:
    """What both OpenAI endpoints' streams share: the ids, usage and the error event."""

    def __init__(self, gen: HttpGeneration, request_id: str, include_usage: bool) -> None:
        self.gen = gen
        self.request_id = request_id
        self.created = int(time.time())
        self.include_usage = include_usage
        self.fingerprint = _fingerprint(gen)

    def preamble(self) -> bytes:
        return b""

    def failed(self) -> bytes:
        return _FAILED

    def _failed_event(self) -> bytes:
        return b"data: " + _FAILED + b"\n\ndata: [DONE]\n\n"


class CompletionFormat(_OpenAIFormat):
    def _doc(self, choices: list[CompletionChoice], usage: OpenAIUsage | None = None) -> bytes:
        return encode(Completion(id=self.request_id, object="text_completion", created=self.created,
                                 model=self.gen.model.name, choices=choices, system_fingerprint=self.fingerprint,
                                 usage=usage))

    def delta(self, chunk: Chunk) -> bytes:
        return b"data: " + self._doc([CompletionChoice(chunk.text)]) + b"\n\n" if chunk.text else b""

    def final(self, chunk: Chunk) -> bytes:
        assert chunk.finish is not None
        if chunk.finish == "error":
            return self._failed_event()
        out = b"data: " + self._doc([CompletionChoice(chunk.text, finish_reason=OPENAI_FINISH[chunk.finish])])
        if self.include_usage:
            out += b"\n\ndata: " + self._doc([], _usage(self.gen))
        return out + b"\n\ndata: [DONE]\n\n"

    def result(self, result: Chunk) -> bytes:
        return self._doc([CompletionChoice(result.text, finish_reason=OPENAI_FINISH[result.finish or "stop"])],
                         _usage(self.gen))


class ChatFormat(_OpenAIFormat):
    def _event(self, choices: list[ChatChunkChoice], usage: OpenAIUsage | None = None) -> bytes:
        return b"data: " + encode(ChatCompletionChunk(
            id=self.request_id, object="chat.completion.chunk", created=self.created, model=self.gen.model.name,
            choices=choices, system_fingerprint=self.fingerprint, usage=usage)) + b"\n\n"

    def preamble(self) -> bytes:
        return self._event([ChatChunkChoice(ChatDelta(role="assistant", content=""))])

    def delta(self, chunk: Chunk) -> bytes:
        return self._event([ChatChunkChoice(ChatDelta(content=chunk.text))]) if chunk.text else b""

    def final(self, chunk: Chunk) -> bytes:
        assert chunk.finish is not None
        if chunk.finish == "error":
            return self._failed_event()
        out = self.delta(chunk)
        out += self._event([ChatChunkChoice(ChatDelta(), finish_reason=OPENAI_FINISH[chunk.finish])])
        if self.include_usage:
            out += self._event([], _usage(self.gen))
        return out + b"data: [DONE]\n\n"

    def result(self, result: Chunk) -> bytes:
        return encode(ChatCompletion(
            id=self.request_id, object="chat.completion", created=self.created, model=self.gen.model.name,
            choices=[ChatChoice(ChatMessageOut(role="assistant", content=result.text),
                                finish_reason=OPENAI_FINISH[result.finish or "stop"])],
            system_fingerprint=self.fingerprint, usage=_usage(self.gen)))


def _request(req: OpenAIRequest, prompt: str | None, messages: list[dict[str, Any]] | None,
             max_tokens: int | None) -> Request:
    """The checks both endpoints share, then the transport-neutral request. Raises :class:`Rejection`."""
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
    stop: tuple[str, ...] = () if req.stop is None else (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)
    return Request(model=req.model, prompt=prompt, messages=messages,
                   max_tokens=max_tokens if max_tokens is not None else 16, temperature=temperature, top_p=top_p,
                   top_k=req.top_k or 0, seed=req.seed, stop=stop, priority=req.priority, ignore_eos=req.ignore_eos)


def _completion_prompt(req: CompletionRequest) -> str:
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
    return prompt


def _chat_checks(req: ChatRequest) -> None:
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


def _weights_info(m: Served) -> dict[str, Any]:
    """``quantization`` and ``dtype`` of a served model for its ``/v1/models`` card (None when unknown)."""
    from ..quant import describe

    return {"quantization": describe(m.model, m.spec),
            "dtype": str(getattr(m.model, "dtype", "")).removeprefix("torch.") or None}


class OpenAIRoutes:
    """The OpenAI handlers over the app's :class:`~rtws.http.stream.HttpStreams`."""

    def __init__(self, streams: HttpStreams) -> None:
        self.streams = streams
        self.app: App = streams.app

    async def completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = "cmpl-" + secrets.token_hex(12)
        try:
            req: CompletionRequest = await self.streams.read(scope, receive, COMPLETION)
            request = _request(req, _completion_prompt(req), None, req.max_tokens)
            gen = await self.streams.admit(scope, receive, request, request_id)
        except Rejection as r:
            await self.streams.reject(send, r, openai=True)
            return
        except ConnectionResetError:
            return
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        await self.streams.serve(gen, send, CompletionFormat(gen, request_id, include_usage), request_id,
                                 bool(req.stream))

    async def chat_completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = "chatcmpl-" + secrets.token_hex(12)
        try:
            req: ChatRequest = await self.streams.read(scope, receive, CHAT)
            _chat_checks(req)
            messages = [_chat_message(m) for m in req.messages]
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            if max_tokens is None:  # OpenAI's default for chat: as long as the context allows
                max_tokens = self.app.config.max_tokens_limit
            request = _request(req, None, messages, max_tokens)
            gen = await self.streams.admit(scope, receive, request, request_id)
        except Rejection as r:
            await self.streams.reject(send, r, openai=True)
            return
        except ConnectionResetError:
            return
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        await self.streams.serve(gen, send, ChatFormat(gen, request_id, include_usage), request_id, bool(req.stream))

    # ------------------------------------------------------------------ GET /v1/models

    def _health(self) -> dict[str, dict[str, Any]]:
        return {h["name"]: h for h in self.app.registry.health()}

    def _card(self, m: Served, health: dict[str, Any] | None = None) -> ModelCard:
        st = m.engine.stats()
        status = (health or {}).get("status", "warm" if m.warm else "loading")
        return ModelCard(
            id=m.name, object="model", created=int(m.loaded_at), owned_by="rtws", version=m.version,
            ready=status == "warm" and not self.app.draining, status=status,
            default=m.name == self.app.registry.default_name, device=m.device, context_length=m.context_len,
            max_prompt_tokens=m.max_prompt_tokens, running=st.running, waiting=st.waiting, **_weights_info(m))

    @staticmethod
    def _pending_card(h: dict[str, Any]) -> ModelCard:
        """A name that serves nothing yet (its first version loading, or failed)."""
        return ModelCard(id=h["name"], object="model", created=0, owned_by="rtws", version=str(h.get("version") or ""),
                         ready=False, status=str(h.get("status")), default=bool(h.get("default")), device=None,
                         context_length=None, max_prompt_tokens=None, running=0, waiting=0)

    async def list_models(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /v1/models``: every served model (and names still loading, ``ready: false``)."""
        if not self.app.check_http_auth(scope):
            await self.streams.reject(send, Rejection("unauthorized", "missing or invalid API key"), openai=True)
            return
        health = self._health()
        served = self.app.registry.models()
        cards = [self._card(m, health.get(m.name)) for m in served]
        names = {m.name for m in served}
        cards += [self._pending_card(h) for name, h in health.items() if name not in names]
        await send_json(send, 200, ModelList(object="list", data=cards))

    async def get_model(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.app.check_http_auth(scope):
            await self.streams.reject(send, Rejection("unauthorized", "missing or invalid API key"), openai=True)
            return
        name = scope["path"][len("/v1/models/"):]
        model = self.app.registry.get(name) if name else None
        health = self._health()
        if model is not None:
            await send_json(send, 200, self._card(model, health.get(name)))
        elif name in health:
            await send_json(send, 200, self._pending_card(health[name]))
        else:
            await self.streams.reject(send, Rejection("unknown_model", f"unknown model {name[:64]!r}"), openai=True)

    async def health(self, scope: Scope, receive: Receive, send: Send) -> None:
        """``GET /health`` as vLLM and TGI serve it (benchmark clients probe it): 200 with an empty body while
        serving, 503 while draining or before the models are up. ``/healthz`` and ``/readyz`` stay."""
        app = self.app
        if app.draining or not app.started:
            await send_json(send, 503, {"status": "draining" if app.draining else "starting"})
            return
        await send_bytes(send, 200, b"", "application/json")
