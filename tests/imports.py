"""The imports of the repository's own modules, read from the source (no module is imported).

    MODULES                       dotted name -> file, for mmpipe, tasks and flows
    imports(name)                 every module ``name`` imports, at top level or in a function
    imports(name, nodes)          the same, within some of its AST nodes (one function)

Used by the layering test (tests/unit/test_architecture.py) and the stage dependency test
(tests/unit/test_stage_deps.py).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("mmpipe", "tasks", "flows")


def module_name(path: Path) -> str:
    """``mmpipe/model/image.py`` -> ``mmpipe.model.image``; a package's ``__init__`` -> its name."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {
    module_name(path): path for pkg in PACKAGES for path in sorted((REPO / pkg).rglob("*.py"))
}


def parse(name: str) -> ast.Module:
    return ast.parse(MODULES[name].read_text())


def imports(name: str, nodes: Iterable[ast.AST] | None = None) -> set[str]:
    """Every module ``name`` imports within ``nodes`` (default: the whole module, imports inside
    functions included), as dotted names; relative imports resolved."""
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in nodes if nodes is not None else [parse(name)]:
        for sub in ast.walk(node):
            if isinstance(sub, ast.Import):
                found.update(alias.name for alias in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                base = sub.module or ""
                if sub.level:  # relative import
                    parts = package.split(".")
                    base = ".".join([*parts[: len(parts) - sub.level + 1], base]).rstrip(".")
                for alias in sub.names:  # `from mmpipe import tracking` imports a module
                    full = f"{base}.{alias.name}"
                    found.add(full if full in MODULES else base)
    return found
