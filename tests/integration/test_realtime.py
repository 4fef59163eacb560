"""The OpenAI Realtime API (text) on ``/v1/realtime``: the official ``openai`` SDK and raw JSON, real servers.

Every server event is parsed with the SDK's own pydantic model for its type
(``openai.types.realtime``), validating, so a missing required field or a
wrong type fails the test.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, get_args

import msgspec
import openai
import pytest
from tests.helpers.server import UNIT, RunningServer, ServerFactory, run
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from rtws import protocol as p
from rtws.client import Client
from rtws.logs import JsonFormatter

KEY = "sk-realtime-test"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _event_models() -> dict[str, Any]:
    from openai.types.realtime.realtime_server_event import RealtimeServerEvent

    union = get_args(RealtimeServerEvent)[0]
    return {get_args(cls.model_fields["type"].annotation)[0]: cls for cls in get_args(union)}


EVENT_MODELS = _event_models()


def parse(raw: bytes | str) -> Any:
    """One server event -> the SDK's model for its type, validated (required fields, types)."""
    data = json.loads(raw)
    model = EVENT_MODELS[data["type"]]
    return model.model_validate(data)


@pytest.fixture(scope="module")
def srv(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    from rtws.config import ServerConfig
    from rtws.server import run_in_thread

    cfg = ServerConfig(port=0, model=str(tiny_llama_dir), model_name="tiny", log_level="WARNING",
                       api_keys=(KEY,), max_tokens_limit=400, num_slots=8, allowed_origins=("http://ok.example",))
    server, thread = run_in_thread(cfg)
    rs = RunningServer(server, thread)
    yield rs
    rs.stop()


@pytest.fixture(scope="module")
def long_srv(tiny_llama_long_dir: Path) -> Iterator[RunningServer]:
    """No EOS: every response runs to max_output_tokens (concurrency, cancel)."""
    from rtws.config import ServerConfig
    from rtws.server import run_in_thread

    cfg = ServerConfig(port=0, model=str(tiny_llama_long_dir), model_name="long", log_level="WARNING",
                       max_tokens_limit=4000, num_slots=8)
    server, thread = run_in_thread(cfg)
    rs = RunningServer(server, thread)
    yield rs
    rs.stop()


def sdk(srv: RunningServer, key: str = KEY) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.http + "/v1", websocket_base_url=f"ws://127.0.0.1:{srv.port}/v1",
                              api_key=key, max_retries=0)


async def until(conn: Any, etype: str, timeout: float = 30 * UNIT) -> list[Any]:
    """Events (parsed with the SDK's models) up to and including the first of type ``etype``."""
    out: list[Any] = []
    while True:
        e = parse(await asyncio.wait_for(conn.recv_bytes(), timeout))
        out.append(e)
        if e.type == etype:
            return out


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}], **extra}


async def ws_greedy(srv: RunningServer, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int, int]:
    """The same conversation through the native /ws protocol: (text, prompt_tokens, completion_tokens, delta tokens)."""
    async with await connect(srv.url, subprotocols=[p.SUBPROTOCOL_JSON],  # type: ignore[list-item]
                             additional_headers=AUTH) as ws:
        assert isinstance(p.JSON.decode_any(await ws.recv()), p.Ready)
        msgs = [p.Message(role=m["role"], content=m["content"]) for m in messages]
        await ws.send(p.JSON.encode(p.Generate(id="g", messages=msgs, max_tokens=max_tokens,
                                              temperature=0.0)).decode())  # JSON goes in text frames
        text, tokens = [], 0
        while True:
            f = p.JSON.decode_any(await asyncio.wait_for(ws.recv(), 30 * UNIT))
            if isinstance(f, p.Delta):
                text.append(f.text)
                tokens += f.tokens
            elif isinstance(f, p.Done):
                return "".join(text), f.usage.prompt_tokens, f.usage.completion_tokens, tokens
            else:
                raise AssertionError(f)


# --------------------------------------------------------------------------- the official SDK


