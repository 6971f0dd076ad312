"""Proof that curation helped: clean vs noisy vs curated captions, same recipe, same held-out photos.

    python -m benchmarks.curation                   # the full size (4,000 training photos, 2 cores)
    python -m benchmarks.curation --update-readme   # ... and rewrite the README's table
    python -m benchmarks.curation --smoke           # 60 photos, 1 epoch: checks the script
    python -m benchmarks.curation --readme-from benchmarks/results/curation.json

The held-out test collection is ``benchmarks.real_retrieval``'s (the ``--test-images`` photos
whose sha256(file name) sort first; 1,000 of Flickr8k's 5,000), never noised. From the training
collection (the other photos, or the first ``--train-images`` of them in the same hash order) a
known share (``--noise``, 30 %) of the captions is replaced, seeded, by a caption of another photo
(the injected caption lines are recorded in the work dir, ``noisy-data/injected.json``). Rows, each
trained through the normal pipeline (``mmpipe run`` of ``configs/real_photos.yaml`` with
``real_retrieval.FROZEN``: both towers locked, linear heads, 3 epochs) in its own project and
scored by ``mmpipe eval-retrieval`` on the held-out collection:

- (a) clean: the training collection as it is;
- (b) noisy: the same photos with the injected captions;
- (c) curated: every noisy pair scored by row (b)'s model (the previous night's champion: the
  cosine of the pair's image and caption embeddings, ``mmpipe.retrieval``'s embedding code), the
  top ``1 - noise`` of them kept, then trained like the others.

Reported: R@1/5/10 both ways per row; the share of the noise's R@1 cost that curation recovered,
(c - b) / (a - b); the filter's precision and recall at finding the injected captions (and the
ROC AUC of its score, threshold-free); the training minutes, cores and load of each row.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any

from benchmarks import real_retrieval as rr
from benchmarks._common import (
    REPO,
    machine,
    parse_readme_args,
    save_readme_table,
    update_readme_block,
)

START, END = "<!-- curation:start -->", "<!-- curation:end -->"
COMMAND = "python -m benchmarks.curation --update-readme"
DOC = REPO / "docs" / "curation-benchmark.md"
FULL: list[str] = list(rr.FROZEN)  # the recipe of every row: real_retrieval's frozen towers
# 40 photos (fewer once curated): align's 5 % val and test shares could be empty, so 20 % each
SMOKE = ["train.epochs=1", "train.stages=[]", "train.batch_size=16",
         "align.train=0.6", "align.val=0.2", "align.test=0.2"]  # fmt: skip
KS = rr.KS
ROWS = ("clean", "noisy", "curated")


# ----------------------------------------------------------------------------- collections


def _rows(collection: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (collection / "captions.jsonl").read_text().splitlines()]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_collection(dest: Path, images_from: Path, rows: list[dict[str, Any]]) -> Path:
    """``dest/captions.jsonl`` of ``rows`` and their images, hard-linked (else copied) from
    ``images_from``; left as it is when it already holds exactly these rows (a rerun)."""
    text = "".join(json.dumps(r) + "\n" for r in rows)
    done = dest / "captions.jsonl"
    if done.is_file() and done.read_text() == text:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images").mkdir(parents=True)
    for image in sorted({r["image"] for r in rows}):
        try:
            os.link(images_from / image, dest / image)
        except OSError:
            shutil.copyfile(images_from / image, dest / image)
    done.write_text(text)
    return dest


def subset(train: Path, dest: Path, n_images: int | None) -> Path:
    """The first ``n_images`` photos of ``train`` in sha256(file name) order (all when None)."""
    if n_images is None:
        return train
    rows = _rows(train)
    images = sorted({r["image"] for r in rows}, key=lambda p: hashlib.sha256(p.encode()).digest())
    if n_images > len(images):
        raise SystemExit(f"--train-images {n_images}: the training collection has {len(images)}")
    keep = set(images[:n_images])
    return write_collection(dest, train, [r for r in rows if r["image"] in keep])


def inject_noise(
    rows: list[dict[str, Any]], share: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``rows`` with round(share * len) captions, chosen at random (seeded), replaced by the
    caption of a random other photo (from the clean rows: no chains); and the injected lines
    ({"line", "image", "caption_from"})."""
    rng = random.Random(seed)
    n = round(share * len(rows))
    chosen = sorted(rng.sample(range(len(rows)), n))
    noisy = [dict(r) for r in rows]
    injected = []
    for i in chosen:
        j = rng.randrange(len(rows))
        while rows[j]["image"] == rows[i]["image"]:
            j = rng.randrange(len(rows))
        noisy[i]["caption"] = rows[j]["caption"]
        injected.append({"line": i, "image": rows[i]["image"], "caption_from": rows[j]["image"]})
    return noisy, injected


