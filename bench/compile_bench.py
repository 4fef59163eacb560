"""The compiled decode step (``--compile``) against eager, two real servers side by side in one run.

Two ``bench/serve_child.py`` servers (the app exactly as ``rtws serve`` builds it, its own thread defaults)
load the same model, one with ``compile=off`` (the baseline) and one with ``--compile`` (default ``auto``).
Then, ``--repeat`` rounds in ABBA order over the two servers:

- single stream: ``--single`` requests one after another on one WebSocket (prompt ``--prompt-len`` tokens,
  ``max_tokens`` ``--max-tokens``, greedy, ``ignore_eos`` off); ITL is the gap between successive streamed
  chunks of one request, p50 over all gaps of the round; tok/s is completion tokens over the round's wall time;
- burst: ``--requests`` requests sent at once on one socket (``max_tokens`` uniform in ``--lo``..``--hi``,
  seeded, greedy), useful tokens over the wall time from first send to last done (as bench/burst_bench.py).

Greedy texts of both servers are compared (single stream and burst); a mismatch is printed and exits 1.
The compiled server's warm-up log (per shape: compile seconds, eager and compiled step ms, kept or not) is
printed first.

    python bench/compile_bench.py
    python bench/compile_bench.py --compile on --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from burst_bench import burst  # noqa: E402
from common import (  # noqa: E402
    ServerProcess,
    max_tokens_list,
    ms,
    num,
    percentile,
    print_header,
    print_table,
    text_prompts,
)


def build_parser() -> argparse.ArgumentParser:
    from rtws.default_model import DEFAULT_MODEL_PATH

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH), help="model folder (default: the bundled model)")
    p.add_argument("--compile", default="auto", choices=("auto", "on"), help="the compiled server's mode")
    p.add_argument("--single", type=int, default=6, help="single-stream requests per round")
    p.add_argument("--max-tokens", type=int, default=128, help="max_tokens of a single-stream request")
    p.add_argument("--requests", type=int, default=32, help="burst: requests sent at once")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens (about)")
    p.add_argument("--lo", type=int, default=16, help="burst: smallest max_tokens")
    p.add_argument("--hi", type=int, default=128, help="burst: largest max_tokens")
    p.add_argument("--repeat", type=int, default=2, help="rounds, ABBA order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch_threads of both servers (default: theirs)")
    p.add_argument("--start-timeout", type=float, default=600.0, help="seconds for a server to start")
    return p


async def single(port: int, prompts: list[str], max_tokens: int) -> tuple[int, float, list[float], list[str]]:
    """Requests one after another on one socket: (tokens, wall seconds, chunk gaps, texts)."""
    from rtws.client import Client

    gaps: list[float] = []
    texts: list[str] = []
    tokens = 0
    client = await Client.connect(f"ws://127.0.0.1:{port}/ws")
    try:
        t0 = time.perf_counter()
        for prompt in prompts:
            stream = await client.generate(prompt, max_tokens=max_tokens, temperature=0.0)
            last: float | None = None
            async for _ in stream:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
            res = await stream.result()
            tokens += res.completion_tokens
            texts.append(stream.text)
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return tokens, wall, gaps, texts


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_header("compile_bench", args)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    prompts = text_prompts(tok, max(args.requests, args.single), args.prompt_len, args.seed)
    mts = max_tokens_list(args.requests, 0, True, args.lo, args.hi)  # as bench/burst_bench.py
    t0 = time.perf_counter()
    extra = {"torch_threads": args.threads} if args.threads else {}
    eager = ServerProcess({"model": args.model, "compile": "off", **extra}, timeout=args.start_timeout)
    t1 = time.perf_counter()
    comp = ServerProcess({"model": args.model, "compile": args.compile, "log_level": "INFO", "log_format": "json",
                          **extra},
                         timeout=args.start_timeout)
    t2 = time.perf_counter()
    servers = {"eager": eager, "compiled": comp}
    failed = False
    try:
        print(f"# start-up: eager {t1 - t0:.1f} s, compiled ({args.compile}) {t2 - t1:.1f} s")
        for ev in comp.log_events("compile_choice"):
            print(f"# compile choice: {ev.get('reason')}")
        shapes = comp.log_events("decode_compiled")
        print_table("warm-up: one decode step per shape, eager vs compiled (fastest of 7 interleaved, in the compiled server)",
                    ["batch", "kv_len", "compile s", "eager", "compiled", "exact", "kept"],
                    [[str(e["batch"]), str(e["kv_len"]), str(e["seconds"]), f"{e['eager_ms']:.2f} ms",
                      f"{e['compiled_ms']:.2f} ms", str(e["exact"]), str(e["kept"])] for e in shapes])
        for srv in servers.values():  # warm both
            asyncio.run(burst(srv.port, prompts[:2], [8, 8]))
        res: dict[str, dict[str, list[float]]] = {k: {"itl": [], "tps1": [], "burst": []} for k in servers}
        texts: dict[str, tuple[list[str], list[str]]] = {}
        for r in range(args.repeat):
            order = ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager")
            for who in order:
                port = servers[who].port
                n, wall, gaps, t_single = asyncio.run(single(port, prompts[: args.single], args.max_tokens))
                res[who]["itl"].append(percentile(gaps, 50))
                res[who]["tps1"].append(n / wall)
                bn, bwall, t_burst = asyncio.run(burst(port, prompts[: args.requests], mts))
                res[who]["burst"].append(bn / bwall)
                texts.setdefault(who, (t_single, t_burst))
            print(f"# round {r + 1}: " + ", ".join(
                f"{k}: ITL p50 {ms(res[k]['itl'][-1])}, 1-stream {res[k]['tps1'][-1]:.0f} tok/s, "
                f"burst {res[k]['burst'][-1]:.0f} tok/s" for k in servers))
            sys.stdout.flush()
        med = {k: {m: statistics.median(v) for m, v in d.items()} for k, d in res.items()}
        print_table(f"compiled ({args.compile}) vs eager, medians of {args.repeat} ABBA rounds",
                    ["server", "single-stream ITL p50", "single-stream tok/s", f"burst {args.requests} tok/s"],
                    [[k, ms(med[k]["itl"]), num(med[k]["tps1"]), num(med[k]["burst"])] for k in servers]
                    + [["compiled / eager", f"{med['compiled']['itl'] / med['eager']['itl']:.2f}x",
                        f"{med['compiled']['tps1'] / med['eager']['tps1']:.2f}x",
                        f"{med['compiled']['burst'] / med['eager']['burst']:.2f}x"]])
        for i, name in enumerate(("single-stream", "burst")):
            a, b = texts["eager"][i], texts["compiled"][i]
            same = sum(x == y for x, y in zip(a, b))
            print(f"# greedy texts, {name}: {same}/{len(a)} identical")
            failed = failed or same != len(a)
    finally:
        for srv in servers.values():
            srv.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
