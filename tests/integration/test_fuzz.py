"""Property-based fuzzing of the frame decoder and of a live server."""

from __future__ import annotations

import asyncio
import math
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tests.helpers.server import UNIT, RunningServer, run
from websockets.asyncio.client import connect

from rtws import protocol as p
from rtws.client import Client

CODES = {c.value for c in p.ErrorCode}

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=20),
)
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=20)
FIELDS = ["id", "prompt", "messages", "model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "priority", "token", "resume"]
frames = st.fixed_dictionaries(
    {"type": st.one_of(st.sampled_from(["generate", "cancel", "hello", "bogus", ""]), values)},
    optional={f: values for f in FIELDS} | {
        "id": st.one_of(st.text(min_size=1, max_size=8), st.integers(-5, 5), values),
        "prompt": st.one_of(st.text(max_size=30), values),
        "max_tokens": st.one_of(st.integers(-3, 8), st.integers(), values),
        "temperature": st.one_of(st.floats(), values),
    },
)


def encode(obj: Any, binary: bool) -> bytes | None:
    try:
        return msgspec.msgpack.encode(obj) if binary else msgspec.json.encode(obj)
    except (TypeError, OverflowError, ValueError, msgspec.EncodeError):
        return None


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_decoder_never_raises_anything_but_protocol_error_on_bytes(data: bytes) -> None:
    for codec in (p.MSGPACK, p.JSON):
        try:
            codec.decode_client(data)
        except p.ProtocolError as e:
            assert e.code.value in CODES


@settings(max_examples=400, deadline=None)
@given(frames, st.booleans())
def test_decoder_classifies_structured_garbage(obj: dict[str, Any], binary: bool) -> None:
    data = encode(obj, binary)
    if data is None:
        return
    codec = p.MSGPACK if binary else p.JSON
    try:
        frame = codec.decode_client(data)
    except p.ProtocolError as e:
        assert e.code.value in CODES
        ftype = (msgspec.msgpack.decode if binary else msgspec.json.decode)(data).get("type")  # as the server saw it
        if not isinstance(ftype, str):
            assert e.code is p.ErrorCode.BAD_FRAME
        elif ftype not in ("generate", "cancel", "hello"):
            assert e.code is p.ErrorCode.UNKNOWN_TYPE
        return
    assert isinstance(frame, (p.Generate, p.Cancel, p.Hello))
    if isinstance(frame, p.Generate):
        assert frame.max_tokens >= 1 and math.isfinite(frame.temperature) and 0 < frame.top_p <= 1


def test_deep_nesting_is_a_clean_error() -> None:
    deep: Any = "x"
    for _ in range(10_000):
        deep = [deep]
    for codec, data in ((p.MSGPACK, b"\x91" * 100_000 + b"\xc0"), (p.JSON, b"[" * 100_000 + b"]" * 100_000)):
        with pytest.raises(p.ProtocolError) as info:
            codec.decode_client(data)
        assert info.value.code in (p.ErrorCode.BAD_FRAME, p.ErrorCode.INVALID_PARAMS)


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir: Path) -> Any:
    from rtws.config import ServerConfig
    from rtws.server import run_in_thread, stop_thread

    cfg = ServerConfig(port=0, model=str(tiny_llama_dir), log_level="CRITICAL", max_tokens_limit=8,
                       max_frame_bytes=64 * 1024)
    server, thread = run_in_thread(cfg)
    yield RunningServer(server, thread)
    stop_thread(server, thread)