# ----------------------------------------------------------------------------- rows


def run_row(
    project: Path,
    collection: Path,
    test: Path,
    overrides: list[str],
    threads: int,
    extra_key: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (``mmpipe run``) and score (``mmpipe eval-retrieval``) one row, or reuse the row its
    project holds when it was made from the same recipe file, overrides, collection contents
    (and ``extra_key``: the scorer's checkpoint)."""
    key = {"config_sha256": _sha(rr.CONFIG), "overrides": overrides,
           "train_captions_sha256": _sha(collection / "captions.jsonl"),
           "test_captions_sha256": _sha(test / "captions.jsonl"), **(extra_key or {})}  # fmt: skip

    def make() -> dict[str, Any]:
        row = rr.train_row(project, collection, overrides, threads)
        row["cores"] = os.cpu_count()
        row["scores"] = rr.score(project, test)
        return row

    return rr.cached_row(project, key, "curation", make)


# ----------------------------------------------------------------------------- curation


def score_pairs(model: Path, collection: Path, batch_size: int = 64) -> list[float]:
    """The cosine of each caption line's image and caption embeddings under ``model``, in the
    collection's line order (``mmpipe.retrieval``'s reader and embedding code)."""
    from collections import Counter

    from mmpipe.predict import load_predictor
    from mmpipe.retrieval import _embed_images, read_collection

    predictor = load_predictor(model)
    by_image, rejected, _ = read_collection(collection, "captions.jsonl")
    image_emb, kept = _embed_images(predictor, list(by_image), batch_size, Counter(rejected))
    if rejected or len(kept) != len(by_image):
        raise SystemExit(f"{collection}: rows rejected or images unreadable ({dict(rejected)})")
    texts = [c for p in kept for c in by_image[p]]
    owner = [i for i, p in enumerate(kept) for _ in by_image[p]]
    text_emb = predictor.embed_captions(texts, batch_size=256)
    image_emb = image_emb / image_emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    text_emb = text_emb / text_emb.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cosine = (image_emb[owner] * text_emb).sum(dim=1).tolist()
    # back to line order: read_collection groups a photo's captions in file order
    rows = _rows(collection)
    where = {str((collection / r["image"]).resolve()): [] for r in rows}
    for line, r in enumerate(rows):
        where[str((collection / r["image"]).resolve())].append(line)
    scores = [0.0] * len(rows)
    flat = [(line, p) for p in kept for line in where[str(Path(p).resolve())]]
    if len(flat) != len(rows):
        raise SystemExit(f"{collection}: {len(flat)} scored pairs for {len(rows)} lines")
    for (line, _), value, text in zip(flat, cosine, texts, strict=True):
        if rows[line]["caption"].strip() != text.strip():
            raise SystemExit(f"{collection}: line {line + 1}: scored caption differs")
        scores[line] = float(value)
    return scores


def keep_top(scores: list[float], keep_fraction: float) -> list[int]:
    """The lines of the top ``keep_fraction`` scores (ties: the earlier line), in line order."""
    n = round(keep_fraction * len(scores))
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:n])


def detection(scores: list[float], dropped: set[int], injected: set[int]) -> dict[str, Any]:
    """Precision and recall of ``dropped`` at finding ``injected``; ROC AUC of the score."""
    hit = len(dropped & injected)
    # AUC: the chance that a clean pair scores above an injected one (ties count half)
    ranked = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, i = 0.0, 0
    while i < len(ranked):  # average ranks over ties
        j = i
        while j + 1 < len(ranked) and scores[ranked[j + 1]] == scores[ranked[i]]:
            j += 1
        for k in range(i, j + 1):
            if ranked[k] not in injected:
                rank_sum += (i + j) / 2 + 1
        i = j + 1
    n_clean, n_bad = len(scores) - len(injected), len(injected)
    auc = (rank_sum - n_clean * (n_clean + 1) / 2) / max(n_clean * n_bad, 1)
    return {
        "dropped": len(dropped),
        "injected": len(injected),
        "dropped_injected": hit,
        "precision": round(hit / max(len(dropped), 1), 4),
        "recall": round(hit / max(len(injected), 1), 4),
        "roc_auc": round(auc, 4),
    }


