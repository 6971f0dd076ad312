"""Shard on a 2-worker Dask LocalCluster vs the process pool with 2 workers (executor: dask).

Source: N synthetic JPEGs, one caption each, ingested + aligned once; shard.copies=0 (one sample
per image). The cluster is started once and reached by ``shard.address`` (how a team runs it:
the scheduler outlives the stage); its start-up is reported on its own, as is one run with
``address: null`` (the stage starts and stops its own LocalCluster). Each side runs once untimed
first (the forkserver's start, the cluster workers' imports: once per process, not per run),
then ``repeats`` times, interleaved, best kept; every output must be byte-identical.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "dask"


def _same_bytes(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir())
    if names != sorted(p.name for p in b.iterdir()):
        return False
    return all((a / n).read_bytes() == (b / n).read_bytes() for n in names)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    n = c.pick(args, 40, 400, 1200)
    source_size, stored = c.pick(args, 64, 320, 320), c.pick(args, 48, 256, 256)
    repeats = c.pick(args, 1, 2, 3)

    from distributed import LocalCluster

    from mmpipe.shard import run_shard

    with c.workdir(args, NAME) as work:
        src = c.synthetic_source(work / "source", n, source_size)
        ingest_dir, align_dir, _ = c.ingest_align(src, work)

        def shard(out: str, **kw: Any):
            def run() -> dict[str, Any]:
                shutil.rmtree(work / out, ignore_errors=True)
                p = c.shard_params(stored, 2, **kw)
                return run_shard(align_dir, ingest_dir, p, work / out)

            return run

        t0 = time.perf_counter()
        cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, host="127.0.0.1", dashboard_address=None
        )
        start_seconds = time.perf_counter() - t0
        with cluster:
            sides = {
                "pool_w2": shard("pool"),
                "dask_w2": shard("dask", executor="dask", address=cluster.scheduler_address),
            }
            c.interleaved(sides, 1)  # warm-up
            best, all_times, results = c.interleaved(sides, repeats)
        identical = _same_bytes(work / "pool", work / "dask")
        t0 = time.perf_counter()
        shard("own", executor="dask")()
        own_seconds = time.perf_counter() - t0
        identical = identical and _same_bytes(work / "pool", work / "own")
        samples = results["pool_w2"]["samples"]
        assert samples == n == results["dask_w2"]["samples"], (samples, n)

    ratio = best["pool_w2"] / best["dask_w2"]  # = dask rate / pool rate
    figures = [
        c.figure("shard, process pool, 2 workers", n / best["pool_w2"], "img/s"),
        c.figure(
            "shard, Dask LocalCluster, 2 workers",
            n / best["dask_w2"],
            "img/s",
            ratio=ratio,
            target="ratio >= 0.9 of the pool",
            met=ratio >= 0.9,
            note="cluster already running (shard.address)",
        ),
        c.figure(
            "byte-identical shards + manifest",
            float(identical),
            "bool",
            target="1",
            met=identical,
        ),
        c.figure("LocalCluster start (2 workers)", start_seconds, "s"),
        c.figure(
            "shard, Dask, own LocalCluster (address: null)",
            n / own_seconds,
            "img/s",
            ratio=best["pool_w2"] / own_seconds,
            note="includes starting and stopping the cluster",
        ),
    ]
    conditions = {
        "n_images": n,
        "source_size": source_size,
        "stored_size": stored,
        "shard_copies": 0,
        "workers": 2,
        "threads_per_worker": 1,
        "repeats_interleaved": repeats,
        "kept": "best of repeats",
    }
    data = {
        "best_seconds": {k: round(v, 4) for k, v in best.items()},
        "all_seconds": {k: [round(x, 4) for x in v] for k, v in all_times.items()},
        "cluster_start_seconds": round(start_seconds, 3),
        "own_cluster_seconds": round(own_seconds, 3),
        "samples": samples,
        "identical": identical,
        "ratios": {"dask_vs_pool": round(ratio, 4)},
    }
    return c.finish(NAME, args, argv, figures, conditions, data, started)


if __name__ == "__main__":
    main(sys.argv[1:])
