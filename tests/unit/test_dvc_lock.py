"""The committed dvc.lock vouches for the code and params in git: a stale lock fails CI.

A lock older than the code makes a fresh clone dirty after `make run` (`M dvc.lock`) and names
output hashes that are in no cache, so a restore (`git checkout -- dvc.lock && dvc checkout`)
fails. `dvc status` on a copy of the files git tracks (no data, no cache) compares the lock's
code and params entries with them; the data entries are absent there and ignored.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_DATA = ("data/", "models", "reports/")  # outputs of stages: not in a clone, not compared here


def _git_files() -> list[str]:
    proc = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True, check=True
    )
    return [f for f in proc.stdout.split("\0") if f and (REPO / f).is_file()]


def stale_entries(status: dict) -> dict[str, list[str]]:
    """Per stage, the code deps and params that `dvc status --json` says differ from the lock."""
    stale: dict[str, list[str]] = {}
    for stage, changes in status.items():
        for change in changes:
            if not isinstance(change, dict):  # "always changed" and the like: not a lock entry
                continue
            deps = change.get("changed deps", {})
            names = [f"{p}: {s}" for p, s in deps.items() if not p.startswith(_DATA)]
            for file, keys in change.get("changed params", {}).items():
                names += [f"{file}:{k}: {s}" for k, s in keys.items()]
            if names:
                stale.setdefault(stage, []).extend(names)
    return stale


def test_stale_entries_names_code_and_params_but_not_data():
    status = {
        "shard": [
            {
                "changed deps": {
                    "mmpipe/shard.py": "modified",
                    "data/align/pairs.parquet": "deleted",
                }
            },
            {"changed outs": {"data/shards": "not in cache"}},
        ],
        "train": [{"changed params": {"params.yaml": {"train.epochs": "modified"}}}],
        "evaluate": [{"changed deps": {"models": "deleted"}}],
    }
    assert stale_entries(status) == {
        "shard": ["mmpipe/shard.py: modified"],
        "train": ["params.yaml:train.epochs: modified"],
    }


def test_committed_lock_matches_the_code_and_params_in_git(tmp_path):
    for name in _git_files():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, tmp_path / name)
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stale = stale_entries(json.loads(proc.stdout or "{}"))
    assert not stale, (
        f"dvc.lock is older than the code or params in git: {stale}; regenerate it with a "
        "default run on a fresh clone (`make run`) and commit dvc.lock"
    )