# ----------------------------------------------------------------------------- the run


def _args(ap: Any) -> None:
    ap.add_argument("--noise", type=float, default=0.3,
                    help="share of the training captions replaced by another photo's")  # fmt: skip
    ap.add_argument("--seed", type=int, default=0, help="seed of the injected captions")
    ap.add_argument("--train-images", type=int, default=None, metavar="N",
                    help="train on the first N training photos (hash order; default: all)")  # fmt: skip
    ap.add_argument("--curate-by", choices=("auto", "stage", "script"), default="auto",
                    help="row (c): the curate stage in its mmpipe run (auto: when mmpipe has "
                    "one), or the same rule in this script before the run")  # fmt: skip
    ap.add_argument("--rows", nargs="*", choices=[*ROWS, "stage"], default=None,
                    help="only these rows (kept in --work-dir for the full run); stage: only "
                    "the curate stage's groups and speed")  # fmt: skip
    ap.add_argument("--stage-sizes", nargs="*", type=int, default=None, metavar="N",
                    help="curate's speed on N resized copies of the photos (default: 10000 "
                    "100000; none: skip the stage's figures)")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_readme_args("curation", __doc__, "runs/curation", argv, FULL,
                             publish, extra=_args)  # fmt: skip
    if args is None:  # --readme-from: done
        return 0
    if not 0 < args.noise < 1:
        raise SystemExit(f"--noise {args.noise}: must be between 0 and 1")
    work = args.work_dir.resolve()
    test_images = 20 if args.smoke else 1000
    data = rr.DATA
    if args.smoke:  # 60 photos: 40 to train, 20 to test
        data = work / "smoke-data"
        lines = (rr.DATA / "captions.jsonl").read_text().splitlines()[: 60 * 5]
        write_collection(data, rr.DATA, [json.loads(line) for line in lines])
    train, test = rr.split_collection(data, work, test_images)
    train = subset(train, work / f"train-{args.train_images}", args.train_images)
    clean_rows = _rows(train)
    noisy_rows, injected = inject_noise(clean_rows, args.noise, args.seed)
    noisy = write_collection(work / "noisy-data", train, noisy_rows)
    (noisy / "injected.json").write_text(json.dumps(injected))
    overrides = [*SMOKE, *rr.FROZEN] if args.smoke else FULL
    threads = max(1, os.cpu_count() or 1)
    keep_fraction = round(1 - args.noise, 6)
    result: dict[str, Any] = {
        "mode": "smoke" if args.smoke else "full", "overrides": overrides,
        "machine": machine(),
        "data": str(data.relative_to(REPO.parent)) if data.is_relative_to(REPO.parent)
        else str(data),
        "train_images": len({r["image"] for r in clean_rows}), "train_captions": len(clean_rows),
        "train_images_arg": args.train_images,
        "noise": args.noise, "seed": args.seed, "injected": len(injected),
        "injected_sha256": hashlib.sha256(json.dumps(injected).encode()).hexdigest(),
        "rows": {},
    }  # fmt: skip
    wanted = set(args.rows or [*ROWS, "stage"])
    for key, collection in (("noisy", noisy), ("clean", train)):
        if key in wanted:
            result["rows"][key] = run_row(work / key, collection, test, overrides, threads)
    if "curated" in wanted:
        model = work / "noisy" / "models" / "best.pt"
        if not model.is_file():
            raise SystemExit(f"curation: row (c) needs row (b)'s model {model}: run row noisy")
        lines = {d["line"] for d in injected}
        if curate_by(args.curate_by) == "stage":  # the curate stage inside row (c)'s mmpipe run
            sets = [f"curate.scorer={model}", f"curate.keep_fraction={keep_fraction}"]
            row = run_row(work / "curated", noisy, test, [*overrides, *sets], threads,
                          {"scorer_sha256": _sha(model)})  # fmt: skip
            result["curation"] = stage_facts(work / "curated", keep_fraction, lines)
        else:  # the same rule, here: mmpipe.retrieval's embedding code, then train on the rest
            result["curation"], curated = curate_in_script(model, noisy, work, keep_fraction, lines)
            row = run_row(work / "curated", curated, test, overrides, threads)
        result["rows"]["curated"] = row
    sizes = args.stage_sizes
    if sizes is None:
        sizes = [200] if args.smoke else [10_000, 100_000]
    if "stage" in wanted and curate_by(args.curate_by) == "stage" and args.stage_sizes != []:
        result["stage"] = stage_figures(work, data, sizes)
    if set(result["rows"]) != set(ROWS):
        print(json.dumps({k: v["scores"] for k, v in result["rows"].items()}, indent=2))
        print(json.dumps(result.get("stage"), indent=2))
        return 0  # --rows: a part of the table, saved in its project for the next run
    from mmpipe import metrics as M

    owner = [i for i, c in enumerate(rr._caption_counts(test)) for _ in range(c)]
    chance = M.retrieval_chance(owner, len(set(owner)), KS)
    result["chance"] = {way: {f"R@{k}": chance[way][k] for k in KS} for way in ("i2t", "t2i")}
    result["recovered"] = recovered(result["rows"])
    return save_readme_table("curation", args, result, markdown, lambda _: publish(result))