async def exchange(url: str, payloads: list[bytes], binary: bool) -> list[Any]:
    sub = p.SUBPROTOCOL_MSGPACK if binary else p.SUBPROTOCOL_JSON
    codec = p.codec_for(sub)
    ws = await connect(url, subprotocols=[sub])  # type: ignore[list-item]
    assert isinstance(codec.decode_any(await ws.recv()), p.Ready)
    for data in payloads:
        await ws.send(data if binary else data.decode("utf-8", "replace"))
    # a sentinel generation: once it is done, every earlier frame has been answered
    await ws.send(codec.encode(p.Generate(id="__sentinel__", prompt="x", max_tokens=1)) if binary
                  else codec.encode(p.Generate(id="__sentinel__", prompt="x", max_tokens=1)).decode())
    out = []
    while True:
        f = codec.decode_any(await asyncio.wait_for(ws.recv(), 20 * UNIT))
        out.append(f)
        if isinstance(f, p.Done) and f.id == "__sentinel__":
            break
    await ws.close()
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.lists(frames, min_size=1, max_size=6), st.booleans())
def test_live_server_answers_every_frame_and_leaks_nothing(fuzz_server: RunningServer,
                                                           objs: list[dict[str, Any]], binary: bool) -> None:
    payloads = [d for d in (encode(o, binary) for o in objs) if d is not None]
    frames_out = run(exchange(fuzz_server.url, payloads, binary))
    for f in frames_out:
        if isinstance(f, p.Error):
            assert f.code in CODES
            assert "Traceback" not in f.message and "rtws/" not in f.message
    # no frame for a generation after its done
    finished: set[Any] = set()
    for f in frames_out:
        if isinstance(f, p.Delta):
            assert f.id not in finished
        elif isinstance(f, p.Done):
            finished.add(f.id)
    engine = fuzz_server.engine()
    deadline = time.monotonic() + 5 * UNIT
    while engine.stats().slots_in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().slots_in_use == 0  # nothing leaked once the socket closed


def test_oversized_and_broken_frames_close_only_that_socket(fuzz_server: RunningServer) -> None:
    async def main() -> tuple[int | None, str]:
        good = await Client.connect(fuzz_server.url)
        s = await good.generate("a", max_tokens=8)
        bad = await connect(fuzz_server.url)
        await bad.recv()
        await bad.send(b"\x00" * (128 * 1024))  # over max_frame_bytes
        try:
            while True:
                await asyncio.wait_for(bad.recv(), 5 * UNIT)
        except Exception:  # noqa: BLE001
            pass
        r = await s.result()
        await good.close()
        return bad.close_code, r.reason

    code, reason = run(main())
    assert code == 1009 and reason in ("length", "stop")


def test_model_fault_mid_batch_over_websocket(fuzz_server: RunningServer) -> None:
    engine = fuzz_server.engine()
    armed: dict[str, Any] = {"on": False, "victim": None}

    def fault(plan: Any) -> None:  # one row at fault: the engine retries its batch mates without it
        if armed["on"] and len(plan.decode) >= 2:
            armed["on"] = False
            armed["victim"] = plan.decode[0].rid
        if armed["victim"] is not None and any(s.rid == armed["victim"] for s in plan.rows()):
            raise RuntimeError("injected fault")

    engine.fault_injector = fault
    try:
        async def main() -> tuple[list[str], str]:
            async with await Client.connect(fuzz_server.url) as c:
                armed["on"] = True
                streams = [await c.generate("a", max_tokens=8, temperature=0.0) for _ in range(3)]
                reasons = []
                for s in streams:
                    reasons.append((await s.result()).reason)
                after = await (await c.generate("a", max_tokens=3, temperature=0.0)).result()
                return reasons, after.reason

        reasons, after = run(main())
    finally:
        engine.fault_injector = None
    assert reasons.count("error") == 1  # the generation at fault ended with reason error, its mates did not...
    assert after in ("length", "stop")  # ...and the engine kept serving


# --------------------------------------------------------------------------- numeric extremes, mixed frame kinds

EXTREME_INTS = [0, 1, -1, 2**31 - 1, 2**31, 2**32, 2**53 + 1, 2**63 - 1, 2**63, 2**64 - 1, -(2**63), 10**30]
EXTREME_FLOATS = [0.0, -0.0, 5e-324, 1e-300, 1.0, 1.0000001, 99.9, 100.0, 100.00001, 1e308,
                  float("inf"), float("-inf"), float("nan")]
numbers = st.one_of(st.sampled_from(EXTREME_INTS), st.sampled_from(EXTREME_FLOATS), st.integers(-5, 600))
numeric_frames = st.fixed_dictionaries(
    {"type": st.sampled_from(["generate", "generate", "generate", "cancel"]),
     "id": st.one_of(st.text(min_size=1, max_size=3), st.sampled_from(EXTREME_INTS))},
    optional={"prompt": st.text(max_size=12), "max_tokens": numbers, "temperature": numbers, "top_p": numbers,
              "top_k": numbers, "seed": numbers, "priority": st.sampled_from(["high", "low", "normal", "urgent"]),
              "stop": st.lists(st.text(max_size=3), max_size=3)},
)


