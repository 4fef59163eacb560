"""rtws: a real-time LLM session server.

``from rtws import InferenceServer, ModelConfig`` loads the server lazily, so
``import rtws.protocol`` (or the client) never imports torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["InferenceServer", "ModelConfig", "ServerConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("InferenceServer", "ModelConfig"):
        from . import api

        return getattr(api, name)
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'rtws' has no attribute {name!r}")