def curate_by(choice: str) -> str:
    """``stage`` when asked, or for ``auto`` when mmpipe has a curate stage with a scorer."""
    if choice != "auto":
        return choice
    from mmpipe import config

    section = getattr(config, "CurateParams", None)
    return "stage" if section is not None and "scorer" in section.model_fields else "script"


def stage_facts(project: Path, keep_fraction: float, injected: set[int]) -> dict[str, Any]:
    """The curate stage's work in ``project``: its report, its time, and its rejects and scores
    mapped back to caption lines (ingest's records: caption_id -> line)."""
    import re

    import pyarrow.parquet as pq

    data = project / "data"
    records = pq.read_table(data / "ingest" / "records.parquet", columns=["caption_id", "line"])
    line_of = dict(zip(records["caption_id"].to_pylist(), records["line"].to_pylist(), strict=True))
    scored = pq.read_table(data / "curate" / "scores.parquet", columns=["caption_id", "score"])
    scores = [0.0] * len(line_of)
    for cid, value in zip(
        scored["caption_id"].to_pylist(), scored["score"].to_pylist(), strict=True
    ):
        scores[line_of[cid] - 1] = float("-inf") if value is None else float(value)
    dropped = set()
    for text in (data / "curate" / "rejects.jsonl").read_text().splitlines():
        reject = json.loads(text)
        if reject["kind"] == "pair":
            dropped.add(line_of[reject["id"]] - 1)
    report = json.loads((data / "curate" / "report.json").read_text())
    took = re.findall(
        r"mmpipe\.curate: curate: .* in ([0-9.]+) ?s\b", (project / "run.log").read_text()
    )
    return {
        "by": "stage",
        "scorer": "row (b)'s best.pt (curate.scorer)",
        "rule": f"curate.keep_fraction={keep_fraction:g} (1 - noise)",
        "keep_fraction": keep_fraction,
        "pairs_in": report["pairs"]["in"],
        "kept": report["pairs"]["kept"],
        "report": report,
        "stage_log_seconds": [float(t) for t in took][-3:],
        **detection(scores, dropped, injected),
    }


def curate_in_script(
    model: Path, noisy: Path, work: Path, keep_fraction: float, injected: set[int]
) -> tuple[dict[str, Any], Path]:
    """Score every noisy pair with ``model``, keep the top ``keep_fraction``: the curation
    facts and the curated collection (``work/curated-data``)."""
    import time

    started = time.perf_counter()
    scores = score_pairs(model, noisy)
    seconds = time.perf_counter() - started
    kept = keep_top(scores, keep_fraction)
    rows = _rows(noisy)
    dropped = set(range(len(rows))) - set(kept)
    curated = write_collection(work / "curated-data", noisy, [rows[i] for i in kept])
    facts = {
        "by": "script",
        "scorer": "row (b)'s best.pt",
        "rule": f"keep the top {keep_fraction:g} of the pairs by score (1 - noise)",
        "keep_fraction": keep_fraction,
        "pairs_in": len(rows),
        "kept": len(kept),
        "scoring_seconds": round(seconds, 1),
        **detection(scores, dropped, injected),
    }
    return facts, curated


