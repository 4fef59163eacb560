"""Model runner: the only module that imports torch and transformers.

It holds the model, the paged KV pool and the sampler, and turns a
:class:`~rtws.scheduler.StepPlan` into next tokens.

KV storage is one tensor pair per decoder layer, ``[num_blocks * block_size,
kv_heads, head_dim]``, addressed through the block tables the scheduler keeps
(:mod:`rtws.kv_blocks`). :class:`PagedKVCache` is a transformers ``Cache``:
before each forward the runner binds, for the whole batch, the flat slots
each new token writes and the slots each row reads (its live blocks, in
position order, padded with the null block); ``update()`` scatters the new
keys/values with one ``index_copy_`` and returns the rows' keys/values with
one ``index_select``. With ``position_ids`` per row and 4D additive masks
(transformers uses a 4D mask as-is, and a dict of them keyed by layer type
for models with per-layer attention types), sequences join and leave between
steps with no re-padding and no copying, for any architecture built on the
standard Cache interface. Sliding windows live in the masks.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, CacheLayerMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from .kv_blocks import NULL_BLOCK
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


def load_tokenizer(path: str | os.PathLike[str], tokenizer_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load_model` pairs with ``path`` (the bundled one for the random benchmark aids)."""
    name = str(path)
    if name in RANDOM_MODELS:
        from .default_model import DEFAULT_MODEL_PATH

        return AutoTokenizer.from_pretrained(tokenizer_path or DEFAULT_MODEL_PATH)
    return AutoTokenizer.from_pretrained(tokenizer_path or name, trust_remote_code=False)


def load_model(
    path: str | os.PathLike[str], device: torch.device, dtype: torch.dtype, tokenizer_path: str | None = None
) -> tuple[Any, PreTrainedTokenizerBase]:
    """Load a causal LM and its tokenizer exactly as a user would, through the Auto classes.

    ``gpt2-random`` / ``llama-random`` build an architecture with random
    weights (a benchmark aid: no hub needed) and use the bundled tokenizer.
    """
    name = str(path)
    if name in RANDOM_MODELS:
        tok = load_tokenizer(name, tokenizer_path)
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
        config = AutoConfig.from_pretrained(name, trust_remote_code=False)
        check_supported(config)  # refuse before reading any weights
        tok = load_tokenizer(name, tokenizer_path)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=False)
        model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tok


def model_context_length(config: Any) -> int:
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    return 2048


# --------------------------------------------------------------------------- what can be served


class UnsupportedModelError(ValueError):
    """A model rtws refuses at load; the message names the architecture and the missing feature."""


# Layers that keep a recurrent / convolutional state instead of (or beside) attention KV.
_NON_KV_MODEL_TYPES = frozenset({
    "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma", "jamba", "zamba", "zamba2", "bamba",
    "falcon_h1", "granitemoehybrid", "lfm2", "lfm2_moe", "qwen3_next", "nemotron_h", "plamo2", "minimax",
    "kimi_linear", "olmo3_2_hybrid", "mamba_hybrid",
})
_ALIBI_MODEL_TYPES = frozenset({"bloom", "mpt"})
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
CPU_DEFAULT_KV_CACHE_GB = 1.0
LANES_MIN_BYTES = 64 << 20
CUDA_KV_CACHE_FRACTION = 0.7


def _arch_name(config: Any) -> str:
    archs = getattr(config, "architectures", None) or []
    return ", ".join(archs) or str(getattr(config, "model_type", "unknown"))


def check_supported(config: Any) -> None:
    """Raise :class:`UnsupportedModelError` ("... is not supported: ...") for what the paged cache cannot serve."""
    arch = _arch_name(config)
    mt = str(getattr(config, "model_type", ""))
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedModelError(f"{arch} ({mt}) is not supported: encoder-decoder models need cross-attention "
                                    "caches; rtws serves decoder-only causal LMs")
    if mt in _NON_KV_MODEL_TYPES:
        raise UnsupportedModelError(
            f"{arch} ({mt}) is not supported: it keeps a state-space / linear-attention (recurrent) state, not an "
            "attention KV cache, and rtws serves only paged attention KV")
    if mt in _ALIBI_MODEL_TYPES or (mt == "falcon" and getattr(config, "alibi", False)):
        raise UnsupportedModelError(f"{arch} ({mt}) is not supported: ALiBi position biases are not implemented "
                                    "in rtws's paged attention masks")
    types = getattr(config, "layer_types", None)
    if types:
        bad = sorted({str(t) for t in types} - ATTENTION_LAYER_TYPES)
        if bad:
            raise UnsupportedModelError(
                f"{arch} ({mt}) is not supported: layer types {', '.join(bad)} (rtws serves full and "
                "sliding-window attention layers only)")


@dataclass(frozen=True, slots=True)
class AttentionLayout:
    """How the model takes its masks: one 4D mask (``as_dict`` False, key ``"full_attention"``) or a dict
    keyed by layer type. ``windows`` maps each key to its sliding window (None: full causal attention)."""

    windows: dict[str, int | None]
    as_dict: bool


def attention_layout(model: Any) -> AttentionLayout:
    """Read the per-layer attention types the way the model's own forward does (transformers 5.x).

    Models whose forward accepts a dict of masks (``causal_mask_mapping``)
    get one mask per layer type listed in ``config.layer_types``; models that
    pick ``create_sliding_window_causal_mask`` when ``config.sliding_window``
    is set (Mistral, Phi3, Mixtral, ...) get one windowed mask; others one
    causal mask.
    """
    config = model.config
    check_supported(config)
    module = sys.modules.get(type(model).__module__)
    try:
        src = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):  # pragma: no cover - no source on disk
        src = ""
    window = getattr(config, "sliding_window", None)
    window = int(window) if isinstance(window, int) and window > 0 else None
    types = getattr(config, "layer_types", None)
    if types and "causal_mask_mapping := attention_mask, dict" in src:
        windows: dict[str, int | None] = {}
        for t in sorted({str(x) for x in types}):
            if t == "sliding_attention" and window is None:
                raise UnsupportedModelError(f"{_arch_name(config)} is not supported: sliding_attention layers "
                                            "without a sliding_window")
            windows[t] = window if t == "sliding_attention" else None
        return AttentionLayout(windows=windows, as_dict=True)
    if types and any(str(t) != "full_attention" for t in types) and "create_sliding_window_causal_mask" not in src:
        raise UnsupportedModelError(f"{_arch_name(config)} is not supported: per-layer attention types without a "
                                    "forward that accepts per-type masks")
    if window is not None and "create_sliding_window_causal_mask" in src:
        return AttentionLayout(windows={"full_attention": window}, as_dict=False)
    return AttentionLayout(windows={"full_attention": None}, as_dict=False)


LEAN_ARCHS = ("LlamaForCausalLM",)  # the decoder layer lean_decode mirrors, op for op


def lean_decode_reason(model: Any, layout: AttentionLayout) -> str | None:
    """None when :class:`_LeanDecoder` can run ``model``'s decode step; else why not (the HF forward runs).

    The lean step calls the model's own modules and functions in the order its forward does (embedding,
    rotary embedding, norms, projections, ``apply_rotary_pos_emb``, SDPA, MLP, LM head), without the
    transformers forward's per-call machinery (mask building, kwargs, output classes, module hooks), so its
    logits are bitwise the same. Attention is transformers' own ``sdpa_attention_forward`` (grouped-query
    attention included). It covers Llama-architecture models with full attention and SDPA; any other shape
    keeps the HF forward.
    """
    name = type(model).__name__
    if name not in LEAN_ARCHS:
        return f"{name}: not a lean architecture"
    config = model.config
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r}, not sdpa"
    if layout.as_dict or any(w is not None for w in layout.windows.values()):
        return "sliding-window layers"
    inner = getattr(model, "model", None)
    layers = list(getattr(inner, "layers", []) or [])
    if not layers or len(layers) != getattr(config, "num_hidden_layers", -1):
        return "layer list differs from num_hidden_layers"
    for mod in ("embed_tokens", "rotary_emb", "norm"):
        if not hasattr(inner, mod):
            return f"no {mod}"
    for layer in layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not hasattr(attn, "scaling"):
            return "no self_attn with a scaling"
        mlp = getattr(layer, "mlp", None)
        if mlp is None or not all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
            return "no gated MLP (gate_proj, up_proj, down_proj, act_fn)"
        if mlp._forward_hooks or mlp._forward_pre_hooks:
            return "forward hooks on an MLP"
        if layer._forward_hooks or layer._forward_pre_hooks or attn._forward_hooks or attn._forward_pre_hooks:
            return "forward hooks on a layer"
    if getattr(sys.modules.get(type(model).__module__), "apply_rotary_pos_emb", None) is None:
        return "no apply_rotary_pos_emb in the model's module"
    return None


