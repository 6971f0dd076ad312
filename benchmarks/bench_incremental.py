"""Incremental ingest: a collection grown by 10 % ingested with the previous night's image checks
(``incremental.CheckCache``) vs from scratch, side by side on the same files.

Night 1 ingests N synthetic JPEGs (its check cache is kept); night 2 adds N/10 more. Both sides
ingest night 2's folder (folder source, workers=2): "scratch" without a cache, "incremental"
with a copy of night 1's cache (restored before every repeat, so each repeat decodes exactly the
new images). Interleaved, best of each side. Target: incremental >= 1.5x faster (every file is
still read and hashed: only the decode is saved). Outputs are compared byte for byte.
"""

from __future__ import annotations

import csv
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "incremental"
TARGET = 1.5
OUTPUTS = ("records.parquet", "images.parquet", "rejects.jsonl", "report.json")


def night_one(src: Path, dest: Path, n: int) -> Path:
    """A copy of ``src`` holding its first ``n`` caption rows and only their images."""
    with (src / "captions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    kept = rows[:n]
    for row in kept:
        target = dest / row["image"]
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src / row["image"], target)
    with (dest / "captions.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(kept)
    return dest


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    n = c.pick(args, 40, 600, 2000)
    size = c.pick(args, 64, 256, 256)
    repeats = c.pick(args, 1, 2, 3)
    workers = 2

    from mmpipe.incremental import CHECKS
    from mmpipe.ingest import run_ingest

    with c.workdir(args, NAME) as work:
        grown = c.synthetic_source(work / "grown", n + n // 10, size)
        first = night_one(grown, work / "first", n)
        saved = work / "night1" / CHECKS
        run_ingest(c.folder_ingest_params(first, workers), work / "night1" / "out", saved)
        cache = work / "night2" / CHECKS
        cache.parent.mkdir()

        def scratch() -> dict[str, Any]:
            return run_ingest(c.folder_ingest_params(grown, workers), work / "scratch")

        def incremental() -> dict[str, Any]:
            shutil.copy2(saved, cache)  # night 1's checks, as the night starts
            return run_ingest(c.folder_ingest_params(grown, workers), work / "incr", cache)

        best, times, results = c.interleaved(
            {"scratch": scratch, "incremental": incremental}, repeats
        )
        identical = all(
            (work / "scratch" / f).read_bytes() == (work / "incr" / f).read_bytes() for f in OUTPUTS
        )
    ratio = best["scratch"] / best["incremental"]
    checks = results["incremental"]["image_checks"]
    figures = [
        c.figure(
            "ingest of a 10 % grown collection: incremental vs from scratch",
            ratio,
            "x faster",
            ratio=ratio,
            target=f">= {TARGET}",
            met=ratio >= TARGET and identical,
            note=f"{best['incremental']:.2f}s vs {best['scratch']:.2f}s; decoded "
            f"{checks['checked']}, reused {checks['reused']}; outputs identical: {identical}",
        )
    ]
    conditions = {
        "n_night1": n,
        "n_night2": n + n // 10,
        "image_size": size,
        "workers": workers,
        "repeats": repeats,
    }
    data = {"best_seconds": best, "seconds": times, "image_checks": checks, "identical": identical}
    return c.finish(NAME, args, argv, figures, conditions, data, started)


if __name__ == "__main__":
    main(sys.argv[1:])
