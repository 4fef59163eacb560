"""Python client for rtws protocol v1 (async), plus a blocking helper for scripts.

    async with await Client.connect("ws://127.0.0.1:8000/ws") as client:
        stream = await client.generate("ROMEO:\\n", max_tokens=64, temperature=0.8)
        async for text in stream:
            print(text, end="", flush=True)
        print(stream.reason, stream.usage)

Many streams can run at once on one client; ``await stream.cancel()`` stops
one. Error frames become :class:`GenerationError` (for one generation) or
:class:`ServerError` (for the connection). Imports no torch.

Resume (on by default, ``resume=False`` turns it off): the client acknowledges
what it receives (``ack``), and when the socket drops without a clean close it
reconnects and sends ``hello {resume, received}``. The server replays what was
lost and the streams simply go on: an ``async for`` over a stream's text never
notices. Generates and cancels that never reached the server are sent again.
If the session cannot be resumed (expired, server restarted), open streams end
with :class:`ResumeFailed` and the client goes on with the fresh session.
When the server requires acknowledgements (``ready.limits.ack_required``, on
under rtws.ray) the client acks with ``resume=False`` too.

Server-held conversations: ``generate(messages=[new turns], conversation="c1")``;
:meth:`Client.history` and :meth:`Client.forget`.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Origin, Subprotocol

from . import protocol as p

__all__ = ["Client", "Stream", "Result", "RtwsError", "GenerationError", "ServerError", "ConnectionLost",
           "ResumeFailed", "generate"]


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


class ResumeFailed(ConnectionLost):
    """The socket dropped and the session could not be resumed: this generation is lost."""


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
        self.done_frame: p.Done | None = None  # the done frame (``dropped``: conversation turns dropped to fit)
        self.deltas = 0
        self.tokens = 0
        self.frame: p.Generate | None = None  # sent again after a resume if the server never got it
        self.cancel_requested = False

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
                self.done_frame = item

    async def result(self) -> Result:
        """Wait for the end; return the whole text and usage."""
        async for _ in self:
            pass
        assert self.reason is not None and self.usage is not None
        return Result(self.text, self.reason, self.usage.prompt_tokens, self.usage.completion_tokens)

    async def cancel(self) -> None:
        """Ask the server to stop this generation; iteration then ends with reason ``cancelled``."""
        if self.reason is None:
            self.cancel_requested = True
            await self._client.cancel(self.id)


class Client:
    """One WebSocket session (resumed across dropped sockets unless ``resume=False``). Use :meth:`connect`."""

    def __init__(self, ws: ClientConnection, codec: p.Codec, ready: p.Ready | None, *,
                 reconnect: Any = None, resume: bool = True) -> None:
        self.ws = ws
        self.codec = codec
        self.ready = ready
        self._streams: dict[Any, Stream] = {}
        self._ids = itertools.count(1)
        self.errors: asyncio.Queue[ServerError] = asyncio.Queue()
        self.closed: ConnectionLost | None = None
        self._reconnect_fn = reconnect
        self.resume = resume and reconnect is not None
        self.received = 0  # frames of this session received (ready not counted): what acks carry
        self.messages = 0  # WebSocket messages read (a batch message is one, whatever it carries)
        self.resumes = 0
        self.resume_failures = 0
        self._unacked = 0
        window = ready.limits.window if ready is not None else None
        self._ack_every = max(1, (window or 256 * 1024) // 8)  # the protocol asks for an ack every window/8
        self._replay_left = 0
        self._closing = False
        self._online = asyncio.Event()
        self._online.set()
        self._history: dict[str, list[asyncio.Future[p.ConversationFrame]]] = {}
        self._reader = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def connect(cls, url: str, *, token: str | None = None, codec: str = "msgpack",
                      auth: str = "hello", origin: str | None = None, open_timeout: float = 30.0,
                      max_size: int | None = 2**24, resume: bool = True, batch: bool = False) -> Client:
        """Open a session and wait for ``ready``.

        ``auth="hello"`` sends the token in the first frame (as a browser must);
        ``auth="header"`` sends ``Authorization: Bearer``. ``resume``: ack frames and
        resume the session transparently after a dropped socket. ``batch``: when the
        server offers it (``ready.limits.batch``), opt in to batch messages (one
        WebSocket message carries every frame ready at once: fewer messages for
        sockets with several generations, e.g. behind a proxy that costs per message).
        """
        sub = p.SUBPROTOCOL_JSON if codec == "json" else p.SUBPROTOCOL_MSGPACK
        c = p.codec_for(sub)
        headers = {"Authorization": f"Bearer {token}"} if token and auth == "header" else None

        async def open_ws(replica: str | None = None) -> ClientConnection:
            # rtws.replica.<id>: behind rtws.ray's router, a reconnect returns to the replica holding the session
            offered = [Subprotocol(sub)] + ([Subprotocol("rtws.replica." + replica)] if replica else [])
            return await connect(url, subprotocols=offered, additional_headers=headers,
                                 open_timeout=open_timeout, max_size=max_size,
                                 origin=Origin(origin) if origin else None, compression=None)

        ws = await open_ws()
        try:
            if token and auth == "hello":
                await ws.send(_wire(c, p.Hello(token=token)))
            while True:
                frame = c.decode_any(await asyncio.wait_for(ws.recv(), open_timeout))
                if isinstance(frame, p.Ready):
                    break
                if isinstance(frame, p.Error):
                    raise ServerError(frame.code, frame.message)
            batching = batch and bool(frame.limits.batch)
            if batching:
                await ws.send(_wire(c, p.Hello(batch=True)))
            if resume and frame.resume_token is not None:
                await ws.send(_wire(c, p.Ack(received=0)))  # opt in to acks: the session can be resumed
        except BaseException:
            await ws.close()
            raise

        async def reconnect(client: Client) -> ClientConnection:
            assert client.ready is not None
            ws = await open_ws(client.ready.replica)
            hello = p.Hello(token=token if auth == "hello" else None, resume=client.ready.resume_token,
                            received=client.received, batch=True if batching else None)
            await ws.send(_wire(c, hello))
            return ws

        usable = resume and frame.resume_token is not None
        return cls(ws, c, frame, reconnect=reconnect if usable else None, resume=usable)

    @property
    def acking(self) -> bool:
        """This client acks what it receives: for resume, or because the server requires it
        (``ready.limits.ack_required``, e.g. behind rtws.ray), with or without resume."""
        return self.resume or (self.ready is not None and bool(self.ready.limits.ack_required))

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def send_frame(self, frame: Any) -> None:
        """Send one frame. While resuming, waits for the new socket; a frame lost with a dropped socket
        is covered by the resume (generates and cancels are sent again)."""
        if not self.resume:
            await self.ws.send(_wire(self.codec, frame))
            return
        await self._online.wait()
        try:
            await self.ws.send(_wire(self.codec, frame))
        except ConnectionClosed:
            if self._closing or not self.resume:
                raise

    async def generate(self, prompt: str | None = None, *, messages: list[dict[str, Any]] | None = None,
                       id: Any = None, **options: Any) -> Stream:
        """Start a generation; return its :class:`Stream` at once (text arrives as it is produced).

        ``options``: model, max_tokens, temperature, top_p, top_k, seed, stop, priority, conversation.
        """
        if self.closed is not None:
            raise self.closed
        gid = id if id is not None else f"g{next(self._ids)}"
        if gid in self._streams:
            raise ValueError(f"generation id {gid!r} is still live on this client")
        msgs = None if messages is None else [p.Message(**m) for m in messages]
        frame = p.Generate(id=gid, prompt=prompt, messages=msgs, **options)
        stream = Stream(self, gid)
        stream.frame = frame
        self._streams[gid] = stream
        await self.send_frame(frame)
        return stream

    async def cancel(self, gid: Any) -> None:
        await self.send_frame(p.Cancel(id=gid))

    async def history(self, conversation: str, timeout: float = 30.0) -> p.ConversationFrame:
        """The turns the server holds for ``conversation``. Raises :class:`ServerError` (unknown_conversation)."""
        fut: asyncio.Future[p.ConversationFrame] = asyncio.get_running_loop().create_future()
        self._history.setdefault(conversation, []).append(fut)
        await self.send_frame(p.History(conversation=conversation))
        return await asyncio.wait_for(fut, timeout)

    async def forget(self, conversation: str) -> None:
        """Delete a server-held conversation (fire and forget; an unknown one arrives on :attr:`errors`)."""
        await self.send_frame(p.Forget(conversation=conversation))

    async def close(self) -> None:
        """Close the session for good (close code 1000: the server ends it at once)."""
        self._closing = True
        await self.ws.close()
        self._reader.cancel()
        try:
            await self._reader
        except (asyncio.CancelledError, Exception):
            pass

    # ------------------------------------------------------------------ reading

    async def _read(self) -> None:
        try:
            while True:
                try:
                    async for data in self.ws:
                        await self._on_data(data)
                except ConnectionClosed:
                    pass
                # Resume only after a drop: a close frame from the server means it ended the session.
                if self._closing or not self.resume or self.ws.protocol.close_rcvd is not None:
                    break
                if not await self._resume():
                    break
        finally:
            self._online.set()
            self.closed = ConnectionLost(self.ws.close_code, self.ws.close_reason or "")
            for stream in self._streams.values():
                stream._queue.put_nowait(self.closed)
            self._streams.clear()
            for futs in self._history.values():
                for fut in futs:
                    if not fut.done():
                        fut.set_exception(self.closed)

    async def _on_data(self, data: bytes | str) -> None:
        """One WebSocket message: a frame, or a batch of frames (hello {batch: true}), each counted for acks."""
        self._unacked += len(data)
        self.messages += 1
        done = False
        counted = 0
        for frame in self.codec.decode_message(data):
            if isinstance(frame, p.Ready):
                continue
            self.received += 1
            counted += 1
            done = done or isinstance(frame, p.Done)
            self._on_frame(frame)
        if self.acking and (self._unacked >= self._ack_every or done):
            self._unacked = 0
            try:
                await self.ws.send(_wire(self.codec, p.Ack(received=self.received)))
            except ConnectionClosed:
                pass
        if self._replay_left:
            self._replay_left = max(0, self._replay_left - counted)
            if not self._replay_left:
                await self._after_replay()

    def _on_frame(self, frame: Any) -> None:
        if isinstance(frame, (p.Delta, p.Done)):
            stream = self._streams.get(frame.id)
            if stream is not None:
                stream._queue.put_nowait(frame)
                if isinstance(frame, p.Done):
                    del self._streams[frame.id]
        elif isinstance(frame, p.Error):
            stream = self._streams.pop(frame.id, None) if frame.id is not None else None
            if stream is not None:
                stream._queue.put_nowait(GenerationError(frame.code, frame.message, frame.id, frame.retry_after))
            else:
                futs = self._history.get(frame.conversation or "", [])
                if frame.code == "unknown_conversation" and futs:
                    futs.pop(0).set_exception(ServerError(frame.code, frame.message))
                else:
                    self.errors.put_nowait(ServerError(frame.code, frame.message, frame.id, frame.retry_after))
        elif isinstance(frame, p.ConversationFrame):
            futs = self._history.get(frame.id, [])
            if futs:
                fut = futs.pop(0)
                if not fut.done():
                    fut.set_result(frame)

    async def _resume(self) -> bool:
        """Reconnect and resume within the server's window. True: reading goes on (resumed or fresh)."""
        self._online.clear()
        assert self.ready is not None and self._reconnect_fn is not None
        window = self.ready.limits.resume_window_s or 30.0
        deadline = time.monotonic() + window
        delay = 0.05
        old_id = self.ready.session
        while not self._closing and time.monotonic() < deadline:
            try:
                ws = await self._reconnect_fn(self)
            except (OSError, asyncio.TimeoutError, ConnectionClosed, Exception):
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
                continue
            fresh: p.Ready | None = None
            try:
                while True:
                    data = await asyncio.wait_for(ws.recv(), 30.0)
                    frame = self.codec.decode_any(data)
                    if isinstance(frame, p.Ready):
                        if frame.resumed and frame.session == old_id:
                            self.ws, self.ready = ws, frame
                            self.resumes += 1
                            self._replay_left = frame.replay
                            self._online.set()
                            if not self._replay_left:
                                await self._after_replay()
                            return True
                        fresh = frame
                    elif isinstance(frame, p.Error) and frame.code == "resume_failed":
                        self.resume_failures += 1
                        lost = ResumeFailed(None, f"session could not be resumed ({frame.reason})")
                        for stream in self._streams.values():
                            stream._queue.put_nowait(lost)
                        self._streams.clear()
                        if fresh is None:  # the server always sends the fresh session's ready first
                            await ws.close()
                            return False
                        self.ws, self.ready = ws, fresh
                        self.received, self._unacked = 1, 0  # the error is this session's first frame
                        await ws.send(_wire(self.codec, p.Ack(received=1)))
                        self._online.set()
                        return True
            except (ConnectionClosed, asyncio.TimeoutError):
                await asyncio.sleep(delay)
                delay = min(1.0, delay * 2)
        return False

    async def _after_replay(self) -> None:
        """Everything lost was replayed: send again what the server never got (it is not in ``ready.live``)."""
        assert self.ready is not None
        live = set(self.ready.live or ())
        for gid, stream in list(self._streams.items()):
            if gid not in live and stream.frame is not None:
                await self.ws.send(_wire(self.codec, stream.frame))
            elif stream.cancel_requested:
                await self.ws.send(_wire(self.codec, p.Cancel(id=gid)))


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
