"""The OpenAI Realtime API edge against the native protocol: the same 8 streams through ``/v1/realtime`` and ``/ws``.

One server child (``bench/serve_child.py``, the bundled model by default).
Each round runs the same ``--streams`` greedy chat generations concurrently
on one connection: through ``/ws`` (msgpack, ``generate`` frames) and through
``/v1/realtime`` (JSON events, out-of-band ``response.create`` with
``conversation: "none"``, so they may overlap). Rounds alternate A B B A ...
so drift on a shared machine hits both alike; every figure below pools all
rounds of one transport.

Reported per transport: time to first delta (request sent -> first text
delta), inter-delta gap p50/p99 (a native delta may carry several tokens when
the socket is busy; a Realtime delta event carries the same text), and server
CPU per generated token (user+system seconds of the server process over the
rounds / tokens). The script checks that both transports produced the same
text for every stream (greedy), and prints the figures next to each other.

    PYTHONPATH=$PWD python bench/realtime_bench.py [--streams 8] [--max-tokens 128] [--rounds 4]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ServerProcess,
    add_model_args,
    ms,
    percentile,
    print_header,
    print_table,
    server_config,
    thread_env,
)


def questions(n: int) -> list[str]:
    base = ["Who art thou?", "What light through yonder window breaks?", "Wherefore art thou Romeo?",
            "Speak, what news?", "How fares my lady?", "Is the day so young?", "What say you to this?",
            "Why, what is the matter?"]
    return [base[i % len(base)] + (f" ({i // len(base)})" if i >= len(base) else "") for i in range(n)]


class Stream:
    __slots__ = ("sent", "first", "last", "gaps", "text", "tokens")

    def __init__(self) -> None:
        self.sent = 0.0
        self.first: float | None = None
        self.last = 0.0
        self.gaps: list[float] = []
        self.text: list[str] = []
        self.tokens = 0

    def delta(self, text: str, now: float) -> None:
        if not text:
            return
        if self.first is None:
            self.first = now
        else:
            self.gaps.append(now - self.last)
        self.last = now
        self.text.append(text)


async def run_ws(port: int, qs: list[str], max_tokens: int) -> list[Stream]:
    from websockets.asyncio.client import connect

    from rtws import protocol as p

    codec = p.MSGPACK
    streams = [Stream() for _ in qs]
    async with connect(f"ws://127.0.0.1:{port}/ws", subprotocols=[p.SUBPROTOCOL_MSGPACK],  # type: ignore[list-item]
                       max_size=None) as ws:
        assert isinstance(codec.decode_any(await ws.recv()), p.Ready)
        for i, q in enumerate(qs):
            streams[i].sent = time.perf_counter()
            await ws.send(codec.encode(p.Generate(id=i, messages=[p.Message(role="user", content=q)],
                                                  max_tokens=max_tokens, temperature=0.0)))
        done = 0
        while done < len(qs):
            f = codec.decode_any(await ws.recv())
            now = time.perf_counter()
            if isinstance(f, p.Delta):
                streams[int(f.id)].delta(f.text, now)
            elif isinstance(f, p.Done):
                streams[int(f.id)].tokens = f.usage.completion_tokens
                done += 1
            else:
                raise RuntimeError(f"unexpected frame {f}")
    return streams


async def run_realtime(port: int, qs: list[str], max_tokens: int) -> list[Stream]:
    from websockets.asyncio.client import connect

    streams = [Stream() for _ in qs]
    loads, dumps = json.loads, json.dumps
    async with connect(f"ws://127.0.0.1:{port}/v1/realtime", max_size=None) as ws:
        assert loads(await ws.recv())["type"] == "session.created"
        for i, q in enumerate(qs):
            streams[i].sent = time.perf_counter()
            await ws.send(dumps({"type": "response.create", "response": {
                "conversation": "none", "max_output_tokens": max_tokens, "temperature": 0.0,
                "metadata": {"i": str(i)},
                "input": [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": q}]}]}}))
        index: dict[str, int] = {}
        done = 0
        while done < len(qs):
            e = loads(await ws.recv())
            now = time.perf_counter()
            t = e["type"]
            if t == "response.output_text.delta":
                streams[index[e["response_id"]]].delta(e["delta"], now)
            elif t == "response.created":
                index[e["response"]["id"]] = int(e["response"]["metadata"]["i"])
            elif t == "response.done":
                r = e["response"]
                streams[index[r["id"]]].tokens = r["usage"]["output_tokens"]
                done += 1
            elif t == "error":
                raise RuntimeError(f"error event {e}")
    return streams


def encode_cost(n: int = 100_000) -> tuple[float, float]:
    """Seconds per delta frame, in this process: the native msgpack encode vs the Realtime translation + split."""
    from rtws import protocol as p
    from rtws.conversations import Item
    from rtws.realtime import RealtimeConnection, Response, SessionConfig

    rt = RealtimeConnection(SessionConfig(model="m"), 100)
    rid = "resp_" + "ab" * 10
    resp = Response(id=rid, item=Item(id="item_1", role="assistant", content=""), conversation=None,
                    max_output_tokens=100, metadata=None)
    rt.responses[rid] = resp
    frame = p.Delta(id=rid, seq=1, text=" the", tokens=1)
    enc = p.MSGPACK.encode
    t0 = time.perf_counter()
    for _ in range(n):
        enc(frame)
    native = (time.perf_counter() - t0) / n
    t0 = time.perf_counter()
    for i in range(n):
        for line in rt.translate(frame).split(b"\n"):
            line.decode()
        if i % 1000 == 0:
            resp.text.clear()
    return native, (time.perf_counter() - t0) / n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap, default_concurrency=8)
    ap.add_argument("--streams", type=int, default=8, help="concurrent streams per round")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4, help="rounds per transport (alternating A B B A)")
    args = ap.parse_args(argv)
    print_header("realtime_bench", args)
    qs = questions(args.streams)
    cfg = server_config(args, num_slots=max(16, args.streams), max_tokens_limit=max(4096, args.max_tokens),
                        idle_timeout_s=3600.0, ping_interval_s=None)
    runners = {"/ws (msgpack)": run_ws, "/v1/realtime (JSON events)": run_realtime}
    names = list(runners)
    pooled: dict[str, dict[str, Any]] = {n: {"ttft": [], "gaps": [], "cpu": 0.0, "tokens": 0, "wall": 0.0}
                                        for n in names}
    texts: dict[str, list[str]] = {}
    with ServerProcess(cfg, env=thread_env(args)) as server:
        asyncio.run(run_ws(server.port, qs[:2], 8))  # warm both paths once (not measured)
        asyncio.run(run_realtime(server.port, qs[:2], 8))
        order = [names[(r // 2 + r) % 2] for r in range(2 * args.rounds)]  # A B B A A B B A ...
        for name in order:
            cpu0, t0 = server.cpu_seconds(), time.perf_counter()
            streams = asyncio.run(runners[name](server.port, qs, args.max_tokens))
            acc = pooled[name]
            acc["wall"] += time.perf_counter() - t0
            acc["cpu"] += server.cpu_seconds() - cpu0
            acc["tokens"] += sum(s.tokens for s in streams)
            acc["ttft"] += [s.first - s.sent for s in streams if s.first is not None]
            acc["gaps"] += [g for s in streams for g in s.gaps]
            got = ["".join(s.text) for s in streams]
            if name in texts and texts[name] != got:
                raise RuntimeError(f"{name}: greedy outputs changed between rounds")
            texts[name] = got
    same = texts[names[0]] == texts[names[1]]
    rows = []
    for n in names:
        a = pooled[n]
        rows.append([n, str(a["tokens"]), ms(percentile(a["ttft"], 50)), ms(percentile(a["ttft"], 99)),
                     ms(percentile(a["gaps"], 50)), ms(percentile(a["gaps"], 99)),
                     f"{1e6 * a['cpu'] / max(1, a['tokens']):.0f}", f"{a['tokens'] / a['wall']:.0f}"])
    print_table(f"{args.streams} streams x {args.rounds} rounds per transport, greedy, max_tokens "
                f"{args.max_tokens}; times in ms",
                ["transport", "tokens", "first delta p50", "first delta p99", "gap p50", "gap p99",
                 "server CPU us/token", "tok/s"], rows)
    a, b = pooled[names[0]], pooled[names[1]]
    cpu_a, cpu_b = a["cpu"] / max(1, a["tokens"]), b["cpu"] / max(1, b["tokens"])
    print(f"# realtime / ws: server CPU per token {cpu_b / cpu_a:.2f}x; first delta p50 "
          f"{percentile(b['ttft'], 50) / percentile(a['ttft'], 50):.2f}x; gap p50 "
          f"{percentile(b['gaps'], 50) / percentile(a['gaps'], 50):.2f}x")
    native, translated = encode_cost()
    print(f"# per delta frame, in-process: msgpack encode {native * 1e6:.2f} us, Realtime event (translate + "
          f"split + str) {translated * 1e6:.2f} us")
    print(f"# same greedy text on both transports for all {args.streams} streams: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