def recovered(rows: dict[str, Any]) -> dict[str, float | None]:
    """(c - b) / (a - b) of R@1 each way: the share of the noise's cost curation won back."""
    out: dict[str, float | None] = {}
    for way in ("i2t", "t2i"):
        a, b, c = (rows[k]["scores"][way]["R@1"] for k in ROWS)
        out[way] = round((c - b) / (a - b), 3) if a != b else None
    return out


# ----------------------------------------------------------------------------- the stage's figures


def variants(data: Path, dest: Path, n: int) -> Path:
    """A folder of ``n`` JPEGs made from ``data``'s photos (photo i of k: resized to one of
    several sides and re-encoded at one of several qualities, variant = i // photos), each with
    the photo's first caption: near-copies by construction. Kept when already complete."""
    from PIL import Image

    done = dest / "captions.jsonl"
    if done.is_file() and len(done.read_text().splitlines()) == n:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "images").mkdir(parents=True)
    first: dict[str, str] = {}
    for r in _rows(data):
        first.setdefault(r["image"], r["caption"])
    photos = sorted(first)
    sides, qualities = (224, 200, 180, 160, 144, 128, 112), (95, 85, 75, 65, 55)
    lines = []
    for i in range(n):
        v, photo = divmod(i, len(photos))
        name = f"images/v{v:03d}_{Path(photos[photo]).stem}.jpg"
        with Image.open(data / photos[photo]) as im:
            side = sides[v % len(sides)]
            im.convert("RGB").resize((side, side)).save(
                dest / name, quality=qualities[(v // len(sides)) % len(qualities)]
            )
        lines.append(json.dumps({"image": name, "caption": first[photos[photo]]}) + "\n")
    done.write_text("".join(lines))
    return dest


def _timed(cmd: list[str], log: Path) -> dict[str, float]:
    """Run ``cmd`` (in the repo, output to ``log``): its wall seconds, CPU seconds (its own and
    its waited-for children's) and peak RSS in MiB, from wait4."""
    import subprocess
    import time

    started = time.perf_counter()
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[2:4])} failed ({proc.returncode}); see {log}")
    return {"wall_s": round(time.perf_counter() - started, 2),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
            "max_rss_mib": round(usage.ru_maxrss / 1024, 1)}  # fmt: skip


def stage_on(project: Path, sets: list[str], workers: int = 1) -> dict[str, Any]:
    """``mmpipe ingest`` then ``mmpipe curate`` (params.yaml's defaults and ``sets``; no scorer;
    ``workers`` hashing processes) in ``project``: the groups, and curate's images/s per core
    (images / CPU seconds of the stage: load on the shared cores does not count)."""
    project.mkdir(parents=True, exist_ok=True)
    base = [sys.executable, "-m", "mmpipe"]
    over = [a for o in [*sets, f"curate.workers={workers}"] for a in ("--set", o)]
    env_sets = ["--params", str(REPO / "params.yaml"), "--project-dir", str(project), *over]
    _timed([*base, "ingest", *env_sets], project / "stage.log")
    took = _timed([*base, "curate", *env_sets], project / "stage.log")
    report = json.loads((project / "data" / "curate" / "report.json").read_text())
    near, images = report["near_duplicates"] or {}, report["images"]["in"]
    return {
        "images": images,
        "groups": near.get("groups", 0),
        "grouped_images": near.get("images_in_groups", 0),
        "largest_group": near.get("largest_group", 0),
        "workers": workers,
        **took,
        "images_per_s_per_core": round(images / took["cpu_s"], 1) if took["cpu_s"] else None,
    }


