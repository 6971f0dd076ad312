"""executor: dask — ingest and shard on a dask.distributed cluster give the process pool's bytes.

One LocalCluster of 2 worker processes serves the module (started once: ~seconds); the ingest
test instead lets the stage start its own LocalCluster (``address: null``), the path a laptop
user takes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mmpipe.align import run_align
from mmpipe.config import AlignParams, IngestParams, ShardParams, SyntheticParams
from mmpipe.errors import InputError
from mmpipe.faults import ENV as FAULT_ENV
from mmpipe.ingest import run_ingest
from mmpipe.shard import run_shard
from mmpipe.synthetic import generate

distributed = pytest.importorskip("distributed")

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture(scope="module")
def cluster():
    """2 worker processes on 127.0.0.1, no dashboard; stopped after the module. Its nannies set
    their workers' environment (OMP_NUM_THREADS=1, ...) in this process: restored afterwards,
    or later tests' training runs with other numerics."""
    saved = os.environ.copy()
    try:
        with distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None,
        ) as c:  # fmt: skip
            yield c
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A folder collection: generated images + captions.csv, a PNG named .jpg, a corrupt file."""
    root = tmp_path_factory.mktemp("source")
    generate(root, SyntheticParams(n_images=48, captions_per_image=2, image_size=32), workers=1)
    images = sorted((root / "images").iterdir())
    (images[3]).write_bytes((images[3]).read_bytes()[:200])  # truncated: a reject
    lines = (root / "captions.csv").read_text().splitlines()
    missing = "images/nope.jpg," + lines[-1].split(",", 1)[1]  # an image that does not exist
    (root / "captions.csv").write_text("\n".join([*lines, missing]) + "\n")
    return root


@pytest.fixture(scope="module")
def aligned(source, tmp_path_factory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("aligned")
    run_ingest(IngestParams(source="folder", root=str(source), workers=1), work / "ingest")
    run_align(work / "ingest", AlignParams(), work / "align")
    return work / "align", work / "ingest"


def _same_files(a: Path, b: Path, names: list[str]) -> None:
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _same_dirs(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir()) and "manifest.json" in names
    _same_files(a, b, names)


def _shard(aligned, out: Path, **kw) -> dict:
    params = {"image_size": 16, "copies": 2, "maxcount": 9, **kw}
    return run_shard(aligned[0], aligned[1], ShardParams(**params), out)


def test_ingest_on_a_local_cluster_equals_the_process_pool(source, tmp_path):
    common = {"source": "folder", "root": str(source), "workers": 2}
    pool = run_ingest(IngestParams(**common), tmp_path / "pool")
    env = os.environ.copy()
    dask = run_ingest(IngestParams(**common, executor="dask"), tmp_path / "dask")
    # the stage's own LocalCluster leaves this process's environment as it found it (its
    # nannies set OMP_NUM_THREADS=1, PYTHONHASHSEED, ... here for their workers)
    assert os.environ == env
    for kind in ("images", "captions"):
        assert pool[kind]["rejected"] > 0 and dask[kind] == pool[kind]
    names = ["images.parquet", "records.parquet", "rejects.jsonl"]
    _same_files(tmp_path / "pool", tmp_path / "dask", names)


def test_shard_on_two_dask_workers_is_byte_identical(aligned, cluster, tmp_path):
    pool = _shard(aligned, tmp_path / "pool", workers=2)
    dask = _shard(aligned, tmp_path / "dask", executor="dask", address=cluster.scheduler_address)
    assert pool["shards"] > 3 and dask["samples"] == pool["samples"]
    _same_dirs(tmp_path / "pool", tmp_path / "dask")


def test_an_image_gone_since_ingest_is_the_same_input_error(cluster, tmp_path):
    root = tmp_path / "src"
    generate(root, SyntheticParams(n_images=8, captions_per_image=1, image_size=16), workers=1)
    run_ingest(IngestParams(source="folder", root=str(root), workers=1), tmp_path / "ingest")
    run_align(tmp_path / "ingest", AlignParams(), tmp_path / "align")
    gone = sorted((root / "images").iterdir())[5]
    gone.unlink()
    aligned = (tmp_path / "align", tmp_path / "ingest")
    with pytest.raises(InputError, match=f"{gone.name}: image file not found"):
        _shard(aligned, tmp_path / "out", executor="dask", address=cluster.scheduler_address)


def _arm_fault(spec: str) -> None:
    os.environ[FAULT_ENV] = spec  # this worker process only: its replacement starts clean


def test_workers_killed_mid_shard_lose_and_duplicate_nothing(aligned, cluster, tmp_path):
    """Every worker is SIGKILLed at the first chunk it runs (which worker gets one of the few
    chunks is up to the scheduler); the nannies start replacements with no fault armed."""
    pool = _shard(aligned, tmp_path / "pool", workers=1)
    with distributed.Client(cluster, set_as_default=False) as client:
        before = set(client.scheduler_info()["workers"])
        client.run(_arm_fault, "dask:chunk:1")
        dask = _shard(
            aligned, tmp_path / "dask", executor="dask", address=cluster.scheduler_address
        )
        client.wait_for_workers(2, timeout=60)
        after = set(client.scheduler_info()["workers"])
        client.run(os.environ.pop, FAULT_ENV, None)  # a worker that got no chunk
    assert len(before - after) >= 1  # at least one worker died mid-stage (each dies once)
    assert dask["samples"] == pool["samples"]
    _same_dirs(tmp_path / "pool", tmp_path / "dask")