def test_sdk_three_turn_conversation_equals_ws_greedy(srv: RunningServer) -> None:
    turns = ["Who art thou?", "Speak again.", "Farewell, then."]

    async def main() -> tuple[list[Any], list[list[Any]]]:
        async with sdk(srv).realtime.connect(model="tiny") as conn:
            created = parse(await conn.recv_bytes())
            assert created.type == "session.created" and created.session.model == "tiny"
            await conn.session.update(session={"type": "realtime", "instructions": "Answer in verse.",  # type: ignore[arg-type]
                                               "output_modalities": ["text"], "max_output_tokens": 24,
                                               "temperature": 0.0})
            (updated,) = await until(conn, "session.updated")
            assert updated.session.instructions == "Answer in verse." and updated.session.max_output_tokens == 24
            per_turn = []
            for text in turns:
                await conn.conversation.item.create(item=user(text))  # type: ignore[arg-type]
                added = await until(conn, "conversation.item.done")
                assert [e.type for e in added] == ["conversation.item.added", "conversation.item.done"]
                assert added[0].item.content[0].text == text
                await conn.response.create()
                per_turn.append(await until(conn, "response.done"))
            return [created, updated], per_turn

    _, per_turn = run(main())
    history = [{"role": "system", "content": "Answer in verse."}]
    for turn, (text, events) in enumerate(zip(turns, per_turn)):
        done = events[-1].response
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert done.status in ("completed", "incomplete") and done.conversation_id
        assert done.output[0].content[0].text == deltas and done.output[0].role == "assistant"
        history.append({"role": "user", "content": text})
        ref, prompt_tokens, completion_tokens, delta_tokens = run(ws_greedy(srv, history, 24))
        assert deltas == ref  # greedy: the same text as the native protocol for the same conversation
        assert done.usage.input_tokens == prompt_tokens
        assert done.usage.output_tokens == completion_tokens == delta_tokens  # usage = tokens in the deltas
        assert done.usage.total_tokens == prompt_tokens + completion_tokens
        cached = done.usage.input_token_details.cached_tokens
        assert cached is not None and 0 <= cached <= prompt_tokens
        if turn:  # the server-held history is a prefix of this prompt: the engine's prefix cache serves it
            assert cached > 0, cached
        if done.status == "incomplete":
            assert done.status_details.reason == "max_output_tokens" and completion_tokens == 24
        history.append({"role": "assistant", "content": deltas})


def test_sdk_four_concurrent_out_of_band_responses(long_srv: RunningServer) -> None:
    async def main() -> list[Any]:
        async with sdk(long_srv).realtime.connect(model="long") as conn:
            await until(conn, "session.created")
            for i in range(4):
                await conn.response.create(response={  # type: ignore[arg-type]
                    "conversation": "none", "input": [user(f"Question {i}")],
                    "max_output_tokens": 40, "metadata": {"n": str(i)}, "temperature": 0.0})
            events: list[Any] = []
            dones = 0
            while dones < 4:
                e = parse(await asyncio.wait_for(conn.recv_bytes(), 30 * UNIT))
                events.append(e)
                dones += e.type == "response.done"
            return events

    events = run(main())
    created = [e.response for e in events if e.type == "response.created"]
    ids = [r.id for r in created]
    assert len(set(ids)) == 4 and all(r.conversation_id is None for r in created)
    assert {r.metadata["n"] for r in created} == {"0", "1", "2", "3"}
    assert not any(e.type.startswith("conversation.item") for e in events)  # out of band: no conversation items
    order = [e.response_id for e in events if e.type == "response.output_text.delta"]
    firsts = sorted(ids, key=order.index)
    last_of_first = max(i for i, rid in enumerate(order) if rid == firsts[0])
    assert set(order[:last_of_first]) == set(ids), "deltas of the 4 responses were not interleaved"
    for d in (e.response for e in events if e.type == "response.done"):
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta" and e.response_id == d.id)
        assert d.status == "incomplete" and d.status_details.reason == "max_output_tokens"
        assert d.usage.output_tokens == 40 and d.output[0].content[0].text == text


def test_sdk_cancel_mid_stream_within_one_engine_step(long_srv: RunningServer) -> None:
    engine = long_srv.engine()
    step_s = 0.2 * UNIT
    engine.fault_injector = lambda plan: time.sleep(step_s)  # slow steps make "within one step" measurable

    async def main() -> tuple[Any, float, int, list[Any]]:
        async with sdk(long_srv).realtime.connect(model="long") as conn:
            await until(conn, "session.created")
            await conn.conversation.item.create(item=user("Tell me a long tale."))  # type: ignore[arg-type]
            await conn.response.create(response={"max_output_tokens": 3000})
            before = await until(conn, "response.output_text.delta")
            steps = engine.stats().steps
            t0 = time.monotonic()
            await conn.response.cancel()
            events = await until(conn, "response.done")
            elapsed, steps_during = time.monotonic() - t0, engine.stats().steps - steps
            rid = events[-1].response.id
            # After done: nothing more for that response, even over several more steps.
            await conn.session.update(session={"type": "realtime"})
            later = await until(conn, "session.updated")
            await asyncio.sleep(3 * step_s)
            await conn.session.update(session={"type": "realtime"})
            later += await until(conn, "session.updated")
            assert not [e for e in later if getattr(e, "response_id", None) == rid]
            return events[-1].response, elapsed, steps_during, before + events

    try:
        done, elapsed, steps_during, events = run(main())
    finally:
        engine.fault_injector = None
    assert done.status == "cancelled" and done.status_details.reason == "client_cancelled"
    assert steps_during <= 1 and elapsed < step_s, (steps_during, elapsed)
    assert [e.type for e in events[-5:]] == ["response.output_text.done", "response.content_part.done",
                                             "response.output_item.done", "conversation.item.done", "response.done"]
    sent = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert done.output[0].status == "incomplete" and done.output[0].content[0].text == sent
    assert engine.wait_idle(10 * UNIT)  # the slot was freed


