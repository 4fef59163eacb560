"""A fake engine (the test drives token events by hand) and a fake model registry for Session tests."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

from rtws import protocol as p
from rtws.generation import TokenEvent
from rtws.session import Session, SessionLimits
from rtws.session_store import SessionStore


class FakeEngine:
    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.sinks: dict[int, Callable[[TokenEvent], None]] = {}
        self.prompts: dict[int, list[int]] = {}
        self.paused: set[int] = set()
        self.cancelled: set[int] = set()

    def submit(self, prompt_ids: list[int], params: Any, sink: Callable[[TokenEvent], None], *,
               priority: str = "normal", deadline: float | None = None) -> int:
        rid = next(self._ids)
        self.sinks[rid] = sink
        self.prompts[rid] = list(prompt_ids)
        return rid

    def cancel(self, rid: int) -> None:
        self.cancelled.add(rid)
        self.sinks.pop(rid, None)

    def pause(self, rids: Any) -> None:
        self.paused.update(rids)

    def resume(self, rids: Any) -> None:
        self.paused.difference_update(rids)

    @property
    def live(self) -> list[int]:
        return list(self.sinks)

    def emit(self, rid: int, text: str, tokens: int = 1, finish: str | None = None) -> None:
        sink = self.sinks[rid]
        if finish is not None:
            del self.sinks[rid]
        sink(TokenEvent(rid=rid, text=text, tokens=tokens, finish=finish))


class FakeModel:
    """Tokens are characters; messages render as ``role: content\\n`` lines plus ``assistant: ``."""

    def __init__(self, engine: FakeEngine, context_len: int = 4096) -> None:
        self.name = "fake"
        self.version = "1"
        self.engine = engine
        self.context_len = context_len
        self.max_prompt_tokens = context_len - 1
        self.rendered: list[str] = []

    def encode(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None) -> list[int]:
        if messages is not None:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant: "
        else:
            text = "^" + (prompt or "")
        if len(text) > self.max_prompt_tokens:
            raise ValueError(f"prompt is {len(text)} tokens; this model accepts at most {self.max_prompt_tokens}")
        self.rendered.append(text)
        return [ord(c) for c in text]


class FakeModels:
    def __init__(self, model: FakeModel) -> None:
        self.model = model

    def get(self, name: str | None) -> Any:
        return self.model if name in (None, "fake") else None

    def names(self) -> list[str]:
        return ["fake"]


class Wire:
    """The socket side: collects written frames.

    ``dead = True`` makes the next write hang forever (a dead peer). ``credit`` models TCP flow control: None
    (the default) lets every write through; a number lets that many more writes complete, then ``send`` blocks
    until :meth:`allow` grants more (a peer that stopped reading).
    """

    def __init__(self, codec: p.Codec = p.MSGPACK) -> None:
        self.codec = codec
        self.frames: list[Any] = []
        self.raw: list[bytes] = []
        self.dead = False
        self.credit: int | None = None
        self._granted = asyncio.Event()

    def allow(self, n: int | None) -> None:
        """Let ``n`` more writes complete (None: all of them, from now on)."""
        self.credit = None if n is None else (self.credit or 0) + n
        self._granted.set()

    async def send(self, data: bytes | str) -> None:
        if self.dead:
            await asyncio.Event().wait()  # never returns: cancelled by the owner
        while self.credit is not None and self.credit <= 0:
            self._granted.clear()
            await self._granted.wait()
        if self.credit is not None:
            self.credit -= 1
        assert isinstance(data, bytes)
        self.raw.append(data)
        self.frames.append(self.codec.decode_any(data))

    def counted(self) -> list[Any]:
        """Frames that count for acks (all but ready)."""
        return [f for f in self.frames if not isinstance(f, p.Ready)]


def make_session(*, high: int = 4096, low: int = 1024, window_s: float = 30.0, context_len: int = 4096,
                 store: SessionStore | None = None, **limits: Any) -> tuple[Session, FakeEngine, FakeModel, Wire]:
    engine = FakeEngine()
    model = FakeModel(engine, context_len)
    wire = Wire()
    store = store if store is not None else SessionStore(window_s)
    lim = SessionLimits(high_watermark=high, low_watermark=low, **limits)
    s = Session(wire.send, p.MSGPACK, FakeModels(model), lim, store=store)
    return s, engine, model, wire


def frame(obj: Any) -> bytes:
    return p.MSGPACK.encode(obj)


async def settle(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


class ManualOffload:
    """An offload whose results the test delivers by hand (``finish``), on the loop, like the tokenizer thread's."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, asyncio.Future[Any]]] = []

    def __call__(self, fn: Any) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.jobs.append((fn, fut))
        return fut

    def finish(self) -> None:
        for fn, fut in self.jobs:
            try:
                fut.set_result(fn())
            except Exception as exc:  # noqa: BLE001
                fut.set_exception(exc)
        self.jobs.clear()
