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
    ratio,
    run_engine,
    run_generate,
    slots_for,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--requests", type=int, default=64, help="requests per workload")
    p.add_argument("--max-tokens", type=int, default=128, help="new tokens per request (uniform workload)")
    p.add_argument("--mixed", action="store_true", help="only the mixed workload (max_tokens uniform in 16..256)")
    p.add_argument("--workload", choices=("both", "uniform", "mixed"), default="both")
    p.add_argument("--mixed-range", default="16,256", help="lo,hi of the mixed max_tokens")
    p.add_argument("--repeat", type=int, default=1, help="run each pair this many times, report the best of each")
    return p


async def _engine_run(served: Any, prompts: list[list[int]], mts: list[int], concurrency: int) -> RunStats:
    return await run_engine(served.engine, prompts, mts, concurrency, ignore_eos=True)


def measure(served: Any, prompts: list[list[int]], mts: list[int], concurrency: int, repeat: int,
            loop: asyncio.AbstractEventLoop) -> tuple[RunStats, RunStats]:
    """Alternate rtws and generate ``repeat`` times; keep each one's best tokens/s."""
    best_r: RunStats | None = None
    best_g: RunStats | None = None
    for _ in range(repeat):
        r = loop.run_until_complete(_engine_run(served, prompts, mts, concurrency))
        g = run_generate(served.model, prompts, mts, concurrency, pad_token_id(served))
        if best_r is None or r.tok_s > best_r.tok_s:
            best_r = r
        if best_g is None or g.tok_s > best_g.tok_s:
            best_g = g
    assert best_r is not None and best_g is not None
    return best_r, best_g


def row(workload: str, st: RunStats, base: RunStats | None) -> list[str]:
    return [workload, st.label, num(st.tokens), f"{st.wall:.2f}", num(st.tok_s), ms(percentile(st.itl, 50)),
            ms(percentile(st.itl, 99)), ratio(st.tok_s, base.tok_s) if base is not None else "1.00x"]


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
        for name, mts in workloads:
            r, g = measure(served, prompts, mts, args.concurrency, args.repeat, loop)
            useful = sum(mts)
            padded = g.extra["padded_tokens"]
            print(f"# {name}: {args.requests} requests, concurrency {args.concurrency}, {useful} useful tokens; "
                  f"static batches compute {padded} ({padded / useful:.2f}x); rtws ttft p50 "
                  f"{ms(percentile(r.ttft, 50))} ms p99 {ms(percentile(r.ttft, 99))} ms; reasons {r.reasons}")
            rows.append(row(name, g, None))
            rows.append(row(name, r, g))
    finally:
        served.stop()
        loop.close()
    print_table(f"engine_bench: concurrency {args.concurrency}, prompt {args.prompt_len} tokens, "
                f"{args.requests} requests, {served.device}",
                ["workload", "system", "tokens", "wall s", "tok/s", "ITL p50 ms", "ITL p99 ms", "vs generate"],
                rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