def test_sdk_truncate_and_delete(srv: RunningServer) -> None:
    async def main() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with sdk(srv).realtime.connect(model="tiny") as conn:
            await until(conn, "session.created")
            await conn.session.update(session={"type": "realtime", "temperature": 0.0, "max_output_tokens": 20})  # type: ignore[arg-type]
            await until(conn, "session.updated")
            await conn.conversation.item.create(item=user("Who art thou?", id="u1"))  # type: ignore[arg-type]
            await until(conn, "conversation.item.done")
            await conn.response.create()
            events = await until(conn, "response.done")
            item = events[-1].response.output[0]
            text = item.content[0].text
            assert len(text) >= 4, text
            await conn.conversation.item.truncate(item_id=item.id, content_index=0, audio_end_ms=3)
            (truncated,) = await until(conn, "conversation.item.truncated")
            assert truncated.item_id == item.id and truncated.audio_end_ms == 3
            await conn.conversation.item.retrieve(item_id=item.id)
            (got,) = await until(conn, "conversation.item.retrieved")
            out["truncated"] = got.item.content[0].text
            assert out["truncated"] == text[:3]
            # The next response sees the truncated reply.
            await conn.conversation.item.create(item=user("And then?", id="u2"))  # type: ignore[arg-type]
            await until(conn, "conversation.item.done")
            await conn.response.create()
            out["second"] = "".join(e.delta for e in await until(conn, "response.done")
                                    if e.type == "response.output_text.delta")
            await conn.conversation.item.delete(item_id="u1")
            (deleted,) = await until(conn, "conversation.item.deleted")
            assert deleted.item_id == "u1"
            await conn.conversation.item.retrieve(item_id="u1", event_id="ev-r")
            (err,) = await until(conn, "error")
            assert err.error.code == "item_not_found" and err.error.event_id == "ev-r"
            assert err.error.param == "item_id"
            await conn.conversation.item.delete(item_id="u1", event_id="ev-d")
            (err,) = await until(conn, "error")
            assert err.error.code == "item_not_found" and err.error.event_id == "ev-d"
        return out

    out = run(main())
    ref, *_ = run(ws_greedy(srv, [{"role": "user", "content": "Who art thou?"},
                                  {"role": "assistant", "content": out["truncated"]},
                                  {"role": "user", "content": "And then?"}], 20))
    assert out["second"] == ref


# --------------------------------------------------------------------------- raw JSON


async def open_raw(srv: RunningServer, **kw: Any) -> Any:
    headers = kw.pop("headers", AUTH)
    ws = await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime?model={kw.pop('model', 'tiny')}",
                       additional_headers=headers, **kw)
    created = parse(await asyncio.wait_for(ws.recv(), 10 * UNIT))
    assert created.type == "session.created"
    return ws


async def send_recv(ws: Any, event: Any, until_type: str | None = None) -> list[Any]:
    await ws.send(event if isinstance(event, str) else json.dumps(event))
    out = []
    while True:
        raw = await asyncio.wait_for(ws.recv(), 10 * UNIT)
        assert "Traceback" not in raw
        e = parse(raw)
        out.append(e)
        if until_type is None or e.type in (until_type, "error"):
            return out


