"""Engine only: rtws continuous batching vs ``model.generate`` static batching, same model, same run.

    python bench/engine_bench.py                       # bundled model, 32 streams, uniform and mixed
    python bench/engine_bench.py --mixed --requests 64 --concurrency 32
    python bench/engine_bench.py --model gpt2-random --device cuda --dtype bfloat16 --concurrency 256 \
        --requests 256 --max-tokens 128 --workload uniform

rtws: ``rtws.model.load`` (``runner.load_model`` + ``ModelRunner`` + ``Engine``)
driven closed-loop from an asyncio loop: ``--concurrency`` requests in
flight, a new one submitted as each finishes. Baseline: ``model.generate``
on the same model object in batches of ``--concurrency`` prompts (left
padded, with an attention mask), each batch run to completion. With mixed
``max_tokens`` a static batch runs to its longest member; only the tokens
each request asked for count (that waste is what continuous batching saves).
Both produce exactly the requested tokens: ``ignore_eos`` for rtws,
``min_new_tokens`` for generate, greedy.

Per-token latency: rtws, the gap between successive tokens of a request;
generate, batch wall time / steps. The last table is the summary.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    RunStats,
    add_model_args,
    load_served,
    max_tokens_list,
    ms,
    num,
    pad_token_id,
    percentile,
    print_header,
    print_table,
    prompt_ids,
    run_engine,
    run_generate,
    slots_for,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--requests", type=int, default=64, help="requests per workload")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (uniform workload)")
    p.add_argument("--mixed", action="store_true", help="only the mixed workload (max_tokens uniform in 16..256)")
    p.add_argument("--workload", choices=("both", "uniform", "mixed"), default="both")
    p.add_argument("--mixed-range", default="16,256", help="lo,hi of the mixed max_tokens")
    p.add_argument("--repeat", type=int, default=3,
                   help="paired rtws / generate runs per workload (ABBA order); medians are reported")
    return p


async def _engine_run(served: Any, prompts: list[list[int]], mts: list[int], concurrency: int) -> RunStats:
    """One closed-loop rtws run, with the runner's step time and batch rows recorded in ``extra``."""
    runner = served.engine.runner
    acc = {"step_s": 0.0, "steps": 0, "decode_rows": 0, "prefill_tokens": 0}
    inner = runner.step

    def timed_step(plan: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return inner(plan)
        finally:
            acc["step_s"] += time.perf_counter() - t0
            acc["steps"] += 1
            acc["decode_rows"] += len(plan.decode)
            acc["prefill_tokens"] += sum(c.end - c.start for c in plan.prefill)

    runner.step = timed_step  # the engine thread looks the method up on every step
    try:
        st = await run_engine(served.engine, prompts, mts, concurrency, ignore_eos=True)
    finally:
        del runner.step
    st.extra.update(acc)
    return st


def measure(served: Any, prompts: list[list[int]], mts: list[int], concurrency: int, repeat: int,
            loop: asyncio.AbstractEventLoop) -> tuple[RunStats, RunStats, float]:
    """``repeat`` paired runs in ABBA order; returns the median rtws run, the median generate run, and the
    median of the per-pair ratios rtws/generate."""
    rs: list[RunStats] = []
    gs: list[RunStats] = []
    for k in range(repeat):
        if k % 2 == 0:
            rs.append(loop.run_until_complete(_engine_run(served, prompts, mts, concurrency)))
            gs.append(run_generate(served.model, prompts, mts, concurrency, pad_token_id(served)))
        else:
            gs.append(run_generate(served.model, prompts, mts, concurrency, pad_token_id(served)))
            rs.append(loop.run_until_complete(_engine_run(served, prompts, mts, concurrency)))
    ratios = sorted(r.tok_s / g.tok_s for r, g in zip(rs, gs))
    if repeat > 1:
        print("#   pairs (rtws/generate tok/s): "
              + ", ".join(f"{num(r.tok_s)}/{num(g.tok_s)}" for r, g in zip(rs, gs)))
    return (sorted(rs, key=lambda x: x.tok_s)[len(rs) // 2], sorted(gs, key=lambda x: x.tok_s)[len(gs) // 2],
            ratios[len(ratios) // 2])


def row(workload: str, st: RunStats, vs: float | None) -> list[str]:
    return [workload, st.label, num(st.tokens), f"{st.wall:.2f}", num(st.tok_s), ms(percentile(st.itl, 50)),
            ms(percentile(st.itl, 99)), f"{vs:.2f}x" if vs is not None else "1.00x"]


def cost_rows(workload: str, r: RunStats, g: RunStats, mts: list[int], concurrency: int,
              prompt_len: int) -> list[list[str]]:
    """Where the time goes: steps, rows per step, and model time per computed row-token on each side."""
    e = r.extra
    r_rows = e["decode_rows"] + e["prefill_tokens"]
    g_steps = sum(max(mts[b:b + concurrency]) for b in range(0, len(mts), concurrency))
    g_rows = g.extra["padded_tokens"] + prompt_len * len(mts)
    return [
        [workload, "model.generate", num(g_steps), num(g_rows / max(1, g_steps), 1), ms(g.wall / max(1, g_steps)),
         f"{1e6 * g.wall / max(1, g_rows):.0f}", "-"],
        [workload, "rtws engine", num(e["steps"]), num(r_rows / max(1, e["steps"]), 1),
         ms(e["step_s"] / max(1, e["steps"])), f"{1e6 * e['step_s'] / max(1, r_rows):.0f}",
         f"{100 * e['step_s'] / r.wall:.0f}%" if r.wall else "-"],
    ]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.mixed:
        args.workload = "mixed"
    print_header("engine_bench", args)
    slots = slots_for(args)
    served = load_served(args, slots)
    cap = served.context_len - args.prompt_len
    lo, hi = (int(x) for x in args.mixed_range.split(","))
    print(f"# model: {args.model} on {served.device}, dtype {str(served.engine.runner.dtype).removeprefix('torch.')}, "
          f"context {served.context_len}, slots {slots}, max new tokens capped at {cap}")
    prompts = prompt_ids(served.tokenizer, args.requests, args.prompt_len, args.seed)
    workloads: list[tuple[str, list[int]]] = []
    if args.workload in ("both", "uniform"):
        workloads.append((f"uniform {min(args.max_tokens, cap)}", max_tokens_list(args.requests, args.max_tokens,
                                                                                 False, cap=cap)))
    if args.workload in ("both", "mixed"):
        workloads.append((f"mixed {lo}..{min(hi, cap)}", max_tokens_list(args.requests, args.max_tokens, True, lo,
                                                                           hi, cap=cap, seed=args.seed + 1)))
    loop = asyncio.new_event_loop()
    served.start(loop)
    try:
        # Warm both paths (first calls allocate and pick kernels).
        warm_n = min(args.concurrency, args.requests)
        loop.run_until_complete(_engine_run(served, prompts[:warm_n], [4] * warm_n, args.concurrency))
        run_generate(served.model, prompts[:warm_n], [4] * warm_n, args.concurrency, pad_token_id(served))
        rows = []
        costs = []
        for name, mts in workloads:
            r, g, vs = measure(served, prompts, mts, args.concurrency, args.repeat, loop)
            useful = sum(mts)
            padded = g.extra["padded_tokens"]
            print(f"# {name}: {args.requests} requests, concurrency {args.concurrency}, {useful} useful tokens; "
                  f"static batches compute {padded} ({padded / useful:.2f}x); rtws ttft p50 "
                  f"{ms(percentile(r.ttft, 50))} ms p99 {ms(percentile(r.ttft, 99))} ms; reasons {r.reasons}")
            rows.append(row(name, g, None))
            rows.append(row(name, r, vs))
            costs += cost_rows(name, r, g, mts, args.concurrency, args.prompt_len)
    finally:
        served.stop()
        loop.close()
    print_table("where the time goes (row-tokens: decode rows + prompt tokens computed, padding included)",
                ["workload", "system", "steps", "row-tokens/step", "ms/step", "us/row-token", "runner share"],
                costs)
    print_table(f"engine_bench: concurrency {args.concurrency}, prompt {args.prompt_len} tokens, "
                f"{args.requests} requests, {served.device}",
                ["workload", "system", "tokens", "wall s", "tok/s", "ITL p50 ms", "ITL p99 ms",
                 f"vs generate{' (median of pairs)' if args.repeat > 1 else ''}"],
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
