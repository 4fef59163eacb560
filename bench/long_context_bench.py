"""Long context at a fixed KV budget: RSS and decode step time against ``max_seq_len`` (512 / 8k / 32k).

    python bench/long_context_bench.py                      # budget 0.25 GiB, both decode paths
    python bench/long_context_bench.py --kv-cache-gb 0.25 --streams 8 --max-lens 512,8192,32768

A tiny random Llama with a 32k context (hidden 256, 4 layers; bundled
tokenizer) served by the engine in a fresh child process per (max_seq_len,
path), so each RSS is its own: ``--streams`` greedy streams of
``--prompt-len`` + ``--new-tokens`` (about 120 tokens each). Reported: RSS
after load and warm-up, peak RSS after the run, and the median decode-step
time (engine observer) and median inter-token gap, medians over
``--repeat`` interleaved rounds. Because one child per configuration runs at
a different moment of a shared machine's load, the decode-step cost is also
measured in one process with all configurations' runners alternated step by
step over the same ``--streams`` rows of about 120 positions
("interleaved"): that is the figure to compare. Baseline: the same
budget at ``max_seq_len`` 512, in the same run. The static path is the
CUDA-graph path run eagerly on CPU (capture needs CUDA).

Then (``--long-prompt``, default 20,000 tokens; 0 skips) the mixed case, each
in its own child on the dynamic path: at ``max_seq_len`` 32,768, ``--long-shorts``
short streams (12-token prompts, 64 new tokens) and one ``--long-prompt``-token
prompt (16 new tokens) submitted together; baseline: the same short streams
alone at ``max_seq_len`` 512 with the same budget. Reported: whether every
stream finished with its full token count, the most running at once,
preemptions, wall time, and RSS after load and at peak for both.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, ms, num, percentile, print_table  # noqa: E402


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from rtws.default_model import DEFAULT_MODEL_PATH
    from rtws.engine import Engine, EngineConfig
    from rtws.generation import SamplingParams, TokenEvent
    from rtws.runner import ModelRunner
    from rtws.scheduler import StepPlan

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=32768,
                         eos_token_id=None, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    base = rss_mib()
    runner = ModelRunner(model, 64, args.max_len, torch.device("cpu"), static_decode=args.path == "static",
                         kv_cache_gb=args.kv_cache_gb)
    runner.warmup()
    loaded = rss_mib()
    steps: list[float] = []

    class Obs:
        def on_step(self, engine: Engine, plan: StepPlan, seconds: float, events: list[TokenEvent]) -> None:
            if plan.decode and not plan.prefill:
                steps.append(seconds)

    eng = Engine(runner, tok, EngineConfig(num_slots=64, max_len=args.max_len, prefill_budget=512), observer=Obs())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(10, len(tok), (args.prompt_len,), generator=g).tolist() for _ in range(args.streams)]
    gaps: list[float] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        eng.start(loop)
        futs = []
        for p in prompts:
            fut = loop.create_future()
            last = [0.0]

            def sink(ev: TokenEvent, fut: Any = fut, last: list[float] = last) -> None:
                now = time.perf_counter()
                if last[0]:
                    gaps.append(now - last[0])
                last[0] = now
                if ev.finish is not None:
                    fut.set_result(ev.finish)

            eng.submit(p, SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True), sink)
            futs.append(fut)
        await asyncio.gather(*futs)

    try:
        asyncio.run(main())
    finally:
        eng.stop()
    return {"max_len": args.max_len, "path": args.path, "rss_model_mib": base, "rss_loaded_mib": loaded,
            "rss_peak_mib": peak_rss_mib(), "step_p50_s": percentile(steps, 50), "itl_p50_s": percentile(gaps, 50),
            "kv_blocks": runner.num_blocks, "kv_mib": runner.kv_cache_bytes / 2**20}


def mixed_child(args: argparse.Namespace) -> dict[str, Any]:
    """``--long-shorts`` short streams plus (``--long-prompt`` > 0) one long prompt, submitted together."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from rtws.default_model import DEFAULT_MODEL_PATH
    from rtws.engine import Engine, EngineConfig
    from rtws.generation import SamplingParams, TokenEvent
    from rtws.runner import ModelRunner

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=32768,
                         eos_token_id=None, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    slots = args.long_shorts + 8
    runner = ModelRunner(model, slots, args.max_len, torch.device("cpu"), kv_cache_gb=args.kv_cache_gb)
    runner.warmup()
    loaded = rss_mib()
    eng = Engine(runner, tok, EngineConfig(num_slots=slots, max_len=args.max_len, prefill_budget=512))
    g = torch.Generator().manual_seed(2)
    jobs = [(torch.randint(10, len(tok), (12,), generator=g).tolist(), 64) for _ in range(args.long_shorts)]
    if args.long_prompt:
        jobs.insert(0, (torch.randint(10, len(tok), (args.long_prompt,), generator=g).tolist(), 16))
    got = [0] * len(jobs)
    reasons: list[str] = [""] * len(jobs)
    peak = 0

    async def main() -> float:
        nonlocal peak
        loop = asyncio.get_running_loop()
        eng.start(loop)
        futs = []
        t0 = time.perf_counter()
        for i, (prompt, n) in enumerate(jobs):
            fut = loop.create_future()

            def sink(ev: TokenEvent, fut: Any = fut, i: int = i) -> None:
                got[i] += ev.tokens
                if ev.finish is not None:
                    reasons[i] = ev.finish
                    fut.set_result(None)

            eng.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), sink)
            futs.append(fut)
        while not all(f.done() for f in futs):
            peak = max(peak, eng.stats().running)
            await asyncio.sleep(0.05)
        return time.perf_counter() - t0

    try:
        wall = asyncio.run(main())
        stats = eng.stats()
    finally:
        eng.stop()
    complete = all(r == "length" and got[i] == jobs[i][1] for i, r in enumerate(reasons))
    return {"max_len": args.max_len, "streams": len(jobs), "complete": complete, "peak_running": peak,
            "preemptions": stats.preemptions, "wall_s": wall, "rss_loaded_mib": loaded,
            "rss_peak_mib": peak_rss_mib(), "kv_mib": runner.kv_cache_bytes / 2**20}


