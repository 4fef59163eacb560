"""A torch.compile'd decode step (``compile="on"``) gives the same greedy tokens as eager, on a tiny model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from rtws.generation import SamplingParams
from rtws.runner import COMPILE_AUTO_MIN_PARAMS, ModelRunner, compile_choice, load_model
from rtws.scheduler import PrefillChunk, Sequence, StepPlan

# importing inductor (torch 2.13) warns about its own torch.jit.script_method use
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::DeprecationWarning:torch.*")]


def _greedy(runner: ModelRunner, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill every prompt (one block table each), then decode all rows together for ``steps`` steps."""
    seqs = []
    for i, p in enumerate(prompts):
        s = Sequence(rid=i, prompt_ids=p, params=SamplingParams(max_tokens=steps + 1, temperature=0.0))
        s.block_table = [1 + i * 8 + k for k in range(8)]
        seqs.append(s)
    out = runner.step(StepPlan(prefill=[PrefillChunk(s, 0, len(s.prompt_ids)) for s in seqs], decode=[]))
    for s, t in out.tokens:
        s.num_cached = len(s.prompt_ids)
        s.output_ids.append(t)
    for _ in range(steps):
        out = runner.step(StepPlan(prefill=[], decode=seqs))
        for s, t in out.tokens:
            s.num_cached += 1
            s.output_ids.append(t)
    return [s.output_ids for s in seqs]


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="inductor on the CPU needs a C++ compiler")
def test_compiled_decode_is_greedy_identical_to_eager(tiny_llama_dir: Path) -> None:
    model, _ = load_model(str(tiny_llama_dir), torch.device("cpu"), torch.float32)
    eager = ModelRunner(model, 2, 128, torch.device("cpu"), kv_cache_gb=0.01, compile="off")
    compiled = ModelRunner(model, 2, 128, torch.device("cpu"), kv_cache_gb=0.01, compile="on")
    assert compiled._compiled is not None
    compiled._compiled.shapes = lambda: [(1, 128), (2, 128)]  # type: ignore[method-assign]  # bound compile time
    eager.warmup()
    compiled.warmup()
    assert {(r["batch"], r["kv_len"]) for r in compiled.compile_report if r["kept"]} == {(1, 128), (2, 128)}
    assert all(r["exact"] for r in compiled.compile_report)
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    prompts = [[5, 9, 13, 2, 7], [3, 3, 8]]
    for rows in (prompts[:1], prompts):
        calls = 0
        body = compiled._compiled.sd.compiled

        def counting(*a: object) -> torch.Tensor:
            nonlocal calls
            calls += 1
            out: torch.Tensor = body(*a)
            return out

        compiled._compiled.sd.compiled = counting
        got = _greedy(compiled, rows, 20)
        compiled._compiled.sd.compiled = body
        assert calls == 20, "every decode step took the compiled path"
        assert got == _greedy(eager, rows, 20)
    assert counters["stats"]["unique_graphs"] == graphs, "serving never recompiles (no stall in the engine thread)"


def test_compile_choice() -> None:
    big = COMPILE_AUTO_MIN_PARAMS
    assert compile_choice("off", "cpu", False, big)[0] is False
    assert compile_choice("auto", "cpu", False, big)[0] is True
    assert compile_choice("auto", "cpu", False, big - 1)[0] is False  # test-sized models stay eager
    assert compile_choice("on", "cpu", False, 10)[0] is True
    assert compile_choice("on", "cuda", True, big)[0] is False  # CUDA graphs there
    assert compile_choice("auto", "cuda", False, big)[0] is False


def test_a_failing_compile_leaves_decode_eager(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No C++ compiler, or a model inductor cannot lower: the load goes on, eagerly, and says so."""
    def broken(fn: object, **kw: object) -> object:
        def run(*a: object) -> None:
            raise RuntimeError("inductor: no working C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    model, _ = load_model(str(tiny_llama_dir), torch.device("cpu"), torch.float32)
    runner = ModelRunner(model, 2, 128, torch.device("cpu"), kv_cache_gb=0.01, compile="on")
    runner.warmup()
    assert runner._compiled is None
    eager = ModelRunner(model, 2, 128, torch.device("cpu"), kv_cache_gb=0.01, compile="off")
    assert _greedy(runner, [[5, 9, 13]], 5) == _greedy(eager, [[5, 9, 13]], 5)


def test_compile_setting_reaches_the_model_spec() -> None:
    from rtws.config import ServerConfig
    from rtws.model import ModelSpec

    assert ServerConfig().compile == "auto"
    cfg = ServerConfig.from_sources(env={"RTWS_COMPILE": "on"})
    assert cfg.compile == "on"
    assert ModelSpec.from_config(cfg, name="m", path="p").compile == "on"
    with pytest.raises(ValueError, match="compile"):
        ServerConfig(compile="sometimes")


def test_model_config_compile_overrides_the_server() -> None:
    from rtws.api import ModelConfig
    from rtws.config import ServerConfig

    cfg = ServerConfig(compile="auto")
    assert ModelConfig(name="m", model_path="p").to_spec(cfg).compile == "auto"
    assert ModelConfig(name="m", model_path="p", compile="off").to_spec(cfg).compile == "off"
    with pytest.raises(ValueError, match="compile"):
        ModelConfig(name="m", model_path="p", compile="yes")