def stage_figures(work: Path, data: Path, sizes: list[int]) -> dict[str, Any]:
    """Near-duplicate groups on ``data`` and on the synthetic default, and curate's speed on
    ``sizes`` re-encoded/resized copies of ``data``'s photos; each kept in ``work/stage``."""
    out: dict[str, Any] = {}
    folder = ["ingest.source=folder", "ingest.captions=captions.jsonl", "ingest.image_check=header"]
    near = ["curate.near_duplicates=true"]  # off in params.yaml: the figures are the grouping's
    cases = [(data.name, [*folder, f"ingest.root={data}", *near]), ("synthetic default", near)]
    for n in sizes:
        root = variants(data, work / "stage" / f"variants-{n}", n)
        cases.append((f"{n:,} resized/re-encoded copies", [*folder, f"ingest.root={root}", *near]))
    for name, sets in cases:
        project = work / "stage" / name.split()[0].replace(",", "")
        saved = project / "figures.json"
        if saved.is_file() and json.loads(saved.read_text()).get("sets") == sets:
            out[name] = json.loads(saved.read_text())["figures"]
            continue
        print(f"curation: the curate stage on {name} ...", flush=True)
        shutil.rmtree(project, ignore_errors=True)
        out[name] = stage_on(project, sets)
        saved.write_text(json.dumps({"sets": sets, "figures": out[name]}, indent=2))
    return out


# ----------------------------------------------------------------------------- the table


def _cells(scores: dict[str, Any]) -> str:
    return " | ".join(f"{scores[way][f'R@{k}']:.3f}" for way in ("i2t", "t2i") for k in KS)


def _names(result: dict[str, Any]) -> dict[str, str]:
    return {"clean": "(a) clean captions",
            "noisy": f"(b) {result['noise'] * 100:g} % of the captions swapped",
            "curated": f"(c) = (b) curated: top {result['curation']['keep_fraction']:g} "
                       "by (b)'s score"}  # fmt: skip


def _share(result: dict[str, Any]) -> str:
    rec = result["recovered"]
    return " / ".join("-" if rec[w] is None else f"{rec[w] * 100:.0f} %" for w in ("i2t", "t2i"))


