"""The continuous-batching engine against model.generate, on real models loaded through the Auto classes."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tests.helpers.server import UNIT

from rtws.engine import Engine, EngineConfig
from rtws.generation import SamplingParams, TokenEvent
from rtws.runner import ModelRunner, load_model
from rtws.scheduler import StepPlan


def make_engine(path: Path, num_slots: int = 8, prefill_budget: int = 64, static_decode: bool = False,
                **cfg: Any) -> tuple[Engine, Any, Any]:
    model, tok = load_model(str(path), torch.device("cpu"), torch.float32)
    max_len = min(model.config.max_position_embeddings if hasattr(model.config, "max_position_embeddings")
                  else model.config.n_positions, 256)
    runner = ModelRunner(model, num_slots, max_len, torch.device("cpu"), static_decode=static_decode)
    eos = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    eng = Engine(runner, tok, EngineConfig(num_slots=num_slots, max_len=max_len, prefill_budget=prefill_budget, **cfg),
                 eos_ids=eos)
    return eng, model, tok


class Collector:
    """Collects one request's events; ``done`` resolves with the final event."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_event: Callable[[TokenEvent], None] | None = None) -> None:
        self.events: list[TokenEvent] = []
        self.done: asyncio.Future[TokenEvent] = loop.create_future()
        self.on_event = on_event

    def __call__(self, ev: TokenEvent) -> None:
        self.events.append(ev)
        if self.on_event is not None:
            self.on_event(ev)
        if ev.finish is not None:
            self.done.set_result(ev)

    @property
    def ids(self) -> list[int]:
        return [i for ev in self.events for i in (ev.token_ids or [])]

    @property
    def text(self) -> str:
        return "".join(ev.text for ev in self.events)


def reference(model: Any, prompt: list[int], n: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt):].tolist()  # type: ignore[no-any-return]


def staggered_greedy(eng: Engine, prompts: list[list[int]], n: int) -> list[Collector]:
    """Submit request i+1 once request i has produced 2 tokens: requests join at different steps."""

    async def main() -> list[Collector]:
        loop = asyncio.get_running_loop()
        eng.start(loop)
        cols: list[Collector] = []
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

        def submit(i: int) -> None:
            def on_event(ev: TokenEvent, i: int = i) -> None:
                if i + 1 < len(prompts) and len(cols) == i + 1 and len(cols[i].ids) >= 2:
                    submit(i + 1)

            col = Collector(loop, on_event)
            cols.append(col)
            eng.submit(prompts[i], params, col)

        submit(0)
        await asyncio.wait_for(asyncio.gather(*(asyncio.shield(c.done) for c in [cols[0]])), 60 * UNIT)
        while len(cols) < len(prompts):
            await asyncio.sleep(0.01)
        await asyncio.wait_for(asyncio.gather(*(c.done for c in cols)), 120 * UNIT)
        return cols

    try:
        return asyncio.run(main())
    finally:
        eng.stop()


def check_equal_to_generate(path: Path, n: int = 24, static_decode: bool = False) -> None:
    eng, model, tok = make_engine(path, num_slots=8, prefill_budget=16, static_decode=static_decode)
    text = "ROMEO:\nBut soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    base = tok.encode(text)
    prompts = [base[: 2 + 5 * i] for i in range(8)]  # 2..37 tokens: several need chunked prefill
    cols = staggered_greedy(eng, prompts, n)
    admitted = [c.events[0] for c in cols]
    assert len({id(a) for a in admitted}) == 8
    for i, (col, prompt) in enumerate(zip(cols, prompts)):
        assert col.done.result().finish == "length"
        assert col.ids == reference(model, prompt, n), f"request {i} (prompt {len(prompt)} tokens) diverged"
    assert eng.stats().slots_in_use == 0


def test_greedy_equals_generate_tiny_llama_gqa(tiny_llama_dir: Path) -> None:
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(tiny_llama_dir)
    assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
    check_equal_to_generate(tiny_llama_dir)