CPU_GEMM_MODES = ("auto", "onednn", "default")
CPU_GEMM_MAX_BYTES = 1 << 30  # auto packs at most this many bytes of linear weights (the packed copy doubles them)
CPU_GEMM_MIN_GAIN = 0.9  # auto packs only when the packed GEMMs take at most this fraction of the default's time


def cpu_gemm_choice(mode: str, device_type: str, dtype: torch.dtype, num_params: int, weight_bytes: int,
                    plain_weights: bool, onednn: bool) -> tuple[bool, str]:
    """Whether the lean decode step runs its linear layers on oneDNN with weights packed once at load, and why
    (for the startup log). A pure function; ``auto``'s answer is then confirmed by timing (see ModelRunner).

    The default GEMM (``F.linear``, MKL's sgemm on x86 wheels) re-packs each weight matrix on every call,
    which costs as much as the product itself at the few rows a decode step has; oneDNN's inner-product with a
    pre-packed weight skips that. The results are float32 with a different summation order (about 1e-6
    relative), not bitwise the default's.
    """
    if mode == "default":
        return False, "cpu_gemm=default"
    if device_type != "cpu":
        return False, f"cpu_gemm={mode}: not on {device_type}"
    if not onednn:
        return False, f"cpu_gemm={mode}: this torch has no oneDNN"
    if dtype != torch.float32:
        return False, f"cpu_gemm={mode}: {str(dtype).removeprefix('torch.')} weights (packing is float32 only)"
    if not plain_weights:
        return False, f"cpu_gemm={mode}: quantized or non-plain linear weights"
    if mode == "onednn":
        return True, "cpu_gemm=onednn"
    if num_params < COMPILE_AUTO_MIN_PARAMS:
        return False, f"cpu_gemm=auto: {num_params} parameters < {COMPILE_AUTO_MIN_PARAMS} (a test-sized model)"
    if weight_bytes > CPU_GEMM_MAX_BYTES:
        return False, (f"cpu_gemm=auto: {weight_bytes >> 20} MiB of linear weights > {CPU_GEMM_MAX_BYTES >> 20} MiB "
                       "(a packed copy would double them)")
    return True, "cpu_gemm=auto: oneDNN with packed weights, kept where warm-up timing shows a gain"


def fastest_of(fns: list[Callable[[], object]], rounds: int) -> list[float]:
    """Seconds of the fastest call of each of ``fns`` over ``rounds`` interleaved rounds (the minimum: a busy
    machine only adds). The warm-up timings (cpu_gemm, compile, elastic threads) share it."""
    import time

    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t)
    return best


def _lean_linears(model: Any) -> list[Any]:
    """The linear layers of the lean decode step: q, k, v, o, gate, up, down per layer, then the LM head."""
    out = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        out += [attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj]
    return out + [model.lm_head]


class _PackedLinear:
    """``F.linear(x, weight, bias)`` on oneDNN with the weight packed once (``mkldnn._reorder_linear_weight``)
    for ``rows`` rows, a layout it then uses for any row count."""

    __slots__ = ("weight", "bias", "op")

    def __init__(self, linear: Any, rows: int) -> None:
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), rows)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.op = torch.ops.mkldnn._linear_pointwise

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.op(x, self.weight, self.bias, "none", [], "")
        return out


ROPE_TABLE_MAX_BYTES = 16 << 20  # a longer context computes cos/sin per step instead
_STATIC_ROPE_TYPES = ("default", "linear", "llama3")  # inv_freq fixed at load (no dynamic_rope_update)


def _rope_table(rotary: Any, model: Any, max_len: int) -> torch.Tensor | None:
    """``[max_len, 2, head_dim]``: the cos and sin ``rotary`` gives each position, computed once by ``rotary``
    itself (elementwise per position, so a row looked up is bitwise the one it computes per step); None for a
    RoPE type that rescales with the sequence (dynamic, longrope), or a table over ROPE_TABLE_MAX_BYTES."""
    if max_len <= 0 or getattr(rotary, "rope_type", None) not in _STATIC_ROPE_TYPES:
        return None
    p = next(model.parameters())
    head_dim = int(getattr(rotary, "inv_freq").shape[0]) * 2
    if max_len * head_dim * 2 * p.element_size() > ROPE_TABLE_MAX_BYTES:
        return None
    with torch.inference_mode():
        x = torch.zeros(1, 1, dtype=p.dtype, device=p.device)
        cos, sin = rotary(x, position_ids=torch.arange(max_len, device=p.device)[None])
    return torch.stack([cos[0], sin[0]], dim=1).contiguous()


def _norm(module: Any, fused: bool) -> Any:
    """The module itself, or, for the packed (already not bitwise) step, one fused ``F.rms_norm`` of its weight
    and epsilon in place of LlamaRMSNorm's six ops."""
    eps = getattr(module, "variance_epsilon", None)
    if not fused or eps is None or getattr(module, "weight", None) is None or module._forward_hooks:
        return module
    w = module.weight
    shape = (int(w.shape[0]),)
    return lambda x: torch.nn.functional.rms_norm(x, shape, w, eps)


