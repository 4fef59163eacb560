"""WebSocket sessions over a real uvicorn server on port 0 with a real (tiny) model."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from tests.helpers.server import UNIT, RunningServer, run
from websockets.asyncio.client import connect

from rtws import protocol as p
from rtws.client import Client, GenerationError


async def raw(server: RunningServer, sub: str = p.SUBPROTOCOL_MSGPACK) -> Any:
    ws = await connect(server.url, subprotocols=[sub])  # type: ignore[list-item]
    codec = p.codec_for(sub)
    ready = codec.decode_any(await ws.recv())
    assert isinstance(ready, p.Ready)
    return ws, codec


async def next_frame(ws: Any, codec: p.Codec, timeout: float = 10 * UNIT) -> Any:
    return codec.decode_any(await asyncio.wait_for(ws.recv(), timeout))


async def wait_for(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(0.005)
    return bool(cond())


def test_healthz_and_ready_frame(tiny_server: RunningServer) -> None:
    import urllib.request

    with urllib.request.urlopen(tiny_server.http + "/healthz") as r:
        assert r.status == 200 and msgspec.json.decode(r.read()) == {"status": "ok"}

    async def main() -> p.Ready | None:
        async with await Client.connect(tiny_server.url) as c:
            return c.ready

    ready = run(main())
    assert ready is not None and ready.models == [tiny_server.app.registry.default_name]
    assert ready.limits.max_generations == 64 and ready.limits.max_prompt_tokens == 255


@pytest.mark.parametrize("sub", [p.SUBPROTOCOL_MSGPACK, p.SUBPROTOCOL_JSON])
def test_bad_frames_get_error_codes_and_the_socket_stays_open(tiny_server: RunningServer, sub: str) -> None:
    binary = sub == p.SUBPROTOCOL_MSGPACK
    enc = msgspec.msgpack.encode if binary else (lambda o: msgspec.json.encode(o).decode())
    cases: list[tuple[Any, str]] = [
        (b"\xc1\x00garbage" if binary else "{not json", "bad_frame"),
        (enc([1, 2, 3]), "bad_frame"),
        (enc({"type": "teleport", "id": "x"}), "unknown_type"),
        (enc({"type": "generate", "prompt": "hi"}), "invalid_params"),  # missing id
        (enc({"type": "generate", "id": "a", "prompt": 5}), "invalid_params"),  # wrong type
        (enc({"type": "generate", "id": "a", "prompt": "x", "max_tokens": 10**9}), "invalid_params"),
        (enc({"type": "generate", "id": "a", "prompt": "x", "model": "nope"}), "unknown_model"),
        (enc({"type": "generate", "id": "a", "prompt": "word " * 400}), "invalid_params"),  # > context
        (enc({"type": "cancel", "id": "never-started"}), "unknown_id"),
    ]

    async def main() -> list[tuple[str, Any]]:
        ws, codec = await raw(tiny_server, sub)
        got = []
        for data, _ in cases:
            await ws.send(data)
            frame = await next_frame(ws, codec)
            assert isinstance(frame, p.Error), frame
            assert "Traceback" not in frame.message and "File \"" not in frame.message
            got.append((frame.code, frame.id))
        # still open and serving
        await ws.send(enc({"type": "generate", "id": "ok", "prompt": "hi", "max_tokens": 3}))
        frames: list[Any] = []
        while not frames or not isinstance(frames[-1], p.Done):
            frames.append(await next_frame(ws, codec))
        assert frames[-1].reason == "length" and frames[-1].usage.completion_tokens == 3
        await ws.close()
        return got

    got = run(main())
    assert [c for c, _ in got] == [c for _, c in cases]
    assert got[4][1] == "a" and got[6][1] == "a"  # errors name the generation when its id was readable


def test_eight_concurrent_generations_interleave_on_one_socket(tiny_server: RunningServer) -> None:
    async def main() -> tuple[list[Any], dict[Any, p.Done]]:
        ws, codec = await raw(tiny_server)
        for i in range(8):
            await ws.send(codec.encode(p.Generate(id=i, prompt="ROMEO:\n" + "a" * i, max_tokens=16 + i,
                                                  temperature=0.8, seed=i)))
        frames: list[Any] = []
        done: dict[Any, p.Done] = {}
        while len(done) < 8:
            f = await next_frame(ws, codec)
            frames.append(f)
            if isinstance(f, p.Done):
                done[f.id] = f
        await ws.close()
        return frames, done

    frames, done = run(main())
    deltas = [f for f in frames if isinstance(f, p.Delta)]
    for i in range(8):
        mine = [d for d in deltas if d.id == i]
        assert [d.seq for d in mine] == list(range(len(mine)))
        assert done[i].reason == "length"
        assert done[i].usage.completion_tokens == sum(d.tokens for d in mine) == 16 + i
        assert all(not (isinstance(f, p.Delta) and f.id == i) for f in frames[frames.index(done[i]) + 1:])
    order = [d.id for d in deltas]
    switches = sum(1 for a, b in zip(order, order[1:]) if a != b)
    assert switches >= 8  # frames of different generations interleave


def test_cancel_after_first_delta(tiny_server: RunningServer) -> None:
    engine = tiny_server.engine()
    plans: list[tuple[int, set[int]]] = []  # (step number, request ids computed in it), on the engine thread
    cancels: list[tuple[int, int]] = []  # (rid, steps completed when the session called cancel)

    class Obs:
        def on_step(self, eng: Any, plan: Any, seconds: float, events: Any) -> None:
            plans.append((eng.stats().steps, {s.rid for s in plan.decode} | {c.seq.rid for c in plan.prefill}))

    engine.observer = Obs()
    real_cancel = engine.cancel

    def cancel(rid: int) -> None:
        cancels.append((rid, engine.stats().steps))
        real_cancel(rid)

    engine.cancel = cancel

    async def main() -> list[Any]:
        ws, codec = await raw(tiny_server)
        await ws.send(codec.encode(p.Generate(id="keep", prompt="a", max_tokens=300, temperature=0.0)))
        await ws.send(codec.encode(p.Generate(id="victim", prompt="b", max_tokens=300, temperature=0.0)))
        frames = []
        while True:
            f = await next_frame(ws, codec)
            frames.append(f)
            if isinstance(f, p.Delta) and f.id == "victim":
                break
        await ws.send(codec.encode(p.Cancel(id="victim")))
        while True:
            f = await next_frame(ws, codec)
            frames.append(f)
            if isinstance(f, p.Done) and f.id == "keep":
                break
        await ws.send(codec.encode(p.Cancel(id="victim")))  # cancelling a finished id: ignored
        await ws.send(codec.encode(p.Generate(id="after", prompt="c", max_tokens=2)))
        while True:
            f = await next_frame(ws, codec)
            frames.append(f)
            if isinstance(f, p.Done) and f.id == "after":
                break
        await ws.close()
        return frames

    frames = run(main())
    engine.observer = None
    victim = [f for f in frames if getattr(f, "id", None) == "victim"]
    dones = [f for f in victim if isinstance(f, p.Done)]
    assert len(dones) == 1 and dones[0].reason == "cancelled"
    assert victim[-1] is dones[0]  # no delta after done
    assert dones[0].usage.completion_tokens == sum(f.tokens for f in victim if isinstance(f, p.Delta))
    assert not [f for f in frames if isinstance(f, p.Error)]  # the late cancel was ignored silently
    # The slot is freed at the next step boundary: at most the step in flight still computed it.
    rid, at = cancels[0]
    computed_after = [step for step, rids in plans if rid in rids and step > at]
    assert len(computed_after) <= 1, computed_after
    assert engine.stats().slots_in_use == 0


def test_abrupt_disconnect_frees_all_slots_within_a_second(tiny_server: RunningServer) -> None:
    engine = tiny_server.engine()

    async def main() -> float:
        ws, codec = await raw(tiny_server)
        for i in range(6):
            await ws.send(codec.encode(p.Generate(id=i, prompt="x", max_tokens=1000, temperature=0.0)))
        assert await wait_for(lambda: engine.stats().running == 6, 10 * UNIT)
        t0 = time.monotonic()
        ws.transport.abort()  # TCP reset, no close handshake
        assert await wait_for(lambda: engine.stats().slots_in_use == 0, 1.0)
        return time.monotonic() - t0

    assert run(main()) < 1.0


def test_duplicate_and_too_many_generations(server_factory: Any, tiny_llama_dir: Any) -> None:
    server = server_factory(tiny_llama_dir, max_generations_per_session=3)

    async def main() -> list[str]:
        async with await Client.connect(server.url) as c:
            streams = [await c.generate("a", id=f"s{i}", max_tokens=500) for i in range(3)]
            codes = []
            with pytest.raises(ValueError):  # the client refuses a live id itself...
                await c.generate("a", id="s0")
            ws, codec = await raw(server)  # ...and so does the server
            await ws.send(codec.encode(p.Generate(id="d", prompt="a", max_tokens=500)))
            await ws.send(codec.encode(p.Generate(id="d", prompt="a", max_tokens=5)))
            while not isinstance(f := await next_frame(ws, codec), p.Error):
                pass
            codes.append(f.code)
            await ws.close()
            s = await c.generate("a", id="s3", max_tokens=5)
            with pytest.raises(GenerationError) as info:
                await s.result()
            codes.append(info.value.code)
            for s in streams:
                await s.cancel()
                assert (await s.result()).reason == "cancelled"
            again = await c.generate("a", id="s0", max_tokens=2)  # ids are reusable once finished
            assert (await again.result()).reason == "length"
            return codes

    assert run(main()) == ["duplicate_id", "too_many_generations"]


def test_seed_reproducible_with_different_batch_mates(tiny_server: RunningServer) -> None:
    async def main() -> tuple[str, str]:
        async with await Client.connect(tiny_server.url) as c:
            alone = await (await c.generate("ROMEO:\n", max_tokens=24, temperature=0.9, seed=7)).result()
            mates = [await c.generate("JULIET:\n" + "x" * i, max_tokens=30, temperature=1.0) for i in range(5)]
            crowded = await (await c.generate("ROMEO:\n", max_tokens=24, temperature=0.9, seed=7)).result()
            for m in mates:
                await m.result()
            return alone.text, crowded.text

    a, b = run(main())
    assert a == b and len(a) > 0


def test_stop_strings_cut_the_text(tiny_server: RunningServer) -> None:
    async def main() -> tuple[str, Any, Any]:
        async with await Client.connect(tiny_server.url) as c:
            full = await (await c.generate("ROMEO:\n", max_tokens=40, temperature=0.0)).result()
            clean = [i for i in range(3, len(full.text) - 2) if "\ufffd" not in full.text[i:i + 2]]
            stop = full.text[clean[0]:clean[0] + 2]
            cut = await (await c.generate("ROMEO:\n", max_tokens=40, temperature=0.0, stop=[stop])).result()
            return full.text, stop, cut

    full, stop, cut = run(main())
    assert cut.reason == "stop"
    assert cut.text == full[: full.index(stop)]
    assert stop not in cut.text


def test_messages_use_the_chat_template_and_json_codec(tiny_server: RunningServer) -> None:
    async def main() -> tuple[Any, Any]:
        async with await Client.connect(tiny_server.url, codec="json") as c:
            msgs = [{"role": "user", "content": "Good morrow."}, {"role": "assistant", "content": "And to you."},
                    {"role": "user", "content": "What news?"}]
            r = await (await c.generate(messages=msgs, max_tokens=5, temperature=0.0)).result()
            s = await c.generate(messages=[{"role": "user", "content": "x" * 2000}], max_tokens=5)
            with pytest.raises(GenerationError) as info:
                await s.result()
            return r, info.value.code

    r, code = run(main())
    served = tiny_server.app.registry.get(None)
    expected = served.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Good morrow."}, {"role": "assistant", "content": "And to you."},
         {"role": "user", "content": "What news?"}], add_generation_prompt=True, tokenize=False)
    assert expected.endswith("JULIET:\n")
    assert r.prompt_tokens == len(served.tokenizer(expected, add_special_tokens=False)["input_ids"])
    assert r.completion_tokens == 5 and code == "invalid_params"


def test_many_streams_on_one_socket(tiny_server: RunningServer) -> None:
    async def main() -> list[Any]:
        async with await Client.connect(tiny_server.url) as c:
            streams = [await c.generate("a", max_tokens=8, temperature=1.0) for _ in range(64)]
            return [await s.result() for s in streams]

    results = run(main())
    assert len(results) == 64
    assert all((r.reason, r.completion_tokens) == ("length", 8) or (r.reason == "stop" and r.completion_tokens < 8)
               for r in results)  # "stop": the sampler drew the end-of-text token
    assert tiny_server.engine().stats().slots_in_use == 0
