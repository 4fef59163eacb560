"""Model registry over real servers: hot-swap under load, failed swaps, add/remove by name, admin auth, readyz."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from tests.helpers.models import build_model
from tests.helpers.server import UNIT, RunningServer, ServerFactory, run

from rtws.client import Client, GenerationError
from rtws.model import ModelSpec
from rtws.registry import SwapError

ADMIN = "admin-secret"
PROMPT = "ROMEO:"


@pytest.fixture(scope="session")
def tiny_llama_v2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same architecture and tokenizer as ``tiny_llama_dir``, other random weights: a "version 2"."""
    return build_model(tmp_path_factory.mktemp("tiny-llama-v2"), "llama", seed=1)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def rtws_logs() -> Iterator[list[logging.LogRecord]]:
    """Every record the ``rtws`` loggers emit at INFO and above, from any thread, in order."""
    logger = logging.getLogger("rtws")
    handler, level = _Records(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.records
    logger.removeHandler(handler)
    logger.setLevel(level)


def http(base: str, method: str, path: str, body: Any = None, key: str | None = ADMIN,
         raw: bytes | None = None) -> tuple[int, Any, dict[str, str]]:
    """One blocking HTTP request. Returns (status, decoded JSON or text, headers)."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(base + path, method=method, data=data)
    if key is not None:
        req.add_header("Authorization", f"Bearer {key}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=30 * UNIT) as r:
            status, payload, headers = r.status, r.read(), dict(r.headers)
    except urllib.error.HTTPError as e:
        status, payload, headers = e.code, e.read(), dict(e.headers)
    text = payload.decode()
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text, headers


async def ahttp(base: str, method: str, path: str, body: Any = None, key: str | None = ADMIN) -> tuple[int, Any]:
    status, payload, _ = await asyncio.to_thread(http, base, method, path, body, key)
    return status, payload


def wait_status(srv: RunningServer, name: str, version: str, until: Callable[[str], bool],
                timeout: float = 60 * UNIT, key: str = ADMIN) -> dict[str, Any]:
    """Poll the admin status URL (there is no event to await over HTTP) until ``until(status)``."""
    deadline = time.monotonic() + timeout
    while True:
        code, st, _ = http(srv.http, "GET", f"/admin/models/{name}/versions/{version}", key=key)
        assert code == 200, st
        if until(st["status"]) or time.monotonic() > deadline:
            return st  # type: ignore[no-any-return]
        time.sleep(0.02)


async def until(cond: Callable[[], bool], timeout: float = 30 * UNIT) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met")
        await asyncio.sleep(0.01)


def on_loop(srv: RunningServer, coro: Any, timeout: float = 60 * UNIT) -> Any:
    """Run a coroutine on the server's own event loop (the registry's Python API lives there)."""
    return asyncio.run_coroutine_threadsafe(coro, srv.server._loop).result(timeout)


def metric_samples(srv: RunningServer, key: str | None = None) -> list[Any]:
    keys = srv.app.config.metrics_api_keys or srv.app.config.api_keys  # /metrics needs a key when auth is on
    code, text, _ = http(srv.http, "GET", "/metrics", key=key if key is not None else (keys[0] if keys else None))
    assert code == 200
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples]


def engine_threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == f"rtws-engine-{name}"]


# ---------------------------------------------------------------------- hot swap


def test_hot_swap_under_load_loses_no_generation(server_factory: ServerFactory, tiny_llama_dir: Path,
                                                 tiny_llama_v2_dir: Path,
                                                 rtws_logs: list[logging.LogRecord]) -> None:
    srv = server_factory(tiny_llama_dir, model_name="tiny", num_slots=8, admin_api_keys=(ADMIN,))
    v1 = srv.app.registry.get("tiny")
    assert v1.version == "1" and v1.engine.running

    async def main() -> tuple[list[tuple[Any, int]], list[int], Any, int]:
        stop = asyncio.Event()
        results: list[tuple[Any, int]] = []  # (Result, tokens counted from its deltas)

        async def client() -> None:
            async with await Client.connect(srv.url) as c:
                async def worker() -> None:
                    while not stop.is_set():
                        s = await c.generate(PROMPT, max_tokens=48, temperature=0.0)
                        results.append((await s.result(), s.tokens))

                await asyncio.gather(worker(), worker())

        clients = [asyncio.create_task(client()) for _ in range(3)]  # six generations in flight
        await until(lambda: len(results) >= 6)
        code, accepted = await ahttp(srv.http, "POST", "/admin/models/tiny/versions",
                                     {"version": "2", "model_path": str(tiny_llama_v2_dir)})
        assert code == 202, accepted
        assert accepted["status"] == "loading" and accepted["status_url"] == "/admin/models/tiny/versions/2"
        ready: list[int] = []
        while True:
            ready.append((await ahttp(srv.http, "GET", "/readyz", key=None))[0])
            code, st = await ahttp(srv.http, "GET", accepted["status_url"])
            if st["status"] != "loading":
                break
        assert st["status"] == "warm", st
        at_swap = len(results)
        while (await ahttp(srv.http, "GET", "/admin/models/tiny/versions/1"))[1]["status"] != "unloaded":
            await asyncio.sleep(0.02)
        await until(lambda: len(results) >= at_swap + 6)
        stop.set()
        await asyncio.wait_for(asyncio.gather(*clients), 30 * UNIT)
        async with await Client.connect(srv.url) as c:
            after = await (await c.generate(PROMPT, max_tokens=48, temperature=0.0)).result()
        return results, ready, after, at_swap

    results, ready, after, at_swap = run(main())

    # No failed or truncated generation: every one ended normally, and its usage matches what it streamed.
    assert len(results) >= at_swap + 6
    for r, streamed in results:
        assert r.reason in ("length", "stop"), r
        assert r.completion_tokens == streamed
        assert r.reason != "length" or r.completion_tokens == 48
    # Greedy output is a function of the weights: every text is v1's or v2's, and new requests get v2's.
    v1_text = results[0][0].text
    assert after.text != v1_text
    assert {r.text for r, _ in results} <= {v1_text, after.text}
    assert all(code == 200 for code in ready)  # the old version kept the server ready during the load
    # The old version drained, then its engine thread stopped; the registry routes to v2.
    assert not v1.engine.running
    assert srv.app.registry.get("tiny").version == "2"
    assert len(engine_threads("tiny")) == 1
    code, models, _ = http(srv.http, "GET", "/admin/models")
    versions = {v["version"]: v["status"] for v in models["models"][0]["versions"]}
    assert versions == {"1": "unloaded", "2": "warm"}

    events = [getattr(r, "event", None) for r in rtws_logs]
    assert {"swap_started", "swap_finished", "model_unloaded"} <= set(events)
    swapped = events.index("swap_finished")
    gens = [(i, r.version) for i, r in enumerate(rtws_logs)  # type: ignore[attr-defined]
            if getattr(r, "event", None) == "generation"]
    assert any(v == "1" and i > swapped for i, v in gens)  # in flight at the swap, finished on v1
    assert any(v == "2" for _, v in gens)
    served = {s.labels["version"]: s.value for s in metric_samples(srv)
              if s.name == "rtws_generations_total" and s.labels["model"] == "tiny"}
    assert served["1"] > 0 and served["2"] > 0
    assert sum(served.values()) == len(results) + 1


def test_failed_swap_keeps_the_old_version_serving(server_factory: ServerFactory, tiny_llama_dir: Path,
                                                   tiny_llama_v2_dir: Path, tmp_path: Path) -> None:
    # No admin_api_keys: the admin API falls back to the API keys.
    srv = server_factory(tiny_llama_dir, model_name="tiny", api_keys=("user-key",))
    missing = tmp_path / "no-such-model"
    code, accepted, headers = http(srv.http, "POST", "/admin/models/tiny/versions",
                                   {"version": "2", "model_path": str(missing)}, key="user-key")
    assert code == 202 and headers["location"] == "/admin/models/tiny/versions/2"
    st = wait_status(srv, "tiny", "2", lambda s: s != "loading", key="user-key")
    assert st["status"] == "failed" and st["reason"], st
    assert str(missing) in st["reason"] or "Error" in st["reason"]

    code, models, _ = http(srv.http, "GET", "/admin/models", key="user-key")
    (tiny,) = models["models"]
    assert tiny["version"] == "1" and tiny["status"] == "warm"
    assert [(v["version"], v["status"]) for v in tiny["versions"]] == [("1", "warm"), ("2", "failed")]
    assert http(srv.http, "GET", "/readyz", key=None)[0] == 200

    async def generate() -> Any:
        async with await Client.connect(srv.url, token="user-key") as c:
            return await (await c.generate(PROMPT, max_tokens=8, temperature=0.0)).result()

    assert run(generate()).reason in ("length", "stop")

    # A warm-up failure (through the Python API): the new version loads, but its warm-up generation
    # cannot run (a one-token context). It is stopped; v1 keeps serving.
    spec = dataclasses.replace(ModelSpec.from_config(srv.app.config, name="tiny", path=str(tiny_llama_v2_dir),
                                                      version="3"), max_seq_len=1)
    with pytest.raises(SwapError) as info:
        on_loop(srv, srv.app.registry.swap(spec, srv.app.load_model))
    assert info.value.status.state == "failed" and "PromptError" in (info.value.status.reason or "")
    assert srv.app.registry.get("tiny").version == "1"
    assert len(engine_threads("tiny")) == 1  # the failed version's engine was stopped
    st = wait_status(srv, "tiny", "3", lambda s: True, key="user-key")
    assert st["status"] == "failed" and "PromptError" in st["reason"]
    assert run(generate()).reason in ("length", "stop")

    # Swapping to the version that already serves is a conflict, not a reload.
    code, err, _ = http(srv.http, "POST", "/admin/models/tiny/versions",
                        {"version": "1", "model_path": str(tiny_llama_dir)}, key="user-key")
    assert code == 409 and err["error"]["code"] == "conflict"


def test_add_and_remove_a_model_by_name(server_factory: ServerFactory, tiny_llama_dir: Path,
                                        tiny_gpt2_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir, model_name="tiny", admin_api_keys=(ADMIN,))
    h = srv.http
    # Bad requests are refused with a reason and change nothing.
    bad: list[tuple[str, str, Any, int]] = [
        ("POST", "/admin/models", {}, 400),
        ("POST", "/admin/models", {"name": "bad name", "model_path": "x"}, 400),
        ("POST", "/admin/models", {"name": "gpt", "model_path": "x", "colour": "red"}, 400),
        ("POST", "/admin/models", {"name": "gpt", "model_path": "x", "device": "tpu"}, 400),
        ("POST", "/admin/models", {"name": "gpt", "model_path": "x", "dtype": "int3"}, 400),
        ("POST", "/admin/models", {"name": "gpt", "model_path": ""}, 400),
        ("POST", "/admin/models", {"name": "tiny", "model_path": "x"}, 409),
        ("POST", "/admin/models/tiny/versions", {"version": "a/b", "model_path": "x"}, 400),
        ("POST", "/admin/models/nope/versions", {"version": "2", "model_path": "x"}, 404),
        ("GET", "/admin/models/nope", None, 404),
        ("GET", "/admin/models/tiny/versions/9", None, 404),
        ("DELETE", "/admin/models/nope", None, 404),
        ("GET", "/admin/elsewhere", None, 404),
        ("DELETE", "/admin/models", None, 405),
    ]
    for method, path, body, want in bad:
        code, err, _ = http(h, method, path, body)
        assert code == want, (method, path, body, code, err)
        assert set(err["error"]) == {"code", "message"} and "Traceback" not in err["error"]["message"]
    code, err, _ = http(h, "POST", "/admin/models", raw=b"{not json")
    assert code == 400 and err["error"]["code"] == "invalid_params"
    code, err, _ = http(h, "POST", "/admin/models", raw=b"x" * (65 * 1024))
    assert code == 413
    assert [v["version"] for v in http(h, "GET", "/admin/models")[1]["models"][0]["versions"]] == ["1"]

    code, accepted, _ = http(h, "POST", "/admin/models", {"name": "gpt", "model_path": str(tiny_gpt2_dir)})
    assert code == 202 and accepted["status_url"] == "/admin/models/gpt/versions/1"
    assert wait_status(srv, "gpt", "1", lambda s: s != "loading")["status"] == "warm"

    code, listing, _ = http(h, "GET", "/admin/models")
    assert listing["default"] == "tiny"
    health = {m["name"]: m for m in listing["models"]}
    assert list(health) == ["tiny", "gpt"]
    gpt = health["gpt"]
    assert {k: gpt[k] for k in ("version", "status", "default", "running", "waiting", "slots_in_use")} == \
        {"version": "1", "status": "warm", "default": False, "running": 0, "waiting": 0, "slots_in_use": 0}
    assert gpt["num_slots"] == srv.app.config.num_slots
    assert http(h, "GET", "/admin/models/gpt")[1] == gpt
    assert http(h, "GET", "/readyz", key=None)[1] == {"ready": True, "models": {"tiny": True, "gpt": True}}

    async def generate(model: str) -> Any:
        async with await Client.connect(srv.url) as c:
            assert c.ready is not None and model in c.ready.models
            return await (await c.generate(PROMPT, model=model, max_tokens=6, temperature=0.0)).result()

    assert run(generate("gpt")).reason in ("length", "stop")

    code, removed, _ = http(h, "DELETE", "/admin/models/gpt")
    assert code == 202 and removed["status_url"] == "/admin/models/gpt/versions/1"
    assert wait_status(srv, "gpt", "1", lambda s: s == "unloaded")["status"] == "unloaded"
    assert engine_threads("gpt") == []
    assert [m["name"] for m in http(h, "GET", "/admin/models")[1]["models"]] == ["tiny"]
    assert http(h, "GET", "/readyz", key=None)[1] == {"ready": True, "models": {"tiny": True}}

    async def unknown() -> str:
        async with await Client.connect(srv.url) as c:
            with pytest.raises(GenerationError) as info:
                await (await c.generate(PROMPT, model="gpt", max_tokens=6)).result()
            return info.value.code

    assert run(unknown()) == "unknown_model"

    # The name can be added again; removing the last model makes the server unready.
    code, _, _ = http(h, "POST", "/admin/models", {"name": "gpt", "model_path": str(tiny_gpt2_dir), "version": "7"})
    assert code == 202
    assert wait_status(srv, "gpt", "7", lambda s: s != "loading")["status"] == "warm"
    for name in ("gpt", "tiny"):
        assert http(h, "DELETE", f"/admin/models/{name}")[0] == 202
    code, body, _ = http(h, "GET", "/readyz", key=None)
    assert code == 503 and body == {"ready": False, "models": {}}
    assert on_loop(srv, srv.app.registry.settle(30 * UNIT))
    assert engine_threads("gpt") == [] and engine_threads("tiny") == []


def test_admin_api_needs_an_admin_key(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    open_srv = server_factory(tiny_llama_dir)  # no keys configured at all: the admin API is never open
    for key in (None, "anything"):
        for method, path, body in (("GET", "/admin/models", None),
                                   ("POST", "/admin/models", {"name": "x", "model_path": "y"})):
            code, err, _ = http(open_srv.http, method, path, body, key=key)
            assert code == 403 and err["error"]["code"] == "forbidden"

    srv = server_factory(tiny_llama_dir, api_keys=("user-key",), admin_api_keys=(ADMIN,))
    for key in (None, "user-key", "wrong", ""):
        code, err, headers = http(srv.http, "GET", "/admin/models", key=key)
        assert code == 401 and err["error"]["code"] == "unauthorized", key
        assert headers["www-authenticate"].startswith("Bearer")
        code, _, _ = http(srv.http, "POST", "/admin/models/x/versions", {"version": "2", "model_path": "y"}, key=key)
        assert code == 401
    code, listing, _ = http(srv.http, "GET", "/admin/models", key=ADMIN)
    assert code == 200 and [m["name"] for m in listing["models"]] == [srv.app.registry.default_name]
    rejected = [s for s in metric_samples(srv, key="user-key") if s.name == "rtws_rejected_total"]
    assert {s.labels["code"]: s.value for s in rejected}["admin_unauthorized"] == 8


def test_shutdown_stops_a_draining_version(server_factory: ServerFactory, tiny_llama_long_dir: Path,
                                           tiny_llama_v2_dir: Path) -> None:
    srv = server_factory(tiny_llama_long_dir, model_name="tiny")
    v1 = srv.app.registry.get("tiny")
    spec = ModelSpec.from_config(srv.app.config, name="tiny", path=str(tiny_llama_v2_dir), version="2")

    async def main() -> str:
        async with await Client.connect(srv.url) as c:
            long = await c.generate(PROMPT, max_tokens=4000, temperature=0.0)
            async for _ in long:
                break
            st = await asyncio.to_thread(on_loop, srv, srv.app.registry.swap(spec, srv.app.load_model))
            assert st.state == "warm"
            draining = srv.app.registry.status("tiny", "1")
            assert draining is not None and draining.state == "draining"  # the long generation holds it
            await asyncio.to_thread(srv.stop)
            state: str = draining.state
            return state

    assert run(main()) == "unloaded"
    assert not srv.thread.is_alive()
    assert not v1.engine.running and engine_threads("tiny") == []