def check_streams(frames_out: list[Any]) -> dict[Any, int]:
    """Per generation id: a done's usage equals the tokens its deltas delivered; nothing follows a done until the
    id is reused. Returns the number of dones per id."""
    tokens: dict[Any, int] = {}
    dones: dict[Any, int] = {}
    for f in frames_out:
        if isinstance(f, p.Delta):
            tokens[f.id] = tokens.get(f.id, 0) + f.tokens
        elif isinstance(f, p.Done):
            assert f.usage.completion_tokens == tokens.pop(f.id, 0), f
            dones[f.id] = dones.get(f.id, 0) + 1
    return dones


async def victim_round(url: str, attack: list[tuple[bytes | str, bool]]) -> tuple[list[Any], list[Any]]:
    """A victim stream on its own socket while another socket sends ``attack`` (each frame with its own kind,
    binary or text, on a msgpack socket). Returns (victim frames, attacker frames)."""
    victim = await connect(url, subprotocols=[p.SUBPROTOCOL_MSGPACK])  # type: ignore[list-item]
    await victim.recv()
    await victim.send(p.MSGPACK.encode(p.Generate(id="victim", prompt="a", max_tokens=8)))
    attacker = await connect(url, subprotocols=[p.SUBPROTOCOL_MSGPACK])  # type: ignore[list-item]
    await attacker.recv()
    for data, _ in attack:
        await attacker.send(data)
    await attacker.send(p.MSGPACK.encode(p.Generate(id="__sentinel__", prompt="x", max_tokens=1)))
    a_out: list[Any] = []
    while True:
        raw = await asyncio.wait_for(attacker.recv(), 20 * UNIT)
        f = p.MSGPACK.decode_any(raw)
        a_out.append(f)
        if isinstance(f, p.Done) and f.id == "__sentinel__":
            break
    await attacker.close()
    v_out: list[Any] = []
    while True:
        f = p.MSGPACK.decode_any(await asyncio.wait_for(victim.recv(), 20 * UNIT))
        v_out.append(f)
        if isinstance(f, p.Done) and f.id == "victim":
            break
    # anything still to come for the victim would arrive before a later sentinel's done
    await victim.send(p.MSGPACK.encode(p.Generate(id="__v_sentinel__", prompt="x", max_tokens=1)))
    while True:
        f = p.MSGPACK.decode_any(await asyncio.wait_for(victim.recv(), 20 * UNIT))
        v_out.append(f)
        if isinstance(f, p.Done) and f.id == "__v_sentinel__":
            break
    await victim.close()
    return v_out, a_out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.lists(st.tuples(numeric_frames, st.booleans()), min_size=1, max_size=6))
def test_numeric_extremes_and_mixed_frame_kinds_never_hurt_a_victim(fuzz_server: RunningServer,
                                                                    objs: list[tuple[dict[str, Any], bool]]) -> None:
    """Extreme numbers (2**63, 2**64-1, inf, nan, 1e308, ...) in every numeric field, each frame sent as binary
    msgpack or as JSON text on the same msgpack socket: every frame is answered with a protocol error or a
    generation; the victim on another socket gets exactly one done with usage equal to the tokens delivered."""
    attack: list[tuple[bytes | str, bool]] = []
    for obj, binary in objs:
        data = encode(obj, binary)
        if data is not None:
            attack.append((data if binary else data.decode("utf-8", "replace"), binary))
    v_out, a_out = run(victim_round(fuzz_server.url, attack))
    assert check_streams(v_out) == {"victim": 1, "__v_sentinel__": 1}
    assert not [f for f in v_out if isinstance(f, p.Error)]
    victim_done = next(f for f in v_out if isinstance(f, p.Done) and f.id == "victim")
    assert victim_done.reason in ("length", "stop")
    check_streams(a_out)
    for f in a_out:
        if isinstance(f, p.Error):
            assert f.code in CODES and f.code != "internal", f
            assert "Traceback" not in f.message
        if isinstance(f, p.Done) and f.id != "__sentinel__":
            assert f.reason != "error", f  # a bad number is refused up front, never a failed engine step
