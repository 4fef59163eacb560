"""Layering: the protocol, session and client modules never import torch."""

from __future__ import annotations

import subprocess
import sys


def test_light_modules_leave_torch_unloaded() -> None:
    code = (
        "import sys\n"
        "import rtws, rtws.generation, rtws.protocol, rtws.session, rtws.scheduler, rtws.engine, rtws.client, rtws.config\n"
        "import rtws.logs, rtws.threads, rtws.banner, rtws.load_errors, rtws.quant  # torch only when called\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
