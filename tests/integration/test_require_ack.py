"""``require_ack``: every /ws session acks from its first frame (what rtws.ray turns on behind Serve's proxy).

Real uvicorn on port 0, the tiny no-EOS model. A small window (``send_high_watermark``) so that a reader that
never acks trips it within kilobytes, long before loopback's kernel buffers could block ``send``: what pauses
it here is the window, not the socket.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import msgspec
from tests.helpers.server import UNIT, ServerFactory, run, session_with_live
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rtws import protocol as p
from rtws.client import Client

HIGH = 4096


async def _raw(url: str) -> tuple[Any, dict[str, Any]]:
    """A raw msgpack socket and its ready frame as a plain dict (to see which fields are on the wire)."""
    ws = await connect(url, subprotocols=[p.SUBPROTOCOL_MSGPACK], compression=None)  # type: ignore[list-item]
    raw: bytes = await asyncio.wait_for(ws.recv(decode=False), 30 * UNIT)
    ready: dict[str, Any] = msgspec.msgpack.decode(raw)
    assert ready["type"] == "ready", ready
    return ws, ready


def test_a_reader_that_never_acks_pauses_at_the_window_and_is_closed_1008(server_factory: ServerFactory,
                                                                          tiny_llama_long_dir: Path) -> None:
    stall = 2.0 * UNIT
    server = server_factory(tiny_llama_long_dir, require_ack=True, send_high_watermark=HIGH, stall_timeout_s=stall)
    engine = server.engine()

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        ws, ready = await _raw(server.url)
        out["limits"] = ready["limits"]
        for i in range(4):
            await ws.send(p.MSGPACK.encode(p.Generate(id=i, prompt="a", max_tokens=4000, temperature=0.0)))
        # Never read, never ack.
        deadline = time.monotonic() + 60 * UNIT
        session = await session_with_live(server, 4, deadline)
        while engine.stats().paused < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        out["paused"] = engine.stats().paused
        out["acking"], out["unacked"], out["buffered"] = session.acking, session.unacked, session.buffered
        out["send_blocked"] = session.send_started is not None
        out["max_held"] = session.max_held
        t0 = time.monotonic()
        while server.app.connections and time.monotonic() - t0 < stall + 20 * UNIT:
            await asyncio.sleep(0.02)
        out["closed_after"] = time.monotonic() - t0
        out["connections"] = len(server.app.connections)
        while engine.stats().slots_in_use and time.monotonic() - t0 < stall + 22 * UNIT:
            await asyncio.sleep(0.02)
        out["slots"] = engine.stats().slots_in_use
        frames = 0
        try:
            while True:  # what was written before the pause, then the close frame
                await asyncio.wait_for(ws.recv(), 10 * UNIT)
                frames += 1
        except ConnectionClosed as exc:
            out["close"] = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else None
        out["frames"] = frames
        return out

    out = run(main())
    assert out["limits"]["ack_required"] is True and out["limits"]["window"] == HIGH
    assert out["paused"] == 4, out  # all four kept their slots but left the batch
    # unacknowledged bytes tripped the window: held (unacked + queued, counted when the pause was decided)
    # went over it. A later snapshot can read a little under it: queued text is counted by characters when
    # it arrives, written frames by encoded bytes (two CI runs read 4,076 unacked + 0 queued)...
    assert out["acking"] and out["max_held"] > HIGH and out["unacked"] > HIGH // 2, out
    assert not out["send_blocked"], out  # ...not a blocked send: the socket was never full
    # bounded: the window plus at most one engine step's worth of frames for 4 streams
    assert out["max_held"] <= HIGH + 4 * 200, out
    assert out["connections"] == 0 and out["slots"] == 0, out
    assert out["close"] == (1008, "acknowledgements stalled"), out
    assert out["closed_after"] < stall + 10 * UNIT, out
    assert 0 < out["frames"] < 4 * 200, out


def test_a_raw_client_that_acks_streams_to_completion(server_factory: ServerFactory,
                                                      tiny_llama_long_dir: Path) -> None:
    """Acking every window/8 bytes (as docs/protocol.md asks) keeps a long generation going through many
    windows; the ready frame is not counted, so the first frame acked is 1."""
    server = server_factory(tiny_llama_long_dir, require_ack=True, send_high_watermark=HIGH)

    async def main() -> tuple[str, int, int]:
        ws, ready = await _raw(server.url)
        await ws.send(p.MSGPACK.encode(p.Generate(id="g", prompt="a", max_tokens=1500, temperature=0.0)))
        received = unacked = tokens = 0
        while True:
            data = await asyncio.wait_for(ws.recv(), 30 * UNIT)
            f = p.MSGPACK.decode_any(data)
            received += 1
            unacked += len(data)
            if isinstance(f, p.Delta):
                tokens += f.tokens
            if unacked >= HIGH // 8 or isinstance(f, p.Done):
                unacked = 0
                await ws.send(p.MSGPACK.encode(p.Ack(received=received)))
            if isinstance(f, p.Done):
                await ws.close()
                return f.reason, tokens, received

    reason, tokens, frames = run(main())
    assert reason == "length" and tokens == 1500
    assert frames * 30 > 4 * HIGH  # many windows' worth went through


def test_the_python_client_acks_without_resume(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    """rtws.client with resume=False still acks when ready.limits.ack_required says so: long generations end."""
    server = server_factory(tiny_llama_long_dir, require_ack=True, send_high_watermark=HIGH, stall_timeout_s=5.0)

    async def main() -> tuple[bool, bool, list[tuple[str, int]]]:
        async with await Client.connect(server.url, resume=False) as c:
            assert c.ready is not None
            streams = [await c.generate(f"s{i}", max_tokens=1200, temperature=0.0) for i in range(3)]
            results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 120 * UNIT)
            return c.resume, c.acking, [(r.reason, r.completion_tokens) for r in results]

    resume, acking, results = run(main())
    assert not resume and acking
    assert results == [("length", 1200)] * 3


def test_ack_required_is_announced_only_when_on(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    """Off (the default for rtws serve): the field is absent from ready.limits, and a client that never
    acks is not acking (socket backpressure only, as in protocol v1)."""
    server = server_factory(tiny_llama_dir)

    async def main() -> tuple[dict[str, Any], bool]:
        ws, ready = await _raw(server.url)
        await ws.send(p.MSGPACK.encode(p.Generate(id="g", prompt="a", max_tokens=4, temperature=0.0)))
        while not isinstance(p.MSGPACK.decode_any(await asyncio.wait_for(ws.recv(), 30 * UNIT)), p.Done):
            pass
        acking = [c.session.acking for c in server.app.connections]
        await ws.close()
        async with await Client.connect(server.url, resume=False) as c:
            assert c.ready is not None and c.ready.limits.ack_required is None and not c.acking
        return ready["limits"], acking == [False]

    limits, not_acking = run(main())
    assert "ack_required" not in limits and "window" in limits
    assert not_acking


def test_realtime_is_not_paused_by_require_ack(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    """The OpenAI Realtime protocol has no acks: /v1/realtime sessions are exempt (socket backpressure only),
    so a response far longer than the window completes without the client ever acking."""
    server = server_factory(tiny_llama_long_dir, model_name="long", require_ack=True, send_high_watermark=HIGH,
                            stall_timeout_s=2.0 * UNIT, max_tokens_limit=1500)

    async def main() -> tuple[str, int, bool]:
        async with connect(f"ws://127.0.0.1:{server.port}/v1/realtime?model=long") as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 10 * UNIT))["type"] == "session.created"
            acking = [c.session.acking for c in server.app.connections]
            await ws.send(json.dumps({"type": "response.create", "response": {
                "conversation": "none", "max_output_tokens": 1500, "temperature": 0.0,
                "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"}]}]}}))
            while True:
                e = json.loads(await asyncio.wait_for(ws.recv(), 30 * UNIT))
                if e["type"] == "response.done":
                    r = e["response"]
                    return r["status_details"]["reason"], r["usage"]["output_tokens"], acking == [False]

    reason, tokens, exempt = run(main())
    assert exempt
    assert reason == "max_output_tokens" and tokens == 1500
