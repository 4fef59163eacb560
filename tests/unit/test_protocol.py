"""Protocol v1 codecs: pure, no server, no loop."""

from __future__ import annotations

import msgspec
import pytest

from rtws import protocol as p

ALL_FRAMES: list[p.AnyFrame] = [
    p.Hello(),
    p.Hello(token="secret", resume="abc"),
    p.Generate(id="a", prompt="ROMEO:\n"),
    p.Generate(id=7, messages=[p.Message(role="user", content="hi", name="Romeo")], model="m", max_tokens=5,
               temperature=0.0, top_p=0.5, top_k=3, seed=42, stop=["\n\n"], priority="high"),
    p.Cancel(id="a"),
    p.Ready(session="s", models=["m"], limits=p.Limits(max_generations=64, max_tokens=4096, max_prompt_tokens=255,
                                                       max_frame_bytes=1 << 20)),
    p.Delta(id="a", seq=0, text="h\u00e9llo \U0001F600", tokens=3),
    p.Done(id="a", reason="cancelled", usage=p.Usage(prompt_tokens=4, completion_tokens=3)),
    p.Error(code="unknown_id", message="no live generation 'x'", id="x"),
    p.Error(code="rate_limited", message="slow down", retry_after=1.5),
]


@pytest.mark.parametrize("codec", [p.MSGPACK, p.JSON], ids=["msgpack", "json"])
@pytest.mark.parametrize("frame", ALL_FRAMES, ids=lambda f: type(f).__name__)
def test_every_frame_round_trips(codec: p.Codec, frame: p.AnyFrame) -> None:
    data = codec.encode(frame)
    assert codec.decode_any(data) == frame
    raw = (msgspec.msgpack.decode if codec.binary else msgspec.json.decode)(data)
    assert raw["type"] == frame.__struct_config__.tag


@pytest.mark.parametrize("codec", [p.MSGPACK, p.JSON], ids=["msgpack", "json"])
def test_client_frames_decode_as_client_frames(codec: p.Codec) -> None:
    for frame in ALL_FRAMES[:5]:
        assert codec.decode_client(codec.encode(frame)) == frame


def _enc(codec: p.Codec, obj: object) -> bytes:
    return msgspec.msgpack.encode(obj) if codec.binary else msgspec.json.encode(obj)


BAD = [
    ("not-encoded", None, p.ErrorCode.BAD_FRAME),
    ("list", [1, 2], p.ErrorCode.BAD_FRAME),
    ("no type", {"id": "a"}, p.ErrorCode.BAD_FRAME),
    ("type not str", {"type": 3}, p.ErrorCode.BAD_FRAME),
    ("unknown type", {"type": "launch"}, p.ErrorCode.UNKNOWN_TYPE),
    ("missing id", {"type": "generate", "prompt": "x"}, p.ErrorCode.INVALID_PARAMS),
    ("wrong type", {"type": "generate", "id": "a", "prompt": "x", "max_tokens": "9"}, p.ErrorCode.INVALID_PARAMS),
    ("negative", {"type": "generate", "id": "a", "prompt": "x", "max_tokens": -1}, p.ErrorCode.INVALID_PARAMS),
    ("top_p 0", {"type": "generate", "id": "a", "prompt": "x", "top_p": 0.0}, p.ErrorCode.INVALID_PARAMS),
    ("no prompt", {"type": "generate", "id": "a"}, p.ErrorCode.INVALID_PARAMS),
    ("both prompts", {"type": "generate", "id": "a", "prompt": "x", "messages": [{"role": "user", "content": "y"}]},
     p.ErrorCode.INVALID_PARAMS),
    ("bad priority", {"type": "generate", "id": "a", "prompt": "x", "priority": "urgent"},
     p.ErrorCode.INVALID_PARAMS),
    ("bool id", {"type": "cancel", "id": True}, p.ErrorCode.INVALID_PARAMS),
    ("empty id", {"type": "cancel", "id": ""}, p.ErrorCode.INVALID_PARAMS),
    ("long id", {"type": "cancel", "id": "x" * 200}, p.ErrorCode.INVALID_PARAMS),
]


@pytest.mark.parametrize("codec", [p.MSGPACK, p.JSON], ids=["msgpack", "json"])
@pytest.mark.parametrize(("name", "obj", "code"), BAD, ids=[b[0] for b in BAD])
def test_bad_frames_get_the_documented_code(codec: p.Codec, name: str, obj: object, code: p.ErrorCode) -> None:
    data = b"\xc1\xff{" if obj is None else _enc(codec, obj)
    with pytest.raises(p.ProtocolError) as info:
        codec.decode_client(data)
    assert info.value.code is code
    frame = info.value.to_frame()
    assert frame.code == code.value and frame.message


def test_error_keeps_the_generation_id_when_readable() -> None:
    with pytest.raises(p.ProtocolError) as info:
        p.MSGPACK.decode_client(_enc(p.MSGPACK, {"type": "generate", "id": "g1", "prompt": "x", "top_k": -2}))
    assert info.value.id == "g1"


def test_nan_temperature_is_invalid() -> None:
    for codec in (p.MSGPACK, p.JSON):
        data = (msgspec.msgpack.encode({"type": "generate", "id": "a", "prompt": "x", "temperature": float("nan")})
                if codec.binary else b'{"type":"generate","id":"a","prompt":"x","temperature":NaN}')
        with pytest.raises(p.ProtocolError) as info:
            codec.decode_client(data)
        assert info.value.code in (p.ErrorCode.INVALID_PARAMS, p.ErrorCode.BAD_FRAME)


def test_unknown_fields_are_ignored_for_forward_compatibility() -> None:
    frame = p.MSGPACK.decode_client(_enc(p.MSGPACK, {"type": "cancel", "id": "a", "future_field": [1, 2]}))
    assert frame == p.Cancel(id="a")


def test_subprotocol_choice_defaults_to_msgpack() -> None:
    assert p.choose_subprotocol([]) is None
    assert p.codec_for(None) is p.MSGPACK
    assert p.choose_subprotocol(["x", p.SUBPROTOCOL_JSON]) == p.SUBPROTOCOL_JSON
    assert p.codec_for(p.SUBPROTOCOL_JSON) is p.JSON
