"""The OpenAI-compatible routes, driven by the official ``openai`` client against a live server.

Responses are checked with ``_strict_response_validation=True``, so they must
parse as the client's own pydantic models (except completion stream chunks,
whose ``finish_reason`` is null mid-stream as in OpenAI's API but not allowed
by the client's type for it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from tests.helpers.http import parse_sse, post
from tests.helpers.server import UNIT, RunningServer

KEY = "sk-test-key"


@pytest.fixture(scope="module")
def srv(tiny_llama_dir: Path) -> Iterator[RunningServer]:
    from rtws.config import ServerConfig
    from rtws.server import run_in_thread

    cfg = ServerConfig(port=0, model=str(tiny_llama_dir), model_name="tiny", log_level="WARNING",
                       api_keys=(KEY,), max_tokens_limit=200, num_slots=8)
    server, thread = run_in_thread(cfg)
    rs = RunningServer(server, thread)
    yield rs
    rs.stop()


def make_client(srv: RunningServer, strict: bool = True, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.http + "/v1", api_key=key, max_retries=0, timeout=10 * UNIT,
                         _strict_response_validation=strict)


@pytest.fixture(scope="module")
def clients(srv: RunningServer) -> Iterator[dict[bool, openai.OpenAI]]:
    made = {True: make_client(srv, True), False: make_client(srv, False)}
    yield made
    for c in made.values():
        c.close()


@pytest.fixture
def client(clients: dict[bool, openai.OpenAI]) -> Any:
    """``client(srv, strict=True)``: a shared client that validates responses against openai's models."""
    return lambda srv, strict=True: clients[strict]


AUTH = {"authorization": f"Bearer {KEY}"}
CHAT = [{"role": "system", "content": "Answer in verse."}, {"role": "user", "content": "Who art thou?"}]


def infer_text(srv: RunningServer, **body: Any) -> dict[str, Any]:
    r = post(srv.http, "/infer", {"stream": False, **body}, AUTH)
    assert r.status == 200, r.body
    out: dict[str, Any] = r.json()
    return out


def test_completions_non_streaming(srv: RunningServer, client: Any) -> None:
    c = client(srv).completions.create(model="tiny", prompt="ROMEO:\n", max_tokens=10, temperature=0)
    assert c.object == "text_completion" and c.id.startswith("cmpl-") and c.model == "tiny" and c.created > 0
    (choice,) = c.choices
    assert choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert c.usage is not None and c.usage.completion_tokens <= 10
    assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    same = infer_text(srv, prompt="ROMEO:\n", max_tokens=10, temperature=0)
    assert choice.text == same["text"] and c.usage.completion_tokens == same["usage"]["completion_tokens"]
    # prompt as a one-element list, stop as a string, default max_tokens (16, as OpenAI's)
    d = client(srv).completions.create(model="tiny", prompt=["ROMEO:\n"], temperature=0, stop="\n\n")
    assert d.usage is not None and d.usage.completion_tokens <= 16


