"""Smoke runs of the benchmark scripts: each runs end to end on tiny N and writes a coherent JSON.

They check the scripts, not this machine (figures at smoke size mean nothing); the real run is
``make bench``. Each script runs as a subprocess, the way ``python -m benchmarks`` runs it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow

FAST = [
    "ingest_shard", "loader", "memory", "growth", "train", "ui", "object_store", "dask",
    "incremental", "models", "feature_cache", "limits", "frozen_heads",
]  # fmt: skip


def run_bench(name: str, out: Path, tmp: Path) -> dict:
    env = dict(os.environ, PREFECT_HOME=str(tmp / "prefect"), TQDM_DISABLE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", f"benchmarks.bench_{name}", "--smoke", "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["name"] == name and payload["mode"] == "smoke"
    assert payload["machine"]["cores"] >= 1
    assert payload["figures"], "a benchmark must report figures"
    for f in payload["figures"]:
        assert set(f) >= {"figure", "value", "unit", "ratio", "target", "met", "note"}
        # a figure with a target says whether it was met
        assert (f["target"] is None) == (f["met"] is None), f
    return payload


@pytest.mark.parametrize("name", FAST)
def test_benchmark_script_smoke(name: str, tmp_path: Path) -> None:
    payload = run_bench(name, tmp_path / "out", tmp_path)
    values = {f["figure"]: f["value"] for f in payload["figures"]}
    if name == "ingest_shard":
        # the pipeline wrote one sample per image, as the raw loop did
        s = payload["data"]["samples"]
        assert s["shard"] == s["n_images"] == s["ingest_accepted"]
    elif name == "dask":
        # the 2-worker cluster wrote the process pool's bytes, also on its own LocalCluster
        assert payload["data"]["identical"] is True and payload["data"]["samples"] == 40
    elif name == "frozen_heads":  # every variant scored, on the real photos' held-out split
        assert set(payload["data"]["results"]) >= {
            "linear heads (real_retrieval's frozen row)",
            "kNN caption transfer (k=10)",
        } and all(0 <= r["i2t R@1"] <= 1 for r in payload["data"]["results"].values())
    elif name == "loader":
        assert len(set(payload["data"]["counts"].values())) == 1
    elif name == "memory":
        assert {r["stage"] for r in payload["data"]["runs"]} == {"ingest", "align", "shard"}
        assert all(r["main_peak_mib"] > 0 for r in payload["data"]["runs"])
    elif name == "growth":
        assert [r["n"] for r in payload["data"]["rows"]] == payload["conditions"]["sizes"]
    elif name == "train":
        assert not payload["data"]["errors"], payload["data"]["errors"]
        assert all(v > 0 for v in values.values())
    elif name == "models":  # every family trained and scored; ITM only for the token-level
        rows = payload["data"]["rows"]
        assert len(rows) == 4 and all(r["samples_per_s"] > 0 for r in rows)
        assert [r["itm_accuracy"] is not None for r in rows] == [False, False, True, True]
    elif name == "ui":  # both servers came up and were measured
        assert all(v > 0 for v in values.values())
    elif name == "incremental":  # only the new images decoded, the from-scratch bytes
        assert payload["data"]["identical"] is True
        assert payload["data"]["image_checks"] == {"checked": 4, "reused": 40}
    elif name == "limits":  # every stage and its bare loop did the same samples, CPU counted
        counts = payload["data"]["counts"]
        for mine, bare in (("train", "train_bare"), ("loader_w0", "loader_raw"),
                           ("embed", "embed_bare")):  # fmt: skip
            assert counts[mine] == counts[bare] and counts[mine][0] > 0
        assert all(min(r["cpu"]) > 0 for r in payload["data"]["runs"].values())
        assert {f["ratio"] is not None for f in payload["figures"]} == {True}
    elif name == "object_store":  # the same epoch from the S3 server and from disk
        assert set(payload["data"]["best_seconds"]) == {"local", "s3"}
        assert all(v > 0 for v in values.values())


def test_orchestration_benchmark_smoke(tmp_path: Path) -> None:
    payload = run_bench("orchestration", tmp_path / "out", tmp_path)
    assert payload["data"]["flow_stage_status"]
    assert payload["data"]["dvc"]["noop_said_up_to_date"]


def test_summary_table_from_payloads(tmp_path: Path) -> None:
    from benchmarks.__main__ import markdown

    payload = {
        "name": "x",
        "mode": "smoke",
        "command": "python -m benchmarks.bench_x",
        "seconds": 1.0,
        "finished_at": "now",
        "figures": [
            {
                "figure": "f",
                "value": 2.0,
                "unit": "x",
                "ratio": 0.5,
                "target": ">= 0.8",
                "met": False,
                "note": "",
            }
        ],
    }
    table = markdown([payload])
    assert "| x | f | 2 x | 0.5 | >= 0.8 | **no** |" in table
    assert "`python -m benchmarks.bench_x`" in table


def test_real_retrieval_benchmark_smoke(tmp_path: Path) -> None:
    """The real-photo benchmark end to end on 60 Flickr8k photos: the split, both rows trained
    through `mmpipe run` and scored by `mmpipe eval-retrieval`, the table."""
    env = dict(os.environ, PREFECT_HOME=str(tmp_path / "prefect"), TQDM_DISABLE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "benchmarks.real_retrieval", "--smoke", "--work-dir",
           str(tmp_path / "work"), "--out-dir", str(tmp_path / "out")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((tmp_path / "out" / "real_retrieval.json").read_text())
    assert payload["mode"] == "smoke" and payload["train_images"] == 40
    for row in payload["rows"].values():
        assert row["scores"]["images"] == 20 and row["scores"]["captions"] == 100
        assert 0.0 <= row["scores"]["i2t"]["R@1"] <= 1.0 and row["train_minutes"] is not None
    assert "the recipe" in payload["table"]
