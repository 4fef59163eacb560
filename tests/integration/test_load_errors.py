"""Model load errors: one line saying what failed and what to do, exit code 2; the traceback only at DEBUG.

Each case runs the real ``rtws serve`` (``sys.executable -m rtws``) on a broken model folder or hub id.
The admin API returns the same line as its JSON error.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.server import UNIT, ServerFactory

ROOT = Path(__file__).resolve().parents[2]


def serve(model: str, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rtws", "serve", "--port", "0", "--model", model,
                           "--log-format", "text", "--no-warmup", *extra],
                          capture_output=True, text=True, timeout=120 * UNIT, env=e, cwd=ROOT)


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "cannot load model" in line]


def assert_one_line(out: subprocess.CompletedProcess[str], *needles: str) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr[-3000:])
    lines = error_lines(out.stderr)
    assert len(lines) == 1, out.stderr[-3000:]
    for n in needles:
        assert n in lines[0], lines[0]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    return lines[0]


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = int(s.getsockname()[1])
    s.close()
    return port


# --------------------------------------------------------------------------- the CLI


def test_hub_id_while_offline() -> None:
    out = serve("Qwen/Qwen2.5-0.5B-Instruct")
    line = assert_one_line(out, "cannot load model 'Qwen/Qwen2.5-0.5B-Instruct'", "not a local folder",
                           "HF_HUB_OFFLINE=1", "pass a folder with config.json and weights")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr  # nothing else was printed
    assert len(line) < 400


def test_hub_id_with_the_hub_unreachable() -> None:
    # The hub endpoint is a closed local port: the connection is refused at once, as with no network.
    out = serve("Qwen/Qwen2.5-0.5B-Instruct", env={"HF_HUB_OFFLINE": "0",
                                                   "HF_ENDPOINT": f"http://127.0.0.1:{closed_port()}"})
    assert_one_line(out, "not a local folder", "the hub is unreachable", "127.0.0.1")


def test_missing_folder(tmp_path: Path) -> None:
    assert_one_line(serve(str(tmp_path / "nope")), "no such folder")


def test_folder_without_weights(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    for f in d.glob("*.safetensors"):
        f.unlink()
    assert_one_line(serve(str(d)), "has config.json but no weights")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    assert_one_line(serve(str(tmp_path / "m")), "has no config.json")


def test_unknown_architecture(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "no-such-arch"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_one_line(serve(str(d)), "model_type 'no-such-arch' is not an architecture transformers")


def test_not_a_causal_lm(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    (d / "config.json").write_text(json.dumps({"model_type": "vit", "architectures": ["ViTModel"]}))
    assert_one_line(serve(str(d)), "no causal-LM class")


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_corrupt_safetensors(tmp_path: Path, tiny_llama_dir: Path, damage: str) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    weights = next(d.glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    assert_one_line(serve(str(d)), f"{weights.name} is corrupt", "download the weights again")


def test_remote_code_is_refused_with_why(tmp_path: Path, tiny_llama_dir: Path) -> None:
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="my-arch", auto_map={"AutoConfig": "configuration_my.MyConfig",
                                               "AutoModelForCausalLM": "modeling_my.MyForCausalLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "modeling_my.py").write_text("raise SystemExit('remote code ran')\n")
    out = serve(str(d))
    assert_one_line(out, "needs trust_remote_code", "refuses to run a checkpoint's own code")
    assert "remote code ran" not in out.stderr


def test_cuda_asked_for_without_cuda(tiny_llama_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line(serve(str(tiny_llama_dir), "--device", "cuda"), "device 'cuda' was asked for",
                    "sees no CUDA device", "--device cpu")


def test_a_failure_while_loading_is_one_line_and_the_traceback_shows_at_debug(tmp_path: Path,
                                                                              tiny_llama_dir: Path) -> None:
    # The checks pass (files are there) but the tokenizer file is not valid: the failure comes from transformers.
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    (d / "tokenizer.json").write_text("{ not json")
    out = serve(str(d))
    line = assert_one_line(out, "cannot load model")
    assert line.count("\n") == 0
    debug = serve(str(d), "--log-level", "DEBUG")
    assert debug.returncode == 2
    assert len(error_lines(debug.stderr)) == 1
    assert "Traceback" in debug.stderr, debug.stderr[-2000:]


# --------------------------------------------------------------------------- the admin API


def _post(url: str, body: dict[str, Any], key: str) -> tuple[int, dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"authorization": f"Bearer {key}", "content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30 * UNIT) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _get(url: str, key: str) -> dict[str, Any]:
    req = urllib.request.Request(url, headers={"authorization": f"Bearer {key}"})
    with urllib.request.urlopen(req, timeout=30 * UNIT) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


def test_admin_load_reports_the_same_line(server_factory: ServerFactory, tiny_llama_dir: Path, tmp_path: Path) -> None:
    srv = server_factory(tiny_llama_dir, admin_api_keys=("adm",))
    d = copy_model(tiny_llama_dir, tmp_path / "m")
    for f in d.glob("*.safetensors"):
        f.unlink()
    status, body = _post(srv.http + "/admin/models", {"name": "broken", "model_path": str(d)}, "adm")
    assert status == 202, body
    deadline = time.monotonic() + 60 * UNIT
    while True:
        st = _get(srv.http + body["status_url"], "adm")
        if st["status"] != "loading" or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert st["status"] == "failed", st
    cli = error_lines(serve(str(d)).stderr)[0]
    assert st["reason"] == f"cannot load model '{d}': folder '{d}' has config.json but no weights " \
                           "(model.safetensors or pytorch_model.bin)"
    assert cli.endswith(st["reason"])  # the CLI line is that message after a time and a level
    listed = _get(srv.http + "/admin/models", "adm")
    broken = next(m for m in listed["models"] if m["name"] == "broken")
    assert broken["reason"] == st["reason"]

    status, body = _post(srv.http + "/admin/models", {"name": "q", "model_path": str(tiny_llama_dir),
                                                      "quantization": "int3"}, "adm")
    assert status == 400 and "quantization" in body["error"]["message"], body
