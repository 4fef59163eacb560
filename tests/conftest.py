"""Fixtures only: tiny real models, and real servers (uvicorn on port 0) in a background thread.

Shared code lives in ``tests/helpers`` (``from tests.helpers.server import UNIT, run, ...``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as _hyp_settings
from tests.helpers.models import build_model
from tests.helpers.server import RunningServer, ServerFactory

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Servers the tests start (in-process or `python -m rtws serve`) never torch.compile the bundled model's decode
# step (about a minute of warm-up each); tests/integration/test_compile.py checks compile on its own.
os.environ.setdefault("RTWS_COMPILE", "off")

# CI runs the property tests derandomized (the same examples every run); locally they explore afresh.
_hyp_settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    _hyp_settings.load_profile("ci")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture(scope="session")
def tiny_llama_long_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Like tiny_llama_dir with an 8k context and no EOS token: streams run to max_tokens (backpressure, drain)."""
    return build_model(tmp_path_factory.mktemp("tiny-llama-long"), "llama", context=8192, eos=False)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_model(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from rtws.default_model import DEFAULT_MODEL_PATH

    if not (Path(DEFAULT_MODEL_PATH) / "model.safetensors").exists():
        pytest.skip("bundled default model not trained yet")
    return Path(DEFAULT_MODEL_PATH)


@pytest.fixture
def server_factory() -> Iterator[ServerFactory]:
    """``server_factory(model=path, **config)`` starts a real server on port 0; all stop at teardown."""
    from rtws.config import ServerConfig
    from rtws.server import run_in_thread

    started: list[RunningServer] = []

    def start(model: Path | str | None = None, specs: Any = None, **overrides: Any) -> RunningServer:
        overrides.setdefault("log_level", "WARNING")
        overrides.setdefault("port", 0)  # a test restarting a server passes the old port
        overrides.setdefault("compile", "off")
        cfg = ServerConfig(model=str(model) if model is not None else None, **overrides)
        server, thread = run_in_thread(cfg, specs)
        rs = RunningServer(server, thread)
        started.append(rs)
        return rs

    yield start
    for rs in started:
        if rs.thread.is_alive():
            rs.stop()


@pytest.fixture
def tiny_server(server_factory: ServerFactory, tiny_llama_dir: Path) -> RunningServer:
    return server_factory(tiny_llama_dir)
