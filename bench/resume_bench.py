"""Resume latency under load: from reconnect to the first replayed frame, over many resumes.

    python bench/resume_bench.py                         # 100 resumes under a 32-stream load, bundled model
    python bench/resume_bench.py --resumes 20 --streams 8

One server child (``bench/serve_child.py``). A load process keeps ``--streams`` generations running
(``--sessions`` sessions, each with streams/sessions generations in flight, a new one started at each
``done``). Meanwhile the measuring client, ``--resumes`` times: opens a session, acks, starts a long
generation, reads a few frames, stops reading for 30 ms (frames pile up unread, so there is something
to replay), aborts the TCP connection (no close frame), then reconnects and sends ``hello {resume,
received}``. Measured: reconnect start -> ``ready {resumed}``, and -> the first frame after it (the
first replayed one, or the next live one when nothing was lost). Each resume is checked: the first
delta after it has the next ``seq``. Baseline in the same run, under the same load: a fresh session,
connect -> ``ready`` -> ``generate`` -> first delta (what a client without resume pays to start over,
before it has even re-sent the history).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, ms, percentile, print_header, print_table  # noqa: E402


async def _load(url: str, sessions: int, streams: int, max_tokens: int) -> None:
    import msgspec
    from websockets.asyncio.client import connect

    per = max(1, streams // sessions)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_reader(sys.stdin.fileno(), stop.set)  # the parent closes our stdin

    async def session(k: int) -> None:
        ws = await connect(url, compression=None, max_size=None)
        await ws.recv()
        n = 0

        async def start() -> None:
            nonlocal n
            n += 1
            await ws.send(msgspec.msgpack.encode({"type": "generate", "id": n, "prompt": f"ROMEO {k}.{n}:\n",
                                                  "max_tokens": max_tokens, "temperature": 0.8}))

        for _ in range(per):
            await start()
        while not stop.is_set():
            try:
                f = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(decode=False), 1.0))
            except asyncio.TimeoutError:
                continue
            if f["type"] == "done":
                await start()
        await ws.close()

    print(json.dumps({"event": "load_ready"}), flush=True)
    await asyncio.gather(*(session(k) for k in range(sessions)))


async def measure(url: str, resumes: int) -> dict[str, list[float]]:
    import msgspec
    from websockets.asyncio.client import connect

    def dec(data: Any) -> dict[str, Any]:
        out: dict[str, Any] = msgspec.msgpack.decode(data)
        return out

    out: dict[str, list[float]] = {"ready": [], "first": [], "replay": [], "fresh": []}
    for i in range(resumes):
        ws = await connect(url, compression=None)
        ready = dec(await ws.recv())
        await ws.send(msgspec.msgpack.encode({"type": "ack", "received": 0}))
        await ws.send(msgspec.msgpack.encode({"type": "generate", "id": "r", "prompt": f"JULIET {i}:\n",
                                              "max_tokens": 3000, "temperature": 0.8}))
        received, last_seq = 0, -1
        while received < 5:
            f = dec(await ws.recv())
            received += 1
            if f["type"] == "delta":
                last_seq = f["seq"]
        await asyncio.sleep(0.03)  # frames arrive unread: they are what the resume replays
        ws.transport.abort()
        t0 = time.perf_counter()
        ws = await connect(url, compression=None)
        await ws.send(msgspec.msgpack.encode({"type": "hello", "resume": ready["resume_token"],
                                              "received": received}))
        while True:
            f = dec(await ws.recv())
            if f["type"] == "ready" and f.get("resumed"):
                t_ready = time.perf_counter()
                replay = f.get("replay", 0)
                break
            if f["type"] == "error":
                raise RuntimeError(f"resume {i} refused: {f}")
        f = dec(await ws.recv())
        t_first = time.perf_counter()
        if f["type"] != "delta" or f["seq"] != last_seq + 1:
            raise RuntimeError(f"resume {i}: expected delta seq {last_seq + 1}, got {f}")
        out["ready"].append(t_ready - t0)
        out["first"].append(t_first - t0)
        out["replay"].append(float(replay))
        await ws.send(msgspec.msgpack.encode({"type": "cancel", "id": "r"}))
        while dec(await ws.recv())["type"] != "done":
            pass
        await ws.close()
        # Baseline: a new session from scratch, to its first token.
        t0 = time.perf_counter()
        ws = await connect(url, compression=None)
        await ws.recv()
        await ws.send(msgspec.msgpack.encode({"type": "generate", "id": "b", "prompt": f"JULIET {i}:\n",
                                              "max_tokens": 4, "temperature": 0.8}))
        while True:
            f = dec(await ws.recv())
            if f["type"] == "delta" and f["text"]:
                out["fresh"].append(time.perf_counter() - t0)
                break
            if f["type"] == "done":
                break
        while f["type"] != "done":
            f = dec(await ws.recv())
        await ws.close()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model folder (default: the bundled one)")
    ap.add_argument("--resumes", type=int, default=100)
    ap.add_argument("--streams", type=int, default=32, help="background generations kept running")
    ap.add_argument("--sessions", type=int, default=4, help="sessions the background streams use")
    ap.add_argument("--load-max-tokens", type=int, default=64)
    ap.add_argument("--load", default=None, help=argparse.SUPPRESS)  # internal: run as the load process
    args = ap.parse_args(argv)
    if args.load:
        asyncio.run(_load(args.load, args.sessions, args.streams, args.load_max_tokens))
        return 0
    if args.model is None:
        from rtws.default_model import DEFAULT_MODEL_PATH

        args.model = str(DEFAULT_MODEL_PATH)
    print_header("resume_bench", args)
    with ServerProcess({"model": args.model, "num_slots": max(64, args.streams + 8)}) as server:
        load = subprocess.Popen([sys.executable, __file__, "--load", server.url, "--streams", str(args.streams),
                                 "--sessions", str(args.sessions), "--load-max-tokens", str(args.load_max_tokens)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            assert load.stdout is not None
            if json.loads(load.stdout.readline() or "{}").get("event") != "load_ready":
                raise RuntimeError("load process did not start")
            deadline = time.monotonic() + 60.0  # wait until the load runs (its sessions connect first)
            while time.monotonic() < deadline:
                if sum(m["running"] + m["waiting"] for m in server.command("stats")["models"].values()) >= args.streams:
                    break
                time.sleep(0.1)
            before = server.command("stats")["models"]
            out = asyncio.run(measure(server.url, args.resumes))
            after = server.command("stats")["models"]
        finally:
            assert load.stdin is not None
            load.stdin.close()
            load.wait(30)
            if load.stdout is not None:
                load.stdout.close()
    print_table("resume_bench: latency (ms)", ["figure", "p50", "p99", "max", "n"], [
        ["reconnect -> ready {resumed}", ms(percentile(out["ready"], 50)), ms(percentile(out["ready"], 99)),
         ms(max(out["ready"])), str(len(out["ready"]))],
        ["reconnect -> first frame after it", ms(percentile(out["first"], 50)), ms(percentile(out["first"], 99)),
         ms(max(out["first"])), str(len(out["first"]))],
        ["baseline: new session -> first token", ms(percentile(out["fresh"], 50)),
         ms(percentile(out["fresh"], 99)), ms(max(out["fresh"])), str(len(out["fresh"]))],
    ])
    replays = out["replay"]
    print_table("resume_bench: load and replay", ["figure", "value"], [
        ["engine running + waiting at the end (background load)",
         str(sum(m["running"] + m["waiting"] for m in after.values()))],
        ["tokens generated during the run",
         str(sum(m["tokens"] for m in after.values()) - sum(m["tokens"] for m in before.values()))],
        ["frames replayed per resume, p50 / max", f"{percentile(replays, 50):.0f} / {max(replays):.0f}"],
        ["resumes with a replay", f"{sum(1 for r in replays if r > 0)}/{len(replays)}"],
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