def test_static_shape_decode_equals_generate(tiny_llama_dir: Path) -> None:
    """The CUDA-graph decode path (bucketed static shapes, scratch-slot padding, full-length masked cache),
    run eagerly on CPU: same greedy tokens as model.generate while requests join and leave buckets."""
    check_equal_to_generate(tiny_llama_dir, static_decode=True)


def test_greedy_equals_generate_tiny_gpt2(tiny_gpt2_dir: Path) -> None:
    check_equal_to_generate(tiny_gpt2_dir)


def test_greedy_equals_generate_default_model(default_model_dir: Path) -> None:
    check_equal_to_generate(default_model_dir, n=32)


def run_engine(eng: Engine, body: Callable[[asyncio.AbstractEventLoop], Any]) -> Any:
    async def main() -> Any:
        loop = asyncio.get_running_loop()
        eng.start(loop)
        return await body(loop)

    try:
        return asyncio.run(main())
    finally:
        eng.stop()


@pytest.mark.parametrize("static_decode", [False, True], ids=["dynamic", "static"])
def test_seed_reproducible_whatever_the_batch(tiny_llama_dir: Path, static_decode: bool) -> None:
    eng, _, tok = make_engine(tiny_llama_dir, static_decode=static_decode)
    prompt = tok.encode("ROMEO:\n")
    params = SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=1234, ignore_eos=True)

    async def body(loop: asyncio.AbstractEventLoop) -> tuple[list[int], list[int], list[int]]:
        alone = Collector(loop)
        eng.submit(prompt, params, alone)
        await alone.done
        mates = [Collector(loop) for _ in range(5)]
        for i, m in enumerate(mates):
            eng.submit(tok.encode("x" * (i + 1)), SamplingParams(max_tokens=40, temperature=1.0, seed=i), m)
        crowded = Collector(loop)
        eng.submit(prompt, params, crowded)
        other = Collector(loop)
        eng.submit(prompt, SamplingParams(max_tokens=30, temperature=1.0, top_p=0.9, top_k=50, seed=99,
                                          ignore_eos=True), other)
        await asyncio.gather(crowded.done, other.done, *(m.done for m in mates))
        return alone.ids, crowded.ids, other.ids

    alone, crowded, other = run_engine(eng, body)
    assert len(alone) == 30
    assert crowded == alone
    assert other != alone  # a different seed samples differently


def test_prefill_is_chunked_under_the_budget_and_decodes_keep_running(tiny_llama_dir: Path) -> None:
    budget = 16
    eng, _, tok = make_engine(tiny_llama_dir, prefill_budget=budget)
    steps: list[tuple[int, set[int]]] = []

    class Obs:
        def on_step(self, engine: Engine, plan: StepPlan, seconds: float, events: list[TokenEvent]) -> None:
            steps.append((sum(c.end - c.start for c in plan.prefill), {s.rid for s in plan.decode}))

    eng.observer = Obs()
    long_prompt = tok.encode("But soft, what light through yonder window breaks? " * 6)[:150]

    async def body(loop: asyncio.AbstractEventLoop) -> tuple[list[int], int]:
        runners = [Collector(loop) for _ in range(2)]
        rids = [eng.submit(tok.encode("hi"), SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True), c)
                for c in runners]
        while min(len(c.ids) for c in runners) < 3:
            await asyncio.sleep(0.005)
        big = Collector(loop)
        eng.submit(long_prompt, SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), big)
        await asyncio.gather(big.done, *(c.done for c in runners))
        return rids, len(long_prompt)

    rids, n = run_engine(eng, body)
    chunked = [(tokens, dec) for tokens, dec in steps if tokens > 0 and tokens >= budget]
    assert len(chunked) >= n // budget  # the long prompt took several steps...
    assert all(tokens <= budget for tokens, _ in steps)  # ...each within the budget
    assert all(set(rids) <= dec for _, dec in chunked)  # running streams decoded in every one of them


