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


# ----------------------------------------------------------------------------- scores


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A checkpoint trained in a tiny run (colour shards, 1 epoch)."""
    from mmpipe.train import run_train
    from tests.conftest import tiny_train_params, write_colour_shards

    root = tmp_path_factory.mktemp("trained")
    shards = write_colour_shards(root / "shards", {"train": 16, "val": 4, "test": 4})
    run_train(shards, tiny_train_params(epochs=1), root / "models")
    return root / "models"


def _scored_project(make_ingest, tmp_path, trained, sub="proj", **kw) -> tuple[dict, Path]:
    from mmpipe import pipeline
    from mmpipe.config import Params
    from mmpipe.layout import Layout

    layout = Layout(tmp_path / sub)
    make_ingest(n_images=12, name=f"{sub}/data/ingest")
    params = Params(curate=CurateParams(scorer=str(trained), workers=1, **kw))
    return pipeline.run_data_stage("curate", params, layout), layout.curate_dir


def test_a_trained_checkpoint_scores_every_pair(make_ingest, tmp_path, trained):
    from mmpipe.predict import load_predictor

    report, out = _scored_project(make_ingest, tmp_path, trained)
    records = pd.read_parquet(out.parent / "ingest" / "records.parquet")
    images = pd.read_parquet(out.parent / "ingest" / "images.parquet").set_index("image_id")
    scores = pd.read_parquet(out / "scores.parquet")
    assert list(scores["caption_id"]) == list(records["caption_id"])
    known = records["image_id"].isin(images.index).to_numpy()
    assert scores["score"].notna().to_numpy().tolist() == known.tolist()
    assert report["scores"]["scored_pairs"] == known.sum()
    assert report["scorer"]["scorer"] == str(trained) and len(report["scorer"]["sha256"]) == 64
    # the score is the cosine of the pair's own image and caption (checked for one pair)
    predictor = load_predictor(trained)
    row = records[known].iloc[3]
    root = out.parent / "ingest" / read_json(out.parent / "ingest" / "report.json")["data_root"]
    image = predictor.embed_images([str(root / images.loc[row["image_id"], "rel_path"])])
    text = predictor.embed_captions([row["caption"]])
    cosine = float((image @ text.T).item() / (image.norm() * text.norm()))
    assert scores.set_index("caption_id").loc[row["caption_id"], "score"] == pytest.approx(
        cosine, abs=1e-5
    )
    check_counts(report, out)


def test_min_score_and_keep_fraction_reject_by_score(make_ingest, tmp_path, trained):
    report, out = _scored_project(make_ingest, tmp_path, trained, "all")
    scores = pd.read_parquet(out / "scores.parquet").dropna()
    cut = float(scores["score"].median())

    report, out = _scored_project(make_ingest, tmp_path, trained, "min", min_score=cut)
    rejects = [r for r in read_jsonl(out / "rejects.jsonl") if r["reason"] == "low_score"]
    assert len(rejects) == (scores["score"] < cut).sum() > 0
    assert all(r["score"] < cut for r in rejects)
    kept = pd.read_parquet(out / "records.parquet")
    kept_scores = scores[scores["caption_id"].isin(kept["caption_id"])]["score"]
    assert len(kept_scores) == len(scores) - len(rejects) and kept_scores.min() >= cut
    check_counts(report, out)

    report, out = _scored_project(make_ingest, tmp_path, trained, "frac", keep_fraction=0.5)
    rejects = [r for r in read_jsonl(out / "rejects.jsonl") if r["reason"] == "below_top_fraction"]
    assert len(rejects) == len(scores) - -(-len(scores) // 2)  # one source: ceil(n / 2) kept
    worst_kept = scores["score"].nlargest(-(-len(scores) // 2)).min()
    assert all(r["score"] <= worst_kept for r in rejects)
    check_counts(report, out)


def test_champion_without_a_champion_scores_nothing(make_ingest, tmp_path, monkeypatch):
    from mmpipe import pipeline
    from mmpipe.config import Params
    from mmpipe.layout import Layout

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    layout = Layout(tmp_path / "proj")
    make_ingest(n_images=6, name="proj/data/ingest")
    params = Params(curate=CurateParams(scorer="champion", min_score=0.5, workers=1))
    report = pipeline.run_data_stage("curate", params, layout)
    assert report["scorer"] == {"scorer": "champion", "resolved": None}
    assert report["scores"] is None and report["pairs"]["rejected"] == 0
    assert not (layout.curate_dir / "scores.parquet").exists()


def test_docs_list_every_curate_reject_reason():
    from tests.conftest import REPO

    page = (REPO / "docs" / "reject-reasons.md").read_text()
    for code, meaning in REJECT_REASONS.items():
        assert f"| `{code}` | {meaning} |" in page, code


def test_semantic_dedup_leaves_no_two_kept_images_above_the_threshold(
    make_ingest, tmp_path, trained
):
    from mmpipe.predict import load_predictor

    kw = dict(semantic_dedup=True, semantic_threshold=0.9, semantic_clusters=1)
    report, out = _scored_project(make_ingest, tmp_path, trained, "sem", **kw)
    sem = report["semantic_dedup"]
    assert sem["removed"] == report["images"]["by_reason"]["semantic_duplicate"] > 0
    assert sem["removed_per_cluster"] == {"0": sem["removed"]}
    check_counts(report, out)
    kept = pd.read_parquet(out / "images.parquet")
    root = out.parent / "ingest" / read_json(out.parent / "ingest" / "report.json")["data_root"]
    emb = load_predictor(trained).embed_images([str(root / r) for r in kept["rel_path"]])
    emb = emb / emb.norm(dim=1, keepdim=True)
    sims = (emb @ emb.T).numpy()
    np.fill_diagonal(sims, -1)
    assert sims.max() <= 0.9 + 1e-5


def test_score_filters_without_a_scorer_are_a_params_error():
    with pytest.raises(ValueError, match="curate.min_score needs curate.scorer"):
        CurateParams(min_score=0.2)


def test_keep_fraction_is_per_source():
    from mmpipe.curate import top_fraction

    scores = np.array([0.9, 0.1, 0.5, 0.8, 0.2, 0.3, np.nan], dtype=np.float32)
    sources = np.array([0, 0, 0, 1, 1, 1, 1])
    eligible = ~np.isnan(scores)
    drop = top_fraction(scores, sources, eligible, 0.5)
    # source 0: ceil(1.5) = 2 kept (0.9, 0.5); source 1: 2 kept (0.8, 0.3); the unscored stays
    assert drop.tolist() == [False, True, False, False, True, False, False]


def test_a_scorer_rejects_an_undecodable_image_by_name_and_scores_the_rest(tmp_path, trained):
    """Default ingest (header): the scorer's decode is the first; an image it cannot decode is
    an image reject with its file, its captions go with it, every other pair is scored as alone."""
    from mmpipe import pipeline
    from mmpipe.config import IngestParams, Params
    from mmpipe.ingest import run_ingest
    from mmpipe.layout import Layout
    from mmpipe.predict import load_predictor
    from tests.unit.test_image_check import check_curate_counts, write_collection

    root = write_collection(tmp_path / "data")
    layout = Layout(tmp_path / "proj")
    run_ingest(IngestParams(source="folder", root=str(root), workers=1), layout.ingest_dir)
    # batch 4: chunks with and without a bad image (the whole chunk, then one by one)
    params = Params(curate=CurateParams(scorer=str(trained), workers=1, batch_size=4))
    report = pipeline.run_data_stage("curate", params, layout)
    rejects = read_jsonl(layout.curate_dir / "rejects.jsonl")
    bad = {r["file"]: r for r in rejects if r["kind"] == "image"}
    assert sorted(bad) == ["images/huffman.jpg", "images/zeroed.png"]
    assert {r["reason"] for r in bad.values()} == {"undecodable_image"}
    assert "not a readable image" in bad["images/huffman.jpg"]["detail"]
    pairs = [r for r in rejects if r["kind"] == "pair"]
    assert len(pairs) == 3 and {r["image_id"] for r in pairs} == {
        r["image_id"] for r in bad.values()
    }
    assert {(r["reason"], r["detail"]) for r in pairs} == {("image_rejected", "undecodable_image")}
    check_curate_counts(report, rejects)
    check_counts(report, layout.curate_dir)
    # every kept pair is scored, as its image and caption embedded alone
    scores = pd.read_parquet(layout.curate_dir / "scores.parquet").dropna()
    kept = pd.read_parquet(layout.curate_dir / "records.parquet")
    assert sorted(scores["caption_id"]) == sorted(kept["caption_id"]) and len(kept) == 9
    predictor = load_predictor(trained)
    rel = pd.read_parquet(layout.ingest_dir / "images.parquet").set_index("image_id")["rel_path"]
    for row in kept.itertuples():
        image = predictor.embed_images([str(root / rel[row.image_id])])
        text = predictor.embed_captions([row.caption])
        cosine = float((image @ text.T).item() / (image.norm() * text.norm()))
        got = scores.set_index("caption_id").loc[row.caption_id, "score"]
        assert got == pytest.approx(cosine, abs=1e-5), row.image_id
