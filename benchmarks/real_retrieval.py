"""Retrieval on real photos: the README's real-photo table.

    python -m benchmarks.real_retrieval                  # the README's size (2 cores, ~1 h)
    python -m benchmarks.real_retrieval --update-readme  # ... and rewrite the README's table
    python -m benchmarks.real_retrieval --smoke          # 60 photos, 1 epoch: checks the script
    python -m benchmarks.real_retrieval --readme-from benchmarks/results/real_retrieval.json

A folder of captioned photos (default ``../shared/data/flickr8k``: 5,000 Flickr8k photos, 5
captions each) is split once, by a hash of each file name, into a held-out test collection
(``--test-images``, 1,000) and the training collection. Each row trains through the normal
pipeline (``mmpipe run`` on the training collection, in its own project) and is then scored by
``mmpipe eval-retrieval`` on the held-out collection: every caption against every test image and
every image against every caption (the protocol of the Flickr8K/30K tables). Rows:

- chance: a random ranking (``metrics.retrieval_chance``);
- frozen towers + linear heads: the recipe's encoders both locked, only the two linear
  projections and the temperature trained (symmetric InfoNCE), ``FROZEN_EPOCHS`` epochs;
- the recipe: ``configs/real_photos.yaml`` as it is;
- the published Flickr8K rows (Karpathy & Fei-Fei 2015, BRNN; their 1,000 test images are the
  standard Karpathy split, not these: a reference, not a comparison on the same photos).

Each row is kept in its project (``row.json``) and reused by a later run made from the same
recipe file, overrides and collections, so ``--rows recipe`` then the full command trains each
row once.

The training minutes and samples/s of each row come from its run's log; the cores and the load
average it ran under are recorded beside them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks._common import (
    REPO,
    machine,
    parse_readme_args,
    save_readme_table,
    update_readme_block,
)

CONFIG = REPO / "configs" / "real_photos.yaml"
DATA = REPO.parent / "shared" / "data" / "flickr8k"
START, END = "<!-- real-retrieval:start -->", "<!-- real-retrieval:end -->"
COMMAND = "python -m benchmarks.real_retrieval --update-readme"
FULL: list[str] = []  # the README's size: the recipe as configs/real_photos.yaml has it
FROZEN_EPOCHS = 3
# both towers locked; linear projections + temperature trained on symmetric InfoNCE
FROZEN = ["train.freeze_image=true", "train.freeze_text=true", "train.unfreeze_last=0",
          "train.stages=[]", "train.contrastive_loss=infonce", "train.encoder_lr_scale=1.0",
          f"train.epochs={FROZEN_EPOCHS}"]  # fmt: skip
SMOKE = ["train.epochs=1", "train.stages=[]", "train.batch_size=16"]
KS = (1, 5, 10)
PUBLISHED = {  # Karpathy & Fei-Fei 2015, Table 1, Flickr8K, BRNN (1,000 test images)
    "name": "Karpathy & Fei-Fei 2015 (BRNN), published, other test images",
    "i2t": {"R@1": 0.165, "R@5": 0.406, "R@10": 0.542},
    "t2i": {"R@1": 0.118, "R@5": 0.321, "R@10": 0.447},
}


def split_collection(data: Path, work: Path, test_images: int) -> tuple[Path, Path]:
    """Copy ``data`` (captions.jsonl + images/) into ``work/train`` and ``work/test``: the test
    images are the ``test_images`` whose sha256(file name) sort first (stable, seedless)."""
    rows = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    images = sorted({r["image"] for r in rows}, key=lambda p: hashlib.sha256(p.encode()).digest())
    test = set(images[:test_images])
    out = {"train": work / "train", "test": work / "test"}
    for name, dest in out.items():
        keep = [r for r in rows if (r["image"] in test) == (name == "test")]
        done = dest / "captions.jsonl"
        if done.is_file() and len(done.read_text().splitlines()) == len(keep):
            continue  # already split (a rerun)
        shutil.rmtree(dest, ignore_errors=True)
        (dest / "images").mkdir(parents=True)
        for image in sorted({r["image"] for r in keep}):
            shutil.copyfile(data / image, dest / image)
        done.write_text("".join(json.dumps(r) + "\n" for r in keep))
    return out["train"], out["test"]


def train_row(project: Path, train: Path, overrides: list[str], threads: int) -> dict[str, Any]:
    """``mmpipe run`` of the recipe on ``train`` in ``project``; its seconds and the train
    stage's minutes and samples/s from the run's log."""
    project.mkdir(parents=True, exist_ok=True)
    sets = [f"ingest.root={train}", *overrides]
    cmd = [sys.executable, "-m", "mmpipe", "run", "--params", str(CONFIG), "--project-dir",
           str(project)] + [a for o in sets for a in ("--set", o)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started, load = time.perf_counter(), os.getloadavg()[0]
    with (project / "run.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"mmpipe run failed ({proc.returncode}); see {project}/run.log")
    text = (project / "run.log").read_text()
    # the whole train stage: the loop, plus the frozen-feature pass when the cache was built
    took = re.findall(r"train stage took ([0-9.]+) s", text)
    speeds = [float(x) for x in re.findall(r"'samples_per_s': ([0-9.]+)", text)]
    return {
        "overrides": overrides,
        "run_seconds": round(time.perf_counter() - started, 1),
        "train_minutes": round(float(took[-1]) / 60, 1) if took else None,
        "samples_per_s": round(sum(speeds) / len(speeds), 1) if speeds else None,
        "samples_per_s_epochs": speeds,
        "load_at_start": round(load, 2),
    }


def score(project: Path, test: Path) -> dict[str, Any]:
    """``mmpipe eval-retrieval`` of the project's best.pt on the held-out collection."""
    out = project / "eval_retrieval.json"
    cmd = [sys.executable, "-m", "mmpipe", "eval-retrieval", str(test), "--captions",
           "captions.jsonl", "--model", str(project / "models" / "best.pt"), "--json",
           str(out)]  # fmt: skip
    with (project / "eval.log").open("w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"eval-retrieval failed ({proc.returncode}); see {project}/eval.log")
    return json.loads(out.read_text())


def _cells(result: dict[str, Any]) -> str:
    return " | ".join(f"{result[way][f'R@{k}']:.3f}" for way in ("i2t", "t2i") for k in KS)


def markdown(result: dict[str, Any]) -> str:
    """The table: chance, frozen towers, the recipe, the published rows; then the conditions."""
    rows, m = result["rows"], result["machine"]
    gain = {way: rows["recipe"]["scores"][way]["R@1"] - rows["frozen"]["scores"][way]["R@1"]
            for way in ("i2t", "t2i")}  # fmt: skip
    lines = [
        "| model | image→text R@1 | R@5 | R@10 | text→image R@1 | R@5 | R@10 | training |",
        "|---|---|---|---|---|---|---|---|",
        f"| chance | {_cells(result['chance'])} | - |",
    ]
    for key, name in (("frozen", f"frozen towers + linear heads ({FROZEN_EPOCHS} epochs)"),
                      ("recipe", "**the recipe** (`configs/real_photos.yaml`)")):  # fmt: skip
        row = rows[key]
        lines.append(f"| {name} | {_cells(row['scores'])} | {row['train_minutes']} min, "
                     f"{row['samples_per_s']} samples/s |")  # fmt: skip
    lines.append(f"| {PUBLISHED['name']} | {_cells(PUBLISHED)} | - |")
    test = rows["recipe"]["scores"]
    lines += [
        "",
        f"Held-out split of `{result['data']}`: {test['images']} test photos, {test['captions']} "
        f"captions, never seen in training; each run got the other {result['train_images']} "
        "photos (align keeps its val and test shares of them). The recipe is "
        f"{gain['i2t'] * 100:+.1f} / "
        f"{gain['t2i'] * 100:+.1f} points R@1 (image→text / text→image) over the frozen towers. "
        f"Trained on {m['cores']} CPU cores ({m['cpu']}, {'GPU' if m['gpu'] else 'no GPU'}); "
        "minutes and samples/s are the train stage's (the first epoch includes the frozen "
        "tower's one pass over the photos).",
    ]
    return "\n".join(lines)


def update_readme(table: str, readme: Path = REPO / "README.md") -> None:
    """Replace the text between the README's real-retrieval markers."""
    update_readme_block(START, END, table, COMMAND, readme)


def _row_args(ap: Any) -> None:
    ap.add_argument("--rows", nargs="*", choices=("frozen", "recipe"), default=None,
                    help="train and score only these rows (a row already in --work-dir, made "
                    "from the same recipe and collections, is reused by the full run)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_readme_args("real_retrieval", __doc__, "runs/real_retrieval", argv, FULL,
                             lambda saved: update_readme(markdown(saved)),
                             extra=_row_args)  # fmt: skip
    if args is None:  # --readme-from: done
        return 0
    from mmpipe import metrics as M

    work = args.work_dir.resolve()
    test_images = 20 if args.smoke else 1000
    data = DATA
    if args.smoke:  # 60 photos: 40 to train, 20 to test
        data = work / "smoke-data"
        rows = (DATA / "captions.jsonl").read_text().splitlines()[: 60 * 5]
        names = sorted({json.loads(r)["image"] for r in rows})
        (data / "images").mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(DATA / name, data / name)
        (data / "captions.jsonl").write_text("\n".join(rows) + "\n")
    train, test = split_collection(data, work, test_images)
    extra = SMOKE if args.smoke else FULL
    threads = max(1, os.cpu_count() or 1)
    result: dict[str, Any] = {"mode": "smoke" if args.smoke else "full", "overrides": FULL,
                              "machine": machine(), "data": str(data.relative_to(REPO.parent))
                              if data.is_relative_to(REPO.parent) else str(data), "rows": {}}  # fmt: skip
    for key, overrides in (("frozen", [*extra, *FROZEN]), ("recipe", extra)):
        if args.rows and key not in args.rows:
            continue
        result["rows"][key] = run_row(work / key, train, test, overrides, threads)
    if set(result["rows"]) != {"frozen", "recipe"}:
        print(json.dumps(result["rows"], indent=2))
        return 0  # --rows: a part of the table, saved in its project for the next run
    owner = [i for i, c in enumerate(_caption_counts(test)) for _ in range(c)]
    chance = M.retrieval_chance(owner, len(set(owner)), KS)
    result["chance"] = {way: {f"R@{k}": chance[way][k] for k in KS} for way in ("i2t", "t2i")}
    result["train_images"] = len({json.loads(r)["image"] for r in
                                  (train / "captions.jsonl").read_text().splitlines()})  # fmt: skip
    return save_readme_table("real_retrieval", args, result, markdown, update_readme)


def run_row(
    project: Path, train: Path, test: Path, overrides: list[str], threads: int
) -> dict[str, Any]:
    """Train and score one row, or reuse the row its project already holds when it was made
    from the same recipe file, overrides and collections (``row.json``)."""
    key = {"config_sha256": hashlib.sha256(CONFIG.read_bytes()).hexdigest(),
           "overrides": overrides, "train": str(train), "test": str(test)}  # fmt: skip

    def make() -> dict[str, Any]:
        row = train_row(project, train, overrides, threads)
        row["scores"] = score(project, test)
        return row

    return cached_row(project, key, "real_retrieval", make)


def cached_row(
    project: Path, key: dict[str, Any], who: str, make: Callable[[], dict[str, Any]]
) -> dict[str, Any]:
    """The row ``project/row.json`` holds when it was made with this ``key``; else a fresh
    project, ``make()``'s row, saved there with its key."""
    saved = project / "row.json"
    if saved.is_file():
        row = json.loads(saved.read_text())
        if row.get("key") == key:
            print(f"{who}: {project.name}: reusing {saved}", flush=True)
            return row
    print(f"{who}: {project.name}: mmpipe run ...", flush=True)
    shutil.rmtree(project, ignore_errors=True)
    row = make()
    row["key"] = key
    saved.write_text(json.dumps(row, indent=2))
    return row


def _caption_counts(collection: Path) -> list[int]:
    counts: dict[str, int] = {}
    for line in (collection / "captions.jsonl").read_text().splitlines():
        image = json.loads(line)["image"]
        counts[image] = counts.get(image, 0) + 1
    return list(counts.values())


if __name__ == "__main__":
    sys.exit(main())
