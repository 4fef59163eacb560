"""End to end: a real rtws server in a child process, real WebSocket clients in several processes.

    python bench/e2e_bench.py                                  # bundled model, 32 streams, sweep 1,8,32
    python bench/e2e_bench.py --concurrency 32 --requests 128 --max-tokens 128 --cancels 100
    python bench/e2e_bench.py --rate 20 --requests 200         # Poisson arrivals instead of closed loop
    python bench/e2e_bench.py --model gpt2-random --device cuda --dtype bfloat16 --concurrency 256 \
        --requests 512 --max-tokens 128 --sweep 1,256

The server is ``bench/serve_child.py`` (the app exactly as ``rtws serve``
builds it, plus an event-loop lag sampler reachable only through the child's
stdin/stdout). Clients (``bench/loadgen.py``) hold ``--connections``
sessions with several streams each, spread over ``--procs`` processes,
closed loop by default (a stream starts its next request when one ends).

Reported: TTFT, per-token latency (gap between frames of a stream divided by
the tokens the later frame carries), end-to-end latency, delivered tokens/s,
cancel latency (``cancel`` sent to ``done {cancelled}`` received, measured
while the same closed-loop load runs), and the server's event-loop lag idle
and under load. Baseline, same run: the engine alone (``bench/common.py``
``run_engine``, the same prompts, ``max_tokens`` and greedy sampling as the
WebSocket requests, EOS honoured like the server does) at the same
concurrency, in this process. The last table is the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RunStats,
    ServerProcess,
    add_model_args,
    lag_row,
    load_served,
    max_tokens_list,
    ms,
    num,
    percentile,
    print_header,
    print_table,
    ratio,
    run_engine,
    server_config,
    slots_for,
    text_prompts,
    thread_env,
)
from loadgen import Fleet, merge, split  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--requests", type=int, default=128, help="requests in the main phase")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens per request")
    p.add_argument("--mixed", action="store_true", help="max_tokens uniform in 16..256 (seeded) instead")
    p.add_argument("--connections", type=int, default=None,
                   help="sessions (default: min(c, max(8, c/16)); each carries c/connections streams)")
    p.add_argument("--procs", type=int, default=min(4, os.cpu_count() or 1), help="client processes")
    p.add_argument("--batch", action="store_true",
                   help="clients opt in to batch messages (hello {batch: true}; docs/protocol.md)")
    p.add_argument("--rate", type=float, default=None, help="Poisson arrivals at this many requests/s (open loop)")
    p.add_argument("--cancels", type=int, default=100, help="cancel probes under load (0: skip)")
    p.add_argument("--sweep", default="1,8,32", help="also measure delivered tok/s at these concurrencies ('' skips)")
    p.add_argument("--sweep-requests", type=int, default=2, help="requests per stream at each sweep level (min 4)")
    p.add_argument("--repeat", type=int, default=3,
                   help="paired e2e / engine-only runs (ABBA order); the median is reported")
    p.add_argument("--lag-idle-s", type=float, default=1.0, help="seconds of idle loop-lag sampling first")
    p.add_argument("--warmup", type=int, default=None,
                   help="requests in one unmeasured e2e pass and one engine-only pass before the paired runs, so "
                        "neither side pays first-use costs (KV pages touched for the first time, allocator "
                        "growth) inside a measured run (default 2 x concurrency; 0 skips)")
    p.add_argument("--no-baseline", action="store_true", help="skip the engine-only baseline")
    return p


def layout(c: int, connections: int | None) -> tuple[int, int]:
    """(connections, streams per connection) for ``c`` concurrent streams."""
    conns = max(1, min(c, connections or max(8, c // 16)))
    return conns, math.ceil(c / conns)


class Bench:
    def __init__(self, args: Any) -> None:
        self.args = args
        self.loop = asyncio.new_event_loop()
        sweep = [int(x) for x in args.sweep.split(",") if x.strip()] if args.sweep else []
        self.sweep = sweep
        top = max([args.concurrency, *sweep])
        self.slots = slots_for(args, top)
        self.served = load_served(args, self.slots)
        self.served.start(self.loop)
        self.cap = self.served.context_len - args.prompt_len - 8  # text prompts re-encode to about prompt_len
        n = max(args.requests, max([max(4, s * args.sweep_requests) for s in sweep], default=0))
        self.prompts = text_prompts(self.served.tokenizer, n, args.prompt_len, args.seed)
        self.ids = [self.served.encode(t) for t in self.prompts]  # exactly what the server feeds its engine
        self.mts = max_tokens_list(n, args.max_tokens, args.mixed, cap=self.cap, seed=args.seed + 1)
        top_conns, top_streams = layout(top, args.connections)
        self.server = ServerProcess(server_config(
            args, num_slots=self.slots, max_connections=top_conns + 64,
            max_generations_per_session=max(64, 2 * top_streams),
            max_tokens_limit=max(4096, max(self.mts)),
            idle_timeout_s=3600.0, ping_interval_s=None,
        ), env=thread_env(args))

    def close(self) -> None:
        self.server.stop()
        self.served.stop()
        self.loop.close()

    def engine_only(self, c: int, n: int) -> RunStats:
        cpu0 = sum(os.times()[:2])
        st = self.loop.run_until_complete(run_engine(self.served.engine, self.ids[:n], self.mts[:n], c,
                                                     ignore_eos=False, temperature=0.0, label="engine only"))
        st.extra["cpu_s"] = sum(os.times()[:2]) - cpu0
        return st

    def e2e(self, c: int, n: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """Closed loop (or Poisson with --rate) over ``n`` requests at concurrency ``c``. Returns (merged, lag)."""
        args = self.args
        conns, streams = layout(c, args.connections)
        reqs = list(zip(self.prompts[:n], self.mts[:n]))
        with Fleet(self.server.url, conns, args.procs, batch=args.batch) as fleet:
            if fleet.num_connected != conns:
                raise RuntimeError(f"only {fleet.num_connected}/{conns} connections: {fleet.connect_errors}")
            parts = split(reqs, fleet.shares)
            self.server.command("lag_reset")
            cpu0 = self.server.cpu_seconds()
            if args.rate:
                rates = [args.rate * s / conns for s in fleet.shares]
                answers = fleet.all(lambda i: {"op": "poisson", "requests": parts[i], "rate": rates[i]})
            else:
                answers = fleet.all(lambda i: {"op": "run", "requests": parts[i], "streams": streams})
            lag = self.server.command("lag")
            res = merge(answers)
            res["server_cpu_s"] = self.server.cpu_seconds() - cpu0
            res["layout"] = f"{conns}x{streams}"
        return res, lag

    def cancels(self, c: int) -> tuple[dict[str, Any], dict[str, Any]]:
        """``--cancels`` probes, one at a time, while ``c`` closed-loop streams keep the server busy."""
        args = self.args
        conns, streams = layout(c, args.connections)
        reqs = list(zip(self.prompts, self.mts))
        with Fleet(self.server.url, conns, args.procs, batch=args.batch) as load, Fleet(self.server.url, 1, 1) as probe:
            parts = split(reqs, load.shares)
            load.send([{"op": "background", "requests": parts[i], "streams": streams}
                       for i in range(len(load.procs))])
            time.sleep(0.5)  # let the load reach steady state
            self.server.command("lag_reset")
            ans = probe.all({"op": "cancel_probe", "count": args.cancels, "prompt": self.prompts[0],
                             "max_tokens": self.cap})
            lag = self.server.command("lag")
            load.stop_event.set()
            bg = merge(load._collect("background"))
        res = merge(ans)
        res["background_tokens"] = bg["tokens"]
        return res, lag


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_header("e2e_bench", args)
    b = Bench(args)
    c = args.concurrency
    print(f"# model {args.model} on {b.served.device}; server pid {b.server.pid} port {b.server.port}; "
          f"slots {b.slots}; client procs {args.procs}; max_tokens cap {b.cap}")
    try:
        b.server.command("lag_reset")
        time.sleep(args.lag_idle_s)
        idle_lag = b.server.command("lag")
        warm = 2 * c if args.warmup is None else args.warmup
        if warm > 0:
            b.e2e(c, min(warm, len(b.prompts)))
            if not args.no_baseline:
                b.engine_only(c, min(warm, len(b.prompts)))
            print(f"# warm-up: {warm} requests e2e" + ("" if args.no_baseline else " and engine-only") + ", unmeasured")
        pairs: list[tuple[dict[str, Any], dict[str, Any], RunStats | None]] = []
        for k in range(args.repeat):
            # ABBA order, so a drift in the machine's load hits both sides alike.
            if k % 2 == 0 or args.no_baseline:
                res, lag = b.e2e(c, args.requests)
                eng = None if args.no_baseline else b.engine_only(c, args.requests)
            else:
                eng = b.engine_only(c, args.requests)
                res, lag = b.e2e(c, args.requests)
            pairs.append((res, lag, eng))
            print(f"# run {k + 1}: e2e {num(res['tok_s'])} tok/s"
                  + (f", engine-only {num(eng.tok_s)} tok/s, ratio {res['tok_s'] / eng.tok_s:.2f}" if eng else ""))
        # Report the median run (by e2e tok/s; the lower middle one for an even count) and the median of
        # the per-run ratios.
        pairs.sort(key=lambda x: x[0]["tok_s"])
        e, lag_main, eng_main = pairs[(len(pairs) - 1) // 2]
        ratios = sorted(r["tok_s"] / g.tok_s for r, _, g in pairs if g is not None and g.tok_s > 0)
        med_ratio = statistics.median(ratios) if ratios else float("nan")  # an even count averages the middle two
        eng_runs = sorted((g for _, _, g in pairs if g is not None), key=lambda g: g.tok_s)
        if eng_runs:
            eng_main = eng_runs[(len(eng_runs) - 1) // 2]
        cpu_tok_e2e = e["server_cpu_s"] / max(1, e["tokens"])
        cpu_tok_eng = eng_main.extra["cpu_s"] / max(1, eng_main.tokens) if eng_main else float("nan")
        print(f"# main (median of {args.repeat}): {e['requests']} requests over {e['layout']} (connections x "
              f"streams), {e['tokens']} tokens in {e['frames']} frames, reasons {e['reasons']}, errors "
              f"{e['errors']}; CPU s: server {e['server_cpu_s']:.1f}, clients {e['cpu_s']:.1f}"
              + (f"; engine-only: {eng_main.tokens} tokens, CPU {eng_main.extra['cpu_s']:.1f} s"
                 if eng_main else ""))
        cancel: dict[str, Any] | None = None
        cancel_lag: dict[str, Any] = {}
        if args.cancels > 0:
            cancel, cancel_lag = b.cancels(c)
            print(f"# cancels: {len(cancel['cancel'])} measured, reasons {cancel['reasons']}, "
                  f"errors {cancel['errors']}, background tokens {cancel['background_tokens']}")
        sweep_rows = []
        for s in b.sweep:
            n = max(4, s * args.sweep_requests)
            res, _ = b.e2e(s, n)
            eng = None if args.no_baseline else b.engine_only(s, n)
            sweep_rows.append([str(s), res["layout"], str(n), num(res["tokens"]), num(res["tok_s"]),
                               num(eng.tok_s) if eng else "-", ratio(res["tok_s"], eng.tok_s) if eng else "-",
                               ms(percentile(res["ttft"], 50)), ms(percentile(res["itl"], 50)),
                               ms(percentile(res["itl"], 99))])
    finally:
        b.close()

    print_table("server event-loop lag (10 ms sampler in the server process)",
                ["phase", "p50 ms", "p99 ms", "max ms", "samples"],
                [lag_row("idle", idle_lag), lag_row(f"load, {c} streams", lag_main)]
                + ([lag_row(f"cancel probes + {c} streams", cancel_lag)] if cancel else []))
    if cancel is not None:
        cl = cancel["cancel"]
        print_table("cancel latency (cancel sent -> done{cancelled} received), under load",
                    ["probes", "p50 ms", "p99 ms", "max ms"],
                    [[str(len(cl)), ms(percentile(cl, 50)), ms(percentile(cl, 99)),
                      ms(max(cl) if cl else float("nan"))]])
    if sweep_rows:
        print_table("delivered tokens/s by concurrency (closed loop)",
                    ["streams", "conns x streams", "requests", "tokens", "e2e tok/s", "engine tok/s", "e2e/engine",
                     "TTFT p50 ms", "ITL p50 ms", "ITL p99 ms"], sweep_rows)
    rows = [["TTFT", ms(percentile(e["ttft"], 50)), ms(percentile(e["ttft"], 95)), ms(percentile(e["ttft"], 99))],
            ["inter-token", ms(percentile(e["itl"], 50)), ms(percentile(e["itl"], 95)), ms(percentile(e["itl"], 99))],
            ["end-to-end", ms(percentile(e["e2e"], 50)), ms(percentile(e["e2e"], 95)), ms(percentile(e["e2e"], 99))]]
    if eng_main is not None:
        rows.append(["engine-only ITL", ms(percentile(eng_main.itl, 50)), ms(percentile(eng_main.itl, 95)),
                     ms(percentile(eng_main.itl, 99))])
    print_table(f"e2e latency, {c} streams ({'Poisson ' + str(args.rate) + '/s' if args.rate else 'closed loop'})",
                ["metric", "p50 ms", "p95 ms", "p99 ms"], rows)
    summary = [["e2e delivered tok/s", num(e["tok_s"])]]
    if eng_main is not None and args.rate:
        summary += [["engine-only tok/s (closed loop)", num(eng_main.tok_s)],
                     ["e2e / engine-only", "n/a: Poisson arrivals limit the e2e rate"]]
    elif eng_main is not None:
        summary += [["engine-only tok/s", num(eng_main.tok_s)],
                    [f"e2e / engine-only (median of {len(ratios)} paired runs: "
                     + ", ".join(f"{100 * r:.0f}%" for r in ratios) + ")", f"{100 * med_ratio:.0f}%"],
                    ["CPU ms per token: server / engine-only", f"{cpu_tok_e2e * 1e3:.3f} / {cpu_tok_eng * 1e3:.3f}"],
                    ["CPU-normalised e2e / engine-only", f"{100 * cpu_tok_eng / cpu_tok_e2e:.0f}%"
                     if cpu_tok_e2e > 0 else "-"]]
    if cancel is not None:
        summary.append(["cancel p50 / p99 ms", f"{ms(percentile(cancel['cancel'], 50))} / "
                                               f"{ms(percentile(cancel['cancel'], 99))}"])
    summary.append(["loop lag p99 ms idle / load", f"{ms(idle_lag.get('p99', float('nan')))} / "
                                                   f"{ms(lag_main.get('p99', float('nan')))}"])
    print_table(f"e2e_bench summary: {c} streams, prompt {args.prompt_len}, max_tokens "
                f"{'16..256' if args.mixed else args.max_tokens}, {args.requests} requests", ["figure", "value"],
                summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
