"""rtws on a real local Ray cluster (loopback only) and Ray Serve: 2 replicas behind Serve's proxy.

One cluster and one Serve application for the module (starting them costs
about 20 s on 2 cores); the scale-down and redeploy tests run last because they
change the deployment. Select with ``-m ray``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rtws import ray_env

ray_env.apply(loopback=True)  # before the first `import ray` in this process (Ray reads it at import)
ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from tests.helpers.ray import (  # noqa: E402
    LOOPBACK,
    check_cancel,
    check_drained,
    check_frame_limit,
    check_infer_sse,
    check_openai_client,
    check_slow_reader_pauses_at_the_window,
    decode,
    drain_run,
    free_port,
    listeners,
    paused_and_quiet,
    process_tree,
    resume_after_a_drop,
    scrape,
    send,
    session,
)
from tests.helpers.server import UNIT  # noqa: E402
from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from rtws import protocol as p  # noqa: E402
from rtws.client import Client  # noqa: E402
from rtws.config import ServerConfig  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[2]
APP = "rtws"
STALL_S = 10.0 * UNIT  # the acknowledgement-stall rule closes a reader that stopped acking this long ago



@dataclass
class Cluster:
    port: int
    config: ServerConfig

    @property
    def ws(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def deploy(self, replicas: int, **config_changes: Any) -> None:
        from rtws.ray import RayOptions, build_application

        cfg = self.config.replace(**config_changes) if config_changes else self.config
        serve.run(build_application(cfg, RayOptions(replicas=replicas, routing_stats_period_s=0.5)),
                  name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def cluster(tiny_llama_long_dir: Path) -> Iterator[Cluster]:
    from rtws.ray import start_local_cluster

    start_local_cluster(num_cpus=8, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                         "TOKENIZERS_PARALLELISM": "false"})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServerConfig(model=str(tiny_llama_long_dir), model_name="tiny", num_slots=32, torch_threads=1,
                           log_level="WARNING", max_connections=64, drain_timeout_s=8.0,
                           stall_timeout_s=STALL_S)  # require_ack is left to rtws.ray's default: on
        c = Cluster(port, cfg)
        c.deploy(2)
        yield c
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()


def run(coro: Any) -> Any:
    return asyncio.run(coro)




# ---------------------------------------------------------------------- no cluster needed


def test_drain_hook_matches_installed_ray() -> None:
    """The one private Ray hook: fails loudly here when Ray renames or reshapes it."""
    import inspect

    from ray.serve._private import replica as replica_module

    from rtws.ray import install_drain_hook

    install_drain_hook()
    fn = replica_module.Replica._drain_ongoing_requests
    assert getattr(fn, "__rtws_drain_hook__", False)
    assert inspect.iscoroutinefunction(fn)
    params = list(inspect.signature(fn.__wrapped__).parameters)
    assert params[:2] == ["self", "min_draining_period_s"], params
    # Behind Serve's HAProxy ingress the shutdown drains through _drain_behind_haproxy (a hold, then the plain
    # wait): wrapped as well, so rtws drains before the hold.
    behind = replica_module.Replica._drain_behind_haproxy
    assert getattr(behind, "__rtws_drain_hook__", False)
    assert list(inspect.signature(behind.__wrapped__).parameters)[:2] == ["self", "min_draining_period_s"]
    assert "_drain_ongoing_requests" in inspect.getsource(behind.__wrapped__)
    assert "_drain_behind_haproxy" in inspect.getsource(replica_module.Replica._perform_graceful_shutdown)
    install_drain_hook()  # idempotent: no double wrapping
    assert replica_module.Replica._drain_ongoing_requests is fn
    assert replica_module.Replica._drain_behind_haproxy is behind


def test_router_rules_are_pure() -> None:
    from rtws.ray_router import affinity_key, load_of

    assert affinity_key("rtws.v1.msgpack, rtws.replica.abc123") == "abc123"
    assert affinity_key("rtws.replica.x") == "x"
    assert affinity_key("rtws.v1.json") is None and affinity_key("") is None and affinity_key("rtws.replica.") is None
    assert load_of({"live_generations": 3}, 9) < load_of({"live_generations": 4}, 0)  # generations first
    assert load_of({"live_generations": 3}, 1) < load_of({"live_generations": 3}, 2)  # then open sockets
    assert load_of({"live_generations": 0, "draining": True}) > load_of({"live_generations": 99}, 99)
    assert load_of(None) == (0, 0, 0)


def test_frame_pacing_is_not_counted_as_a_slow_reader(tiny_llama_dir: Path) -> None:
    """rtws.ray's frame pacing holds each socket's sends (here 50 ms per frame) inside ``send``. That is not the
    reader being slow: before the pacing clock, a fast reader was closed 1008 "reader too slow" once a
    ``stall_timeout_s`` window had passed (seen after 30 s in every ray_bench run with pacing). No cluster
    needed: the app wrapped as rtws.ray wraps it, on a real uvicorn."""
    from rtws.ray import FramePacing
    from rtws.server import Server, build_app, stop_thread, uvicorn_config

    cfg = ServerConfig(model=str(tiny_llama_dir), port=0, log_level="WARNING", compile="off",
                       stall_timeout_s=1.0 * UNIT, stall_min_bytes_per_s=1 << 24)
    app = build_app(cfg)
    ucfg = uvicorn_config(app, cfg)
    ucfg.app = FramePacing(app, 0.05)
    server = Server(ucfg, app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    assert server.ready.wait(120)

    async def main() -> tuple[int, Any]:
        tokens = 0
        async with connect(f"ws://127.0.0.1:{server.port}/ws", subprotocols=["rtws.v1.msgpack"],  # type: ignore[list-item]
                           ) as ws:
            p.MSGPACK.decode_any(await ws.recv())
            n = 0
            await ws.send(p.MSGPACK.encode(p.Generate(id=n, prompt="a", max_tokens=4000, temperature=0.0)))
            end = time.monotonic() + 3.5 * UNIT  # past three stall windows, reading everything at once
            try:
                while time.monotonic() < end:
                    f = p.MSGPACK.decode_any(await asyncio.wait_for(ws.recv(), 10 * UNIT))
                    if isinstance(f, p.Delta):
                        tokens += f.tokens
                    elif isinstance(f, p.Done):  # the tiny model's context is short: start the next one
                        if f.reason not in ("length", "stop"):
                            return tokens, f.reason
                        n += 1
                        await ws.send(p.MSGPACK.encode(p.Generate(id=n, prompt="a", max_tokens=4000,
                                                                  temperature=0.0)))
            except ConnectionClosed as exc:
                return tokens, exc.rcvd.code if exc.rcvd else "closed"
            return tokens, None

    try:
        tokens, ended = asyncio.run(main())
    finally:
        stop_thread(server, thread)
    assert ended is None, f"the paced socket ended early ({ended}) after {tokens} tokens"
    assert tokens > 0


def test_deployment_options_follow_the_config() -> None:
    from rtws.ray import RayOptions, deployment_options, replica_config, resolve_num_gpus

    cfg = ServerConfig(max_connections=300, drain_timeout_s=12.0, num_slots=40, device="cuda:1")
    opts = deployment_options(cfg, RayOptions(replicas=3), num_gpus=resolve_num_gpus(cfg, RayOptions()))
    assert opts["num_replicas"] == 3 and opts["max_ongoing_requests"] >= cfg.max_connections
    assert opts["ray_actor_options"]["num_gpus"] == 1.0
    assert opts["graceful_shutdown_timeout_s"] > cfg.drain_timeout_s
    assert replica_config(cfg, 1.0).device == "cuda"  # Ray shows each replica its own GPU as cuda:0
    assert resolve_num_gpus(cfg.replace(device="cpu"), RayOptions()) == 0.0
    # require_ack: on by default behind Serve (send never blocks), off when set so; rtws serve leaves it off
    assert cfg.require_ack is None and replica_config(cfg, 1.0).require_ack is True
    assert replica_config(cfg.replace(require_ack=False), 0.0).require_ack is False
    auto = deployment_options(cfg, RayOptions(replicas=2, max_replicas=6))
    a = auto["autoscaling_config"]
    assert "num_replicas" not in auto and a.min_replicas == 1 and a.max_replicas == 6 and a.initial_replicas == 2
    assert a.target_ongoing_requests == 30.0  # 3/4 of num_slots live generations per replica
    with pytest.raises(ValueError, match="replicas"):
        RayOptions(replicas=0)


def test_autoscaling_policy_counts_live_generations() -> None:
    from types import SimpleNamespace

    from rtws.ray import autoscale_on_live_generations

    conf = SimpleNamespace(get_target_ongoing_requests=lambda: 10.0)
    ctx = SimpleNamespace(aggregated_metrics={"live_generations": {"a": 25.0, "b": 15.0}}, total_num_requests=2,
                          config=conf)
    assert autoscale_on_live_generations(ctx)[0] == 4.0  # 40 live / 10 per replica; sockets (2) do not count
    ctx.aggregated_metrics = {}
    assert autoscale_on_live_generations(ctx)[0] == 0.2  # before the first report: sockets


def test_serve_run_builder_and_cli_flags() -> None:
    """``serve run rtws.ray:app key=value`` and ``rtws serve-ray`` parse into the same deployment."""
    import subprocess
    import sys

    from rtws.ray import app

    built = app({"replicas": "3", "num_slots": "8", "max_connections": "100", "model": "/some/model"})
    dep = built._bound_deployment  # Serve's Application wraps one bound deployment
    assert dep.num_replicas == 3 and dep.max_ongoing_requests >= 100
    assert dep.init_args[0]["num_slots"] == 8 and dep.init_args[0]["model"] == "/some/model"
    assert dep.init_args[0]["require_ack"] is True  # the default behind Serve
    off = app({"require_ack": "false", "model": "/some/model"})._bound_deployment
    assert off.init_args[0]["require_ack"] is False
    with pytest.raises(ValueError, match="unknown rtws.ray argument"):
        app({"replica": "2"})
    # The ingress is the cluster's environment's (read by Serve at import and cluster start): asking for the
    # other one is an error at deploy time, not a silent fallback. This process runs Serve's proxy.
    with pytest.raises(ValueError, match="ingress 'haproxy' asked for"):
        app({"ingress": "haproxy", "model": "/some/model"})
    with pytest.raises(ValueError, match="ingress"):
        app({"ingress": "nginx", "model": "/some/model"})
    assert app({"ingress": "proxy", "model": "/some/model"})._bound_deployment.num_replicas == 1
    out = subprocess.run([sys.executable, "-m", "rtws", "serve-ray", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    for flag in ("--replicas", "--max-replicas", "--num-gpus", "--ray-address", "--ingress", "--num-slots", "--max-frame-bytes",
                 "--require-ack", "--no-require-ack"):
        assert flag in out.stdout
    bad = subprocess.run([sys.executable, "-m", "rtws", "serve-ray", "--replicas", "0"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert bad.returncode == 2 and "replicas" in bad.stderr


# ---------------------------------------------------------------------- on the cluster




def test_ray_listens_on_loopback_only(cluster: Cluster) -> None:
    found = listeners(process_tree())
    ports = {port for _, _, port in found}
    assert cluster.port in ports  # Serve's proxy is among them: the scan sees Ray's processes
    assert len(found) >= 6, found  # GCS, raylet, agents, controller, replicas, this driver
    public = [entry for entry in found if entry[1] not in LOOPBACK]
    assert not public, f"listening beyond loopback: {public}"
    assert ray.util.get_node_ip_address() == "127.0.0.1"


def test_sessions_multiplex_across_both_replicas(cluster: Cluster) -> None:
    async def session(i: int) -> tuple[str, list[str]]:
        async with await Client.connect(cluster.ws, open_timeout=30 * UNIT) as c:
            assert c.ready is not None and c.ready.replica
            streams = [await c.generate(f"s{i} g{j}", max_tokens=12, seed=i * 10 + j) for j in range(4)]
            results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 120 * UNIT)
            return c.ready.replica, [r.reason for r in results]

    async def main() -> list[tuple[str, list[str]]]:
        return list(await asyncio.gather(*(session(i) for i in range(16))))

    out = run(main())
    assert all(reasons == ["length"] * 4 for _, reasons in out), out
    spread = Counter(replica for replica, _ in out)
    assert len(spread) == 2, spread  # both replicas served sessions
    assert min(spread.values()) >= 4, spread  # least-loaded routing, not all on one


def test_cancel_through_the_proxy(cluster: Cluster) -> None:
    check_cancel(cluster)


def test_affinity_by_subprotocol(cluster: Cluster) -> None:
    """A socket offering rtws.replica.<id> lands on that replica (what a reconnecting browser offers)."""
    # Both ids, waiting out a replica whose live generations from the test before are reported late (until
    # then least-loaded routing sends every new session to the other one).
    ids = _replica_ids(cluster, want=2)
    assert len(ids) == 2 and "" not in ids, ids

    async def main() -> None:
        for rid in sorted(ids):
            for _ in range(6):
                ws, ready = await session(cluster.ws, [p.SUBPROTOCOL_MSGPACK, f"rtws.replica.{rid}"])
                assert ready.replica == rid
                assert ws.subprotocol == p.SUBPROTOCOL_MSGPACK  # the affinity entry is never chosen
                await ws.close()
        # A replica that no longer exists: routed as a new session, still served.
        ws, ready = await session(cluster.ws, [p.SUBPROTOCOL_MSGPACK, "rtws.replica.gone"])
        assert ready.replica in ids
        await ws.close()

    run(main())


def test_new_sessions_go_to_the_least_loaded_replica(cluster: Cluster) -> None:
    async def main() -> None:
        probe, ready = await session(cluster.ws)
        busy = ready.replica
        assert busy
        for j in range(10):  # load one replica with long generations
            await send(probe, p.Generate(id=f"load{j}", prompt="x", max_tokens=3000))
        await asyncio.sleep(2.0 * UNIT)  # > routing_stats_period_s: the router has seen the load
        landed = []
        for _ in range(6):
            ws, r = await session(cluster.ws)
            landed.append(r.replica)
            await ws.close()
        await probe.close()
        assert busy not in landed, (busy, landed)

    run(main())
    time.sleep(1.0 * UNIT)  # the closed socket's generations are cancelled; let the stats settle


def test_frame_limit_enforced_behind_the_proxy(cluster: Cluster) -> None:
    check_frame_limit(cluster)


def test_infer_sse_through_the_proxy(cluster: Cluster) -> None:
    check_infer_sse(cluster)


def test_openai_client_through_the_proxy(cluster: Cluster) -> None:
    check_openai_client(cluster)


def test_metrics_name_the_replica(cluster: Cluster) -> None:
    import urllib.request

    seen = set()
    for _ in range(8):
        with urllib.request.urlopen(cluster.http + "/metrics", timeout=30 * UNIT) as r:
            body = r.read().decode()
        line = next(ln for ln in body.splitlines() if ln.startswith("rtws_replica_info{"))
        assert 'deployment="rtws"' in line and line.endswith(" 1.0")
        seen.add(line.split('replica="', 1)[1].split('"', 1)[0])
    assert seen and all(seen)




def test_slow_reader_pauses_at_the_window_through_the_proxy(cluster: Cluster) -> None:
    check_slow_reader_pauses_at_the_window(cluster)


def _replica_rss_mib() -> dict[int, float]:
    """Resident memory (MiB) of every Serve replica process of this cluster, by pid (from /proc)."""
    out: dict[int, float] = {}
    for pid in process_tree():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"ServeReplica" not in f.read():
                    continue
            with open(f"/proc/{pid}/status") as f:
                rss = next(ln for ln in f if ln.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
        out[pid] = int(rss.split()[1]) / 1024
    return out


def test_a_reader_that_never_acks_is_paused_and_closed_1008_through_the_proxy(cluster: Cluster) -> None:
    """Issue 13's slow reader, without any opt-in: a raw client that never acks and never reads. rtws.ray
    requires acks, so its generations pause at the window (the replica stops writing: at most a window
    reaches Serve's queues), the stall rule closes it 1008 after stall_timeout_s, its generations are
    cancelled, and the replica's RSS does not follow the 8 x 4000-token generations it asked for."""
    async def main() -> None:
        rss0 = _replica_rss_mib()
        assert len(rss0) == 2, rss0  # both replicas found in /proc
        ws, ready = await session(cluster.ws)
        window = ready.limits.window
        assert window and ready.replica and ready.limits.ack_required
        for j in range(8):
            await send(ws, p.Generate(id=f"n{j}", prompt="x", max_tokens=4000))
        paused_at = await paused_and_quiet(cluster, ready.replica, 8, window, 1.0 * UNIT)  # read, ack nothing
        # Everything the replica wrote is what reaches us; the close frame follows once the stall rule fires.
        got = 0
        close: tuple[int, str] | None = None
        rss_peak = 0.0
        try:
            while time.monotonic() < paused_at + STALL_S + 60 * UNIT:
                try:
                    data = await asyncio.wait_for(ws.recv(), 0.5)
                    got += len(data)
                except asyncio.TimeoutError:
                    rss_peak = max(rss_peak, max(_replica_rss_mib().values(), default=0.0))
        except ConnectionClosed as exc:
            close = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else None
        closed_after = time.monotonic() - paused_at
        assert close == (1008, "acknowledgements stalled"), close
        assert closed_after < STALL_S + 30 * UNIT, closed_after
        assert 0 < got < 2 * window, (got, window)  # no unbounded queue inside Serve: one window, then nothing
        growth = max(rss_peak, max(_replica_rss_mib().values())) - max(rss0.values())
        assert growth < 64, f"replica RSS grew {growth:.1f} MiB"
        for _ in range(40):  # the closed socket's generations are cancelled: nothing paused, slots freed
            m = await asyncio.to_thread(scrape, cluster, ready.replica)
            if m.get("rtws_requests_paused", 0.0) == 0:
                break
            await asyncio.sleep(0.25)
        assert m.get("rtws_requests_paused", 0.0) == 0, m.get("rtws_requests_paused")

    run(main())


def test_resume_lands_on_the_same_replica(cluster: Cluster) -> None:
    """A dropped socket: the Python client reconnects offering rtws.replica.<id>, the router pins it to that
    replica, which replays the unacknowledged frames: the text is complete and not duplicated. Offered to the
    other replica, the resume gets the documented resume_failed error and a fresh session."""
    async def main() -> None:
        replica, token = await resume_after_a_drop(cluster)

        # The same kind of resume sent to the other replica: it does not hold the session. Keep probing for up
        # to 20 s: a replica reports its live generations up to a stats period late, and until then
        # least-loaded routing may send every new session to the same one (as in _replica_ids).
        foreign = None
        deadline = time.monotonic() + 20 * UNIT
        for n in itertools.count():
            ws, ready = await session(cluster.ws)
            await ws.close()
            if ready.replica != replica:
                foreign = ready.replica
                break
            if time.monotonic() > deadline:
                raise AssertionError("no second replica")
            if n >= 12:
                await asyncio.sleep(0.25)
        ws = await connect(cluster.ws, subprotocols=[p.SUBPROTOCOL_MSGPACK, f"rtws.replica.{foreign}"],  # type: ignore[list-item]
                           compression=None, open_timeout=30 * UNIT)
        await send(ws, p.Hello(resume=token, received=0))
        frames = [decode(await asyncio.wait_for(ws.recv(), 30 * UNIT)) for _ in range(2)]
        errors = [f for f in frames if isinstance(f, p.Error)]
        readies = [f for f in frames if isinstance(f, p.Ready)]
        assert errors and errors[0].code == "resume_failed", frames
        assert readies and readies[0].replica == foreign and not readies[0].resumed
        await ws.close()

    run(main())


# ---------------------------------------------------------------------- drain (changes the deployment: last)








def _replica_ids(cluster: Cluster, tries: int = 12, want: int | None = None) -> set[str]:
    """Replica ids that ``tries`` sequential sessions landed on.

    With ``want``, keep going (up to 20 s) until that many ids were seen: a replica that ran streams in an
    earlier test reports its live generations up to a stats period late, and until then new sessions all go
    to the other one (least-loaded routing, tested on its own above).
    """
    async def main() -> set[str]:
        ids: set[str] = set()
        deadline = time.monotonic() + 20 * UNIT
        n = 0
        while n < tries or (want is not None and len(ids) < want and time.monotonic() < deadline):
            ws, ready = await session(cluster.ws)
            ids.add(ready.replica or "")
            await ws.close()
            n += 1
            if n >= tries and want is not None and len(ids) < want:
                await asyncio.sleep(0.25)
        return ids

    return set(run(main()))


def _running_replicas() -> int:
    status = serve.status().applications[APP].deployments[APP]
    return int(status.replica_states.get("RUNNING", 0))


def _wait_for_replicas(n: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _running_replicas() != n:
        assert time.monotonic() < deadline, f"still {_running_replicas()} replicas, waiting for {n}"
        time.sleep(0.2)


def test_scale_down_drains_live_streams(cluster: Cluster) -> None:
    """2 -> 1 replicas while 16 streams run. With Serve's Python API every serve.run is a new version, so Serve
    starts the new replica and stops both old ones through the same graceful replica shutdown that an
    autoscaler scale-down uses (Replica._perform_graceful_shutdown, where install_drain_hook runs App.drain)."""
    before = _replica_ids(cluster, want=2)
    assert len(before) == 2, (before, _running_replicas())
    outcomes = drain_run(cluster, lambda: cluster.deploy(1))
    _wait_for_replicas(1, 60 * UNIT)
    after = _replica_ids(cluster, 4)
    assert len(after) == 1 and not (after & before)
    check_drained(outcomes, before)


def test_redeploy_drains_every_old_replica(cluster: Cluster) -> None:
    """serve.run of a new version replaces every replica (rolling update) while 16 streams run."""
    before = _replica_ids(cluster, 4)
    assert len(before) == 1
    outcomes = drain_run(cluster, lambda: cluster.deploy(2))
    after = _replica_ids(cluster, want=2)
    assert not (before & after) and len(after) == 2
    check_drained(outcomes, before)
