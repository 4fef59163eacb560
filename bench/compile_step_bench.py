"""One static decode step, eager against ``torch.compile`` (inductor, ``dynamic=False``, ``cpp_wrapper``), per batch.

In-process, bundled model (or ``--model``), float32 on the CPU, ``--threads`` torch threads. For each batch
size in ``--batches`` it builds the runner's static decode body (``_StaticDecoder._body``: block gather,
masks, model forward, argmax) at KV length ``--kv-len``, compiles it, checks the tokens are identical
to eager's, and prints the mean of ``--steps`` eager and compiled steps, run back to back. This is the
measurement behind which batch buckets ``--compile`` covers (rtws.runner.COMPILE_MAX_BATCH).

    python bench/compile_step_bench.py --batches 1,4,8,32
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import print_header, print_table  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from rtws.default_model import DEFAULT_MODEL_PATH

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p.add_argument("--batches", default="1,4,8,32")
    p.add_argument("--kv-len", type=int, default=128, help="KV positions a step reads (a length bucket)")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="pool size (the CPU default is 1)")
    args = p.parse_args(argv)
    print_header("compile_step_bench", args)
    import torch

    from rtws.runner import ModelRunner, load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, 64, int(model.config.max_position_embeddings), torch.device("cpu"),
                         static_decode=True, cuda_graphs=False, kv_cache_gb=args.kv_cache_gb)
    sd = runner._static
    assert sd is not None
    fn = torch.compile(sd._body, dynamic=False, options={"cpp_wrapper": True})
    rows: list[list[str]] = []
    with torch.inference_mode():
        for b in (int(x) for x in args.batches.split(",")):
            sd.tables.zero_()
            sd.pos[:b, 0] = torch.arange(b) % 5
            sd.ids[:b, 0] = torch.arange(b) * 7 + 3
            t0 = time.perf_counter()
            got = fn(b, args.kv_len, False)
            compile_s = time.perf_counter() - t0
            exact = bool(torch.equal(got, sd._body(b, args.kv_len, False)))
            means = []
            for f in (sd._body, fn):
                for _ in range(3):
                    f(b, args.kv_len, False)
                t = time.perf_counter()
                for _ in range(args.steps):
                    f(b, args.kv_len, False)
                means.append((time.perf_counter() - t) / args.steps * 1e3)
            rows.append([str(b), str(args.kv_len), f"{compile_s:.1f}", f"{means[0]:.2f} ms", f"{means[1]:.2f} ms",
                         f"{means[1] / means[0]:.2f}x", str(exact)])
            print(f"# batch {b} done", flush=True)
    print_table(f"static decode step, {args.threads} thread(s), mean of {args.steps}",
                ["batch", "kv_len", "compile s", "eager", "compiled", "compiled / eager", "exact"], rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
