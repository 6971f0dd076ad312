"""mmpipe.curate: near-duplicate groups that never straddle splits, the band index, the basic
filters with named rejects, and counts that add up."""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mmpipe.align import run_align, split_of
from mmpipe.config import AlignParams, CurateParams
from mmpipe.curate import REJECT_REASONS, hash_groups, near_pairs, phash, run_curate
from mmpipe.io import read_json, read_jsonl

PHOTOS = Path(__file__).resolve().parents[3] / "shared" / "data" / "flickr8k" / "images"
if not PHOTOS.is_dir():
    PHOTOS = Path("/work/shared/data/flickr8k/images")


def curate(ingest: Path, tmp_path: Path, name: str = "curate", **kw) -> tuple[dict, Path]:
    p = CurateParams(workers=1, **kw)
    root = ingest / read_json(ingest / "report.json")["data_root"]
    return run_curate(ingest, p, tmp_path / name, data_root=root), tmp_path / name


def check_counts(report: dict, out: Path) -> None:
    rejects = read_jsonl(out / "rejects.jsonl")
    for kind, key in (("pair", "pairs"), ("image", "images")):
        c = report[key]
        assert c["in"] == c["kept"] + c["rejected"]
        assert c["rejected"] == sum(r["kind"] == kind for r in rejects)
        assert c["by_reason"] == dict(
            sorted(
                pd.Series([r["reason"] for r in rejects if r["kind"] == kind])
                .value_counts()
                .items()
            )
        )
    assert len(pd.read_parquet(out / "records.parquet")) == report["pairs"]["kept"]
    assert len(pd.read_parquet(out / "images.parquet")) == report["images"]["kept"]
    assert {r["reason"] for r in rejects} <= set(REJECT_REASONS)


# ----------------------------------------------------------------------------- the band index


def test_band_index_finds_every_pair_brute_force_finds():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2)
    # plant near copies: flip 0..6 random bits of some hashes
    near = []
    for h in base[:120]:
        flips = rng.choice(64, size=rng.integers(0, 7), replace=False)
        near.append(h ^ np.uint64(sum(1 << int(f) for f in flips)))
    hashes = np.concatenate([base, np.array(near, dtype=np.uint64)])
    for radius in (0, 2, 4, 6):
        d = np.bitwise_count(hashes[:, None] ^ hashes[None, :])
        i, j = np.nonzero(np.triu(d <= radius, k=1))
        brute = set(zip(i.tolist(), j.tolist(), strict=True))
        a, b = near_pairs(hashes, radius)
        found = {(min(x, y), max(x, y)) for x, y in zip(a.tolist(), b.tolist(), strict=True)}
        assert found == brute and brute, radius
        assert np.all(np.bitwise_count(hashes[a] ^ hashes[b]) <= radius)


def test_groups_join_chains_and_leave_singletons_alone():
    h = np.array([0b0, 0b11, 0b1111, 1 << 40 | 0xFFFF, 0b0], dtype=np.uint64)
    labels = hash_groups(h, np.ones(5, dtype=bool), radius=2)
    assert labels[0] == labels[1] == labels[2] == labels[4] >= 0  # chain 0-2-4 bits + exact copy
    assert labels[3] == -1


# ----------------------------------------------------------------------------- near-copies


def _jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _write_collection(out: Path, root: Path, files: dict[str, bytes]) -> Path:
    """An ingest output (records + images + report) of ``files``: 2 captions per image."""
    root.mkdir(parents=True, exist_ok=True)
    images, records = [], []
    for name, data in files.items():
        (root / name).write_bytes(data)
        image_id = hashlib.sha256(data).hexdigest()[:16]
        w, h = Image.open(io.BytesIO(data)).size
        images.append({"image_id": image_id, "rel_path": name, "sha256": image_id, "width": w,
                       "height": h, "format": "JPEG", "bytes": len(data)})  # fmt: skip
        for c in range(2):
            records.append({"caption_id": f"{name}-{c}", "caption": f"a photo {name} number {c}",
                            "image_ref": name, "image_id": image_id, "label": None,
                            "source": "folder", "line": len(records) + 1, "meta": "{}"})  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(records).to_parquet(out / "records.parquet", index=False)
    pd.DataFrame(images).to_parquet(out / "images.parquet", index=False)
    report = {"data_root": os.path.relpath(root.resolve(), out.resolve())}
    (out / "report.json").write_text(json.dumps(report))
    return out


