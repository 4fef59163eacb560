"""A served model: tokenizer, engine and the prompt rules, loaded through the runner."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .engine import Engine, EngineConfig, StepObserver
from .generation import SamplingParams, TokenEvent

if TYPE_CHECKING:
    from .config import ServerConfig

log = logging.getLogger("rtws.model")


class PromptError(ValueError):
    """A prompt that cannot be served (too long, no chat template, empty)."""


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """What to load. ``path`` is a folder, a hub id, or a benchmark aid such as ``gpt2-random``."""

    name: str
    path: str
    version: str = "1"
    device: str = "auto"
    dtype: str = "auto"
    num_slots: int = 64
    max_seq_len: int | None = None
    prefill_budget: int = 256
    max_batch_size: int | None = None
    max_batch_wait_ms: float = 0.0
    aging_s: float = 2.0
    max_prompt_tokens: int | None = None
    cuda_graphs: bool = True
    quantization: str = "none"
    kv_cache_gb: float | None = None
    prefix_cache: bool = True
    block_size: int = 16
    compile: str = "off"  # auto | on | off (ModelRunner; ServerConfig's default is auto)
    cpu_gemm: str = "auto"  # auto | onednn | default (ModelRunner)
    engine_process: str = "off"  # auto | on | off (rtws.engine_process; ServerConfig's default is auto)

    @classmethod
    def from_config(cls, config: ServerConfig, *, name: str, path: str, version: str = "1",
                    device: str | None = None, dtype: str | None = None) -> ModelSpec:
        """The spec the server's ``config`` gives a model at ``path`` (``device``/``dtype`` override it)."""
        return cls(
            name=name, path=path, version=version, device=device or config.device, dtype=dtype or config.dtype,
            num_slots=config.num_slots, max_seq_len=config.max_seq_len, prefill_budget=config.prefill_budget,
            max_batch_size=config.max_batch_size, max_batch_wait_ms=config.max_batch_wait_ms,
            aging_s=config.priority_aging_s, max_prompt_tokens=config.max_prompt_tokens,
            cuda_graphs=config.cuda_graphs, kv_cache_gb=config.kv_cache_gb, prefix_cache=config.prefix_cache,
            block_size=config.block_size, quantization=config.quantization, compile=config.compile,
            cpu_gemm=config.cpu_gemm, engine_process=config.engine_process,
        )


