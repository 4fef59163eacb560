"""Resume after a dropped socket, over a real uvicorn server (port 0) and a real tiny model.

The drop is an abort (TCP reset, no close frame) while 8 seeded generations stream on one socket; the
client reconnects and sends ``hello {resume, received}``. Every text must equal an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.server import UNIT, RunningServer, ServerFactory, run
from websockets.asyncio.client import ClientConnection, connect

from rtws import protocol as p
from rtws.client import Client

N = 8
MAX_TOKENS = 120


class Peer:
    """A raw protocol client that counts frames and acks, as docs/protocol.md asks."""

    def __init__(self, ws: ClientConnection, ready: p.Ready) -> None:
        self.ws = ws
        self.ready = ready
        self.received = 0
        self.frames: list[Any] = []
        self.unacked = 0
        self.auto_ack = True

    @classmethod
    async def open(cls, url: str, hello: p.Hello | None = None, *, expect_resumed: bool = False,
                   ack: bool = True) -> tuple[Peer, list[Any]]:
        ws = await connect(url, subprotocols=[p.SUBPROTOCOL_MSGPACK])  # type: ignore[list-item]
        if hello is not None:
            await ws.send(p.MSGPACK.encode(hello))
        early: list[Any] = []
        while True:
            f = p.MSGPACK.decode_any(await asyncio.wait_for(ws.recv(), 10 * UNIT))
            if isinstance(f, p.Ready) and (f.resumed or not expect_resumed):
                break
            early.append(f)
            if isinstance(f, p.Error) and f.code == "resume_failed" and expect_resumed:
                raise AssertionError(f"resume refused: {f}")
        peer = cls(ws, f)
        if ack and not f.resumed:
            await peer.ack()
        return peer, early

    async def ack(self) -> None:
        await self.ws.send(p.MSGPACK.encode(p.Ack(received=self.received)))

    async def recv(self, timeout: float = 20 * UNIT) -> Any:
        data = await asyncio.wait_for(self.ws.recv(), timeout)
        f = p.MSGPACK.decode_any(data)
        if not isinstance(f, p.Ready):
            self.received += 1
            self.frames.append(f)
            self.unacked += len(data)
            # As docs/protocol.md asks: ack at every done and whenever window/8 bytes came in since the last.
            if self.auto_ack and (isinstance(f, p.Done) or self.unacked >= (self.ready.limits.window or 0) // 8):
                self.unacked = 0
                await self.ack()
        return f

    def abort(self) -> None:
        self.ws.transport.abort()  # a reset, no close frame: an unclean drop


def gen(i: int, max_tokens: int = MAX_TOKENS) -> p.Generate:
    return p.Generate(id=f"g{i}", prompt=f"ROMEO {i}:\n", max_tokens=max_tokens, temperature=0.8, seed=1000 + i)


async def reference(url: str, max_tokens: int = MAX_TOKENS) -> dict[str, str]:
    async with await Client.connect(url, resume=False) as c:
        streams = [await c.generate(g.prompt, id=g.id, max_tokens=max_tokens, temperature=0.8, seed=g.seed)
                   for g in (gen(i, max_tokens) for i in range(N))]
        return {s.id: (await s.result()).text for s in streams}


def check(frames: list[Any], expected: dict[str, str]) -> None:
    text: dict[Any, str] = {}
    tokens: dict[Any, int] = {}
    seqs: dict[Any, list[int]] = {}
    dones: dict[Any, list[p.Done]] = {}
    for f in frames:
        if isinstance(f, p.Delta):
            assert f.id not in dones, f"delta after done for {f.id}"
            text[f.id] = text.get(f.id, "") + f.text
            tokens[f.id] = tokens.get(f.id, 0) + f.tokens
            seqs.setdefault(f.id, []).append(f.seq)
        elif isinstance(f, p.Done):
            dones.setdefault(f.id, []).append(f)
        else:
            raise AssertionError(f"unexpected frame {f}")
    assert text == expected
    for gid in expected:
        assert len(dones[gid]) == 1, f"{gid}: {len(dones[gid])} dones"
        assert dones[gid][0].usage.completion_tokens == tokens[gid]
        assert seqs[gid] == list(range(len(seqs[gid])))


async def drop_and_resume(server: RunningServer, delay: float, *, frames_before_drop: int = 30,
                          max_tokens: int = MAX_TOKENS) -> tuple[list[Any], Peer, Any]:
    peer, _ = await Peer.open(server.url)
    for i in range(N):
        await peer.ws.send(p.MSGPACK.encode(gen(i, max_tokens)))
    while peer.received < frames_before_drop:
        await peer.recv()
    before = list(peer.frames)
    assert not all(isinstance(f, p.Done) for f in before[-N:]), "everything finished before the drop"
    peer.abort()
    await asyncio.sleep(0.2)
    held = server.app.sessions.held()
    assert len(held) == 1 and held[0].id == peer.ready.session
    await asyncio.sleep(delay)
    session = held[0]
    assert peer.ready.resume_token is not None
    new, _ = await Peer.open(server.url, p.Hello(resume=peer.ready.resume_token, received=peer.received),
                             expect_resumed=True)
    assert new.ready.session == peer.ready.session and new.ready.resume_token != peer.ready.resume_token
    new.received = peer.received
    done: set[Any] = {f.id for f in before if isinstance(f, p.Done)}
    while len(done) < N:
        f = await new.recv()
        if isinstance(f, p.Done):
            done.add(f.id)
    await new.ws.close()
    return before + new.frames, new, session


def read_metrics(server: Any) -> str:
    """GET /metrics, with an API key when auth is on (it then needs one)."""
    keys = server.app.config.metrics_api_keys or server.app.config.api_keys
    headers = {"Authorization": f"Bearer {keys[0]}"} if keys else {}
    body: bytes = urllib.request.urlopen(urllib.request.Request(server.http + "/metrics", headers=headers)).read()
    return body.decode()


@pytest.mark.parametrize("delay", [0.5, 5.0])
def test_abort_mid_stream_then_resume_loses_and_repeats_nothing(server_factory: ServerFactory,
                                                                tiny_llama_long_dir: Path, delay: float) -> None:
    server = server_factory(tiny_llama_long_dir)
    expected = run(reference(server.url))
    frames, _, _ = run(drop_and_resume(server, delay))
    check(frames, expected)
    metrics = read_metrics(server)
    assert "rtws_resumes_total 1.0" in metrics
    assert "rtws_replayed_bytes_total" in metrics and "rtws_sessions_held 0.0" in metrics


def test_a_held_session_pauses_at_the_watermark_and_resumes_to_the_same_text(server_factory: ServerFactory,
                                                                             tiny_llama_long_dir: Path) -> None:
    high = 4096
    server = server_factory(tiny_llama_long_dir, send_high_watermark=high, send_low_watermark=1024)
    expected = run(reference(server.url, 400))

    async def main() -> tuple[list[Any], Any]:
        peer, _ = await Peer.open(server.url)
        for i in range(N):
            await peer.ws.send(p.MSGPACK.encode(gen(i, 400)))
        while peer.received < 20:
            await peer.recv()
        await peer.ack()
        peer.abort()
        await asyncio.sleep(0.3)
        (session,) = server.app.sessions.held()
        deadline = time.monotonic() + 20 * UNIT
        while not session.paused and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert session.paused, "the held session never paused"
        await asyncio.sleep(0.5)  # paused: it stays put
        stats = server.engine().stats()
        assert stats.paused == len(session.live) > 0, stats
        # Bound: what it holds (unacked + queued) stays within the high watermark plus one engine step.
        assert session.max_held <= high + N * 200, session.max_held
        new, _ = await Peer.open(server.url, p.Hello(resume=peer.ready.resume_token, received=peer.received),
                                 expect_resumed=True)
        new.received = peer.received
        dones = sum(isinstance(f, p.Done) for f in peer.frames)
        while dones < N:
            try:
                f = await new.recv()
            except asyncio.TimeoutError:
                raise AssertionError((new.received, session.paused, session.held, session.buffered, session.unacked,
                                      session.acked, session.frames_numbered, len(session._pending), session.attached,
                                      len(session._replay), session.send_started))
            dones += isinstance(f, p.Done)
        await new.ws.close()
        return peer.frames + new.frames, session

    frames, session = run(main())
    check(frames, expected)


def test_resume_after_the_window_is_refused_and_the_engine_is_idle(server_factory: ServerFactory,
                                                                   tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir, resume_window_s=1.0, send_high_watermark=4096)

    async def main() -> None:
        peer, _ = await Peer.open(server.url)
        for i in range(N):
            await peer.ws.send(p.MSGPACK.encode(gen(i, 2000)))
        while peer.received < 10:
            await peer.recv()
        peer.abort()
        await asyncio.sleep(0.3)
        assert server.app.sessions.num_held == 1
        await asyncio.sleep(1.5)
        assert server.app.sessions.num_held == 0
        new, early = await Peer.open(server.url, p.Hello(resume=peer.ready.resume_token, received=peer.received))
        err = await new.recv()
        assert isinstance(err, p.Error) and err.code == "resume_failed" and err.reason == "expired", err
        assert new.ready.session != peer.ready.session and not new.ready.resumed
        deadline = time.monotonic() + 5 * UNIT
        while time.monotonic() < deadline:
            s = server.engine().stats()
            if s.running == s.waiting == s.paused == s.slots_in_use == 0:
                break
            await asyncio.sleep(0.05)
        s = server.engine().stats()
        assert (s.running, s.waiting, s.paused, s.slots_in_use) == (0, 0, 0, 0), s
        await new.ws.close()

    run(main())
    metrics = read_metrics(server)
    assert "rtws_sessions_expired_total 1.0" in metrics
    assert 'rtws_resume_failures_total{reason="expired"} 1.0' in metrics


def test_resume_is_refused_for_reused_foreign_and_random_tokens(server_factory: ServerFactory,
                                                                tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir, api_keys=("key-one", "key-two"))

    async def refused(hello: p.Hello, victim: str) -> str:
        new, early = await Peer.open(server.url, hello, ack=False)
        assert new.ready.session != victim and not new.ready.resumed
        err = await new.recv()
        assert isinstance(err, p.Error) and err.code == "resume_failed"
        try:  # nothing of the victim's session may ever arrive here
            extra = await new.recv(timeout=0.5)
            raise AssertionError(f"unexpected frame on a fresh session: {extra}")
        except asyncio.TimeoutError:
            pass
        await new.ws.close()
        return str(err.reason)

    async def main() -> None:
        peer, _ = await Peer.open(server.url, p.Hello(token="key-one"))
        await peer.ws.send(p.MSGPACK.encode(gen(0, 3000)))
        while peer.received < 5:
            await peer.recv()
        peer.abort()
        await asyncio.sleep(0.3)
        token, victim = peer.ready.resume_token, peer.ready.session
        assert token is not None and len(token) >= 22  # >= 128 bits of base64
        assert await refused(p.Hello(token="key-one", resume=secrets.token_urlsafe(24), received=0), victim) \
            == "unknown"
        assert await refused(p.Hello(token="key-two", resume=token, received=peer.received), victim) == "unknown"
        assert server.app.sessions.num_held == 1  # refusals leave the held session alone
        ok, _ = await Peer.open(server.url, p.Hello(token="key-one", resume=token, received=peer.received),
                                expect_resumed=True)
        assert ok.ready.session == victim
        ok.abort()
        await asyncio.sleep(0.3)
        assert await refused(p.Hello(token="key-one", resume=token, received=peer.received), victim) == "resumed"

    run(main())
    metrics = read_metrics(server)
    for reason in ("unknown", "other_key", "resumed"):
        assert f'rtws_resume_failures_total{{reason="{reason}"}} 1.0' in metrics


def test_a_clean_close_ends_the_session_at_once(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir)

    async def main() -> None:
        peer, _ = await Peer.open(server.url)
        await peer.ws.send(p.MSGPACK.encode(gen(0, 3000)))
        await peer.recv()
        await peer.ws.close()  # 1000
        await asyncio.sleep(0.3)
        assert server.app.sessions.num_held == 0
        new, _ = await Peer.open(server.url, p.Hello(resume=peer.ready.resume_token, received=peer.received))
        err = await new.recv()
        assert err.code == "resume_failed" and err.reason == "expired"
        await new.ws.close()

    run(main())


def test_the_python_client_resumes_transparently(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir)
    expected = run(reference(server.url))

    async def main() -> tuple[dict[str, str], dict[str, int], int]:
        async with await Client.connect(server.url) as c:
            streams = [await c.generate(g.prompt, id=g.id, max_tokens=MAX_TOKENS, temperature=0.8, seed=g.seed)
                       for g in (gen(i) for i in range(N))]
            texts: dict[str, str] = {}
            tokens: dict[str, int] = {}

            async def consume(s: Any) -> None:
                parts = []
                async for t in s:
                    parts.append(t)
                texts[s.id] = "".join(parts)
                tokens[s.id] = s.usage.completion_tokens - s.tokens

            tasks = [asyncio.ensure_future(consume(s)) for s in streams]
            while c.received < 30:
                await asyncio.sleep(0.005)
            c.ws.transport.abort()
            await asyncio.gather(*tasks)
            return texts, tokens, c.resumes

    texts, token_gaps, resumes = run(main())
    assert resumes == 1
    assert texts == expected
    assert set(token_gaps.values()) == {0}  # completion_tokens equals the tokens received


def test_a_drain_holds_no_session_past_its_timeout(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir, drain_timeout_s=1.0, resume_window_s=30.0)

    async def main() -> Any:
        peer, _ = await Peer.open(server.url)
        await peer.ws.send(p.MSGPACK.encode(gen(0, 4000)))
        while peer.received < 5:
            await peer.recv()
        peer.abort()
        await asyncio.sleep(0.3)
        (held,) = server.app.sessions.held()
        return held

    held = run(main())
    t0 = time.monotonic()
    server.stop(drain=True)
    assert time.monotonic() - t0 < 10 * UNIT  # not the 30 s resume window
    assert held.closed and server.app.sessions.num_held == 0


def test_the_python_client_reports_a_failed_resume_and_goes_on_fresh(server_factory: ServerFactory,
                                                                     tiny_llama_long_dir: Path) -> None:
    from rtws.client import ResumeFailed

    server = server_factory(tiny_llama_long_dir)

    def kill_session_and_socket() -> None:  # on the server's loop: the session ends, the socket drops
        for conn in list(server.app.connections):
            proto = conn.send.__self__
            proto.transport.abort()
            conn.session.close()

    async def main() -> tuple[str, str, int]:
        async with await Client.connect(server.url) as c:
            old = c.ready.session if c.ready else ""
            s = await c.generate("ROMEO:", max_tokens=3000)
            while c.received < 3:
                await asyncio.sleep(0.005)
            loop = server.server._loop
            loop.call_soon_threadsafe(kill_session_and_socket)
            with pytest.raises(ResumeFailed):
                await s.result()
            again = await (await c.generate("JULIET:", max_tokens=4)).result()
            assert again.completion_tokens == 4
            return old, c.ready.session if c.ready else "", c.resume_failures

    old, new, failures = run(main())
    assert failures == 1 and new and new != old
