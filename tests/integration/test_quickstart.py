"""The seed README's Quick Start runs as written, with ``rtws`` for ``realtime_serve`` and a real model path.

The server snippet runs in its own process (it calls ``asyncio.run`` and serves
until a signal), the seed's aiohttp client snippet in another; SIGTERM then
drains and stops the server. The snippets are kept here verbatim and checked
against the seed README when it is present.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest
from tests.helpers.server import UNIT

SEED_README = Path(__file__).resolve().parents[2].parent / "shared" / "seed" / "realtime-ai-serve-README.md"

SERVER = '''from realtime_serve import InferenceServer, ModelConfig

# Create and configure server
server = InferenceServer(
    max_connections=256,
    request_timeout=30.0,
    max_batch_size=32,
    max_batch_wait_ms=50
)

# Register a model
model_config = ModelConfig(
    name="gpt2",
    version="1.0.0",
    model_path="/path/to/model",
    device="cuda"
)
server.register_model(model_config)

# Start the server
import asyncio
asyncio.run(server.start(host="0.0.0.0", port=8000))
'''

CLIENT = '''import asyncio
import aiohttp

async def stream_inference():
    async with aiohttp.ClientSession() as session:
        payload = {
            "model": "gpt2",
            "prompt": "Once upon a time",
            "max_tokens": 100
        }
        
        async with session.post(
            "http://localhost:8000/infer",
            json=payload
        ) as resp:
            async for line in resp.content:
                token = line.decode().strip()
                if token:
                    print(token, end="", flush=True)

asyncio.run(stream_inference())
'''

CONFIGURATION = '''server = InferenceServer(
    max_connections=256,        # Maximum concurrent connections
    request_timeout=30.0,       # Request timeout in seconds
    max_batch_size=32,          # Maximum requests per batch
    max_batch_wait_ms=50,       # Max wait before processing small batch
    enable_metrics=True,        # Enable prometheus metrics
    log_level="INFO",           # Logging level
    rate_limit_per_minute=1000  # Client rate limit
)
'''


def test_snippets_match_the_seed_readme() -> None:
    if not SEED_README.exists():
        pytest.skip("seed README not present")
    blocks = re.findall(r"```python\n(.*?)```", SEED_README.read_text(encoding="utf-8"), re.S)
    assert blocks[:3] == [SERVER, CLIENT, CONFIGURATION]


def port_8000_or_free() -> int:
    """8000 as written when it is free here; on a busy machine, another free port (the only other change)."""
    for port in (8000, 0):
        with socket.socket() as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise AssertionError("unreachable")


def test_configuration_snippet_builds_a_server() -> None:
    from rtws import InferenceServer

    scope: dict[str, object] = {"InferenceServer": InferenceServer}
    exec(CONFIGURATION, scope)
    config = scope["server"].config  # type: ignore[attr-defined]
    assert (config.max_connections, config.rate_limit_per_minute, config.max_batch_wait_ms) == (256, 1000, 50)


def test_quick_start_server_and_streaming_client(tiny_llama_dir: Path, tmp_path: Path) -> None:
    port = port_8000_or_free()
    server_code = SERVER.replace("realtime_serve", "rtws").replace("/path/to/model", str(tiny_llama_dir))
    client_code = CLIENT
    if port != 8000:
        server_code = server_code.replace("port=8000", f"port={port}")
        client_code = client_code.replace("localhost:8000", f"localhost:{port}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTWS_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    (tmp_path / "server.py").write_text(server_code)
    (tmp_path / "client.py").write_text(client_code)

    server = subprocess.Popen([sys.executable, "server.py"], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    listening = threading.Event()

    def read_log() -> None:
        assert server.stderr is not None
        for line in server.stderr:
            lines.append(line)
            if '"event": "listening"' in line:
                listening.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        assert listening.wait(120 * UNIT), "".join(lines[-20:])
        client = subprocess.run([sys.executable, "client.py"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=60 * UNIT)
        assert client.returncode == 0, client.stderr
        out = client.stdout
        # The seed's client prints each non-empty line of the Server-Sent Events stream, stripped, unseparated.
        assert out.startswith('data: {"text":')
        head, sep, tail = out.rpartition("event: donedata: ")
        assert sep, out[-300:]
        done = msgspec.json.decode(tail)
        assert done["model"] == "gpt2" and done["reason"] in ("stop", "length")
        deltas = [msgspec.json.decode("{" + part) for part in head.split('data: {')[1:]]
        assert sum(d["tokens"] for d in deltas) == done["usage"]["completion_tokens"] <= 100
        if done["reason"] == "length":
            assert done["usage"]["completion_tokens"] == 100

        server.send_signal(signal.SIGTERM)  # drains, then start() returns and the script ends
        assert server.wait(60 * UNIT) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        reader.join(10 * UNIT)
        assert server.stderr is not None
        server.stderr.close()
    log = "".join(lines)
    assert '"event": "drain_done"' in log and '"event": "stopped"' in log
    assert "Traceback" not in log
    import torch

    if not torch.cuda.is_available():
        assert '"event": "device_fallback"' in log  # device="cuda" on a CPU machine: served on the CPU