def test_every_client_event_good_and_bad_and_the_socket_stays_open(srv: RunningServer) -> None:
    bad: list[tuple[Any, str, str | None]] = [
        ("{not json", "invalid_json", None),
        ("[1, 2]", "invalid_event", None),
        ({"event_id": "e1"}, "invalid_event", "type"),
        ({"type": "bogus.event", "event_id": "e2"}, "unknown_event", "type"),
        ({"type": "input_audio_buffer.append", "audio": "AAAA", "event_id": "e3"}, "audio_not_supported", "type"),
        ({"type": "input_audio_buffer.commit", "event_id": "e4"}, "audio_not_supported", "type"),
        ({"type": "output_audio_buffer.clear", "event_id": "e5"}, "audio_not_supported", "type"),
        ({"type": "session.update", "event_id": "s1"}, "missing_required_parameter", "session"),
        ({"type": "session.update", "session": {"instructions": 5}, "event_id": "s2"}, "invalid_value",
         "session.instructions"),
        ({"type": "session.update", "session": {"output_modalities": ["audio"]}, "event_id": "s3"},
         "audio_not_supported", "session.output_modalities"),
        ({"type": "session.update", "session": {"type": "transcription"}, "event_id": "s4"}, "audio_not_supported",
         "session.type"),
        ({"type": "session.update", "session": {"tools": [{"type": "function", "name": "f"}]}, "event_id": "s5"},
         "tools_not_supported", "session.tools"),
        ({"type": "session.update", "session": {"max_output_tokens": 0}, "event_id": "s6"}, "invalid_value",
         "session.max_output_tokens"),
        ({"type": "session.update", "session": {"max_output_tokens": 401}, "event_id": "s7"}, "invalid_value",
         "session.max_output_tokens"),
        ({"type": "session.update", "session": {"temperature": "hot"}, "event_id": "s8"}, "invalid_value",
         "session.temperature"),
        ({"type": "session.update", "session": {"model": "nope"}, "event_id": "s9"}, "model_not_found",
         "session.model"),
        ({"type": "conversation.item.create", "event_id": "c1"}, "missing_required_parameter", "item"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "tool", "content": []},
          "event_id": "c2"}, "invalid_value", "item.role"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                       "content": [{"type": "input_audio", "audio": "AA"}]},
          "event_id": "c3"}, "audio_not_supported", "item.content[0].type"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                       "content": [{"type": "input_image", "image_url": "x"}]},
          "event_id": "c4"}, "invalid_value", "item.content[0].type"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                       "content": [{"type": "input_text"}]},
          "event_id": "c5"}, "missing_required_parameter", "item.content[0].text"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                       "content": [{"type": "input_text", "text": 3}]},
          "event_id": "c6"}, "invalid_value", "item.content[0].text"),
        ({"type": "conversation.item.create", "item": user("x"), "previous_item_id": "nope", "event_id": "c7"},
         "item_not_found", "previous_item_id"),
        ({"type": "conversation.item.create", "item": user("x", id="a"), "event_id": "c8"}, "duplicate_item_id",
         "item.id"),
        ({"type": "conversation.item.create", "item": {"type": "function_call", "name": "f", "arguments": "{}"},
          "event_id": "c9"}, "unsupported_item_type", "item.type"),
        ({"type": "conversation.item.create", "item": {"type": "message", "role": "user"}, "event_id": "c10"},
         "missing_required_parameter", "item.content"),
        ({"type": "conversation.item.create", "item": user("x" * 70_000), "event_id": "c11"}, "item_too_large",
         "item.content"),  # its echo would not fit in the socket's control budget
        ({"type": "conversation.item.retrieve", "item_id": "nope", "event_id": "r1"}, "item_not_found", "item_id"),
        ({"type": "conversation.item.retrieve", "item_id": 7, "event_id": "r2"}, "invalid_value", "item_id"),
        ({"type": "conversation.item.retrieve", "event_id": "r3"}, "missing_required_parameter", "item_id"),
        ({"type": "conversation.item.delete", "item_id": "nope", "event_id": "d1"}, "item_not_found", "item_id"),
        ({"type": "conversation.item.truncate", "item_id": "a", "content_index": 0, "audio_end_ms": 0,
          "event_id": "t1"}, "invalid_value", "item_id"),  # a user item
        ({"type": "conversation.item.truncate", "item_id": "asst", "content_index": 0, "audio_end_ms": 99,
          "event_id": "t2"}, "invalid_value", "audio_end_ms"),
        ({"type": "conversation.item.truncate", "item_id": "asst", "content_index": 1, "audio_end_ms": 0,
          "event_id": "t3"}, "invalid_value", "content_index"),
        ({"type": "conversation.item.truncate", "item_id": "asst", "content_index": 0, "event_id": "t4"},
         "missing_required_parameter", "audio_end_ms"),
        ({"type": "conversation.item.truncate", "item_id": "nope", "content_index": 0, "audio_end_ms": 0,
          "event_id": "t5"}, "item_not_found", "item_id"),
        ({"type": "response.create", "response": {"conversation": "other"}, "event_id": "p1"}, "invalid_value",
         "response.conversation"),
        ({"type": "response.create", "response": {"conversation": "none"}, "event_id": "p2"},
         "missing_required_parameter", "response.input"),
        ({"type": "response.create", "response": {"metadata": {str(i): "v" for i in range(17)}}, "event_id": "p3"},
         "invalid_value", "response.metadata"),
        ({"type": "response.create", "response": {"max_output_tokens": 401}, "event_id": "p4"}, "invalid_value",
         "response.max_output_tokens"),
        ({"type": "response.create", "response": {"output_modalities": ["audio"]}, "event_id": "p5"},
         "audio_not_supported", "response.output_modalities"),
        ({"type": "response.create", "response": {"conversation": "none", "input": [
            {"type": "item_reference", "id": "nope"}]}, "event_id": "p6"}, "item_not_found", "response.input[0].id"),
        ({"type": "response.create", "response": {"max_output_tokens": "lots"}, "event_id": "p7"}, "invalid_value",
         "response.max_output_tokens"),
        ({"type": "response.create", "response": {"input": [{"type": "message", "role": "user", "content": [
            {"type": "input_audio"}]}]}, "event_id": "p8"}, "audio_not_supported", "response.input[0].content[0].type"),
        ({"type": "response.cancel", "response_id": "resp_nope", "event_id": "x1"}, "response_not_found",
         "response_id"),
        ({"type": "response.cancel", "event_id": "x2"}, "response_cancel_not_active", None),
        ({"type": "response.cancel", "response_id": 5, "event_id": "x3"}, "invalid_value", "response_id"),
    ]

    async def main() -> None:
        ws = await open_raw(srv)
        # Good payloads (and the items the bad ones refer to).
        (e,) = await send_recv(ws, {"type": "session.update", "event_id": "g1", "session": {
            "type": "realtime", "instructions": "Be brief.", "max_output_tokens": 8, "temperature": 0.0,
            "top_p": 0.9, "top_k": 5, "seed": 3, "audio": {"output": {"voice": "marin"}}, "tools": []}})
        assert e.type == "session.updated" and e.session.max_output_tokens == 8
        added = await send_recv(ws, {"type": "conversation.item.create", "item": user("hello", id="a")},
                                "conversation.item.done")
        assert [x.type for x in added] == ["conversation.item.added", "conversation.item.done"]
        assert added[0].previous_item_id is None
        added = await send_recv(ws, {"type": "conversation.item.create", "previous_item_id": "root", "item": {
            "type": "message", "role": "system", "id": "sys", "content": [{"type": "input_text", "text": "S"}]}},
                                "conversation.item.done")
        assert added[0].previous_item_id is None and added[0].item.role == "system"
        added = await send_recv(ws, {"type": "conversation.item.create", "previous_item_id": "a", "item": {
            "type": "message", "role": "assistant", "id": "asst", "content": [{"type": "text", "text": "Hi there"}]}},
                                "conversation.item.done")
        assert added[0].previous_item_id == "a" and added[0].item.content[0].type == "output_text"
        (e,) = await send_recv(ws, {"type": "conversation.item.retrieve", "item_id": "asst"})
        assert e.type == "conversation.item.retrieved" and e.item.content[0].text == "Hi there"
        for event, code, param in bad:
            (e,) = await send_recv(ws, event)
            assert e.type == "error", (event, e)
            assert e.error.code == code and e.error.param == param, (event, e.error)
            assert e.error.type and e.error.message
            if isinstance(event, dict) and "event_id" in event:
                assert e.error.event_id == event["event_id"]
        (e,) = await send_recv(ws, {"type": "conversation.item.truncate", "item_id": "asst", "content_index": 0,
                                    "audio_end_ms": 2})
        assert e.type == "conversation.item.truncated"
        (e,) = await send_recv(ws, {"type": "conversation.item.delete", "item_id": "sys"})
        assert e.type == "conversation.item.deleted" and e.item_id == "sys"
        # Two in-conversation responses at once: the second is refused, the first completes.
        await ws.send(json.dumps({"type": "response.create"}))
        await ws.send(json.dumps({"type": "response.create", "event_id": "twice"}))
        events: list[Any] = []
        while not events or events[-1].type != "response.done":
            events.append(parse(await asyncio.wait_for(ws.recv(), 10 * UNIT)))
        errors = [x for x in events if x.type == "error"]
        assert len(errors) == 1 and errors[0].error.code == "conversation_already_has_active_response"
        assert errors[0].error.event_id == "twice"
        done = events[-1].response
        assert done.usage.output_tokens <= 8
        # A response with its own instructions and input, in the conversation.
        events = await send_recv(ws, {"type": "response.create", "response": {
            "instructions": "Other.", "input": [{"type": "item_reference", "id": "a"}, user("more")],
            "max_output_tokens": 3, "metadata": {"k": "v"}}}, "response.done")
        assert events[-1].response.metadata == {"k": "v"} and events[-1].response.usage.output_tokens <= 3
        await ws.send(json.dumps({"type": "response.cancel", "response_id": done.id}))  # finished: a no-op
        # Still open and working (and the no-op cancel sent nothing: this is the next event).
        (e,) = await send_recv(ws, {"type": "session.update", "session": {"type": "realtime"}})
        assert e.type == "session.updated"
        await ws.close()

    run(main())


