"""Where one engine step's time goes: cProfile of the engine thread, closed loop at one concurrency.

A profiling aid, not a benchmark (no baseline): it loads the model as the server does
(``common.load_served``), wraps the engine thread's loop in cProfile, runs a warm-up and then
``--requests`` requests of ``--max-tokens`` tokens (``ignore_eos``, greedy) at ``--concurrency``, and prints
the engine thread's top functions by own time. Per-step figures: divide by the steps printed.

    python bench/step_profile.py --concurrency 1 --threads 1
    python bench/step_profile.py --concurrency 32 --threads 1
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import load_served, run_engine  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--requests", type=int, default=0, help="default: max(4, concurrency)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--top", type=int, default=22)
    p.add_argument("--compile", default="off", choices=("auto", "on", "off"), help="the engine's compile mode")
    args = p.parse_args(argv)
    from rtws.default_model import DEFAULT_MODEL_PATH

    ns = argparse.Namespace(model=args.model or DEFAULT_MODEL_PATH, device="cpu", dtype="float32",
                            prefill_budget=256, threads=args.threads,
                            compile=args.compile)
    served = load_served(ns, max(64, args.concurrency))
    engine = served.engine
    n = args.requests or max(4, args.concurrency)
    prompts = [[(7 * i + j) % 4000 + 10 for j in range(args.prompt_len)] for i in range(n)]
    prof = cProfile.Profile()
    loop_fn = engine._run

    def profiled() -> None:
        prof.enable()
        try:
            loop_fn()
        finally:
            prof.disable()

    engine._run = profiled

    async def drive() -> None:
        served.start(asyncio.get_running_loop())
        try:
            await run_engine(engine, prompts, [8] * n, args.concurrency)  # warm-up
            steps0 = engine._steps
            t0 = time.perf_counter()
            st = await run_engine(engine, prompts, [args.max_tokens] * n, args.concurrency)
            steps = engine._steps - steps0
            print(f"# concurrency {args.concurrency}: {st.tok_s:.0f} tok/s, {steps} steps in "
                  f"{time.perf_counter() - t0:.2f} s (the profile also holds the 8-token warm-up)")
        finally:
            served.stop()

    asyncio.run(drive())
    pstats.Stats(prof).sort_stats("tottime").print_stats(args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
