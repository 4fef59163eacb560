"""The seed's Python API (InferenceServer, ModelConfig): validation, configuration sources, lifecycle."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from tests.helpers.server import UNIT, run

from rtws import InferenceServer, ModelConfig
from rtws.config import ServerConfig


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """InferenceServer.start() configures rtws's and uvicorn's loggers (as a server should); undo it."""
    names = ("rtws", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = [(lg, lg.handlers[:], lg.level, lg.propagate) for lg in map(logging.getLogger, names)]
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


# --------------------------------------------------------------------------- ModelConfig


@pytest.mark.parametrize("kwargs,field", [
    ({"name": ""}, "name"),
    ({"name": "   "}, "name"),
    ({"model_path": ""}, "model_path"),
    ({"version": ""}, "version"),
    ({"device": "tpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"dtype": "float64"}, "dtype"),
    ({"quantization": "int3"}, "quantization"),
    ({"quantization": "gptq"}, "quantization"),
    ({"warmup": "yes"}, "warmup"),
])
def test_model_config_rejects_bad_values_naming_the_field(kwargs: dict[str, Any], field: str) -> None:
    base = {"name": "m", "model_path": "/models/m"}
    with pytest.raises(ValueError) as info:
        ModelConfig(**{**base, **kwargs})
    assert str(info.value).startswith(field + ":")


def test_model_config_accepts_the_seed_values(tmp_path: Path) -> None:
    m = ModelConfig(name="gpt2", version="1.0.0", model_path=tmp_path, device="cuda")
    assert m.model_path == str(tmp_path) and m.quantization is None and m.warmup is True
    assert ModelConfig(name="m", model_path="x", quantization="none", device="cuda:1", dtype="bf16").dtype == "bf16"
    assert "not supported" in str(pytest.raises(ValueError, ModelConfig, name="m", model_path="x",
                                                quantization="awq").value)
    assert ModelConfig(name="m", model_path="/p", quantization="int8").to_spec(ServerConfig()).quantization == "int8"
    spec = ModelConfig(name="m", model_path="/p", version="3", device="cpu").to_spec(ServerConfig(num_slots=5))
    assert (spec.name, spec.path, spec.version, spec.device, spec.num_slots) == ("m", "/p", "3", "cpu", 5)
    assert ModelConfig(name="m", model_path="/p").to_spec(ServerConfig(device="cuda:1")).device == "cuda:1"


# --------------------------------------------------------------------------- InferenceServer configuration


def test_seed_defaults_and_explicit_arguments() -> None:
    s = InferenceServer(env={})
    c = s.config
    assert (c.max_connections, c.request_timeout, c.max_batch_size, c.max_batch_wait_ms) == (256, 30.0, 32, 50.0)
    assert (c.enable_metrics, c.log_level, c.rate_limit_per_minute) == (True, "INFO", 1000)
    t = InferenceServer(max_connections=8, request_timeout=None, num_slots=4, api_keys=("k",), env={}).config
    assert (t.max_connections, t.request_timeout, t.num_slots, t.api_keys) == (8, None, 4, ("k",))


@pytest.mark.parametrize("kwargs,field", [
    ({"max_connections": 0}, "max_connections"),
    ({"request_timeout": -1.0}, "request_timeout"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_wait_ms": -5}, "max_batch_wait_ms"),
    ({"log_level": "LOUD"}, "log_level"),
    ({"rate_limit_per_minute": 0}, "rate_limit_per_minute"),
    ({"enable_metrics": "yes"}, "enable_metrics"),
    ({"max_conections": 10}, "max_conections"),  # a typo is an unknown field, not silently ignored
    ({"port": 70000}, "port"),
])
def test_invalid_configuration_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError) as info:
        InferenceServer(env={}, **kwargs)
    assert str(info.value).startswith(field + ":")


def test_environment_fills_what_is_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"RTWS_MAX_CONNECTIONS": "7", "RTWS_NUM_SLOTS": "3", "RTWS_REQUEST_TIMEOUT": "none",
           "RTWS_API_KEYS": "a, b", "RTWS_ENABLE_METRICS": "false"}
    c = InferenceServer(env=env).config
    assert (c.max_connections, c.num_slots, c.request_timeout, c.api_keys, c.enable_metrics) == \
        (7, 3, None, ("a", "b"), False)
    assert c.max_batch_size == 32  # not in the environment: the seed default
    assert InferenceServer(env=env, max_connections=9, num_slots=2).config.max_connections == 9  # explicit wins
    with pytest.raises(ValueError, match="^max_connections:"):
        InferenceServer(env={"RTWS_MAX_CONNECTIONS": "lots"})
    with pytest.raises(ValueError, match="^max_connections:"):
        InferenceServer(env={"RTWS_MAX_CONNECTIONS": "0"})
    monkeypatch.setenv("RTWS_MAX_BATCH_SIZE", "5")  # the real environment by default
    monkeypatch.setenv("RTWS_LOG_LEVEL", "DEBUG")
    c = InferenceServer().config
    assert c.max_batch_size == 5 and c.log_level == "DEBUG"


def test_register_model_rules(tmp_path: Path) -> None:
    s = InferenceServer(env={})
    s.register_model(ModelConfig(name="a", model_path=str(tmp_path)))
    with pytest.raises(ValueError, match="^name:"):
        s.register_model(ModelConfig(name="a", model_path=str(tmp_path)))
    with pytest.raises(TypeError):
        s.register_model({"name": "b", "model_path": "x"})
    assert [m.name for m in s.models] == ["a"]


def test_serve_help_lists_every_setting() -> None:
    out = subprocess.run([sys.executable, "-m", "rtws", "serve", "--help"], capture_output=True, text=True,
                         timeout=60 * UNIT)
    assert out.returncode == 0, out.stderr
    for f in fields(ServerConfig):
        assert "--" + f.name.replace("_", "-") in out.stdout, f.name
        assert "RTWS_" + f.name.upper() in out.stdout, f.name


# --------------------------------------------------------------------------- lifecycle


async def infer(base: str, **body: Any) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.post(base + "/infer", json={"stream": False, **body}) as r:
            return r.status, msgspec.json.decode(await r.read())


def test_async_with_serves_several_models_and_stops(tiny_llama_dir: Path, tiny_gpt2_dir: Path) -> None:
    async def main() -> None:
        server = InferenceServer(port=0, log_level="WARNING", env={})
        server.register_model(ModelConfig(name="llama", version="2.0", model_path=str(tiny_llama_dir)))
        server.register_model(ModelConfig(name="gpt2", model_path=str(tiny_gpt2_dir), warmup=False, device="cpu"))
        async with server:
            assert server.started and server.port
            base = f"http://127.0.0.1:{server.port}"
            for name in ("llama", "gpt2"):
                status, doc = await infer(base, model=name, prompt="ROMEO:", max_tokens=3)
                assert status == 200 and doc["model"] == name and doc["usage"]["completion_tokens"] <= 3
            status, doc = await infer(base, prompt="ROMEO:", max_tokens=2)
            assert status == 200 and doc["model"] == "llama"  # the first registered model is the default
            async with aiohttp.ClientSession() as session, session.get(base + "/v1/models") as r:
                cards = {m["id"]: m for m in msgspec.json.decode(await r.read())["data"]}
            assert cards["llama"]["version"] == "2.0" and cards["gpt2"]["ready"] is True
            with pytest.raises(RuntimeError):
                server.register_model(ModelConfig(name="late", model_path="x"))
            app = server.app
        assert not server.started and not app.started  # shut down: engines stopped, lifespan done
        assert all(not m.engine.running for m in app.registry.models())
        with pytest.raises(RuntimeError, match="already ran"):
            await server.start()
        await server.stop()  # idempotent

    run(asyncio.wait_for(main(), 120 * UNIT))


def test_start_serves_until_stop_and_drains(tiny_llama_dir: Path) -> None:
    async def main() -> None:
        server = InferenceServer(log_level="WARNING", warmup=False, env={})
        server.register_model(ModelConfig(name="m", model_path=str(tiny_llama_dir)))
        task = asyncio.create_task(server.start(host="127.0.0.1", port=0))
        await server.wait_started(60 * UNIT)
        base = f"http://127.0.0.1:{server.port}"
        status, _ = await infer(base, prompt="x", max_tokens=2)
        assert status == 200 and not task.done()
        async with aiohttp.ClientSession() as session:
            async with session.post(base + "/infer", json={"prompt": "x", "max_tokens": 40}) as r:
                first = await r.content.readline()  # a stream is running ...
                assert first.startswith(b"data: ")
                stopping = asyncio.create_task(server.stop(timeout=30 * UNIT))
                rest = await r.read()  # ... and the drain lets it finish
        assert b"event: done" in rest and b'"cancelled"' not in rest
        await stopping
        await asyncio.wait_for(task, 30 * UNIT)  # start() returned once stopped
        assert server.app.draining and not server.started

    run(asyncio.wait_for(main(), 120 * UNIT))


def test_startup_failures_raise(tmp_path: Path) -> None:
    async def bad_model() -> None:
        server = InferenceServer(port=0, log_level="CRITICAL", env={})
        server.register_model(ModelConfig(name="m", model_path=str(tmp_path / "missing")))
        with pytest.raises(RuntimeError, match="failed to start"):
            async with server:
                pass

    run(asyncio.wait_for(bad_model(), 60 * UNIT))

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        server = InferenceServer(log_level="CRITICAL", env={})
        with pytest.raises(OSError):  # before any model is loaded
            run(asyncio.wait_for(server.start(host="127.0.0.1", port=busy.getsockname()[1]), 10 * UNIT))
    finally:
        busy.close()
