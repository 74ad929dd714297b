"""Import direction: pure shared modules at the bottom, workers never load the frontend, no cycles, no side
effects inside asserts (``python -O`` strips them)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("fs_engine", "workers", "ipc")
FRONTEND_ONLY = ("zmq", "fs_engine.sched", "fs_engine.engine", "fs_engine.client", "ipc.channels", "fs_engine.sim.executor")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path, known: set[str]) -> set[str]:
    """Project modules ``path`` imports, at module level or inside a function alike."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from package import submodule" depends on the submodule, "from module import name" on the module
            submodules = [f"{node.module}.{a.name}" for a in node.names if f"{node.module}.{a.name}" in known]
            names = submodules if len(submodules) == len(node.names) else [node.module, *submodules]
        found.update(n for n in names if n in known)
    return found


def test_workers_load_no_frontend_module():
    code = ("import sys, workers.model_runner, workers.gpu_worker, workers.swap.swap_manager; "
            f"bad = sorted(m for m in sys.modules if m.startswith({FRONTEND_ONLY!r})); print(bad)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", f"the worker imports frontend modules: {out.stdout}"


def test_no_import_cycle():
    modules = _modules()
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [name, dep])}"
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_call_inside_an_assert():
    """An assert whose test calls something that changes state breaks under ``python -O``."""
    mutating = ("allocate", "allocate_slots", "pop", "append", "remove", "free", "submit", "send")
    offenders = []
    for name, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Assert):
                continue
            for call in ast.walk(node.test):
                if isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute) and call.func.attr in mutating:
                    offenders.append(f"{name}:{node.lineno}")
    assert not offenders, f"asserts with side effects: {offenders}"