def test_completions_streaming(srv: RunningServer, client: Any) -> None:
    want = client(srv).completions.create(model="tiny", prompt="JULIET:", max_tokens=12, temperature=0)
    stream = client(srv, strict=False).completions.create(model="tiny", prompt="JULIET:", max_tokens=12,
                                                          temperature=0, stream=True,
                                                          stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(ch.object == "text_completion" and ch.id == chunks[0].id for ch in chunks)
    *body, usage_chunk = chunks
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert [ch.choices[0].finish_reason for ch in body[:-1]] == [None] * (len(body) - 1)
    assert body[-1].choices[0].finish_reason == want.choices[0].finish_reason
    assert "".join(ch.choices[0].text for ch in body) == want.choices[0].text
    assert want.usage is not None and usage_chunk.usage.completion_tokens == want.usage.completion_tokens


def test_chat_non_streaming(srv: RunningServer, client: Any) -> None:
    c = client(srv).chat.completions.create(model="tiny", messages=CHAT, max_tokens=8, temperature=0)
    assert c.object == "chat.completion" and c.id.startswith("chatcmpl-")
    (choice,) = c.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert infer_text(srv, messages=CHAT, max_tokens=8, temperature=0)["text"] == choice.message.content
    # max_completion_tokens wins over max_tokens; content parts and the developer role are accepted
    parts = [{"role": "developer", "content": "Be brief."},
             {"role": "user", "content": [{"type": "text", "text": "Who art "}, {"type": "text", "text": "thou?"}]}]
    d = client(srv).chat.completions.create(model="tiny", messages=parts, max_tokens=50,
                                            max_completion_tokens=3)
    assert d.usage is not None and d.usage.completion_tokens <= 3


def test_chat_streaming(srv: RunningServer, client: Any) -> None:
    want = client(srv).chat.completions.create(model="tiny", messages=CHAT, max_tokens=10,
                                               temperature=0)
    stream = client(srv).chat.completions.create(model="tiny", messages=CHAT, max_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(ch.object == "chat.completion.chunk" and ch.id == chunks[0].id for ch in chunks)
    first, *middle, last, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant" and first.choices[0].delta.content == ""
    assert all(ch.choices[0].finish_reason is None for ch in [first, *middle])
    assert last.choices[0].finish_reason == want.choices[0].finish_reason and last.choices[0].delta.content is None
    assert "".join(ch.choices[0].delta.content or "" for ch in middle) == want.choices[0].message.content
    assert usage_chunk.choices == [] and usage_chunk.usage == want.usage


def test_models_list_and_retrieve(srv: RunningServer, client: Any) -> None:
    models = client(srv).models.list()
    (m,) = models.data
    assert m.id == "tiny" and m.object == "model" and m.owned_by == "rtws"
    extra = m.model_extra or {}
    assert extra["ready"] is True and extra["status"] == "warm"
    assert extra["version"] == "1" and extra["default"] is True
    assert extra["context_length"] == 256 and extra["running"] == 0
    assert client(srv).models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError) as info:
        client(srv).models.retrieve("nope")
    assert info.value.code == "unknown_model"


def test_errors_in_openai_shape(srv: RunningServer, client: Any) -> None:
    c = client(srv)
    with pytest.raises(openai.NotFoundError) as nf:
        c.completions.create(model="gpt-9", prompt="x")
    assert nf.value.code == "unknown_model" and nf.value.type == "invalid_request_error"
    assert isinstance(nf.value.body, dict) and set(nf.value.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as br:
        c.completions.create(model="tiny", prompt="x", n=2)
    assert br.value.code == "invalid_params" and "n=1" in br.value.message
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=CHAT, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=CHAT, presence_penalty=1.0)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10_000)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="tiny", prompt=[1, 2, 3])
    with make_client(srv, key="sk-wrong") as wrong, pytest.raises(openai.AuthenticationError) as au:
        wrong.chat.completions.create(model="tiny", messages=CHAT)  # type: ignore[arg-type]
    assert au.value.code == "unauthorized" and au.value.type == "authentication_error"
    r = post(srv.http, "/v1/chat/completions", b"{oops", AUTH)
    assert r.status == 400 and r.json() == {"error": {"message": "request body is not valid JSON",
                                                      "type": "invalid_request_error", "param": None,
                                                      "code": "bad_request"}}


def test_engine_error_mid_stream_raises_api_error(srv: RunningServer, client: Any) -> None:
    engine = srv.engine()

    def boom(plan: Any) -> None:
        raise RuntimeError("secret internal detail")

    engine.fault_injector = boom
    try:
        with pytest.raises(openai.APIError) as info:
            list(client(srv).chat.completions.create(model="tiny", messages=CHAT, stream=True))
        assert "secret" not in str(info.value)
        with pytest.raises(openai.InternalServerError):
            client(srv).completions.create(model="tiny", prompt="x")
        raw = post(srv.http, "/v1/completions", {"model": "tiny", "prompt": "x", "stream": True}, AUTH)
        events = parse_sse(raw.body)
        assert events[-1][1] == "[DONE]" and '"error"' in events[-2][1]
    finally:
        engine.fault_injector = None
    assert client(srv).completions.create(model="tiny", prompt="x", max_tokens=2).choices[0].text is not None