class ServedModel:
    """One loaded model version with its engine. Thread-safe to read; start/stop from the loop."""

    def __init__(self, spec: ModelSpec, model: Any, tokenizer: Any, engine: Engine, context_len: int,
                 device: str) -> None:
        self.spec = spec
        self.name = spec.name
        self.version = spec.version
        self.model = model
        self.tokenizer = tokenizer
        self.engine = engine
        self.context_len = context_len
        self.device = device
        self.max_prompt_tokens = min(spec.max_prompt_tokens or context_len - 1, context_len - 1)
        self.kv_capacity_tokens = int(getattr(engine, "kv_capacity_tokens", 0)) or None
        self.warm = False
        self.loaded_at = time.time()

    # ------------------------------------------------------------------ prompts

    def encode(self, prompt: str | None = None, messages: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids for a plain prompt or chat ``messages`` (through the tokenizer's chat template)."""
        tok = self.tokenizer
        if messages is not None:
            if not getattr(tok, "chat_template", None):
                raise PromptError(f"model {self.name!r} has no chat template; send 'prompt' instead")
            try:
                text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # jinja errors: the messages did not fit the template
                raise PromptError(f"chat template failed: {type(exc).__name__}: {exc}") from None
            ids: list[int] = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok(prompt or "", add_special_tokens=True)["input_ids"]
        if not ids:
            start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
            if start is None:
                raise PromptError("prompt is empty")
            ids = [start]
        if len(ids) > self.max_prompt_tokens:
            raise PromptError(
                f"prompt is {len(ids)} tokens; this model accepts at most {self.max_prompt_tokens}")
        cap = self.kv_capacity_tokens
        if cap is not None and len(ids) >= cap:
            gb = self.spec.kv_cache_gb
            budget = f"--kv-cache-gb {gb:g}" if gb is not None else "the default KV budget"
            raise PromptError(
                f"prompt is {len(ids)} tokens; the KV cache ({budget}: {cap} token positions) can hold a prompt "
                f"of at most {cap - 1} tokens")
        return ids

    # ------------------------------------------------------------------ lifecycle

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.engine.start(loop)

    def stop(self) -> None:
        self.engine.stop()

    async def warmup(self, timeout: float = 120.0) -> str:
        """Run one real generation through the engine; return its text. Raises on failure."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[str] = loop.create_future()
        parts: list[str] = []

        def sink(ev: TokenEvent) -> None:
            parts.append(ev.text)
            if ev.finish is not None and not done.done():
                if ev.finish == "error":
                    done.set_exception(RuntimeError(f"warm-up generation failed: {ev.error}"))
                else:
                    done.set_result("".join(parts))

        ids = self.encode("Hello")
        self.engine.submit(ids, SamplingParams(max_tokens=4, temperature=0.0), sink)
        text = await asyncio.wait_for(done, timeout)
        self.warm = True
        return text


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    gc = getattr(model, "generation_config", None)
    for v in (getattr(gc, "eos_token_id", None), getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return ids


def cache_salt(spec: ModelSpec) -> str:
    """The prefix-cache key of a model's weights: name, version and quantization (never shared across them)."""
    return "\0".join((spec.name, spec.version, spec.quantization, spec.path))


def load(spec: ModelSpec, observer: StepObserver | None = None, *, engine_cls: type[Engine] = Engine) -> ServedModel:
    """Load weights and tokenizer and build the engine (blocking: call from a worker thread).

    Where :func:`rtws.engine_process.engine_process_choice` says so, the model and its engine load in a
    process of their own instead, and the ServedModel holds a :class:`~rtws.engine_process.RemoteEngine`.
    """
    from . import runner as rn

    if engine_cls is Engine and spec.engine_process != "off":
        from .engine_process import engine_process_choice, weight_bytes
        from .threads import usable_cores

        use, reason = engine_process_choice(spec.engine_process, rn.resolve_device(spec.device).type,
                                            usable_cores(), weight_bytes(spec.path))
        log.info("engine process: %s", reason, extra={"event": "engine_process_choice", "model": spec.name,
                                                     "engine_process": use, "reason": reason})
        if use:
            return load_in_engine_process(spec, observer)
    device = rn.resolve_device(spec.device)
    dtype = rn.resolve_dtype(spec.dtype, device)
    t0 = time.perf_counter()
    model, tokenizer = rn.load_model(spec.path, device, dtype)
    from .quant import quantize  # torch-side (torchao), like the runner; a no-op for "none"
    model = quantize(model, spec, device)
    ctx = rn.model_context_length(model.config)
    max_len = min(spec.max_seq_len or ctx, ctx)
    runner = rn.ModelRunner(model, spec.num_slots, max_len, device,
                            static_decode=spec.cuda_graphs and device.type == "cuda", cuda_graphs=spec.cuda_graphs,
                            kv_cache_gb=spec.kv_cache_gb, block_size=spec.block_size, compile=spec.compile,
                            cpu_gemm=spec.cpu_gemm)
    log.info("decode gemm: %s", runner.cpu_gemm_reason,
             extra={"event": "cpu_gemm_choice", "model": spec.name, "cpu_gemm": runner.cpu_gemm,
                    "reason": runner.cpu_gemm_reason, **runner.cpu_gemm_timing})
    log.info("decode compile: %s", runner.compile_reason,
             extra={"event": "compile_choice", "model": spec.name, "compile": runner.compile_choice,
                    "reason": runner.compile_reason})
    runner.warmup()
    engine = engine_cls(
        runner,
        tokenizer,
        EngineConfig(
            num_slots=spec.num_slots,
            max_len=max_len,
            prefill_budget=spec.prefill_budget,
            max_batch_size=spec.max_batch_size,
            max_batch_wait_s=spec.max_batch_wait_ms / 1000.0,
            aging_s=spec.aging_s,
            prefix_cache=spec.prefix_cache,
            cache_salt=cache_salt(spec),
        ),
        eos_ids=eos_token_ids(model, tokenizer),
        name=spec.name,
        observer=observer,
    )
    log.info("model loaded", extra={"event": "model_loaded", "model": spec.name, "version": spec.version,
                                    "path": spec.path, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                                    "context": max_len, "kv_blocks": runner.num_blocks, "block_size": runner.block_size,
                                    "kv_cache_bytes": runner.kv_cache_bytes,
                                    "seconds": round(time.perf_counter() - t0, 3)})
    return ServedModel(spec, model, tokenizer, engine, max_len, str(device))


def load_in_engine_process(spec: ModelSpec, observer: StepObserver | None = None) -> ServedModel:
    """Start the engine process for ``spec`` (:class:`rtws.engine_process.RemoteEngine`), load the tokenizer here
    meanwhile, and wait for the child's ``ready``."""
    from types import SimpleNamespace

    from .engine_process import RemoteEngine
    from .runner import load_tokenizer

    t0 = time.perf_counter()
    engine = RemoteEngine(spec, observer)
    try:
        tokenizer = load_tokenizer(spec.path)
        info = engine.wait_ready()
    except BaseException:
        engine.stop(timeout=5.0)
        raise
    facts = SimpleNamespace(config=info["config"], dtype=info["dtype"])  # what the banner and /v1/models read
    log.info("engine process ready", extra={"event": "engine_process_ready", "model": spec.name,
                                            "pid": info["pid"], "seconds": round(time.perf_counter() - t0, 3)})
    return ServedModel(spec, facts, tokenizer, engine, int(info["context_len"]), str(info["device"]))  # type: ignore[arg-type]
