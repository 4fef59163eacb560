"""Hostile clients beside normal streams: does anyone but the attacker notice?

    python bench/hostile_bench.py                       # 60 s per phase, 100 attackers, 32 streams, bundled model
    python bench/hostile_bench.py --duration 20 --attackers 40 --streams 8   # quicker

One real server (``bench/serve_child.py``, built like ``rtws serve``, with API keys on) and three phases:

1. **baseline**: ``--streams`` normal WebSocket clients (header-authenticated) each run generations of
   ``--max-tokens`` back to back for ``--duration`` seconds;
2. **attack**: the same normal load, plus ``--attackers`` hostile connections (in a separate process) that
   cycle through the attacks of issue 14 and reconnect whenever the server closes them: ping floods that never
   read, ``cancel`` floods that never read, trickle readers (1 KiB/s taken from the kernel, 4 KiB receive buffer),
   silent and slowloris TCP connections, keyless
   sockets holding the pre-auth budget, 512 KiB prompts, ``top_k`` 2**63 / NaN numbers, text garbage frames,
   trickled HTTP bodies;
3. **burst**: 1,000 ``generate`` frames sent at once over 40 sockets (short generations), for the server's
   event-loop lag during the burst.

Printed next to each other: normal streams' TTFT p99 and ITL p99 (client-side: gap between deltas divided by
the tokens they carry), generations completed and failed, the server's event-loop lag (10 ms sampler in the
server process), and its RSS (start, peak, growth) per phase; also each engine step's duration and rows,
and the server's garbage collections, per phase (the ITL tail follows the engine's step tail). Targets (issue 14): ITL p99 under attack within
1.5x of the baseline, no normal generation failed, RSS growth under 256 MiB, loop lag p99 under 10 ms during
the burst.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import random
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, lag_row, ms, percentile, print_header, print_table, raise_nofile  # noqa: E402

KEY = "hostile-bench-key"  # the normal streams' client
ATTACK_KEY = "attacker-key"  # authenticated attackers are another client (keyless ones hold the pre-auth budget)
ATTACKS = ["ping_flood", "cancel_flood", "trickle", "silent", "slowloris", "preauth", "huge_prompt",
           "bad_numbers", "text_garbage", "body_trickle"]
# Not in the default mix: the trickle attack as it was before 2026-12-01 20:40 UTC. It read through asyncio's
# StreamReader, whose transport takes everything the server sends into a 64 to 128 KiB user-space buffer at once,
# whatever the attacker's own read() calls take; to TCP (and so to the server) it is a fast reader of its whole
# output (8 x 512 tokens), that is, a heavy client using its per-client share, not a slow reader.
EXTRA_ATTACKS = ["buffered_trickle"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    p.add_argument("--streams", type=int, default=32, help="normal streams")
    p.add_argument("--attackers", type=int, default=100, help="hostile connections")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per normal generation")
    p.add_argument("--no-touch-kv", dest="touch_kv", action="store_false",
                   help="skip making the KV pool resident first (then its first-use page-ins count as RSS growth in "
                        "both phases, and as page faults inside engine steps)")
    p.add_argument("--attacker-nice", type=int, default=5,
                   help="niceness of the attacker process (19: it gets a core only when the server and the normal "
                        "clients leave one idle, as attackers on another machine would; their traffic is the same)")
    p.add_argument("--burst", type=int, default=1000, help="generate frames in the burst phase (0: skip)")
    p.add_argument("--num-slots", type=int, default=64)
    p.add_argument("--per-client", type=int, default=None,
                   help="max_generations_per_client (default: num_slots // 2; 0: none)")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    p.add_argument("--engine-process", default="auto", choices=("auto", "on", "off"),
                   help="the server's engine in a process of its own (rtws serve's default: auto)")
    p.add_argument("--reader-lead-bytes", type=int, default=None,
                   help="the server's reader_lead_bytes (default: rtws serve's; 0: the lead rule off)")
    p.add_argument("--attacks", default=",".join(ATTACKS),
                   help="comma-separated subset of: " + ", ".join(ATTACKS + EXTRA_ATTACKS))
    p.add_argument("--switch-ab", type=float, default=None, metavar="SECONDS",
                   help="probe: the server alternates sys.setswitchinterval between Python's default and this "
                        "every 0.5 s; engine step p50/p99 are printed per interval (interleaved A/B)")
    p.add_argument("--only-burst", action="store_true",
                   help="run only the burst phase (also against older servers, for a before/after)")
    return p


# --------------------------------------------------------------------------- raw WebSocket bits


def client_frame(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
    body = (int.from_bytes(payload, "big") ^ key).to_bytes(n, "big") if n else b""
    return head + mask + body


def upgrade_request(port: int, key: str | None) -> bytes:
    lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {base64.b64encode(os.urandom(16)).decode()}", "Sec-WebSocket-Version: 13",
             "Sec-WebSocket-Protocol: rtws.v1.msgpack"]
    if key:
        lines.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def ws_open_raw(port: int, key: str | None, rcvbuf: int = 4096) -> Any:
    """A WebSocket upgraded on a bare non-blocking socket, read only by explicit ``sock_recv`` calls: unlike a
    StreamReader's transport, nothing reads ahead, so the kernel's small receive buffer is the only slack and
    TCP holds the server back to the attacker's own reading rate."""
    import socket

    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, upgrade_request(port, key))
        head = b""
        while b"\r\n\r\n" not in head:  # the 101 response; what follows it stays in the kernel until read
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1), 10)
            if not chunk:
                raise ConnectionResetError
            head += chunk
    except BaseException:
        sock.close()
        raise
    return sock