def test_server_events_of_one_response_in_order(srv: RunningServer) -> None:
    async def main() -> list[Any]:
        ws = await open_raw(srv)
        await send_recv(ws, {"type": "conversation.item.create", "item": user("Who art thou?")},
                        "conversation.item.done")
        events = await send_recv(ws, {"type": "response.create", "response": {
            "max_output_tokens": 16, "temperature": 0.0}}, "response.done")
        await ws.close()
        return events

    events = run(main())
    kinds = [e.type for e in events]
    n = kinds.count("response.output_text.delta")
    assert n >= 1
    assert kinds == (["response.created", "response.output_item.added", "conversation.item.added",
                      "response.content_part.added"] + ["response.output_text.delta"] * n
                     + ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                        "conversation.item.done", "response.done"])
    rid = events[0].response.id
    item_id = events[1].item.id
    assert events[0].response.status == "in_progress"
    assert all(getattr(e, "response_id", rid) == rid for e in events)
    assert all(getattr(e, "item_id", item_id) == item_id for e in events)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-5].text == text and events[-4].part.text == text
    assert events[-3].item.content[0].text == text and events[-2].item.content[0].text == text
    assert events[-1].response.output[0].content[0].text == text
    assert len({e.event_id for e in events}) == len(events)


def test_handshake_auth_origin_model_and_browser_subprotocol(srv: RunningServer) -> None:
    async def main() -> None:
        url = f"ws://127.0.0.1:{srv.port}/v1/realtime?model=tiny"
        for headers, status in [({}, 401), ({"Authorization": "Bearer wrong"}, 401),
                                ({**AUTH, "Origin": "http://evil.example"}, 403)]:
            with pytest.raises(InvalidStatus) as exc:
                await connect(url, additional_headers=headers)
            assert exc.value.response.status_code == status
        with pytest.raises(InvalidStatus) as exc:
            await connect(url.replace("tiny", "nope"), additional_headers=AUTH)
        assert exc.value.response.status_code == 404
        # A browser passes the key as a subprotocol; the server selects "realtime".
        ws = await connect(url, subprotocols=["realtime", f"openai-insecure-api-key.{KEY}"],  # type: ignore[list-item]
                           additional_headers={"Origin": "http://ok.example"})
        assert ws.subprotocol == "realtime"
        assert parse(await ws.recv()).type == "session.created"
        await ws.close()
        with pytest.raises(InvalidStatus):
            async with sdk(srv, key="wrong").realtime.connect(model="tiny"):
                pass

    run(main())


