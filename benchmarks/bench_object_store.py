"""Loader samples/s reading shards from an S3 server vs from local disk (the same shards).

The shards are written by the pipeline (synthetic N images, one caption each), then published to
a local S3 server (moto on 127.0.0.1, tests/servers.py) with ``storage.publish_shards``; one
loader epoch (``create_dataloader``, num_workers=0) over the URL and over the local directory,
interleaved, best of each side kept. The local S3 server stands in for a real store: it measures
what fsspec/s3fs and the per-object checks add, not a network (reported, no target).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "object_store"


def loader_epoch(source: str | Path, batch_size: int) -> int:
    """One epoch of the train split; samples seen."""
    from mmpipe.data import create_dataloader

    return sum(len(b["label"]) for b in create_dataloader(source, "train", batch_size))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    n = c.pick(args, 80, 1500, 5000)
    batch, repeats = 128, c.pick(args, 1, 2, 3)

    from mmpipe.manifest import read_manifest
    from mmpipe.shard import run_shard
    from mmpipe.storage import publish_shards
    from tests.servers import start_s3

    with c.workdir(args, NAME) as work, start_s3(work) as s3:
        os.environ.update(s3.env)  # this process is the S3 client (credentials are moto's)
        src = c.synthetic_source(work / "source", n, 96)
        ingest_dir, align_dir, _ = c.ingest_align(src, work, workers=2)
        shard_dir = work / "shards"
        params = c.shard_params(64, workers=2, maxcount=500)
        run_shard(align_dir, ingest_dir, params, shard_dir)
        url = s3.url("bench", "shards")
        t0 = time.perf_counter()
        publish_shards(shard_dir, url)
        publish_s = time.perf_counter() - t0
        manifest = read_manifest(shard_dir)
        train_count = manifest.count("train")
        mib = sum(s.bytes or 0 for s in manifest.splits["train"].shards) / 2**20
        fns = {
            "local": lambda: loader_epoch(shard_dir, batch),
            "s3": lambda: loader_epoch(url, batch),
        }
        best, all_times, results = c.interleaved(fns, repeats)

    assert set(results.values()) == {train_count}, results
    rate = {k: train_count / v for k, v in best.items()}
    ratio = rate["s3"] / rate["local"]
    figures = [
        c.figure("create_dataloader from local disk", rate["local"], "samples/s"),
        c.figure(
            "create_dataloader from the local S3 server (s3://)",
            rate["s3"],
            "samples/s",
            ratio=ratio,
            note="ratio = S3 / local disk, same shards, num_workers=0",
        ),
        c.figure("publish_shards (all splits) to the local S3 server", publish_s, "s"),
    ]
    conditions = {
        "n_images": n,
        "train_samples": train_count,
        "train_shard_mib": round(mib, 2),
        "batch_size": batch,
        "repeats": repeats,
        "store": "moto_server on 127.0.0.1 (one process), s3fs",
    }
    data = {"best_seconds": best, "all_seconds": all_times}
    return c.finish(NAME, args, argv, figures, conditions, data, started)


if __name__ == "__main__":
    main(sys.argv[1:])
