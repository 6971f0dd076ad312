"""The layering ARCHITECTURE.md describes, checked on the source: flows -> tasks -> mmpipe,
mmpipe never imports Prefect or DVC, only mmpipe.tracking imports MLflow, and no two modules
import each other (directly or round a loop), counting imports inside functions too."""

from __future__ import annotations

from tests.imports import MODULES, imports

GRAPH = {name: {m for m in imports(name) if m in MODULES and m != name} for name in MODULES}


def _top(name: str) -> str:
    return name.split(".")[0]


def test_dependencies_point_one_way():
    allowed = {
        "flows": {"flows", "tasks", "mmpipe"},
        "tasks": {"tasks", "mmpipe"},
        "mmpipe": {"mmpipe"},
    }
    wrong = [(a, b) for a, deps in GRAPH.items() for b in deps if _top(b) not in allowed[_top(a)]]
    assert wrong == []


def test_mmpipe_imports_no_orchestrator_and_only_tracking_imports_mlflow():
    for name in MODULES:
        if _top(name) != "mmpipe":
            continue
        roots = {m.split(".")[0] for m in imports(name)}
        assert not roots & {"prefect", "dvc"}, name
        if "mlflow" in roots:
            assert name.startswith("mmpipe.tracking"), name


def test_no_import_cycles():
    """Tarjan's strongly connected components; any with two or more modules is a cycle."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1 and not _is_package_and_its_modules(component):
                cycles.append(component)

    for v in GRAPH:
        if v not in index:
            visit(v)
    assert cycles == []


def _is_package_and_its_modules(component: set[str]) -> bool:
    """A package's __init__ re-exporting its own modules is not a cycle between modules."""
    inits = [m for m in component if MODULES[m].name == "__init__.py"]
    return len(inits) == 1 and all(m == inits[0] or m.startswith(f"{inits[0]}.") for m in component)


def test_the_checks_see_the_imports():
    """The graph is not vacuous: known edges are found (also inside functions)."""
    assert "mmpipe.checkpoint" in GRAPH["mmpipe.train"]
    assert "mmpipe.tracking" in GRAPH["mmpipe.pipeline"]  # a function-level import
    assert "mmpipe.predict" in GRAPH["mmpipe.tracking.models"]


def _reach(name: str) -> set[str]:
    """Every repository module ``name`` imports, directly or through others (lazily too)."""
    seen, todo = set(), [name]
    while todo:
        for dep in GRAPH[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_data_loader_and_the_manifest_do_not_import_the_model():
    """Reading shards needs no model: the loader and the manifest sit below the model package
    and the checkpoints (which rebuild models), so a change there never reaches data.py."""
    for reader in ("mmpipe.data", "mmpipe.manifest"):
        reached = _reach(reader)
        model = sorted(m for m in reached if m == "mmpipe.model" or m.startswith("mmpipe.model."))
        assert model == [] and "mmpipe.checkpoint" not in reached, (reader, model)
    assert "mmpipe.manifest" in _reach("mmpipe.data")  # the walk sees data.py's imports
