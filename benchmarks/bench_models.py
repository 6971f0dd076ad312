"""Fusion families trained end to end on the same synthetic shards: the README's models table.

    python -m benchmarks.bench_models                  # the README's size (~15 min, 2 cores)
    python -m benchmarks.bench_models --update-readme  # ... and rewrite README's table
    python -m benchmarks.bench_models --smoke          # tiny: checks the script

Each family (pooled ``concat``, ``cross_attention_pooled``; token-level ``cross_attention``;
ViLT's ``single_stream`` over a linear patch embedding and word embeddings) is trained by
``mmpipe.train.run_train`` with the same data, epochs, batch and seed, then scored by
``mmpipe.evaluate.run_evaluate`` (no ablation). The token-level families also train image-text
matching (``train.itm_weight``) and report its accuracy on the test split's sampled negatives.
Training samples/s = train samples x epochs / run_train's wall time (validation included), on
the same machine minutes apart: compare them as ratios to ``concat``.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks import _common as c

NAME = "models"
START, END = "<!-- models:start -->", "<!-- models:end -->"
COMMAND = "python -m benchmarks.bench_models --update-readme"
ITM_WEIGHT = 0.5
FAMILIES: dict[str, dict[str, Any]] = {
    "concat (pooled, default)": {"fusion": "concat"},
    "cross_attention_pooled": {"fusion": "cross_attention_pooled"},
    "cross_attention (tokens)": {"fusion": "cross_attention", "itm_weight": ITM_WEIGHT},
    "single_stream ViLT (patch + word embedding)": {
        "fusion": "single_stream",
        "image_encoder": "patch",
        "text_encoder": "embedding",
        "itm_weight": ITM_WEIGHT,
    },  # fmt: skip
}


def train_and_score(shard_dir: Any, work: Any, name: str, kw: dict[str, Any], size: dict) -> dict:
    """One family: train, evaluate; its metrics, samples/s and parameter counts."""
    from mmpipe.checkpoint import load_model
    from mmpipe.config import EvaluateParams, TrainParams
    from mmpipe.evaluate import run_evaluate
    from mmpipe.manifest import read_manifest
    from mmpipe.model.multimodal import describe
    from mmpipe.train import run_train

    p = TrainParams(
        device="cpu", epochs=size["epochs"], batch_size=size["batch"], width=size["width"],
        head_hidden=size["width"], num_workers=0, seed=0, **kw,
    )  # fmt: skip
    models = work / "models" / kw["fusion"]
    report = run_train(shard_dir, p, models)
    samples = read_manifest(shard_dir).count("train") * size["epochs"]
    metrics = run_evaluate(
        shard_dir, models, EvaluateParams(ablation=False, batch_size=64), work / "eval" / name
    )
    model, _ = load_model(models / "best.pt")
    return {
        "family": name, "settings": kw, "accuracy": metrics.get("accuracy"),
        "macro_f1": metrics.get("macro_f1"), "accuracy_chance": metrics.get("accuracy_chance"),
        "itm_accuracy": metrics.get("itm_accuracy"), "itm_auroc": metrics.get("itm_auroc"),
        "mean_r1": metrics.get("mean_r1"), "train_seconds": report["seconds"],
        "samples_per_s": samples / report["seconds"], **describe(model),
    }  # fmt: skip


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table: quality, ITM where it applies, speed as a ratio, size."""
    base = rows[0]["samples_per_s"]
    lines = [
        "| fusion family | accuracy | macro-F1 | ITM accuracy | train samples/s | vs concat "
        "| parameters |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        itm = "—" if r["itm_accuracy"] is None else f"{r['itm_accuracy']:.3f}"
        lines.append(
            f"| {r['family']} | **{r['accuracy']:.3f}** | {r['macro_f1']:.3f} | {itm} | "
            f"{r['samples_per_s']:.1f} | {r['samples_per_s'] / base:.2f}× | "
            f"{r['parameters'] / 1e6:.2f}M |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    ap = c.parser(NAME, __doc__)
    ap.add_argument("--update-readme", action="store_true", help="rewrite README.md's table")
    args = ap.parse_args(argv)
    if args.update_readme and (args.smoke or args.quick):
        raise SystemExit("--update-readme needs the full-size run")
    n = c.pick(args, 40, 300, 800)
    size = {
        "epochs": c.pick(args, 1, 3, 6),
        "batch": c.pick(args, 16, 64, 64),
        "width": c.pick(args, 16, 128, 128),
    }
    from mmpipe.shard import run_shard

    rows = []
    with c.workdir(args, NAME) as work:
        src = c.synthetic_source(work / "source", n, 96)
        ingest_dir, align_dir, _ = c.ingest_align(src, work, workers=1)
        shard_dir = work / "shards"
        run_shard(align_dir, ingest_dir, c.shard_params(64, workers=1), shard_dir)
        for name, kw in FAMILIES.items():
            print(f"models: {name} ...", flush=True)
            rows.append(train_and_score(shard_dir, work, name, kw, size))
    table = markdown(rows)
    print(table)
    if args.update_readme:
        c.update_readme_block(START, END, table, COMMAND)
    base = rows[0]["samples_per_s"]
    figures = [
        c.figure(
            r["family"],
            r["samples_per_s"],
            "train samples/s",
            ratio=r["samples_per_s"] / base,
            note=f"accuracy {r['accuracy']:.3f}, {r['parameters'] / 1e6:.2f}M params",
        )  # fmt: skip
        for r in rows
    ]
    conditions = {
        "images": n, "captions_per_image": 1, "image_size": 64, **size, "seed": 0,
        "itm_weight": ITM_WEIGHT, "device": "cpu", "families": FAMILIES,
    }  # fmt: skip
    return c.finish(NAME, args, argv, figures, conditions, {"rows": rows}, started)


if __name__ == "__main__":
    main(sys.argv[1:])
