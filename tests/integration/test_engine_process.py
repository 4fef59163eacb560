"""The engine in its own process (``--engine-process``): same tokens, same front door, and a child that dies or
outlives nobody. Real servers on port 0, real child interpreters (``python -m rtws.engine_child``)."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.request
from pathlib import Path

import pytest
from tests.helpers.metrics import scrape, total
from tests.helpers.server import UNIT, RunningServer, ServerFactory, run
from tests.integration.test_drain import start_serve

from rtws.client import Client
from rtws.engine_process import ENGINE_PROCESS_MIN_BYTES, RemoteEngine, engine_process_choice, weight_bytes
from rtws.threads import usable_cores

PROMPTS = ["a", "bb bb", "ccc ccc ccc", "dddd " * 6, "e", "ff ff ff ff ff ff ff ff ff ff ff ff"]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (not yet reaped by its parent) is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return not _alive(pid)


async def _texts(url: str, max_tokens: int = 24) -> list[str]:
    async with await Client.connect(url) as c:
        streams = []
        for p in PROMPTS:  # staggered: each joins a running batch
            streams.append(await c.generate(p, max_tokens=max_tokens, temperature=0.0))
            await asyncio.sleep(0.01)
        return [(await s.result()).text for s in streams]


@pytest.fixture
def remote(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> RunningServer:
    return server_factory(tiny_llama_long_dir, engine_process="on")


def test_choice_is_a_pure_function_of_mode_device_cores_and_size() -> None:
    big, small = ENGINE_PROCESS_MIN_BYTES, ENGINE_PROCESS_MIN_BYTES - 1
    assert engine_process_choice("auto", "cpu", 2, big)[0] is True
    assert engine_process_choice("auto", "cpu", 16, None)[0] is True  # a hub id or a benchmark aid
    assert engine_process_choice("auto", "cpu", 1, big)[0] is False
    assert engine_process_choice("auto", "cpu", 2, small)[0] is False
    assert engine_process_choice("auto", "cuda", 16, big)[0] is False
    assert engine_process_choice("on", "cuda", 1, 0)[0] is True
    assert engine_process_choice("off", "cpu", 16, big)[0] is False
    assert "test-sized" in engine_process_choice("auto", "cpu", 2, small)[1]


def test_weight_bytes_counts_weight_files_only(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "tokenizer.json").write_bytes(b"x" * 5000)
    assert weight_bytes(str(tmp_path)) == 1000
    assert weight_bytes("some-org/some-model") is None


def test_greedy_tokens_equal_the_in_process_engine(server_factory: ServerFactory, tiny_llama_long_dir: Path) -> None:
    local = server_factory(tiny_llama_long_dir, engine_process="off")
    remote = server_factory(tiny_llama_long_dir, engine_process="on")
    assert not isinstance(local.engine(), RemoteEngine)
    eng = remote.engine()
    assert isinstance(eng, RemoteEngine) and eng.pid != os.getpid() and _alive(eng.pid)
    want = run(_texts(local.url))
    assert all(want)
    assert run(_texts(remote.url)) == want


def test_cancel_pause_stats_and_metrics_cross_the_process_boundary(remote: RunningServer) -> None:
    eng = remote.engine()

    async def main() -> tuple[int, int, str]:
        async with await Client.connect(remote.url) as c:
            long = await c.generate("x", max_tokens=4000, temperature=0.0)
            n = 0
            async for _ in long:
                n += 1
                if n == 5:
                    await long.cancel()
            short = await c.generate("y", max_tokens=8, temperature=0.0)
            res = await short.result()
            return n, res.completion_tokens, res.reason

    n, tokens, reason = run(main())
    assert n <= 6  # at most one delta in flight after the cancel
    assert (tokens, reason) == (8, "length")
    assert eng.wait_idle(10 * UNIT)
    st = eng.stats()
    assert st.running == 0 and st.waiting == 0 and st.steps > 0 and st.tokens_generated >= 13
    assert st.kv_blocks_used == 0  # the cancelled generation's blocks were freed in the child
    m = scrape(remote)
    assert total(m, "rtws_engine_step_seconds_count") > 0  # the step observer runs on the server side
    assert total(m, "rtws_inter_token_latency_seconds_count") > 0


def test_a_dead_engine_process_fails_its_generations_and_the_server_keeps_answering(remote: RunningServer) -> None:
    eng = remote.engine()

    async def main() -> str:
        async with await Client.connect(remote.url) as c:
            s = await c.generate("x", max_tokens=4000, temperature=0.0)
            async for _ in s:
                break
            os.kill(eng.pid, signal.SIGKILL)
            return (await asyncio.wait_for(s.result(), 30 * UNIT)).reason

    assert run(main()) == "error"  # the stream ends with its one done, not a hang
    assert not eng.running
    with urllib.request.urlopen(remote.http + "/healthz", timeout=10 * UNIT) as r:
        assert r.status == 200

    async def after() -> str:  # new work on the dead engine ends at once, with the same error
        async with await Client.connect(remote.url) as c:
            return (await asyncio.wait_for((await c.generate("y", max_tokens=4)).result(), 10 * UNIT)).reason

    assert run(after()) == "error"
    assert eng.wait_idle(1.0)  # a submit refused for want of a child leaves nothing running


def test_stopping_the_server_reaps_the_engine_process(server_factory: ServerFactory,
                                                       tiny_llama_long_dir: Path) -> None:
    srv = server_factory(tiny_llama_long_dir, engine_process="on")
    pid = srv.engine().pid
    assert run(_texts(srv.url, max_tokens=4))
    srv.stop()
    assert _wait_gone(pid, 15 * UNIT)


def test_a_killed_server_takes_its_engine_process_with_it(tiny_llama_long_dir: Path) -> None:
    proc, _ = start_serve(tiny_llama_long_dir, "--engine-process", "on")
    child: int | None = getattr(proc, "engine_pid", None)
    try:
        assert child is not None and _alive(child)
        proc.send_signal(signal.SIGKILL)  # no drain, no cleanup: only the pipe's end of file tells the child
        proc.wait(10 * UNIT)
        assert _wait_gone(child, 30 * UNIT)
    finally:
        proc.kill()
        proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        if child is not None and _alive(child):
            os.kill(child, signal.SIGKILL)


def test_a_hot_swap_starts_a_new_engine_process_and_reaps_the_old(server_factory: ServerFactory,
                                                                   tiny_llama_long_dir: Path,
                                                                   tmp_path: Path) -> None:
    from tests.helpers.models import build_model
    from tests.integration.test_registry import ADMIN, http, wait_status

    v2_dir = build_model(tmp_path / "v2", "llama", context=8192, eos=False, seed=1)
    srv = server_factory(tiny_llama_long_dir, model_name="tiny", engine_process="on", admin_api_keys=(ADMIN,))
    v1 = srv.engine("tiny")
    before = run(_texts(srv.url, max_tokens=8))
    code, accepted, _ = http(srv.http, "POST", "/admin/models/tiny/versions",
                             {"version": "2", "model_path": str(v2_dir)})
    assert code == 202, accepted
    assert wait_status(srv, "tiny", "2", lambda s: s != "loading")["status"] == "warm"
    wait_status(srv, "tiny", "1", lambda s: s == "unloaded")
    v2 = srv.engine("tiny")
    assert isinstance(v2, RemoteEngine) and v2.pid != v1.pid
    assert _wait_gone(v1.pid, 15 * UNIT) and _alive(v2.pid)
    after = run(_texts(srv.url, max_tokens=8))
    assert all(after) and after != before  # other weights, other greedy text


def _metric(port: int, name: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30 * UNIT) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


async def _burst(port: int, n: int = 24, max_tokens: int = 48) -> int:
    async with await Client.connect(f"ws://127.0.0.1:{port}/ws") as c:
        streams = [await c.generate(PROMPTS[i % len(PROMPTS)], max_tokens=max_tokens, temperature=0.0)
                   for i in range(n)]
        return sum(r.completion_tokens for r in await asyncio.gather(*(s.result() for s in streams)))


@pytest.mark.skipif(usable_cores() < 2, reason="elastic threads borrow a second core")
@pytest.mark.parametrize("elastic", [True, False])
def test_elastic_threads_borrow_the_idle_loop_core_only_when_allowed(tiny_llama_long_dir: Path,
                                                                      elastic: bool) -> None:
    """`rtws serve` with its own thread choice (1 for the forward on 2 cores, the event loop keeps one) and the
    engine in its own process: a burst on one socket, with the rest of the machine idle, runs steps at 2
    threads (``rtws_engine_elastic_steps``); ``--no-elastic-threads`` never does. Bounded: up to 10 bursts,
    since a window in which this machine is busy elsewhere rightly keeps the engine at 1 thread."""
    proc, port = start_serve(tiny_llama_long_dir, "--engine-process", "on",
                             *(() if elastic else ("--no-elastic-threads",)))
    try:
        for _ in range(10 if elastic else 2):
            assert run(_burst(port)) > 0
            time.sleep(0.3)  # an idle window: the spare-core estimate sees the machine quiet
            if elastic and _metric(port, "rtws_engine_elastic_steps_total") > 0:
                break
        steps = _metric(port, "rtws_engine_steps_total")
        borrowed = _metric(port, "rtws_engine_elastic_steps_total")
        assert steps > 0
        assert (0 < borrowed <= steps) if elastic else borrowed == 0
    finally:
        proc.terminate()
        proc.wait(30 * UNIT)
        if proc.stderr is not None:
            proc.stderr.close()
