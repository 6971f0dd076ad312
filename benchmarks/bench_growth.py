"""How ingest, shard and one train epoch grow with N: fitted cost per 1k images and linearity.

For each N: synthetic JPEGs (96 px, one caption each; generation not timed), folder ingest
(workers=2), align, shard (64 px, copies=0, workers=2), one train epoch with the default model
(cnn + transformer, width 128) on CPU; the epoch time is the training pass only (validation
excluded), from the train report. Fit t = a + b*N by least squares: b is the marginal cost
(s per 1k images), a the fixed cost (imports, pools, model build), R^2 the linearity.
Target: R^2 >= 0.95 per stage (linear: no stage's per-item cost grows with N). One untimed
warm-up pipeline at the smallest N runs first, so once-per-process costs (imports, the pools'
forkserver) are not fitted as per-item cost. align takes ~0.1 s at every N here: its R^2 is noise.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks import _common as c

NAME = "growth"
R2_TARGET = 0.95


def fit(xs: list[float], ys: list[float]) -> dict[str, float]:
    """Least-squares line y = a + b x; b, a, R^2."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    b = sxy / sxx if sxx else 0.0
    a = my - b * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - a - b * x) ** 2 for x, y in zip(xs, ys, strict=True))
    return {"slope": b, "intercept": a, "r2": 1 - ss_res / ss_tot if ss_tot else 1.0}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    sizes = c.pick(args, [40, 80, 120], [500, 1000, 2000], [500, 1000, 2000, 4000])
    train_kw = c.pick(
        args, {"width": 16, "embed_dim": 16, "head_hidden": 16, "batch_size": 16}, {}, {}
    )
    workers = c.pick(args, 1, 2, 2)

    from mmpipe.align import run_align
    from mmpipe.config import AlignParams, TrainParams
    from mmpipe.ingest import run_ingest
    from mmpipe.shard import run_shard
    from mmpipe.train import run_train

    tp = TrainParams(epochs=1, device="cpu", warmup_steps=5, **train_kw)
    rows = []
    with c.workdir(args, NAME) as work:
        # untimed warm-up at the smallest N: imports, the process pools' forkserver and the first
        # model build are paid once per process and must not land on the first timed N
        warm = c.synthetic_source(work / "warm-source", sizes[0], 96)
        run_ingest(c.folder_ingest_params(warm, workers), work / "warm" / "ingest")
        run_align(work / "warm" / "ingest", AlignParams(), work / "warm" / "align")
        run_shard(
            work / "warm" / "align",
            work / "warm" / "ingest",
            c.shard_params(64, workers),
            work / "warm" / "shards",
        )
        run_train(work / "warm" / "shards", tp, work / "warm" / "model")
        for n in sizes:
            src = c.synthetic_source(work / f"source-{n}", n, 96)
            w = work / f"run-{n}"
            t0 = time.perf_counter()
            run_ingest(c.folder_ingest_params(src, workers), w / "ingest")
            t1 = time.perf_counter()
            run_align(w / "ingest", AlignParams(), w / "align")
            t2 = time.perf_counter()
            rep = run_shard(w / "align", w / "ingest", c.shard_params(64, workers), w / "shards")
            t3 = time.perf_counter()
            epochs: list[dict] = []  # the callback's rows carry the timings (not the report)
            run_train(
                w / "shards", tp, w / "model", on_epoch_end=lambda _, m, out=epochs: out.append(m)
            )
            epoch = epochs[0]
            rows.append(
                {
                    "n": n,
                    "ingest": t1 - t0,
                    "align": t2 - t1,
                    "shard": t3 - t2,
                    "train_epoch": epoch["epoch_seconds"],
                    "train_samples": rep["samples_per_split"]["train"],
                    "train_samples_per_s": epoch["samples_per_s"],
                }
            )
            print(f"  N={n}: " + ", ".join(f"{k}={v:.2f}" for k, v in rows[-1].items()), flush=True)

    figures = []
    fits = {}
    for stage in ("ingest", "align", "shard", "train_epoch"):
        xs = [r["n"] for r in rows]
        ys = [r[stage] for r in rows]
        f = fit(xs, ys)
        per_item = [y / x for x, y in zip(xs, ys, strict=True)]
        # marginal cost between the two largest N vs between the two smallest: > 1 = superlinear
        marg_hi = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
        marg_lo = (ys[1] - ys[0]) / (xs[1] - xs[0])
        fits[stage] = {
            **{k: round(v, 6) for k, v in f.items()},
            "seconds_per_1k": round(f["slope"] * 1000, 4),
            "per_item_ratio_largest_vs_smallest": round(per_item[-1] / per_item[0], 4),
            "marginal_ratio_high_vs_low": round(marg_hi / marg_lo, 4) if marg_lo > 0 else None,
        }
        figures.append(
            c.figure(
                f"{stage}: s per 1k images",
                f["slope"] * 1000,
                "s/1k",
                ratio=f["r2"],
                target=f"R^2 >= {R2_TARGET}",
                met=f["r2"] >= R2_TARGET,
                note=f"fixed {f['intercept']:.2f}s; per-item cost N={xs[-1]} vs N={xs[0]}: "
                f"{per_item[-1] / per_item[0]:.2f}x",
            )
        )
    conditions = {
        "sizes": sizes,
        "source_size": 96,
        "captions_per_image": 1,
        "stored_size": 64,
        "shard_copies": 0,
        "workers": workers,
        "train": tp.model_dump(mode="json"),
        "ratio_column": "R^2 of the linear fit",
    }
    data = {"rows": [{k: round(v, 4) for k, v in r.items()} for r in rows], "fits": fits}
    return c.finish(NAME, args, argv, figures, conditions, data, started)


if __name__ == "__main__":
    main(sys.argv[1:])
