"""Prometheus metrics over a real server: exact values after a known workload, gauges, the endpoint switch."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import prometheus_client
import pytest
from tests.helpers.metrics import Samples, scrape, total
from tests.helpers.server import UNIT, RunningServer, ServerFactory, run
from websockets.asyncio.client import connect

from rtws import protocol as p
from rtws.client import Client, GenerationError
from rtws.config import ServerConfig
from rtws.server import build_app

PROMPTS = ["ROMEO:", "Hello", "JULIET:\nO", "What light", "a"]


def diff(after: Samples, before: Samples, name: str, **labels: str) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def wait_scrape(srv: RunningServer, cond: Any, timeout: float = 10 * UNIT) -> Samples:
    """Scrape until ``cond(samples)``: engine-thread observations land just after the events they follow."""
    deadline = time.monotonic() + timeout
    while True:
        s = scrape(srv)
        if cond(s) or time.monotonic() > deadline:
            return s
        time.sleep(0.01)


def test_metrics_after_a_known_workload(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir, model_name="tiny", num_slots=4)
    before = scrape(srv)

    async def main() -> tuple[list[Any], Any, Samples]:
        async with await Client.connect(srv.url) as c:
            streams = [await c.generate(prompt, max_tokens=8, temperature=0.0) for prompt in PROMPTS]
            results = [await s.result() for s in streams]
            long = await c.generate("ROMEO:", max_tokens=230, temperature=0.0)
            async for _ in long:
                break
            during = await asyncio.to_thread(scrape, srv)
            await long.cancel()
            cancelled = await long.result()
            with pytest.raises(GenerationError):
                await (await c.generate("Hello", model="nope", max_tokens=4)).result()
        return results, cancelled, during

    results, cancelled, during = run(main())
    assert cancelled.reason == "cancelled" and cancelled.completion_tokens > 0
    assert all(r.reason in ("length", "stop") and r.completion_tokens > 0 for r in results)
    everything = [*results, cancelled]
    # The engine frees the cancelled one's slot at its next step boundary, the server sees the close a bit later.
    after = wait_scrape(srv, lambda s: total(s, "rtws_connections", transport="ws") == 0
                        and total(s, "rtws_requests_running") == 0 and total(s, "rtws_kv_slots_in_use") == 0)

    # Gauges while the long generation ran: one request in the batch, one slot of four held, one session.
    assert total(during, "rtws_requests_running", model="tiny", version="1") == 1
    assert total(during, "rtws_requests_waiting", model="tiny") == 0
    assert total(during, "rtws_kv_slots_in_use", model="tiny") == 1
    assert total(during, "rtws_kv_slots", model="tiny") == 4
    assert total(during, "rtws_live_generations") == 1
    assert total(during, "rtws_connections", transport="ws") == 1
    assert total(during, "rtws_sessions") == 1
    assert total(during, "rtws_model_version", model="tiny", version="1", status="warm") == 1
    # ...and once idle and disconnected.
    assert total(after, "rtws_requests_running") == 0 and total(after, "rtws_kv_slots_in_use") == 0
    assert total(after, "rtws_sessions") == 0

    # Counters: exactly this workload.
    assert diff(after, before, "rtws_generations_started_total", model="tiny", transport="ws") == 6
    finished = {r: diff(after, before, "rtws_generations_total", model="tiny", version="1", reason=r)
                for r in ("length", "stop", "cancelled", "timeout", "error")}
    assert finished["length"] + finished["stop"] == 5 and finished["cancelled"] == 1
    assert finished["timeout"] == finished["error"] == 0
    assert diff(after, before, "rtws_generated_tokens_total", model="tiny") == \
        sum(r.completion_tokens for r in everything)
    assert diff(after, before, "rtws_prompt_tokens_total", model="tiny") == sum(r.prompt_tokens for r in everything)
    assert diff(after, before, "rtws_rejected_total", code="unknown_model") == 1
    assert diff(after, before, "rtws_connections_opened_total") == 1
    # Histograms: one observation per generation (queue time is unknown for a cancelled one).
    assert diff(after, before, "rtws_request_duration_seconds_count", model="tiny", transport="ws") == 6
    assert diff(after, before, "rtws_time_to_first_token_seconds_count", model="tiny") == 6
    assert diff(after, before, "rtws_queue_time_seconds_count", model="tiny") == 5
    assert 0 < diff(after, before, "rtws_time_to_first_token_seconds_sum", model="tiny") < \
        diff(after, before, "rtws_request_duration_seconds_sum", model="tiny")
    for name in ("rtws_request_duration_seconds", "rtws_time_to_first_token_seconds"):
        buckets = sorted(((float(dict(lab)["le"]), v) for (n, lab), v in after.items()
                          if n == name + "_bucket" and dict(lab)["model"] == "tiny"))
        counts = [v for _, v in buckets]
        assert counts == sorted(counts) and buckets[0][0] == 0.001 and buckets[-1] == (float("inf"), counts[-1])
        assert counts[-1] == total(after, name + "_count", model="tiny")


def test_inter_token_latency_counts_every_decoded_token(server_factory: ServerFactory,
                                                       tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir, model_name="tiny", num_slots=4)
    before = scrape(srv)

    async def main() -> list[Any]:
        async with await Client.connect(srv.url) as c:
            streams = [await c.generate("ROMEO:", max_tokens=n, temperature=0.0) for n in (5, 9, 16)]
            return [await s.result() for s in streams]

    results = run(main())
    assert [r.reason for r in results] == ["length"] * 3
    # The first token of each comes from its prefill step; every later one is one inter-token interval.
    want = sum(r.completion_tokens - 1 for r in results)
    after = wait_scrape(srv, lambda s: diff(s, before, "rtws_inter_token_latency_seconds_count",
                                             model="tiny") >= want)
    assert diff(after, before, "rtws_inter_token_latency_seconds_count", model="tiny") == want
    assert diff(after, before, "rtws_inter_token_latency_seconds_sum", model="tiny") > 0
    assert diff(after, before, "rtws_decode_batch_size_sum", model="tiny") == want
    steps = diff(after, before, "rtws_engine_steps_total", model="tiny")
    assert steps == diff(after, before, "rtws_engine_step_seconds_count", model="tiny") >= 15


def test_frames_and_bytes_match_what_the_client_received(server_factory: ServerFactory,
                                                         tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir)
    before = scrape(srv)

    async def main() -> tuple[int, int]:
        frames = nbytes = 0
        async with connect(srv.url, subprotocols=[p.SUBPROTOCOL_JSON]) as ws:  # type: ignore[list-item]
            while True:
                msg = await asyncio.wait_for(ws.recv(), 30 * UNIT)
                frames += 1
                nbytes += len(msg.encode() if isinstance(msg, str) else msg)
                kind = json.loads(msg)["type"]
                if kind == "ready":
                    await ws.send(json.dumps({"type": "generate", "id": "a", "prompt": "Hello", "max_tokens": 12,
                                              "temperature": 0}))
                elif kind == "done":
                    return frames, nbytes

    frames, nbytes = run(main())
    after = scrape(srv)
    assert frames >= 3
    assert diff(after, before, "rtws_frames_sent_total") == frames
    assert diff(after, before, "rtws_sent_bytes_total") == nbytes


def test_rate_limit_rejections_are_counted(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir, rate_limit_per_minute=60, rate_limit_burst=2)

    async def main() -> list[str]:
        codes = []
        async with await Client.connect(srv.url) as c:
            for _ in range(4):
                try:
                    await (await c.generate("Hello", max_tokens=2)).result()
                    codes.append("ok")
                except GenerationError as exc:
                    codes.append(exc.code)
        return codes

    codes = run(main())
    assert codes[:2] == ["ok", "ok"] and "rate_limited" in codes[2:]
    assert total(scrape(srv), "rtws_rejected_total", code="rate_limited") == codes.count("rate_limited")


def test_metrics_can_be_turned_off(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir, enable_metrics=False)
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(srv.http + "/metrics", timeout=30 * UNIT)
    assert info.value.code == 404
    info.value.close()

    async def main() -> str:
        async with await Client.connect(srv.url) as c:
            return (await (await c.generate("Hello", max_tokens=3)).result()).reason

    assert run(main()) in ("length", "stop")  # serving is unaffected


def test_each_app_has_its_own_registry(tiny_llama_dir: Path) -> None:
    cfg = ServerConfig(port=0, model=str(tiny_llama_dir))
    a, b = build_app(cfg), build_app(cfg)  # built, not started: no model loads
    a.hooks.generation_started("m", "ws")
    text_a = prometheus_client.generate_latest(a.hooks.registry).decode()  # type: ignore[attr-defined]
    text_b = prometheus_client.generate_latest(b.hooks.registry).decode()  # type: ignore[attr-defined]
    assert 'rtws_generations_started_total{model="m",transport="ws"} 1.0' in text_a
    assert "rtws_generations_started_total{" not in text_b
    assert "rtws_" not in prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
