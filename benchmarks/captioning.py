"""Captioning on the synthetic data: the README's captioning table.

    python -m benchmarks.captioning                  # the README's size (2 cores)
    python -m benchmarks.captioning --update-readme  # ... and rewrite the README's table
    python -m benchmarks.captioning --smoke          # tiny params: checks the script
    python -m benchmarks.captioning --readme-from benchmarks/results/captioning.json

``mmpipe run --params configs/captioning.yaml`` in its own project, then the test split's BLEU-4
and CIDEr of the decoder's beam-search captions beside the nearest-neighbour baseline (the
train caption closest to each test image in the model's own shared space; mmpipe/captioning.py).
Training throughput is measured after the run on its shards, side by side: optimiser steps on
the same preloaded batches of the captioning model and of the same encoders with the default
concat classification head (train.task=multiclass), interleaved, best of the repeats; the ratio
is what the decoder costs.
"""

from __future__ import annotations

import functools
import itertools
import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from benchmarks._common import (
    REPO,
    interleaved,
    machine,
    mmpipe_run,
    parse_readme_args,
    save_readme_table,
    update_readme_block,
)
from benchmarks.classic_systems import SMOKE

CONFIG = REPO / "configs" / "captioning.yaml"
FULL = ["ingest.synthetic.n_images=600", "train.epochs=20"]  # the README's size (2 cores)
START, END = "<!-- captioning:start -->", "<!-- captioning:end -->"
COMMAND = "python -m benchmarks.captioning --update-readme"


def throughput(project: Path, overrides: list[str], steps: int, repeats: int) -> dict[str, float]:
    """Training samples/s (forward, backward, optimiser step on preloaded batches) of the
    captioning model and of the same encoders with the default concat head, on the run's
    shards: ``steps`` steps each after one warm-up step, interleaved, best of ``repeats``."""
    from mmpipe.config import load_params
    from mmpipe.data import create_dataloader
    from mmpipe.distributed import Dist
    from mmpipe.manifest import read_manifest
    from mmpipe.train import caption_vocabulary, compute_loss, create_trainer, optimizer_step

    p = load_params(CONFIG, overrides=[*overrides, "train.num_workers=0", "train.device=cpu"])
    shards, batch = project / "data" / "shards", p.train.batch_size
    full = (b for b in create_dataloader(shards, "train", batch) if len(b["text"]) == batch)
    batches = list(itertools.islice(full, steps + 1))
    manifest = read_manifest(shards)
    trainers = {
        "captioning": create_trainer(p.train, Dist(), manifest,
                                     caption=caption_vocabulary(shards, p.train)),
        "concat head": create_trainer(p.train.model_copy(update={"task": "multiclass"}), Dist(),
                                      manifest),
    }  # fmt: skip

    def step(t: Any, b: dict[str, Any]) -> None:
        loss, _ = compute_loss(t, b)
        t.scaler.scale(loss).backward()
        optimizer_step(t)

    for t in trainers.values():
        t.net.train()
        step(t, batches[0])  # warm-up (allocator, first-call caches)
    fns = {k: functools.partial(lambda t: [step(t, b) for b in batches[1:]], t)
           for k, t in trainers.items()}  # fmt: skip
    best, _, _ = interleaved(fns, repeats)
    return {k: (len(batches) - 1) * batch / seconds for k, seconds in best.items()}


def markdown(result: dict[str, Any]) -> str:
    """BLEU-4 / CIDEr of the decoder and the baseline; the training samples/s line."""
    m, speed = result["metrics"], result["samples_per_s"]
    lines = [
        "| captions of the test images | BLEU-4 | CIDEr |",
        "|---|---|---|",
        f"| decoder, beam search ({result['beam']} beams) | **{m['bleu4']:.3f}** | "
        f"**{m['cider']:.3f}** |",
        f"| nearest-neighbour train caption (baseline) | {m['nn_bleu4']:.3f} | "
        f"{m['nn_cider']:.3f} |",
        "",
        f"{int(m['n_caption_images'])} test images, each against all its reference captions. "
        f"Training: {speed['captioning']:.0f} samples/s for the captioning model vs "
        f"{speed['concat head']:.0f} for the same encoders with the concat classification head "
        f"(ratio {speed['captioning'] / speed['concat head']:.2f}, measured side by side"
        f"{conditions(result)}).",
    ]
    return "\n".join(lines)


def conditions(result: dict[str, Any]) -> str:
    """', on 2 cores (CPU name), 1-min load average 3.1 when measured' (what the samples/s
    depend on); empty for a run saved before they were recorded."""
    m, load = result.get("machine") or {}, result.get("throughput_load")
    if not m or load is None:
        return ""
    gpu = ", GPU" if m.get("gpu") else ", no GPU"
    return f" on {m['cores']} cores ({m['cpu']}{gpu}), 1-min load average {load:.1f} when measured"


def update_readme(table: str, readme: Path = REPO / "README.md") -> None:
    """Replace the text between the README's captioning markers."""
    update_readme_block(START, END, table, COMMAND, readme)


def main(argv: list[str] | None = None) -> int:
    args = parse_readme_args("captioning", __doc__, "runs/captioning", argv, FULL,
                             lambda saved: update_readme(markdown(saved)))  # fmt: skip
    if args is None:  # --readme-from: done
        return 0
    overrides = SMOKE if args.smoke else FULL
    project = args.work_dir.resolve()
    print("captioning: mmpipe run ...", flush=True)
    seconds = mmpipe_run(CONFIG, project, overrides)
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    print("captioning: training throughput ...", flush=True)
    load = os.getloadavg()[0]  # the neighbours' load the samples/s were measured under
    speed = throughput(project, overrides, steps=2 if args.smoke else 10, repeats=2)
    beam = yaml.safe_load(CONFIG.read_text())["evaluate"]["beam_size"]
    result = {"mode": "smoke" if args.smoke else "full", "machine": machine(), "seconds": seconds,
              "overrides": overrides, "metrics": metrics, "beam": beam, "samples_per_s": speed,
              "throughput_load": round(load, 2)}  # fmt: skip
    return save_readme_table("captioning", args, result, markdown, update_readme)


if __name__ == "__main__":
    sys.exit(main())
