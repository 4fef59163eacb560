"""Model runner: the only module that imports torch and transformers.

It holds the model, a slot KV cache and the sampler, and turns a
:class:`~rtws.scheduler.StepPlan` into next tokens. Preparing tensors
(:meth:`ModelRunner._prepare`) is separate from running the forward.

The slot KV cache is a transformers ``Cache`` whose layers keep one KV row per
*slot*: ``[num_slots, kv_heads, max_len, head_dim]``. Before each forward the
runner says, per batch row, which slot it uses and which positions it writes;
``update()`` scatters the new keys/values there and returns the slot rows in
use, cut to the longest live length. With ``position_ids`` per row and a 4D
additive mask (transformers uses a 4D mask as-is), sequences join and leave
between steps with no re-padding and no copying, for any architecture built on
the standard Cache interface (GPT-2, Llama, Mistral, Qwen, ...).
"""

from __future__ import annotations

import inspect
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin

from .scheduler import PrefillChunk, Sequence, StepPlan

log = logging.getLogger("rtws.runner")

try:  # progress bars on stderr are noise in a server log
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


# --------------------------------------------------------------------------- loading


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise ValueError(f"unknown dtype {dtype!r}; expected auto, float32, bfloat16 or float16")
    return table[dtype]


RANDOM_MODELS = ("gpt2-random", "llama-random")


