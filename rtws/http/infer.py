"""``POST /infer``: a protocol ``generate`` over HTTP, SSE by default, one JSON document with ``"stream": false``.

The format is documented in ``docs/http.md``.
"""

from __future__ import annotations

import secrets

from .. import protocol
from .asgi import Receive, Scope, Send
from .errors import Rejection
from .schemas import INFER, InferDelta, InferDone, InferRequest, InferResult, encode
from .stream import Chunk, HttpGeneration, HttpStreams

_FAILED = "generation failed (internal error)"


class InferFormat:
    """``/infer``'s wire form: ``data: {text, tokens}`` events, then ``event: done``."""

    __slots__ = ("gen",)

    def __init__(self, gen: HttpGeneration) -> None:
        self.gen = gen

    def preamble(self) -> bytes:
        return b""

    def delta(self, chunk: Chunk) -> bytes:
        if chunk.text or chunk.tokens:
            return b"data: " + encode(InferDelta(text=chunk.text, tokens=chunk.tokens)) + b"\n\n"
        return b""

    def final(self, chunk: Chunk) -> bytes:
        assert chunk.finish is not None
        done = InferDone(reason=chunk.finish, usage=self.gen.usage, model=self.gen.model.name,
                         error=_FAILED if chunk.finish == "error" else None)
        return self.delta(chunk) + b"event: done\ndata: " + encode(done) + b"\n\n"

    def result(self, result: Chunk) -> bytes:
        return encode(InferResult(text=result.text, reason=result.finish or "stop", usage=self.gen.usage,
                                  model=self.gen.model.name))

    def failed(self) -> bytes:
        return encode({"error": {"code": "internal", "message": _FAILED}})


class InferRoute:
    """The ``/infer`` handler over the app's :class:`~rtws.http.stream.HttpStreams`."""

    def __init__(self, streams: HttpStreams) -> None:
        self.streams = streams

    async def infer(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = "infer-" + secrets.token_hex(12)
        try:
            req: InferRequest = await self.streams.read(scope, receive, INFER)
            problem = protocol.request_problem(req.prompt, req.messages, req.temperature, req.top_p)
            if problem is not None:
                raise Rejection("invalid_params", problem)
            gen = await self.streams.admit(scope, receive, req, request_id)
        except Rejection as r:
            await self.streams.reject(send, r)
            return
        except ConnectionResetError:
            return  # left while sending the body
        await self.streams.serve(gen, send, InferFormat(gen), request_id, req.stream)
