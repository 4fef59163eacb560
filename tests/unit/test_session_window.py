"""The acknowledgement window, retained frames and replay of rtws.session.Session, against a fake engine."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import msgspec
from tests.helpers.fake_engine import FakeEngine, FakeModel, FakeModels, Wire, frame, make_session, settle

from rtws import protocol as p
from rtws.session import Session, SessionLimits
from rtws.session_store import SessionStore


def texts(frames: list[Any]) -> dict[Any, str]:
    out: dict[Any, str] = {}
    for f in frames:
        if isinstance(f, p.Delta):
            out[f.id] = out.get(f.id, "") + f.text
    return out


def test_frames_are_retained_until_acked_and_the_window_pauses() -> None:
    async def main() -> None:
        s, engine, _, wire = make_session(high=600, low=200)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        s.on_frame(frame(p.Ack(received=0)))
        s.on_frame(frame(p.Generate(id="a", prompt="x", max_tokens=1000)))
        await settle()
        rid = engine.live[0]
        assert s.acking and s.frames_numbered == 0
        for i in range(40):
            engine.emit(rid, "y" * 20)
            await settle()
            if s.paused:
                break
        # Nothing acked: the written frames stay retained, and they alone trip the window.
        assert s.paused and rid in engine.paused
        assert s.unacked > 0 and s.buffered == 0 and s.held > 600
        assert len(s._retained) == s.frames_numbered == len(wire.counted())
        s.on_frame(frame(p.Ack(received=s.frames_numbered // 3)))
        assert s.paused, "still above the low watermark"
        s.on_frame(frame(p.Ack(received=s.frames_numbered)))
        assert not s.paused and rid not in engine.paused and s.unacked == 0
        # An ack for frames never sent is refused; the session keeps going.
        s.on_frame(frame(p.Ack(received=s.frames_numbered + 5)))
        await settle()
        assert isinstance(wire.frames[-1], p.Error) and wire.frames[-1].code == "invalid_params"
        s.close()
        await writer

    asyncio.run(main())


def test_a_session_that_never_acks_retains_nothing() -> None:
    async def main() -> None:
        s, engine, _, wire = make_session(high=600, low=200)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        s.on_frame(frame(p.Generate(id="a", prompt="x")))
        await settle()
        for _ in range(50):
            engine.emit(engine.live[0], "z" * 20)
            await settle()
        assert not s.acking and s.unacked == 0 and not s._retained and not s.paused
        assert s.frames_numbered == len(wire.counted()) == 50
        assert not s.resumable and s.resume_check(0, p.MSGPACK.name) == "gap"
        s.close()
        await writer

    asyncio.run(main())


def _run_with_drop(seed: int) -> None:
    """Four generations; the socket dies at a random frame; a new one resumes from what the client counted."""
    rng = random.Random(seed)

    async def main() -> None:
        s, engine, _, wire = make_session(high=2000, low=500)
        loop = asyncio.get_running_loop()
        writer = loop.create_task(s.run_writer())
        s.start()
        s.on_frame(frame(p.Ack(received=0)))
        for g in "abcd":
            s.on_frame(frame(p.Generate(id=g, prompt="x", max_tokens=1000)))
        await settle()
        rids = dict(zip("abcd", engine.live))
        expected = {g: "" for g in rids}
        produced = {g: 0 for g in rids}
        finish_at = {g: rng.randint(5, 60) for g in rids}
        drop_at = rng.randint(1, 40)
        new_wire: Wire | None = None
        step = 0
        while any(g for g in rids if produced[g] < finish_at[g]):
            step += 1
            for g, rid in rids.items():
                if produced[g] >= finish_at[g] or rid in engine.paused:
                    continue
                produced[g] += 1
                t = f"{g}{produced[g]};"
                expected[g] += t
                engine.emit(rid, t, finish="length" if produced[g] == finish_at[g] else None)
            await settle(rng.randint(0, 3))
            if step == drop_at:
                # The peer vanishes: the next write hangs; the app notices and detaches.
                wire.dead = True
                await settle(3)
                writer.cancel()
                s.detach()
                held = s.held
                assert held <= s.limits.high_watermark + 4 * 80
            if step == drop_at + 5:
                received = len(wire.counted())
                new_wire = Wire()
                assert s.resume_check(received, p.MSGPACK.name) is None
                s.attach(new_wire.send, received, on_policy_close=None, on_resume=None)
                writer = loop.create_task(s.run_writer())
            if new_wire is not None and rng.random() < 0.3:
                s.on_frame(frame(p.Ack(received=len(wire.counted()) + len(new_wire.counted()))))
        await settle(50)
        assert new_wire is not None
        got = wire.counted() + new_wire.counted()
        assert isinstance(new_wire.frames[0], p.Ready) and new_wire.frames[0].resumed
        assert texts(got) == expected
        for g in rids:
            seqs = [f.seq for f in got if isinstance(f, p.Delta) and f.id == g]
            assert seqs == list(range(len(seqs))), (g, seqs)
            dones = [f for f in got if isinstance(f, p.Done) and f.id == g]
            assert len(dones) == 1
            assert dones[0].usage.completion_tokens == sum(f.tokens for f in got if isinstance(f, p.Delta) and f.id == g)
            assert dones[0].usage.completion_tokens == finish_at[g]
        s.close()
        await writer

    asyncio.run(main())


def test_replay_after_a_drop_loses_and_repeats_nothing() -> None:
    for seed in range(25):
        _run_with_drop(seed)


def test_a_held_session_pauses_at_the_high_watermark_and_holds_at_most_one_step_more() -> None:
    async def main() -> None:
        s, engine, _, wire = make_session(high=1000, low=250)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        s.on_frame(frame(p.Ack(received=0)))
        for g in range(8):
            s.on_frame(frame(p.Generate(id=g, prompt="x", max_tokens=4000)))
        await settle()
        assert len(engine.live) == 8
        writer.cancel()
        s.detach()
        for _ in range(200):  # the engine keeps stepping; paused generations get no events
            for rid in engine.live:
                if rid not in engine.paused:
                    engine.emit(rid, "w" * 7)
            await settle(1)
        assert s.paused and set(engine.live) <= engine.paused
        # At most one engine step (one event per generation) lands past the watermark.
        assert s.max_held <= 1000 + 8 * (48 + 7), s.max_held
        s.close()
        assert engine.live == [] and len(engine.cancelled) == 8

    asyncio.run(main())


def test_resume_check_refuses_counts_it_cannot_replay() -> None:
    s, _, _, wire = make_session()
    s.acking = True
    s.frames_numbered, s.acked, s._retain_from = 10, 4, 3
    assert s.resume_check(4, "rtws.v1.msgpack") is None
    assert s.resume_check(10, "rtws.v1.msgpack") is None
    assert s.resume_check(3, "rtws.v1.msgpack") == "gap"  # acked 4, so frames up to 4 are gone
    assert s.resume_check(11, "rtws.v1.msgpack") == "gap"  # more than was ever sent
    assert s.resume_check(5, "rtws.v1.json") == "codec"
    s.close()
    assert s.resume_check(5, "rtws.v1.msgpack") == "expired"


def test_frames_sent_before_the_first_ack_cannot_be_replayed() -> None:
    async def main() -> None:
        s, engine, _, wire = make_session()
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        s.on_frame(frame(p.Generate(id="a", prompt="x")))
        await settle()
        engine.emit(engine.live[0], "one")
        engine.emit(engine.live[0], "two")
        await settle()
        n = s.frames_numbered
        s.on_frame(frame(p.Ack(received=0)))  # late opt-in: frames 1..n were never retained
        assert s.resume_check(0, p.MSGPACK.name) == "gap"
        assert s.resume_check(n, p.MSGPACK.name) is None
        s.close()
        await writer

    asyncio.run(main())


def test_require_ack_retains_from_the_first_frame_after_ready() -> None:
    """require_ack: acking from the start, as if ack {received: 0} followed ready. ready is not numbered, so
    frame 1 is the first delta, retained and replayable from received=0; a late ack {received: 0} changes
    nothing; ready.limits.ack_required says so; the window pauses a client that never acks."""
    async def main() -> None:
        engine = FakeEngine()
        model = FakeModel(engine, 4096)
        wire = Wire()
        s = Session(wire.send, p.MSGPACK, FakeModels(model), SessionLimits(high_watermark=600, low_watermark=200),
                    store=SessionStore(30.0), require_ack=True)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        s.on_frame(frame(p.Generate(id="a", prompt="x", max_tokens=1000)))
        await settle()
        ready = wire.frames[0]
        assert isinstance(ready, p.Ready) and ready.limits.ack_required is True
        assert s.acking and s.frames_numbered == 0 and s.resumable
        rid = engine.live[0]
        engine.emit(rid, "one")
        await settle()
        assert s.frames_numbered == 1 and [f.n for f in s._retained] == [1]
        assert s.resume_check(0, p.MSGPACK.name) is None  # everything after ready can be replayed
        s.on_frame(frame(p.Ack(received=0)))  # the opt-in a resume-capable client sends anyway
        assert s.unacked > 0 and [f.n for f in s._retained] == [1]
        for _ in range(40):  # never acked: the retained bytes alone trip the window
            engine.emit(rid, "y" * 20)
            await settle()
            if s.paused:
                break
        assert s.paused and rid in engine.paused and s.buffered == 0
        s.on_frame(frame(p.Ack(received=s.frames_numbered)))
        assert not s.paused and s.unacked == 0
        s.close()
        await writer

    asyncio.run(main())


def test_without_require_ack_ready_omits_the_field() -> None:
    s, _, _, _ = make_session()
    limits = s._limits_frame()
    assert limits.ack_required is None and not s.acking
    assert b"ack_required" not in msgspec.msgpack.encode(limits)
