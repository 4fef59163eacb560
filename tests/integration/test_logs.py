"""Structured logs: one JSON line per finished generation, lifecycle events, the configured level."""

from __future__ import annotations

import io
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.server import UNIT, ServerFactory, run

from rtws.client import Client
from rtws.logs import JsonFormatter, setup_logging

GENERATION_FIELDS = {"event", "id", "request_id", "session", "model", "version", "client", "transport", "reason",
                     "prompt_tokens", "completion_tokens", "ttft_ms", "total_ms", "queue_ms"}


@pytest.fixture
def json_lines() -> Iterator[io.StringIO]:
    """The ``rtws`` loggers' output at INFO, formatted by :class:`JsonFormatter`, one object per line."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("rtws")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield stream
    logger.removeHandler(handler)
    logger.setLevel(level)


def parse(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_one_json_line_per_generation_and_lifecycle_events(server_factory: ServerFactory, tiny_llama_dir: Path,
                                                         json_lines: io.StringIO) -> None:
    srv = server_factory(tiny_llama_dir, model_name="tiny")

    async def main() -> tuple[str, list[Any]]:
        async with await Client.connect(srv.url) as c:
            assert c.ready is not None
            a = await c.generate("ROMEO:", id="gen-a", max_tokens=6, temperature=0.0)
            b = await c.generate("Hello", id=7, max_tokens=200, temperature=0.0)
            async for _ in b:
                break
            await b.cancel()
            return c.ready.session, [await a.result(), await b.result()]

    session, (ra, rb) = run(main())
    srv.stop(drain=True)
    lines = parse(json_lines.getvalue())  # every line is one JSON object
    assert all({"ts", "time", "level", "logger", "msg"} <= set(line) for line in lines)

    gens = {line["id"]: line for line in lines if line.get("event") == "generation"}
    assert set(gens) == {"gen-a", 7}
    a = gens["gen-a"]
    assert GENERATION_FIELDS <= set(a)
    assert a["level"] == "INFO" and a["logger"] == "rtws.generation"
    assert (a["model"], a["version"], a["transport"], a["session"], a["client"]) == \
        ("tiny", "1", "ws", session, "127.0.0.1")
    assert (a["reason"], a["prompt_tokens"], a["completion_tokens"]) == (ra.reason, ra.prompt_tokens,
                                                                         ra.completion_tokens)
    assert isinstance(a["request_id"], int) and a["request_id"] >= 1
    assert 0 < a["ttft_ms"] <= a["total_ms"] and 0 <= a["queue_ms"] <= a["total_ms"]
    b = gens[7]
    assert (b["reason"], b["completion_tokens"]) == ("cancelled", rb.completion_tokens)
    assert b["request_id"] != a["request_id"] and b["queue_ms"] is None

    events = [line.get("event") for line in lines]
    for event in ("model_loaded", "ready", "listening", "drain_start", "drain_done", "stopped"):
        assert event in events, event
    assert events.index("model_loaded") < events.index("ready") < events.index("generation") \
        < events.index("drain_start") < events.index("stopped")
    loaded = lines[events.index("model_loaded")]
    assert loaded["model"] == "tiny" and loaded["version"] == "1" and loaded["seconds"] >= 0


@pytest.fixture
def restore_logging() -> Iterator[None]:
    names = ("rtws", "uvicorn", "uvicorn.error", "uvicorn.access")
    saved = {n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
             for n in names}
    yield
    for n, (handlers, level, propagate) in saved.items():
        lg = logging.getLogger(n)
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate


@pytest.mark.usefixtures("restore_logging")
@pytest.mark.parametrize("level", ["DEBUG", "INFO", "WARNING", "ERROR"])
def test_setup_logging_honours_the_level(level: str) -> None:
    stream = io.StringIO()
    setup_logging(level, stream)
    log = logging.getLogger("rtws.test")
    for lvl in ("debug", "info", "warning", "error"):
        getattr(log, lvl)("%s message", lvl, extra={"event": f"e_{lvl}", "n": 1})
    lines = parse(stream.getvalue())
    want = ["DEBUG", "INFO", "WARNING", "ERROR"]
    assert [line["level"] for line in lines] == want[want.index(level):]
    for line in lines:
        assert line["msg"] == f"{line['level'].lower()} message" and line["event"] == f"e_{line['level'].lower()}"
        assert line["n"] == 1 and line["logger"] == "rtws.test"


@pytest.mark.slow
def test_rtws_serve_writes_json_lines(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The real entry point: ``python -m rtws serve`` logs JSON to stderr, generations included."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "rtws", "serve", "--model", str(tiny_llama_dir), "--model-name", "tiny",
         "--port", "0", "--log-level", "INFO", "--num-slots", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    lines: queue.Queue[str] = queue.Queue()
    stderr = proc.stderr
    assert stderr is not None
    def pump() -> None:
        for x in stderr:
            lines.put(x)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[dict[str, Any]] = []

    def until(event: str, timeout: float = 60 * UNIT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if not line.strip():
                continue
            obj: dict[str, Any] = json.loads(line)  # nothing but JSON on stderr
            seen.append(obj)
            if obj.get("event") == event:
                return obj

    try:
        port = until("listening")["port"]

        async def main() -> Any:
            async with await Client.connect(f"ws://127.0.0.1:{port}/ws") as c:
                return await (await c.generate("ROMEO:", id="cli", max_tokens=5, temperature=0.0)).result()

        r = run(main())
        gen = until("generation")
        assert gen["id"] == "cli" and gen["completion_tokens"] == r.completion_tokens and gen["model"] == "tiny"
        proc.send_signal(signal.SIGTERM)
        until("stopped")
        assert proc.wait(30 * UNIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10 * UNIT)  # EOF once the process is gone
        stderr.close()
    events = [o.get("event") for o in seen]
    assert events.index("model_loaded") < events.index("ready") < events.index("listening")
    assert "drain_start" in events and "drain_done" in events
    assert all(o["level"] in ("INFO", "WARNING") for o in seen)
