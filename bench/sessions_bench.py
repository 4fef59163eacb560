"""Many sessions: 1,000 concurrent WebSocket sessions on one server, each running one short generation.

    python bench/sessions_bench.py                               # 1,000 sessions, max_tokens 8, bundled model
    python bench/sessions_bench.py --sessions 2000 --num-slots 256 --procs 4

Phases, on one server child (``bench/serve_child.py``, started with
``--max-connections`` above the session count):

1. baseline: the server's RSS with no sessions (after its warm-up);
2. idle: every session connected and ``ready``, nothing generating: RSS again;
3. burst: every session sends one ``generate`` at the same moment; success
   rate (``done`` with ``length``/``stop``), TTFT and end-to-end p50/p99, the
   server's peak RSS and its event-loop lag during the burst;
4. closed: all sessions closed: RSS and connection count.

The parent raises ``RLIMIT_NOFILE`` first; the server and client processes inherit it.
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
    lag_row,
    ms,
    num,
    percentile,
    print_header,
    print_table,
    raise_nofile,
    thread_env,
)
from loadgen import Fleet, merge  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from rtws.default_model import DEFAULT_MODEL_PATH

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH), help="model folder, gpt2-random, ...")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=None, help="the server's torch threads (OMP_NUM_THREADS)")
    p.add_argument("--no-touch-kv", dest="touch_kv", action="store_false",
                   help="skip filling every KV slot before the baseline (then KV page-ins show up as growth)")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--prompt-chars", type=int, default=120, help="prompt length in characters (about 32 tokens)")
    p.add_argument("--num-slots", type=int, default=256, help="engine KV slots")
    p.add_argument("--max-connections", type=int, default=None, help="server limit (default: sessions + 100)")
    p.add_argument("--procs", type=int, default=min(4, os.cpu_count() or 1), help="client processes")
    p.add_argument("--settle-s", type=float, default=1.0, help="pause before each RSS reading")
    return p


class RssSampler:
    """Samples a process's RSS every ``interval`` seconds in a thread; keeps the peak."""

    def __init__(self, server: ServerProcess, interval: float = 0.02) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.server.rss_kib())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.server.rss_kib())


def mib(kib: float) -> str:
    return f"{kib / 1024:.1f}"


def settled_rss(server: ServerProcess, settle: float) -> int:
    time.sleep(settle)
    server.command("gc")
    return server.rss_kib()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    nofile = raise_nofile(max(4096, 3 * args.sessions + 256))
    print_header("sessions_bench", args)
    n = args.sessions
    prompt = corpus_text()[:args.prompt_chars]
    cfg: dict[str, Any] = {"model": args.model, "device": args.device, "dtype": args.dtype,
                           "num_slots": args.num_slots, "max_connections": args.max_connections or n + 100,
                           "idle_timeout_s": 3600.0, "ping_interval_s": None}
    server = ServerProcess(cfg, env=thread_env(args))
    print(f"# server pid {server.pid} port {server.port}; RLIMIT_NOFILE {nofile}; {args.procs} client procs; "
          f"num_slots {args.num_slots}; max_connections {cfg['max_connections']}")
    try:
        if args.touch_kv:
            server.command("touch_kv", timeout=600)
        rss0 = settled_rss(server, args.settle_s)
        t0 = time.monotonic()
        with Fleet(server.url, n, args.procs) as fleet:
            connect_s = time.monotonic() - t0
            ctimes = [t for a in fleet.connected for t in a["connect_times"]]
            stats_idle = server.command("stats")
            rss_idle = settled_rss(server, args.settle_s)
            server.command("lag_reset")
            with RssSampler(server) as sampler:
                res = merge(fleet.all({"op": "one_each", "prompt": prompt, "max_tokens": args.max_tokens}))
            lag = server.command("lag")
            rss_burst_after = server.rss_kib()
            connected = fleet.num_connected
            connect_errors = fleet.connect_errors
        for _ in range(200):  # the server notices the closes asynchronously
            if server.command("stats")["connections"] == 0:
                break
            time.sleep(0.05)
        stats_closed = server.command("stats")
        rss_closed = settled_rss(server, args.settle_s)
    finally:
        server.stop()

    ok = sum(v for k, v in res["reasons"].items() if k in ("length", "stop"))
    print(f"# connected {connected}/{n} in {connect_s:.1f} s (connect p50 {ms(percentile(ctimes, 50))} ms, p99 "
          f"{ms(percentile(ctimes, 99))} ms), errors {connect_errors}; server saw {stats_idle['connections']}")
    print(f"# burst: {res['requests']} generations, reasons {res['reasons']}, errors {res['errors']}, "
          f"{res['tokens']} tokens in {res['wall']:.2f} s; after close: {stats_closed['connections']} connections")
    print_table("server event-loop lag during the burst", ["phase", "p50 ms", "p99 ms", "max ms", "samples"],
                [lag_row(f"{n} sessions, 1 generation each", lag)])
    print_table("server RSS (VmRSS, MiB)", ["state", "RSS MiB", "vs baseline MiB", "per session KiB"], [
        ["no sessions (baseline)", mib(rss0), "0.0", "-"],
        [f"{connected} idle sessions", mib(rss_idle), mib(rss_idle - rss0),
         num((rss_idle - rss0) / max(1, connected), 1)],
        ["burst peak", mib(sampler.peak), mib(sampler.peak - rss0), num((sampler.peak - rss0) / max(1, connected), 1)],
        ["after burst", mib(rss_burst_after), mib(rss_burst_after - rss0), "-"],
        ["all closed", mib(rss_closed), mib(rss_closed - rss0), "-"],
    ])
    print_table(f"sessions_bench summary: {n} sessions, max_tokens {args.max_tokens}", ["figure", "value"], [
        ["sessions connected", f"{connected}/{n}"],
        ["generations succeeded", f"{ok}/{n} ({100 * ok / n:.1f}%)"],
        ["TTFT p50 / p99 ms", f"{ms(percentile(res['ttft'], 50))} / {ms(percentile(res['ttft'], 99))}"],
        ["end-to-end p50 / p99 ms", f"{ms(percentile(res['e2e'], 50))} / {ms(percentile(res['e2e'], 99))}"],
        ["burst wall s", f"{res['wall']:.2f}"],
        ["RSS baseline / idle / peak MiB", f"{mib(rss0)} / {mib(rss_idle)} / {mib(sampler.peak)}"],
        ["RSS per idle session KiB", num((rss_idle - rss0) / max(1, connected), 1)],
        ["loop lag p99 / max ms (burst)", f"{ms(lag.get('p99', float('nan')))} / {ms(lag.get('max', float('nan')))}"],
    ])
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