def test_model_fault_fails_only_the_row_at_fault_and_engine_keeps_serving(tiny_llama_dir: Path) -> None:
    """A step that raises is retried in halves: only the generation whose row makes it fail ends with
    ``error``; its batch mates go on to their full length, and the engine keeps serving."""
    eng, model, tok = make_engine(tiny_llama_dir)
    state: dict[str, Any] = {"bad": None, "transient": False}

    def fault(plan: StepPlan) -> None:
        if state["transient"] and plan.decode:
            state["transient"] = False
            raise RuntimeError("injected transient failure")
        if state["bad"] is not None and any(s.rid == state["bad"] for s in plan.rows()):
            raise RuntimeError("injected failure on one row")

    eng.fault_injector = fault
    prompt = tok.encode("abc")

    async def body(loop: asyncio.AbstractEventLoop) -> tuple[list[str | None], list[list[int]], str | None, int]:
        cols = [Collector(loop) for _ in range(4)]
        rids = [eng.submit(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True), c) for c in cols]
        while min(len(c.ids) for c in cols) < 2:
            await asyncio.sleep(0.005)
        state["transient"] = True  # fails once: the retry succeeds, nobody fails
        while state["transient"]:
            await asyncio.sleep(0.005)
        state["bad"] = rids[2]
        reasons = [(await c.done).finish for c in cols]
        state["bad"] = None
        after = Collector(loop)
        eng.submit(prompt, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True), after)
        return reasons, [c.ids for c in cols], (await after.done).finish, len(after.ids)

    reasons, ids, after_reason, n = run_engine(eng, body)
    assert reasons == ["length", "length", "error", "length"]
    ref = reference(model, prompt, 30)
    assert ids[0] == ids[1] == ids[3] == ref  # the mates lost nothing, not even through the retries
    assert after_reason == "length" and n == 5
    assert eng.stats().step_errors >= 2 and eng.stats().slots_in_use == 0
    assert eng.stats().kv_blocks_used == 0


@pytest.mark.parametrize("static_decode", [False, True], ids=["dynamic", "static"])
def test_absurd_sampling_values_never_fail_batch_mates(tiny_llama_dir: Path, static_decode: bool) -> None:
    eng, model, tok = make_engine(tiny_llama_dir, static_decode=static_decode)
    prompt = tok.encode("abc")

    async def body(loop: asyncio.AbstractEventLoop) -> tuple[list[str | None], list[int]]:
        greedy = Collector(loop)
        eng.submit(prompt, SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), greedy)
        odd = [Collector(loop) for _ in range(3)]
        eng.submit(prompt, SamplingParams(max_tokens=20, temperature=1.0, top_k=10**30, ignore_eos=True), odd[0])
        eng.submit(prompt, SamplingParams(max_tokens=20, temperature=1.0, top_k=-(10**30), seed=-(10**40),
                                          ignore_eos=True), odd[1])
        eng.submit(prompt, SamplingParams(max_tokens=20, temperature=0.7, top_k=10**6, seed=2**70, top_p=0.5,
                                          ignore_eos=True), odd[2])
        reasons = [(await c.done).finish for c in [greedy, *odd]]
        return reasons, greedy.ids

    reasons, ids = run_engine(eng, body)
    assert reasons == ["length"] * 4
    assert ids == reference(model, prompt, 20)
    assert eng.stats().step_errors == 0


def test_pause_keeps_the_slot_and_skips_steps(tiny_llama_dir: Path) -> None:
    eng, _, tok = make_engine(tiny_llama_dir)

    async def body(loop: asyncio.AbstractEventLoop) -> tuple[int, int, int, str | None]:
        paused = Collector(loop)
        other = Collector(loop)
        rid = eng.submit(tok.encode("a"), SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True), paused)
        while len(paused.ids) < 2:
            await asyncio.sleep(0.005)
        eng.pause([rid])
        await asyncio.sleep(0.05)
        frozen = len(paused.ids)
        eng.submit(tok.encode("b"), SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True), other)
        await other.done
        during = len(paused.ids)
        slots = eng.stats().slots_in_use
        eng.resume([rid])
        return frozen, during, slots, (await paused.done).finish

    frozen, during, slots, reason = run_engine(eng, body)
    assert during == frozen  # no tokens while paused, though another request ran 20 steps
    assert slots == 1  # it kept its KV blocks
    assert reason == "length"


