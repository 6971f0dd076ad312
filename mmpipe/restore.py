"""`mmpipe restore`: `dvc checkout` that deletes nothing it cannot bring back.

`dvc checkout` makes every output match the hash `dvc.lock` names for it; when that hash is in no
cache (the output was made on another machine, or by an older lock than the code), it deletes
the workspace copy first and then fails on it (DVC 3.67, `persist: true` outputs included), so
a restore to such a lock loses `data/shards` that nothing can bring back but a re-run.

``restore`` asks `dvc status` first, which reports those outputs as ``not in cache``, and refuses
in one line naming them and what to run (`dvc pull` from a remote, or `dvc repro`), having changed
nothing; otherwise it runs `dvc checkout`. The git half of a restore (`git checkout <rev>`, or
`git checkout -- params.yaml dvc.lock reports/`) only touches files git tracks, so it never
deletes an output (docs/restore.md).

The run record (``reports/run.json``, ``report.md``, ``report.html``: date, commit, timings,
MLflow runs) is not a DVC output, since it differs on every run; after the checkout ``restore``
rewrites it from the restored evaluate outputs and the restored params.yaml, so no file still
describes the run that was there before. Each night's own record is on its MLflow parent run.

DVC is run as a command (``python -m dvc``), never imported: mmpipe stays a plain library.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from mmpipe.errors import InputError

NOT_IN_CACHE = "not in cache"


def unrestorable(status: dict[str, Any]) -> dict[str, list[str]]:
    """Per stage, the outputs that `dvc status --json` says are in no cache."""
    missing: dict[str, list[str]] = {}
    for stage, changes in status.items():
        for change in changes if isinstance(changes, list) else []:
            if not isinstance(change, dict):  # "always changed" and the like
                continue
            outs = change.get("changed outs", {})
            names = [out for out, state in outs.items() if state == NOT_IN_CACHE]
            if names:
                missing.setdefault(stage, []).extend(names)
    return missing


def refusal(missing: dict[str, list[str]]) -> str:
    """The one line that names what cannot be restored and what to run instead."""
    outs = ", ".join(f"{out} ({stage})" for stage, names in missing.items() for out in names)
    stages = " ".join(s.rpartition(":")[2] for s in missing)
    return (
        f"dvc.lock names outputs that are in no cache here: {outs}; `dvc checkout` would delete "
        f"their workspace copies and fail, so nothing was changed. Get them with `dvc pull` "
        f"(from a remote) or re-make them with `dvc repro {stages}`"
    )


def _dvc(root: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True
    )
    if proc.returncode != 0:
        text = " ".join((proc.stderr or proc.stdout).split()) or "no output"
        raise InputError(f"`dvc {' '.join(args)}` failed in {root}: {text[:500]}")
    return proc.stdout


def restore(root: Path) -> dict[str, Any]:
    """Check out the outputs ``root``'s dvc.lock names, or refuse (InputError) when any of them
    is in no cache; returns what `dvc checkout` changed."""
    missing = unrestorable(json.loads(_dvc(root, "status", "--json") or "{}"))
    if missing:
        raise InputError(refusal(missing))
    changed = [line.strip() for line in _dvc(root, "checkout").splitlines() if line.strip()]
    return {"project": str(root.resolve()), "checked_out": changed, "report": rewrite_record(root)}


def rewrite_record(root: Path) -> dict[str, str] | None:
    """The run record and the morning report made again from the restored outputs (None: the
    project has no evaluate outputs to describe)."""
    from mmpipe.config import load_params
    from mmpipe.layout import Layout
    from mmpipe.publish import stage_report

    layout = Layout(root)
    if not (layout.eval_dir / "evaluation_report.json").is_file():
        return None
    params = load_params(root / "params.yaml" if (root / "params.yaml").is_file() else None)
    return stage_report(params, layout, origin="mmpipe restore")
