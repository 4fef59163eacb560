"""rtws on Ray Serve behind Serve's HAProxy ingress: ``rtws serve-ray --ingress haproxy``, run as a user runs it.

Serve reads its ingress flags when Ray is imported and when the cluster
starts, so this cannot share test_ray.py's in-process cluster: the command runs
in a child process (its own local cluster on 127.0.0.1, one replica that serves
its sockets itself, HAProxy in front), and the tests talk to it over real
sockets. The same client-side checks as behind Serve's proxy
(tests/helpers/ray.py); the SIGTERM drain runs last. Select with ``-m ray``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("ray.serve")

from tests.helpers.ray import (  # noqa: E402
    LOOPBACK,
    check_cancel,
    check_drained,
    check_frame_limit,
    check_infer_sse,
    check_openai_client,
    check_slow_reader_pauses_at_the_window,
    drain_run,
    free_port,
    listeners,
    process_tree,
    resume_after_a_drop,
    session,
)
from tests.helpers.server import UNIT  # noqa: E402

from rtws.client import Client  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]



@dataclass
class Served:
    port: int
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


@pytest.fixture(scope="module")
def served(tiny_llama_long_dir: Path) -> Iterator[Served]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           # HAProxy's own Prometheus and stats frontends: free ports, not Serve's fixed 9101 and 8404.
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()), "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port())}
    cmd = [sys.executable, "-m", "rtws", "serve-ray", "--ingress", "haproxy", "--replicas", "1",
           "--host", "127.0.0.1", "--port", str(port), "--model", str(tiny_llama_long_dir), "--model-name", "tiny",
           "--num-slots", "32", "--torch-threads", "1", "--log-level", "WARNING", "--max-connections", "64",
           "--drain-timeout-s", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
    s = Served(port, proc)
    ready = threading.Event()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            s.lines.append(line.rstrip())
            if line.startswith("rtws on Ray Serve:"):
                ready.set()

    pumper = threading.Thread(target=pump, daemon=True)
    pumper.start()
    tree: set[int] = set()
    try:
        deadline = time.monotonic() + 240 * UNIT
        while not ready.wait(0.5):
            assert proc.poll() is None and time.monotonic() < deadline, "\n".join(s.lines[-40:])
        tree = process_tree(proc.pid) - {proc.pid}
        yield s
    finally:
        if proc.poll() is None:
            tree |= process_tree(proc.pid) - {proc.pid}
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(90)
        if proc.poll() is None:
            proc.kill()
        for pid in tree:  # whatever a failed run left behind (the name checked: a pid can be reused)
            if _comm(pid).startswith(("ray::", "raylet", "gcs_server", "haproxy", "python")):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        pumper.join(10)
        if proc.stdout is not None:
            proc.stdout.close()


def test_the_command_says_which_ingress(served: Served) -> None:
    assert any("1 replica, HAProxy ingress" in ln for ln in served.lines), served.lines


def test_haproxy_ingress_listens_on_loopback_only(served: Served) -> None:
    """HAProxy holds the public port (the traffic does not pass Serve's Python proxy), the replica listens on a
    port of its own, and nothing in the command's process tree (Ray, HAProxy and its Prometheus and stats
    frontends, which Serve binds on all interfaces: rtws.ray_env.loopback_haproxy) listens beyond loopback."""
    holders: set[str] = set()
    for _ in range(20):  # bounded: a holder that exits between the listing and reading its name reads as ""
        found = listeners(process_tree(served.proc.pid))
        holders = {_comm(pid) for pid, _, port in found if port == served.port} - {""}
        if holders == {"haproxy"}:
            break
        time.sleep(0.5)
    assert holders == {"haproxy"}, (holders, found)
    assert any(_comm(pid).startswith("ray::ServeRepli") for pid, _, _ in found), found  # direct ingress
    assert len(found) >= 6, found
    public = [entry for entry in found if entry[1] not in LOOPBACK]
    assert not public, f"listening beyond loopback: {public}"


def test_sessions_multiplex_behind_haproxy(served: Served) -> None:
    async def one(i: int) -> tuple[str, list[str]]:
        async with await Client.connect(served.ws, open_timeout=30 * UNIT) as c:
            assert c.ready is not None and c.ready.replica and c.ready.limits.ack_required
            streams = [await c.generate(f"s{i} g{j}", max_tokens=12, seed=i * 10 + j) for j in range(4)]
            results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 120 * UNIT)
            return c.ready.replica, [r.reason for r in results]

    async def main() -> list[tuple[str, list[str]]]:
        return list(await asyncio.gather(*(one(i) for i in range(16))))

    out = asyncio.run(main())
    assert all(reasons == ["length"] * 4 for _, reasons in out), out
    assert len(Counter(replica for replica, _ in out)) == 1  # one replica: every session on it


def test_cancel_behind_haproxy(served: Served) -> None:
    check_cancel(served)


def test_frame_limit_enforced_behind_haproxy(served: Served) -> None:
    check_frame_limit(served)


def test_infer_sse_behind_haproxy(served: Served) -> None:
    check_infer_sse(served)


def test_openai_client_behind_haproxy(served: Served) -> None:
    check_openai_client(served)


def test_slow_reader_pauses_at_the_window_behind_haproxy(served: Served) -> None:
    check_slow_reader_pauses_at_the_window(served)


def test_resume_behind_haproxy(served: Served) -> None:
    asyncio.run(resume_after_a_drop(served))


def test_sigterm_drains_live_streams_and_stops_everything(served: Served) -> None:
    """SIGTERM to the command during 16 live streams: Serve shuts the replica down, rtws drains it first
    (rtws.ray.install_drain_hook wraps Serve's HAProxy drain too): every accepted generation gets its done,
    sockets close 1001, new work is refused with overloaded; then the command exits 0 and leaves nothing."""
    async def replica() -> str:
        ws, ready = await session(served.ws)
        await ws.close()
        return ready.replica or ""

    rid = asyncio.run(replica())
    tree = process_tree(served.proc.pid)

    def stop() -> None:
        served.proc.send_signal(signal.SIGTERM)
        served.proc.wait(120 * UNIT)

    outcomes = drain_run(served, stop)
    check_drained(outcomes, {rid})
    assert served.proc.returncode == 0, served.lines[-20:]
    deadline = time.monotonic() + 30 * UNIT
    while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") for pid in tree - {served.proc.pid}):
        time.sleep(0.5)
    left = [(pid, _comm(pid)) for pid in tree - {served.proc.pid} if os.path.exists(f"/proc/{pid}")]
    assert not left, left  # Ray's processes and HAProxy are gone
