"""Peak RSS of ingest, align and shard at growing N: streaming stages must stay flat.

Target: per-image peak-RSS slope <= 0.1 KB/image (100 B) for each stage between the
smallest and the largest N (full: 10k -> 200k). ``--sizes 1000000 --source-size 16`` is the
recorded 1M-image run (peak RSS and wall time per stage).

Each (stage, N) runs in a fresh ``python -m benchmarks.bench_memory --child`` subprocess, so
imports and allocator state never carry over. Two peaks per run:
  * main: ru_maxrss of the stage's own process (exact, kernel-kept);
  * tree: the largest sum of RSS over the process and all its descendants (pool workers,
    the shard forkserver), sampled every 20 ms with psutil (can miss a very short spike).
Source: synthetic JPEGs at 64 px, one caption each (small, to keep 100k images to minutes; the
per-image memory that matters here is bookkeeping, not pixels). shard.image_size=64, copies=0,
default workers (2) everywhere (1 in --smoke). The tree figure sums RSS, so pages shared
between the forked processes are counted once per process (an upper bound).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "memory"
SLOPE_TARGET = 100  # bytes of peak RSS per extra image


def _tree_sampler(stop: threading.Event, peak: list[int]) -> None:
    import psutil

    me = psutil.Process()
    while not stop.is_set():
        total = 0
        try:
            procs = [me, *me.children(recursive=True)]
        except psutil.Error:
            procs = [me]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        peak[0] = max(peak[0], total)
        stop.wait(0.02)


def child(stage: str, src: Path, work: Path, workers: int) -> dict[str, Any]:
    """Run one stage in this (fresh) process and measure it."""
    from mmpipe.config import AlignParams

    peak = [0]
    stop = threading.Event()
    sampler = threading.Thread(target=_tree_sampler, args=(stop, peak), daemon=True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    sampler.start()
    t0 = time.perf_counter()
    if stage == "ingest":
        from mmpipe.ingest import run_ingest

        report = run_ingest(c.folder_ingest_params(src, workers=workers), work / "ingest")
        count = report["images"]["accepted"]
    elif stage == "align":
        from mmpipe.align import run_align

        count = run_align(work / "ingest", AlignParams(), work / "align")["pairs"]
    else:
        from mmpipe.shard import run_shard

        p = c.shard_params(64, workers=workers)
        count = run_shard(work / "align", work / "ingest", p, work / "shards")["samples"]
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    return {
        "stage": stage,
        "count": count,
        "seconds": round(seconds, 3),
        "main_peak_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "main_after_imports_mib": round(base / 1024, 1),
        "tree_peak_mib": round(peak[0] / 2**20, 1),
    }


def run_child(stage: str, src: Path, work: Path, workers: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--child", stage, str(src), str(work)]
    cmd.append(str(workers))
    out = subprocess.run(
        cmd, check=True, capture_output=True, text=True, cwd=c.REPO, env=dict(os.environ)
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    if argv and argv[0] == "--child":
        print(json.dumps(child(argv[1], Path(argv[2]), Path(argv[3]), int(argv[4]))))
        return {}
    started = time.perf_counter()
    ap = c.parser(NAME, __doc__)
    ap.add_argument("--sizes", default="", help="comma-separated N (overrides the mode's sizes)")
    ap.add_argument("--source-size", type=int, default=64, help="side of the synthetic JPEGs")
    args = ap.parse_args(argv)
    sizes = c.pick(args, [40, 80], [10000, 50000], [10000, 200000])
    if args.sizes:
        sizes = [int(x) for x in args.sizes.split(",")]
    workers = c.pick(args, 1, 2, 2)  # smoke: no pools, so it checks the script in seconds
    runs: list[dict[str, Any]] = []
    gen_seconds = {}
    with c.workdir(args, NAME) as work:
        for n in sizes:
            t0 = time.perf_counter()
            src = c.synthetic_source(work / f"source-{n}", n, args.source_size)
            gen_seconds[n] = round(time.perf_counter() - t0, 2)
            for stage in ("ingest", "align", "shard"):
                r = run_child(stage, src, work / f"run-{n}", workers)
                r["n"] = n
                runs.append(r)
                print(f"  {stage:<6} N={n:<7} {r}", flush=True)
            # free the disk between sizes (100k images are ~0.5 GB with the shards)
            if not args.keep and args.work_dir is None:
                import shutil

                shutil.rmtree(work / f"run-{n}", ignore_errors=True)
                shutil.rmtree(src, ignore_errors=True)

    lo, hi = sizes[0], sizes[-1]
    figures = []
    growth = {}
    for stage in ("ingest", "align", "shard"):
        by_n = {r["n"]: r for r in runs if r["stage"] == stage}
        for key in ("main_peak_mib", "tree_peak_mib"):
            where = "main process" if key.startswith("main") else "process tree"
            if hi == lo:  # one size (the 1M run): report the peak and the wall time
                figures.append(
                    c.figure(
                        f"{stage} peak RSS {where} at N={hi:,}",
                        by_n[hi][key],
                        "MiB",
                        note=f"wall {by_n[hi]['seconds']:.0f} s",
                    )
                )
                continue
            slope = (by_n[hi][key] - by_n[lo][key]) * 2**20 / (hi - lo)
            growth[f"{stage}.{key}"] = {
                "ratio": round(by_n[hi][key] / by_n[lo][key], 4),
                "bytes_per_image": round(slope),
            }
            figures.append(
                c.figure(
                    f"{stage} peak RSS slope, {where}, N={lo:,} -> {hi:,}",
                    slope,
                    "B/image",
                    ratio=by_n[hi][key] / by_n[lo][key],
                    target=f"<= {SLOPE_TARGET} B/image",
                    met=slope <= SLOPE_TARGET,
                    note=f"{by_n[lo][key]:.0f} -> {by_n[hi][key]:.0f} MiB",
                )
            )
    conditions = {
        "sizes": sizes,
        "source_size": args.source_size,
        "captions_per_image": 1,
        "stored_size": 64,
        "shard_copies": 0,
        "workers": workers,
        "fresh_subprocess_per_run": True,
        "tree_sampling_ms": 20,
    }
    data = {"runs": runs, "growth": growth, "generate_seconds": gen_seconds}
    return c.finish(NAME, args, argv, figures, conditions, data, started)


if __name__ == "__main__":
    main(sys.argv[1:])
