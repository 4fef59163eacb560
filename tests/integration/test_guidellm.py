"""guidellm (a widely used LLM benchmark client) against a live rtws server, with its default backend check.

guidellm probes ``GET /health`` before it benchmarks, then streams ``/v1/chat/completions`` or
``/v1/completions``. It is an external program in its own virtual environment: its pins (``click~=8.4``,
``multidict<7``) would change versions rtws's environment uses, so it cannot be a test extra. The
environment (``.venv-guidellm``, or ``$RTWS_GUIDELLM_VENV``) sees this interpreter's packages through a
``.pth`` file, so torch and transformers are not downloaded again; pip puts only guidellm and the pins
that differ there. The first run installs it (a few minutes); later runs reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Any

import pytest
from tests.helpers.server import UNIT, ServerFactory

ROOT = Path(__file__).resolve().parents[2]
GUIDELLM = "guidellm==0.8.1"


def guidellm_bin() -> Path:
    """The guidellm executable, installing it into its own venv first if needed (skip if that fails)."""
    venv = Path(os.environ.get("RTWS_GUIDELLM_VENV", ROOT / ".venv-guidellm"))
    exe = venv / "bin" / "guidellm"
    if exe.exists():
        return exe
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    # This interpreter's packages (torch, transformers, ...) after the venv's own: pip installs only the rest.
    (Path(site) / "_rtws_base.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    out = subprocess.run([str(py), "-m", "pip", "install", "-q", GUIDELLM], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0 or not exe.exists():
        if os.environ.get("CI"):
            pytest.fail(f"could not install {GUIDELLM}: {out.stderr[-2000:]}")
        pytest.skip(f"could not install {GUIDELLM} (no package index?): {out.stderr[-300:]}")
    return exe


@pytest.mark.slow
@pytest.mark.timeout(2400)  # the first run installs guidellm (about 5 minutes on the 2-core VM)
def test_guidellm_runs_against_rtws(server_factory: ServerFactory, tiny_llama_dir: Path, tmp_path: Path) -> None:
    exe = guidellm_bin()
    srv = server_factory(tiny_llama_dir, model_name="tiny", num_slots=8)
    probes: list[str] = []
    health = srv.app.routes[("GET", "/health")]

    async def counted(scope: Any, receive: Any, send: Any) -> None:
        probes.append(scope["path"])
        await health(scope, receive, send)

    srv.app.routes[("GET", "/health")] = counted
    report = tmp_path / "guidellm.json"
    cmd = [str(exe), "run",
           "--backend", f"kind=openai_http,target={srv.http}",
           "--profile", "kind=concurrent,streams=4",
           "--data", "kind=synthetic_text,prompt_tokens=32,output_tokens=16",
           "--constraint", "kind=max_requests,count=16",
           "--tokenizer", f"kind=huggingface_auto,model={tiny_llama_dir}",
           "--output", f"kind=json,path={report}",
           "--output", "kind=console",
           "--disable-progress"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600 * UNIT, env=env, cwd=tmp_path)
    print(out.stdout[-6000:])
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert probes, "guidellm did not probe /health"
    data = json.loads(report.read_text())
    (bench,) = data["benchmarks"]
    totals = bench["metrics"]["request_totals"]
    assert totals["successful"] == 16 and totals["errored"] == 0 and totals["incomplete"] == 0, totals
