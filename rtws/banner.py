"""The startup banner: which models serve, where to connect, whether auth is on.

:func:`banner_info` gathers it from a started app (a dict, logged as the
``serving`` event's fields); :func:`render` draws it for a terminal. The
text formatter prints the rendered block; the JSON formatter logs the fields.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("rtws.server")


def kv_budget_bytes(served: Any) -> int | None:
    """KV-cache bytes for the served model's slots, from its runner if it says, else from the model config."""
    engine = getattr(served, "engine", None)
    runner = getattr(engine, "runner", None)
    for attr in ("kv_bytes", "kv_cache_bytes"):
        v = getattr(runner, attr, None)
        v = v() if callable(v) else v
        if isinstance(v, int) and v > 0:
            return v
    cfg = getattr(getattr(served, "model", None), "config", None)
    if cfg is None:
        return None
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    head_dim = getattr(cfg, "head_dim", None) or (hidden // heads if hidden and heads else None)
    if not (layers and kv_heads and head_dim):
        return None
    dtype = str(getattr(served, "dtype", "") or getattr(getattr(served, "model", None), "dtype", ""))
    width = 2 if ("16" in dtype) else 4
    slots = getattr(getattr(served, "spec", None), "num_slots", 0) or 0
    return int(2 * layers * kv_heads * head_dim * width * slots * served.context_len)


def model_info(served: Any) -> dict[str, Any]:
    """One model's banner/`/v1/models` facts: name, version, device, dtype, context, quantization, KV budget."""
    spec = getattr(served, "spec", None)
    model = getattr(served, "model", None)
    dtype = str(getattr(model, "dtype", "") or getattr(spec, "dtype", "")).removeprefix("torch.")
    quantization = getattr(spec, "quantization", "none")
    if model is not None:
        from .quant import checkpoint_method

        quantization = checkpoint_method(getattr(model, "config", None)) or quantization
    return {"name": served.name, "version": served.version, "device": getattr(served, "device", "?"),
            "dtype": dtype, "context": served.context_len, "quantization": quantization,
            "num_slots": getattr(spec, "num_slots", None), "kv_bytes": kv_budget_bytes(served)}


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", "", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host


def banner_info(app: Any, host: str, port: int | None) -> dict[str, Any]:
    base = f"http://{_display_host(host)}:{port}"
    ws = f"ws://{_display_host(host)}:{port}/ws"
    urls = {"chat": base + "/", "ws": ws, "openai": base + "/v1", "metrics": base + "/metrics",
            "health": base + "/health"}
    if not app.config.enable_metrics:
        urls.pop("metrics")
    return {"models": [model_info(m) for m in app.registry.models()], "urls": urls,
            "auth": bool(app.config.auth_enabled), "listen": f"{host}:{port}"}


def _mib(n: int | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.1f} MiB" if n < 2**30 else f"{n / 2**30:.2f} GiB"


def render(info: dict[str, Any]) -> str:
    lines = ["", "rtws is serving", ""]
    for m in info["models"]:
        kv = f", KV {_mib(m['kv_bytes'])} ({m['num_slots']} slots)" if m.get("kv_bytes") else ""
        quant = f", {m['quantization']}" if m["quantization"] != "none" else ""
        lines.append(f"  model   {m['name']} v{m['version']}: {m['device']}, {m['dtype']}{quant}, "
                     f"context {m['context']}{kv}")
    urls = info["urls"]
    lines.append("")
    lines.append(f"  chat    {urls['chat']}")
    lines.append(f"  ws      {urls['ws']}")
    lines.append(f"  openai  {urls['openai']}  (base_url for the openai client)")
    if "metrics" in urls:
        lines.append(f"  metrics {urls['metrics']}")
    lines.append(f"  health  {urls['health']}")
    lines.append(f"  auth    {'on (Authorization: Bearer <key>)' if info['auth'] else 'off'}")
    if info["listen"].startswith(("0.0.0.0", "::")):
        lines.append(f"  listen  {info['listen']} (all interfaces)")
    lines.append("")
    return "\n".join(lines)


def announce(app: Any, host: str, port: int | None) -> dict[str, Any]:
    """Log the ``serving`` event (JSON: its fields; a terminal: the rendered banner). Returns the info."""
    info = banner_info(app, host, port)
    log.info("serving", extra={"event": "serving", **info, "_text": render(info)})
    return info