def test_metrics_and_log_line_say_transport_realtime(srv: RunningServer) -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("rtws")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def scrape() -> str:
        req = urllib.request.Request(srv.http + "/metrics", headers=AUTH)
        with urllib.request.urlopen(req) as r:
            return str(r.read().decode())

    async def main() -> tuple[str, str]:
        ws = await open_raw(srv)
        events = await send_recv(ws, {"type": "response.create", "response": {
            "conversation": "none", "input": [user("Hi")], "max_output_tokens": 4}}, "response.done")
        during = await asyncio.get_running_loop().run_in_executor(None, scrape)
        await ws.close()
        return str(events[-1].response.id), during

    try:
        rid, during = run(main())
        deadline = time.monotonic() + 5 * UNIT
        while rid not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    lines = [json.loads(x) for x in stream.getvalue().splitlines() if rid in x]
    assert len(lines) == 1 and lines[0]["transport"] == "realtime" and lines[0]["id"] == rid
    assert 'rtws_connections{transport="realtime"} 1.0' in during
    metrics = scrape()
    assert 'rtws_generations_started_total{model="tiny",transport="realtime"}' in metrics
    finished = [ln for ln in metrics.splitlines() if ln.startswith("rtws_generations_total{")]
    assert any('transport="realtime"' in ln and not ln.endswith(" 0.0") for ln in finished), finished


