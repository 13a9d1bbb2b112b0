"""The layering of docs/architecture.md, checked on the source: who may import whom.

run imports tasks; tasks import libraries, never each other; libraries never import tasks;
worker-side modules import no MLflow at module level; the decode module ships alone; vit_model
knows nothing of pipelines, Ray or MLflow; and no module-level import cycle exists anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TASKS = {"pipelines.prepare", "pipelines.train", "pipelines.tune", "pipelines.evaluate", "pipelines.register",
         "pipelines.infer"}
WORKFLOW = "pipelines.run"
ENTRY = {"pipelines.cli", "pipelines.__main__", "pipelines.serving_model"}
WORKER_SIDE = {"pipelines.train_worker", "pipelines.inference.actors", "pipelines.data.stream", "pipelines.engine"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, *, top_level_only: bool) -> set[str]:
    """Absolute names of what ``name`` imports (``from .x import y`` resolved, ``y`` kept when it is a module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also look inside module-level try/if blocks
        nodes = [n for top in tree.body for n in ast.walk(top)
                 if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            found.add(mod)
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


ALL = {**_modules("pipelines"), **_modules("vit_model")}


def _internal(imported: set[str]) -> set[str]:
    return {m for m in imported if m in ALL}


@pytest.mark.parametrize("name", sorted(ALL))
def test_layering(name):
    everything = _imports(name, ALL[name], top_level_only=False)
    internal = _internal(everything)
    if name.startswith("vit_model"):
        bad = {m for m in everything if m.split(".")[0] in ("pipelines", "ray", "mlflow")}
        assert not bad, f"vit_model must not import {sorted(bad)}"
        return
    if name == WORKFLOW or name in ENTRY:
        return
    tasks = (internal & TASKS) - {name}
    if name in TASKS:
        assert not tasks, f"task {name} imports task(s) {sorted(tasks)}; move the shared code to a library"
    else:
        assert not tasks and WORKFLOW not in internal, f"library {name} imports {sorted(tasks | (internal & {WORKFLOW}))}"


@pytest.mark.parametrize("name", sorted(WORKER_SIDE))
def test_worker_side_modules_import_no_mlflow_at_module_level(name):
    top = _imports(name, ALL[name], top_level_only=True)
    assert not {m for m in top if m.split(".")[0] == "mlflow"}
    seen, todo = set(), [name]  # nor through the libraries they import at module level
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        top = _imports(mod, ALL[mod], top_level_only=True)
        assert not {m for m in top if m.split(".")[0] == "mlflow"}, f"{name} imports MLflow through {mod}"
        todo.extend(_internal(top))


def test_decode_module_ships_alone():
    top = _imports("pipelines.imaging", ALL["pipelines.imaging"], top_level_only=False)
    roots = {m.split(".")[0] for m in top}
    assert roots <= {"__future__", "io", "dataclasses", "numpy", "PIL"}, roots


def test_no_module_level_import_cycles():
    graph = {name: _internal(_imports(name, path, top_level_only=True)) - {name} for name, path in ALL.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


@pytest.mark.parametrize("name", sorted(set(ALL) - ENTRY))
def test_no_function_local_imports_of_our_own_modules(name):
    """A function-local import is for start-up cost (Ray, MLflow), never to dodge a cycle."""
    local = _internal(_imports(name, ALL[name], top_level_only=False)) - _internal(
        _imports(name, ALL[name], top_level_only=True))
    assert not local, f"{name} imports {sorted(local)} inside a function; import it at the top"
