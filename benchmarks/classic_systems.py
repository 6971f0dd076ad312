"""The classic multimodal systems (configs/*.yaml) at full size: the README's tasks table.

    python -m benchmarks.classic_systems                 # every config, full size (~1 h, 2 cores)
    python -m benchmarks.classic_systems --update-readme # ... and rewrite the README's table
    python -m benchmarks.classic_systems --only vqa_lstm_resnet --work-dir runs
    python -m benchmarks.classic_systems --smoke         # tiny params: checks the script
    python -m benchmarks.classic_systems --readme-from benchmarks/results/classic_systems.json

Each config runs as ``mmpipe run --params configs/<name>.yaml`` in its own project directory
(its own MLflow store), on the synthetic source. The table reports each run's headline test
metric (the task's default register metric), the chance level (the best input-blind guess on
the test split: majority class or answer, mean value, class prevalences) and the best unimodal
baseline (an image-only and a text-only head trained on the model's frozen features, the better
of the two; see evaluate's ablation), so the fused model's figure reads against both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO,
    machine,
    mmpipe_run,
    readme_benchmark_args,
    saved_full_run,
    update_readme_block,
)

CONFIGS = {  # config -> the system it reproduces (README order)
    "sentiment_lstm_cnn": "LSTM text + CNN image, softmax over sentiment classes",
    "regression_cnn_rnn": "CNN + RNN fusion trained with MSE (a 1-5 rating)",
    "multilabel_cnn_lstm": "small CNN + LSTM concatenation, BCE over multi-hot tags",
    "vqa_lstm_resnet": "VQA: LSTM question + ResNet image, concatenated -> answer",
    "clip_pretrain_finetune": "CLIP contrastive pretraining, then fine-tuning (binary)",
    "pretrained_attention": "pretrained features (EfficientNet-Lite0, MiniLM) + attention fusion",
}
SMOKE = [  # what tests/conftest.py's TINY_OVERRIDES set: seconds per config
    "ingest.synthetic.n_images=48", "ingest.synthetic.captions_per_image=2",
    "ingest.synthetic.image_size=32", "ingest.workers=1", "shard.image_size=32",
    "shard.workers=1", "train.epochs=1", "train.batch_size=16", "train.num_workers=0",
    "evaluate.ablation_epochs=1",
]  # fmt: skip
README_START, README_END = "<!-- classic-systems:start -->", "<!-- classic-systems:end -->"


def run_config(name: str, work: Path, overrides: list[str]) -> dict[str, Any]:
    """``mmpipe run`` of one config in ``work/name``; its metrics, ablation and wall time."""
    project = work / name
    seconds = mmpipe_run(REPO / "configs" / f"{name}.yaml", project, overrides)
    reports = project / "reports"
    return {
        "name": name,
        "system": CONFIGS[name],
        "seconds": seconds,
        "task": json.loads((project / "models" / "train_report.json").read_text())["task"],
        "metrics": json.loads((reports / "metrics.json").read_text()),
        "ablation": json.loads((reports / "ablation.json").read_text()),
    }


def headline(row: dict[str, Any]) -> tuple[str, float, float, float]:
    """(metric, fused model, chance, best unimodal) of one run."""
    metric = row["ablation"].get("metric") or next(iter(row["metrics"]))
    m = row["metrics"]
    return (
        metric,
        m[metric],
        m.get(f"{metric}_chance", float("nan")),
        m.get(f"best_unimodal_{metric}", float("nan")),
    )


def markdown(rows: list[dict[str, Any]]) -> str:
    """The README table, plus VQA's question-only vs image + question line."""
    lines = [
        "| system | config | task | test metric | fused model | chance | best unimodal |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        metric, value, chance, unimodal = headline(row)
        lines.append(
            f"| {row['system']} | `configs/{row['name']}.yaml` | {row['task']} | {metric} | "
            f"**{value:.3f}** | {chance:.3f} | {unimodal:.3f} |"
        )
    for row in rows:
        if row["task"] == "vqa":
            heads = {r["fusion"]: r["score"] for r in row["ablation"]["results"]}
            m = row["metrics"]
            per_type = ", ".join(
                f"{k.removeprefix('vqa_accuracy_').replace('_', ' ')} {v:.3f}"
                for k, v in sorted(m.items())
                if k.startswith("vqa_accuracy_") and k != "vqa_accuracy_chance"
            )
            lines += [
                "",
                f"VQA accuracy: question only (text-only head) **{heads['text_only']:.3f}**, "
                f"image only {heads['image_only']:.3f}, image + question (the trained model) "
                f"**{m['vqa_accuracy']:.3f}**, answer prior {m['vqa_accuracy_chance']:.3f}; "
                f"per question type: {per_type}.",
            ]
    return "\n".join(lines)


def update_readme(table: str, command: str, readme: Path = REPO / "README.md") -> None:
    """Replace the text between the README's classic-systems markers."""
    update_readme_block(README_START, README_END, table, command, readme)


def readme_from(path: Path) -> int:
    """README.md's table from a saved run: only a complete full-size run of every config."""
    saved = saved_full_run(path, [], lambda s: [r["name"] for r in s["rows"]] == list(CONFIGS),
                           "a complete full-size run of every config")  # fmt: skip
    update_readme(markdown(saved["rows"]), "python -m benchmarks.classic_systems --update-readme")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = readme_benchmark_args("classic_systems", __doc__, "runs/classic")
    ap.add_argument("--only", default=None, help="comma-separated config names")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="K=V")
    args = ap.parse_args(argv)
    if args.readme_from is not None:
        return readme_from(args.readme_from)
    names = args.only.split(",") if args.only else list(CONFIGS)
    overrides = (SMOKE if args.smoke else []) + args.overrides
    rows: list[dict[str, Any]] = []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        print(f"classic systems: {name} ...", flush=True)
        rows.append(run_config(name, args.work_dir.resolve(), overrides))
        print(f"  {headline(rows[-1])} in {rows[-1]['seconds']} s", flush=True)
        # written after every config: an interrupted full run keeps the rows it measured
        payload = {"mode": "smoke" if args.smoke else "full", "machine": machine(),
                   "rows": rows, "overrides": overrides, "table": markdown(rows),
                   "complete": len(rows) == len(names)}  # fmt: skip
        (args.out_dir / "classic_systems.json").write_text(json.dumps(payload, indent=2))
    table = markdown(rows)
    print(table)
    if args.update_readme and (args.smoke or args.only or args.overrides):
        raise SystemExit("--update-readme needs the full run of every config, as configured")
    if args.update_readme:
        update_readme(table, "python -m benchmarks.classic_systems --update-readme")
    return 0


if __name__ == "__main__":
    sys.exit(main())