async def ws_open(port: int, key: str | None, rcvbuf: int | None = 4096) -> tuple[Any, Any]:
    import socket

    sock = socket.socket()
    if rcvbuf:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(upgrade_request(port, key))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    return reader, writer


def mp_frame(obj: Any) -> bytes:
    return client_frame(0x2, msgspec.msgpack.encode(obj))


# --------------------------------------------------------------------------- attackers (separate process)


async def attacker(kind: str, port: int, end: float, counts: dict[str, int]) -> None:
    """Run one attack until ``end``, reconnecting whenever the server drops us."""
    while time.monotonic() < end:
        writer = None
        try:
            if kind in ("silent", "slowloris", "body_trickle"):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if kind == "body_trickle":
                    writer.write(b"POST /infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Authorization: Bearer " + ATTACK_KEY.encode() + b"\r\nContent-Length: 500\r\n\r\n{")
                payload = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 10_000
                i = 0
                while time.monotonic() < end and not reader.at_eof():
                    if kind == "slowloris":
                        writer.write(payload[i:i + 1])
                        i += 1
                    elif kind == "body_trickle":
                        writer.write(b" ")
                    try:
                        if await asyncio.wait_for(reader.read(4096), 2.0) == b"":
                            break
                    except asyncio.TimeoutError:
                        pass
            elif kind == "trickle":
                loop = asyncio.get_running_loop()
                sock = await ws_open_raw(port, ATTACK_KEY)
                try:
                    await loop.sock_sendall(sock, b"".join(
                        mp_frame({"type": "generate", "id": f"t{i}", "prompt": "a", "max_tokens": 512})
                        for i in range(8)))
                    while time.monotonic() < end:  # 1 KiB a second, taken from the kernel: a real trickle
                        if await loop.sock_recv(sock, 1024) == b"":
                            break
                        await asyncio.sleep(1.0)
                finally:
                    sock.close()
            else:
                reader, writer = await ws_open(port, None if kind == "preauth" else ATTACK_KEY)
                if kind == "ping_flood":
                    batch = client_frame(0x9, b"p" * 125) * 64
                    while time.monotonic() < end and not writer.is_closing():
                        writer.write(batch)
                        await asyncio.wait_for(writer.drain(), 5.0)
                        await asyncio.sleep(0.01)  # 6,400 pings/s per connection: a flood, not a CPU hog here
                elif kind == "cancel_flood":
                    batch = mp_frame({"type": "cancel", "id": "X" * 128}) * 100
                    while time.monotonic() < end:
                        writer.write(batch)
                        await asyncio.wait_for(writer.drain(), 5.0)
                        await asyncio.sleep(0.01)
                elif kind == "buffered_trickle":
                    for i in range(8):
                        writer.write(mp_frame({"type": "generate", "id": f"t{i}", "prompt": "a",
                                               "max_tokens": 512}))
                    while time.monotonic() < end:
                        if await reader.read(1024) == b"":
                            break
                        await asyncio.sleep(1.0)
                elif kind == "preauth":
                    while time.monotonic() < end:
                        if await reader.read(4096) == b"":
                            break
                else:
                    rnd = random.Random()
                    while time.monotonic() < end:
                        if kind == "huge_prompt":
                            writer.write(mp_frame({"type": "generate", "id": "h", "prompt": "z" * (512 * 1024)}))
                        elif kind == "bad_numbers":
                            writer.write(mp_frame({"type": "generate", "id": "n", "prompt": "a", "top_k": 2**63}))
                            writer.write(client_frame(0x1, b'{"type":"generate","id":"m","prompt":"a",'
                                                           b'"temperature":1e999,"seed":-1}'))
                        else:
                            writer.write(client_frame(0x1, bytes(rnd.randrange(32, 127) for _ in range(64))))
                        await asyncio.wait_for(writer.drain(), 5.0)
                        try:
                            while True:
                                if await asyncio.wait_for(reader.read(65536), 0.5) == b"":
                                    raise ConnectionResetError
                        except asyncio.TimeoutError:
                            pass
            counts["closed_by_server"] = counts.get("closed_by_server", 0) + 1
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            counts["closed_by_server"] = counts.get("closed_by_server", 0) + 1
        finally:
            if writer is not None:
                writer.transport.abort()
        counts[kind] = counts.get(kind, 0) + 1
        await asyncio.sleep(0.2)


