"""The frozen-feature cache: what an epoch after the first costs with a locked image tower.

Real photos (the first ``n`` of ``../shared/data/flickr8k``, 5 captions each, 224 px) go through
ingest, align and shard once; then the real-photo recipe's encoders (EfficientNet-Lite0 +
MiniLM) train 2 epochs through ``run_train`` in three settings, each in its own model dir:

- both towers locked (linear heads on frozen features), cached: epoch 1 pays the one pass of
  each tower over the samples, epoch 2 only the heads;
- the same, with the cache off (``train.feature_cache: off``): every epoch runs both towers;
- the image tower locked, the text tower trained (LiT), cached (its own cache directory, so its
  epoch 1 pays the pass): epoch 2 still trains MiniLM.

A run that finds the cache already built (another night, the same shards and tower) pays no pass
in its epoch 1 either.

Each setting's epoch seconds come from the train loop's own timing (``epoch_seconds``); the
first epoch's include the cache's pass (``feature_cache`` of run_train's report), which runs
before the loop. Figures: epoch 2 / epoch 1 (target <= 0.3 with a locked image tower),
and the cached epoch 2 against the uncached one.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import _common as c

NAME = "feature_cache"
DATA = c.REPO.parent / "shared" / "data" / "flickr8k"


def collection(dest: Path, n: int) -> Path:
    """The first ``n`` photos of flickr8k with their captions, copied under ``dest``."""
    rows = [json.loads(x) for x in (DATA / "captions.jsonl").read_text().splitlines()]
    names = sorted({r["image"] for r in rows})[:n]
    keep = set(names)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(DATA / name, dest / name)
    text = "".join(json.dumps(r) + "\n" for r in rows if r["image"] in keep)
    (dest / "captions.jsonl").write_text(text)
    return dest


def shards(src: Path, work: Path) -> Path:
    from mmpipe.align import run_align
    from mmpipe.config import AlignParams, IngestParams, ShardParams
    from mmpipe.ingest import run_ingest
    from mmpipe.shard import run_shard

    p = IngestParams(source="folder", root=str(src), captions="captions.jsonl", workers=2)
    run_ingest(p, work / "ingest")
    run_align(work / "ingest", AlignParams(train=0.9, val=0.05, test=0.05), work / "align")
    sp = ShardParams(image_size=224, copies=0, train_augment=[], workers=2)
    run_shard(work / "align", work / "ingest", sp, work / "shards")
    return work / "shards"


def epochs(shard_dir: Path, out: Path, cache: Path | None, **overrides: Any) -> list[float]:
    """Seconds of each of 2 epochs of the recipe's encoders with ``overrides``."""
    from mmpipe.config import TrainParams
    from mmpipe.train import run_train

    p = TrainParams(image_encoder="efficientnet_lite0", text_encoder="minilm", embed_dim=256,
                    epochs=2, batch_size=64, lr=1e-3, warmup_steps=None, num_workers=1,
                    shuffle_buffer=1000, device="cpu", **overrides)  # fmt: skip
    seconds: list[float] = []
    report = run_train(shard_dir, p, out, cache_dir=cache,
                       on_epoch_end=lambda e, m: seconds.append(m["epoch_seconds"]))  # fmt: skip
    # the cache's pass runs before the loop (create_trainer): it belongs to the first epoch
    seconds[0] += sum(r["seconds"] for r in (report.get("feature_cache") or {}).values())
    return seconds


def main(argv: list[str] | None = None) -> int:
    args = c.parser(NAME, __doc__).parse_args(argv)
    started = time.perf_counter()
    n = c.pick(args, 24, 150, 400)
    with c.workdir(args, NAME) as work:
        shard_dir = shards(collection(work / "photos", n), work)
        locked = {"freeze_image": True, "freeze_text": True}
        runs = {
            "both locked, cached": epochs(shard_dir, work / "a", work / "cache", **locked),
            "both locked, cache off": epochs(shard_dir, work / "b", None, **locked,
                                             feature_cache="off"),
            "image locked, text trained, cached": epochs(
                shard_dir, work / "c", work / "cache-lit", freeze_image=True, encoder_lr_scale=0.05
            ),
        }  # fmt: skip
    a, b, lit = (
        runs["both locked, cached"],
        runs["both locked, cache off"],
        runs["image locked, text trained, cached"],
    )
    figures = [
        c.figure("both towers locked: epoch 2 / epoch 1", a[1] / a[0], "x", target="<= 0.3",
                 met=a[1] / a[0] <= 0.3, ratio=a[1] / a[0],
                 note=f"{a[0]:.1f} s then {a[1]:.1f} s"),
        c.figure("both towers locked: cached epoch 2 / uncached epoch 2", a[1] / b[1], "x",
                 ratio=a[1] / b[1], note=f"{a[1]:.1f} s vs {b[1]:.1f} s"),
        c.figure("image locked, text trained: epoch 2 / epoch 1", lit[1] / lit[0], "x",
                 target="<= 0.3", met=lit[1] / lit[0] <= 0.3, ratio=lit[1] / lit[0],
                 note=f"{lit[0]:.1f} s then {lit[1]:.1f} s; epoch 2 is MiniLM's training"),
    ]  # fmt: skip
    conditions = {"photos": n, "captions_per_photo": 5, "image_size": 224, "batch": 64}
    c.finish(NAME, args, argv, figures, conditions, {"epoch_seconds": runs}, started)
    return 0


if __name__ == "__main__":
    sys.exit(main())
