"""rtws.admission: the one admission path, with fake models (no sockets, no torch, no event loop)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

import pytest

from rtws import protocol
from rtws.admission import (
    HTTP_FRONT,
    Admission,
    AdmissionError,
    Request,
    deadline,
    encoder,
    message_dicts,
    record_template,
    sampling,
)
from rtws.http.schemas import InferRequest
from rtws.limits import ClientQuota, RateLimiter


@dataclass
class FakeModel:
    name: str = "m"
    version: str = "2"
    max_prompt_tokens: int = 10
    encoded: list[tuple[Any, Any]] = field(default_factory=list)

    def encode(self, prompt: str | None, messages: list[dict[str, Any]] | None) -> list[int]:
        self.encoded.append((prompt, messages))
        return [1, 2, 3]


class Models:
    def __init__(self, *models: FakeModel) -> None:
        self.by_name = {m.name: m for m in models}

    def get(self, name: str | None) -> FakeModel | None:
        if name is None:
            return next(iter(self.by_name.values()), None)
        return self.by_name.get(name)


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def req(**kw: Any) -> Request:
    base: dict[str, Any] = {"model": None, "prompt": "hi", "messages": None, "max_tokens": 8}
    base.update(kw)
    return Request(**base)


def refusal(adm: Admission, r: Request, key: str = "k", **kw: Any) -> AdmissionError:
    with pytest.raises(AdmissionError) as info:
        adm.admit(r, key, **kw)
    return info.value


def test_admits_into_model_sampling_and_quota() -> None:
    model = FakeModel()
    quota = ClientQuota(None, 2)
    adm = Admission(Models(model), max_tokens=100, quota=quota)
    got = adm.admit(req(seed=7, stop=("x",), temperature=0.5), "client")
    assert got.model is model and got.quota_key == "client"
    assert (got.params.seed, got.params.stop, got.params.temperature, got.params.max_tokens) == (7, ("x",), 0.5, 8)
    assert encoder(model, got.request)() == [1, 2, 3] and model.encoded == [("hi", None)]
    adm.release(got.quota_key)
    adm.release(None)  # a generation admitted without a quota releases nothing


def test_random_seed_when_none_given() -> None:
    seeds = {sampling(req()).seed for _ in range(20)}
    assert len(seeds) > 1 and all(0 <= s < 2**63 for s in seeds)


def test_refusals_carry_the_code_and_status() -> None:
    adm = Admission(Models(FakeModel()), max_tokens=100, chars_per_token=2)
    e = refusal(adm, req(max_tokens=101))
    assert (e.code, e.http_status, e.message) == ("invalid_params", 400, "max_tokens must be <= 100")
    e = refusal(adm, req(model="nope"))
    assert (e.code, e.http_status, e.message) == ("unknown_model", 404, "unknown model 'nope'")
    e = refusal(adm, req(model="nope"), front=HTTP_FRONT)
    assert e.message == "unknown model 'nope'; see GET /v1/models"
    e = refusal(adm, req(prompt="x" * 21))  # 10 prompt tokens x 2 characters
    assert e.code == "invalid_params" and "21 characters" in e.message
    e = refusal(adm, req(), at_capacity=True)
    assert (e.code, e.http_status, e.retry_after, e.metric) == ("overloaded", 503, 1.0, "max_connections")


def test_no_model_loaded_wording_per_front() -> None:
    adm = Admission(Models(), max_tokens=100)
    assert refusal(adm, req(), front=HTTP_FRONT).message == "no model is loaded"
    assert refusal(adm, req()).message == "unknown model 'None'"


def test_rate_limit_then_quota_in_order() -> None:
    clock = Clock()
    quota = ClientQuota(None, 1)
    adm = Admission(Models(FakeModel()), max_tokens=100, rate_limiter=RateLimiter(60, 2, clock=clock), quota=quota)
    first = adm.admit(req(), "a")
    e = refusal(adm, req(), "a")  # a rate token is left, but the quota is full
    assert e.code == "too_many_generations" and e.retry_after == 1.0
    e = refusal(adm, req(), "a")  # the bucket is empty now
    assert e.code == "rate_limited" and e.http_status == 429 and e.retry_after == pytest.approx(1.0)
    adm.release(first.quota_key)
    clock.t = 10.0
    assert adm.admit(req(), "a").quota_key == "a"


def test_a_too_long_prompt_spends_no_rate_token() -> None:
    adm = Admission(Models(FakeModel()), max_tokens=100, chars_per_token=1,
                    rate_limiter=RateLimiter(60, 1, clock=Clock()))
    assert refusal(adm, req(prompt="x" * 11)).code == "invalid_params"
    adm.admit(req(), "k")  # the one token is still there


def test_extra_checks_run_after_the_rate_limit_and_before_the_quota() -> None:
    quota = ClientQuota(None, 5)
    adm = Admission(Models(FakeModel()), max_tokens=100, quota=quota)
    seen: list[str] = []

    def extra(model: Any) -> None:
        seen.append(model.name)
        raise ValueError("transport says no")

    with pytest.raises(ValueError):
        adm.admit(req(), "k", extra=extra)
    assert seen == ["m"]
    assert quota.start_generation("k") is None  # the refused request took no quota


def test_a_frame_is_admitted_as_decoded() -> None:
    model = FakeModel(max_prompt_tokens=100)
    adm = Admission(Models(model), max_tokens=1000)
    frame = protocol.Generate(id="g", messages=[protocol.Message("user", "hi", name="bob"),
                                                protocol.Message("assistant", "yo")], stop=["a", "b"], seed=3)
    got = adm.admit(frame, "k")
    assert (got.params.stop, got.params.seed, got.params.max_tokens) == (("a", "b"), 3, 128)
    encoder(model, got.request)()  # the turns become dicts in the tokenizer thread
    assert model.encoded == [(None, [{"role": "user", "content": "hi", "name": "bob"},
                                     {"role": "assistant", "content": "yo"}])]
    assert sampling(InferRequest(prompt="x", stop="x")).stop == ("x",)  # /infer's single stop string
    assert message_dicts([{"role": "user", "content": "x"}]) == [{"role": "user", "content": "x"}]


def test_request_problem_is_shared_by_frames_and_bodies() -> None:
    assert protocol.request_problem(None, None, 1.0, 1.0) == "exactly one of 'prompt' or 'messages' is required"
    assert protocol.request_problem(None, [], 1.0, 1.0) == "'messages' must not be empty"
    assert protocol.request_problem(None, [], 1.0, 1.0, conversation="c") is None
    assert protocol.request_problem("x", None, float("nan"), 1.0) == "temperature and top_p must be finite"


def test_deadline_and_record_template() -> None:
    assert deadline(5.0, None) is None and deadline(5.0, 0) is None and deadline(5.0, 2.5) == 7.5
    rec = record_template(FakeModel(), "g", client="c", session="s", transport="ws").finish(
        request_id=4, reason="stop", prompt_tokens=3, completion_tokens=2, started=1.0, first_at=1.25, now=2.0,
        queue_s=None)
    assert (rec.model, rec.version, rec.ttft_s, rec.total_s, rec.transport) == ("m", "2", 0.25, 1.0, "ws")


def test_admission_is_pure() -> None:
    code = ("import sys, rtws.admission\n"
            "bad = sorted(m for m in ('torch', 'transformers', 'uvicorn', 'asyncio') if m in sys.modules)\n"
            "assert not bad, bad\nprint('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
