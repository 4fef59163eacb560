"""Smoke test of the benchmark scripts in bench/: each runs end to end with tiny settings and prints its table.

These are not timed tests: they assert that every script works (real
server child, real client processes, real model) and reports what it
promises, never how fast anything was.
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str) -> ModuleType:
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    return importlib.import_module(name)


def table(out: str, title: str) -> list[list[str]]:
    """The rows (cells stripped) of the printed table whose title starts with ``title``."""
    lines = out.splitlines()
    for i, ln in enumerate(lines):
        if ln.startswith(title):
            rows = []
            for row in lines[i + 3:]:
                if not row.startswith("|"):
                    break
                rows.append([c.strip() for c in row.strip("|").split("|")])
            return rows
    raise AssertionError(f"no table {title!r} in output:\n{out}")


def value(rows: list[list[str]], figure: str) -> str:
    for r in rows:
        if r[0].startswith(figure):
            return r[1]
    raise AssertionError(f"no row {figure!r} in {rows}")


def test_engine_bench_compares_engine_with_generate(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_module("engine_bench").main(["--model", str(tiny_llama_dir), "--requests", "4", "--concurrency", "2",
                                            "--max-tokens", "4", "--mixed-range", "2,6", "--prompt-len", "8"])
    assert rc == 0
    rows = table(capsys.readouterr().out, "engine_bench:")
    systems = [(r[0].split()[0], r[1]) for r in rows]
    assert systems == [("uniform", "model.generate"), ("uniform", "rtws engine"), ("mixed", "model.generate"),
                       ("mixed", "rtws engine")]
    # Both sides produced exactly the requested tokens: 4 requests x 4 tokens in the uniform workload.
    assert rows[0][2] == rows[1][2] == "16"
    assert rows[2][2] == rows[3][2]
    assert all(re.fullmatch(r"\d+\.\d\dx", r[7]) for r in rows)


def test_e2e_bench_reports_latency_cancel_and_baseline(tiny_llama_dir: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_module("e2e_bench").main([
        "--model", str(tiny_llama_dir), "--requests", "4", "--concurrency", "2", "--max-tokens", "4",
        "--prompt-len", "8", "--cancels", "3", "--sweep", "1", "--procs", "1", "--repeat", "1",
        "--lag-idle-s", "0.05"])
    assert rc == 0
    out = capsys.readouterr().out
    summary = table(out, "e2e_bench summary")
    assert int(value(summary, "e2e delivered tok/s").replace(",", "")) > 0
    assert value(summary, "e2e / engine-only").endswith("%")
    cancel = table(out, "cancel latency")
    assert cancel[0][0] == "3"  # every probe was cancelled and timed
    lag = table(out, "server event-loop lag")
    assert [r[0] for r in lag][:2] == ["idle", "load, 2 streams"]
    assert int(lag[1][4]) > 0  # the sampler ran in the server process during the load
    sweep = table(out, "delivered tokens/s by concurrency")
    assert sweep[0][0] == "1" and sweep[0][2] == "4" and int(sweep[0][3]) > 0  # at least 4 requests per level
    latency = table(out, "e2e latency")
    assert [r[0] for r in latency] == ["TTFT", "inter-token", "end-to-end", "engine-only ITL"]


def test_sessions_bench_runs_every_session(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_module("sessions_bench").main(["--model", str(tiny_llama_dir), "--sessions", "20", "--max-tokens", "2",
                                              "--num-slots", "8", "--procs", "1", "--settle-s", "0"])
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = table(out, "sessions_bench summary")
    assert value(summary, "sessions connected") == "20/20"
    assert value(summary, "generations succeeded").startswith("20/20")
    rss = table(out, "server RSS")
    assert [r[0] for r in rss][:2] == ["no sessions (baseline)", "20 idle sessions"]
    assert float(rss[0][1]) > 10  # a real process RSS in MiB, read from /proc


def test_memory_bench_closes_stalled_readers(tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_module("memory_bench").main(["--model", str(tiny_llama_dir), "--sessions", "3", "--gens-per-session",
                                            "12", "--stall-timeout-s", "0.5", "--procs", "1", "--mode", "stalled",
                                            "--settle-s", "0"])
    assert rc == 0
    rows = table(capsys.readouterr().out, "memory_bench summary")
    assert value(rows, "sessions x generations") == "3 x 12"
    assert value(rows, "closed as stalled") == "3/3"
    assert float(value(rows, "RSS peak (MiB)")) > 10


def test_conversation_bench_compares_conversation_with_resent_messages(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_module("conversation_bench").main(["--turns", "2", "--rounds", "1", "--max-tokens", "3"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = table(out, "conversation_bench: per turn")
    assert [r[0] for r in rows] == ["1", "2"]
    # Turn 2: the conversation sends only the new line, the messages mode the whole history.
    assert int(rows[1][1].replace(",", "")) < int(rows[1][2].replace(",", ""))
    summary = table(out, "conversation_bench: summary")
    assert value(summary, "replies identical") == "2/2"


def test_resume_bench_reports_resume_latency(capsys: pytest.CaptureFixture[str]) -> None:
    rc = bench_module("resume_bench").main(["--resumes", "2", "--streams", "2", "--sessions", "1",
                                            "--load-max-tokens", "8"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = table(out, "resume_bench: latency")
    assert [r[0] for r in rows] == ["reconnect -> ready {resumed}", "reconnect -> first frame after it",
                                    "baseline: new session -> first token"]
    assert all(r[4] == "2" for r in rows)


def test_peers_bench_compares_rtws_rows_and_checks_texts(tiny_llama_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    # Peers (transformers serve, llama-server) are skipped here; the rtws rows and the text check run for real.
    rc = bench_module("peers_bench").main(["--model", str(tiny_llama_dir), "--concurrency", "1,2", "--requests", "3",
                                           "--prompt-len", "8", "--max-tokens-range", "2,5", "--repeat", "2",
                                           "--no-transformers", "--llama-server", "/nonexistent/llama-server"])
    out = capsys.readouterr().out
    assert rc == 0, out
    rows = table(out, "peers_bench:")
    assert [(r[0], r[1]) for r in rows] == [("rtws /v1/completions", "1"), ("rtws /ws (one socket)", "1"),
                                            ("rtws /v1/completions", "2"), ("rtws /ws (one socket)", "2")]
    assert all(r[3] == "1.00x" for r in rows if r[0] == "rtws /v1/completions")
    checks = table(out, "greedy texts vs")
    assert all(r[2] == "3/3" and r[4] == "ok" for r in checks)
    assert "not measured: llama-server F32" in out
