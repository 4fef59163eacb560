"""A reader that stops reading pauses only itself; its buffer stays bounded; it is closed after the timeout."""

from __future__ import annotations

import asyncio
import socket
import statistics
import time
from pathlib import Path
from typing import Any

from tests.helpers.server import UNIT, RunningServer, ServerFactory, run, session_with_live
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rtws import protocol as p
from rtws.client import Client

HIGH = 1024


async def itl_ms(url: str, n_streams: int, max_tokens: int) -> list[float]:
    """Inter-token gaps (ms per token) seen by a well-behaved client."""
    gaps: list[float] = []
    async with await Client.connect(url) as c:
        streams = [await c.generate("b", max_tokens=max_tokens, temperature=0.0) for _ in range(n_streams)]

        async def consume(s: Any) -> None:
            last = None
            async for _ in s:
                now = time.perf_counter()
                if last is not None:
                    gaps.append((now - last) * 1000)
                last = now

        await asyncio.gather(*(consume(s) for s in streams))
        assert all(s.reason == "length" for s in streams)
    return gaps


def test_stalled_reader_pauses_itself_and_is_closed(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir, send_high_watermark=HIGH, stall_timeout_s=5.0 * UNIT,
                            transport_high_water=4096, socket_send_buffer=8192)
    engine = server.engine()

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        out["baseline"] = await itl_ms(server.url, 4, 60)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window fills fast
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        ws = await connect(server.url, sock=sock, max_queue=1)
        p.MSGPACK.decode_any(await ws.recv())
        for i in range(8):
            await ws.send(p.MSGPACK.encode(p.Generate(id=i, prompt="a", max_tokens=4000, temperature=0.0)))
        ws.transport.pause_reading()  # stop reading: the kernel buffers fill, then the server's
        session = None
        deadline = time.monotonic() + 60 * UNIT
        while session is None and time.monotonic() < deadline:
            found = [c.session for c in server.app.connections if len(c.session.live) == 8]
            session = found[0] if found else None
            await asyncio.sleep(0.005)
        assert session is not None
        while not session.num_pauses and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert session.num_pauses >= 1, ("the stalled session never paused", session.buffered, session.send_started,
                                         session.frames_sent, len(session.live), engine.stats())
        while engine.stats().paused < 8 and time.monotonic() < deadline:  # applied at the next step boundary
            await asyncio.sleep(0.005)
        out["paused_in_engine"] = engine.stats().paused
        out["during"] = await itl_ms(server.url, 4, 60)  # another client streams meanwhile
        out["max_buffered"] = session.max_buffered
        t0 = time.monotonic()
        while server.app.connections and time.monotonic() - t0 < 20 * UNIT:
            await asyncio.sleep(0.02)
        out["closed_after"] = time.monotonic() - t0
        out["connections"] = len(server.app.connections)
        while engine.stats().slots_in_use and time.monotonic() - t0 < 22 * UNIT:
            await asyncio.sleep(0.02)
        out["slots"] = engine.stats().slots_in_use
        ws.transport.resume_reading()
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5 * UNIT)
        except (ConnectionClosed, asyncio.TimeoutError):
            pass
        out["close_code"] = ws.close_code
        return out

    out = run(main())
    assert out["paused_in_engine"] == 8  # all eight kept their slots but left the batch
    # bounded: the high watermark plus at most one engine step's worth of events for 8 streams
    assert out["max_buffered"] <= HIGH + 8 * 200, out["max_buffered"]
    base, during = statistics.median(out["baseline"]), statistics.median(out["during"])
    assert during <= 3 * base + 20, (base, during)  # the other client streams at its normal pace
    assert out["connections"] == 0 and out["slots"] == 0
    # 1008 when the reader resumes in time to read the close frame; 1006 once the server aborted the socket
    assert out["close_code"] in (1008, 1006)


def test_busy_socket_coalesces_tokens_into_fewer_frames(server_factory: ServerFactory,
                                                        tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir)

    async def main() -> tuple[int, int, str, str]:
        async with await Client.connect(server.url) as c:
            s = await c.generate("a", max_tokens=300, temperature=0.0)
            c.ws.transport.pause_reading()
            await asyncio.sleep(0.5 * UNIT)
            c.ws.transport.resume_reading()
            slow = await s.result()
            ref = await c.generate("a", max_tokens=300, temperature=0.0)
            fast = await ref.result()
            return s.deltas, s.tokens, slow.text, fast.text

    deltas, tokens, slow, fast = run(main())
    assert tokens == 300
    assert slow == fast
    assert deltas < tokens  # several tokens shared a frame while the socket was busy