def attackers_main(port: int, n: int, duration: float, out: Any, attacks: list[str] = ATTACKS,
                   niceness: int = 5) -> None:
    os.nice(niceness)

    async def main() -> dict[str, int]:
        end = time.monotonic() + duration
        counts: dict[str, int] = {}
        await asyncio.gather(*(attacker(attacks[i % len(attacks)], port, end, counts) for i in range(n)),
                             return_exceptions=True)
        return counts

    counts = asyncio.run(main())
    t = os.times()
    counts["cpu_s"] = int(t.user + t.system)
    out.put(counts)


# --------------------------------------------------------------------------- normal streams


async def normal_stream(url: str, end: float, max_tokens: int, res: dict[str, list[Any]]) -> None:
    from websockets.asyncio.client import connect

    async with connect(url, subprotocols=["rtws.v1.msgpack"],  # type: ignore[list-item]
                       additional_headers={"Authorization": f"Bearer {KEY}"}, max_size=2**24,
                       open_timeout=60) as ws:
        msgspec.msgpack.decode(await ws.recv(decode=False))  # ready
        n = 0
        while time.monotonic() < end:
            gid = f"n{n}"
            n += 1
            t0 = time.perf_counter()
            await ws.send(msgspec.msgpack.encode({"type": "generate", "id": gid, "prompt": "ROMEO:\n",
                                                  "max_tokens": max_tokens, "temperature": 1.0}))
            first = last = None
            tokens = 0
            while True:
                f = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(decode=False), 120))
                if f.get("id") != gid:
                    continue
                now = time.perf_counter()
                if f["type"] == "delta":
                    if first is None:
                        first = now
                        res["ttft"].append(now - t0)
                    elif last is not None and f["tokens"]:
                        res["itl"].append((now - last) / f["tokens"])
                    last = now
                    tokens += f["tokens"]
                elif f["type"] == "done":
                    ok = f["reason"] in ("length", "stop") and f["usage"]["completion_tokens"] == tokens
                    res["ok" if ok else "failed"].append(f["reason"])
                    break
                elif f["type"] == "error":
                    res["failed"].append(f["code"])
                    break


