"""rtws.realtime against a real Session and a fake engine: event order, prompts, the stored reply, cancel, late errors.

No sockets: the test drives token events by hand (``FakeEngine.emit``) and
reads the JSON lines the session writes. Every event is validated with the
``openai`` SDK's model for its type.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, get_args

from tests.helpers.fake_engine import FakeEngine, FakeModel, FakeModels, ManualOffload, settle

from rtws import protocol as p
from rtws.realtime import RealtimeConnection, SessionConfig
from rtws.session import Session, SessionLimits


def _models() -> dict[str, Any]:
    from openai.types.realtime.realtime_server_event import RealtimeServerEvent

    union = get_args(RealtimeServerEvent)[0]
    return {get_args(c.model_fields["type"].annotation)[0]: c for c in get_args(union)}


MODELS = _models()


class Lines:
    def __init__(self) -> None:
        self.events: list[Any] = []

    async def send(self, data: bytes | str) -> None:
        raw = data.encode() if isinstance(data, str) else data
        for line in raw.split(b"\n") if raw else ():
            d = json.loads(line)
            self.events.append(MODELS[d["type"]].model_validate(d))

    def take(self) -> list[Any]:
        out, self.events = self.events, []
        return out


def make(instructions: str = "") -> tuple[RealtimeConnection, Session, FakeEngine, FakeModel, Lines]:
    engine = FakeEngine()
    model = FakeModel(engine)
    lines = Lines()
    rt = RealtimeConnection(SessionConfig(model="fake", instructions=instructions), 100)
    s = Session(lines.send, rt.codec, FakeModels(model), SessionLimits(), transport="realtime")
    rt.attach(s)
    return rt, s, engine, model, lines


def send(rt: RealtimeConnection, **event: Any) -> None:
    rt.on_message(json.dumps(event))


def user(text: str, **kw: Any) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}], **kw}


def test_prompt_order_event_order_and_the_reply_stored_as_delivered() -> None:
    async def main() -> None:
        rt, s, engine, model, lines = make("Be brief.")
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        send(rt, type="conversation.item.create", item=user("second", id="b"))
        send(rt, type="conversation.item.create", item=user("first", id="a"), previous_item_id="root")
        send(rt, type="response.create")
        await settle()
        assert model.rendered[-1] == "system: Be brief.\nuser: first\nuser: second\nassistant: "
        rid = engine.live[0]
        engine.emit(rid, "Hel")
        await settle()
        engine.emit(rid, "lo", finish="stop")
        await settle()
        kinds = [e.type for e in lines.take()]
        assert kinds == ["session.created"] + ["conversation.item.added", "conversation.item.done"] * 2 + [
            "response.created", "response.output_item.added", "conversation.item.added",
            "response.content_part.added", "response.output_text.delta", "response.output_text.delta",
            "response.output_text.done", "response.content_part.done", "response.output_item.done",
            "conversation.item.done", "response.done"]
        conv = rt.conversation.conv
        assert [(i.role, i.content) for i in conv.items] == [("user", "first"), ("user", "second"),
                                                             ("assistant", "Hello")]
        assert conv is s.conversations.get(conv.id)  # the session's conversation store holds the state
        # The next response sees the reply.
        send(rt, type="response.create")
        await settle()
        assert model.rendered[-1].endswith("user: second\nassistant: Hello\nassistant: ")
        s.close()
        await writer

    asyncio.run(main())


def test_cancel_ends_at_once_and_drops_later_tokens_and_the_reply_is_truncated() -> None:
    async def main() -> None:
        rt, s, engine, model, lines = make()
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        send(rt, type="conversation.item.create", item=user("q"))
        send(rt, type="response.create")
        await settle()
        rid = engine.live[0]
        engine.emit(rid, "partial")
        await settle()
        lines.take()
        send(rt, type="response.cancel")  # no engine step in between
        await settle()
        events = lines.take()
        assert events[-1].type == "response.done" and events[-1].response.status == "cancelled"
        assert rid in engine.cancelled
        item = rt.conversation.conv.items[-1]
        assert item.content == "partial" and item.truncated
        assert events[-1].response.output[0].status == "incomplete"
        s.close()
        await writer

    asyncio.run(main())


def test_a_response_refused_after_response_created_ends_failed() -> None:
    async def main() -> None:
        rt, s, engine, model, lines = make()
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        send(rt, type="response.create", response={"conversation": "none", "input": [user("q")]})
        await settle()
        rid = next(iter(rt.responses))
        # A session that refuses a generation late (e.g. its prompt failed to tokenize off the loop) sends
        # an error with the generation's id and no done.
        s.queue(p.Error(code="invalid_params", message="prompt is too long", id=rid))
        await settle()
        events = lines.take()
        assert [e.type for e in events[-5:]] == ["error", "response.output_text.done", "response.content_part.done",
                                                 "response.output_item.done", "response.done"]
        assert events[-1].response.status == "failed" and events[-1].response.status_details.error.code == \
            "invalid_params"
        assert not rt.responses and rt.active is None
        s.close()
        await writer

    asyncio.run(main())


def test_out_of_band_responses_overlap_and_in_conversation_ones_do_not() -> None:
    async def main() -> None:
        rt, s, engine, model, lines = make()
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        send(rt, type="conversation.item.create", item=user("q"))
        send(rt, type="response.create")
        for i in range(3):
            send(rt, type="response.create", response={"conversation": "none", "input": [user(f"o{i}")]})
        send(rt, type="response.create", event_id="again")
        await settle()
        assert len(engine.live) == 4
        errors = [e for e in lines.take() if e.type == "error"]
        assert len(errors) == 1 and errors[0].error.code == "conversation_already_has_active_response"
        assert errors[0].error.event_id == "again"
        s.close()
        await writer

    asyncio.run(main())


def test_cancel_by_response_id_leaves_the_others_running() -> None:
    async def main() -> None:
        rt, s, engine, model, lines = make()
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        for i in range(3):
            send(rt, type="response.create", response={"conversation": "none", "input": [user(f"o{i}")]})
        await settle()
        ids = list(rt.responses)
        rids = list(engine.live)
        send(rt, type="response.cancel", response_id=ids[1])
        await settle()
        assert rids[1] in engine.cancelled and rids[0] not in engine.cancelled and rids[2] not in engine.cancelled
        engine.emit(rids[0], "a", finish="stop")
        engine.emit(rids[2], "c", finish="length")
        await settle()
        done = {e.response.id: e.response for e in lines.take() if e.type == "response.done"}
        assert done[ids[0]].status == "completed" and done[ids[1]].status == "cancelled"
        assert done[ids[2]].status == "incomplete" and done[ids[2]].status_details.reason == "max_output_tokens"
        send(rt, type="response.cancel", response_id=ids[1])  # finished: a no-op, no error
        await settle()
        assert not lines.take()
        s.close()
        await writer

    asyncio.run(main())


def _fuzz_events() -> Any:
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=False),
                        st.text(max_size=12))
    values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                           st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                          max_leaves=8)
    types = st.sampled_from(["session.update", "conversation.item.create", "conversation.item.retrieve",
                             "conversation.item.delete", "conversation.item.truncate", "response.create",
                             "response.cancel", "input_audio_buffer.append", "bogus"])
    keys = st.sampled_from(["session", "item", "item_id", "previous_item_id", "response", "response_id",
                            "content_index", "audio_end_ms", "event_id", "input", "conversation", "type", "role",
                            "content", "text", "id", "max_output_tokens", "metadata", "instructions"])
    good_item = st.builds(lambda t, i: user(t, id=i), st.text(max_size=10), st.sampled_from(["a", "b", "c"]))
    fields = st.dictionaries(keys, st.one_of(values, good_item, st.sampled_from(["a", "b", "root", "none"])),
                             max_size=4)
    return st.lists(st.tuples(types, fields), min_size=1, max_size=12)


def test_random_events_never_raise_and_every_event_parses() -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(_fuzz_events())
    def check(batch: list[tuple[str, dict[str, Any]]]) -> None:
        async def main() -> None:
            rt, s, engine, model, lines = make("sys")
            writer = asyncio.get_running_loop().create_task(s.run_writer())
            s.start()
            for etype, fields in batch:
                rt.on_message(json.dumps({**fields, "type": etype}))
                await settle(3)
                for rid in list(engine.live):  # whatever started finishes, in one way or another
                    engine.emit(rid, "x", finish=["stop", "length", None][rid % 3])
                await settle(3)
            await settle()
            events = lines.take()  # each parsed with the SDK's model on arrival (Lines.send)
            bugs = [e for e in events if e.type == "error" and e.error.code == "internal"]
            assert not bugs, bugs  # the catch-all never fired: every refusal was a named one
            assert not s.closed and events[0].type == "session.created"
            s.close()
            await writer

        asyncio.run(main())

    check()


def make_fitting(context_len: int) -> tuple[RealtimeConnection, Session, FakeEngine, FakeModel, Lines, ManualOffload]:
    engine = FakeEngine()
    model = FakeModel(engine, context_len)
    lines = Lines()
    offload = ManualOffload()
    rt = RealtimeConnection(SessionConfig(model="fake", instructions="S"), 100, offload=offload)
    s = Session(lines.send, rt.codec, FakeModels(model), SessionLimits(), transport="realtime")
    rt.attach(s)
    return rt, s, engine, model, lines, offload


def test_truncation_auto_drops_the_oldest_items_from_the_prompt_only() -> None:
    async def main() -> None:
        rt, s, engine, model, lines, offload = make_fitting(context_len=80)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        for i in range(6):
            send(rt, type="conversation.item.create", item=user(f"turn {i} " + "x" * 10, id=f"u{i}"))
        send(rt, type="response.create", response={"max_output_tokens": 8})
        await settle()
        assert not engine.live and len(offload.jobs) == 1  # opened, fitting in the tokenizer thread
        offload.finish()
        await settle()
        (rid,) = engine.live
        prompt = model.rendered[-1]
        assert prompt.startswith("system: S\n") and "turn 5" in prompt and "turn 0" not in prompt
        assert len(prompt) <= 80 - 8
        assert [it.id for it in rt.conversation.conv.items][:6] == [f"u{i}" for i in range(6)]  # nothing deleted
        engine.emit(rid, "ok", finish="stop")
        await settle()
        assert lines.take()[-1].response.status == "completed"
        # truncation "disabled": the same history is refused, and the response ends failed
        send(rt, type="session.update", session={"truncation": "disabled"})
        send(rt, type="response.create", event_id="long", response={"max_output_tokens": 8})
        await settle()
        events = lines.take()
        assert events[0].session.truncation == "disabled"
        errors = [e for e in events if e.type == "error"]
        assert errors and errors[0].error.code == "invalid_params" and errors[0].error.event_id == "long"
        assert not offload.jobs and rt.active is None
        s.close()
        await writer

    asyncio.run(main())


def test_a_response_cancelled_while_its_prompt_is_fitted_never_reaches_the_engine() -> None:
    async def main() -> None:
        rt, s, engine, model, lines, offload = make_fitting(context_len=4096)
        writer = asyncio.get_running_loop().create_task(s.run_writer())
        s.start()
        send(rt, type="conversation.item.create", item=user("q"))
        send(rt, type="response.create")
        await settle()
        send(rt, type="response.cancel")
        await settle()
        done = lines.take()[-1]
        assert done.type == "response.done" and done.response.status == "cancelled" and rt.active is None
        offload.finish()  # the fit completes after the cancel: nothing starts
        await settle()
        assert not engine.live and not engine.prompts and not lines.take()
        s.close()
        await writer

    asyncio.run(main())