def test_generations_pause_above_the_high_watermark_and_resume_below_the_low(server_factory: ServerFactory,
                                                                           tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir, send_high_watermark=512, send_low_watermark=128,
                            transport_high_water=2048, socket_send_buffer=4096)

    async def main() -> tuple[int, int, int]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        ws = await connect(server.url, sock=sock)
        p.MSGPACK.decode_any(await ws.recv())
        for i in range(4):
            await ws.send(p.MSGPACK.encode(p.Generate(id=i, prompt="a", max_tokens=1500, temperature=0.0)))
        ws.transport.pause_reading()
        session = None
        deadline = time.monotonic() + 60 * UNIT
        while time.monotonic() < deadline:
            found = [x.session for x in server.app.connections if len(x.session.live) == 4]
            if found and found[0].num_pauses:
                session = found[0]
                break
            await asyncio.sleep(0.005)
        assert session is not None, "never paused"
        ws.transport.resume_reading()  # the reader catches up: buffer drains below low, generations resume
        tokens = 0
        dones = 0
        while dones < 4:
            f = p.MSGPACK.decode_any(await asyncio.wait_for(ws.recv(), 30 * UNIT))
            if isinstance(f, p.Delta):
                tokens += f.tokens
            elif isinstance(f, p.Done):
                dones += 1
                assert f.reason == "length"
        await ws.close()
        return session.num_pauses, tokens, session.max_buffered

    pauses, tokens, max_buffered = run(main())
    assert pauses >= 1
    assert tokens == 4 * 1500  # every generation resumed and ran to its end
    assert max_buffered <= 512 + 4 * 200


async def held_reader(server: RunningServer, deadline: float) -> tuple[Any, Any]:
    """A socket with a 4 KiB receive buffer runs 4 long generations and stops reading, so everything it is sent
    fits in the kernel's buffers; returns it with its server-side session once the lead rule holds it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    sock.setblocking(False)
    ws = await connect(server.url, sock=sock, max_queue=1)
    p.MSGPACK.decode_any(await ws.recv())
    for i in range(4):
        await ws.send(p.MSGPACK.encode(p.Generate(id=i, prompt="a", max_tokens=3000, temperature=0.0)))
    ws.transport.pause_reading()
    session = await session_with_live(server, 4, deadline)
    while not session.reader_behind and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return ws, session


def test_a_reader_that_falls_behind_pauses_before_any_buffer_fills(server_factory: ServerFactory,
                                                                   tiny_llama_long_dir: Path) -> None:
    """The lead rule: a trickle reader whose output all fits in the kernel's send buffer never makes the socket
    unwritable, so the send-buffer watermark never trips; its generations must still pause once it is
    ``reader_lead_bytes`` behind, and resume (losing nothing) when it catches up."""
    lead = 16 * 1024
    server = server_factory(tiny_llama_long_dir, reader_lead_bytes=lead)  # default watermarks, OS-tuned buffers
    engine = server.engine()

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        deadline = time.monotonic() + 60 * UNIT
        ws, session = await held_reader(server, deadline)
        out["behind"] = session.reader_behind
        out["buffered"] = session.buffered  # the send buffer never filled: the socket stayed writable
        while engine.stats().paused < 4 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        out["paused"] = engine.stats().paused
        tokens = engine.stats().tokens_generated
        await asyncio.sleep(1.0 * UNIT)
        out["tokens_while_paused"] = engine.stats().tokens_generated - tokens
        ws.transport.resume_reading()
        done: dict[int | str, int] = {}
        counted: dict[int | str, int] = {}
        while len(done) < 4:
            f = p.MSGPACK.decode_any(await asyncio.wait_for(ws.recv(), 60 * UNIT))
            if isinstance(f, p.Delta):
                counted[f.id] = counted.get(f.id, 0) + f.tokens
            elif isinstance(f, p.Done):
                done[f.id] = f.usage.completion_tokens
        out["done"], out["counted"] = done, counted
        # The watchdog clears the flag on its next tick once the kernel's queue has drained (bounded wait).
        while session.reader_behind and time.monotonic() < deadline + 30 * UNIT:
            await asyncio.sleep(0.02)
        out["resumed"] = not session.reader_behind
        await ws.close()
        return out

    out = run(main())
    assert out["behind"] and out["paused"] == 4, out
    assert out["buffered"] < 256 * 1024  # paused well before the send-buffer watermark
    assert out["tokens_while_paused"] == 0  # paused generations cost the engine nothing
    assert out["done"] == {i: 3000 for i in range(4)} and out["counted"] == out["done"]  # nothing lost
    assert out["resumed"]


def test_a_reader_held_by_the_lead_rule_that_stops_reading_is_closed_as_stalled(
        server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    """No send ever blocks for a reader the lead rule holds (its output fits in the kernel's buffers), so the
    stall rule must run on the lead rule's own clock: held, and nothing taken for ``stall_timeout_s``, it is
    closed (1008) and its generations are cancelled, freeing their slots."""
    server = server_factory(tiny_llama_long_dir, reader_lead_bytes=4096, stall_timeout_s=1.0 * UNIT)
    engine = server.engine()

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        deadline = time.monotonic() + 60 * UNIT
        ws, session = await held_reader(server, deadline)
        out["behind"] = session.reader_behind
        out["send_blocked"] = session.send_started is not None
        t0 = time.monotonic()
        while any(c.session is session for c in server.app.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        out["closed_after_s"] = time.monotonic() - t0
        out["open"] = any(c.session is session for c in server.app.connections)
        while engine.stats().running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        out["running"] = engine.stats().running
        ws.transport.resume_reading()
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 30 * UNIT)
        except ConnectionClosed as exc:
            out["code"] = exc.rcvd.code if exc.rcvd else None
        return out

    out = run(main())
    assert out["behind"] and not out["send_blocked"], out  # held by the lead rule, not by a blocked send
    assert not out["open"] and out["closed_after_s"] < 20 * UNIT, out
    assert out["running"] == 0, out  # its generations were cancelled
    assert out["code"] in (1008, None), out  # 1008, or no close frame at all if it had to be forced
