"""rtws.conversations (pure) and conversations inside a Session, against a fake engine."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from tests.helpers.fake_engine import frame, make_session, settle

from rtws import protocol as p
from rtws.conversations import Conversation, ConversationError, ConversationStore, NewItem


def test_items_insert_delete_truncate_and_render() -> None:
    c = Conversation(id="c")
    sys_item = c.add("system", "Be brief.")
    u = c.add("user", "Hi")
    a = c.add("assistant", "Hello there, friend")
    c.add("user", "Between", after=u.id)
    assert [it.content for it in c.items] == ["Be brief.", "Hi", "Between", "Hello there, friend"]
    c.delete(c.items[2].id)
    c.truncate(a.id, "Hello")
    assert c.get(a.id).truncated and c.get(a.id).content == "Hello"
    with pytest.raises(ConversationError):
        c.truncate(u.id, "x")
    with pytest.raises(ConversationError) as e:
        c.get("nope")
    assert e.value.code == "unknown_id"
    with pytest.raises(ConversationError):
        c.add("user", "dup", item_id=u.id)
    first = c.add("user", "first!", after="")
    assert c.items[0] is first
    c.delete(first.id)
    assert c.messages() == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                            {"role": "assistant", "content": "Hello"}]
    assert c.messages([NewItem("user", "next")])[-1] == {"role": "user", "content": "next"}
    assert c.messages(skip=1)[0] == sys_item.message() and len(c.messages(skip=1)) == 2
    assert c.messages() == c.messages()  # deterministic


def test_fit_drops_whole_leading_exchanges_and_never_system_turns() -> None:
    c = Conversation(id="c")
    c.add("system", "S")
    for i in range(5):
        c.add("user", f"u{i}" * 5)
        c.add("assistant", f"a{i}" * 5)

    def enc(conv: Conversation, extra: object, skip: int) -> list[int]:
        return [ord(ch) for m in conv.messages(extra, skip) for ch in m["content"]]  # type: ignore[arg-type]

    ids, dropped = c.fit([NewItem("user", "now")], enc, limit=10_000)
    assert dropped == 0
    ids, dropped = c.fit([NewItem("user", "now")], enc, limit=1 + 4 * 20 + 3)
    assert dropped == 2  # one user turn and its reply
    c.drop_oldest(dropped)
    assert c.items[0].role == "system" and c.items[1].content.startswith("u1")
    assert c.dropped == 2
    ids, dropped = c.fit([NewItem("user", "now")], enc, limit=4)  # nothing fits: the shortest is returned
    assert dropped == len(c.items) - 1 and len(ids) == 4

    def too_long(conv: Conversation, extra: object, skip: int) -> list[int]:
        raise ValueError("prompt is 999 tokens")

    with pytest.raises(ValueError):
        c.fit([NewItem("user", "x")], too_long, limit=10)


def test_store_limits() -> None:
    st = ConversationStore(max_conversations=2)
    st.get_or_create("a")
    st.get_or_create("b")
    assert st.get_or_create("a") is st.get("a")
    with pytest.raises(ConversationError) as e:
        st.get_or_create("c")
    assert e.value.code == "too_many_conversations"
    st.forget("a")
    st.get_or_create("c")
    with pytest.raises(ConversationError) as e:
        st.get("a")
    assert e.value.code == "unknown_conversation"
    with pytest.raises(ConversationError):
        st.get_or_create("")


def test_session_appends_replies_as_delivered_and_renders_the_same_prefix() -> None:
    async def main() -> None:
        s, engine, model, wire = make_session()
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        s.on_frame(frame(p.Generate(id=1, conversation="c1",
                                    messages=[p.Message("system", "S"), p.Message("user", "Hello")])))
        await settle()
        rid = engine.live[0]
        engine.emit(rid, "Good ")
        engine.emit(rid, "day.", finish="stop")
        await settle()
        first_prompt = model.rendered[-1]
        s.on_frame(frame(p.Generate(id=2, conversation="c1", messages=[p.Message("user", "And?")])))
        await settle()
        second_prompt = model.rendered[-1]
        assert second_prompt.startswith(first_prompt + "Good day.")
        # A second generation on the same conversation while one runs: conversation_busy.
        s.on_frame(frame(p.Generate(id=3, conversation="c1", messages=[p.Message("user", "x")])))
        await settle()
        err = wire.frames[-1]
        assert isinstance(err, p.Error) and err.code == "conversation_busy" and err.id == 3
        rid = engine.live[0]
        engine.emit(rid, "And so")
        await settle()
        s.on_frame(frame(p.Cancel(id=2)))
        await settle()
        s.on_frame(frame(p.History(conversation="c1")))
        await settle()
        conv = wire.frames[-1]
        assert isinstance(conv, p.ConversationFrame)
        assert [(i.role, i.content, i.truncated) for i in conv.items] == [
            ("system", "S", False), ("user", "Hello", False), ("assistant", "Good day.", False),
            ("user", "And?", False), ("assistant", "And so", True)]
        # Mixing prompt into a chat conversation, unknown conversations, bad ids.
        s.on_frame(frame(p.Generate(id=4, conversation="c1", prompt="raw")))
        s.on_frame(frame(p.History(conversation="nope")))
        s.on_frame(frame(p.Forget(conversation="nope")))
        s.on_frame(msgspec.msgpack.encode({"type": "generate", "id": 5, "prompt": "x", "conversation": ""}))
        await settle()
        codes = [f.code for f in wire.frames[-4:]]
        assert codes == ["invalid_params", "unknown_conversation", "unknown_conversation", "invalid_params"]
        s.on_frame(frame(p.Forget(conversation="c1")))
        s.on_frame(frame(p.History(conversation="c1")))
        await settle()
        assert wire.frames[-1].code == "unknown_conversation"
        s.close()
        await writer

    asyncio.run(main())


def test_session_drops_oldest_turns_when_the_context_is_small_and_done_says_how_many() -> None:
    async def main() -> None:
        s, engine, model, wire = make_session(context_len=120)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        for turn in range(6):
            s.on_frame(frame(p.Generate(id=turn, conversation="c", max_tokens=8,
                                        messages=[p.Message("user", f"question {turn}")])))
            await settle()
            rid = engine.live[0]
            engine.emit(rid, f"answer number {turn}", finish="stop")
            await settle()
        dones = [f for f in wire.frames if isinstance(f, p.Done)]
        assert dones[0].dropped == 0 and sum(d.dropped for d in dones) > 0
        assert all(len(pr) <= 120 - 8 for pr in engine.prompts.values())
        s.on_frame(frame(p.History(conversation="c")))
        await settle()
        conv = wire.frames[-1]
        assert conv.dropped == sum(d.dropped for d in dones)
        assert conv.items[0].role == "user"  # never starts mid-exchange
        assert conv.items[-1].content == "answer number 5"
        s.close()
        await writer

    asyncio.run(main())


def test_too_many_conversations() -> None:
    async def main() -> None:
        s, engine, _, wire = make_session(max_conversations=2)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        for i in range(3):
            s.on_frame(frame(p.Generate(id=i, conversation=f"c{i}", prompt="x")))
        await settle()
        assert wire.frames[-1].code == "too_many_conversations" and wire.frames[-1].id == 2
        s.close()
        await writer

    asyncio.run(main())
