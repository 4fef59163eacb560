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