def test_deadline_ends_with_timeout(tiny_llama_dir: Path) -> None:
    import time

    eng, _, tok = make_engine(tiny_llama_dir)

    async def body(loop: asyncio.AbstractEventLoop) -> str | None:
        c = Collector(loop)
        rid = eng.submit(tok.encode("a"), SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), c,
                         deadline=time.monotonic() + 0.3 * UNIT)
        eng.pause([rid])  # never finishes on its own
        return (await asyncio.wait_for(c.done, 10 * UNIT)).finish

    assert run_engine(eng, body) == "timeout"
    assert eng.stats().slots_in_use == 0


def test_context_end_stops_with_length(tiny_llama_dir: Path) -> None:
    eng, _, tok = make_engine(tiny_llama_dir)
    prompt = tok.encode("x " * 300)[:250]

    async def body(loop: asyncio.AbstractEventLoop) -> tuple[str | None, int]:
        c = Collector(loop)
        eng.submit(prompt, SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True), c)
        ev = await c.done
        return ev.finish, len(c.ids)

    reason, n = run_engine(eng, body)
    assert reason == "length" and len(prompt) + n <= 256


def join_whole(runner: ModelRunner, kv: Any, s: Any) -> Any:
    """Prefill ``s`` (a scheduler Sequence) whole in one step and take its first token; returns ``s``."""
    from rtws.scheduler import PrefillChunk

    kv.ensure(s, len(s.prompt_ids))
    res = runner.step(StepPlan(prefill=[PrefillChunk(s, 0, len(s.prompt_ids))], decode=[]))
    s.num_cached = len(s.prompt_ids)
    s.output_ids.append(res.tokens[0][1])
    return s


