"""Python client for rtws protocol v1 (async), plus a blocking helper for scripts.

    async with await Client.connect("ws://127.0.0.1:8000/ws") as client:
        stream = await client.generate("ROMEO:\\n", max_tokens=64, temperature=0.8)
        async for text in stream:
            print(text, end="", flush=True)
        print(stream.reason, stream.usage)

Many streams can run at once on one client; ``await stream.cancel()`` stops
one. Error frames become :class:`GenerationError` (for one generation) or
:class:`ServerError` (for the connection). Imports no torch.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

from . import protocol as p

__all__ = ["Client", "Stream", "Result", "RtwsError", "GenerationError", "ServerError", "ConnectionLost",
           "generate"]


class RtwsError(Exception):
    """Base of every error the client raises."""


class ServerError(RtwsError):
    """An ``error`` frame. ``code`` is one of the protocol's error codes."""

    def __init__(self, code: str, message: str, id: Any = None, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.id = id
        self.retry_after = retry_after


class GenerationError(ServerError):
    """The server rejected one generation (no ``done`` follows)."""


class ConnectionLost(RtwsError):
    """The socket closed before the generation finished."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Result:
    text: str
    reason: str
    prompt_tokens: int
    completion_tokens: int


class Stream:
    """One generation. Async-iterate for text chunks; ``reason``/``usage`` are set after the end."""

    def __init__(self, client: Client, gid: Any) -> None:
        self.id = gid
        self._client = client
        self._queue: asyncio.Queue[p.Delta | p.Done | BaseException] = asyncio.Queue()
        self.parts: list[str] = []
        self.reason: str | None = None
        self.usage: p.Usage | None = None
        self.deltas = 0
        self.tokens = 0

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def finished(self) -> bool:
        return self.reason is not None

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iter()

    async def _iter(self) -> AsyncIterator[str]:
        while self.reason is None:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, p.Delta):
                self.parts.append(item.text)
                self.deltas += 1
                self.tokens += item.tokens
                if item.text:
                    yield item.text
            else:
                self.reason = item.reason
                self.usage = item.usage

    async def result(self) -> Result:
        """Wait for the end; return the whole text and usage."""
        async for _ in self:
            pass
        assert self.reason is not None and self.usage is not None
        return Result(self.text, self.reason, self.usage.prompt_tokens, self.usage.completion_tokens)

    async def cancel(self) -> None:
        """Ask the server to stop this generation; iteration then ends with reason ``cancelled``."""
        if self.reason is None:
            await self._client.cancel(self.id)


class Client:
    """One WebSocket session. Use :meth:`connect`."""

    def __init__(self, ws: ClientConnection, codec: p.Codec, ready: p.Ready | None) -> None:
        self.ws = ws
        self.codec = codec
        self.ready = ready
        self._streams: dict[Any, Stream] = {}
        self._ids = itertools.count(1)
        self.errors: asyncio.Queue[ServerError] = asyncio.Queue()
        self.closed: ConnectionLost | None = None
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str, *, token: str | None = None, codec: str = "msgpack",
                      auth: str = "hello", origin: str | None = None, open_timeout: float = 30.0,
                      max_size: int | None = 2**24) -> Client:
        """Open a session and wait for ``ready``.

        ``auth="hello"`` sends the token in the first frame (as a browser must);
        ``auth="header"`` sends ``Authorization: Bearer``.
        """
        sub = p.SUBPROTOCOL_JSON if codec == "json" else p.SUBPROTOCOL_MSGPACK
        c = p.codec_for(sub)
        headers = {"Authorization": f"Bearer {token}"} if token and auth == "header" else None
        ws = await connect(url, subprotocols=[Subprotocol(sub)], additional_headers=headers,
                           open_timeout=open_timeout, max_size=max_size,
                           origin=Origin(origin) if origin else None, compression=None)
        try:
            if token and auth == "hello":
                await ws.send(_wire(c, p.Hello(token=token)))
            while True:
                frame = c.decode_any(await asyncio.wait_for(ws.recv(), open_timeout))
                if isinstance(frame, p.Ready):
                    break
                if isinstance(frame, p.Error):
                    raise ServerError(frame.code, frame.message)
        except BaseException:
            await ws.close()
            raise
        return cls(ws, c, frame)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_frame(self, frame: Any) -> None:
        await self.ws.send(_wire(self.codec, frame))

    async def generate(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
                       id: Any = None, **options: Any) -> Stream:
        """Start a generation; return its :class:`Stream` at once (text arrives as it is produced).

        ``options``: model, max_tokens, temperature, top_p, top_k, seed, stop, priority.
        """
        if self.closed is not None:
            raise self.closed
        gid = id if id is not None else f"g{next(self._ids)}"
        if gid in self._streams:
            raise ValueError(f"generation id {gid!r} is still live on this client")
        msgs = None if messages is None else [p.Message(**m) for m in messages]
        frame = p.Generate(id=gid, prompt=prompt, messages=msgs, **options)
        stream = Stream(self, gid)
        self._streams[gid] = stream
        await self.send_frame(frame)
        return stream

    async def cancel(self, gid: Any) -> None:
        await self.send_frame(p.Cancel(id=gid))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        try:
            await self._reader
        except (asyncio.CancelledError, Exception):
            pass

    async def _read(self) -> None:
        try:
            async for data in self.ws:
                frame = self.codec.decode_any(data)
                if isinstance(frame, (p.Delta, p.Done)):
                    stream = self._streams.get(frame.id)
                    if stream is not None:
                        stream._queue.put_nowait(frame)
                        if isinstance(frame, p.Done):
                            del self._streams[frame.id]
                elif isinstance(frame, p.Error):
                    stream = self._streams.pop(frame.id, None) if frame.id is not None else None
                    if stream is not None:
                        stream._queue.put_nowait(GenerationError(frame.code, frame.message, frame.id,
                                                                 frame.retry_after))
                    else:
                        self.errors.put_nowait(ServerError(frame.code, frame.message, frame.id,
                                                           frame.retry_after))
        except ConnectionClosed:
            pass
        finally:
            self.closed = ConnectionLost(self.ws.close_code, self.ws.close_reason or "")
            for stream in self._streams.values():
                stream._queue.put_nowait(self.closed)
            self._streams.clear()


def _wire(codec: p.Codec, frame: Any) -> bytes | str:
    data = codec.encode(frame)
    return data if codec.binary else data.decode()


def generate(url: str, prompt: str | None = None, *, token: str | None = None, **options: Any) -> str:
    """Blocking: run one generation and return its text (for scripts)."""

    async def run() -> str:
        async with await Client.connect(url, token=token) as client:
            stream = await client.generate(prompt, **options)
            return (await stream.result()).text

    return asyncio.run(run())
