"""int8 weight-only quantization (torchao) against float32, in one run: memory, speed, agreement.

Each variant loads in its own child process (so RSS is that variant's alone) exactly as the server does
(``rtws.loading.checked_load``) and reports:

- weight bytes (parameters and buffers, each storage once; torchao's int8 data plus scales);
- RSS after loading (VmRSS) and the peak (VmHWM);
- rtws engine tok/s at 1 and at 32 concurrent streams (closed loop, greedy, EOS ignored);
- greedy continuations of ``--prompts`` prompts x ``--tokens`` tokens through ``model.generate``.

The parent prints one table with float32 as the baseline, and the greedy agreement of int8 with
float32: tokens equal up to each prompt's first divergence, and prompts identical end to end.

    python bench/quant_bench.py                       # the bundled model, CPU, torch threads: 1
    python bench/quant_bench.py --threads 2 --requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import REPO, max_tokens_list, num, print_header, print_table, prompt_ids, ratio, run_engine  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from rtws.default_model import DEFAULT_MODEL_PATH

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH))
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child")
    p.add_argument("--prompts", type=int, default=20, help="prompts for the greedy agreement")
    p.add_argument("--tokens", type=int, default=64, help="greedy tokens per prompt")
    p.add_argument("--requests", type=int, default=64, help="requests per throughput run (32 streams)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per throughput request")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3, help="throughput runs per concurrency (median reported)")
    p.add_argument("--child", choices=("none", "int8"), default=None, help=argparse.SUPPRESS)
    return p


def _vm(field: str) -> int:
    for ln in Path("/proc/self/status").read_text().splitlines():
        if ln.startswith(field + ":"):
            return int(ln.split()[1]) * 1024
    return 0


def child(args: argparse.Namespace) -> dict[str, Any]:
    import asyncio

    import torch

    from rtws.loading import checked_load
    from rtws.model import ModelSpec
    from rtws.quant import weight_bytes

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    spec = ModelSpec(name=f"bench-{args.child}", path=args.model, device=args.device, dtype="float32",
                     num_slots=32, quantization=args.child)
    t0 = time.perf_counter()
    served = checked_load(spec)
    load_s = time.perf_counter() - t0
    out: dict[str, Any] = {"variant": args.child, "load_s": load_s, "weight_bytes": weight_bytes(served.model),
                           "rss": _vm("VmRSS")}
    tok = served.tokenizer

    # greedy agreement data: the model's own greedy continuations
    prompts = prompt_ids(tok, args.prompts, args.prompt_len, seed=7)
    greedy: list[list[int]] = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            g = served.model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                                      pad_token_id=tok.eos_token_id or 0)
            greedy.append(g[0, len(p):].tolist())
    out["greedy"] = greedy

    # engine throughput, closed loop, at 1 and 32 streams
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    served.start(loop)
    try:
        tput: dict[str, float] = {}
        for conc, n in ((1, max(4, args.requests // 8)), (32, args.requests)):
            ps = prompt_ids(tok, n, args.prompt_len, seed=conc)
            mts = max_tokens_list(n, args.max_tokens, mixed=False)
            loop.run_until_complete(run_engine(served.engine, ps[:min(n, 4)], mts[:min(n, 4)], conc))  # warm
            runs = sorted(loop.run_until_complete(run_engine(served.engine, ps, mts, conc)).tok_s
                          for _ in range(args.repeat))
            tput[str(conc)] = runs[len(runs) // 2]
        out["tok_s"] = tput
    finally:
        served.stop()
        loop.close()
    out["rss_peak"] = _vm("VmHWM")
    return out


def agreement(ref: list[list[int]], other: list[list[int]]) -> tuple[float, int]:
    """(share of tokens equal up to each prompt's first divergence, prompts identical end to end)."""
    same = total = whole = 0
    for a, b in zip(ref, other, strict=True):
        total += len(a)
        k = 0
        while k < min(len(a), len(b)) and a[k] == b[k]:
            k += 1
        same += k
        whole += int(a == b)
    return same / max(1, total), whole


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.child is not None:
        print(json.dumps(child(args)))
        return 0
    print_header("quant_bench", args)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, dict[str, Any]] = {}
    # ABBA: float32, int8, int8, float32; memory and greedy from each variant's first child, tok/s the mean
    # of its two (the machine is shared: load drifts between children).
    for variant in ("none", "int8", "int8", "none"):
        cmd = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
               "--child", variant]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return 1
        got = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"#   {variant}: tok/s @1 {num(got['tok_s']['1'])}, @32 {num(got['tok_s']['32'])}")
        sys.stdout.flush()
        if variant in results:
            first = results[variant]
            first["tok_s"] = {k: (first["tok_s"][k] + got["tok_s"][k]) / 2 for k in first["tok_s"]}
        else:
            results[variant] = got
    f, q = results["none"], results["int8"]
    share, whole = agreement(f["greedy"], q["greedy"])
    mib = 2 ** 20
    rows = []
    for label, r in (("float32", f), ("int8 (torchao)", q)):
        rows.append([label, f"{r['weight_bytes'] / mib:.2f}", ratio(r["weight_bytes"], f["weight_bytes"]),
                     f"{r['rss'] / mib:.0f}", f"{r['rss_peak'] / mib:.0f}", num(r["tok_s"]["1"]),
                     ratio(r["tok_s"]["1"], f["tok_s"]["1"]), num(r["tok_s"]["32"]),
                     ratio(r["tok_s"]["32"], f["tok_s"]["32"]), f"{r['load_s']:.2f}"])
    print_table("int8 weight-only vs float32 (baseline: float32, same run; tok/s: mean of 2 ABBA runs)",
                ["weights", "weight MiB", "vs fp32", "RSS MiB", "peak RSS MiB", "tok/s @1", "vs fp32",
                 "tok/s @32", "vs fp32", "load s"], rows)
    print(f"greedy agreement, {args.prompts} prompts x {args.tokens} tokens: {share * 100:.1f}% of tokens "
          f"(up to each prompt's first divergence); {whole}/{args.prompts} prompts identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
