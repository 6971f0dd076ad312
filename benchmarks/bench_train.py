"""CPU training throughput (samples/s) per model size. No GPU was lent to this machine: every
figure is CPU (torch's default intra-op threads = cores).

Batches come from the real loader (mmpipe.data) once and are kept in memory, so the figure is the
training step alone: mmpipe.train.compute_loss + backward + optimizer_step, on the loop that
mmpipe.train.create_trainer builds. One untimed warm-up step per model, then ``steps`` timed steps;
rounds are interleaved across models and the best round is kept. Ratios are vs the default model
(cnn + transformer, width 128, fp32).
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks import _common as c

NAME = "train"


def configs(smoke: bool) -> dict[str, dict[str, Any]]:
    out = {
        "cnn+transformer w64": {"width": 64},
        "cnn+transformer w128 (default)": {"width": 128},
        "cnn+transformer w256": {"width": 256},
        "cnn+transformer w128 bf16 autocast": {"width": 128, "amp": "bf16"},
        "cnn+transformer w128, fusion=cross_attention_pooled": {
            "width": 128,
            "fusion": "cross_attention_pooled",
        },
        "cnn+transformer w128, fusion=cross_attention (tokens)": {
            "width": 128,
            "fusion": "cross_attention",
        },
        "single-stream ViLT (patch 8 + word embedding) w128": {
            "image_encoder": "patch",
            "text_encoder": "embedding",
            "fusion": "single_stream",
            "width": 128,
        },
        "efficientnet_lite0 frozen + transformer w128": {
            "image_encoder": "efficientnet_lite0",
            "freeze_image": True,
            "width": 128,
        },
    }
    if smoke:
        out = {k: {**v, "width": 16} for k, v in out.items()}
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    args = c.parser(NAME, __doc__).parse_args(argv)
    n = c.pick(args, 60, 800, 1200)
    batch = c.pick(args, 16, 128, 128)
    steps = c.pick(args, 2, 3, 5)
    rounds = c.pick(args, 1, 2, 2)

    import torch

    from mmpipe.config import TrainParams
    from mmpipe.data import create_dataloader
    from mmpipe.distributed import Dist
    from mmpipe.manifest import read_manifest
    from mmpipe.shard import run_shard
    from mmpipe.train import compute_loss, create_trainer, optimizer_step

    cfgs = configs(args.smoke)
    with c.workdir(args, NAME) as work:
        src = c.synthetic_source(work / "source", n, 96)
        ingest_dir, align_dir, _ = c.ingest_align(src, work, workers=2)
        shard_dir = work / "shards"
        run_shard(align_dir, ingest_dir, c.shard_params(64, workers=2), shard_dir)
        manifest = read_manifest(shard_dir)
        batches = [
            b
            for b in create_dataloader(shard_dir, "train", batch, num_workers=0)
            if len(b["label"]) == batch
        ][: steps + 1]
        assert len(batches) == steps + 1, f"need {steps + 1} full batches of {batch}"

        loops: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, kw in cfgs.items():
            try:
                p = TrainParams(device="cpu", batch_size=batch, warmup_steps=1, **kw)
                loops[name] = create_trainer(p, Dist(), manifest)
            except Exception as exc:  # noqa: BLE001 - e.g. pretrained weights unavailable offline
                errors[name] = f"{type(exc).__name__}: {exc}"

        def step(loop: Any, b: dict[str, Any]) -> None:
            loss, _ = compute_loss(loop, b)
            loop.scaler.scale(loss).backward()
            optimizer_step(loop)

        def run(name: str) -> float:
            loop = loops[name]
            loop.net.train()
            step(loop, batches[0])  # warm-up (allocator, autocast caches)
            t0 = time.perf_counter()
            for b in batches[1:]:
                step(loop, b)
            return steps * batch / (time.perf_counter() - t0)

        rates: dict[str, list[float]] = {k: [] for k in loops}
        for _ in range(rounds):
            for name in loops:
                rates[name].append(run(name))
        trainable = {
            k: sum(q.numel() for q in lp.model.parameters() if q.requires_grad)
            for k, lp in loops.items()
        }
        total = {k: sum(q.numel() for q in lp.model.parameters()) for k, lp in loops.items()}

    best = {k: max(v) for k, v in rates.items()}
    base_name = next(k for k in cfgs if "default" in k)
    base = best[base_name]
    figures = [
        c.figure(
            name,
            best[name],
            "samples/s",
            ratio=best[name] / base,
            note=f"{trainable[name] / 1e6:.2f}M trainable / {total[name] / 1e6:.2f}M params",
        )
        for name in loops
    ]
    figures += [
        c.figure(name, 0, "samples/s", note=f"not measured: {err}") for name, err in errors.items()
    ]
    if "cnn+transformer w128 bf16 autocast" in best:
        r = best["cnn+transformer w128 bf16 autocast"] / base
        figures.append(
            c.figure(
                "bf16 autocast vs fp32 (w128)",
                r,
                "x",
                ratio=r,
                note="train.amp=bf16 on CPU; auto = off on CPU",
            )
        )
    conditions = {
        "device": "cpu (no GPU lent)",
        "torch_threads": torch.get_num_threads(),
        "batch_size": batch,
        "image_size": 64,
        "timed_steps": steps,
        "rounds": rounds,
        "text_encoder": "transformer (2 layers)",
        "max_tokens": 32,
        "configs": cfgs,
        "kept": "best round",
    }
    data = {
        "samples_per_second": {k: [round(x, 2) for x in v] for k, v in rates.items()},
        "best": {k: round(v, 2) for k, v in best.items()},
        "errors": errors,
        "trainable_params": trainable,
        "params": total,
        "baseline": base_name,
    }
    return c.finish(NAME, args, argv, figures, conditions, data, started)


if __name__ == "__main__":
    main(sys.argv[1:])
