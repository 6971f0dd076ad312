"""Issue 28 item 3, before -> after: shard bytes, shard CPU time and loader rows/s of the mmpipe
on ``PYTHONPATH`` (run it once with a checkout of the old code, once with this one, interleaved).

Not a ``bench_`` script (it compares two code trees, not two things in one process)::

    python benchmarks/images_once.py prep WORK 1000          # 1,000 Flickr8k photos x 5, ingest
    PYTHONPATH=TREE python benchmarks/images_once.py shard WORK OUT 224   # align + shard (1 worker)
    PYTHONPATH=TREE python benchmarks/images_once.py loader OUT/shards one  # or all; - : old code

Prints one JSON line. Shard: CPU seconds of run_shard in-process (``workers: 1``, defaults
otherwise: ``copies: 1`` with the default train_augment), bytes of the tars. Loader: the best of
two train epochs (batch 64, shuffle_buffer 1000, num_workers 0) in CPU seconds, rows and image
samples per CPU-second. Set ``OMP_NUM_THREADS=1`` on a shared machine (see benchmarks/README.md).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"


def prep(work: Path, n: int) -> None:
    """The first ``n`` photos of Flickr8k with their captions, ingested into WORK/ingest."""
    from mmpipe.config import IngestParams
    from mmpipe.ingest import run_ingest

    rows = [json.loads(x) for x in (DATA / "captions.jsonl").read_text().splitlines()]
    names = sorted({r["image"] for r in rows})[:n]
    keep = set(names)
    src = work / "photos"
    (src / "images").mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(DATA / name, src / name)
    text = "".join(json.dumps(r) + "\n" for r in rows if r["image"] in keep)
    (src / "captions.jsonl").write_text(text)
    p = IngestParams(source="folder", root=str(src), captions="captions.jsonl", workers=2)
    run_ingest(p, work / "ingest")


def shard(work: Path, out: Path, size: int) -> dict:
    from mmpipe.align import run_align
    from mmpipe.config import AlignParams, ShardParams
    from mmpipe.shard import run_shard

    shutil.rmtree(out, ignore_errors=True)
    run_align(work / "ingest", AlignParams(train=0.8, val=0.1, test=0.1), out / "align")
    p = ShardParams(image_size=size, workers=1)
    cpu, wall = time.process_time(), time.perf_counter()
    report = run_shard(out / "align", work / "ingest", p, out / "shards")
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    tars = sorted((out / "shards").glob("*.tar"))
    return {"cpu_s": round(cpu, 2), "wall_s": round(wall, 2), "samples": report["samples"],
            "pairs": report["pairs"], "bytes": sum(t.stat().st_size for t in tars)}  # fmt: skip


def loader(shards: Path, captions: str) -> dict:
    from mmpipe.data import create_dataloader

    kw = {"captions": captions} if captions != "-" else {}
    best = None
    for epoch in range(2):
        cpu = time.process_time()
        rows, samples = 0, set()
        for b in create_dataloader(
            shards, "train", 64, shuffle_buffer=1000, seed=0, epoch=epoch, **kw
        ):
            rows += len(b["key"])
            samples.update(b.get("sample_key", b["key"]))
        cpu = time.process_time() - cpu
        if best is None or cpu < best[0]:
            best = (cpu, rows, len(samples))
    cpu, rows, n = best
    return {"captions": captions, "rows": rows, "samples": n, "cpu_s": round(cpu, 2),
            "rows_per_cpu_s": round(rows / cpu, 1), "samples_per_cpu_s": round(n / cpu, 1)}  # fmt: skip


if __name__ == "__main__":
    cmd, *args = sys.argv[1:]
    if cmd == "prep":
        prep(Path(args[0]), int(args[1]))
    elif cmd == "shard":
        print(json.dumps(shard(Path(args[0]), Path(args[1]), int(args[2]))))
    else:
        print(json.dumps(loader(Path(args[0]), args[1])))