class _LeanDecoder:
    """A one-token decode step for the architectures of :data:`LEAN_ARCHS`, straight through the model's
    modules (see :func:`lean_decode_reason`). The KV read and write go through the runner's cache layers, as
    the HF forward's ``cache.update`` does. With ``pack_rows``, the linear layers run as :class:`_PackedLinear`
    (see :func:`cpu_gemm_choice`); without, they are the model's own modules and the logits are bitwise the
    HF forward's."""

    def __init__(self, model: Any, cache: PagedKVCache, pack_rows: int | None = None, max_len: int = 0) -> None:
        self.model = model
        self.inner = model.model
        self.cache = cache
        self.rope = sys.modules[type(model).__module__].apply_rotary_pos_emb
        mods = _lean_linears(model)
        self.packed = pack_rows is not None
        lin: list[Any] = [_PackedLinear(m, pack_rows) for m in mods] if pack_rows is not None else mods
        self.linears = lin
        self.head = lin[-1]
        self.layers = [(layer, layer.self_attn, layer.mlp.act_fn, lin[7 * i: 7 * i + 7],
                        (_norm(layer.input_layernorm, self.packed), _norm(layer.post_attention_layernorm, self.packed)))
                       for i, layer in enumerate(self.inner.layers)]
        self.norm = _norm(self.inner.norm, self.packed)
        self.kv: list[Any] = list(cache.layers)  # the runner's _PagedLayer per decoder layer
        self.rope_table = _rope_table(self.inner.rotary_emb, model, max_len)

    def logits(self, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids``/``pos`` ``[B, 1]``, ``mask`` ``[B, 1, 1, kv_len]`` additive; returns logits ``[B, vocab]``."""
        x = self.inner.embed_tokens(ids)
        if self.rope_table is not None:
            cs = self.rope_table[pos]  # [B, 1, 2, head_dim]: the rows rotary_emb computes, looked up
            cos, sin = cs[:, :, 0], cs[:, :, 1]
        else:
            cos, sin = self.inner.rotary_emb(x, position_ids=pos)
        shape = (*x.shape[:-1], -1)
        for i, (layer, attn, act, (q_proj, k_proj, v_proj, o_proj, gate, up, down), (norm1, norm2)) in enumerate(
                self.layers):
            h = norm1(x)
            hs = (*shape[:-1], -1, attn.head_dim)
            q = q_proj(h).view(hs).transpose(1, 2)
            k = k_proj(h).view(hs).transpose(1, 2)
            v = v_proj(h).view(hs).transpose(1, 2)
            q, k = self.rope(q, k, cos, sin)
            k, v = self.kv[i].update(k, v, i)
            o, _ = sdpa_attention_forward(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
            x = x + o_proj(o.reshape(shape).contiguous())
            h = norm2(x)
            x = x + down(act(gate(h)) * up(h))  # LlamaMLP.forward, op for op
        x = self.norm(x)
        out: torch.Tensor = self.head(x[:, -1, :])
        return out

    def warm(self, rows: int) -> None:
        """Build oneDNN's kernels for every row count up to ``rows`` (about 0.5 ms per new count and weight
        shape, paid in the first step of that size otherwise). A no-op unpacked."""
        if not self.packed:
            return
        shapes: dict[tuple[int, int], Any] = {}
        for p in self.linears:
            shapes.setdefault(tuple(p.weight.shape), p)
        for (_, k), p in shapes.items():
            x = torch.zeros(rows, k, dtype=torch.float32, device=p.weight.device)
            for b in range(1, rows + 1):
                p(x[:b])


# --------------------------------------------------------------------------- paged KV cache


@dataclass(frozen=True, slots=True)
class LayerShape:
    heads: int
    key_dim: int
    value_dim: int


class _PagedLayer(CacheLayerMixin):
    """One decoder layer's slice of the pool: ``[num_blocks * block_size, heads, dim]`` for keys and values."""

    def __init__(self, owner: PagedKVCache, index: int) -> None:
        super().__init__()
        self._owner = owner
        self._index = index
        self.k_pool: torch.Tensor | None = None
        self.v_pool: torch.Tensor | None = None
        self.k_blocks: torch.Tensor | None = None
        self.v_blocks: torch.Tensor | None = None
        self.block_size = 1
        self.k_lanes: torch.Tensor | None = None  # [lanes, heads, length, key_dim] (decode lanes; see _DecodeLanes)
        self.v_lanes: torch.Tensor | None = None

    def allocate(self, shape: LayerShape, positions: int, block_size: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        # torch.empty: pages are touched only as blocks are first used. Reads are whole blocks, so a block's
        # unwritten tail is read (masked); the runner zeroes each block before its first use
        # (ModelRunner._zero_new_blocks), so masked garbage is never NaN bits. The null block is zeroed here.
        self.k_pool = torch.empty(positions, shape.heads, shape.key_dim, dtype=dtype, device=device)
        self.v_pool = torch.empty(positions, shape.heads, shape.value_dim, dtype=dtype, device=device)
        self.k_blocks = self.k_pool.view(-1, block_size, shape.heads, shape.key_dim)
        self.v_blocks = self.v_pool.view(-1, block_size, shape.heads, shape.value_dim)
        self.block_size = block_size
        self.zero_blocks(0, 1)
        self.keys, self.values = self.k_pool, self.v_pool

    def zero_blocks(self, start: int, end: int) -> None:
        assert self.k_blocks is not None and self.v_blocks is not None
        self.k_blocks[start:end].zero_()
        self.v_blocks[start:end].zero_()
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        return None  # allocated up front by the runner (sized from the probe)

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        o = self._owner
        b, heads, q, kdim = key_states.shape
        vdim = value_states.shape[-1]
        if o.probe is not None:
            o.probe.setdefault(self._index, []).append(LayerShape(heads, kdim, vdim))
            return key_states, value_states
        kp, vp = self.k_pool, self.v_pool
        assert kp is not None and vp is not None, "pool not allocated"
        kp.index_copy_(0, o.write_index, key_states.transpose(1, 2).reshape(b * q, heads, kdim))
        vp.index_copy_(0, o.write_index, value_states.transpose(1, 2).reshape(b * q, heads, vdim))
        n = o.kv_len
        if o.lanes:
            # Decode over the lanes: rows 0..b-1 are lanes 0..b-1, so the read is a view (no copy).
            kl, vl = self.k_lanes, self.v_lanes
            assert kl is not None and vl is not None and q == 1, "decode lanes not allocated"
            index = o.lane_index(heads, kl.shape[2])
            kl.view(-1, kdim).index_copy_(0, index, key_states.reshape(-1, kdim))
            vl.view(-1, vdim).index_copy_(0, index, value_states.reshape(-1, vdim))
            return kl[:b, :, :n], vl[:b, :, :n]
        # Whole blocks per row (one contiguous copy each: about twice as fast as per-position rows on CPU).
        # The block views are taken from the pools here, not from k_blocks/v_blocks, so a compiled decode
        # step sees one (mutated) input per pool, not two aliased ones (which torch.compile would copy whole).
        bs = self.block_size
        k = kp.view(-1, bs, heads, kdim).index_select(0, o.read_index).view(b, n, heads, kdim).transpose(1, 2)
        v = vp.view(-1, bs, heads, vdim).index_select(0, o.read_index).view(b, n, heads, vdim).transpose(1, 2)
        return k, v

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self._owner.kv_len, 0

    def get_seq_length(self) -> int:
        return 0

    def get_max_length(self) -> int:
        return self._owner.kv_len


class PagedKVCache(Cache):
    """A transformers Cache over the block pool. Call :meth:`bind` before every forward.

    ``write_index`` ``[B * L_q]``: the flat slot each new token's K/V goes to
    (the null block for padding). ``read_index`` ``[B * kv_len / block_size]``:
    the blocks each row attends over, in order (padded with the null block),
    so column ``j`` of a row holds its position ``j``; ``kv_len`` is a multiple
    of the block size and the masks hide what lies beyond each row's length.
    """

    def __init__(self, num_layers: int) -> None:
        self.write_index: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self.read_index: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self.kv_len = 0
        self.lanes = False
        self.lane_pos: torch.Tensor = torch.zeros(0, dtype=torch.long)
        self._lane_index: dict[tuple[int, int], torch.Tensor] = {}
        self.probe: dict[int, list[LayerShape]] | None = None
        super().__init__(layers=[_PagedLayer(self, i) for i in range(num_layers)])

    def bind(self, write_index: torch.Tensor, read_index: torch.Tensor, kv_len: int) -> None:
        self.write_index = write_index
        self.read_index = read_index
        self.kv_len = kv_len
        self.lanes = False

    def bind_lanes(self, write_index: torch.Tensor, positions: torch.Tensor, kv_len: int) -> None:
        """Decode over the lanes: row ``b`` (lane ``b``) writes its new token at ``positions[b]`` in the pool
        (``write_index``) and in its lane, and attends over its lane's first ``kv_len`` positions."""
        self.write_index = write_index
        self.lane_pos = positions
        self.kv_len = kv_len
        self.lanes = True
        self._lane_index = {}

    def lane_index(self, heads: int, length: int) -> torch.Tensor:
        """Flat row ``(lane * heads + head) * length + position`` of each new K/V row, shared by the layers."""
        key = (heads, length)
        idx = self._lane_index.get(key)
        if idx is None:
            p = self.lane_pos
            lanes = torch.arange(p.shape[0], device=p.device)[:, None]
            h = torch.arange(heads, device=p.device)[None, :]
            idx = ((lanes * heads + h) * length + p[:, None]).reshape(-1)
            self._lane_index[key] = idx
        return idx

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


def _clamp_int(v: int, lo: int, hi: int) -> int:
    return lo if v < lo else hi if v > hi else v


class ModelRunner:
    """Runs prefill chunks and decode steps over the paged KV pool.

    The pool holds ``num_blocks`` blocks of ``block_size`` positions, sized
    from ``kv_cache_gb`` (GiB; default: :data:`CPU_DEFAULT_KV_CACHE_GB` on the
    CPU, :data:`CUDA_KV_CACHE_FRACTION` of the memory free after the weights
    on CUDA) and the per-token KV bytes measured by a one-token probe forward,
    which also refuses models whose layers do not keep attention KV.

    ``static_decode`` (default: on for CUDA) runs decode with static shapes
    per (batch bucket, KV-length bucket), each captured once as a CUDA graph
    on CUDA, so a step is one graph replay and reads only as many KV
    positions as the length bucket of the longest live row. On CPU the same
    static path can run eagerly (for tests); the default there is the dynamic
    path, which reads exactly the live lengths.
    """

    def __init__(self, model: Any, num_slots: int, max_len: int, device: torch.device,
                 static_decode: bool | None = None, cuda_graphs: bool = True, *,
                 kv_cache_gb: float | None = None, block_size: int = 16, decode_lanes: bool = True,
                 compile: str = "off", lean_decode: bool = True, cpu_gemm: str = "auto") -> None:
        if block_size < 1:
            raise ValueError("block_size must be >= 1")
        self.model = model
        self.device = device
        self.num_slots = num_slots
        self.max_len = max_len
        self.block_size = block_size
        self.dtype: torch.dtype = next(model.parameters()).dtype
        config = model.config
        self.layout = attention_layout(model)
        num_layers = int(getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer"))
        self.cache = PagedKVCache(num_layers)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._vocab_hash = _mix32(torch.arange(self.vocab_size, dtype=torch.long, device=device) * _GOLDEN & _M32)
        self._mask_min = torch.finfo(self.dtype).min
        self.max_blocks_per_seq = -(-max_len // block_size)
        self._key_range = torch.arange(self.max_blocks_per_seq * block_size, device=device)
        self.layer_shapes = self._probe(num_layers)
        elem = torch.empty(0, dtype=self.dtype).element_size()
        self.bytes_per_token = elem * sum(s.heads * (s.key_dim + s.value_dim) for s in self.layer_shapes)
        budget = self._kv_budget(kv_cache_gb)
        self.num_blocks = max(2, budget // (block_size * self.bytes_per_token))
        self.kv_cache_bytes = self.num_blocks * block_size * self.bytes_per_token
        positions = self.num_blocks * block_size
        self._zeroed = 1  # blocks below this id have been zeroed (the null block at allocation)
        for layer, shape in zip(self.cache.layers, self.layer_shapes):
            assert isinstance(layer, _PagedLayer)
            layer.allocate(shape, positions, block_size, self.dtype, device)
        if static_decode is None:
            static_decode = device.type == "cuda"
        self._static: _StaticDecoder | None = None
        if static_decode:
            self._static = _StaticDecoder(self, capture=cuda_graphs and device.type == "cuda")
        # Dynamic decode reads short rows from contiguous lanes (a view, no gather), within a budget of a
        # quarter of the pool or LANES_MIN_BYTES, whichever is larger, allocated as rows grow.
        self._lanes: _DecodeLanes | None = None
        lane_budget = max(self.kv_cache_bytes // 4, LANES_MIN_BYTES)
        cap = min(self.max_blocks_per_seq * block_size, lane_budget // (num_slots * self.bytes_per_token))
        if decode_lanes and self._static is None and cap >= block_size:
            self._lanes = _DecodeLanes(self, num_slots, int(cap))
        if compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}")
        self.compile_mode = compile
        self.num_params = sum(p.numel() for p in model.parameters())
        self.compile_choice, self.compile_reason = compile_choice(
            compile, device.type, self._static is not None, self.num_params)
        # Compiled greedy decode for small batches (built and timed at warm-up; see _CompiledDecoder).
        self._compiled: _CompiledDecoder | None = _CompiledDecoder(self) if self.compile_choice else None
        self.compile_report: list[dict[str, Any]] = []
        # rtws.threads.ElasticThreads, set by an engine process whose threads rtws chose (None: fixed threads)
        self.elastic: Any = None
        # The decode lanes' step without the HF forward's per-call machinery, where the model allows it.
        self.lean_decode_reason = lean_decode_reason(model, self.layout) if lean_decode else "lean_decode=False"
        self._lean = (_LeanDecoder(model, self.cache, max_len=max_len) if self.lean_decode_reason is None
                      else None)
        # Its linear layers on oneDNN with packed weights, where that pays (cpu_gemm_choice, then timing for auto).
        if cpu_gemm not in CPU_GEMM_MODES:
            raise ValueError(f"cpu_gemm must be one of {', '.join(CPU_GEMM_MODES)}")
        self.cpu_gemm = False
        self.cpu_gemm_reason = f"cpu_gemm={cpu_gemm}: no lean decode step ({self.lean_decode_reason})"
        self.cpu_gemm_timing: dict[str, float] = {}
        self._packed_mods: list[tuple[Any, _PackedLinear]] = []
        if self._lean is not None:
            self._choose_gemm(cpu_gemm)

    # ------------------------------------------------------------------ setup

    def _choose_gemm(self, mode: str) -> None:
        """Set up the lean step's GEMMs per :func:`cpu_gemm_choice`; for ``auto``, time the first layer's linears
        and the LM head both ways at 4 and at 32 rows (the fastest of 5 interleaved rounds) and keep the packed
        ones only at most :data:`CPU_GEMM_MIN_GAIN` of the default's time. Logged by the loader."""

        mods = _lean_linears(self.model)
        weights = [m.weight for m in mods]
        plain = all(type(w) in (torch.Tensor, torch.nn.Parameter) and w.dtype == self.dtype for w in weights) and not any(
            "forward" in vars(m) for m in mods)  # no forward already replaced on the instance (accelerate's hooks)
        use, reason = cpu_gemm_choice(
            mode, self.device.type, self.dtype, self.num_params,
            sum(w.numel() * w.element_size() for w in weights), plain, bool(torch.backends.mkldnn.is_available()))
        if not use:
            self.cpu_gemm_reason = reason
            return
        rows = min(self.num_slots, 64)
        try:
            lean = _LeanDecoder(self.model, self.cache, pack_rows=rows, max_len=self.max_len)
        except RuntimeError as exc:  # a oneDNN build that cannot pack this weight: keep the default
            self.cpu_gemm_reason = f"{reason}; packing failed ({exc}): default GEMM"
            return
        if mode == "auto":
            sample = list(range(7)) + [len(mods) - 1]  # layer 0's seven linears and the head
            plain_mods = [mods[i] for i in sample]
            with torch.inference_mode():
                xs = [{m.in_features: torch.randn(b, m.in_features, dtype=self.dtype) for m in plain_mods}
                      for b in (min(4, rows), min(32, rows))]

                def all_of(fns: list[Any]) -> Callable[[], None]:
                    def go() -> None:
                        for x in xs:
                            for f, m in zip(fns, plain_mods):
                                f(x[m.in_features])
                    return go

                t_default, t_packed = fastest_of([all_of(plain_mods), all_of([lean.linears[i] for i in sample])], 5)
            best = {"default": t_default, "onednn": t_packed}
            self.cpu_gemm_timing = {k: round(v * 1e3, 3) for k, v in best.items()}
            if best["onednn"] > CPU_GEMM_MIN_GAIN * best["default"]:
                self.cpu_gemm_reason = (f"cpu_gemm=auto: packed {best['onednn'] * 1e3:.2f} ms vs default "
                                        f"{best['default'] * 1e3:.2f} ms in the timing: default GEMM")
                return
            reason = (f"cpu_gemm=auto: oneDNN with packed weights ({best['onednn'] * 1e3:.2f} ms vs "
                      f"{best['default'] * 1e3:.2f} ms for the default in the timing)")
        self._lean = lean
        self._packed_mods = list(zip(mods, lean.linears))
        self.cpu_gemm = True
        self.cpu_gemm_reason = reason

    def _kv_budget(self, kv_cache_gb: float | None) -> int:
        if kv_cache_gb is not None:
            if not kv_cache_gb > 0:
                raise ValueError(f"kv_cache_gb must be > 0 (got {kv_cache_gb!r})")
            return int(kv_cache_gb * (1 << 30))
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * CUDA_KV_CACHE_FRACTION)
        return int(CPU_DEFAULT_KV_CACHE_GB * (1 << 30))

    @torch.inference_mode()
    def _probe(self, num_layers: int) -> list[LayerShape]:
        """One-token forward recording each layer's KV shape; refuses layers without attention KV."""
        arch = _arch_name(self.model.config)
        cache = self.cache
        cache.probe = {}
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        pos = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        cache.bind(torch.zeros(1, dtype=torch.long, device=self.device),
                   torch.zeros(1, dtype=torch.long, device=self.device), 1)
        try:
            self.model(input_ids=ids, attention_mask=self._masks(pos, 1), position_ids=pos, use_cache=True,
                       logits_to_keep=1, **{self._cache_kw: cache})
        except Exception as exc:
            raise UnsupportedModelError(
                f"{arch} is not supported: a forward over rtws's paged attention KV cache failed "
                f"({type(exc).__name__}: {exc})") from exc
        finally:
            seen, cache.probe = cache.probe, None
        missing = [i for i in range(num_layers) if i not in seen]
        shared = [i for i, v in seen.items() if len(v) != 1]
        if missing or shared:
            raise UnsupportedModelError(
                f"{arch} is not supported: its layers do not each keep one attention KV through the Cache "
                f"interface (no KV: {missing or 'none'}; several: {shared or 'none'})")
        return [seen[i][0] for i in range(num_layers)]

    # ------------------------------------------------------------------ forward

    def _zero_new_blocks(self, tables: list[list[int]]) -> None:
        """Zero blocks the first time a table names them (whole-block reads must never see NaN bits).

        The pool hands out never-used blocks in increasing id order, so the
        used ones are ``1..zeroed-1``; this zeroes up to the highest id seen.
        """
        top = max((max(t) for t in tables if t), default=0)
        if top >= self._zeroed:
            for layer in self.cache.layers:
                assert isinstance(layer, _PagedLayer)
                layer.zero_blocks(self._zeroed, top + 1)
            self._zeroed = top + 1

    def _masks(self, qpos: torch.Tensor, kv_len: int) -> Any:
        """Additive 4D masks ``[B, 1, L_q, kv_len]`` for query positions ``qpos`` ``[B, L_q]``: key column ``j``
        is position ``j``; causal, and within the window for sliding layers. A dict when the model takes one."""
        keys = self._key_range[:kv_len][None, None, None, :]
        q = qpos[:, None, :, None]
        causal = keys <= q
        out: dict[str, torch.Tensor] = {}
        made: dict[int | None, torch.Tensor] = {}
        for name, window in self.layout.windows.items():
            if window not in made:
                allowed = causal if window is None else causal & (keys > q - window)
                made[window] = torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill_(
                    ~allowed, self._mask_min)
            out[name] = made[window]
        return out if self.layout.as_dict else out["full_attention"]

    def _forward(self, ids: torch.Tensor, qpos: torch.Tensor, valid: torch.Tensor, tables: list[list[int]],
                 lens: list[int], logits_to_keep: Any) -> Any:
        """One forward. ``ids``/``qpos``/``valid`` ``[B, L_q]`` on the host; row ``b`` attends over positions
        ``0..lens[b]-1`` held in blocks ``tables[b]`` (which must cover them)."""
        bs = self.block_size
        nb = -(-max(lens) // bs)
        kv_len = nb * bs
        rows = [t[:nb] + [NULL_BLOCK] * (nb - len(t[:nb])) for t in tables]
        self._zero_new_blocks(rows)
        bt = torch.tensor(rows, dtype=torch.long)
        read = bt.reshape(-1)
        write = bt.gather(1, qpos // bs) * bs + qpos % bs
        write = torch.where(valid, write, qpos % bs)
        dev = self.device
        qpos_d = qpos.to(dev, non_blocking=True)
        self.cache.bind(write.reshape(-1).to(dev, non_blocking=True), read.to(dev, non_blocking=True), kv_len)
        with self._packed_linears():
            out = self.model(input_ids=ids.to(dev, non_blocking=True), attention_mask=self._masks(qpos_d, kv_len),
                             position_ids=qpos_d, use_cache=True, logits_to_keep=logits_to_keep,
                             **{self._cache_kw: self.cache})
        return out.logits

    @contextlib.contextmanager
    def _packed_linears(self) -> Iterator[None]:
        """With packed GEMMs on (cpu_gemm), the HF forward's linear layers run them too for the duration (prefill,
        the block gather): each module's ``forward`` is the packed one, as an instance attribute removed after,
        so the compiled and static paths, which trace the modules, never see the packed weights."""
        swaps = self._packed_mods
        if not swaps:
            yield
            return
        for mod, packed in swaps:
            mod.forward = packed
        try:
            yield
        finally:
            for mod, _ in swaps:
                del mod.forward

    def _forward_lanes(self, seqs: list[Sequence]) -> torch.Tensor:
        """One decode forward over the lanes; ``seqs[b]`` holds lane ``b``. Returns logits ``[B, vocab]``."""
        bs = self.block_size
        inputs = [(s.next_input(), s.num_cached, s.block_table[s.num_cached // bs]) for s in seqs]
        packed = torch.tensor(inputs, dtype=torch.long)
        ids, pos = packed[:, 0:1], packed[:, 1:2]
        write = packed[:, 2] * bs + packed[:, 1] % bs
        self._zero_new_blocks([[max(i[2] for i in inputs)]])
        dev = self.device
        pos_d = pos.to(dev, non_blocking=True)
        kv_len = max(s.num_cached for s in seqs) + 1
        self.cache.bind_lanes(write.to(dev, non_blocking=True), pos_d[:, 0], kv_len)
        if self._lean is not None:
            return self._lean.logits(ids.to(dev, non_blocking=True), pos_d, self._masks(pos_d, kv_len))
        out = self.model(input_ids=ids.to(dev, non_blocking=True), attention_mask=self._masks(pos_d, kv_len),
                         position_ids=pos_d, use_cache=True, logits_to_keep=1, **{self._cache_kw: self.cache})
        logits: torch.Tensor = out.logits[:, -1, :]
        return logits

    @torch.inference_mode()
    def step(self, plan: StepPlan) -> StepOutput:
        """Run one engine step. Raises whatever the model raises; the engine retries without the row at fault."""
        rows: list[Sequence] = []
        logits_parts: list[torch.Tensor] = []
        compiled = self._compiled
        use_compiled = bool(plan.decode) and compiled is not None and compiled.covers(plan.decode)
        if self.elastic is not None:
            self.elastic.for_step(len(plan.decode) + sum(c.end - c.start for c in plan.prefill), use_compiled)
        if plan.decode and self._static is not None:
            groups = self._length_groups(plan.decode)
            rows = [s for g in groups for s in g]
            parts = [self._static.run(g) for g in groups]
            decoded = torch.cat(parts) if len(parts) > 1 else parts[0]
            if plan.prefill:
                last_logits, last_rows = self._prefill(plan.prefill)
                if last_rows:
                    decoded = torch.cat([decoded, self._sample(last_logits, last_rows)])
                    rows += last_rows
            return StepOutput(tokens=list(zip(rows, decoded.tolist())))  # one host synchronisation
        if use_compiled and compiled is not None:
            rows = list(plan.decode)
            decoded = compiled.sd.run(rows)
            if plan.prefill:
                last_logits, last_rows = self._prefill(plan.prefill)
                if last_rows:
                    decoded = torch.cat([decoded, self._sample(last_logits, last_rows)])
                    rows += last_rows
            return StepOutput(tokens=list(zip(rows, decoded.tolist())))  # one host synchronisation
        gathered = plan.decode
        lanes = self._lanes
        if lanes is not None and plan.decode:
            laned = [s for s in plan.decode if lanes.fits(s)]
            gathered = [s for s in plan.decode if not lanes.fits(s)] if len(laned) < len(plan.decode) else []
            if laned:
                seqs = lanes.place(laned)
                logits_parts.append(self._forward_lanes(seqs))
                lanes.advanced()
                rows.extend(seqs)
        for seqs in self._length_groups(gathered) if gathered else []:
            ids = torch.tensor([[s.next_input()] for s in seqs], dtype=torch.long)
            qpos = torch.tensor([[s.num_cached] for s in seqs], dtype=torch.long)
            valid = torch.ones(len(seqs), 1, dtype=torch.bool)
            logits = self._forward(ids, qpos, valid, [s.block_table for s in seqs],
                                   [s.num_cached + 1 for s in seqs], 1)
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

    def _length_groups(self, seqs: list[Sequence]) -> list[list[Sequence]]:
        """Decode rows in one group, or two when padding short rows to the longest would read more than
        twice the live positions (64 short streams beside one long prompt): each group reads up to its own
        longest row, so the work follows live lengths."""
        if len(seqs) < 2:
            return [seqs]
        order = sorted(seqs, key=lambda q: q.num_cached)
        lens = [q.num_cached + 1 for q in order]
        live = sum(lens)
        if len(lens) * lens[-1] <= 2 * live + 64 * self.block_size:
            return [seqs]
        best, cut = len(lens) * lens[-1], 0
        for i in range(1, len(lens)):
            cost = i * lens[i - 1] + (len(lens) - i) * lens[-1]
            if cost < best:
                best, cut = cost, i
        return [order[:cut], order[cut:]] if cut else [seqs]

    @staticmethod
    def _prefill_groups(chunks: list[PrefillChunk]) -> list[list[PrefillChunk]]:
        """Chunks in forwards whose padding stays bounded: one batch pads every chunk to the widest and reads
        up to the longest row, so a 12-token chunk beside a 512-token chunk of a 20,000-token prompt would cost
        as much as that chunk. Greedy, costliest first: a chunk joins a group while the group's padded cost
        (rows x widest x longest) stays within 1.5 times its members' own costs, plus a 512 x 512 chunk's worth."""
        if len(chunks) < 2:
            return [chunks]

        def cost(c: PrefillChunk) -> int:
            return (c.end - c.start) * c.end

        groups: list[list[PrefillChunk]] = []
        cur: list[PrefillChunk] = []
        own = 0
        for c in sorted(chunks, key=cost, reverse=True):
            if cur:
                width = max(x.end - x.start for x in cur + [c])
                longest = max(x.end for x in cur + [c])
                if 2 * (len(cur) + 1) * width * longest > 3 * (own + cost(c)) + (1 << 19):
                    groups.append(cur)
                    cur, own = [], 0
            cur.append(c)
            own += cost(c)
        groups.append(cur)
        return groups

    def _prefill(self, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, list[Sequence]]:
        groups = self._prefill_groups(chunks)
        if len(groups) == 1:
            return self._prefill_group(chunks)
        parts = [self._prefill_group(g) for g in groups]
        rows = [s for _, r in parts for s in r]
        logits = [lg for lg, r in parts if r]
        if not logits:
            return parts[0][0], []
        return (torch.cat(logits) if len(logits) > 1 else logits[0]), rows

    def _prefill_group(self, chunks: list[PrefillChunk]) -> tuple[torch.Tensor, list[Sequence]]:
        lengths = [c.end - c.start for c in chunks]
        width = max(lengths)
        ids = torch.zeros(len(chunks), width, dtype=torch.long)
        qpos = torch.empty(len(chunks), width, dtype=torch.long)
        valid = torch.zeros(len(chunks), width, dtype=torch.bool)
        for b, c in enumerate(chunks):
            n = lengths[b]
            ids[b, :n] = torch.tensor(c.seq.tokens(c.start, c.end), dtype=torch.long)
            # Padding queries repeat the last real position (same mask row) and write to the null block.
            qpos[b] = torch.clamp(torch.arange(c.start, c.start + width), max=c.end - 1)
            valid[b, :n] = True
        keep = torch.tensor([n - 1 for n in lengths], dtype=torch.long, device=self.device)
        logits = self._forward(ids, qpos, valid, [c.seq.block_table for c in chunks], [c.end for c in chunks],
                               keep if len(chunks) > 1 else 1)
        if len(chunks) > 1:
            ar = torch.arange(len(chunks), device=self.device)
            logits = logits[ar, ar]
        else:
            logits = logits[:, -1, :]
        sel = [b for b, c in enumerate(chunks) if c.is_last]
        if len(sel) == len(chunks):
            return logits, [c.seq for c in chunks]
        return logits[sel], [chunks[b].seq for b in sel]

    def sampling_rows(self, rows: list[Sequence]) -> tuple[list[list[float]], list[list[int]]]:
        """Per-row ``[temperature, top_p]`` and ``[top_k, seed, counter]``, clamped into range: an absurd
        ``top_k`` (beyond the vocabulary, or beyond int64) or seed never fails the batch it shares."""
        v = self.vocab_size
        f = [[float(s.params.temperature), float(s.params.top_p)] for s in rows]
        i = [[_clamp_int(int(s.params.top_k), 0, v), int(s.params.seed) & 0x7FFFFFFFFFFFFFFF, len(s.output_ids)]
             for s in rows]
        return f, i

    def _sample(self, logits: torch.Tensor, rows: list[Sequence]) -> torch.Tensor:
        dev = self.device
        if all(s.params.temperature == 0 for s in rows):
            return logits.argmax(dim=-1)
        f, i = self.sampling_rows(rows)
        fp = torch.tensor(f, dtype=torch.float32).to(dev)
        ip = torch.tensor(i, dtype=torch.long).to(dev)
        need_filter = any(s.params.temperature > 0 and (s.params.top_k > 0 or s.params.top_p < 1.0) for s in rows)
        return sample(logits[:, : self.vocab_size], fp[:, 0], ip[:, 0], fp[:, 1], ip[:, 1], ip[:, 2],
                      self._vocab_hash, need_filter)

    @contextlib.contextmanager
    def lean_probe(self, b: int, n: int) -> Iterator[Callable[[], torch.Tensor] | None]:
        """For timing: a callable running the lean decode step (greedy) for ``b`` rows attending over ``n``
        positions, on scratch lanes (the real lanes are put back after), writing its new K/V into the null
        block; None where decode does not take the lean step over the lanes."""
        lean = self._lean
        if lean is None or self._lanes is None:
            yield None
            return
        layers = [layer for layer in self.cache.layers if isinstance(layer, _PagedLayer)]
        saved = [(layer.k_lanes, layer.v_lanes) for layer in layers]
        dev = self.device
        try:
            for layer, shape in zip(layers, self.layer_shapes):
                layer.k_lanes = torch.zeros(b, shape.heads, n, shape.key_dim, dtype=self.dtype, device=dev)
                layer.v_lanes = torch.zeros(b, shape.heads, n, shape.value_dim, dtype=self.dtype, device=dev)
            ids = torch.zeros(b, 1, dtype=torch.long, device=dev)
            pos = torch.full((b, 1), n - 1, dtype=torch.long, device=dev)
            mask = self._masks(pos, n)
            write = torch.zeros(b, dtype=torch.long, device=dev)  # the null block's first slot

            def run() -> torch.Tensor:
                self.cache.bind_lanes(write, pos[:, 0], n)
                return lean.logits(ids, pos, mask).argmax(dim=-1)

            yield run
        finally:
            for layer, (k, v) in zip(layers, saved):
                layer.k_lanes, layer.v_lanes = k, v

    ELASTIC_PROBE_ROWS = (1, 2, 4, 8, 16, 32)
    # Steps of fewer rows always stay at base. Their ops are too short to share a core with the event loop,
    # which works on each token while the next step runs. On the AMD VM, the lean step at 1 row was 10% faster
    # at 2 threads alone (1.59 vs 1.75 ms). But one stream served at 2 threads came out at 2.61 ms between
    # tokens, against 1.68 ms at 1 thread. From 4 rows up, 8 streams gained (2.63 vs 2.85 ms; round 8).
    ELASTIC_MIN_ROWS = 4

    @torch.inference_mode()
    def elastic_min_rows(self, base: int, top: int) -> int | None:
        """The fewest rows (at least :data:`ELASTIC_MIN_ROWS`) from which an uncompiled decode step is faster at
        ``top`` intra-op threads than at ``base`` (rtws.threads.ElasticThreads), from timing the lean step (the
        fastest of 5 interleaved rounds at each of :data:`ELASTIC_PROBE_ROWS` rows from there, 128 positions):
        a count from which every larger one measured at most 0.95x base's time. None: top never paid. Logged.
        Test-sized models, and models without the lean step, are not timed: :data:`ELASTIC_MIN_ROWS`."""

        rows = [b for b in self.ELASTIC_PROBE_ROWS if self.ELASTIC_MIN_ROWS <= b <= self.num_slots]
        if (self.num_params < COMPILE_AUTO_MIN_PARAMS or self._lean is None
                or self._lanes is None or not rows):
            return self.ELASTIC_MIN_ROWS
        n = min(128, self.max_blocks_per_seq * self.block_size)
        best: dict[tuple[int, int], float] = {}
        try:
            for b in rows:
                with self.lean_probe(b, n) as run:
                    assert run is not None

                    def at(t: int, run: Callable[[], torch.Tensor] = run) -> Callable[[], object]:
                        def go() -> object:
                            torch.set_num_threads(t)
                            return run()
                        return go

                    fastest_of([at(base), at(top)], 1)  # warm both thread counts
                    best[(b, base)], best[(b, top)] = fastest_of([at(base), at(top)], 5)
        finally:
            torch.set_num_threads(base)
        wins = [best[(b, top)] <= 0.95 * best[(b, base)] for b in rows]
        first = next((i for i in range(len(rows)) if all(wins[i:])), None)
        out = rows[first] if first is not None else None
        timing = {f"{b}": [round(best[(b, base)] * 1e3, 3), round(best[(b, top)] * 1e3, 3)] for b in rows}
        log.info("elastic threads: %s", f"{top} threads from {out} rows" if out else f"{top} threads never faster",
                 extra={"event": "elastic_threads", "base": base, "top": top, "min_rows": out,
                        "ms_by_rows": timing})
        return out

    @torch.inference_mode()
    def prefault_kv(self) -> int:
        """Write every KV pool position once (zeros), so the pool's pages are resident before traffic: first
        use of a block then costs no page faults in a step, and RSS stops growing with use. Call before any
        request (it overwrites every block; blocks are zeroed on allocation anyway). Returns the bytes touched."""
        n = 0
        for layer in self.cache.layers:
            assert isinstance(layer, _PagedLayer)
            for t in (layer.k_pool, layer.v_pool):
                if t is None:
                    continue
                t.zero_()
                n += t.numel() * t.element_size()
        return n

    def warmup(self) -> None:
        """Run one tiny forward (into the null block) and capture the decode graphs, before any request."""
        from .generation import SamplingParams

        seq = Sequence(rid=-1, prompt_ids=[0, 0], params=SamplingParams(max_tokens=1, temperature=0.0))
        seq.block_table = [NULL_BLOCK]
        self.step(StepPlan(prefill=[PrefillChunk(seq, 0, 2)], decode=[]))
        if self._lean is not None:
            with torch.inference_mode():
                self._lean.warm(min(self.num_slots, 128))
        if self._static is not None:
            self._static.capture_all()
        if self._compiled is not None:
            self.compile_report = self._compiled.compile_all(force=self.compile_mode == "on")
            if not self._compiled.keys:
                self._compiled = None


def _buckets(limit: int) -> list[int]:
    """Batch-size buckets for static decode: 1, 2, 4, then every 8 up to 64, every 32 above, and ``limit``."""
    out = [b for b in (1, 2, 4) if b < limit]
    b = 8
    while b < limit:
        out.append(b)
        b += 8 if b < 64 else 32
    out.append(limit)
    return out


def _len_buckets(max_blocks: int, block_size: int, smallest: int = 128) -> list[int]:
    """KV-length buckets for static decode: ``smallest`` doubling up to the longest row, multiples of a block."""
    cap = max_blocks * block_size
    out: list[int] = []
    n = -(-smallest // block_size) * block_size
    while n < cap:
        out.append(n)
        n = -(-(2 * n) // block_size) * block_size
    out.append(cap)
    return out


class _StaticDecoder:
    """Decode with static shapes per (batch bucket, KV-length bucket); on CUDA each is one captured graph.

    Inputs live in persistent device buffers (token, position and block table
    per row); a step copies the live rows in, pads the batch bucket with rows
    aimed at the null block, and replays. Gathers and masks are computed in
    the graph from the block tables, over the length bucket of the longest
    row, so the work follows live lengths, not ``max_len``. Sampling runs in
    the graph too: a step has one host synchronisation.
    """

    MAX_CAPTURE_AT_WARMUP = 2048  # length buckets above this are captured when first used

    def __init__(self, runner: ModelRunner, capture: bool) -> None:
        self.r = runner
        self.capture = capture
        self.buckets = _buckets(runner.num_slots)
        self.len_buckets = _len_buckets(runner.max_blocks_per_seq, runner.block_size)
        dev, bmax, mb = runner.device, self.buckets[-1], runner.max_blocks_per_seq
        self.ids = torch.zeros(bmax, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(bmax, 1, dtype=torch.long, device=dev)
        self.tables = torch.zeros(bmax, mb, dtype=torch.long, device=dev)
        self.temperature = torch.zeros(bmax, dtype=torch.float32, device=dev)
        self.top_k = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.top_p = torch.ones(bmax, dtype=torch.float32, device=dev)
        self.seeds = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.counters = torch.zeros(bmax, dtype=torch.long, device=dev)
        self.graphs: dict[tuple[int, int, bool], tuple[Any, torch.Tensor]] = {}
        self._pool: Any = None
        self.compiled: Any = None  # torch.compile of _body (set by _CompiledDecoder), or None: eager

    def _body(self, b: int, kv_len: int, sampling: bool) -> torch.Tensor:
        r = self.r
        bs = r.block_size
        pos = self.pos[:b]
        bt = self.tables[:b, : kv_len // bs]
        read = bt.reshape(-1)
        write = bt.gather(1, pos // bs) * bs + pos % bs
        r.cache.bind(write.reshape(-1), read.reshape(-1), kv_len)
        out = r.model(input_ids=self.ids[:b], attention_mask=r._masks(pos, kv_len), position_ids=pos,
                      use_cache=True, logits_to_keep=1, **{r._cache_kw: r.cache})
        logits = out.logits[:, -1, : r.vocab_size]
        if not sampling:
            return logits.argmax(dim=-1)
        return sample(logits, self.temperature[:b], self.top_k[:b], self.top_p[:b], self.seeds[:b],
                      self.counters[:b], r._vocab_hash, need_filter=True)

    def _graph(self, b: int, kv_len: int, sampling: bool) -> tuple[Any, torch.Tensor]:
        key = (b, kv_len, sampling)
        if key not in self.graphs:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up kernels and allocator outside the capture
                    self._body(b, kv_len, sampling)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self._body(b, kv_len, sampling)
            self.graphs[key] = (graph, out)
        return self.graphs[key]

    def warmup_keys(self) -> list[tuple[int, int, bool]]:
        lens = [n for n in self.len_buckets if n <= self.MAX_CAPTURE_AT_WARMUP] or self.len_buckets[:1]
        return [(b, n, s) for n in lens for b in self.buckets for s in (False, True)]

    @torch.inference_mode()
    def capture_all(self) -> None:
        if not self.capture:
            return
        self.tables.zero_()
        self.pos.zero_()
        for b, n, s in self.warmup_keys():
            self._graph(b, n, s)
        torch.cuda.synchronize()

    def kv_bucket(self, longest: int) -> int:
        """The KV length a step reads when its longest row holds ``longest`` positions."""
        return next(x for x in self.len_buckets if x >= longest)

    def run(self, seqs: list[Sequence]) -> torch.Tensor:
        r = self.r
        n = len(seqs)
        b = next(x for x in self.buckets if x >= n)
        kv_len = self.kv_bucket(max(s.num_cached for s in seqs) + 1)
        nb = kv_len // r.block_size
        dev = r.device
        pad = b - n
        rows = [(s.next_input(), s.num_cached) for s in seqs] + [(0, 0)] * pad
        packed = torch.tensor(rows, dtype=torch.long)
        rows_t = [s.block_table[:nb] + [NULL_BLOCK] * (nb - len(s.block_table[:nb])) for s in seqs]
        r._zero_new_blocks(rows_t)
        tables = torch.tensor(rows_t + [[NULL_BLOCK] * nb] * pad, dtype=torch.long)
        self.ids[:b, 0].copy_(packed[:, 0].to(dev, non_blocking=True))
        self.pos[:b, 0].copy_(packed[:, 1].to(dev, non_blocking=True))
        self.tables[:b, :nb].copy_(tables.to(dev, non_blocking=True))
        sampling = any(s.params.temperature > 0 for s in seqs)
        if sampling:
            f, i = r.sampling_rows(seqs)
            fparams = torch.tensor(f + [[0.0, 1.0]] * pad, dtype=torch.float32)
            iparams = torch.tensor(i + [[0, 0, 0]] * pad, dtype=torch.long)
            self.temperature[:b].copy_(fparams[:, 0].to(dev, non_blocking=True))
            self.top_p[:b].copy_(fparams[:, 1].to(dev, non_blocking=True))
            self.top_k[:b].copy_(iparams[:, 0].to(dev, non_blocking=True))
            self.seeds[:b].copy_(iparams[:, 1].to(dev, non_blocking=True))
            self.counters[:b].copy_(iparams[:, 2].to(dev, non_blocking=True))
        if self.capture:
            graph, out = self._graph(b, kv_len, sampling)
            graph.replay()
        elif self.compiled is not None:
            out = self.compiled(b, kv_len, sampling)
        else:
            out = self._body(b, kv_len, sampling)
        return out[:n]


COMPILE_MODES = ("auto", "on", "off")
COMPILE_AUTO_MIN_PARAMS = 1_000_000  # auto leaves smaller (test-sized) models eager
# Batch buckets compiled: 1, 2, 4, 8. With 2 length buckets that is 8 specialisations of one code object
# (compile_all raises torch._dynamo's recompile limit to cover them). bench/compile_step_bench.py: compiled/eager
# static step 0.50x at batch 1, 0.54x at 4, 0.60-0.71x at 8, 0.77x at 16, 0.98x at 24, 1.11x at 32. Measured
# against the eager path a row really takes (decode lanes), end to end (bench/RESULTS.md, round 3): buckets up
# to 8 gave 1.00 to 1.31x the tok/s of up to 4 at 8 streams, and up to 4 gave 1.27 to 1.37x up to 2 at 4
# streams; adding 16 made a 32-request burst slower (0.84x of eager against 0.92x), so 16 stays eager.
COMPILE_MAX_BATCH = 8
COMPILE_LEN_BUCKETS = 2  # KV-length buckets compiled: the first two (128 and 256 positions)
COMPILE_MIN_GAIN = 0.9  # auto keeps a compiled shape only when its step takes at most this fraction of eager's


def compile_choice(mode: str, device_type: str, static: bool, num_params: int) -> tuple[bool, str]:
    """Whether to compile the decode step, and why (for the startup log). A pure function.

    ``on`` compiles on the CPU whatever the size; ``auto`` compiles on the CPU for models of at least
    :data:`COMPILE_AUTO_MIN_PARAMS` parameters (served models, not tests' tiny random ones) and then keeps
    a compiled shape only where warm-up timing shows it pays; ``off`` never compiles. On CUDA the static
    decode path replays CUDA graphs instead, so neither mode compiles there.
    """
    if mode == "off":
        return False, "compile=off"
    if device_type != "cpu":
        return False, f"compile={mode}: not on {device_type} (CUDA graphs serve the static decode path there)"
    if static:
        return False, f"compile={mode}: the runner was built with static_decode (eager static path asked for)"
    if mode == "on":
        return True, "compile=on"
    if num_params < COMPILE_AUTO_MIN_PARAMS:
        return False, f"compile=auto: {num_params} parameters < {COMPILE_AUTO_MIN_PARAMS} (a test-sized model)"
    return True, f"compile=auto: {num_params} parameters on cpu; kept per shape only where timing shows a gain"


class _CompiledDecoder:
    """Greedy decode steps of up to :data:`COMPILE_MAX_BATCH` rows, compiled with torch.compile (inductor).

    It runs the static decode body (:class:`_StaticDecoder`: gathers and masks built from the block
    tables inside it, so shapes are fixed per (batch bucket, KV-length bucket)) through
    ``torch.compile(dynamic=False)``, one specialisation per shape, all built at warm-up:
    at most 4 batch buckets x :data:`COMPILE_LEN_BUCKETS` length buckets, greedy only. Prefill, sampling
    rows, larger batches and longer rows keep the eager paths. Compiled and eager steps write the same
    pool, so a row moves between them freely (decode lanes refill when a row comes back to them).
    """

    def __init__(self, runner: ModelRunner) -> None:
        self.sd = _StaticDecoder(runner, capture=False)
        self.keys: set[tuple[int, int]] = set()
        self.max_batch = 0

    def shapes(self) -> list[tuple[int, int]]:
        bs = [b for b in self.sd.buckets if b <= COMPILE_MAX_BATCH] or self.sd.buckets[:1]
        return [(b, n) for n in self.sd.len_buckets[:COMPILE_LEN_BUCKETS] for b in bs]

    def covers(self, seqs: list[Sequence]) -> bool:
        if len(seqs) > self.max_batch or any(s.params.temperature != 0 for s in seqs):
            return False
        b = next(x for x in self.sd.buckets if x >= len(seqs))
        longest = max(s.num_cached for s in seqs) + 1
        if longest > self.sd.len_buckets[-1]:
            return False
        return (b, self.sd.kv_bucket(longest)) in self.keys

    @torch.inference_mode()
    def compile_all(self, force: bool) -> list[dict[str, Any]]:
        """Compile every shape, then time 7 interleaved eager and compiled steps of each (the fastest of
        each), and keep the compiled shapes that are exact and (unless ``force``) at most
        :data:`COMPILE_MIN_GAIN` of eager's time. Logs one line per shape; returns those lines' fields.
        A compile that raises leaves every shape eager (logged), never fails the load."""
        import time

        sd = self.sd
        # cpp_wrapper: the compiled graph is called from C++, not through a Python wrapper (less per-step overhead;
        # a longer compile once, then inductor's on-disk cache has it).
        shapes = self.shapes()
        import torch._dynamo.config as dynamo_config

        # one specialisation per shape of one code object: dynamo's limit (8 by default) must cover them all
        dynamo_config.recompile_limit = max(int(dynamo_config.recompile_limit), len(shapes) + 2)
        fn = torch.compile(sd._body, dynamic=False, options={"cpp_wrapper": True})
        sd.tables.zero_()
        sd.pos.zero_()
        sd.ids.zero_()
        report: list[dict[str, Any]] = []

        def timed(b: int, n: int, pairs: int = 7) -> tuple[float, float]:
            """Fastest of ``pairs`` interleaved eager/compiled steps, in ms (the minimum: a busy box only adds).
            Eager is the step such rows take uncompiled: the lean step over the lanes where the runner has
            one, else the static body."""
            with sd.r.lean_probe(b, n) as lean:
                eager = lean if lean is not None else (lambda: sd._body(b, n, False))
                e, c = fastest_of([eager, lambda: fn(b, n, False)], pairs)
            return e * 1e3, c * 1e3

        built: list[tuple[int, int, float, bool]] = []
        for i, (b, n) in enumerate(shapes):  # compile everything first: inductor's worker pool starts meanwhile
            t0 = time.perf_counter()
            try:
                got = fn(b, n, False)
            except Exception as exc:  # no C++ compiler, a tensor subclass inductor cannot lower, ...: stay eager
                log.warning("decode compile failed, decoding eagerly: %s: %s", type(exc).__name__, exc,
                            extra={"event": "decode_compile_failed", "batch": b, "kv_len": n})
                return report
            seconds = time.perf_counter() - t0
            exact = bool(torch.equal(got, sd._body(b, n, False)))
            built.append((b, n, seconds, exact))
            log.info("compiled decode step %d/%d (batch %d, kv %d) in %.1f s", i + 1, len(shapes), b, n, seconds,
                     extra={"event": "decode_compiling", "batch": b, "kv_len": n, "seconds": round(seconds, 1)})
        for b, n, seconds, exact in built:
            for _ in range(2):
                fn(b, n, False)
            eager_ms, compiled_ms = timed(b, n)
            for _ in range(2):  # a busy box makes single timings noisy: look again before calling it no gain
                if force or compiled_ms <= COMPILE_MIN_GAIN * eager_ms:
                    break
                eager_ms, compiled_ms = timed(b, n)
            keep = exact and (force or compiled_ms <= COMPILE_MIN_GAIN * eager_ms)
            if keep:
                self.keys.add((b, n))
            row = {"event": "decode_compiled", "batch": b, "kv_len": n, "seconds": round(seconds, 1),
                   "eager_ms": round(eager_ms, 3), "compiled_ms": round(compiled_ms, 3), "exact": exact,
                   "kept": keep}
            report.append(row)
            log.info("decode step (batch %d, kv %d): eager %.2f ms, compiled %.2f ms: %s", b, n, eager_ms,
                     compiled_ms, "compiled" if keep else ("not exact: eager" if not exact else "no gain: eager"),
                     extra=row)
        sd.compiled = fn
        self.max_batch = max((b for b, _ in self.keys), default=0)
        return report


class _DecodeLanes:
    """Decode KV kept contiguous per running row, so a decode step reads it as a view instead of a gather.

    Each layer gets ``[lanes, heads, length, dim]`` keys and values beside
    the block pool (the layout attention reads). A row decoding over the
    lanes holds lane ``b`` for as long as it decodes; the batch's rows are
    lanes ``0..B-1`` in order, so attention reads ``lanes[:B, :, :kv_len]``
    with no copy. Every new token is written twice: to its block in the pool
    (which stays the source of truth: prefix caching, preemption and prefill
    read it) and to its lane. A row entering decode (after its prefill, a
    resume or a preemption) is copied once from its blocks into a free lane;
    a row leaving frees its lane and the last lane moves into the hole, so
    lanes stay compact. A lane is trusted only while it holds exactly the
    row's ``num_cached`` positions; otherwise it is refilled from the pool.

    ``length`` grows by doubling as rows get longer, up to ``cap`` positions
    (sized by the lane budget): rows longer than that decode through the
    block gather instead.
    """

    def __init__(self, runner: ModelRunner, lanes: int, cap: int) -> None:
        self.r = runner
        self.lanes = lanes
        self.cap = cap
        self.length = 0
        self.rows: list[Sequence] = []  # lane b holds rows[b]
        self.valid: list[int] = []  # positions lane b holds for rows[b]

    def nbytes(self) -> int:
        return self.lanes * self.length * self.r.bytes_per_token

    def fits(self, seq: Sequence) -> bool:
        return seq.num_cached + 1 <= self.cap

    def _grow(self, need: int) -> None:
        new = max(self.length, min(self.cap, 128))
        while new < need:
            new = min(self.cap, 2 * new)
        if new == self.length:
            return
        for layer, shape in zip(self.r.cache.layers, self.r.layer_shapes):
            assert isinstance(layer, _PagedLayer)
            k = torch.zeros(self.lanes, shape.heads, new, shape.key_dim, dtype=self.r.dtype, device=self.r.device)
            v = torch.zeros(self.lanes, shape.heads, new, shape.value_dim, dtype=self.r.dtype,
                            device=self.r.device)
            if layer.k_lanes is not None and layer.v_lanes is not None and self.length:
                k[:, :, : self.length].copy_(layer.k_lanes)
                v[:, :, : self.length].copy_(layer.v_lanes)
            layer.k_lanes, layer.v_lanes = k, v
        self.length = new

    def _move(self, src: int, dst: int, n: int) -> None:
        for layer in self.r.cache.layers:
            assert isinstance(layer, _PagedLayer) and layer.k_lanes is not None and layer.v_lanes is not None
            layer.k_lanes[dst, :, :n].copy_(layer.k_lanes[src, :, :n])
            layer.v_lanes[dst, :, :n].copy_(layer.v_lanes[src, :, :n])

    def _fill(self, lane: int, seq: Sequence) -> None:
        """Copy ``seq``'s cached positions from its blocks into ``lane``."""
        n = seq.num_cached
        if n:
            bs = self.r.block_size
            blocks = torch.tensor(seq.block_table[: -(-n // bs)], dtype=torch.long, device=self.r.device)
            for layer in self.r.cache.layers:
                assert isinstance(layer, _PagedLayer)
                kb, vb, kl, vl = layer.k_blocks, layer.v_blocks, layer.k_lanes, layer.v_lanes
                assert kb is not None and vb is not None and kl is not None and vl is not None
                k = kb.index_select(0, blocks).flatten(0, 1)[:n]
                v = vb.index_select(0, blocks).flatten(0, 1)[:n]
                kl[lane, :, :n].copy_(k.transpose(0, 1))
                vl[lane, :, :n].copy_(v.transpose(0, 1))

    def place(self, seqs: list[Sequence]) -> list[Sequence]:
        """Give every row of ``seqs`` a lane in ``0..len(seqs)-1`` (moving, evicting and filling lanes as
        needed) and return the rows in lane order."""
        want = set(seqs)
        keep = [(lane, s) for lane, s in enumerate(self.rows)
                if s in want and self.valid[lane] == s.num_cached]
        self._grow(max(s.num_cached for s in seqs) + 1)
        n = len(seqs)
        rows: list[Sequence | None] = [None] * n
        valid = [0] * n
        spill: list[tuple[int, Sequence]] = []
        for lane, s in keep:
            if lane < n:
                rows[lane], valid[lane] = s, s.num_cached
            else:
                spill.append((lane, s))
        holes = [b for b in range(n) if rows[b] is None]
        for (src, s), dst in zip(spill, holes):  # compact: rows in high lanes move down into holes
            self._move(src, dst, s.num_cached)
            rows[dst], valid[dst] = s, s.num_cached
        kept = {id(s) for s in rows if s is not None}
        fresh = [s for s in seqs if id(s) not in kept]
        holes = [b for b in range(n) if rows[b] is None]
        for s, lane in zip(fresh, holes):
            self._fill(lane, s)
            rows[lane], valid[lane] = s, s.num_cached
        out = [s for s in rows if s is not None]
        assert len(out) == n
        self.rows, self.valid = out, valid
        return out

    def advanced(self) -> None:
        """The forward wrote one more position in every lane it used."""
        self.valid = [v + 1 for v in self.valid]
