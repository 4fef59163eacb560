"""Layering: the protocol, session and client modules never import torch; imports point one way (engine and
pure modules never import the front ends or server code); uvicorn's internals rtws relies on are still there."""

from __future__ import annotations

import ast
import inspect
import subprocess
import sys
from pathlib import Path


def test_light_modules_leave_torch_unloaded() -> None:
    code = (
        "import sys\n"
        "import rtws, rtws.generation, rtws.protocol, rtws.admission, rtws.errors, rtws.session, rtws.scheduler, rtws.engine, rtws.client, rtws.config\n"
        "import rtws.logs, rtws.threads, rtws.banner, rtws.load_errors, rtws.quant  # torch only when called\n"
        "heavy = sorted(m for m in ('torch', 'transformers') if m in sys.modules)\n"
        "assert not heavy, heavy\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------- import direction (static, by ast)

RTWS = Path(__file__).resolve().parents[2] / "rtws"
ENGINE = ("engine", "runner", "scheduler", "kv_blocks", "generation")
FRONT = ("session", "app", "http", "realtime", "realtime_events", "server", "api", "admission")
PURE = ("protocol", "admission", "scheduler", "generation", "errors", "hooks", "limits")
SERVER_CODE = ("torch", "transformers", "uvicorn", "starlette", "websockets", "asyncio",
               "rtws.app", "rtws.server", "rtws.transport", "rtws.http")


def _module_name(path: Path) -> str:
    rel = path.relative_to(RTWS.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports at run time (module level or inside functions; not under TYPE_CHECKING)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                out.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[:len(base) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                out.add(mod)
                out.update(f"{mod}.{a.name}" for a in child.names)  # `from . import protocol` names a module
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return out


def _graph() -> dict[str, set[str]]:
    files = sorted(RTWS.rglob("*.py"))
    names = {_module_name(p) for p in files}
    graph: dict[str, set[str]] = {}
    for p in files:
        mods = _imports(p)
        graph[_module_name(p)] = {m for m in mods if m in names} | {m for m in mods if not m.startswith("rtws")}
    return graph


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        mod = todo.pop()
        for dep in graph.get(mod, ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def _under(mod: str, roots: tuple[str, ...]) -> bool:
    return any(mod == r or mod.startswith(r + ".") for r in roots)


def test_the_engine_never_imports_the_front_ends() -> None:
    graph = _graph()
    front = tuple("rtws." + m for m in FRONT)
    for mod in ENGINE:
        bad = sorted(d for d in _closure(graph, "rtws." + mod) if _under(d, front))
        assert not bad, f"rtws.{mod} imports {bad}"


def test_pure_modules_import_no_torch_and_no_server_code() -> None:
    graph = _graph()
    for mod in PURE:
        bad = sorted(d for d in _closure(graph, "rtws." + mod) if _under(d, SERVER_CODE))
        assert not bad, f"rtws.{mod} imports {bad}"


def test_the_static_analysis_sees_imports() -> None:
    # the checks above would pass vacuously if the parser found nothing
    graph = _graph()
    assert "rtws.protocol" in graph["rtws.session"] and "rtws.admission" in graph["rtws.session"]
    assert "torch" in _closure(graph, "rtws.runner")
    assert "rtws.session" in _closure(graph, "rtws.app")


def test_uvicorn_internals_rtws_reaches_for_exist() -> None:
    """rtws.transport's last section reaches into uvicorn: fail loudly when an upgrade moves what it uses."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
    from websockets.server import ServerProtocol

    from rtws import transport

    cycle_init = inspect.getsource(RequestResponseCycle.__init__)
    assert "self.transport = transport" in cycle_init and "self.response_started = False" in cycle_init
    assert "self.flow = flow" in cycle_init  # transport.write_paused
    assert "if self.flow.write_paused and not self.disconnected:" in inspect.getsource(RequestResponseCycle.send)
    assert inspect.iscoroutinefunction(RequestResponseCycle.send)
    ws_source = inspect.getsource(WebSocketsSansIOProtocol)
    for attr in ("self.transport = transport", "self.conn = ServerProtocol(", "self.close_sent = ",
                 "self.writable = asyncio.Event()", "self.disconnected = ", "self.handshake_complete = ",
                 "self.initial_response", "self.conn.send_binary(", "self.conn.send_text("):
        assert attr in ws_source, attr
    assert inspect.iscoroutinefunction(WebSocketsSansIOProtocol.send)
    assert callable(ServerProtocol.send_close) and callable(ServerProtocol.data_to_send)
    assert callable(ServerProtocol.send_binary) and callable(ServerProtocol.send_text)  # transport.frame_writer
    assert issubclass(transport.GuardedHttpProtocol, HttpToolsProtocol)
    assert issubclass(transport.GuardedWebSocketProtocol, WebSocketsSansIOProtocol)
    assert callable(transport.GuardedWebSocketProtocol.stop_reading)
    # the helpers find uvicorn's object through a bound send, and through the app's TrackedSend wrapper
    proto = WebSocketsSansIOProtocol.__new__(WebSocketsSansIOProtocol)
    proto.transport = "t"  # type: ignore[assignment]
    assert transport.transport_of(proto.send) == "t"
    assert transport.transport_of(transport.TrackedSend(proto.send)) == "t"


def test_no_import_cycles_among_rtws_modules() -> None:
    graph = _graph()

    def internal(mod: str) -> set[str]:
        return {d for d in graph.get(mod, ()) if d.startswith("rtws.") and d != mod}

    for mod in graph:
        if mod == "rtws" or mod.endswith("__main__"):
            continue
        reach: set[str] = set()
        todo = list(internal(mod))
        while todo:
            dep = todo.pop()
            if dep not in reach:
                reach.add(dep)
                todo.extend(internal(dep))
        assert mod not in reach, f"{mod} imports itself through {sorted(reach)}"