def test_rate_limits_updated_and_rate_limited_error(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir, model_name="tiny", rate_limit_per_minute=60, rate_limit_burst=2)

    async def main() -> list[Any]:
        ws = await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime")
        assert parse(await ws.recv()).type == "session.created"
        out = []
        for i in range(3):
            out.append(await send_recv(ws, {"type": "response.create", "event_id": f"r{i}", "response": {
                "conversation": "none", "input": [user("Hi")], "max_output_tokens": 2}}, "response.done"))
        await ws.close()
        return out

    first, second, third = run(main())
    rl = [e for e in first if e.type == "rate_limits.updated"]
    assert len(rl) == 1 and rl[0].rate_limits[0].name == "requests" and rl[0].rate_limits[0].limit == 2
    assert rl[0].rate_limits[0].remaining == 1
    assert [e for e in second if e.type == "rate_limits.updated"][0].rate_limits[0].remaining == 0
    (err,) = third
    assert err.type == "error" and err.error.code == "rate_limited" and err.error.event_id == "r2"


def test_slow_realtime_reader_pauses_only_its_own_responses(server_factory: ServerFactory,
                                                           tiny_llama_long_dir: Path) -> None:
    import socket

    srv = server_factory(tiny_llama_long_dir, send_high_watermark=1024, transport_high_water=4096,
                         socket_send_buffer=8192, stall_timeout_s=30.0)
    engine = srv.engine()

    async def main() -> tuple[int, int, str]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        ws = await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime", sock=sock, max_queue=1)
        assert parse(await ws.recv()).type == "session.created"
        for i in range(4):
            await ws.send(json.dumps({"type": "response.create", "response": {
                "conversation": "none", "input": [user(f"q{i}")], "max_output_tokens": 3000}}))
        ws.transport.pause_reading()
        deadline = time.monotonic() + 60 * UNIT
        session = None
        while time.monotonic() < deadline:
            found = [c.session for c in srv.app.connections if c.session.transport == "realtime"]
            if found and found[0].num_pauses and engine.stats().paused == 4:
                session = found[0]
                break
            await asyncio.sleep(0.01)
        assert session is not None, "the slow reader's responses never paused"
        async with await Client.connect(srv.url) as c:  # another client is not held up
            g = await c.generate("a", max_tokens=50, temperature=0.0)
            r = await asyncio.wait_for(g.result(), 30 * UNIT)
        paused = engine.stats().paused
        ws.transport.abort()
        return paused, session.max_buffered, r.reason

    paused, max_buffered, reason = run(main())
    assert paused == 4 and reason == "length"
    assert max_buffered <= 1024 + 4 * 400, max_buffered


def test_decoding_never_raises_on_junk(srv: RunningServer) -> None:
    """Random and adversarial payloads: each gets one error event, none a stack trace; the socket stays open."""
    junk: list[Any] = ["", "null", "1e999999", '"str"', "{" * 2000 + "}" * 2000, b"\xff\xfe".decode("latin-1"),
                       json.dumps({"type": "response.create", "response": []}),
                       json.dumps({"type": "response.create", "response": {"input": "text"}}),
                       json.dumps({"type": "conversation.item.create", "item": {"type": 5}}),
                       json.dumps({"type": "session.update", "session": {"top_p": 0}}),
                       json.dumps({"type": "session.update", "session": {"temperature": float("nan")}}),
                       json.dumps({"type": ["x"]}), json.dumps({"type": "x" * 10_000})]

    async def main() -> None:
        ws = await open_raw(srv)
        for payload in junk:
            (e,) = await send_recv(ws, payload)
            assert e.type == "error" and len(e.error.message) < 400, (payload[:80], e)
        await ws.send(msgspec.json.encode({"type": "session.update", "session": {}}))  # a binary message works too
        assert parse(await ws.recv()).type == "session.updated"
        await ws.close()

    run(main())


def test_the_docs_example_runs(srv: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    """docs/realtime.md's SDK example, verbatim but for the address, key and model name."""
    doc = (Path(__file__).resolve().parents[2] / "docs" / "realtime.md").read_text()
    code = doc.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 22
    code = (code.replace("http://127.0.0.1:8000", srv.http).replace("ws://127.0.0.1:8000", f"ws://127.0.0.1:{srv.port}")
            .replace('"sk-..."', repr(KEY)).replace('model="shakespeare"', 'model="tiny"'))
    exec(compile(code, "docs/realtime.md", "exec"), {"__name__": "__doc_example__"})
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].split()[0] in ("completed", "incomplete"), out


