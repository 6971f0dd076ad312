"""The GPU check: the real-photo recipe's training step on a CUDA device beside a bare loop.

    bash benchmarks/gpu_check.sh            # what a lent GPU machine runs (under 8 minutes)
    python -m benchmarks.gpu_check --steps 20

Builds the model of ``configs/real_photos.yaml`` (EfficientNet-Lite0 + MiniLM, the image tower
locked but its last groups) and times, on the same fixed batch of ``--batch`` 224 px images and
captions, interleaved and best of ``--repeats``:

- mmpipe: ``train.create_trainer`` + ``compute_loss`` + ``optimizer_step`` (autocast, scaler,
  clipping, the temperature clamp, channels_last: what ``train_loop`` runs per step);
- bare: the same modules called directly: forward, symmetric InfoNCE, backward, AdamW step.

It prints samples/s of each and their ratio, the device, AMP and memory, and writes
``benchmarks/results/gpu_check.json``. Without CUDA it says so and runs 2 small steps on the
CPU, so the script itself is checked everywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import REPO, RESULTS, machine

CONFIG = REPO / "configs" / "real_photos.yaml"


def _batch(n: int, size: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    words = ["a", "dog", "runs", "on", "the", "grass", "two", "children", "play", "in", "water"]
    texts = [" ".join(words[(i + j) % len(words)] for j in range(8 + i % 5)) for i in range(n)]
    return {
        "image": torch.rand(n, 3, size, size, generator=g) * 2 - 1,
        "text": texts,
        "image_id": [f"{i:016x}" for i in range(n)],
        "label": torch.full((n,), -1, dtype=torch.long),
        "labels": torch.full((n, 1), -1, dtype=torch.long),
        "value": torch.full((n,), float("nan")),
    }


def _timed(fn: Any, steps: int, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    from mmpipe.config import load_params
    from mmpipe.distributed import Dist
    from mmpipe.manifest import Manifest, SplitEntry
    from mmpipe.model import info_nce
    from mmpipe.train import compute_loss, create_trainer, optimizer_step

    cuda = torch.cuda.is_available()
    if not cuda:
        print("gpu_check: no GPU found (torch.cuda.is_available() is False): running 2 small "
              "steps on the CPU to check the script; no GPU figure", flush=True)  # fmt: skip
        args.steps, args.batch, args.repeats = 2, 8, 1
    p = load_params(CONFIG, ["train.device=auto"]).train
    p = p.model_copy(update={"batch_size": args.batch})
    train = SplitEntry(count=args.batch * args.steps)
    manifest = Manifest(splits={"train": train}, image_size=224)
    t = create_trainer(p, Dist(), manifest)
    batch = _batch(args.batch, 224)
    bare = create_trainer(p, Dist(), manifest)  # the same model, its own optimiser
    bare.model.load_state_dict(t.model.state_dict())
    model, device = bare.model, bare.device
    images = batch["image"].to(device)
    if t.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.lr)

    def mmpipe_step() -> None:
        loss, _ = compute_loss(t, batch)
        t.scaler.scale(loss / p.grad_accum).backward()
        optimizer_step(t)

    def bare_step() -> None:
        with bare.autocast():
            out = model(images, batch["text"])
        loss = info_nce(out["image_emb"].float(), out["text_emb"].float(), out["logit_scale"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t.net.train()
    model.train()
    mmpipe_step()  # warm-up: allocator, cuDNN autotune, first-call caches
    bare_step()
    best = {"mmpipe": float("inf"), "bare": float("inf")}
    for _ in range(args.repeats):
        best["mmpipe"] = min(best["mmpipe"], _timed(mmpipe_step, args.steps, t.device))
        best["bare"] = min(best["bare"], _timed(bare_step, args.steps, device))
    speed = {k: args.batch * args.steps / v for k, v in best.items()}
    result = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no GPU found)",
        "gpu": cuda, "amp": str(t.amp), "channels_last": t.channels_last, "batch": args.batch,
        "steps": args.steps, "repeats": args.repeats, "samples_per_s": speed,
        "ratio_mmpipe_to_bare": speed["mmpipe"] / speed["bare"],
        "max_memory_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "machine": machine(),
    }  # fmt: skip
    print(
        f"gpu_check on {result['device']} (amp {result['amp']}, channels_last "
        f"{t.channels_last}, batch {args.batch}, {args.steps} steps, best of {args.repeats}):"
    )
    print(f"  mmpipe train step: {speed['mmpipe']:8.1f} samples/s")
    print(f"  bare PyTorch loop: {speed['bare']:8.1f} samples/s")
    print(f"  ratio mmpipe/bare: {result['ratio_mmpipe_to_bare']:.3f}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "gpu_check.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