def load_model(
    path: str | os.PathLike[str], device: torch.device, dtype: torch.dtype, tokenizer_path: str | None = None
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer exactly as a user would, through the Auto classes.

    ``gpt2-random`` / ``llama-random`` build an architecture with random
    weights (a benchmark aid: no hub needed) and use the bundled tokenizer.
    """
    name = str(path)
    if name in RANDOM_MODELS:
        from .default_model import DEFAULT_MODEL_PATH

        tok = AutoTokenizer.from_pretrained(tokenizer_path or DEFAULT_MODEL_PATH)
        if name == "gpt2-random":
            from transformers import GPT2Config

            config: Any = GPT2Config()  # the 124M architecture
        else:
            from transformers import LlamaConfig

            config = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                                 num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                                 vocab_size=32000)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        tok = AutoTokenizer.from_pretrained(tokenizer_path or name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
        model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tok


def model_context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


def is_model_dir(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists()


def read_config(path: str) -> Any:
    return AutoConfig.from_pretrained(path)


# --------------------------------------------------------------------------- slot KV cache


class _SlotLayer(CacheLayerMixin):
    """One decoder layer's KV storage, one row per slot."""

    def __init__(self, owner: SlotKVCache) -> None:
        super().__init__()
        self._owner = owner

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # Layout [slot, head, position, dim], what attention reads; writes go through a flat [-1, dim] view
        # with one index_copy_ (row = (slot * heads + head) * max_len + position).
        o = self._owner
        _, heads, _, kdim = key_states.shape
        vdim = value_states.shape[-1]
        self.keys = torch.zeros(o.num_slots, heads, o.max_len, kdim, dtype=key_states.dtype, device=key_states.device)
        self.values = torch.zeros(o.num_slots, heads, o.max_len, vdim, dtype=value_states.dtype,
                                  device=value_states.device)
        self._flat_k = self.keys.view(-1, kdim)
        self._flat_v = self.values.view(-1, vdim)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        assert self.keys is not None and self.values is not None
        o = self._owner
        index = o.write_index_for(key_states.shape[1])
        self._flat_k.index_copy_(0, index, key_states.reshape(-1, key_states.shape[-1]))
        self._flat_v.index_copy_(0, index, value_states.reshape(-1, value_states.shape[-1]))
        if o.read_rows is None:
            return self.keys[: o.batch, :, : o.kv_len], self.values[: o.batch, :, : o.kv_len]
        # index_select on the length-cut view: several times faster on CPU than advanced indexing
        k = self.keys[:, :, : o.kv_len].index_select(0, o.read_rows)
        v = self.values[:, :, : o.kv_len].index_select(0, o.read_rows)
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.kv_len, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self._owner.max_len


class SlotKVCache(Cache):
    """A transformers Cache addressed by slot. Call :meth:`bind` before every forward."""

    def __init__(self, num_layers: int, num_slots: int, max_len: int) -> None:
        self.num_slots = num_slots
        self.max_len = max_len
        self.write_slots: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self.write_positions: torch.Tensor = torch.zeros(0, 1, dtype=torch.long)
        self._index_cache: tuple[int, torch.Tensor] | None = None
        self.read_rows: torch.Tensor | None = None
        self.batch = 0
        self.kv_len = 0
        super().__init__(layers=[_SlotLayer(self) for _ in range(num_layers)])

    def bind(self, slots: list[int], positions: torch.Tensor, kv_len: int, device: torch.device) -> None:
        """Point the next forward at ``slots`` (one per row), writing at ``positions`` ``[B, L]``."""
        self.batch = len(slots)
        self.kv_len = kv_len
        slot_t = torch.tensor(slots, dtype=torch.long, device=device)
        self.write_slots = slot_t
        self.write_positions = positions
        self._index_cache = None
        # Rows 0..B-1 in order can be read as a view instead of a gather.
        self.read_rows = None if slots == list(range(len(slots))) else slot_t

    def bind_tensors(self, slots: torch.Tensor, positions: torch.Tensor, kv_len: int) -> None:
        """Static-shape binding (CUDA graphs): slots ``[B]`` and positions ``[B, L]`` are device tensors."""
        self.batch = int(slots.shape[0])
        self.kv_len = kv_len
        self.write_slots = slots
        self.write_positions = positions
        self.read_rows = slots
        self._index_cache = None

    def write_index_for(self, heads: int) -> torch.Tensor:
        """Flat row indices ``[B * heads * L]`` for this forward's writes (computed once, shared by all layers)."""
        if self._index_cache is None or self._index_cache[0] != heads:
            s, p = self.write_slots, self.write_positions
            h = torch.arange(heads, device=s.device)
            idx = ((s[:, None, None] * heads + h[None, :, None]) * self.max_len + p[:, None, :]).reshape(-1)
            self._index_cache = (heads, idx)
        return self._index_cache[1]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0


# --------------------------------------------------------------------------- sampling


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (lowbias32 shape) on int64 tensors holding values < 2**32.

    Multipliers are below 2**31 so products stay below 2**63: no signed overflow.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x1B873593) & _M32
    return x ^ (x >> 16)


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seeds: torch.Tensor,
    counters: torch.Tensor,
    vocab_hash: torch.Tensor,
    need_filter: bool,
) -> torch.Tensor:
    """Pick one token per row, without any host synchronisation.

    Greedy where ``temperature == 0``. Otherwise Gumbel-max over
    ``logits / temperature`` after top-k / top-p filtering, with noise that is
    a pure function of (seed, counter, token id): a seeded request samples the
    same tokens whatever else shares its batch, on any device.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    temp = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    scaled = logits / temp[:, None]
    if need_filter:
        sorted_logits, sorted_idx = scaled.sort(dim=-1, descending=True)
        vocab = scaled.shape[-1]
        ranks = torch.arange(vocab, device=scaled.device)[None, :]
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab))
        remove = ranks >= k[:, None]
        probs = sorted_logits.softmax(dim=-1)
        cum_before = probs.cumsum(dim=-1) - probs
        remove |= cum_before >= top_p[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        scaled = torch.empty_like(scaled).scatter_(1, sorted_idx, sorted_logits)
    key = _mix32((seeds & _M32) ^ _mix32((seeds >> 32) ^ _mix32(counters & _M32)))
    h = _mix32(key[:, None] ^ vocab_hash[None, :])
    u = ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))
    gumbel = -torch.log(-torch.log(u))
    sampled = (scaled + gumbel).argmax(dim=-1)
    return torch.where(temperature > 0, sampled, greedy)


# --------------------------------------------------------------------------- runner


@dataclass(slots=True)
class StepOutput:
    """Tokens produced by one step: ``(sequence, token)`` for every row that sampled."""

    tokens: list[tuple[Sequence, int]]


class ModelRunner:
    """Runs prefill chunks and decode steps over the slot cache.

    ``static_decode`` (default: on for CUDA) runs decode with static shapes per
    batch-size bucket, each captured once as a CUDA graph on CUDA, so a step
    is one graph replay instead of hundreds of kernel launches. On CPU the
    same static path can run eagerly (for tests); the default there is the
    dynamic path, which reads only the live part of the cache.
    """

    def __init__(self, model: Any, num_slots: int, max_len: int, device: torch.device,
                 static_decode: bool | None = None, cuda_graphs: bool = True) -> None:
        self.model = model
        self.device = device
        self.num_slots = num_slots
        self.max_len = max_len
        self.dtype: torch.dtype = next(model.parameters()).dtype
        config = model.config
        num_layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer")
        if static_decode is None:
            static_decode = device.type == "cuda"
        # The static path pads batches to a bucket with rows that write into one extra scratch slot.
        self.cache = SlotKVCache(int(num_layers), num_slots + (1 if static_decode else 0), max_len)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._vocab_hash = _mix32(torch.arange(self.vocab_size, dtype=torch.long, device=device) * _GOLDEN & _M32)
        self._mask_min = torch.finfo(self.dtype).min
        self._key_range = torch.arange(max_len, device=device)
        self._static: _StaticDecoder | None = None
        if static_decode:
            self._static = _StaticDecoder(self, capture=cuda_graphs and device.type == "cuda")

    # ------------------------------------------------------------------ forward

    def _forward(
        self, ids: torch.Tensor, positions: torch.Tensor, slots: list[int], kv_len: int, logits_to_keep: Any
    ) -> Any:
        self.cache.bind(slots, positions, kv_len, self.device)
        keys = self._key_range[:kv_len]
        allowed = keys[None, None, None, :] <= positions[:, None, :, None]
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(~allowed, self._mask_min)
        kwargs = {self._cache_kw: self.cache}
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=logits_to_keep, **kwargs)
        return out.logits

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutput:
        """Run one engine step. Raises whatever the model raises; the engine fails that step's sequences."""
        rows: list[Sequence] = []
        logits_parts: list[torch.Tensor] = []
        if plan.decode and self._static is not None:
            decoded = self._static.run(plan.decode)
            if plan.prefill:
                last_logits, last_rows = self._prefill(plan.prefill)
                if last_rows:
                    decoded = torch.cat([decoded, self._sample(last_logits, last_rows)])
                    rows = plan.decode + last_rows
                else:
                    rows = plan.decode
            else:
                rows = plan.decode
            return StepOutput(tokens=list(zip(rows, decoded.tolist())))  # one host synchronisation
        if plan.decode:
            seqs = plan.decode
            ids = torch.tensor([[s.next_input()] for s in seqs], dtype=torch.long)
            pos = torch.tensor([[s.num_cached] for s in seqs], dtype=torch.long)
            kv_len = max(s.num_cached for s in seqs) + 1
            logits = self._forward(ids.to(self.device), pos.to(self.device), [s.slot for s in seqs], kv_len, 1)
            logits_parts.append(logits[:, -1, :])
            rows.extend(seqs)
        if plan.prefill:
            last_logits, last_rows = self._prefill(plan.prefill)
            if last_rows:
                logits_parts.append(last_logits)
                rows.extend(last_rows)
        if not rows:
            return StepOutput(tokens=[])
        logits = torch.cat(logits_parts) if len(logits_parts) > 1 else logits_parts[0]
        tokens = self._sample(logits, rows).tolist()  # the step's one host synchronisation
        return StepOutput(tokens=list(zip(rows, tokens)))

    def _prefill(self, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, list[Sequence]]:
        lengths = [c.end - c.start for c in chunks]
        width = max(lengths)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        pos = torch.empty(len(chunks), width, dtype=torch.long)
        for b, c in enumerate(chunks):
            n = lengths[b]
            ids[b, :n] = torch.tensor(c.seq.prompt_ids[c.start:c.end], dtype=torch.long)
            # Padding rows write beyond the chunk (never read before being overwritten), clamped in range.
            pos[b] = torch.clamp(torch.arange(c.start, c.start + width), max=self.max_len - 1)
        keep = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=self.device)
        kv_len = min(self.max_len, max(c.start for c in chunks) + width)
        logits = self._forward(ids.to(self.device), pos.to(self.device), [c.seq.slot for c in chunks], kv_len,
                               keep if len(chunks) > 1 else 1)
        if len(chunks) > 1:
            logits = logits[torch.arange(len(chunks), device=self.device), torch.arange(len(chunks),
                                                                                      device=self.device)]
        else:
            logits = logits[:, -1, :]
        sel = [b for b, c in enumerate(chunks) if c.is_last]
        if len(sel) == len(chunks):
            return logits, [c.seq for c in chunks]
        return logits[sel], [chunks[b].seq for b in sel]

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        dev = self.device
        if all(s.params.temperature == 0 for s in rows):
            return logits.argmax(dim=-1)
        temperature = torch.tensor([s.params.temperature for s in rows], dtype=torch.float32, device=dev)
        top_k = torch.tensor([s.params.top_k for s in rows], dtype=torch.long, device=dev)
        top_p = torch.tensor([s.params.top_p for s in rows], dtype=torch.float32, device=dev)
        seeds = torch.tensor([s.params.seed for s in rows], dtype=torch.long, device=dev)
        counters = torch.tensor([len(s.output_ids) for s in rows], dtype=torch.long, device=dev)
        need_filter = any(s.params.temperature > 0 and (s.params.top_k > 0 or s.params.top_p < 1.0) for s in rows)
        return sample(logits[:, : self.vocab_size], temperature, top_k, top_p, seeds, counters, self._vocab_hash,
                      need_filter)

    @torch.inference_mode()
    def move_slots(self, moves: list[tuple[int, int, int]]) -> None:
        """Copy the first ``length`` cached positions of ``src`` slot into ``dst``, for each move in order."""
        for layer in self.cache.layers:
            if not isinstance(layer, _SlotLayer) or layer.keys is None or layer.values is None:
                return  # not allocated yet: nothing to move
            for src, dst, length in moves:
                if length > 0:
                    layer.keys[dst, :, :length] = layer.keys[src, :, :length]
                    layer.values[dst, :, :length] = layer.values[src, :, :length]

    def warmup(self) -> None:
        """Allocate the cache, run one tiny forward and capture every decode graph, before any request."""
        from .scheduler import SamplingParams

        seq = Sequence(rid=-1, prompt_ids=[0, 0], params=SamplingParams(max_tokens=1, temperature=0.0))
        seq.slot = 0
        self.step(StepPlan(prefill=[PrefillChunk(seq, 0, 2)], decode=[]))
        if self._static is not None:
            self._static.capture_all()


