"""Print rtws's internal import graph (which rtws modules import which, at run time), lines per module and
the largest functions. A code-structure report, not a benchmark: no timings.

    PYTHONPATH=$PWD python bench/import_graph.py [--top N]
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

RTWS = Path(__file__).resolve().parent.parent / "rtws"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(RTWS.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """rtws modules ``path`` imports at run time (module level or in functions; not under TYPE_CHECKING)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", "")) == "TYPE_CHECKING":
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = package.split(".")[:len(package.split(".")) - (child.level - 1)] if child.level else []
                mod = ".".join(base + ([child.module] if child.module else []))
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--top", type=int, default=5, help="how many of the largest functions to list")
    args = ap.parse_args()
    files = sorted(RTWS.rglob("*.py"))
    names = {module_name(p) for p in files}
    print("import graph (module -> rtws modules it imports at run time)")
    for p in files:
        deps = sorted(m.removeprefix("rtws.") for m in imports(p) if m in names and m not in ("rtws", module_name(p)))
        print(f"  {module_name(p).removeprefix('rtws.') or 'rtws'}: {', '.join(deps) or '-'}")
    funcs: list[tuple[int, str]] = []
    for p in files:
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno is not None:
                funcs.append((node.end_lineno - node.lineno + 1, f"{module_name(p)}:{node.name} (line {node.lineno})"))
    print(f"largest functions (lines, {args.top}):")
    for n, where in sorted(funcs, reverse=True)[:args.top]:
        print(f"  {n:4d}  {where}")


if __name__ == "__main__":
    main()