def test_a_client_that_asks_faster_than_it_reads_is_closed(server_factory: ServerFactory,
                                                          tiny_llama_dir: Path) -> None:
    """Item echoes and retrieves are bounded like deltas: unread events past the cap close the socket (1008)."""
    import socket

    from websockets.exceptions import ConnectionClosed

    srv = server_factory(tiny_llama_dir, model_name="tiny", send_high_watermark=4096, max_frame_bytes=65536,
                         transport_high_water=4096, socket_send_buffer=8192)

    async def main() -> tuple[int | None, int]:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", srv.port))
        sock.setblocking(False)
        ws = await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime", sock=sock, max_queue=1)
        assert parse(await ws.recv()).type == "session.created"
        await ws.send(json.dumps({"type": "conversation.item.create", "item": user("x" * 60_000, id="big")}))
        ws.transport.pause_reading()
        for _ in range(100):  # 6 MB of retrieved items asked for, none read
            await ws.send(json.dumps({"type": "conversation.item.retrieve", "item_id": "big"}))
        deadline = time.monotonic() + 30 * UNIT
        while srv.app.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        left = len(srv.app.connections)
        ws.transport.resume_reading()
        try:
            while True:
                await asyncio.wait_for(ws.recv(), 5 * UNIT)
        except (ConnectionClosed, asyncio.TimeoutError):
            pass
        return ws.close_code, left

    code, left = run(main())
    assert left == 0 and code in (1008, 1006)


def test_drain_ends_realtime_responses_cancelled_and_closes_1001(server_factory: ServerFactory,
                                                                 tiny_llama_long_dir: Path) -> None:
    import threading

    from websockets.exceptions import ConnectionClosed

    srv = server_factory(tiny_llama_long_dir, model_name="long", drain_timeout_s=0.5 * UNIT)

    async def main() -> tuple[list[Any], int | None]:
        ws = await connect(f"ws://127.0.0.1:{srv.port}/v1/realtime")
        assert parse(await ws.recv()).type == "session.created"
        events = await send_recv(ws, {"type": "response.create", "response": {
            "conversation": "none", "input": [user("a")], "max_output_tokens": 3000}}, "response.output_text.delta")
        stopper = threading.Thread(target=srv.stop, kwargs={"drain": True}, daemon=True)
        stopper.start()
        try:
            while True:
                events.append(parse(await asyncio.wait_for(ws.recv(), 20 * UNIT)))
        except ConnectionClosed:
            pass
        stopper.join(30 * UNIT)
        return events, ws.close_code

    events, code = run(main())
    done = [e for e in events if e.type == "response.done"]
    assert len(done) == 1 and done[0].response.status == "cancelled"
    assert events[-1].type == "response.done" and code == 1001


def test_truncation_auto_fits_a_long_conversation_and_disabled_refuses_it(srv: RunningServer) -> None:
    """The tiny model has a 256-token context: 12 long turns do not fit. "auto" drops the oldest from the
    prompt (they stay in the conversation); "disabled" ends the response failed."""
    async def main() -> tuple[list[Any], list[Any], Any]:
        ws = await open_raw(srv)
        for i in range(12):
            await send_recv(ws, {"type": "conversation.item.create", "item": user(f"Turn {i}: " + "the " * 25,
                                                                                  id=f"t{i}")},
                            "conversation.item.done")
        auto = await send_recv(ws, {"type": "response.create", "response": {"max_output_tokens": 8}},
                               "response.done")
        (first,) = await send_recv(ws, {"type": "conversation.item.retrieve", "item_id": "t0"})
        await send_recv(ws, {"type": "session.update", "session": {"truncation": "disabled"}})
        await ws.send(json.dumps({"type": "response.create", "event_id": "off",
                                  "response": {"max_output_tokens": 8}}))
        off: list[Any] = []
        while not off or off[-1].type not in ("response.done",) and not (
                off[-1].type == "error" and "response.created" not in [e.type for e in off]):
            off.append(parse(await asyncio.wait_for(ws.recv(), 10 * UNIT)))
        await ws.close()
        return auto, off, first

    auto, off, first = run(main())
    done = auto[-1].response
    assert done.status in ("completed", "incomplete") and 0 < done.usage.input_tokens <= 255
    assert first.type == "conversation.item.retrieved" and first.item.id == "t0"  # still in the conversation
    errors = [e for e in off if e.type == "error"]
    assert errors and errors[0].error.code == "invalid_params" and errors[0].error.event_id == "off"
    assert off[-1].type == "error" or off[-1].response.status == "failed"
