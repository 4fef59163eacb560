"""Model load errors as one line a user can act on: ``cannot load model 'X': <what>; <what to do>``.

:func:`preflight` checks a :class:`~rtws.model.ModelSpec` before any weight
loads (cheap: files, ``config.json``, safetensors headers, the device);
:func:`classify` turns an exception raised while loading into the same kind of
message. Both raise/return :class:`ModelLoadError`, whose ``str`` is the line.
The CLI prints it and exits 2; the admin API returns it as its JSON error.

Imported on the load path only (it looks up transformers' architecture tables
and asks torch about CUDA there, lazily).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "*.pt", "*.pth", "model.safetensors.index.json",
                   "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
_TRUE = ("1", "true", "yes", "on")


class ModelLoadError(Exception):
    """A model that cannot be loaded. ``kind`` is a stable code; ``str(err)`` is the one-line message."""

    def __init__(self, model: str, kind: str, detail: str) -> None:
        self.model, self.kind, self.detail = model, kind, detail
        super().__init__(f"cannot load model {model!r}: {detail}")

    @property
    def message(self) -> str:
        return str(self)


def hub_offline(env: dict[str, str] | None = None) -> bool:
    e = os.environ if env is None else env
    return any(e.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_hint(path: str, reason: str | None = None) -> str:
    if hub_offline():
        why = "the hub is offline (HF_HUB_OFFLINE=1)"
    elif reason:
        why = f"the hub is unreachable ({reason})"
    else:
        why = "the hub is unreachable or offline"
    return (f"not a local folder, and {why} with no cached copy; pass a folder with config.json and weights, "
            f"or download it first where the hub is reachable (hf download {path} --local-dir DIR)")


def _looks_like_path(path: str) -> bool:
    return (path.startswith(("/", "./", "../", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path
            or not _HUB_ID.match(path))


def check_device(model: str, device: str) -> str:
    """The device type (``cpu``/``cuda``) ``device`` resolves to; raises for CUDA asked where there is none."""
    if device == "cpu":
        return "cpu"
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        build = torch.__version__
        raise ModelLoadError(model, "no_cuda", f"device {device!r} was asked for, but torch {build} sees no CUDA "
                             "device; pass --device cpu (or auto)")
    if ":" in device:
        index = device.split(":", 1)[1]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ModelLoadError(model, "no_cuda", f"device {device!r} does not exist: "
                                 f"{torch.cuda.device_count()} CUDA device(s) visible")
    return "cuda"


def check_safetensors(file: Path) -> str | None:
    """Why ``file`` is not a readable safetensors file (header and sizes), or None if it looks whole."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "shorter than a safetensors header"
            n = int.from_bytes(raw, "little")
            if n <= 1 or n > min(size - 8, 100 * 1024 * 1024):
                return "its header length is invalid"
            header = json.loads(f.read(n))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        return f"its header is not valid JSON ({type(exc).__name__})"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    end = 0
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        offsets = meta.get("data_offsets") if isinstance(meta, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
            return f"tensor {key!r} has no valid data_offsets"
        end = max(end, offsets[1])
    if 8 + n + end > size:
        return f"it is truncated ({size} bytes; its header describes {8 + n + end})"
    return None


def _check_folder(model: str, folder: Path) -> dict[str, Any]:
    cfg_file = folder / "config.json"
    if not cfg_file.is_file():
        raise ModelLoadError(model, "no_config", f"folder {str(folder)!r} has no config.json; pass a model folder "
                             "(config.json, weights and tokenizer files)")
    try:
        config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(model, "bad_config", f"config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(model, "bad_config", "config.json is not a JSON object")
    _check_architecture(model, config)
    weights = sorted({p for pat in WEIGHT_PATTERNS for p in folder.glob(pat)})
    if not weights:
        gguf = list(folder.glob("*.gguf"))
        extra = "; GGUF files are not loaded, convert them first" if gguf else ""
        raise ModelLoadError(model, "no_weights", f"folder {str(folder)!r} has config.json but no weights "
                             f"(model.safetensors or pytorch_model.bin){extra}")
    if not any((folder / t).exists() for t in TOKENIZER_FILES):
        raise ModelLoadError(model, "no_tokenizer", f"folder {str(folder)!r} has no tokenizer files "
                             "(tokenizer.json or tokenizer_config.json); copy them from the model's repository")
    for w in weights:
        if w.suffix == ".safetensors":
            why = check_safetensors(w)
            if why is not None:
                raise ModelLoadError(model, "corrupt_weights", f"{w.name} is corrupt: {why}; download the "
                                     "weights again")
    return config


def _check_architecture(model: str, config: dict[str, Any]) -> None:
    from transformers.models.auto import configuration_auto, modeling_auto

    CONFIG_MAPPING_NAMES: dict[str, str] = configuration_auto.CONFIG_MAPPING_NAMES  # type: ignore[attr-defined]
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: dict[str, str] = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES
    if auto_map and (not known or "AutoModelForCausalLM" in auto_map):
        raise ModelLoadError(model, "remote_code", "it needs trust_remote_code: its config.json maps to Python "
                             f"code shipped with the checkpoint ({', '.join(sorted(auto_map))}), and rtws refuses "
                             "to run a checkpoint's own code; use a model whose architecture transformers implements")
    if not isinstance(model_type, str):
        raise ModelLoadError(model, "unknown_architecture", "config.json has no model_type")
    if not known:
        import transformers

        raise ModelLoadError(model, "unknown_architecture", f"model_type {model_type!r} is not an architecture "
                             f"transformers {transformers.__version__} knows; upgrade transformers or pick a "
                             "supported model")
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelLoadError(model, "not_causal_lm", f"model_type {model_type!r} has no causal-LM class in "
                             "transformers (rtws serves text-generation models)")


def _hub_config(path: str) -> dict[str, Any] | None:
    """A hub id's cached config.json, or None when none is cached."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover
        return None
    hit = try_to_load_from_cache(path, "config.json")
    if not isinstance(hit, str):
        return None
    try:
        cfg = json.loads(Path(hit).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return cfg if isinstance(cfg, dict) else None


def hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the hub endpoint (``HF_ENDPOINT``, default huggingface.co) cannot be reached over TCP, or None."""
    import socket
    from urllib.parse import urlsplit

    try:
        from huggingface_hub import constants

        endpoint = str(constants.ENDPOINT)
    except ImportError:  # pragma: no cover
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlsplit(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as exc:
        return f"{host}:{port}: {exc.strerror or exc}"


def preflight(spec: Any) -> None:
    """Refuse ``spec`` (a ModelSpec) with a :class:`ModelLoadError` when it cannot load. Cheap; no weights load."""
    from . import quant

    name = str(spec.path)
    device_type = check_device(name, spec.device)
    if name in ("gpt2-random", "llama-random"):
        config: dict[str, Any] | None = None
    else:
        folder = Path(name).expanduser()
        if folder.is_dir():
            config = _check_folder(name, folder)
        elif folder.exists():
            raise ModelLoadError(name, "not_a_folder", f"{name!r} is a file; pass the folder that holds "
                                 "config.json and the weights")
        elif _looks_like_path(name):
            raise ModelLoadError(name, "no_such_folder", f"no such folder {name!r}")
        else:
            config = _hub_config(name)
            if config is None:
                why = "offline" if hub_offline() else hub_unreachable()
                if why is not None:
                    raise ModelLoadError(name, "hub_unreachable", _hub_hint(name, why))
            if config is not None:
                _check_architecture(name, config)
    try:
        quant.check(getattr(spec, "quantization", "none"), device_type, bool(getattr(spec, "cuda_graphs", False)),
                    quant.checkpoint_method(config) if config is not None else None)
    except quant.QuantizationError as exc:
        raise ModelLoadError(name, "quantization", str(exc)) from None


def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and len(out) < 8:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out


def classify(exc: BaseException, spec: Any) -> ModelLoadError:
    """The one-line error for an exception raised while loading ``spec``."""
    if isinstance(exc, ModelLoadError):
        return exc
    name = str(spec.path)
    chain = _chain(exc)
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain)
    local = Path(name).expanduser().is_dir() or name in ("gpt2-random", "llama-random")
    if type(exc).__name__ == "QuantizationError":
        return ModelLoadError(name, "quantization", str(exc))
    if "SafetensorError" in names or "HeaderTooLarge" in text or "deserializing header" in text:
        return ModelLoadError(name, "corrupt_weights", f"a safetensors file is corrupt ({_first_line(text)}); "
                              "download the weights again")
    if "trust_remote_code" in text:
        return ModelLoadError(name, "remote_code", "it needs trust_remote_code (its code ships with the checkpoint), "
                              "and rtws refuses to run a checkpoint's own code")
    if "does not recognize this architecture" in text or "Unrecognized configuration class" in text \
            or "Unrecognized model" in text:
        return ModelLoadError(name, "unknown_architecture", f"transformers does not know its architecture "
                              f"({_first_line(text)}); upgrade transformers or pick a supported model")
    if "CUDA is not available" in text or "Torch not compiled with CUDA" in text:
        return ModelLoadError(name, "no_cuda", "a CUDA device was asked for, but torch sees none; pass --device cpu")
    if "OutOfMemoryError" in names:
        return ModelLoadError(name, "out_of_memory", f"out of memory while loading ({_first_line(text)}); pass a "
                              "smaller --num-slots or --max-seq-len, or a smaller dtype")
    if not local and (names & {"OSError", "LocalEntryNotFoundError", "OfflineModeIsEnabled", "RepositoryNotFoundError",
                               "ConnectError", "ConnectionError", "HFValidationError", "GatedRepoError"}):
        if "RepositoryNotFoundError" in names:
            return ModelLoadError(name, "not_found", "not a local folder, and the hub has no such repository; "
                                  "check the id or pass a folder with config.json and weights")
        return ModelLoadError(name, "hub_unreachable", _hub_hint(name))
    if isinstance(exc, ImportError):
        return ModelLoadError(name, "missing_package", _first_line(str(exc)))
    return ModelLoadError(name, "load_failed", f"{type(exc).__name__}: {_first_line(str(exc))}")


def _first_line(text: str, limit: int = 300) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[:limit - 3] + "..."


def log_startup_failure(logger: Any, exc: BaseException) -> str:
    """Log a failed startup: one line for a :class:`ModelLoadError` (its traceback at DEBUG only), the
    traceback otherwise. Returns the text for ASGI's ``lifespan.startup.failed`` ("" when already logged)."""
    import logging

    if isinstance(exc, ModelLoadError):
        debug = logger.isEnabledFor(logging.DEBUG)
        cause = exc.__cause__ or exc
        logger.error(str(exc), exc_info=cause if debug else None,
                     extra={"event": "load_failed", "model_path": exc.model, "error_kind": exc.kind})
        return ""
    logger.error("startup failed", exc_info=exc, extra={"event": "startup_failed"})
    return ""
