"""Stalled readers: server memory with 100 sessions that stop reading vs 100 that read normally.

    python bench/memory_bench.py                         # 100 sessions each way, bundled model
    python bench/memory_bench.py --sessions 100 --stall-timeout-s 3 --high-watermark 16384

Each side runs on a fresh server child (``bench/serve_child.py``):

* normal: ``--sessions`` WebSocket sessions each start ``--gens-per-session``
  long generations and read everything;
* stalled: the same sessions and generations from raw sockets
  (``bench/loadgen.py`` ``RawConn``) that send their ``generate`` frames and
  then stop reading (``transport.pause_reading()``). Their sockets are opened
  with a small ``SO_RCVBUF`` and ``TCP_MAXSEG`` so the kernel holds kilobytes
  rather than the megabytes loopback allows; the server's own buffers then
  fill and its stall detector has something to detect.

Generation ids are padded to ``--id-len`` characters (the protocol allows
128): every ``delta`` frame repeats its id, so each token costs about that
many bytes on the wire, so the small bundled model fills a stalled
socket within a few generations (about 130 KB of frames with the defaults).

Reported side by side: server RSS before / peak / after, its growth per
session, the largest per-session send buffer the server held (against its
``send_high_watermark``), how many stalled sessions the server closed and
how long after they stopped reading, and the tokens computed.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ServerProcess,
    corpus_text,
    num,
    percentile,
    print_header,
    print_table,
    raise_nofile,
    thread_env,
)
from loadgen import Fleet, merge  # noqa: E402

TRANSPORT_HIGH_WATER = 64 * 1024  # asyncio/uvloop default write-buffer high-water mark used by uvicorn


def build_parser() -> argparse.ArgumentParser:
    from rtws.default_model import DEFAULT_MODEL_PATH

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (OMP_NUM_THREADS)")
    p.add_argument("--no-touch-kv", dest="touch_kv", action="store_false",
                   help="skip filling every KV slot before the baseline (then KV page-ins show up as growth)")
    p.add_argument("--sessions", type=int, default=100)
    p.add_argument("--gens-per-session", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=4096, help="per generation (the context caps it)")
    p.add_argument("--id-len", type=int, default=128, help="generation id length (bytes per delta frame)")
    p.add_argument("--prompt-chars", type=int, default=120)
    p.add_argument("--stall-timeout-s", type=float, default=3.0, help="the server's stall_timeout_s")
    p.add_argument("--high-watermark", type=int, default=None,
                   help="the server's send_high_watermark (default: the server's default)")
    p.add_argument("--num-slots", type=int, default=None, help="engine slots (default: sessions x gens)")
    p.add_argument("--rcvbuf", type=int, default=1024, help="stalled clients' SO_RCVBUF")
    p.add_argument("--maxseg", type=int, default=88, help="stalled clients' TCP_MAXSEG (88 is Linux's minimum)")
    p.add_argument("--procs", type=int, default=min(2, os.cpu_count() or 1), help="client processes")
    p.add_argument("--mode", choices=("both", "normal", "stalled"), default="both")
    p.add_argument("--timeout-s", type=float, default=300.0, help="give up waiting after this long")
    p.add_argument("--settle-s", type=float, default=0.5, help="pause before each RSS reading")
    return p


class Watch:
    """Polls the server child every ``interval``: RSS peak, connections, buffers, paused sessions."""

    def __init__(self, server: ServerProcess, interval: float = 0.05) -> None:
        self.server = server
        self.interval = interval
        self.peak_rss = 0
        self.max_buffered = 0
        self.max_paused = 0
        self.max_held = 0
        self.max_held_total = 0
        self.last: dict[str, Any] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            st = self.server.command("stats")
            self.last = st
            self.peak_rss = max(self.peak_rss, st.get("rss_kib", 0))
            self.max_buffered = max(self.max_buffered, st.get("max_buffered_bytes", 0))
            self.max_paused = max(self.max_paused, st.get("paused_sessions", 0))
            self.max_held = max(self.max_held, st.get("max_held_bytes", 0))
            self.max_held_total = max(self.max_held_total, st.get("held_bytes", 0))
            self._stop.wait(self.interval)

    def __enter__(self) -> Watch:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def server_cfg(args: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"model": args.model, "device": args.device, "dtype": args.dtype,
                           "num_slots": args.num_slots or args.sessions * args.gens_per_session,
                           "max_connections": args.sessions + 100, "stall_timeout_s": args.stall_timeout_s,
                           "max_generations_per_session": max(64, args.gens_per_session),
                           "idle_timeout_s": 3600.0, "ping_interval_s": None}
    if args.high_watermark is not None:
        cfg["send_high_watermark"] = args.high_watermark
    return cfg


def prepare(server: ServerProcess, args: Any) -> None:
    if args.touch_kv:
        server.command("touch_kv", timeout=args.timeout_s)


def settled_rss(server: ServerProcess, settle: float) -> int:
    time.sleep(settle)
    server.command("gc")
    return server.rss_kib()


def tokens_of(stats: dict[str, Any]) -> int:
    return sum(m.get("tokens", 0) for m in stats.get("models", {}).values())


def run_normal(args: Any, prompt: str) -> dict[str, Any]:
    with ServerProcess(server_cfg(args), env=thread_env(args)) as server:
        prepare(server, args)
        rss0 = settled_rss(server, args.settle_s)
        tok0 = tokens_of(server.command("stats"))
        with Fleet(server.url, args.sessions, args.procs) as fleet:
            rss_conn = settled_rss(server, args.settle_s)
            t0 = time.monotonic()
            with Watch(server) as w:
                res = merge(fleet.all({"op": "one_each", "prompt": prompt, "max_tokens": args.max_tokens,
                                       "gens": args.gens_per_session, "id_len": args.id_len}))
            wall = time.monotonic() - t0
            rss_done = server.rss_kib()
        for _ in range(200):
            if server.command("stats")["connections"] == 0:
                break
            time.sleep(0.05)
        st = server.command("stats")
        return {"rss0": rss0, "rss_conn": rss_conn, "peak": max(w.peak_rss, rss_done),
                "rss_after": settled_rss(server, args.settle_s),
                "max_buffered": w.max_buffered, "max_paused": w.max_paused,
                "max_held": w.max_held, "max_held_total": w.max_held_total, "tokens": tokens_of(st) - tok0,
                "delivered": res["tokens"], "frames": res["frames"], "reasons": res["reasons"],
                "errors": res["errors"], "closed": 0, "close_after": [], "wall": wall, "mode": "normal",
                "connections_left": st["connections"], "connected": fleet.num_connected}


def run_stalled(args: Any, prompt: str) -> dict[str, Any]:
    with ServerProcess(server_cfg(args), env=thread_env(args)) as server:
        prepare(server, args)
        rss0 = settled_rss(server, args.settle_s)
        tok0 = tokens_of(server.command("stats"))
        with Fleet(server.url, args.sessions, args.procs, raw=True, rcvbuf=args.rcvbuf, maxseg=args.maxseg) as fleet:
            rss_conn = settled_rss(server, args.settle_s)
            t0 = time.monotonic()
            with Watch(server) as w:
                ans = fleet.all({"op": "stall", "prompt": prompt, "max_tokens": args.max_tokens,
                                 "gens": args.gens_per_session, "id_len": args.id_len})
                stalled_at = min(a["stalled_at"] for a in ans)
                deadline = time.monotonic() + args.timeout_s
                idle_since: float | None = None
                # Done when every stalled session is closed and the engine is idle, or when the engine has
                # been idle for longer than the stall timeout (a session whose send never blocked stays open).
                while time.monotonic() < deadline:
                    st = w.last
                    if st:
                        busy = any(m["running"] + m["waiting"] for m in st.get("models", {}).values())
                        if not busy and st.get("connections", 1) == 0:
                            break
                        now = time.monotonic()
                        idle_since = None if busy else (idle_since or now)
                        if idle_since is not None and now - idle_since > args.stall_timeout_s + 2.0:
                            break
                    time.sleep(0.1)
            wall = time.monotonic() - t0
            st = server.command("stats")
        events = server.log_events("stalled")
        close_after = [e["ts"] - stalled_at for e in events]
        return {"rss0": rss0, "rss_conn": rss_conn, "peak": w.peak_rss, "rss_after": settled_rss(server, args.settle_s),
                "max_buffered": w.max_buffered, "max_paused": w.max_paused,
                "max_held": w.max_held, "max_held_total": w.max_held_total, "tokens": tokens_of(st) - tok0,
                "delivered": float("nan"), "frames": float("nan"), "reasons": {}, "errors": {},
                "closed": len(events), "close_after": close_after, "mode": "stalled", "wall": wall,
                "connections_left": st["connections"], "connected": fleet.num_connected}


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    raise_nofile(4 * args.sessions + 256)
    print_header("memory_bench", args)
    prompt = corpus_text()[:args.prompt_chars]
    runs: dict[str, dict[str, Any]] = {}
    if args.mode in ("both", "normal"):
        runs["normal readers"] = run_normal(args, prompt)
        r = runs["normal readers"]
        print(f"# normal: {r['connected']} sessions, reasons {r['reasons']}, errors {r['errors']}, "
              f"{r['delivered']} tokens delivered in {r['frames']} frames, {r['wall']:.1f} s")
    if args.mode in ("both", "stalled"):
        runs["stalled readers"] = run_stalled(args, prompt)
        r = runs["stalled readers"]
        print(f"# stalled: {r['connected']} sessions, {r['closed']} closed by the server as stalled, "
              f"{r['connections_left']} still open after {r['wall']:.1f} s")
    hw = args.high_watermark if args.high_watermark is not None else 256 * 1024
    n = args.sessions
    names = list(runs)

    def cells(f: Any) -> list[str]:
        return [f(runs[k]) for k in names]

    rows = [
        ["sessions x generations", *cells(lambda r: f"{r['connected']} x {args.gens_per_session}")],
        ["tokens computed", *cells(lambda r: num(r["tokens"]))],
        ["RSS before (MiB)", *cells(lambda r: mib(r["rss0"]))],
        ["RSS connected, idle (MiB)", *cells(lambda r: mib(r["rss_conn"]))],
        ["RSS peak (MiB)", *cells(lambda r: mib(r["peak"]))],
        ["RSS after, all closed (MiB)", *cells(lambda r: mib(r["rss_after"]))],
        ["peak growth per session (KiB)", *cells(lambda r: num((r["peak"] - r["rss0"]) / n, 1))],
        ["largest session send buffer (B)", *cells(lambda r: num(r["max_buffered"]))],
        ["most bytes held for one session (B)", *cells(lambda r: num(r["max_held"]))],
        ["most bytes held, all sessions (KiB)", *cells(lambda r: num(r["max_held_total"] / 1024, 1))],
        ["sessions paused at once (max)", *cells(lambda r: str(r["max_paused"]))],
        ["closed as stalled", *cells(lambda r: f"{r['closed']}/{n}" if r["mode"] == "stalled" else "-")],
        ["close after stop reading p50 / max s", *cells(
            lambda r: f"{percentile(r['close_after'], 50):.1f} / {max(r['close_after']):.1f}" if r["close_after"]
            else "-")],
        ["wall s", *cells(lambda r: f"{r['wall']:.1f}")],
    ]
    print(f"# per-session bound on bytes the server holds: send_high_watermark {hw} B (session buffer) + about "
          f"{TRANSPORT_HIGH_WATER} B (transport write-buffer high-water mark) + one step of frames; "
          f"{n} sessions -> at most about {mib(n * (hw + TRANSPORT_HIGH_WATER) / 1024)} MiB. 'bytes held' = session "
          f"send buffer + transport write buffer, sampled every 50 ms; RSS also moves with the engine's per-step "
          f"tensors at large batch")
    print_table(f"memory_bench summary: {n} sessions, stall timeout {args.stall_timeout_s} s, id length "
                f"{args.id_len}, send_high_watermark {hw} B", ["figure", *names], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
