"""Audio as a third modality on the synthetic data: the README's tri-modal table.

    python -m benchmarks.trimodal                  # both runs at the README's size (2 cores)
    python -m benchmarks.trimodal --update-readme  # ... and rewrite the README's table
    python -m benchmarks.trimodal --smoke          # tiny params: checks the script
    python -m benchmarks.trimodal --readme-from benchmarks/results/trimodal.json

The synthetic source with ``ingest.synthetic.audio: true`` gives each image a chord, major for a
positive mood and minor for a negative one (5 % of images without a clip). Two ``mmpipe run``
projects on the same data: image + text (``train.audio_encoder: none``: the model ignores the
clips) and image + text + audio (``cnn``). The table shows the task's accuracy against its
chance level (what audio adds to the mood cue of the palette) and retrieval R@1 for every
modality pair (image-text, image-audio, text-audio, both directions).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from benchmarks._common import REPO, machine, mmpipe_run, parse_readme_args, update_readme_block
from benchmarks.classic_systems import SMOKE

RUNS = {"image + text": "none", "image + text + audio": "cnn"}  # label -> train.audio_encoder
FULL = ["ingest.synthetic.n_images=400", "train.epochs=4"]  # the README's size (2 cores)
PAIRS = ("i2t", "t2i", "i2a", "a2i", "t2a", "a2t")
START, END = "<!-- trimodal:start -->", "<!-- trimodal:end -->"
COMMAND = "python -m benchmarks.trimodal --update-readme"


def run(label: str, work: Path, overrides: list[str]) -> dict[str, Any]:
    """``mmpipe run`` of one model on the audio data in its own project; its test metrics."""
    project = work / RUNS[label]
    sets = ["ingest.synthetic.audio=true", f"train.audio_encoder={RUNS[label]}", *overrides]
    seconds = mmpipe_run(REPO / "params.yaml", project, sets)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    ablation = json.loads((project / "reports" / "ablation.json").read_text())
    scores = {r["fusion"]: r["score"] for r in ablation["results"]}
    return {"model": label, "seconds": seconds, "metrics": metrics, "ablation": scores}


def markdown(rows: list[dict[str, Any]]) -> str:
    """Accuracy vs chance and R@1 of every modality pair (— where the model has no audio)."""
    head = "| model | accuracy | chance | " + " | ".join(f"{p} R@1" for p in PAIRS) + " |"
    lines = [head, "|---" * (3 + len(PAIRS)) + "|"]
    for row in rows:
        m = row["metrics"]
        cells = [f"{m[f'{p}_r1']:.3f}" if f"{p}_r1" in m else "—" for p in PAIRS]
        lines.append(
            f"| {row['model']} | **{m['accuracy']:.3f}** | {m['accuracy_chance']:.3f} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines + ablation_markdown(rows))


# each modality's contribution: heads trained on the tri-modal model's frozen features
ABLATION_COLUMNS = {"image only": "image_only", "text only": "text_only",
                    "audio only": "audio_only", "image + text": "concat",
                    "image + text + audio": "concat+audio"}  # fmt: skip


def ablation_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The ablation's accuracy per modality set for the runs that have audio rows (none for a
    run saved before they existed)."""
    audio = [r for r in rows if "audio_only" in r.get("ablation", {})]
    if not audio:
        return []
    lines = ["", "| frozen features of | " + " | ".join(ABLATION_COLUMNS) + " |",
             "|---" * (1 + len(ABLATION_COLUMNS)) + "|"]  # fmt: skip
    for row in audio:
        cells = [f"{row['ablation'][m]:.3f}" for m in ABLATION_COLUMNS.values()]
        lines.append(f"| {row['model']} | " + " | ".join(cells) + " |")
    return lines


def update_readme(table: str, readme: Path = REPO / "README.md") -> None:
    """Replace the text between the README's tri-modal markers."""
    update_readme_block(START, END, table, COMMAND, readme)


def main(argv: list[str] | None = None) -> int:
    args = parse_readme_args("trimodal", __doc__, "runs/trimodal", argv, FULL,
                             lambda saved: update_readme(markdown(saved["rows"])))  # fmt: skip
    if args is None:  # --readme-from: done
        return 0
    overrides = SMOKE if args.smoke else FULL
    rows = []
    for label in RUNS:
        print(f"trimodal: {label} ...", flush=True)
        rows.append(run(label, args.work_dir.resolve(), overrides))
    table = markdown(rows)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"mode": "smoke" if args.smoke else "full", "machine": machine(), "rows": rows,
               "overrides": overrides, "table": table}  # fmt: skip
    (args.out_dir / "trimodal.json").write_text(json.dumps(payload, indent=2))
    print(table)
    if args.update_readme:
        update_readme(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
