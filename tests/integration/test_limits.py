"""Limits, authentication and Origin checks over real sockets."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.server import UNIT, ServerFactory, run
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rtws import protocol as p
from rtws.client import Client, GenerationError, ServerError

KEY = "sk-test-0123456789"


async def recv_frame(ws: Any, codec: p.Codec = p.MSGPACK, timeout: float = 10 * UNIT) -> Any:
    return codec.decode_any(await asyncio.wait_for(ws.recv(), timeout))


def test_max_connections_refuses_extra_upgrades_with_503(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, max_connections=2)

    async def main() -> int:
        a = await Client.connect(server.url)
        b = await Client.connect(server.url)
        with pytest.raises(InvalidStatus) as info:
            await connect(server.url)
        status = info.value.response.status_code
        await a.close()
        # a slot opens again once a connection closes
        deadline = time.monotonic() + 5 * UNIT
        while len(server.app.connections) > 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        c = await Client.connect(server.url)
        await b.close()
        await c.close()
        return status

    assert run(main()) == 503


def test_auth_hello_token_header_and_failures(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, api_keys=(KEY,))

    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with await Client.connect(server.url, token=KEY, auth="hello") as c:  # browsers: first frame
            out["hello"] = (await (await c.generate("a", max_tokens=2)).result()).reason
        async with await Client.connect(server.url, token=KEY, auth="header") as c:  # programs: header
            out["header"] = (await (await c.generate("a", max_tokens=2)).result()).reason
        with pytest.raises(InvalidStatus) as info:  # a wrong header key is refused before the handshake
            await connect(server.url, additional_headers={"Authorization": "Bearer nope"})
        out["bad_header"] = info.value.response.status_code
        for name, first in (("bad_hello", p.Hello(token="nope")), ("no_hello", p.Generate(id="x", prompt="a"))):
            ws = await connect(server.url)
            await ws.send(p.MSGPACK.encode(first))
            err = await recv_frame(ws)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 5 * UNIT)
            out[name] = (err.code, ws.close_code)
        return out

    out = run(main())
    assert out["hello"] == "length" and out["header"] == "length"
    assert out["bad_header"] == 401
    assert out["bad_hello"] == ("unauthorized", 1008)
    assert out["no_hello"] == ("unauthorized", 1008)


def test_auth_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from rtws.config import ServerConfig

    monkeypatch.setenv("RTWS_API_KEYS", "k1, k2")
    monkeypatch.setenv("RTWS_MAX_CONNECTIONS", "7")
    cfg = ServerConfig.from_sources({"max_connections": 9})
    assert cfg.api_keys == ("k1", "k2") and cfg.auth_enabled
    assert cfg.max_connections == 9  # explicit beats the environment
    monkeypatch.setenv("RTWS_NUM_SLOTS", "many")
    with pytest.raises(ValueError, match="num_slots"):
        ServerConfig.from_sources({})


def test_origin_allow_list(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, allowed_origins=("https://chat.example",))

    async def main() -> tuple[int, bool, bool]:
        with pytest.raises(InvalidStatus) as info:
            await connect(server.url, origin="https://evil.example")  # type: ignore[arg-type]
        ok = await Client.connect(server.url, origin="https://chat.example")
        await ok.close()
        no_origin = await Client.connect(server.url)  # non-browser clients send no Origin
        await no_origin.close()
        return info.value.response.status_code, ok.ready is not None, no_origin.ready is not None

    assert run(main()) == (403, True, True)


def test_rate_limit_answers_with_retry_hint(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, rate_limit_per_minute=60, rate_limit_burst=3)

    async def main() -> tuple[list[str], float | None]:
        async with await Client.connect(server.url) as c:
            outcomes = []
            retry = None
            for _ in range(5):
                s = await c.generate("a", max_tokens=1)
                try:
                    outcomes.append((await s.result()).reason)
                except GenerationError as e:
                    outcomes.append(e.code)
                    retry = e.retry_after
            return outcomes, retry

    outcomes, retry = run(main())
    # The first three are served (a random tiny model may sample EOS as its one token: "stop"); the rest are limited.
    assert all(o in ("length", "stop") for o in outcomes[:3]) and outcomes[3:] == ["rate_limited"] * 2
    assert retry is not None and 0 < retry <= 1.0


def test_oversized_frame_closes_1009_and_others_are_unaffected(server_factory: ServerFactory,
                                                               tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, max_frame_bytes=4096)

    async def main() -> tuple[int | None, str]:
        other = await Client.connect(server.url)
        s = await other.generate("a", max_tokens=30)
        ws = await connect(server.url)
        await recv_frame(ws)  # ready
        await ws.send(p.MSGPACK.encode(p.Generate(id="big", prompt="x" * 10_000)))
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(ws.recv(), 5 * UNIT)
        r = await s.result()
        await other.close()
        return ws.close_code, r.reason

    code, reason = run(main())
    # The other socket's generation ends normally: at max_tokens, or on EOS (it samples: a random tiny model
    # can end early), never cancelled or failed by its neighbour's close.
    assert code == 1009 and reason in ("length", "stop")


def test_request_timeout_ends_with_reason_timeout(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir, request_timeout=0.5 * UNIT)

    async def main() -> tuple[str, int, int]:
        async with await Client.connect(server.url) as c:
            s = await c.generate("a", max_tokens=4000, temperature=0.0)
            r = await s.result()
            return r.reason, r.completion_tokens, s.tokens

    reason, usage, sent = run(main())
    assert reason == "timeout" and 0 < usage == sent < 4000


def test_idle_session_is_closed(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, idle_timeout_s=0.3 * UNIT)

    async def main() -> int | None:
        ws = await connect(server.url)
        await recv_frame(ws)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), 10 * UNIT)
        return ws.close_code

    assert run(main()) == 1000


def test_keepalive_pings_are_sent(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, ping_interval_s=0.2 * UNIT, ping_timeout_s=5.0)

    async def main() -> int:
        ws = await connect(server.url, ping_interval=None)
        await recv_frame(ws)
        pings = 0
        real = ws.protocol.recv_frame  # websockets answers pings itself; count them as they arrive

        def counting(frame: Any) -> None:
            nonlocal pings
            if frame.opcode.name == "PING":
                pings += 1
            real(frame)

        ws.protocol.recv_frame = counting  # type: ignore[method-assign]
        await asyncio.sleep(1.0 * UNIT)
        await ws.close()
        return pings

    assert run(main()) >= 2


def test_too_many_generations_and_max_tokens_limit(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, max_generations_per_session=2, max_tokens_limit=16)

    async def main() -> list[str]:
        async with await Client.connect(server.url) as c:
            assert c.ready is not None and c.ready.limits.max_tokens == 16
            codes = []
            s = await c.generate("a", max_tokens=17)
            with pytest.raises(GenerationError) as info:
                await s.result()
            codes.append(info.value.code)
            live = [await c.generate("a", max_tokens=16) for _ in range(2)]
            s = await c.generate("a", max_tokens=16)
            with pytest.raises(GenerationError) as info:
                await s.result()
            codes.append(info.value.code)
            for x in live:
                await x.result()
            return codes

    assert run(main()) == ["invalid_params", "too_many_generations"]


def test_unknown_path_and_draining_refusals(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir)

    async def main() -> tuple[int, int]:
        with pytest.raises(InvalidStatus) as info:
            await connect(server.url.replace("/ws", "/nope"))
        server.app.draining = True
        try:
            with pytest.raises(InvalidStatus) as info2:
                await connect(server.url)
        finally:
            server.app.draining = False
        return info.value.response.status_code, info2.value.response.status_code

    assert run(main()) == (404, 503)


def test_server_error_type_for_connection_level_errors(tiny_llama_dir: Path, server_factory: ServerFactory) -> None:
    server = server_factory(tiny_llama_dir)

    async def main() -> str:
        async with await Client.connect(server.url) as c:
            await c.ws.send(b"\x93garbage")
            err = await asyncio.wait_for(c.errors.get(), 5 * UNIT)
            assert isinstance(err, ServerError)
            return err.code

    assert run(main()) == "bad_frame"
