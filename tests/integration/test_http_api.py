"""POST /infer over a real uvicorn server on port 0 with a tiny real model: SSE framing, the JSON form,
every error status, disconnects, capacity, drain and timeouts."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from tests.helpers.http import connect, get, parse_sse, post
from tests.helpers.server import UNIT, RunningServer

from rtws import protocol
from rtws.hooks import GenerationRecord, Hooks
from rtws.http.schemas import InferRequest

# --------------------------------------------------------------------------- helpers


class Stream:
    """A streaming request held open: headers read, body read on demand."""

    def __init__(self, base: str, path: str, body: Any, headers: dict[str, str] | None = None) -> None:
        self.conn = connect(base)
        self.conn.request("POST", path, body=msgspec.json.encode(body),
                          headers={"content-type": "application/json", **(headers or {})})
        self.resp = self.conn.getresponse()

    def rest(self) -> bytes:
        return self.resp.read()

    def close(self) -> None:
        self.resp.close()
        self.conn.close()


class Gate:
    """An engine fault injector that holds the engine thread in its next step until released."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, plan: Any) -> None:
        self.entered.set()
        if not self.release.wait(30 * UNIT):
            raise RuntimeError("test gate never released")


class Recorder(Hooks):
    """Hooks that remember what the HTTP layer reported, so tests can wait on it."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.started: list[tuple[str, str]] = []
        self.first: list[str] = []
        self.finished: list[GenerationRecord] = []
        self.rejections: list[str] = []

    def generation_started(self, model: str, transport: str) -> None:
        with self.cond:
            self.started.append((model, transport))

    def first_token(self, model: str, ttft_s: float) -> None:
        with self.cond:
            self.first.append(model)

    def generation_finished(self, rec: GenerationRecord) -> None:
        with self.cond:
            self.finished.append(rec)
            self.cond.notify_all()

    def rejected(self, code: str) -> None:
        with self.cond:
            self.rejections.append(code)

    def wait_finished(self, n: int, timeout: float = 10 * UNIT) -> list[GenerationRecord]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.finished) >= n, timeout), self.finished
            return list(self.finished)


def wait_until(cond: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return bool(cond())


def on_loop(server: RunningServer, coro: Any) -> Any:
    """Schedule a coroutine on the server's loop; returns a concurrent future."""
    return asyncio.run_coroutine_threadsafe(coro, server.server._loop)


def no_trace(body: bytes) -> None:
    assert b"Traceback" not in body and b'File "' not in body


