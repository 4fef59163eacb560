"""Burst: 32 simultaneous mixed-length requests to the default ``rtws serve`` vs ``model.generate``, same run.

    python bench/burst_bench.py                     # bundled model, 32 requests, max_tokens 16..128, 3 rounds
    python bench/burst_bench.py --requests 64 --lo 16 --hi 256 --repeat 5

rtws: a real server in a child process (``bench/serve_child.py``, the app
exactly as ``rtws serve`` builds it) with its defaults: no thread, batch or
KV setting passed, so it picks its own. After one unmeasured burst, all
``--requests`` ``generate`` frames are sent at once on one WebSocket
(protocol v1, ``rtws.client``), greedy; the wall time runs from the first
send to the last ``done``, and useful tokens are the completion tokens the
server reports (EOS honoured).

Baseline, in this process: ``model.generate`` static batching of the same
prompts (one left-padded batch of ``--requests``, ``max_new_tokens`` = the
longest request, greedy, EOS honoured), run once per round at each of
``--gen-threads`` torch thread counts (default: 1 and the count ``rtws serve``
picks on this machine, ``rtws.threads.choose_threads``); the faster one is the
baseline, so generate is never handicapped by a thread setting.
Useful tokens per row: up to its own ``max_tokens``, stopping before its
first EOS, which is what the server delivers for the same request. The
rounds alternate ABBA; medians are reported, with the ratio of each round.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ServerProcess, max_tokens_list, num, print_header, print_table, text_prompts  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from rtws.default_model import DEFAULT_MODEL_PATH

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_PATH), help="model folder (default: the bundled model)")
    p.add_argument("--requests", type=int, default=32, help="requests sent at once")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt length in tokens (about)")
    p.add_argument("--lo", type=int, default=16, help="smallest max_tokens")
    p.add_argument("--hi", type=int, default=128, help="largest max_tokens")
    p.add_argument("--repeat", type=int, default=3, help="rounds of (rtws, generate), ABBA order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-threads", type=int, default=None,
                   help="torch threads for the server's forward (default: rtws serve's choice)")
    p.add_argument("--engine-process", default=None, choices=("auto", "on", "off"),
                   help="the server's engine in a process of its own (default: rtws serve's, auto)")
    p.add_argument("--no-elastic-threads", action="store_true",
                   help="the server's forward keeps its startup threads (rtws serve --no-elastic-threads)")
    p.add_argument("--gen-threads", default=None,
                   help="comma-separated torch thread counts for generate (default: 1 and rtws serve's choice)")
    return p


async def burst(port: int, prompts: list[str], max_tokens: list[int]) -> tuple[int, float, list[str]]:
    """Every request at once on one socket: (completion tokens, seconds from first send to last done, texts)."""
    from rtws.client import Client

    client = await Client.connect(f"ws://127.0.0.1:{port}/ws")
    try:
        t0 = time.perf_counter()
        streams = [await client.generate(p, max_tokens=m, temperature=0.0) for p, m in zip(prompts, max_tokens)]
        results = await asyncio.wait_for(asyncio.gather(*(s.result() for s in streams)), 600)
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    return sum(r.completion_tokens for r in results), wall, [s.text for s in streams]


def generate_burst(model: Any, tok: Any, prompts: list[str], max_tokens: list[int]) -> tuple[int, float]:
    """One static batch through ``model.generate``; (useful tokens, seconds)."""
    import torch

    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else (eos if eos is not None else 0)
    ids = [tok(p, add_special_tokens=True)["input_ids"] for p in prompts]
    width = max(len(x) for x in ids)
    inp = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, x in enumerate(ids):
        inp[r, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[r, width - len(x):] = 1
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=max(max_tokens), do_sample=False,
                             pad_token_id=pad)
    wall = time.perf_counter() - t0
    useful = 0
    for r, m in enumerate(max_tokens):
        new = out[r, width:width + m].tolist()
        useful += new.index(eos) if eos is not None and eos in new else len(new)
    return useful, wall


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print_header("burst_bench", args)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rtws.threads import apply_threads, choose_threads, usable_cores

    choice = choose_threads(usable_cores(), "cpu")
    intra, interop = apply_threads(choice)
    gen_threads = ([int(x) for x in args.gen_threads.split(",")] if args.gen_threads
                   else sorted({1, intra}))
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    context = int(getattr(model.config, "max_position_embeddings", 2048))
    prompts = text_prompts(tok, args.requests, args.prompt_len, args.seed)
    mts = max_tokens_list(args.requests, 0, True, args.lo, args.hi, cap=context - args.prompt_len - 8)
    print(f"# {args.requests} requests at once, prompts ~{args.prompt_len} tokens, max_tokens {args.lo}..{args.hi} "
          f"(sum {sum(mts)}); rtws serve picks {choice.intra} threads here ({choice.reason}); generate runs at "
          f"{gen_threads} intra-op threads, {interop} inter-op, and the faster is the baseline")
    rows: list[list[str]] = []
    rt: list[float] = []
    gen: list[float] = []
    server_cfg: dict[str, object] = {"model": args.model}
    if args.server_threads:
        server_cfg["torch_threads"] = args.server_threads
    if args.engine_process:
        server_cfg["engine_process"] = args.engine_process
    if args.no_elastic_threads:
        server_cfg["elastic_threads"] = False
    with ServerProcess(server_cfg) as srv:
        # One whole unmeasured burst for each first: the first after start-up pays for KV pages touched for the
        # first time and allocator growth (0.4 to 0.9x of later rounds when it was measured).
        asyncio.run(burst(srv.port, prompts, mts))
        for t in gen_threads:
            torch.set_num_threads(t)
            generate_burst(model, tok, prompts, mts)
        for r in range(args.repeat):
            order = ("rtws", "generate") if r % 2 == 0 else ("generate", "rtws")
            got: dict[str, tuple[int, float]] = {}
            per_threads: list[str] = []
            for who in order:
                if who == "rtws":
                    got[who] = asyncio.run(burst(srv.port, prompts, mts))[:2]
                    continue
                best: tuple[int, float] | None = None
                for t in gen_threads:
                    torch.set_num_threads(t)
                    tokens, wall = generate_burst(model, tok, prompts, mts)
                    per_threads.append(f"{t}t: {tokens / wall:.0f}")
                    if best is None or tokens / wall > best[0] / best[1]:
                        best = (tokens, wall)
                assert best is not None
                got[who] = best
            a, b = got["rtws"][0] / got["rtws"][1], got["generate"][0] / got["generate"][1]
            rt.append(a)
            gen.append(b)
            rows.append([str(r + 1), f"{got['rtws'][0]} in {got['rtws'][1]:.2f} s", num(a),
                         f"{got['generate'][0]} in {got['generate'][1]:.2f} s", num(b), " ".join(per_threads),
                         f"{a / b:.2f}x"])
    print_table("rounds (useful tokens / wall)", ["round", "rtws serve", "rtws tok/s", "model.generate (best)",
                                                  "generate tok/s", "generate by threads", "ratio"], rows)
    ratios = [a / b for a, b in zip(rt, gen)]
    print_table("burst_bench summary (medians)", ["system", "useful tok/s", "vs generate"],
                [["model.generate (static batch)", num(statistics.median(gen)), "1.00x"],
                 ["rtws serve (defaults)", num(statistics.median(rt)), f"{statistics.median(ratios):.2f}x"]])
    return 0


if __name__ == "__main__":
    sys.exit(main())