def mixed_long(args: argparse.Namespace) -> None:
    rows = []
    for max_len, long_prompt in ((512, 0), (32768, args.long_prompt)):
        cmd = [sys.executable, __file__, "--mixed-child", "--max-len", str(max_len), "--kv-cache-gb",
               str(args.kv_cache_gb), "--long-prompt", str(long_prompt), "--long-shorts", str(args.long_shorts),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        what = f"{args.long_shorts} short" + (f" + one {num(long_prompt)}-token prompt" if long_prompt else " alone")
        rows.append([num(max_len), what, "yes" if r["complete"] else "NO", str(r["peak_running"]),
                     str(r["preemptions"]), f"{r['wall_s']:.1f}", f"{r['kv_mib']:.0f}", f"{r['rss_loaded_mib']:.0f}",
                     f"{r['rss_peak_mib']:.0f}"])
    print_table(f"long prompt beside short streams, --kv-cache-gb {args.kv_cache_gb}, dynamic path, "
                f"{args.threads} thread(s), prefill budget 512",
                ["max_seq_len", "streams", "all complete", "most running", "preemptions", "wall s", "KV pool MiB",
                 "RSS loaded MiB", "RSS peak MiB"], rows)


def interleaved_steps(args: argparse.Namespace, max_lens: list[int], paths: list[str]) -> dict[tuple[str, int], float]:
    """Median decode-step seconds per (path, max_len), runners alternated step by step in one process (so a
    load change on a shared machine hits every configuration alike): ``--streams`` rows of ~120 positions."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from rtws.generation import SamplingParams
    from rtws.runner import ModelRunner
    from rtws.scheduler import Sequence, StepPlan

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=4096, max_position_embeddings=32768)
    model = AutoModelForCausalLM.from_config(config).eval()
    length = args.prompt_len + args.new_tokens
    setups = {}
    for path in paths:
        for m in max_lens:
            r = ModelRunner(model, 64, m, torch.device("cpu"), static_decode=path == "static",
                            kv_cache_gb=args.kv_cache_gb)
            nb = -(-(length + 1) // r.block_size)
            seqs = []
            for i in range(args.streams):
                q = Sequence(rid=i, prompt_ids=[11] * length, params=SamplingParams(temperature=0.0))
                q.block_table = list(range(1 + i * nb, 1 + (i + 1) * nb))
                q.num_cached, q.output_ids = length, [5]
                seqs.append(q)
            setups[(path, m)] = (r, StepPlan(prefill=[], decode=seqs))
    times: dict[tuple[str, int], list[float]] = {k: [] for k in setups}
    for it in range(args.steps + 5):
        for k, (r, plan) in setups.items():
            t0 = time.perf_counter()
            r.step(plan)
            if it >= 5:
                times[k].append(time.perf_counter() - t0)
    return {k: percentile(v, 50) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv-cache-gb", type=float, default=0.25)
    p.add_argument("--max-lens", default="512,8192,32768")
    p.add_argument("--paths", default="dynamic,static")
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=104)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="interleaved rounds; medians are reported")
    p.add_argument("--steps", type=int, default=60, help="decode steps per configuration in the interleaved timing")
    p.add_argument("--long-prompt", type=int, default=20000,
                   help="tokens of the long prompt served beside --long-shorts short streams (0: skip that case)")
    p.add_argument("--long-shorts", type=int, default=64)
    p.add_argument("--only-long", action="store_true", help="run only the long-prompt case")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mixed-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--max-len", type=int, default=512, help=argparse.SUPPRESS)
    p.add_argument("--path", default="dynamic", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return
    if args.mixed_child:
        print(json.dumps(mixed_child(args)))
        return
    print(f"# long_context_bench  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"# machine: {machine_info()}")
    print(f"# command: long_context_bench.py {' '.join(sys.argv[1:])}")
    sys.stdout.flush()
    if args.only_long:
        mixed_long(args)
        return
    runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
    configs = [(path, int(m)) for path in args.paths.split(",") for m in args.max_lens.split(",")]
    for rep in range(args.repeat):  # interleaved rounds (reversed every other one): load drifts cancel out
        for path, max_len in (configs if rep % 2 == 0 else configs[::-1]):
            cmd = [sys.executable, __file__, "--child", "--max-len", str(max_len), "--path", path,
                   "--kv-cache-gb", str(args.kv_cache_gb), "--streams", str(args.streams),
                   "--prompt-len", str(args.prompt_len), "--new-tokens", str(args.new_tokens),
                   "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, check=True)
            runs.setdefault((path, max_len), []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    results = {k: {f: (percentile([r[f] for r in v], 50) if isinstance(v[0][f], float) else v[0][f])
                   for f in v[0]} for k, v in runs.items()}
    for (path, max_len), v in runs.items():
        print(f"#   {path} {max_len}: step p50 ms per round " + ", ".join(ms(r["step_p50_s"]) for r in v))
    steps = interleaved_steps(args, sorted({m for _, m in configs}), sorted({p for p, _ in configs}))
    rows = []
    first = int(args.max_lens.split(",")[0])
    for (path, max_len), r in results.items():
        base = results.get((path, first), r)
        st, st0 = steps[(path, max_len)], steps[(path, first)]
        rows.append([path, num(max_len), f"{r['kv_mib']:.0f}", f"{r['rss_loaded_mib']:.0f}",
                     f"{r['rss_peak_mib']:.0f}", f"{r['rss_peak_mib'] / base['rss_peak_mib']:.2f}x",
                     ms(r["itl_p50_s"]), ms(st), f"{st / st0:.2f}x"])
    print_table(f"long context: {args.streams} streams of {args.prompt_len}+{args.new_tokens} tokens, "
                f"--kv-cache-gb {args.kv_cache_gb}, {args.threads} thread(s)",
                ["path", "max_seq_len", "KV pool MiB", "RSS loaded MiB", "RSS peak MiB", "peak RSS vs first",
                 "engine ITL p50 ms", "decode step ms (interleaved)", "step vs first"], rows)
    if args.long_prompt:
        mixed_long(args)


if __name__ == "__main__":
    main()
