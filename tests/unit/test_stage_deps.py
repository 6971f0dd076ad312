"""Each stage's declared code (``layout.STAGES[...].code``, the ``dvc.yaml`` deps) covers every
mmpipe module its driver runs: a module left out would change the stage's output without
``dvc repro`` or the flow's cache noticing.

What a stage runs is read from the source. Its driver is its functions in ``mmpipe/pipeline.py``
(``run_data_stage`` + its ``_DATA_FUNCTIONS`` entry, or ``stage_<name>``) and the pipeline
functions they call; their imports, at module level (the names they use) or inside the function,
are the roots. The closure then follows every import of every module, imports inside functions
(lazy imports) included, and the packages each module sits in (their ``__init__`` runs first).
"""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

from mmpipe import pipeline
from mmpipe.layout import STAGES
from tests.imports import MODULES, REPO, imports, parse

PIPELINE = "mmpipe.pipeline"
TREE = parse(PIPELINE)
FUNCTIONS = {n.name: n for n in TREE.body if isinstance(n, ast.FunctionDef)}
# a data stage's MLflow record under a flow (``tracking.log_stage_run``) is a log of the run, not
# its output: the files DVC and the flow's cache version do not depend on MLflow's code
RECORD_ONLY = {stage: {"mmpipe.tracking"} for stage in pipeline.DATA_STAGES}


def _top_level_names() -> dict[str, str]:
    """pipeline.py's module-level imported names -> the mmpipe module each comes from."""
    names: dict[str, str] = {}
    for node in TREE.body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            for alias in node.names:  # one name at a time: `from mmpipe import lock, signals`
                (module,) = imports(PIPELINE, [type(node)(**{**vars(node), "names": [alias]})])
                names[alias.asname or alias.name.split(".")[0]] = module
    return names


def _reach(start: list[str], step: Callable[[str], list[str]]) -> set[str]:
    """Everything reachable from ``start`` by ``step`` (a worklist walk)."""
    todo, seen = list(start), set()
    while todo:
        item = todo.pop()
        if item not in seen:
            seen.add(item)
            todo += step(item)
    return seen


def driver_functions(stage: str) -> set[str]:
    """The pipeline.py functions that run ``stage``: its entry points and what they call."""
    if stage in pipeline.DATA_STAGES:
        todo = ["run_data_stage", pipeline._DATA_FUNCTIONS[stage].__name__]
    else:
        todo = [f"stage_{stage}"]

    def calls(name: str) -> list[str]:
        used = {n.id for n in ast.walk(FUNCTIONS[name]) if isinstance(n, ast.Name)}
        return [n for n in used if n in FUNCTIONS and FUNCTIONS[n] is not FUNCTIONS.get(name)]

    return _reach(todo, calls)


def driver_imports(stage: str) -> set[str]:
    """The mmpipe modules the driver of ``stage`` imports (the closure's roots)."""
    functions = [FUNCTIONS[f] for f in driver_functions(stage)]
    top = _top_level_names()
    used = {n.id for f in functions for n in ast.walk(f) if isinstance(n, ast.Name)}
    roots = {top[n] for n in used if n in top} | imports(PIPELINE, functions)
    return {m for m in roots if m in MODULES} - RECORD_ONLY.get(stage, set())


def _with_packages(module: str) -> set[str]:
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & set(MODULES)


def import_closure(stage: str) -> set[str]:
    """Every mmpipe module the stage runs, pipeline.py (its driver) included."""

    def step(module: str) -> list[str]:
        nxt = [m for m in _with_packages(module) if m != module]
        if module != PIPELINE:  # pipeline.py's own imports count only where a driver uses them
            nxt += [m for found in imports(module) for m in _with_packages(found)]
        return nxt

    seen = _reach([PIPELINE, *driver_imports(stage)], step)
    return {m for m in seen if m.startswith("mmpipe")}


def _declared(stage: str, module: str) -> bool:
    """``module``'s file is one of the stage's code deps or inside a directory that is."""
    path = MODULES[module].relative_to(REPO)
    return any(Path(d) == path or Path(d) in path.parents for d in STAGES[stage].code)


@pytest.mark.parametrize("stage", list(STAGES))
def test_stage_code_covers_its_import_closure(stage):
    missing = sorted(
        str(MODULES[m].relative_to(REPO)) for m in import_closure(stage) if not _declared(stage, m)
    )
    assert missing == [], f"add to STAGES[{stage!r}].code and dvc.yaml: {missing}"


def test_the_closure_sees_lazy_and_relative_imports():
    """Not vacuous: known edges are found, lazy ones included, and records are left out."""
    assert {"run_data_stage", "_shard", "stage_fingerprint"} <= driver_functions("shard")
    assert "_ingest" not in driver_functions("shard")
    shard = import_closure("shard")
    assert {"mmpipe.align", "mmpipe.ingest"} <= shard  # imported inside shard.py's functions
    assert {"mmpipe.config", "mmpipe.storage", "mmpipe.parallel", "mmpipe"} <= shard
    assert "mmpipe.tracking" not in import_closure("ingest")
    assert "mmpipe.evaluate" in import_closure("register")  # through score_on_test_split
    assert "mmpipe.augment" in import_closure("train")  # data.py's online augmentation
    assert "mmpipe.model.features" in import_closure("train")  # a package's relative imports