# --------------------------------------------------------------------------- conventions (OpenAI API reference)


def test_errors_name_the_param(srv: RunningServer, client: Any) -> None:
    c = client(srv)
    cases: list[tuple[str, Any]] = [
        ("n", lambda: c.completions.create(model="tiny", prompt="x", n=2)),
        ("n", lambda: c.chat.completions.create(model="tiny", messages=CHAT, n=3)),
        ("logprobs", lambda: c.completions.create(model="tiny", prompt="x", logprobs=2)),
        ("logprobs", lambda: c.chat.completions.create(model="tiny", messages=CHAT, logprobs=True)),
        ("top_logprobs", lambda: c.chat.completions.create(model="tiny", messages=CHAT, top_logprobs=2)),
        ("max_tokens", lambda: c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10_000)),
        ("stream_options", lambda: c.chat.completions.create(model="tiny", messages=CHAT,
                                                             stream_options={"include_usage": True})),
        ("top_p", lambda: c.completions.create(model="tiny", prompt="x", top_p=2)),
    ]
    for param, call in cases:
        with pytest.raises(openai.BadRequestError) as info:
            call()
        err = info.value
        assert err.param == param, (param, err.body)
        assert err.type == "invalid_request_error" and err.code == "invalid_params" and err.message
        assert isinstance(err.body, dict) and set(err.body) == {"message", "type", "param", "code"}
    with pytest.raises(openai.BadRequestError) as info:
        c.chat.completions.create(model="tiny", messages=CHAT, logprobs=True)
    assert "logprobs are not supported" in info.value.message
    # logprobs: false is the default, and accepted
    ok = c.chat.completions.create(model="tiny", messages=CHAT, logprobs=False, max_tokens=2)
    assert ok.choices[0].logprobs is None


def test_seed_and_stop(srv: RunningServer, client: Any) -> None:
    c = client(srv)

    def sample(seed: int) -> str:
        out = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=12, temperature=1.0, seed=seed)
        text: str = out.choices[0].text
        return text

    assert sample(123) == sample(123)  # same seed, same sample
    assert len({sample(s) for s in range(6)}) > 1  # sampling is not greedy
    full = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0).choices[0].text
    stops = [ch for ch in dict.fromkeys(full) if ch.strip()][:2]
    cut = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=0, stop=stops)
    assert cut.choices[0].finish_reason == "stop" and not any(s in cut.choices[0].text for s in stops)
    assert full.startswith(cut.choices[0].text)
    chat = c.chat.completions.create(model="tiny", messages=CHAT, max_completion_tokens=4, seed=7, temperature=0.5)
    assert chat.usage is not None and chat.usage.completion_tokens <= 4


def test_ignore_eos_runs_to_max_tokens(srv: RunningServer, client: Any) -> None:
    c = client(srv)

    def tokens(seed: int, **extra: Any) -> int:
        out = c.completions.create(model="tiny", prompt="ROMEO:", max_tokens=64, temperature=1.0, seed=seed, **extra)
        assert out.usage is not None
        return int(out.usage.completion_tokens)

    early = next((s for s in range(40) if tokens(s) < 64), None)  # a sample that ends on the EOS token
    assert early is not None, "no seed in 0..39 sampled EOS within 64 tokens"
    assert tokens(early, extra_body={"ignore_eos": True}) == 64  # the same sample, EOS ignored (vLLM's extension)
    chat = c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=64, temperature=1.0, seed=early,
                                     extra_body={"ignore_eos": True})
    assert chat.usage is not None and chat.usage.completion_tokens == 64


def test_stream_without_usage_has_no_usage_chunk(srv: RunningServer, client: Any) -> None:
    chunks = list(client(srv).chat.completions.create(model="tiny", messages=CHAT, max_tokens=4, stream=True))
    assert all(ch.usage is None and len(ch.choices) == 1 for ch in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_models_show_weights(srv: RunningServer, client: Any) -> None:
    (m,) = client(srv).models.list().data
    extra = m.model_extra or {}
    assert extra["quantization"] == "none" and extra["dtype"] == "float32"