@pytest.fixture(scope="module")
def srv(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    from rtws.config import ServerConfig
    from rtws.server import run_in_thread

    cfg = ServerConfig(port=0, model=str(tiny_llama_dir), log_level="WARNING", max_frame_bytes=16384,
                       max_tokens_limit=200, num_slots=8)
    server, thread = run_in_thread(cfg)
    rs = RunningServer(server, thread)
    yield rs
    rs.stop()


@pytest.fixture
def recorder(srv: RunningServer) -> Iterator[Recorder]:
    rec, old = Recorder(), srv.app.hooks
    srv.app.hooks = rec
    yield rec
    srv.app.hooks = old


@pytest.fixture
def gate(srv: RunningServer) -> Iterator[Gate]:
    g, engine = Gate(), srv.engine()
    engine.fault_injector = g
    yield g
    g.release.set()
    engine.fault_injector = None


def records(rec: Recorder, reason: str) -> list[GenerationRecord]:
    return [r for r in rec.finished if r.reason == reason]


# --------------------------------------------------------------------------- the request schema


def struct_fields(t: Any) -> dict[str, msgspec.inspect.Field]:
    info = msgspec.inspect.type_info(t)
    assert isinstance(info, msgspec.inspect.StructType)
    return {f.name: f for f in info.fields}


def test_infer_constraints_are_the_protocols() -> None:
    """Every field /infer shares with the WebSocket generate frame carries the same msgspec constraints."""
    mine, theirs = struct_fields(InferRequest), struct_fields(protocol.Generate)
    shared = set(mine) & set(theirs)
    assert shared >= {"prompt", "messages", "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
                      "priority"}
    for name in shared - {"stop"}:
        assert mine[name].type == theirs[name].type, name
        assert mine[name].default == theirs[name].default, name
    stop = mine["stop"].type
    assert isinstance(stop, msgspec.inspect.UnionType)
    assert [t for t in stop.types if isinstance(t, msgspec.inspect.ListType)] == [theirs["stop"].type]


# --------------------------------------------------------------------------- success paths


def test_sse_stream_and_json_form_agree(srv: RunningServer, recorder: Recorder) -> None:
    body = {"prompt": "ROMEO:\n", "max_tokens": 12, "temperature": 0.0}
    r = post(srv.http, "/infer", body)
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-request-id"].startswith("infer-")
    events = r.events()
    *deltas, (last_event, last_data) = events
    assert deltas and all(ev == "message" for ev, _ in deltas)
    chunks = [msgspec.json.decode(d) for _, d in deltas]
    assert all(set(c) == {"text", "tokens"} and c["tokens"] >= 0 for c in chunks)
    assert last_event == "done"
    done = msgspec.json.decode(last_data)
    name = srv.app.registry.default_name
    assert done["reason"] in ("stop", "length") and done["model"] == name
    assert done["usage"]["completion_tokens"] == sum(c["tokens"] for c in chunks) <= 12
    assert done["usage"]["prompt_tokens"] > 0
    if done["reason"] == "length":
        assert done["usage"]["completion_tokens"] == 12

    j = post(srv.http, "/infer", {**body, "stream": False})
    assert j.status == 200 and j.headers["content-type"] == "application/json"
    doc = j.json()
    assert set(doc) == {"text", "reason", "usage", "model"}
    assert doc["text"] == "".join(c["text"] for c in chunks)  # greedy: the same text both ways
    assert doc["reason"] == done["reason"] and doc["usage"] == done["usage"] and doc["model"] == name

    recs = recorder.wait_finished(2)
    assert [r.transport for r in recs] == ["http", "http"]
    assert [r.reason for r in recs] == [done["reason"]] * 2
    assert recs[0].completion_tokens == done["usage"]["completion_tokens"] and recs[0].ttft_s is not None
    assert recorder.started == [(name, "http")] * 2 and recorder.first == [name] * 2
    assert srv.app.num_http_streams == 0


def test_messages_stop_string_and_seeded_sampling(srv: RunningServer) -> None:
    chat = post(srv.http, "/infer", {"messages": [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hello", "name": "romeo"}],
                                     "max_tokens": 6, "stream": False})
    assert chat.status == 200 and chat.json()["usage"]["prompt_tokens"] > 3
    seeded = {"prompt": "JULIET:", "max_tokens": 10, "temperature": 1.0, "top_k": 20, "seed": 7, "stream": False}
    a, b = post(srv.http, "/infer", seeded).json(), post(srv.http, "/infer", seeded).json()
    assert a["text"] == b["text"]  # same seed, same sample
    greedy = post(srv.http, "/infer", {"prompt": "JULIET:", "max_tokens": 10, "temperature": 0, "stream": False})
    text = greedy.json()["text"]
    if len(text) > 2:  # stop on a string the greedy output is known to contain: the text ends before it
        stop = text[1:3]
        cut = post(srv.http, "/infer", {"prompt": "JULIET:", "max_tokens": 10, "temperature": 0, "stop": stop,
                                        "stream": False}).json()
        assert cut["reason"] == "stop" and stop not in cut["text"] and text.startswith(cut["text"])


# --------------------------------------------------------------------------- errors


BAD = [
    (b"{not json", 400, "bad_request"),
    (b"", 400, "bad_request"),
    (b"[1, 2]", 400, "bad_request"),
    (b'"prompt"', 400, "bad_request"),
    (b"\xff\xfe{}", 400, "bad_request"),
    (b"[" * 5000, 400, "bad_request"),
    ({"prompt": "x", "max_tokens": 0}, 400, "invalid_params"),
    ({"prompt": 5}, 400, "invalid_params"),
    ({"prompt": "x", "temperature": "hot"}, 400, "invalid_params"),
    ({"prompt": "x", "top_p": 0}, 400, "invalid_params"),
    ({"prompt": "x", "temperature": 1e999}, 400, "invalid_params"),
    ({"prompt": "x", "priority": "urgent"}, 400, "invalid_params"),
    ({"prompt": "x", "stop": [""]}, 400, "invalid_params"),
    ({"prompt": "x", "stream": "yes"}, 400, "invalid_params"),
    ({}, 400, "invalid_params"),
    ({"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "invalid_params"),
    ({"messages": []}, 400, "invalid_params"),
    ({"prompt": "x", "max_tokens": 201}, 400, "invalid_params"),  # over max_tokens_limit
    ({"prompt": "word " * 400}, 400, "invalid_params"),  # longer than the context
    ({"prompt": "x", "model": "nope"}, 404, "unknown_model"),
]


@pytest.mark.parametrize("body,status,code", BAD, ids=[f"{i}-{c}" for i, (_, _, c) in enumerate(BAD)])
def test_bad_requests_get_json_errors(srv: RunningServer, recorder: Recorder, body: Any, status: int,
                                      code: str) -> None:
    r = post(srv.http, "/infer", body)
    assert r.status == status, r.body
    assert r.headers["content-type"] == "application/json"
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    no_trace(r.body)
    assert recorder.rejections == [code] and not recorder.started
    if code == "invalid_params" and isinstance(body, dict) and "max_tokens" in body and body["max_tokens"] == 0:
        assert "max_tokens" in err["message"]  # msgspec names the field


def test_body_over_the_limit_is_413_declared_or_chunked(srv: RunningServer) -> None:
    big = msgspec.json.encode({"prompt": "x" * 20000})
    r = post(srv.http, "/infer", big)
    assert r.status == 413 and r.json()["error"]["code"] == "payload_too_large"

    def pieces() -> Iterable[bytes]:
        for i in range(0, len(big), 4096):
            yield big[i:i + 4096]

    r = post(srv.http, "/infer", pieces(), chunked=True)
    assert r.status == 413 and r.json()["error"]["code"] == "payload_too_large"
    ok = post(srv.http, "/infer", {"prompt": "x", "max_tokens": 2, "stream": False})
    assert ok.status == 200  # and the server is fine


def test_keep_alive_after_a_read_and_refused_body(srv: RunningServer) -> None:
    conn = connect(srv.http)
    try:
        conn.request("POST", "/infer", body=b'{"prompt": 1}')
        r = conn.getresponse()
        assert r.status == 400 and r.getheader("connection") is None
        r.read()
        sock = conn.sock
        conn.request("POST", "/infer", body=b'{"prompt": "x", "max_tokens": 2, "stream": false}')
        assert conn.getresponse().status == 200 and conn.sock is sock  # same connection
    finally:
        conn.close()


def test_wrong_method_and_path(srv: RunningServer) -> None:
    assert post(srv.http, "/v1/models", {}).status == 405
    assert post(srv.http, "/v1/nothing", {}).status == 404


# --------------------------------------------------------------------------- disconnects


def test_client_disconnect_cancels_and_frees_the_slot(srv: RunningServer, recorder: Recorder, gate: Gate) -> None:
    engine = srv.engine()
    before = engine.stats().tokens_generated
    s = Stream(srv.http, "/infer", {"prompt": "ROMEO:", "max_tokens": 150, "temperature": 0})
    assert s.resp.status == 200  # headers arrive at once, before any token
    assert gate.entered.wait(10 * UNIT)  # the engine is in the generation's first step
    assert srv.app.num_http_streams == 1
    s.close()  # the client goes away mid-stream
    (rec,) = recorder.wait_finished(1)
    assert rec.reason == "cancelled" and rec.transport == "http"
    assert srv.app.num_http_streams == 0
    gate.release.set()
    assert engine.wait_idle(10 * UNIT)
    st = engine.stats()
    assert st.running == 0 and st.waiting == 0 and st.slots_in_use == 0
    assert st.tokens_generated - before <= 2  # freed at the next step boundary, not after 150 tokens


def test_disconnect_before_first_token_in_the_json_form(srv: RunningServer, recorder: Recorder, gate: Gate) -> None:
    conn = connect(srv.http)
    conn.request("POST", "/infer", body=msgspec.json.encode({"prompt": "x", "max_tokens": 150, "stream": False}),
                 headers={"content-type": "application/json"})
    assert gate.entered.wait(10 * UNIT)
    conn.close()
    (rec,) = recorder.wait_finished(1)
    assert rec.reason == "cancelled"
    gate.release.set()
    assert srv.engine().wait_idle(10 * UNIT) and srv.engine().stats().slots_in_use == 0


# --------------------------------------------------------------------------- limits


def test_auth_and_rate_limit(server_factory: Any, tiny_llama_dir: Path) -> None:
    s = server_factory(tiny_llama_dir, api_keys=("key-a", "key-b", "key-c"), rate_limit_per_minute=1, warmup=False)
    body = {"prompt": "x", "max_tokens": 2, "stream": False}
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "Basic a2V5LWE="}):
        r = post(s.http, "/infer", body, headers)
        assert r.status == 401 and r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert get(s.http, "/v1/models").status == 401
    # The body of a refused request was never read: the server closes that connection, and a client
    # reusing its connection object simply reconnects.
    conn = connect(s.http)
    try:
        conn.request("POST", "/infer", body=msgspec.json.encode(body))
        r1 = conn.getresponse()
        assert r1.status == 401 and r1.getheader("connection") == "close"
        r1.read()
        conn.request("POST", "/infer", body=msgspec.json.encode(body), headers={"authorization": "Bearer key-c"})
        assert conn.getresponse().status == 200
    finally:
        conn.close()

    a = {"authorization": "Bearer key-a"}
    assert post(s.http, "/infer", body, a).status == 200
    r = post(s.http, "/infer", body, a)
    assert r.status == 429
    err = r.json()["error"]
    assert err["code"] == "rate_limited" and 0 < err["retry_after"] <= 60
    assert int(r.headers["retry-after"]) >= 1
    assert post(s.http, "/infer", body, {"authorization": "Bearer key-b"}).status == 200  # a bucket per key


def test_capacity_503_while_a_stream_is_held_open(server_factory: Any, tiny_llama_dir: Path) -> None:
    s = server_factory(tiny_llama_dir, max_connections=1, warmup=False)
    gate, engine = Gate(), s.engine()
    engine.fault_injector = gate
    held = Stream(s.http, "/infer", {"prompt": "x", "max_tokens": 5})
    try:
        assert held.resp.status == 200 and gate.entered.wait(10 * UNIT)
        assert s.app.num_http_streams == 1
        r = post(s.http, "/infer", {"prompt": "y", "max_tokens": 2})
        assert r.status == 503 and r.json()["error"]["code"] == "overloaded"
        assert int(r.headers["retry-after"]) >= 1
        o = post(s.http, "/v1/completions", {"model": s.app.registry.default_name, "prompt": "y"})
        assert o.status == 503 and o.json()["error"]["code"] == "overloaded"
        gate.release.set()
        events = parse_sse(held.rest())
        assert events[-1][0] == "done" and msgspec.json.decode(events[-1][1])["reason"] in ("stop", "length")
    finally:
        gate.release.set()
        engine.fault_injector = None
        held.close()
    assert wait_until(lambda: s.app.num_http_streams == 0, 5 * UNIT)
    assert post(s.http, "/infer", {"prompt": "y", "max_tokens": 2, "stream": False}).status == 200


def test_drain_refuses_new_requests_and_lets_streams_finish(server_factory: Any, tiny_llama_dir: Path) -> None:
    s = server_factory(tiny_llama_dir, warmup=False)
    gate, engine = Gate(), s.engine()
    engine.fault_injector = gate
    held = Stream(s.http, "/infer", {"prompt": "x", "max_tokens": 5})
    try:
        assert held.resp.status == 200 and gate.entered.wait(10 * UNIT)
        drained = on_loop(s, s.app.drain(30 * UNIT))
        on_loop(s, asyncio.sleep(0)).result(5 * UNIT)  # runs after the drain's first step
        assert s.app.draining
        r = post(s.http, "/infer", {"prompt": "y", "max_tokens": 2})
        assert r.status == 503 and r.json()["error"]["code"] == "overloaded"
        assert "draining" in r.json()["error"]["message"]
        assert not drained.done()  # waiting for the held stream
        gate.release.set()
        events = parse_sse(held.rest())
        assert msgspec.json.decode(events[-1][1])["reason"] in ("stop", "length")  # finished, not cut
        drained.result(10 * UNIT)
    finally:
        gate.release.set()
        engine.fault_injector = None
        held.close()


def test_drain_timeout_ends_http_streams_as_cancelled(server_factory: Any, tiny_llama_dir: Path) -> None:
    s = server_factory(tiny_llama_dir, warmup=False)
    gate, engine = Gate(), s.engine()
    engine.fault_injector = gate
    held = Stream(s.http, "/infer", {"prompt": "x", "max_tokens": 50})
    chat = Stream(s.http, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "stream": True})
    try:
        assert held.resp.status == 200 and chat.resp.status == 200 and gate.entered.wait(10 * UNIT)
        on_loop(s, s.app.drain(0.05)).result(10 * UNIT)
        events = parse_sse(held.rest())
        assert events[-1][0] == "done" and msgspec.json.decode(events[-1][1])["reason"] == "cancelled"
        chunks = parse_sse(chat.rest())
        assert chunks[-1][1] == "[DONE]"
        assert msgspec.json.decode(chunks[-2][1])["choices"][0]["finish_reason"] == "length"
        assert s.app.num_http_streams == 0
    finally:
        gate.release.set()
        engine.fault_injector = None
        held.close()
        chat.close()


def test_request_timeout_ends_with_reason_timeout(server_factory: Any, tiny_llama_dir: Path) -> None:
    s = server_factory(tiny_llama_dir, request_timeout=0.1 * UNIT, warmup=False)
    engine = s.engine()
    engine.fault_injector = lambda plan: time.sleep(0.2 * UNIT)  # a model slower than the timeout
    try:
        r = post(s.http, "/infer", {"prompt": "x", "max_tokens": 50, "stream": False})
        assert r.status == 200 and r.json()["reason"] == "timeout"
        assert r.json()["usage"]["completion_tokens"] < 50
        events = post(s.http, "/infer", {"prompt": "x", "max_tokens": 50}).events()
        assert msgspec.json.decode(events[-1][1])["reason"] == "timeout"
        c = post(s.http, "/v1/completions", {"model": s.app.registry.default_name, "prompt": "x", "max_tokens": 50})
        assert c.status == 200 and c.json()["choices"][0]["finish_reason"] == "length"
    finally:
        engine.fault_injector = None


def test_engine_error_is_reported_not_leaked(srv: RunningServer) -> None:
    engine = srv.engine()

    def boom(plan: Any) -> None:
        raise RuntimeError("secret internal detail")

    engine.fault_injector = boom
    try:
        events = post(srv.http, "/infer", {"prompt": "x", "max_tokens": 5}).events()
        done = msgspec.json.decode(events[-1][1])
        assert events[-1][0] == "done" and done["reason"] == "error" and "secret" not in done["error"]
        r = post(srv.http, "/infer", {"prompt": "x", "max_tokens": 5, "stream": False})
        assert r.status == 500 and r.json()["error"]["code"] == "internal" and b"secret" not in r.body
    finally:
        engine.fault_injector = None
    assert post(srv.http, "/infer", {"prompt": "x", "max_tokens": 2, "stream": False}).status == 200


def test_sse_keepalive_comments_while_a_stream_waits(srv: RunningServer, gate: Gate,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """While the engine produces nothing for a stream, an SSE comment goes out every KEEPALIVE_S (one timer
    per generation, re-armed when it fires); once tokens flow none is sent between them, and the stream
    ends normally."""
    import rtws.http.stream as stream_mod

    period = 0.2 * UNIT
    monkeypatch.setattr(stream_mod, "KEEPALIVE_S", period)
    held = Stream(srv.http, "/infer", {"prompt": "x", "max_tokens": 5})
    try:
        assert held.resp.status == 200 and gate.entered.wait(10 * UNIT)
        time.sleep(6 * period)  # the engine is held: nothing but keepalives can arrive
        gate.release.set()
        body = held.rest()
    finally:
        gate.release.set()
        held.close()
    head, _, tail = body.partition(b"data:")
    assert 3 <= head.count(b": keepalive") <= 8, head
    assert b": keepalive" not in tail  # 5 tokens come far faster than the period
    events = parse_sse(body)
    assert events[-1][0] == "done" and msgspec.json.decode(events[-1][1])["reason"] in ("stop", "length")