@pytest.mark.skipif(not PHOTOS.is_dir(), reason="needs ../shared/data/flickr8k")
def test_resized_reencoded_copy_of_a_test_photo_joins_its_group_and_split(tmp_path):
    p = AlignParams()
    photos = sorted(PHOTOS.glob("*.jpg"))[:40]
    files = {f.name: f.read_bytes() for f in photos}
    ids = {n: hashlib.sha256(d).hexdigest()[:16] for n, d in files.items()}
    original = next(n for n in files if split_of(ids[n], p) == "test")
    # a copy at 60 % size, another JPEG quality, whose own id would land in train
    img = Image.open(PHOTOS / original)
    for quality in range(40, 95):
        small = img.resize((img.width * 3 // 5, img.height * 3 // 5), Image.Resampling.BILINEAR)
        copy = _jpeg(small, quality)
        if split_of(hashlib.sha256(copy).hexdigest()[:16], p) == "train":
            break
    else:
        pytest.fail("no quality gives a copy split into train")
    assert bin(phash(img) ^ phash(Image.open(io.BytesIO(copy)))).count("1") <= 4
    files["copy_in_train.jpg"] = copy
    ingest = _write_collection(tmp_path / "ingest", tmp_path / "raw", files)

    report, out = curate(ingest, tmp_path, near_duplicates=True)
    assert report["near_duplicates"]["groups"] >= 1
    images = pd.read_parquet(out / "images.parquet").set_index("rel_path")
    assert images.loc["copy_in_train.jpg", "group_id"] == images.loc[original, "group_id"]
    # the group's id is its smallest image_id
    members = images[images["group_id"] == images.loc[original, "group_id"]]
    assert images.loc[original, "group_id"] == members["image_id"].min()
    check_counts(report, out)

    align = run_align(out, p, tmp_path / "align")
    pairs = pd.read_parquet(tmp_path / "align" / "pairs.parquet").set_index("image_path")
    assert set(pairs.loc[["copy_in_train.jpg", original], "split"]) == {
        split_of(images.loc[original, "group_id"], p)
    }
    near = align["near_duplicates"]
    assert near["contaminated_images"] == 0
    assert near["contaminated_images_if_split_by_image"] >= 1  # what the grouping prevented

    # keep_one_per_group: the larger original stays, the copy is a named reject with its pairs
    report, out = curate(ingest, tmp_path, "one", near_duplicates=True, keep_one_per_group=True)
    rejects = read_jsonl(out / "rejects.jsonl")
    dropped = {r["id"] for r in rejects if r["reason"] == "near_duplicate"}
    assert ids.get("copy_in_train.jpg", hashlib.sha256(copy).hexdigest()[:16]) in dropped
    assert sum(r["reason"] == "image_rejected" for r in rejects) == 2 * len(dropped)
    check_counts(report, out)


# ----------------------------------------------------------------------------- filters


def test_curate_off_leaves_align_byte_identical(make_ingest, tmp_path):
    ingest = make_ingest(n_images=12)
    report, out = curate(ingest, tmp_path)
    assert report["pairs"]["rejected"] == report["images"]["rejected"] == 0
    run_align(ingest, AlignParams(), tmp_path / "direct")
    run_align(out, AlignParams(), tmp_path / "curated")
    for name in ("pairs.parquet", "orphans.jsonl", "report.json"):
        assert (tmp_path / "direct" / name).read_bytes() == (
            tmp_path / "curated" / name
        ).read_bytes()


@pytest.mark.parametrize(
    ("params", "reason"),
    [
        ({"min_caption_words": 4}, "caption_too_few_words"),
        ({"min_caption_chars": 20}, "caption_too_short"),
        ({"languages": ["de"]}, "language"),
        ({"min_image_side": 19}, "image_too_small"),
        ({"max_aspect_ratio": 1.4}, "aspect_ratio"),
    ],
)
def test_each_basic_filter_rejects_with_its_reason(make_ingest, tmp_path, params, reason):
    ingest = make_ingest(n_images=12)
    report, out = curate(ingest, tmp_path, **params)
    check_counts(report, out)
    rejects = read_jsonl(out / "rejects.jsonl")
    assert any(r["reason"] == reason for r in rejects)
    kind = "image" if reason in ("image_too_small", "aspect_ratio") else "pair"
    assert report[f"{kind}s"]["by_reason"][reason] > 0
    if kind == "image":  # its pairs leave with it, named
        assert report["pairs"]["by_reason"]["image_rejected"] > 0
    if report["pairs"]["kept"]:  # what is left aligns, and align's accounting still holds
        align = run_align(out, AlignParams(), tmp_path / "align")
        assert align["pairs"] == report["pairs"]["kept"] - align["orphan_captions"]


def test_an_image_whose_captions_all_go_goes_too(make_ingest, tmp_path):
    ingest = make_ingest(n_images=12)
    report, out = curate(ingest, tmp_path, min_caption_words=50)
    assert report["pairs"]["kept"] == 0
    # every image that had captions is a reject; the orphan image (no caption) stays for align
    assert report["images"]["by_reason"] == {"no_caption_kept": report["images"]["in"] - 1}
    check_counts(report, out)


def test_language_filter_keeps_the_listed_language(make_ingest, tmp_path):
    ingest = make_ingest(n_images=4)
    records = pd.read_parquet(ingest / "records.parquet")
    records.loc[0, "caption"] = "ein Hund läuft über die grüne Wiese im Park"
    records.loc[1, "caption"] = "a dog runs across the green meadow in the park"
    records.to_parquet(ingest / "records.parquet", index=False)
    report, out = curate(ingest, tmp_path, languages=["en"])
    rejects = {r["id"]: r for r in read_jsonl(out / "rejects.jsonl")}
    assert rejects[records.loc[0, "caption_id"]]["detail"] == "de"
    assert records.loc[1, "caption_id"] not in rejects
    check_counts(report, out)
