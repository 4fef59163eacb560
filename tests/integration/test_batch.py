"""Batch messages (optional protocol addition): hello {batch: true} makes the server send every frame that is
ready at once in one WebSocket message (an array of frames). Real server, real tiny model, real sockets."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
from tests.helpers.server import ServerFactory, run
from websockets.asyncio.client import connect

from rtws import protocol as p
from rtws.client import Client

PROMPTS = [f"batch test {i}" for i in range(8)]


async def _all(client: Client) -> list[tuple[str, str, int, int]]:
    streams = [await client.generate(pr, max_tokens=24, temperature=0.0) for pr in PROMPTS]
    out = []
    for s in streams:
        r = await s.result()
        out.append((r.text, r.reason, r.completion_tokens, len(r.text)))
    return out


def test_batched_socket_gets_the_same_generations_in_fewer_messages(server_factory: ServerFactory,
                                                                   tiny_llama_dir: Path) -> None:
    """8 greedy generations on one socket, with and without batching: identical texts, reasons and usage;
    the batched socket reads fewer WebSocket messages than it gets frames (so some carried several)."""
    server = server_factory(tiny_llama_dir)

    async def main() -> tuple[Any, Any, Client, Client]:
        async with await Client.connect(server.url, batch=True) as batched, \
                await Client.connect(server.url) as plain:
            assert batched.ready is not None and batched.ready.limits.batch is True
            a, b = await asyncio.gather(_all(batched), _all(plain))
            return a, b, batched, plain

    a, b, batched, plain = run(main())
    assert a == b
    assert all(reason in ("length", "stop") for _, reason, _, _ in a)
    assert plain.messages == plain.received  # not opted in: one frame per message, as in protocol v1
    assert batched.messages < batched.received, (batched.messages, batched.received)


def test_clients_that_do_not_opt_in_never_get_an_array(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    """A v1 client that never sends hello {batch: true}: every message is one frame (a map), even with many
    generations ready at the same step; hello {batch: false} turns batching back off."""
    server = server_factory(tiny_llama_dir)

    async def main(opt: bool | None) -> list[bytes]:
        raw: list[bytes] = []
        async with connect(server.url, subprotocols=[p.SUBPROTOCOL_MSGPACK]) as ws:  # type: ignore[list-item]
            await ws.recv()  # ready
            if opt is not None:
                await ws.send(p.MSGPACK.encode(p.Hello(batch=True)))
                if opt is False:
                    await ws.send(p.MSGPACK.encode(p.Hello(batch=False)))
            for i in range(8):
                await ws.send(p.MSGPACK.encode(p.Generate(id=i, prompt=PROMPTS[i], max_tokens=16)))
            dones = 0
            while dones < 8:
                data = await asyncio.wait_for(ws.recv(), 60)
                assert isinstance(data, bytes)
                raw.append(data)
                dones += sum(1 for f in p.MSGPACK.decode_message(data) if isinstance(f, p.Done))
        return raw

    for opt in (None, False):
        for data in run(main(opt)):
            assert isinstance(msgspec.msgpack.decode(data), dict)
    batched = run(main(True))
    assert any(isinstance(msgspec.msgpack.decode(d), list) for d in batched)


def test_frames_ready_together_are_written_together_but_stay_separate_messages(
        server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    """Without batch messages, the frames one step makes for one socket (its streams' deltas) go out in one
    transport write (corked), yet each is still its own WebSocket message, in order, for both codecs."""
    server = server_factory(tiny_llama_dir)

    async def main(sub: str, codec: p.Codec) -> tuple[list[Any], int, int]:
        frames: list[Any] = []
        async with connect(server.url, subprotocols=[sub]) as ws:  # type: ignore[list-item]
            await ws.recv()  # ready
            for i in range(8):
                out = codec.encode(p.Generate(id=i, prompt=PROMPTS[i], max_tokens=24, temperature=0.0))
                await ws.send(out if codec.binary else out.decode())  # the server decodes by frame kind
            dones = 0
            while dones < 8:
                data = await asyncio.wait_for(ws.recv(), 60)
                assert isinstance(data, bytes if codec.binary else str)
                raw = msgspec.msgpack.decode(data) if isinstance(data, bytes) else msgspec.json.decode(data)
                assert isinstance(raw, dict)  # one frame per message, never an array
                frame = codec.decode_message(data)[0]
                frames.append(frame)
                dones += isinstance(frame, p.Done)
            [conn] = list(server.app.connections)
            return frames, conn.session.writes, conn.session.frames_sent

    for sub, codec in ((p.SUBPROTOCOL_MSGPACK, p.MSGPACK), (p.SUBPROTOCOL_JSON, p.JSON)):
        frames, writes, sent = run(main(sub, codec))
        assert sent == len(frames) + 1  # + ready
        assert writes < sent, (writes, sent)
        for i in range(8):  # per generation: deltas in seq order, then its one done
            mine = [f for f in frames if getattr(f, "id", None) == i]
            assert isinstance(mine[-1], p.Done) and sum(isinstance(f, p.Done) for f in mine) == 1
            assert [f.seq for f in mine[:-1]] == list(range(len(mine) - 1))
