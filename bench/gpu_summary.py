"""The short table ``bench/gpu.sh`` ends with, from its saved outputs: ``python bench/gpu_summary.py DIR [STREAMS]``."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import parse_tables, print_table  # noqa: E402


def cell(tables: dict[str, list[list[str]]], title: str, first: str, col: int, *, nth: int = 0) -> str:
    """Column ``col`` of the ``nth`` row starting with ``first`` in the table whose title starts with ``title``."""
    for t, rows in tables.items():
        if t.startswith(title):
            hits = [r for r in rows if " ".join(r[:2]).startswith(first) or r[0].startswith(first)]
            if len(hits) > nth and len(hits[nth]) > col:
                return hits[nth][col]
    return "-"


def main(argv: list[str]) -> int:
    d = Path(argv[1] if len(argv) > 1 else ".")
    c = argv[2] if len(argv) > 2 else "256"

    def load(name: str) -> dict[str, list[list[str]]]:
        p = d / name
        return parse_tables(p.read_text(errors="replace")) if p.exists() else {}

    e256, e1, w = load("engine_256.txt"), load("engine_1.txt"), load("e2e_256.txt")
    pytest_txt = (d / "pytest_gpu.txt").read_text(errors="replace").strip().splitlines() if (
        d / "pytest_gpu.txt").exists() else ["-"]
    rows = [
        ["GPU tests", pytest_txt[-1]],
        [f"generate tok/s, {c} uniform 128", cell(e256, "engine_bench", "uniform", 4)],
        [f"rtws engine tok/s, {c} uniform 128", cell(e256, "engine_bench", "uniform", 4, nth=1)
         + f" ({cell(e256, 'engine_bench', 'uniform', 7, nth=1)})"],
        [f"rtws engine ITL p50/p99 ms, {c}", cell(e256, "engine_bench", "uniform", 5, nth=1) + " / "
         + cell(e256, "engine_bench", "uniform", 6, nth=1)],
        [f"generate tok/s, {c} mixed 16..256", cell(e256, "engine_bench", "mixed", 4)],
        [f"rtws engine tok/s, {c} mixed", cell(e256, "engine_bench", "mixed", 4, nth=1)
         + f" ({cell(e256, 'engine_bench', 'mixed', 7, nth=1)})"],
        ["1 stream ITL p50 ms: generate / rtws engine", cell(e1, "engine_bench", "uniform", 5) + " / "
         + cell(e1, "engine_bench", "uniform", 5, nth=1)],
        [f"e2e delivered tok/s, {c}", cell(w, "e2e_bench summary", "e2e delivered", 1)],
        [f"engine-only tok/s, {c}", cell(w, "e2e_bench summary", "engine-only tok/s", 1)],
        ["e2e / engine-only", cell(w, "e2e_bench summary", "e2e / engine-only", 1)],
        ["e2e TTFT p50/p99 ms", cell(w, "e2e latency", "TTFT", 1) + " / " + cell(w, "e2e latency", "TTFT", 3)],
        ["e2e ITL p50/p99 ms", cell(w, "e2e latency", "inter-token", 1) + " / "
         + cell(w, "e2e latency", "inter-token", 3)],
        ["e2e 1 stream tok/s, ITL p50 ms", cell(w, "delivered tokens/s", "1", 4) + ", "
         + cell(w, "delivered tokens/s", "1", 8)],
        ["cancel p50 / p99 ms", cell(w, "e2e_bench summary", "cancel", 1)],
        ["loop lag p99 ms idle / load", cell(w, "e2e_bench summary", "loop lag", 1)],
    ]
    print_table(f"rtws on GPU: {c} streams, 32-token prompts, 128 new tokens (model/device: see the logs' headers)",
                ["figure", "value"], rows)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