async def run_normal(url: str, streams: int, duration: float, max_tokens: int) -> dict[str, list[Any]]:
    res: dict[str, list[Any]] = {"ttft": [], "itl": [], "ok": [], "failed": []}
    end = time.monotonic() + duration
    out = await asyncio.gather(*(normal_stream(url, end, max_tokens, res) for _ in range(streams)),
                               return_exceptions=True)
    res["failed"] += [repr(e)[:80] for e in out if isinstance(e, BaseException)]
    return res


class RssSampler:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_kib())
            time.sleep(0.25)

    def __enter__(self) -> RssSampler:
        self.peak = self.server.rss_kib()
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


BURST_PER_SOCKET = 25  # under the per-client cap: each burst socket is its own client (own key)


def burst_keys(n: int) -> list[str]:
    return [f"burst-key-{i}" for i in range(-(-n // BURST_PER_SOCKET))]


async def burst(url: str, n: int) -> tuple[int, int]:
    """``n`` generate frames at once over n/25 sockets (one key each); wait for every answer -> (done, errors)."""
    from websockets.asyncio.client import connect

    keys = burst_keys(n)
    socks = len(keys)
    per = BURST_PER_SOCKET
    done = errors = 0

    async def one(i: int) -> tuple[int, int]:
        d = e = 0
        async with connect(url, subprotocols=["rtws.v1.msgpack"],  # type: ignore[list-item]
                           additional_headers={"Authorization": f"Bearer {keys[i]}"}, open_timeout=60) as ws:
            await ws.recv()
            frames = [msgspec.msgpack.encode({"type": "generate", "id": j, "prompt": f"burst {i} {j}",
                                              "max_tokens": 2}) for j in range(per)]
            for f in frames:
                await ws.send(f)
            while d + e < per:
                f = msgspec.msgpack.decode(await asyncio.wait_for(ws.recv(decode=False), 300))
                if f["type"] == "done":
                    d += 1
                elif f["type"] == "error":
                    e += 1
        return d, e

    for d, e in await asyncio.gather(*(one(i) for i in range(socks))):
        done += d
        errors += e
    return done, errors


def phase_rows(label: str, res: dict[str, list[Any]], lag: dict[str, Any], rss0: int, peak: int) -> list[str]:
    return [label, str(len(res["ok"])), str(len(res["failed"])), ms(percentile(res["ttft"], 50)),
            ms(percentile(res["ttft"], 99)), ms(percentile(res["itl"], 50)), ms(percentile(res["itl"], 99)),
            ms(lag.get("p99", float("nan"))), f"{rss0 / 1024:.0f}", f"{peak / 1024:.0f}",
            f"{(peak - rss0) / 1024:+.0f}"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_nofile(8192)
    print_header("hostile_bench", args)
    # The documented hostile-clients setup: clients have keys, and a per-client cap of half the slots, so one
    # client (here: every authenticated attacker shares ATTACK_KEY) cannot hold the slots the others need.
    cfg: dict[str, Any] = {"api_keys": [KEY, ATTACK_KEY, *burst_keys(args.burst)], "num_slots": args.num_slots,
                           "max_generations_per_session": 64, "max_connections": 2048}
    if args.per_client != 0:  # 0: no per-client cap (and no such field: lets --only-burst run older servers)
        cfg["max_generations_per_client"] = args.per_client or max(1, args.num_slots // 2)
    if args.model:
        cfg["model"] = args.model
    if args.threads:
        cfg["torch_threads"] = args.threads
    cfg["engine_process"] = args.engine_process
    if args.reader_lead_bytes is not None:
        cfg["reader_lead_bytes"] = args.reader_lead_bytes
    env = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    if args.switch_ab:
        env = {**(env or {}), "RTWS_BENCH_SWITCH_AB": str(args.switch_ab)}
    rows = []
    with ServerProcess(cfg, env=env) as server:
        url = server.url
        if args.only_burst:
            server.command("lag_reset")
            t0 = time.perf_counter()
            done, errors = asyncio.run(burst(url, args.burst))
            lag = server.command("lag")
            print_table("server event-loop lag during the burst (10 ms sampler in the server process)",
                        ["phase", "p50", "p99", "max", "samples"],
                        [lag_row(f"burst of {args.burst} generate frames ({done} done, {errors} errors, "
                                 f"{time.perf_counter() - t0:.1f} s)", lag)])
            return 0

        if args.touch_kv:
            t = server.command("touch_kv", timeout=600)
            print(f"# KV pool made resident before the phases: {t['touched_bytes'] / 2**20:.0f} MiB in "
                  f"{t['seconds']:.1f} s (RSS {t['rss_kib'] / 1024:.0f} MiB)")
        server.command("lag_reset")
        server.command("steps_reset")
        cpu0 = server.cpu_seconds()
        with RssSampler(server) as rss:
            rss0 = rss.peak
            base = asyncio.run(run_normal(url, args.streams, args.duration, args.max_tokens))
        base_lag = server.command("lag")
        base_steps = server.command("steps")
        base_cpu = server.cpu_seconds() - cpu0
        rows.append(phase_rows("baseline", base, base_lag, rss0, rss.peak))

        q: Any = mp.get_context("spawn").Queue()
        proc = mp.get_context("spawn").Process(target=attackers_main,
                                                args=(server.port, args.attackers, args.duration + 2.0, q,
                                                      [a for a in args.attacks.split(",") if a],
                                                      args.attacker_nice))
        server.command("lag_reset")
        server.command("steps_reset")
        cpu0 = server.cpu_seconds()
        with RssSampler(server) as rss:
            rss0 = rss.peak
            proc.start()
            time.sleep(2.0)  # attackers ramp up first
            hostile = asyncio.run(run_normal(url, args.streams, args.duration, args.max_tokens))
            counts = q.get(timeout=args.duration + 120)
            proc.join(30)
        attack_lag = server.command("lag")
        attack_steps = server.command("steps")
        attack_cpu = server.cpu_seconds() - cpu0
        events = {e: len(server.log_events(e)) for e in ("stalled", "error_budget", "control_budget",
                                                          "transport_buffer", "raw_connection_refused")}
        for e in ("ws_refused", "upgrade_cooldown"):  # logged at most once a second, with a running total
            events[e] = max((int(d.get("refused_total", 1)) for d in server.log_events(e)), default=0)
        rows.append(phase_rows(f"+ {args.attackers} attackers", hostile, attack_lag, rss0, rss.peak))
        attack_peak, attack_rss0 = rss.peak, rss0

        burst_row: list[str] | None = None
        if args.burst:
            server.command("lag_reset")
            t0 = time.perf_counter()
            done, errors = asyncio.run(burst(url, args.burst))
            burst_s = time.perf_counter() - t0
            burst_lag = server.command("lag")
            burst_row = lag_row(f"burst of {args.burst} generate frames ({done} done, {errors} errors, "
                                f"{burst_s:.1f} s)", burst_lag)
        stats = server.command("stats")

    print_table("normal streams: baseline vs under attack",
                ["phase", "gens ok", "failed", "TTFT p50", "TTFT p99", "ITL p50", "ITL p99", "loop lag p99",
                 "RSS start MiB", "RSS peak MiB", "growth MiB"], rows)
    print_table("server event-loop lag (10 ms sampler in the server process)",
                ["phase", "p50", "p99", "max", "samples"],
                [lag_row("baseline", base_lag), lag_row("under attack", attack_lag)]
                + ([burst_row] if burst_row else []))
    print_table("engine steps (duration of each engine step, and the rows it computed: normal + attacker "
                "generations)", ["phase", "steps", "p50 ms", "p99 ms", "max ms", "mean rows"],
                [[label, str(st.get("steps", 0)), ms(st.get("p50", float("nan"))), ms(st.get("p99", float("nan"))),
                  ms(st.get("max", float("nan"))), f"{st.get('rows', float('nan')):.1f}"]
                 for label, st in (("baseline", base_steps), ("under attack", attack_steps))])
    print_table("engine steps with a prefill chunk (new prompts) and decode-only steps",
                ["phase", "prefill steps", "prompt tokens", "prefill p50 / p99 ms", "decode-only p50 / p99 ms"],
                [[label, str(st.get("prefill_steps", "-")), str(st.get("prefill_tokens", "-")),
                  f"{ms(st.get('prefill_p50', float('nan')))} / {ms(st.get('prefill_p99', float('nan')))}",
                  f"{ms(st.get('decode_p50', float('nan')))} / {ms(st.get('decode_p99', float('nan')))}"]
                 for label, st in (("baseline", base_steps), ("under attack", attack_steps))])
    print_table("garbage collections in the server (each holds the GIL: engine and loop both wait)",
                ["phase", "gen 0 n / total ms", "gen 1 n / total ms", "gen 2 n / total ms", "gen 2 max ms"],
                [[label] + [f"{st['gc'][g]['n']} / {st['gc'][g]['total'] * 1e3:.0f}" for g in ("0", "1", "2")]
                 + [ms(st["gc"]["2"]["max"])]
                 for label, st in (("baseline", base_steps), ("under attack", attack_steps)) if "gc" in st])
    if args.switch_ab:
        print_table("engine steps by GIL switch interval (interleaved every 0.5 s)",
                    ["phase", "interval s", "steps", "p50 ms", "p99 ms"],
                    [[label, k, str(v["steps"]), ms(v["p50"]), ms(v["p99"])]
                     for label, st in (("baseline", base_steps), ("under attack", attack_steps))
                     for k, v in sorted(st.get("by_switch_interval", {}).items())])
    attacker_cpu = counts.pop("cpu_s", 0)
    print_table("attack connections (each ends when the server closes it; then it reconnects)",
                ["attack", "connections made"], [[k, str(v)] for k, v in sorted(counts.items())])
    print_table("server-side refusals logged during the attack phase (WARNING events)", ["event", "count"],
                [[k, str(v)] for k, v in events.items()])
    print_table("CPU seconds per phase", ["process", "baseline", "attack"],
                [["server", f"{base_cpu:.1f}", f"{attack_cpu:.1f}"], ["attackers", "-", f"{attacker_cpu:.1f}"]])
    itl_ratio = percentile(hostile["itl"], 99) / percentile(base["itl"], 99)
    growth = (attack_peak - attack_rss0) / 1024
    print_table("hostile_bench summary (targets from issue 14)", ["figure", "value", "target"], [
        ["ITL p99 under attack / baseline", f"{itl_ratio:.2f}x", "<= 1.5x"],
        ["TTFT p99 baseline / under attack", f"{ms(percentile(base['ttft'], 99))} / "
                                             f"{ms(percentile(hostile['ttft'], 99))}", "-"],
        ["normal generations failed under attack", str(len(hostile["failed"])), "0"],
        ["server RSS growth under attack", f"{growth:+.0f} MiB", "< 256 MiB"],
        ["loop lag p99 during the burst", burst_row[2] if burst_row else "-", "< 10 ms"],
        ["server connections at the end", str(stats.get("connections", "?")), "-"],
    ])
    if hostile["failed"]:
        print("# failed under attack:", hostile["failed"][:10])
    return 0


if __name__ == "__main__":
    sys.exit(main())
