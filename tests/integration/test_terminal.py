"""The terminal: readable lines and a banner on a TTY (through a real pty), JSON lines elsewhere.

Also: ``GET /health`` (vLLM's semantics), load progress (``model_loading`` events, the progress board behind
``/readyz``), and the torch thread defaults of ``rtws serve``.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.server import UNIT, ServerFactory

ROOT = Path(__file__).resolve().parents[2]
TEXT_LINE = re.compile(r"^\d\d:\d\d:\d\d (\x1b\[[0-9;]*m)?(DEBUG|INFO |WARNING|ERROR|CRITICAL)(\x1b\[0m)? \S")
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "120"}


def _args(model: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "rtws", "serve", "--port", "0", "--model", str(model), "--model-name", "tiny",
            "--num-slots", "4", *extra]


def run_on_pty(args: list[str], until: str, timeout: float = 120.0) -> str:
    """Run ``args`` with stdout and stderr on a pty until ``until`` appears; SIGTERM it; return what it wrote."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a real terminal has a size
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=_env(), cwd=ROOT)
    os.close(slave)
    out = b""
    deadline = time.monotonic() + timeout * UNIT
    try:
        while until.encode() not in out and time.monotonic() < deadline and proc.poll() is None:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    out += os.read(master, 65536)
                except OSError:
                    break
        time.sleep(0.3)  # the rest of the banner
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30 * UNIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        os.close(master)
    text = out.decode("utf-8", "replace").replace("\r\n", "\n")
    assert until in text, text[-3000:]
    return text


def run_piped(args: list[str], until: str, timeout: float = 120.0) -> str:
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=_env(), cwd=ROOT, text=True)
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + timeout * UNIT
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if until in line:
                break
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30 * UNIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    text = "".join(lines)
    assert until in text, text[-3000:]
    return text


def test_tty_gets_readable_lines_and_a_banner(tiny_llama_dir: Path) -> None:
    text = run_on_pty(_args(tiny_llama_dir, "--api-keys", "k1"), "auth    on")
    lines = [ln for ln in text.splitlines() if ln.strip()]
    assert not any(ln.lstrip().startswith("{") for ln in lines), text  # no JSON on a terminal
    log_lines = [ln for ln in lines if TEXT_LINE.match(ln)]
    plain = [ANSI.sub("", ln) for ln in log_lines]
    # uvicorn's own lines in the same format, without its color_message twin
    assert any("Uvicorn running on http://127.0.0.1:" in ln for ln in plain), text
    assert any("Started server process" in ln for ln in plain), text
    assert any("model loaded" in ln and "device=cpu" in ln and "dtype=float32" in ln for ln in plain), text
    assert any("torch threads" in ln and "threads=" in ln for ln in plain), text
    assert all(len(ln) < 400 for ln in plain)
    port = re.search(r"Uvicorn running on http://127\.0\.0\.1:(\d+)", text)
    assert port is not None
    p = port.group(1)
    # the banner: model facts, URLs, auth
    assert "rtws is serving" in text
    model_line = next(ln for ln in lines if ln.strip().startswith("model") and "tiny" in ln)
    assert "cpu" in model_line and "float32" in model_line and "context " in model_line and "KV " in model_line
    for url in (f"http://127.0.0.1:{p}/", f"ws://127.0.0.1:{p}/ws", f"http://127.0.0.1:{p}/v1",
                f"http://127.0.0.1:{p}/metrics", f"http://127.0.0.1:{p}/health"):
        assert url in text, (url, text)
    assert "auth    on" in text


def test_tty_shows_quantization_and_auth_off(tiny_llama_dir: Path) -> None:
    pytest.importorskip("torchao")
    text = run_on_pty(_args(tiny_llama_dir, "--quantization", "int8"), "auth    off")
    model_line = next(ln for ln in text.splitlines() if ln.strip().startswith("model") and "tiny" in ln)
    assert "int8" in model_line, model_line