def _buckets(limit: int) -> list[int]:
    """Batch-size buckets for static decode: 1, 2, 4, then every 8 up to 64, every 32 above, and ``limit``."""
    out = [b for b in (1, 2, 4) if b < limit]
    b = 8
    while b < limit:
        out.append(b)
        b += 8 if b < 64 else 32
    out.append(limit)
    return out


class _StaticDecoder:
    """Decode with static shapes per batch-size bucket; on CUDA each (bucket, mode) is one captured graph.

    Inputs live in persistent device buffers; a step copies the live rows in,
    pads the bucket with rows aimed at the scratch slot, and replays. The
    cache is read at full ``max_len`` (masked), which is what makes shapes
    static. Sampling runs inside the graph too, so a step has one host sync.
    """

    def __init__(self, runner: ModelRunner, capture: bool) -> None:
        self.r = runner
        self.capture = capture
        self.buckets = _buckets(runner.num_slots)
        self.scratch = runner.num_slots
        dev, bmax = runner.device, self.buckets[-1]
        self.ids = torch.zeros(bmax, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(bmax, 1, dtype=torch.long, device=dev)
        self.slots = torch.full((bmax,), self.scratch, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(bmax, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.top_p = torch.ones(bmax, dtype=torch.float32, device=dev)
        self.seeds = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.counters = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, bool], tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None

    def _body(self, b: int, sampling: bool) -> torch.Tensor:
        r = self.r
        pos, slots = self.pos[:b], self.slots[:b]
        r.cache.bind_tensors(slots, pos, r.max_len)
        allowed = r._key_range[None, None, None, :] <= pos[:, None, :, None]
        mask = torch.zeros(allowed.shape, dtype=r.dtype, device=r.device).masked_fill_(~allowed, r._mask_min)
        out = r.model(input_ids=self.ids[:b], attention_mask=mask, position_ids=pos, use_cache=True,
                      logits_to_keep=1, **{r._cache_kw: r.cache})
        logits = out.logits[:, -1, : r.vocab_size]
        if not sampling:
            return logits.argmax(dim=-1)
        return sample(logits, self.temperature[:b], self.top_k[:b], self.top_p[:b], self.seeds[:b],
                      self.counters[:b], r._vocab_hash, need_filter=True)

    def _graph(self, b: int, sampling: bool) -> tuple[Any, torch.Tensor]:
        key = (b, sampling)
        if key not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and allocator outside the capture
                    self._body(b, sampling)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._body(b, sampling)
            self.graphs[key] = (graph, out)
        return self.graphs[key]

    @torch.inference_mode()
    def capture_all(self) -> None:
        if not self.capture:
            return
        self.slots.fill_(self.scratch)
        self.pos.zero_()
        for b in self.buckets:
            for sampling in (False, True):
                self._graph(b, sampling)
        torch.cuda.synchronize()

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        n = len(seqs)
        b = next(x for x in self.buckets if x >= n)
        dev = self.r.device
        rows = [(s.next_input(), s.num_cached, s.slot) for s in seqs] + [(0, 0, self.scratch)] * (b - n)
        packed = torch.tensor(rows, dtype=torch.long)
        self.ids[:b, 0].copy_(packed[:, 0].to(dev, non_blocking=True))
        self.pos[:b, 0].copy_(packed[:, 1].to(dev, non_blocking=True))
        self.slots[:b].copy_(packed[:, 2].to(dev, non_blocking=True))
        sampling = any(s.params.temperature > 0 for s in seqs)
        if sampling:
            pad = b - n
            fparams = torch.tensor([[s.params.temperature, s.params.top_p] for s in seqs] + [[0.0, 1.0]] * pad,
                                   dtype=torch.float32)
            iparams = torch.tensor([[s.params.top_k, s.params.seed, len(s.output_ids)] for s in seqs]
                                   + [[0, 0, 0]] * pad, dtype=torch.long)
            self.temperature[:b].copy_(fparams[:, 0].to(dev, non_blocking=True))
            self.top_p[:b].copy_(fparams[:, 1].to(dev, non_blocking=True))
            self.top_k[:b].copy_(iparams[:, 0].to(dev, non_blocking=True))
            self.seeds[:b].copy_(iparams[:, 1].to(dev, non_blocking=True))
            self.counters[:b].copy_(iparams[:, 2].to(dev, non_blocking=True))
        if self.capture:
            graph, out = self._graph(b, sampling)
            graph.replay()
        else:
            out = self._body(b, sampling)
        return out[:n]
