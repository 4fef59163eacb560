"""Weight quantization: ``int8`` / ``int4`` weight-only through torchao, and pre-quantized checkpoints.

Torch-side, like the runner: the load path (:func:`rtws.model.load`) imports
it; torch and torchao are imported inside the functions that need them.

Contracts:

- :func:`quantize` takes a loaded float model and a spec and returns the model
  to serve: unchanged for ``none``; for ``int8`` (CPU or CUDA) and ``int4``
  (CUDA, bfloat16) the weights of every ``nn.Linear`` are replaced by torchao
  weight-only tensors, except an ``lm_head`` tied to the input embedding
  (quantizing it would untie it: more memory, not less). Refusals raise
  :class:`QuantizationError` (a ``ValueError``) whose text says what to do.
- A checkpoint whose ``config.json`` carries ``quantization_config`` loads
  through transformers' own quantizer; :func:`missing_packages` names what its
  method needs, so the load refuses it up front with the package to install.
- :func:`weight_bytes` counts parameter and buffer bytes once per storage,
  looking inside tensor subclasses (torchao's int8 data plus scales).
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from .config import QUANTIZATIONS

log = logging.getLogger("rtws.quant")

# quant_method in a checkpoint's quantization_config -> (module to import, pip package) it needs.
PREQUANTIZED: dict[str, tuple[tuple[str, str], ...]] = {
    "bitsandbytes": (("bitsandbytes", "bitsandbytes"),),
    "gptq": (("optimum", "optimum"), ("gptqmodel", "gptqmodel")),
    "awq": (("gptqmodel", "gptqmodel"), ("accelerate", "accelerate")),
    "compressed-tensors": (("compressed_tensors", "compressed-tensors"),),
    "torchao": (("torchao", "torchao"),),
    "quanto": (("optimum.quanto", "optimum-quanto"),),
    "hqq": (("hqq", "hqq"),),
    "eetq": (("eetq", "eetq"),),
    "aqlm": (("aqlm", "aqlm"),),
    "vptq": (("vptq", "vptq"),),
    "fbgemm_fp8": (("fbgemm_gpu", "fbgemm-gpu"),),
    "auto-round": (("auto_round", "auto-round"),),
}


class QuantizationError(ValueError):
    """A quantization setting that cannot be served here; the message says what to do instead."""


def checkpoint_method(config: Any) -> str | None:
    """The ``quant_method`` of a pre-quantized checkpoint (a config object or a config.json dict), else None."""
    qc = config.get("quantization_config") if isinstance(config, dict) else getattr(config, "quantization_config",
                                                                                    None)
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    method = getattr(method, "value", method)  # transformers keeps an enum
    if method == "bitsandbytes" or (isinstance(method, str) and method.startswith("bitsandbytes")):
        return "bitsandbytes"
    return str(method) if method is not None else "unknown"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def missing_packages(method: str) -> list[str]:
    """The pip packages a pre-quantized checkpoint of ``method`` needs that are not installed."""
    return [pkg for mod, pkg in PREQUANTIZED.get(method, ()) if not _importable(mod)]


def check(quantization: str, device_type: str, cuda_graphs: bool, checkpoint: str | None = None) -> None:
    """Refuse a quantization setting before any weight loads. Raises :class:`QuantizationError`.

    ``device_type`` is ``cpu`` or ``cuda``; ``checkpoint`` is the checkpoint's own method, if any.
    """
    if quantization not in QUANTIZATIONS:
        raise QuantizationError(f"unknown quantization {quantization!r}; valid values: {', '.join(QUANTIZATIONS)}")
    if checkpoint is not None:
        if quantization != "none":
            raise QuantizationError(
                f"the checkpoint is already quantized ({checkpoint}); pass --quantization none to load it as is")
        missing = missing_packages(checkpoint)
        if missing:
            raise QuantizationError(
                f"the checkpoint is pre-quantized with {checkpoint}, which needs {' and '.join(missing)}: "
                f"pip install {' '.join(missing)}")
        return
    if quantization == "none":
        return
    if quantization == "int4" and device_type != "cuda":
        raise QuantizationError("int4 weight-only quantization needs a CUDA device (torchao's tinygemm kernel); "
                                "on CPU use --quantization int8")
    if device_type == "cuda" and cuda_graphs:
        raise QuantizationError(f"{quantization} with CUDA graphs is not supported yet; pass --no-cuda-graphs")
    if not _importable("torchao"):
        raise QuantizationError(f"{quantization} quantization needs torchao: pip install 'rtws[quant]'")


def weight_bytes(model: Any) -> int:
    """Bytes held by the model's parameters and buffers, each storage counted once."""
    import torch

    seen: set[tuple[int, int]] = set()
    total = 0

    def add(t: Any) -> None:
        nonlocal total
        if hasattr(t, "__tensor_flatten__") and type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter):
            names, _ = t.__tensor_flatten__()
            for n in names:
                add(getattr(t, n))
            return
        if isinstance(t, torch.nn.Parameter) and hasattr(t.data, "__tensor_flatten__") \
                and type(t.data) is not torch.Tensor:
            add(t.data)
            return
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen:
            return
        seen.add(key)
        total += t.untyped_storage().nbytes()

    for p in model.parameters():
        add(p)
    for b in model.buffers():
        add(b)
    return total


def quantize(model: Any, spec: Any, device: Any) -> Any:
    """Apply ``spec.quantization`` to a loaded model (in place) and return it. See the module docstring."""
    method = getattr(spec, "quantization", "none")
    pre = checkpoint_method(model.config)
    check(method, device.type, bool(getattr(spec, "cuda_graphs", False)), pre)
    if method == "none":
        return model
    import torch
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if method == "int4" and next(model.parameters()).dtype != torch.bfloat16:
        raise QuantizationError("int4 weight-only quantization needs bfloat16 weights: pass --dtype bfloat16")
    embed = model.get_input_embeddings()
    tied = getattr(embed, "weight", None)

    def want(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and (tied is None or module.weight is not tied)

    before = weight_bytes(model)
    cfg: Any
    if method == "int8":
        cfg = Int8WeightOnlyConfig(set_inductor_config=False)
    else:
        cfg = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d",
                                   set_inductor_config=False)
    quantize_(model, cfg, filter_fn=want)
    after = weight_bytes(model)
    log.info("weights quantized", extra={"event": "quantized", "quantization": method,
                                         "bytes_before": before, "bytes_after": after})
    return model


def describe(model: Any, spec: Any) -> str:
    """What the served weights are: the spec's quantization, or a pre-quantized checkpoint's method."""
    return checkpoint_method(model.config) or str(getattr(spec, "quantization", "none"))
