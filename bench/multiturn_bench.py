"""Multi-turn chat: time to first token per turn with the prefix cache on and off, same run.

    python bench/multiturn_bench.py                 # 10 turns, 1,500-token system prompt, 8k-context model
    python bench/multiturn_bench.py --turns 10 --system-len 1500 --repeat 3

A tiny random Llama with an 8k context (hidden 256, 4 layers, bundled
tokenizer; float32, ``--threads`` torch threads) behind two engines built
the same way, one with the prefix cache and one without (the baseline). Each
turn re-sends the whole conversation (system prompt, every earlier user
turn and reply, the new user turn), as a chat client does; replies are
``--reply-len`` greedy tokens. Turns alternate between the two engines so
load drifts hit both alike. After the last turn, a *cold* prompt of the same
length (fresh tokens, nothing cached) goes to the cached engine: the target
is turn-10 TTFT <= 0.3x that cold TTFT. Figures are medians over
``--repeat`` conversations (each with its own system prompt).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_info, ms, percentile, print_table  # noqa: E402


def build(prefix_cache: bool, args: argparse.Namespace) -> Any:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from rtws.default_model import DEFAULT_MODEL_PATH
    from rtws.engine import Engine, EngineConfig
    from rtws.runner import ModelRunner

    tok = AutoTokenizer.from_pretrained(DEFAULT_MODEL_PATH)
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=len(tok), max_position_embeddings=8192,
                         eos_token_id=None, bos_token_id=None)
    model = AutoModelForCausalLM.from_config(config).eval()
    runner = ModelRunner(model, 16, 8192, torch.device("cpu"), kv_cache_gb=args.kv_cache_gb)
    runner.warmup()
    return Engine(runner, tok, EngineConfig(num_slots=16, max_len=8192, prefill_budget=args.prefill_budget,
                                            prefix_cache=prefix_cache, cache_salt="multiturn"))


async def ttft(eng: Any, prompt: list[int], n: int) -> tuple[float, list[int], int]:
    """Submit, wait for the end; return (seconds to the first token, the reply's ids, cached_tokens)."""
    from rtws.generation import SamplingParams

    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    ids: list[int] = []
    first: list[float] = []
    cached = [0]
    t0 = time.perf_counter()

    def sink(ev: Any) -> None:
        if ev.token_ids and not first:
            first.append(time.perf_counter())
        ids.extend(ev.token_ids or [])
        if ev.finish is not None:
            cached[0] = ev.cached_tokens or 0
            done.set_result(None)

    eng.submit(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True), sink)
    await done
    return first[0] - t0, ids, cached[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--system-len", type=int, default=1500)
    p.add_argument("--user-len", type=int, default=40)
    p.add_argument("--reply-len", type=int, default=48)
    p.add_argument("--prefill-budget", type=int, default=256)
    p.add_argument("--kv-cache-gb", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    print(f"# multiturn_bench  {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}")
    print(f"# machine: {machine_info()}")
    print(f"# command: multiturn_bench.py {' '.join(sys.argv[1:])}")
    on, off = build(True, args), build(False, args)
    vocab = len(on.tokenizer)
    per_turn: dict[str, list[list[float]]] = {"on": [[] for _ in range(args.turns)],
                                              "off": [[] for _ in range(args.turns)]}
    cached_at: list[list[int]] = [[] for _ in range(args.turns)]
    colds: list[float] = []
    lengths: list[int] = []

    async def conversation(seed: int) -> None:
        g = torch.Generator().manual_seed(seed)

        def fresh(n: int) -> list[int]:
            return torch.randint(10, vocab, (n,), generator=g).tolist()

        history = {"on": fresh(args.system_len), "off": []}
        history["off"] = list(history["on"])
        for t in range(args.turns):
            user = fresh(args.user_len)
            order = ("on", "off") if t % 2 == 0 else ("off", "on")
            replies = {}
            for mode in order:
                eng = on if mode == "on" else off
                prompt = history[mode] + user
                s, reply, cached = await ttft(eng, prompt, args.reply_len)
                per_turn[mode][t].append(s)
                if mode == "on":
                    cached_at[t].append(cached)
                    if t == args.turns - 1:
                        lengths.append(len(prompt))
                replies[mode] = reply
                history[mode] = prompt + reply
            assert replies["on"] == replies["off"], "prefix cache changed a greedy reply"
        s, _, cached = await ttft(on, fresh(lengths[-1]), args.reply_len)
        assert cached == 0
        colds.append(s)

    async def run_all() -> None:
        loop = asyncio.get_running_loop()
        on.start(loop)
        off.start(loop)
        for r in range(args.repeat):
            await conversation(1000 + r)

    try:
        asyncio.run(run_all())
    finally:
        on.stop()
        off.stop()
    cold = percentile(colds, 50)
    rows = []
    for t in range(args.turns):
        a, b = percentile(per_turn["on"][t], 50), percentile(per_turn["off"][t], 50)
        rows.append([t + 1, int(percentile([float(x) for x in cached_at[t]], 50)), ms(a), ms(b), f"{a / b:.2f}x"])
    print_table(f"TTFT per turn (median of {args.repeat} conversations; system prompt {args.system_len} tokens, "
                f"user turns {args.user_len}, replies {args.reply_len}; prefill budget {args.prefill_budget})",
                ["turn", "cached tokens", "TTFT cache on ms", "TTFT cache off ms", "on / off"], rows)
    last = percentile(per_turn["on"][-1], 50)
    print_table("turn {} against a cold prompt of the same length ({} tokens)".format(args.turns, lengths[-1]),
                ["cold prompt TTFT ms", f"turn {args.turns} cache on ms", "ratio", "target"],
                [[ms(cold), ms(last), f"{last / cold:.2f}x", "<= 0.30x"]])
    st = on.stats()
    print(f"# cached engine: prefix-cache hits {st.prefix_cache_hits:,} of {st.prefix_cache_queries:,} prompt tokens; "
          f"prefill computed {st.prefill_tokens:,}; uncached engine computed {off.stats().prefill_tokens:,}")


if __name__ == "__main__":
    main()