def test_json_format_on_a_tty_when_asked(tiny_llama_dir: Path) -> None:
    text = run_on_pty(_args(tiny_llama_dir, "--log-format", "json"), '"event": "serving"')
    objs = [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    assert any(o["msg"] == "serving" for o in objs)


def test_not_a_tty_gets_json_lines_with_the_banner_fields(tiny_llama_dir: Path) -> None:
    text = run_piped(_args(tiny_llama_dir), '"event": "serving"')
    objs = [json.loads(ln) for ln in text.splitlines() if ln.strip()]  # every line is JSON
    uv = [o for o in objs if o["logger"].startswith("uvicorn")]
    assert uv and all("color_message" not in o for o in uv)
    serving = next(o for o in objs if o.get("event") == "serving")
    assert serving["auth"] is False
    assert serving["urls"]["openai"].endswith("/v1") and serving["urls"]["ws"].endswith("/ws")
    m = serving["models"][0]
    assert (m["name"], m["device"], m["dtype"], m["quantization"]) == ("tiny", "cpu", "float32", "none")
    assert m["context"] > 0 and m["kv_bytes"] > 0
    loading = [o for o in objs if o.get("event") == "model_loading"]
    assert loading[0]["percent"] == 0.0 and loading[-1]["percent"] == 100.0
    assert [o["percent"] for o in loading] == sorted(o["percent"] for o in loading)
    assert "\r" not in text and "Loading weights" not in text  # no progress bar off a terminal
    threads = next(o for o in objs if o.get("event") == "threads")
    assert threads["threads"] >= 1 and threads["interop_threads"] >= 1


def test_progress_bar_on_a_tty(tiny_llama_dir: Path) -> None:
    text = run_on_pty(_args(tiny_llama_dir), "rtws is serving")
    assert "Loading weights" in text  # transformers' own bar, on the terminal only


# --------------------------------------------------------------------------- load progress


def test_checked_load_publishes_progress(tiny_llama_dir: Path) -> None:
    from rtws.loading import checked_load
    from rtws.model import ModelSpec

    seen: list[dict[str, Any]] = []

    class Board(dict[str, dict[str, Any]]):
        def __setitem__(self, key: str, value: dict[str, Any]) -> None:
            seen.append(dict(value, model=key))
            super().__setitem__(key, value)

    board = Board()
    served = checked_load(ModelSpec(name="t", path=str(tiny_llama_dir), num_slots=2), None, board)
    try:
        stages = [s["stage"] for s in seen]
        assert stages[0] == "checking" and "weights" in stages and "warm-up" in stages and stages[-1] == "ready"
        percents = [s["percent"] for s in seen]
        assert percents == sorted(percents) and percents[-1] == 100.0
        assert board == {}  # gone once loaded
    finally:
        served.stop()


# --------------------------------------------------------------------------- /health


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10 * UNIT) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_health_is_200_serving_and_503_draining(server_factory: ServerFactory, tiny_llama_dir: Path) -> None:
    srv = server_factory(tiny_llama_dir)
    assert _get(srv.http + "/health") == (200, b"")
    assert _get(srv.http + "/healthz")[0] == 200
    srv.app.draining = True  # what App.drain sets first
    try:
        status, body = _get(srv.http + "/health")
        assert status == 503 and json.loads(body)["status"] == "draining"
        assert _get(srv.http + "/healthz")[0] == 503
    finally:
        srv.app.draining = False


# --------------------------------------------------------------------------- threads


def test_thread_choice() -> None:
    from rtws.threads import choose_threads

    assert (c := choose_threads(2, "cpu")).intra == 1 and c.interop == 1  # measured: see bench/RESULTS.md
    assert choose_threads(3, "cpu").intra == 2  # from 2 cores the event loop keeps one
    assert choose_threads(4, "cpu").intra == 3
    assert choose_threads(1, "cpu").intra == 1
    assert choose_threads(16, "cpu").intra == 15
    assert choose_threads(16, "auto").intra == 15
    assert choose_threads(16, "cpu", torch_threads=4).intra == 4
    assert choose_threads(16, "cpu", torch_interop_threads=3).interop == 3
    assert choose_threads(16, "cuda:0") == choose_threads(16, "cuda:0", None, None)
    assert choose_threads(16, "cuda").intra is None  # torch's defaults on CUDA
    assert choose_threads(0, "cpu").intra == 1
