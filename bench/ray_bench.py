"""Direct ``rtws serve`` against rtws on Ray Serve (1 and 2 replicas), in one run.

    python bench/ray_bench.py                                   # bundled model, 32 streams
    python bench/ray_bench.py --concurrency 32 --requests 96 --max-tokens 64 --frame-interval-ms 0,20

Every setup gets the same closed-loop WebSocket load from ``bench/loadgen.py``
(``--concurrency`` sessions, one stream each, greedy, the same prompts and
``max_tokens``):

* **direct**: ``bench/serve_child.py``, the app exactly as ``rtws serve`` runs it;
* **ray N**: a local Ray cluster on 127.0.0.1 (``rtws.ray.start_local_cluster``), Serve's ingress
  on a free port, ``rtws.ray.build_application`` with N replicas (one engine each). ``--ingress``:
  ``haproxy`` (default; Serve's HAProxy ingress, each replica serving its own sockets: what
  ``rtws serve-ray --replicas 1`` runs) or ``proxy`` (Serve's Python proxy with rtws's router).

Reported per setup: delivered tokens/s, inter-token latency p50/p99 (frame gap
divided by the tokens the frame carries), tokens per frame, one frame round
trip (``cancel`` of an unknown id answered by ``error unknown_id``: protocol
only, no engine step; sequential, idle server), and CPU ms per delivered token
for the server side: the rtws process (direct), or the ingress (Serve's proxy
actor; behind HAProxy also HAProxy and its manager actor) and the replica actors
(Ray), read from /proc. Both servers stay up for the whole run
and each Ray setup is measured in ABBA order against direct; "of direct" is the
median of the per-pair ratios. ``--frame-interval-ms`` adds runs with
rtws.ray's per-socket frame pacing (``RayOptions.frame_interval_ms``), which
makes each socket's writer wait so that tokens coalesce into fewer frames
through the proxy. The last table is the summary, with direct as the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import (  # noqa: E402
    REPO,
    ServerProcess,
    add_model_args,
    cpu_seconds,
    max_tokens_list,
    ms,
    num,
    percentile,
    print_header,
    print_table,
    process_tree,
    server_config,
    text_prompts,
    thread_env,
)
from loadgen import Fleet, merge, split  # noqa: E402

from rtws import ray_env  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, default_concurrency=32)
    p.add_argument("--requests", type=int, default=96, help="requests per measured run")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--procs", type=int, default=2, help="client processes")
    p.add_argument("--replicas", default="1,2", help="Ray setups to measure (replica counts)")
    p.add_argument("--frame-interval-ms", default="0",
                   help="comma list of per-socket frame pacing for the Ray runs (0: off)")
    p.add_argument("--streams-per-socket", type=int, default=1,
                   help="generations in flight per WebSocket (--concurrency streams over concurrency/this sockets)")
    p.add_argument("--batch", default="0",
                   help="comma list of client modes: 0 = one frame per message (v1), 1 = hello {batch: true} "
                        "(every frame ready at once in one message); each Ray setup runs in each mode, paired "
                        "with direct in the same mode")
    p.add_argument("--ingress", default="haproxy", choices=("proxy", "haproxy"),
                   help="what carries traffic to the replicas (RayOptions.ingress): Serve's HAProxy ingress (what "
                        "`rtws serve-ray --replicas 1` runs) or Serve's Python proxy (rtws's router; what several "
                        "replicas run by default). One per run: Serve reads the choice when Ray is imported")
    p.add_argument("--round-trips", type=int, default=100, help="sequential frame round trips per setup")
    p.add_argument("--warmup-requests", type=int, default=16)
    p.add_argument("--ray-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the Ray cluster's processes (e.g. RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0)")
    p.add_argument("--repeat", type=int, default=2, help="ABBA pairs (direct, ray) per Ray setup")
    return p


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _descendants() -> dict[int, str]:
    """pid -> command line of every descendant of this process (Ray's processes)."""
    found = set(process_tree(os.getpid()))
    out = {}
    for pid in found - {os.getpid()}:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                out[pid] = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            pass
    return out


def round_trips(url: str, n: int) -> list[float]:
    """Sequential ``cancel`` (unknown id) -> ``error unknown_id`` round trips on one socket."""
    from websockets.asyncio.client import connect

    from rtws import protocol as p

    codec = p.codec_for(p.SUBPROTOCOL_MSGPACK)

    async def main() -> list[float]:
        out = []
        async with connect(url, subprotocols=[p.SUBPROTOCOL_MSGPACK], compression=None) as ws:  # type: ignore[list-item]
            await ws.recv()  # ready
            for i in range(n):
                t0 = time.perf_counter()
                await ws.send(codec.encode(p.Cancel(id=f"none{i}")))
                frame = codec.decode_any(await ws.recv())
                out.append(time.perf_counter() - t0)
                assert isinstance(frame, p.Error) and frame.code == "unknown_id", frame
                await asyncio.sleep(0.02)  # stay far below the error-frame budget
        return out

    return asyncio.run(main())


class Setup:
    """One way of serving: its WebSocket URL and the server-side processes whose CPU counts."""

    def __init__(self, label: str, url: str, pids: dict[str, list[int]], batch: bool = False) -> None:
        self.label = label
        self.url = url
        self.pids = pids
        self.batch = batch

    def cpu(self) -> dict[str, float]:
        out = {}
        for role, pids in self.pids.items():
            out[role] = sum(cpu_seconds(p) for pid in pids for p in process_tree(pid))  # engine processes too
        return out


def measure(setup: Setup, args: Any, prompts: list[str], mts: list[int]) -> dict[str, Any]:
    pairs = list(zip(prompts, mts))
    reqs, warm = pairs[: args.requests], pairs[args.requests:]
    per = max(1, args.streams_per_socket)
    sockets = max(1, args.concurrency // per)
    with Fleet(setup.url, sockets, args.procs, batch=setup.batch) as fleet:
        if fleet.num_connected != sockets:
            raise RuntimeError(f"{setup.label}: {fleet.num_connected}/{sockets} connected: "
                               f"{fleet.connect_errors}")
        fleet.all(lambda i: {"op": "run", "requests": split(warm, fleet.shares)[i], "streams": per})
        cpu0 = setup.cpu()
        answers = fleet.all(lambda i: {"op": "run", "requests": split(reqs, fleet.shares)[i], "streams": per})
        cpu1 = setup.cpu()
    res = merge(answers)
    res["cpu"] = {k: cpu1[k] - cpu0[k] for k in cpu1}
    res["rtt"] = round_trips(setup.url, args.round_trips)
    print(f"# {setup.label}: {res['tokens']} tokens in {res['frames']} frames / {res['messages']} messages, "
          f"{num(res['tok_s'])} tok/s, "
          f"reasons {res['reasons']}, errors {res['errors']}, server CPU s {res['cpu']}", flush=True)
    return res


def _row(label: str, r: dict[str, Any], ratio: float | None) -> list[str]:
    tokens = max(1, r["tokens"])
    cpu = r["cpu"]
    proxy = cpu.get("proxy", 0.0) * 1e3 / tokens
    server = (cpu.get("server", 0.0) + cpu.get("replicas", 0.0)) * 1e3 / tokens
    return [label, num(r["tok_s"]), "100%" if ratio is None else f"{100 * ratio:.0f}%",
            ms(percentile(r["itl"], 50)), ms(percentile(r["itl"], 99)), f"{r['tokens'] / max(1, r['frames']):.2f}",
            f"{r['tokens'] / max(1, r.get('messages', 0)):.2f}",
            ms(percentile(r["rtt"], 50)), ms(percentile(r["rtt"], 99)), f"{server:.3f}",
            f"{proxy:.3f}" if "proxy" in cpu else "-", f"{server + proxy:.3f}"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ray_env.apply(loopback=True, ingress=args.ingress)  # before Ray is imported (it reads both at import)
    print_header("ray_bench", args)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model))
    n = args.requests + args.warmup_requests
    prompts = text_prompts(tok, n, args.prompt_len, args.seed)
    mts = max_tokens_list(n, args.max_tokens, False, seed=args.seed + 1)
    slots = args.num_slots or max(64, args.concurrency)
    common_cfg = dict(num_slots=slots, max_connections=args.concurrency + 64, idle_timeout_s=3600.0,
                      max_tokens_limit=max(4096, args.max_tokens), log_level="WARNING")
    rows: list[list[str]] = []
    batches = [x.strip() not in ("0", "") for x in args.batch.split(",") if x.strip()]
    direct_runs: dict[bool, list[dict[str, Any]]] = {b: [] for b in batches}

    import ray
    from ray import serve

    from rtws.config import ServerConfig
    from rtws.ray import RayOptions, build_application, start_local_cluster

    # Both servers stay up for the whole run; each Ray setup is measured in ABBA order against direct
    # (direct, ray, ray, direct, ...), so a drift in the shared machine's load hits both sides alike.
    srv = ServerProcess(server_config(args, **common_cfg, ping_interval_s=None), env=thread_env(args))
    directs = {b: Setup("direct rtws serve" + (", batch" if b else ""), srv.url, {"server": [srv.pid]}, b)
               for b in batches}
    env = {"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    for item in args.ray_env:
        key, _, value = item.partition("=")
        os.environ[key] = value  # Ray's processes inherit this process's environment
    start_local_cluster(num_cpus=8, env=env)
    try:
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServerConfig(model=str(args.model), device=args.device, dtype=args.dtype,
                           prefill_budget=args.prefill_budget, torch_threads=args.threads, **common_cfg)
        intervals = [float(x) for x in args.frame_interval_ms.split(",") if x.strip()]
        for replicas in [int(x) for x in args.replicas.split(",") if x.strip()]:
            for interval in intervals:
                serve.run(build_application(cfg, RayOptions(replicas=replicas, frame_interval_ms=interval,
                                                            ingress=args.ingress)),
                          name="rtws", route_prefix="/")
                time.sleep(1.0)
                procs = _descendants()
                # The ingress: Serve's proxy actor; behind HAProxy also HAProxy's processes and Serve's manager
                # actor for it (the proxy actor stays up there, idle).
                pids = {"proxy": [p for p, c in procs.items() if c.startswith(("ray::ProxyActor", "ray::HAProxy"))
                                  or os.path.basename(c.split(" ", 1)[0]) == "haproxy"],
                        "replicas": [p for p, c in procs.items() if c.startswith("ray::ServeReplica")]}
                if len(pids["replicas"]) != replicas or not pids["proxy"]:
                    raise RuntimeError(f"expected 1 proxy and {replicas} replicas, found {pids}")
                for batch in batches:
                    label = f"ray {args.ingress}, {replicas} replica{'s' if replicas > 1 else ''}" + (
                        f", pacing {interval:g} ms" if interval else "") + (", batch" if batch else "")
                    setup = Setup(label, f"ws://127.0.0.1:{port}/ws", pids, batch)
                    direct = directs[batch]
                    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
                    for k in range(args.repeat):
                        if k % 2 == 0:
                            d = measure(direct, args, prompts, mts)
                            r = measure(setup, args, prompts, mts)
                        else:
                            r = measure(setup, args, prompts, mts)
                            d = measure(direct, args, prompts, mts)
                        pairs.append((d, r))
                        direct_runs[batch].append(d)
                    ratios = sorted(r["tok_s"] / d["tok_s"] for d, r in pairs)
                    ratio_med = statistics.median(ratios)
                    pairs.sort(key=lambda x: x[1]["tok_s"])
                    med = pairs[len(pairs) // 2][1]
                    rows.append(_row(label, med, ratio_med))
                    print(f"# {label}: ray/direct tok/s per pair {[f'{x:.2f}' for x in ratios]}", flush=True)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            srv.stop()

    for i, batch in enumerate(batches):
        runs = sorted(direct_runs[batch], key=lambda r: r["tok_s"])
        if runs:
            rows.insert(i, _row(f"{directs[batch].label} (median of {len(runs)})", runs[len(runs) // 2], None))
    per = max(1, args.streams_per_socket)
    print_table(f"ray_bench summary: {args.concurrency} streams (closed loop, {per} per socket), prompt "
                f"{args.prompt_len}, max_tokens {args.max_tokens}, {args.requests} requests per run, {args.repeat} "
                f"ABBA pairs per setup; 'of direct' is the median of the per-pair ratios",
                ["setup", "tok/s", "of direct", "ITL p50 ms", "ITL p99 ms", "tokens/frame", "tokens/msg", "RTT p50 ms",
                 "RTT p99 ms", "CPU ms/tok rtws", "CPU ms/tok proxy", "CPU ms/tok total"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
