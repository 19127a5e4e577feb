"""Every module of both packages imports on its own, in a fresh interpreter, and the graph of
imports between the project's modules (module-level and inside functions) has no cycle and no
edge from the engine to the training package."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"subject_fingerprint": ROOT / "SubjectFingerprint" / "subject_fingerprint",
            "fingerprint_training": ROOT / "FingerprintTraining" / "fingerprint_training"}


def _modules() -> dict:
    """module name -> file, for every .py of both packages (``__main__`` left out: it runs)."""
    out = {}
    for package, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder.parent).with_suffix("").parts)
            if parts[-1] == "__main__":
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


MODULES = _modules()


def _imports(name: str, path: Path) -> set:
    """The project modules ``name`` imports anywhere in its file."""
    is_package = path.name == "__init__.py"
    base = name.split(".") if is_package else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                prefix = base[:len(base) - node.level + 1]
                mod = ".".join(prefix + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def _graph() -> dict:
    return {name: _imports(name, path) for name, path in MODULES.items()}


def _parents(name: str) -> set:
    """A package's own ``__init__`` imports are not edges of its submodules."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


def test_no_import_cycle_between_project_modules():
    graph = {n: {m for m in deps if m not in _parents(n)} for n, deps in _graph().items()}
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == "open":
                cycle = stack[stack.index(m):] + [m]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = "done"

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_the_engine_never_imports_the_training_package():
    wrong = {n: sorted(m for m in deps if m.startswith("fingerprint_training"))
             for n, deps in _graph().items() if n.startswith("subject_fingerprint")}
    assert {n: d for n, d in wrong.items() if d} == {}


def test_the_graph_sees_known_edges():
    graph = _graph()
    assert "subject_fingerprint.distances" in graph["fingerprint_training.metrics"]
    assert "fingerprint_training.trainer" not in graph["fingerprint_training.distributed"]


@pytest.mark.slow
def test_every_module_imports_in_isolation():
    # One fresh interpreter per module would take minutes on 2 cores; a fresh interpreter per
    # batch that clears the project's modules between imports checks the same thing.
    code = (
        "import importlib, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ('subject_fingerprint', 'fingerprint_training')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n")
    env_path = [str(p.parent) for p in PACKAGES.values()]
    import os
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(env_path + [os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", code, *sorted(MODULES)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
