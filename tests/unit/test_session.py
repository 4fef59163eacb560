"""rtws.session.Session on its own: no socket, no server, no model.

A Session is constructed directly against the fake engine (the test emits token events by hand) and a fake
socket (:class:`tests.helpers.fake_engine.Wire`, which can stop completing writes the way TCP flow control
does). Client frames go in through ``on_frame``; the frames written out are read back from the wire.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tests.helpers.fake_engine import (
    FakeEngine,
    FakeModel,
    FakeModels,
    ManualOffload,
    Wire,
    frame,
    make_session,
    settle,
)

from rtws import protocol as p
from rtws.generation import TokenEvent
from rtws.session import INLINE_PROMPT_CHARS, Session, SessionLimits


def deltas(wire: Wire, gid: Any) -> list[p.Delta]:
    return [f for f in wire.frames if isinstance(f, p.Delta) and f.id == gid]


def dones(wire: Wire, gid: Any) -> list[p.Done]:
    return [f for f in wire.frames if isinstance(f, p.Done) and f.id == gid]


Body = Callable[[Session, FakeEngine, Wire], Awaitable[None]]


def run_session(body: Body, **limits: Any) -> None:
    """Start a session and its writer, run ``body``, then close the session and check the writer returns."""
    async def main() -> None:
        s, engine, _, wire = make_session(**limits)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        await settle()
        try:
            await body(s, engine, wire)
        finally:
            s.close()
            wire.allow(None)
            await asyncio.wait_for(writer, 5)
        assert engine.live == [], "close() cancels every live generation in the engine"

    asyncio.run(main())


def test_a_generation_is_ready_then_numbered_deltas_then_one_done() -> None:
    async def body(s: Session, engine: FakeEngine, wire: Wire) -> None:
        assert isinstance(wire.frames[0], p.Ready) and wire.frames[0].session == s.id
        assert wire.frames[0].models == ["fake"]
        s.on_frame(frame(p.Generate(id="g", prompt="hi", max_tokens=5, temperature=0.0)))
        await settle()
        [rid] = engine.live
        assert engine.prompts[rid] == [ord(c) for c in "^hi"]  # the fake model's tokens are characters
        for t in ("To", " be"):
            engine.emit(rid, t)
            await settle()
        engine.emit(rid, ".", finish="length")
        await settle()
        ds = deltas(wire, "g")
        assert [(d.seq, d.text, d.tokens) for d in ds] == [(0, "To", 1), (1, " be", 1), (2, ".", 1)]
        [done] = dones(wire, "g")
        assert done.reason == "length"
        assert done.usage.prompt_tokens == 3 and done.usage.completion_tokens == 3
        assert wire.frames[-1] == done, "the done is the generation's last frame"
        assert s.idle and not s.live

    run_session(body)


def test_tokens_that_arrive_while_the_socket_is_busy_leave_as_one_delta() -> None:
    async def body(s: Session, engine: FakeEngine, wire: Wire) -> None:
        s.on_frame(frame(p.Generate(id="a", prompt="x", max_tokens=100)))
        s.on_frame(frame(p.Generate(id="b", prompt="y", max_tokens=100)))
        await settle()
        ra, rb = engine.live
        wire.allow(0)  # the peer stops reading: the next write blocks
        engine.emit(ra, "1")
        await settle()  # the writer is now stuck writing a's first delta
        for t in "234":
            engine.emit(ra, t)
            engine.emit(rb, t)
        engine.emit(ra, "5", finish="stop")
        await settle()
        assert [d.text for d in deltas(wire, "a")] == []  # nothing has completed yet
        wire.allow(None)
        await settle()
        assert [(d.text, d.tokens, d.seq) for d in deltas(wire, "a")] == [("1", 1, 0), ("2345", 4, 1)]
        assert [(d.text, d.tokens) for d in deltas(wire, "b")] == [("234", 3)]
        assert dones(wire, "a")[0].usage.completion_tokens == 5
        assert not dones(wire, "b"), "b is still live"
        # Per generation the frames keep their order: a's coalesced delta comes right before its done.
        a_frames = [f for f in wire.frames if getattr(f, "id", None) == "a"]
        assert isinstance(a_frames[-1], p.Done) and isinstance(a_frames[-2], p.Delta)

    run_session(body)


def test_pause_above_the_high_watermark_and_resume_only_below_the_low_one() -> None:
    async def body(s: Session, engine: FakeEngine, wire: Wire) -> None:
        s.on_frame(frame(p.Generate(id="a", prompt="x", max_tokens=1000)))
        s.on_frame(frame(p.Generate(id="b", prompt="y", max_tokens=1000)))
        await settle()
        ra, rb = engine.live
        wire.allow(0)
        engine.emit(ra, "a")
        await settle()  # the writer holds a's first delta; nothing else is buffered
        assert s.buffered == 0 and not s.paused
        engine.emit(rb, "b" * 150)  # b's pending delta: 150 chars plus the frame overhead
        await settle()
        assert not s.paused and not engine.paused and s.buffered < 400
        engine.emit(ra, "a" * 250)
        await settle()
        assert s.buffered > 400 and s.paused, "over the high watermark: the session pauses itself"
        assert engine.paused == {ra, rb}, "both of its generations are paused in the engine"
        # A generation submitted while paused starts paused.
        s.on_frame(frame(p.Generate(id="c", prompt="z", max_tokens=1000)))
        await settle()
        rc = engine.live[-1]
        assert rc in engine.paused
        wire.allow(1)  # a's first delta completes; the writer takes b's pending delta
        await settle()
        assert s.paused and s.buffered > 100
        wire.allow(1)  # b's delta completes with a's 298 bytes still pending: below high, above low
        await settle()
        # (the writer has since taken a's delta off the buffer and is blocked writing it)
        assert s.paused and engine.paused == {ra, rb, rc}, "no resume between the watermarks"
        wire.allow(1)  # a's second delta completes: the buffer is empty
        await settle()
        assert s.buffered == 0 and not s.paused and engine.paused == set()
        assert s.num_pauses == 1 and s.max_buffered > 400
        assert [d.text for d in deltas(wire, "a")] == ["a", "a" * 250]
        assert [d.text for d in deltas(wire, "b")] == ["b" * 150]

    run_session(body, high=400, low=100)


def test_no_delta_after_done_whether_the_engine_or_the_client_ended_it() -> None:
    async def body(s: Session, engine: FakeEngine, wire: Wire) -> None:
        s.on_frame(frame(p.Generate(id="fin", prompt="x", max_tokens=100)))
        s.on_frame(frame(p.Generate(id="cut", prompt="y", max_tokens=100)))
        await settle()
        r_fin, r_cut = engine.live
        sink_fin, sink_cut = engine.sinks[r_fin], engine.sinks[r_cut]
        engine.emit(r_fin, "one", finish="stop")
        engine.emit(r_cut, "two")
        await settle()
        assert dones(wire, "fin")[0].reason == "stop"
        # Cancelling a generation that already ended is a no-op: no error, no second done.
        n = len(wire.frames)
        s.on_frame(frame(p.Cancel(id="fin")))
        await settle()
        assert len(wire.frames) == n
        # Cancelling a live one ends it at once with done{cancelled} and cancels it in the engine.
        s.on_frame(frame(p.Cancel(id="cut")))
        await settle()
        assert r_cut in engine.cancelled
        [cut_done] = dones(wire, "cut")
        assert cut_done.reason == "cancelled" and cut_done.usage.completion_tokens == 1
        # Late events from the engine (already in flight when it ended) are dropped.
        sink_fin(TokenEvent(rid=r_fin, text="late", tokens=1))
        sink_cut(TokenEvent(rid=r_cut, text="late", tokens=1, finish="length"))
        await settle()
        for gid in ("fin", "cut"):
            frames = [f for f in wire.frames if getattr(f, "id", None) == gid]
            assert isinstance(frames[-1], p.Done) and len(dones(wire, gid)) == 1
            assert all(d.text != "late" for d in deltas(wire, gid))
        # An id that never existed is an error frame, and the session goes on.
        s.on_frame(frame(p.Cancel(id="nope")))
        await settle()
        assert isinstance(wire.frames[-1], p.Error) and wire.frames[-1].code == "unknown_id"
        assert not s.closed

    run_session(body)


def test_bad_frames_get_error_frames_and_other_generations_keep_streaming() -> None:
    async def body(s: Session, engine: FakeEngine, wire: Wire) -> None:
        s.on_frame(frame(p.Generate(id="ok", prompt="x", max_tokens=100)))
        await settle()
        [rid] = engine.live
        s.on_frame(b"\xc1 not msgpack")
        s.on_frame(frame(p.Generate(id="ok", prompt="again", max_tokens=1)))  # still running
        s.on_frame(frame(p.Generate(id="big", prompt="x", max_tokens=10**6)))
        s.on_frame(frame(p.Generate(id="who", prompt="x", model="missing")))
        await settle()
        codes = [f.code for f in wire.frames if isinstance(f, p.Error)]
        assert codes == ["bad_frame", "duplicate_id", "invalid_params", "unknown_model"], codes
        assert engine.live == [rid], "refused frames never reach the engine"
        engine.emit(rid, "fine", finish="stop")
        await settle()
        assert [d.text for d in deltas(wire, "ok")] == ["fine"] and dones(wire, "ok")[0].reason == "stop"

    run_session(body, max_tokens=4096)


def test_the_lead_rule_holds_and_resumes_for_a_credit_of_bytes_only() -> None:
    """set_reader_behind: held generations pause in the engine; resumed with a credit, they are held again once
    the socket has written that many more bytes, with no watchdog tick needed."""
    async def body(s: Session, engine: FakeEngine, wire: Wire) -> None:
        s.on_frame(frame(p.Generate(id="a", prompt="x", max_tokens=1000)))
        await settle()
        (ra,) = engine.live
        s.set_reader_behind(True)
        assert s.paused and engine.paused == {ra} and s.behind_since is not None
        blocked = s.blocked_s
        s.set_reader_behind(False, credit=100)
        assert not s.paused and engine.paused == set()
        assert s.blocked_s > blocked, "time held by the lead rule counts as time blocked on the reader"
        start = s.bytes_sent
        engine.emit(ra, "a" * 40)
        await settle()
        assert not s.reader_behind and s.bytes_sent - start < 100  # within the credit: still streaming
        engine.emit(ra, "b" * 80)
        await settle()
        assert s.bytes_sent - start >= 100
        assert s.reader_behind and engine.paused == {ra}, "the credit is spent: held until the reader takes more"

    run_session(body)


def test_lead_resumes_take_a_few_generations_per_tick_longest_held_first() -> None:
    from rtws.app import resume_lead_held

    class Held:
        def __init__(self, live: int) -> None:
            self.live = dict.fromkeys(range(live))
            self.credits: list[int] = []

        def set_reader_behind(self, behind: bool, credit: int | None = None) -> None:
            assert not behind and credit is not None
            self.credits.append(credit)

    a, b, c = Held(8), Held(8), Held(20)
    ready: list[Any] = [(3.0, b, 512), (1.0, a, 256), (2.0, c, 128)]
    def ids(ready: list[Any], max_rows: int) -> list[int]:
        return [id(x) for x in resume_lead_held(ready, max_rows)]

    assert ids(ready, 8) == [id(a)]  # 8 rows: the longest held only; b and c wait for the next tick
    assert ids(ready, 16) == [id(a)]  # c (held next longest) would take it past 16: the tick ends
    assert ids([(2.0, c, 128)], 8) == [id(c)]  # always at least one session, however many rows
    assert a.credits == [256, 256] and c.credits == [128] and b.credits == []


def test_short_plain_prompts_skip_the_tokenizer_thread_unless_an_earlier_one_is_there() -> None:
    """A short plain prompt is tokenized on the loop (no thread hop); a long one, or chat messages, go to the
    tokenizer thread, and so does a short prompt behind one still there, so the session's frames stay in order."""
    async def main() -> None:
        engine = FakeEngine()
        wire = Wire()
        offload = ManualOffload()
        s = Session(wire.send, p.MSGPACK, FakeModels(FakeModel(engine, 10 * INLINE_PROMPT_CHARS)), SessionLimits(),
                    offload=offload)
        s.start()
        s.on_frame(frame(p.Generate(id="short", prompt="x" * INLINE_PROMPT_CHARS, max_tokens=5)))
        assert len(engine.live) == 1 and not offload.jobs  # submitted at once, on the loop
        s.on_frame(frame(p.Generate(id="chat", messages=[p.Message(role="user", content="hi")], max_tokens=5)))
        s.on_frame(frame(p.Generate(id="long", prompt="y" * (INLINE_PROMPT_CHARS + 1), max_tokens=5)))
        s.on_frame(frame(p.Generate(id="after", prompt="z", max_tokens=5)))
        assert len(engine.live) == 1 and len(offload.jobs) == 3  # behind the chat and long ones: the thread too
        offload.finish()
        await settle()
        prompts = [engine.prompts[r] for r in engine.live]
        assert [len(x) for x in prompts] == [INLINE_PROMPT_CHARS + 1, len("user: hi\nassistant: "),
                                             INLINE_PROMPT_CHARS + 2, 2]  # in frame order
        s.on_frame(frame(p.Generate(id="again", prompt="w", max_tokens=5)))
        assert len(engine.live) == 5 and not offload.jobs  # the thread is idle again: on the loop
        s.close()

    asyncio.run(main())
