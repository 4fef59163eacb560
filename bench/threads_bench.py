"""rtws serve's torch thread defaults against torch's own, end to end, in one run (ABBA order).

Each variant starts the real ``rtws serve`` (``python -m rtws serve``, the bundled model by default) and
drives it with ``--concurrency`` closed-loop streams of ``/v1/completions`` (SSE, usage included), while a
probe sends ``GET /health`` every 20 ms: its latency is how long the event loop takes to answer while the
engine decodes. Variants:

- ``rtws default``: no thread flags (``rtws.threads.choose_threads``);
- ``loop keeps a core``: ``--torch-threads N-1 --torch-interop-threads 1``;
- ``torch default``: ``--torch-threads N --torch-interop-threads N`` with N = usable cores (what torch
  picks by itself on this machine).

Order: A B C C B A per ``--pairs`` block; medians reported.

    python bench/threads_bench.py
    python bench/threads_bench.py --concurrency 8 --requests 64 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, ms, num, percentile, print_header, print_table, ratio  # noqa: E402

PROMPTS = ["ROMEO:\n", "JULIET:\nO Romeo, Romeo", "First Citizen:\nBefore we proceed any further",
           "KING RICHARD III:\nNow is the winter", "HAMLET:\nTo be, or not to be"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--requests", type=int, default=96)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--pairs", type=int, default=1, help="ABBA blocks (each runs both variants twice)")
    return p


def start_server(model: str | None, extra: list[str]) -> tuple[subprocess.Popen[str], int, dict[str, Any]]:
    cmd = [sys.executable, "-m", "rtws", "serve", "--port", "0", "--log-format", "json", "--num-slots", "64",
           *(["--model", model] if model else []), *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stderr is not None
    threads: dict[str, Any] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") == "threads":
            threads = rec
        if rec.get("event") == "listening":
            return proc, int(rec["port"]), threads
    proc.kill()
    raise RuntimeError("server did not start")


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if proc.stderr is not None:
        proc.stderr.close()


async def drive(port: int, args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    base = f"http://127.0.0.1:{port}"
    tokens = 0
    ttft: list[float] = []
    health: list[float] = []
    next_i = 0
    stop = asyncio.Event()

    async def stream(session: aiohttp.ClientSession, i: int) -> None:
        nonlocal tokens
        body = {"model": None, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": args.max_tokens,
                "temperature": 0.8, "seed": i, "stream": True, "stream_options": {"include_usage": True}}
        body.pop("model")
        t0 = time.perf_counter()
        first = True
        async with session.post(base + "/v1/completions", json=body) as r:
            assert r.status == 200, await r.text()
            async for raw in r.content:
                line = raw.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                obj = json.loads(line[6:])
                if first and obj.get("choices"):
                    ttft.append(time.perf_counter() - t0)
                    first = False
                if obj.get("usage"):
                    tokens += obj["usage"]["completion_tokens"]

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal next_i
        while next_i < args.requests:
            i = next_i
            next_i += 1
            await stream(session, i)

    async def probe(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            async with session.get(base + "/health") as r:
                await r.read()
            health.append(time.perf_counter() - t0)
            await asyncio.sleep(0.02)

    conn = aiohttp.TCPConnector(limit=args.concurrency + 4)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=600)) as session:
        prober = asyncio.create_task(probe(session))
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(args.concurrency)))
        wall = time.perf_counter() - t0
        stop.set()
        await prober
    return {"tok_s": tokens / wall, "ttft": ttft, "health": health}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_header("threads_bench", args)
    cores = len(os.sched_getaffinity(0))
    variants = {"rtws default": [],
                "loop keeps a core": ["--torch-threads", str(max(1, cores - 1)), "--torch-interop-threads", "1"],
                "torch default": ["--torch-threads", str(cores), "--torch-interop-threads", str(cores)]}
    names = list(variants)
    order = (names + names[::-1]) * args.pairs
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    chosen: dict[str, dict[str, Any]] = {}
    for name in order:
        proc, port, threads = start_server(args.model, variants[name])
        try:
            out = asyncio.run(drive(port, args))
        finally:
            stop_server(proc)
        chosen[name] = threads
        runs[name].append(out)
        print(f"#   {name}: {num(out['tok_s'])} tok/s, /health p99 {ms(percentile(out['health'], 99))} ms")
        sys.stdout.flush()
    rows = []
    base_tok = statistics.median(r["tok_s"] for r in runs["torch default"])
    for name, rs in runs.items():
        tok = statistics.median(r["tok_s"] for r in rs)
        ttft = [x for r in rs for x in r["ttft"]]
        health = [x for r in rs for x in r["health"]]
        t = chosen[name]
        rows.append([name, t.get("threads", "?"), t.get("interop_threads", "?"), num(tok), ratio(tok, base_tok),
                     ms(percentile(ttft, 50)), ms(percentile(ttft, 99)), ms(percentile(health, 50)),
                     ms(percentile(health, 99))])
    print_table(f"torch threads, {cores} cores, {args.concurrency} streams x {args.max_tokens} tokens "
                f"(baseline: torch default, same run; medians of {2 * args.pairs} runs each, order ABCCBA)",
                ["variant", "intra-op", "inter-op", "tok/s", "vs torch", "TTFT p50 ms", "TTFT p99 ms",
                 "/health p50 ms", "/health p99 ms"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
