"""Server-held conversations over a real server and a real tiny chat model (its template is in tests/helpers/models.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec
from tests.helpers.server import UNIT, ServerFactory, run
from websockets.asyncio.client import connect

from rtws import protocol as p
from rtws.client import Client, GenerationError

TURNS = ["Good morrow.", "What news?", "Art thou well?", "Speak, I pray.", "Farewell then.", "Return anon!"]


def test_six_turns_sent_one_by_one_equal_resending_the_whole_history(server_factory: ServerFactory,
                                                                    tiny_llama_long_dir: Path) -> None:
    # An 8k context: the random model's replies re-encode to many tokens (U+FFFD), and this test is about
    # equality, not the truncation policy (tested below with a small context).
    tiny_server = server_factory(tiny_llama_long_dir)

    async def main() -> tuple[list[str], list[str], list[int], int]:
        async with await Client.connect(tiny_server.url) as c:
            held: list[str] = []
            sizes: list[int] = []
            for i, line in enumerate(TURNS):
                frame = p.Generate(id=f"t{i}", conversation="c1", messages=[p.Message("user", line)],
                                   max_tokens=10, temperature=0.0)
                sizes.append(len(p.MSGPACK.encode(frame)))
                r = await (await c.generate(messages=[{"role": "user", "content": line}], conversation="c1",
                                            max_tokens=10, temperature=0.0)).result()
                held.append(r.text)
            resent: list[str] = []
            history: list[dict[str, str]] = []
            for line in TURNS:
                history.append({"role": "user", "content": line})
                r = await (await c.generate(messages=list(history), max_tokens=10, temperature=0.0)).result()
                resent.append(r.text)
                history.append({"role": "assistant", "content": r.text})
            conv = await c.history("c1")
            assert [it.content for it in conv.items] == [m["content"] for m in history]
            assert [it.role for it in conv.items] == ["user", "assistant"] * len(TURNS)
            full = len(p.MSGPACK.encode(p.Generate(id="x", messages=[p.Message(**m) for m in history[:-1]],
                                                   max_tokens=10, temperature=0.0)))
            return held, resent, sizes, full

    held, resent, sizes, full = run(main())
    assert held == resent
    assert max(sizes) < full  # the client sends only the new line


def test_follow_up_turns_hit_the_prefix_cache(server_factory: ServerFactory, default_model_dir: Path) -> None:
    """From turn 2 on, cached_tokens covers >= 80% of the prompt.

    On the bundled model: its replies are real text, which re-tokenizes to the tokens it generated, as a real
    model's do. (A random model's byte soup re-tokenizes differently, which ends the shared prefix early.)
    """
    tiny_server = server_factory(default_model_dir)
    # A system prompt as real chats have: without one, turn 2 is mostly the new line plus the part of the
    # last block that was not full (only full 16-token blocks are cached).
    system = ("First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. First Citizen: "
              "You are all resolved rather to die than to famish? All: Resolved. resolved. First Citizen: First, "
              "you know Caius Marcius is chief enemy to the people. All: We know't, we know't. First Citizen: Let "
              "us kill him, and we'll have corn at our own price.")

    async def main() -> list[dict[str, Any]]:
        ws = await connect(tiny_server.url, subprotocols=[p.SUBPROTOCOL_MSGPACK])  # type: ignore[list-item]
        await ws.recv()
        usages = []
        for i, line in enumerate(TURNS):
            turn = [p.Message("user", line)] if i else [p.Message("system", system), p.Message("user", line)]
            await ws.send(p.MSGPACK.encode(p.Generate(id=i, conversation="c", messages=turn,
                                                      max_tokens=8, temperature=0.0)))
            while True:
                raw = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(decode=False), 20 * UNIT))
                if raw["type"] == "done":
                    usages.append(raw["usage"])
                    break
                assert raw["type"] == "delta", raw
        await ws.close()
        return usages

    usages = run(main())
    assert all(u["prompt_tokens"] + 8 < 248 for u in usages), usages  # no turn was dropped
    for u in usages[1:]:
        assert u["cached_tokens"] >= 0.8 * u["prompt_tokens"], usages


def test_history_that_outgrows_a_small_context_drops_the_oldest_turns(server_factory: ServerFactory,
                                                                      tiny_llama_dir: Path) -> None:
    server = server_factory(tiny_llama_dir, max_seq_len=96)

    async def main() -> tuple[list[p.Done], Any, list[int]]:
        ws = await connect(server.url, subprotocols=[p.SUBPROTOCOL_MSGPACK])  # type: ignore[list-item]
        await ws.recv()
        await ws.send(p.MSGPACK.encode(p.Generate(id="s", conversation="c", max_tokens=8, temperature=0.0,
                                                  messages=[p.Message("system", "Speak in verse."),
                                                            p.Message("user", TURNS[0])])))
        dones: list[p.Done] = []
        for i in range(12):
            while True:
                f = p.MSGPACK.decode_any(await asyncio.wait_for(ws.recv(), 20 * UNIT))
                assert not isinstance(f, p.Error), f
                if isinstance(f, p.Done):
                    dones.append(f)
                    break
            await ws.send(p.MSGPACK.encode(p.Generate(id=i, conversation="c", max_tokens=8, temperature=0.0,
                                                      messages=[p.Message("user", TURNS[i % 6] * 2)])))
        while True:
            f = p.MSGPACK.decode_any(await asyncio.wait_for(ws.recv(), 20 * UNIT))
            if isinstance(f, p.Done):
                dones.append(f)
                break
        await ws.send(p.MSGPACK.encode(p.History(conversation="c")))
        conv = p.MSGPACK.decode_any(await asyncio.wait_for(ws.recv(), 20 * UNIT))
        await ws.close()
        return dones, conv, [d.usage.prompt_tokens for d in dones]

    dones, conv, prompts = run(main())
    assert dones[0].dropped == 0 and sum(d.dropped for d in dones) > 0
    assert conv.dropped == sum(d.dropped for d in dones)
    assert conv.items[0].role == "system" and conv.items[1].role == "user"  # system kept, no orphan reply
    assert max(prompts) <= 96 - 8
    assert all(d.reason in ("stop", "length") for d in dones)


def test_conversation_errors_have_their_codes(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    server = server_factory(tiny_llama_long_dir, max_conversations_per_session=2)

    async def main() -> list[str]:
        codes = []
        async with await Client.connect(server.url) as c:
            s1 = await c.generate("ROMEO:", conversation="a", max_tokens=2000)
            busy = await c.generate("more", conversation="a", max_tokens=5)
            try:
                await busy.result()
            except GenerationError as e:
                codes.append(e.code)
            await (await c.generate("x", conversation="b", max_tokens=2)).result()
            try:
                await (await c.generate("x", conversation="c", max_tokens=2)).result()
            except GenerationError as e:
                codes.append(e.code)
            try:
                await (await c.generate(messages=[{"role": "user", "content": "x"}], conversation="b",
                                        max_tokens=2)).result()
            except GenerationError as e:
                codes.append(e.code)
            try:
                await c.history("nope")
            except Exception as e:  # noqa: BLE001
                codes.append(getattr(e, "code", ""))
            await s1.cancel()
            r = await s1.result()
            assert r.reason == "cancelled"
            conv = await c.history("a")
            assert conv.items[-1].role == "assistant" and conv.items[-1].truncated
            assert conv.items[-1].content == r.text  # the reply kept is exactly what was delivered
            await c.forget("a")
            try:
                await c.history("a")
            except Exception as e:  # noqa: BLE001
                codes.append(getattr(e, "code", ""))
        return codes

    assert run(main()) == ["conversation_busy", "too_many_conversations", "invalid_params",
                           "unknown_conversation", "unknown_conversation"]