def test_decode_lanes_equal_the_block_gather_as_rows_join_leave_and_sit_out(tiny_llama_dir: Path) -> None:
    """The lanes (contiguous per-row KV, read as a view) give the same logits as the block gather while rows
    join, finish, sit a step out (paused) and come back: lanes compact, refill from the pool, stay exact."""
    from rtws.kv_blocks import KVCacheManager
    from rtws.scheduler import Sequence

    model, _ = load_model(str(tiny_llama_dir), torch.device("cpu"), torch.float32)
    runners = {lanes: ModelRunner(model, 8, 256, torch.device("cpu"), kv_cache_gb=0.01, decode_lanes=lanes)
               for lanes in (True, False)}
    assert runners[True]._lanes is not None and runners[False]._lanes is None
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(1, 200, (5 + 3 * i,), generator=g).tolist() for i in range(6)]
    out: dict[bool, dict[int, list[int]]] = {}
    for lanes, runner in runners.items():
        kv = KVCacheManager(runner.num_blocks, runner.block_size, prefix_cache=False)
        seqs = [Sequence(rid=i, prompt_ids=p, params=SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
        live: list[Sequence] = []
        for step in range(40):
            if step % 4 == 0 and step // 4 < len(seqs):  # a new row joins every 4 steps
                live.append(join_whole(runner, kv, seqs[step // 4]))
            rows = [s for s in live if not (s.rid == 1 and 10 <= step < 14)]  # row 1 sits four steps out
            for s in rows:
                kv.ensure(s, s.num_cached + 1)
            res = runner.step(StepPlan(prefill=[], decode=rows))
            for s, tok in res.tokens:
                s.num_cached += 1
                s.output_ids.append(tok)
            live = [s for s in live if not (s.rid == 0 and len(s.output_ids) >= 12)]  # row 0 finishes early
        out[lanes] = {s.rid: s.output_ids for s in seqs}
        if lanes:
            lanes_state = runners[True]._lanes
            assert lanes_state is not None and len(lanes_state.rows) == len(live)
    assert out[True] == out[False]
    with torch.inference_mode():
        for i in (0, 1, 5):
            ids = out[True][i]
            assert ids == reference(model, prompts[i], len(ids))


def test_shared_one_token_decodes_give_the_same_deltas(tiny_llama_dir: Path, default_model_dir: Path) -> None:
    """The engine's shared cache of one-token decodes (``pieces``) changes no delta, for streams sharing it."""
    from transformers import AutoTokenizer

    from rtws.detok import TextStream

    texts = ["Hello, world! ROMEO: what light", "caf\u00e9 \U0001F600 na\u00efve   spaces\n\nnew line",
             " leading space and \u4e2d\u6587 text", "Hello, world! again, hello"]
    for path in (tiny_llama_dir, default_model_dir):
        tok = AutoTokenizer.from_pretrained(path)
        pieces: dict[int, str] = {}
        for text in texts:
            ids = tok.encode(text, add_special_tokens=False)
            plain, shared = TextStream(tok), TextStream(tok, (), pieces)
            a = [plain.push(i)[0] for i in ids] + [plain.flush()]
            b = [shared.push(i)[0] for i in ids] + [shared.flush()]
            assert a == b and "".join(b) == tok.decode(ids, skip_special_tokens=True)
        assert pieces  # the cache was used


@pytest.mark.parametrize("which", ["tiny_llama_gqa", "default_model"])
def test_lean_decode_gives_the_hf_forwards_tokens(which: str, tiny_llama_dir: Path, default_model_dir: Path,
                                                  tiny_gpt2_dir: Path) -> None:
    """The lean decode step (rtws.runner._LeanDecoder: the model's own modules without the transformers
    forward's per-call machinery) gives the HF forward's logits bitwise, step for step, as rows join at
    different lengths; with its linears on oneDNN (packed weights, cpu_gemm) the same greedy tokens and logits
    within float32 rounding; other architectures keep the HF forward and say why."""
    from rtws.kv_blocks import KVCacheManager
    from rtws.scheduler import Sequence

    path = tiny_llama_dir if which == "tiny_llama_gqa" else default_model_dir
    model, _ = load_model(str(path), torch.device("cpu"), torch.float32)
    kinds: dict[str, dict[str, Any]] = {"hf": {"lean_decode": False}, "lean": {"cpu_gemm": "default"},
                                       "packed": {"cpu_gemm": "onednn"}}
    runners = {k: ModelRunner(model, 8, 256, torch.device("cpu"), kv_cache_gb=0.01, **kw) for k, kw in kinds.items()}
    assert runners["lean"].lean_decode_reason is None and runners["lean"]._lean is not None
    assert not runners["lean"].cpu_gemm and runners["lean"]._lean is not None and not runners["lean"]._lean.packed
    assert runners["packed"].cpu_gemm and runners["packed"]._lean is not None and runners["packed"]._lean.packed
    assert runners["hf"]._lean is None and "no lean decode step" in runners["hf"].cpu_gemm_reason
    gpt2, _ = load_model(str(tiny_gpt2_dir), torch.device("cpu"), torch.float32)
    assert "not a lean architecture" in (ModelRunner(gpt2, 2, 64, torch.device("cpu"), kv_cache_gb=0.01)
                                         .lean_decode_reason or "")
    g = torch.Generator().manual_seed(11)
    vocab = int(model.config.vocab_size)
    prompts = [torch.randint(1, vocab, (3 + 7 * i,), generator=g).tolist() for i in range(6)]
    out: dict[str, list[list[int]]] = {}
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in kinds}
    for kind, runner in runners.items():
        forward = runner._forward_lanes

        def recorded(seqs: list[Sequence], forward: Any = forward, into: list[torch.Tensor] = logits[kind]) -> Any:
            out = forward(seqs)
            into.append(out.clone())
            return out

        runner._forward_lanes = recorded  # type: ignore[method-assign]
        kv = KVCacheManager(runner.num_blocks, runner.block_size, prefix_cache=False)
        seqs = [Sequence(rid=i, prompt_ids=p, params=SamplingParams(temperature=0.0)) for i, p in enumerate(prompts)]
        live: list[Sequence] = []
        for step in range(36):
            if step % 3 == 0 and step // 3 < len(seqs):
                live.append(join_whole(runner, kv, seqs[step // 3]))
            for s in live:
                kv.ensure(s, s.num_cached + 1)
            for s, tok in runner.step(StepPlan(prefill=[], decode=live)).tokens:
                s.num_cached += 1
                s.output_ids.append(tok)
        out[kind] = [s.output_ids for s in seqs]
    assert sum(len(x) for x in out["hf"]) > 100
    assert out["lean"] == out["hf"] and out["packed"] == out["hf"]
    assert all(len(v) == 36 for v in logits.values())
    assert all(torch.equal(a, b) for a, b in zip(logits["lean"], logits["hf"]))  # bitwise, not merely argmax
    for a, b in zip(logits["packed"], logits["hf"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # another summation order, same precision
    assert any(not torch.equal(a, b) for a, b in zip(logits["packed"], logits["hf"]))  # it did run oneDNN


def test_cpu_gemm_auto_packs_served_float32_models_only(tiny_llama_dir: Path, default_model_dir: Path) -> None:
    """cpu_gemm=auto leaves test-sized models on the default GEMM and decides the bundled model by timing
    (the reason says which and why); the choice itself is a pure function of the model and the machine."""
    from rtws.runner import CPU_GEMM_MAX_BYTES, cpu_gemm_choice

    tiny, _ = load_model(str(tiny_llama_dir), torch.device("cpu"), torch.float32)
    r = ModelRunner(tiny, 4, 128, torch.device("cpu"), kv_cache_gb=0.01)
    assert not r.cpu_gemm and "test-sized" in r.cpu_gemm_reason
    served, _ = load_model(str(default_model_dir), torch.device("cpu"), torch.float32)
    r = ModelRunner(served, 4, 128, torch.device("cpu"), kv_cache_gb=0.01)
    assert set(r.cpu_gemm_timing) == {"default", "onednn"}
    assert ("oneDNN with packed weights" in r.cpu_gemm_reason) == r.cpu_gemm
    f32, big = torch.float32, 10_000_000
    assert cpu_gemm_choice("auto", "cpu", f32, big, 1 << 20, True, True)[0]
    assert not cpu_gemm_choice("default", "cpu", f32, big, 1 << 20, True, True)[0]
    assert "not on cuda" in cpu_gemm_choice("onednn", "cuda", f32, big, 1 << 20, True, True)[1]
    assert "no oneDNN" in cpu_gemm_choice("auto", "cpu", f32, big, 1 << 20, True, False)[1]
    assert "bfloat16" in cpu_gemm_choice("onednn", "cpu", torch.bfloat16, big, 1 << 20, True, True)[1]
    assert "quantized" in cpu_gemm_choice("onednn", "cpu", f32, big, 1 << 20, False, True)[1]
    assert cpu_gemm_choice("onednn", "cpu", f32, 10, 1 << 20, True, True)[0]  # forced: whatever the size
    assert "double them" in cpu_gemm_choice("auto", "cpu", f32, big, CPU_GEMM_MAX_BYTES + 1, True, True)[1]


def test_elastic_min_rows_is_timed_for_served_models_only(tiny_llama_dir: Path, default_model_dir: Path) -> None:
    """ModelRunner.elastic_min_rows: test-sized models are not timed (the floor); the bundled model's answer is
    a probed row count at or above the floor, or None (2 threads never paid), and the threads are put back."""
    tiny, _ = load_model(str(tiny_llama_dir), torch.device("cpu"), torch.float32)
    r = ModelRunner(tiny, 8, 128, torch.device("cpu"), kv_cache_gb=0.01)
    assert r.elastic_min_rows(1, 2) == ModelRunner.ELASTIC_MIN_ROWS
    served, _ = load_model(str(default_model_dir), torch.device("cpu"), torch.float32)
    r = ModelRunner(served, 8, 128, torch.device("cpu"), kv_cache_gb=0.01)
    before = torch.get_num_threads()
    got = r.elastic_min_rows(1, 2)
    assert got is None or (got in ModelRunner.ELASTIC_PROBE_ROWS and got >= ModelRunner.ELASTIC_MIN_ROWS)
    assert torch.get_num_threads() == 1 and r._lanes is not None and r._lanes.length == 0  # scratch lanes only
    torch.set_num_threads(before)