def _subset(result: dict[str, Any]) -> str:
    if not result.get("train_images_arg"):
        return ""
    return (f" (`--train-images {result['train_images_arg']}`: the first of the training photos "
            "in hash order, to fit the time on shared cores; the default is all 4,000)")  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    """The full table (docs/curation-benchmark.md): rows (a) (b) (c) and chance; the recovered
    share, the filter, the conditions; the curate stage's own figures when measured."""
    rows, m, cur, names = result["rows"], result["machine"], result["curation"], _names(result)
    lines = [
        "| training data | image→text R@1 | R@5 | R@10 | text→image R@1 | R@5 | R@10 | training |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key in ROWS:
        row = rows[key]
        load = "-" if row.get("load_at_start") is None else row["load_at_start"]
        lines.append(f"| {names[key]} | {_cells(row['scores'])} | {row['train_minutes']} min, "
                     f"load {load} |")  # fmt: skip
    lines.append(f"| chance | {_cells(result['chance'])} | - |")
    test = rows["clean"]["scores"]
    se = {way: (test[way]["R@1"] * (1 - test[way]["R@1"]) / n) ** 0.5
          for way, n in (("i2t", test["images"]), ("t2i", test["captions"]))}  # fmt: skip
    lines += [
        "",
        f"Curation recovered **{_share(result)}** of the R@1 the noise cost (image→text / "
        "text→image, (c − b) / (a − b)); one seed, and the binomial standard error of an R@1 "
        f"here is about ±{se['i2t']:.3f} / ±{se['t2i']:.3f} (1 query per photo / per caption). "
        "The filter dropped "
        f"{cur['dropped']:,} of {cur['pairs_in']:,} pairs: precision {cur['precision']:.3f}, "
        f"recall {cur['recall']:.3f} at finding the {cur['injected']:,} injected captions "
        f"(ROC AUC of the score {cur['roc_auc']:.3f}); "
        + (
            "the curate stage did it inside row (c)'s `mmpipe run` (`curate.scorer` = (b)'s "
            f"best.pt, `curate.keep_fraction={cur['keep_fraction']:g}`"
            + (
                f"; its scoring took {cur['stage_log_seconds'][-1]:.0f} s, outside the training "
                "minutes"
                if cur.get("stage_log_seconds")
                else ""
            )
            + "). "
            if cur["by"] == "stage"
            else "this script did it (the stage's rule: cosine of `mmpipe.retrieval`'s "
            "embeddings under (b)'s best.pt, top fraction kept), then row (c)'s `mmpipe run` "
            "trained on the rest. "
        )
        + "Same recipe and epochs for every row "
        f"(`configs/real_photos.yaml`, both towers locked, linear heads, {rr.FROZEN_EPOCHS} "
        f"epochs) on {result['train_images']:,} training photos, "
        f"{result['train_captions']:,} captions (row (c) trains on the {cur['kept']:,} it "
        f"kept){_subset(result)}; "
        "held-out: "
        f"{test['images']:,} other photos, {test['captions']:,} captions, never noised. "
        f"Minutes: the train stage's; load: the 1-minute load average at the row's start on "
        f"{m['cores']} CPU cores ({m['cpu']}, shared with other jobs).",
    ]
    stage = result.get("stage")
    if stage:
        lines += ["", *stage_lines(stage), "", "Groups: images within Hamming distance "
                  "`curate.hash_radius` (4) of a 64-bit perceptual hash, joined "
                  "(`curate.near_duplicates=true`); the copies are each photo resized and "
                  "re-encoded (10,000: two per photo, so 5,000 groups of 2 is every copy found). "
                  "Images/s per core: images / CPU seconds of the whole `mmpipe curate` process "
                  "(start-up included; one hashing process, no scorer), so the load of the "
                  "shared cores does not count."]  # fmt: skip
    return "\n".join(lines)


def stage_lines(stage: dict[str, Any]) -> list[str]:
    """The curate stage's near-duplicate groups and images/s per core, as table rows."""
    lines = ["| curate stage on | images | near-duplicate groups | images in them | images/s "
             "per core | workers |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, f in stage.items():
        rate = "-" if f.get("images_per_s_per_core") is None else f["images_per_s_per_core"]
        lines.append(f"| {name} | {f['images']:,} | {f['groups']:,} | {f['grouped_images']:,} | "
                     f"{rate} | {f.get('workers', '-')} |")  # fmt: skip
    return lines


def readme_markdown(result: dict[str, Any]) -> str:
    """The README's compact block: R@1 per row, the recovered share, a link to the rest."""
    rows, cur = result["rows"], result["curation"]
    names = {"clean": "(a) clean", "noisy": f"(b) {result['noise'] * 100:g} % captions swapped",
             "curated": "(c) (b) curated by its own scores"}  # fmt: skip
    lines = [f"| Flickr8k, {result['train_images']:,} training photos | image→text R@1 | "
             "text→image R@1 |", "|---|---|---|"]  # fmt: skip
    for key in ROWS:
        s = rows[key]["scores"]
        lines.append(f"| {names[key]} | {s['i2t']['R@1']:.3f} | {s['t2i']['R@1']:.3f} |")
    lines += ["", f"`curate` recovered {_share(result)} of the R@1 lost (precision "
              f"{cur['precision']:.2f} at finding the swapped captions): "
              "[docs/curation-benchmark.md](docs/curation-benchmark.md)."]  # fmt: skip
    return "\n".join(lines)


def command(result: dict[str, Any]) -> str:
    """The command that made ``result`` (with its subset and noise when not the defaults)."""
    extra = "" if result.get("noise", 0.3) == 0.3 else f" --noise {result['noise']:g}"
    n = result.get("train_images_arg")
    return COMMAND + (f" --train-images {n}" if n else "") + extra


def update_readme(table: str, cmd: str, readme: Path = REPO / "README.md") -> None:
    """Replace the text between the README's curation markers."""
    update_readme_block(START, END, table, cmd, readme)


def update_docs(table: str, cmd: str, doc: Path = DOC) -> None:
    """Replace the text between docs/curation-benchmark.md's curation markers."""
    update_readme_block(START, END, table, cmd, doc)


def publish(result: dict[str, Any]) -> None:
    """The full table into docs/curation-benchmark.md, the compact one into the README."""
    update_docs(markdown(result), command(result))
    update_readme(readme_markdown(result), command(result))


if __name__ == "__main__":
    sys.exit(main())
