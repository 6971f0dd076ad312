"""mmpipe.align: one-to-many pairing, orphan accounting, leak-free deterministic split."""

from __future__ import annotations

import pandas as pd
import pytest

from mmpipe.align import run_align, split_of
from mmpipe.config import AlignParams
from mmpipe.errors import InputError
from mmpipe.io import read_json, read_jsonl


def align(make_ingest, tmp_path, name="align", p=None, **kw):
    ingest = make_ingest(**kw)
    report = run_align(ingest, p or AlignParams(), tmp_path / name)
    return report, pd.read_parquet(tmp_path / name / "pairs.parquet"), tmp_path / name


def test_one_image_many_captions(make_ingest, tmp_path):
    report, pairs, out = align(make_ingest, tmp_path, n_images=10)
    # images 1..9 carry 1 + k % 3 captions, plus one caption of dup.jpg on image 1's id
    assert report["pairs"] == sum(1 + k % 3 for k in range(1, 10)) + 1 == len(pairs)
    per_image = pairs.groupby("image_id").size()
    assert per_image.max() == 3 and len(per_image) == 9
    assert pairs["pair_id"].equals(pairs["caption_id"])
    assert list(pairs.columns) == [
        "pair_id",
        "image_id",
        "caption_id",
        "caption",
        "label",
        "label_index",
        "split",
        "image_path",
        "source",
        "meta",
        "label_indices",
    ]
    assert set(pairs["image_path"]) <= {
        f"img{k:03d}.{e}" for k in range(10) for e in ("jpg", "png")
    }
    # the file has the counts; the timing is only in the returned dict (log, MLflow)
    assert read_json(out / "report.json") == {k: v for k, v in report.items() if k != "seconds"}


def test_orphans_counted_and_listed(make_ingest, tmp_path):
    report, pairs, out = align(make_ingest, tmp_path, n_images=10)
    assert report["images"] == 10 and report["orphan_images"] == 1
    assert report["captions"] == report["pairs"] + 2
    assert report["orphan_captions"] == 2
    assert report["orphan_captions_by_reason"] == {"image_not_accepted": 2}
    orphans = read_jsonl(out / "orphans.jsonl")
    assert {(o["kind"], o["ref"], o["reason"]) for o in orphans} == {
        ("image", "img000.jpg", "no_caption"),
        ("caption", None, "image_not_accepted"),
        ("caption", "f" * 16, "image_not_accepted"),
    }
    assert not set(o["id"] for o in orphans) & set(pairs["caption_id"])


def test_labels_classes_and_index(make_ingest, tmp_path):
    report, pairs, _ = align(make_ingest, tmp_path, n_images=10)
    assert report["classes"] == ["cat", "dog"]
    for label, index in zip(pairs["label"], pairs["label_index"], strict=True):
        assert index == (-1 if pd.isna(label) else report["classes"].index(label))
    assert (pairs["label_index"] == -1).any()
    labelled = int(pairs["label"].notna().sum())
    assert (
        report["labelled_pairs"] == labelled and report["unlabelled_pairs"] == len(pairs) - labelled
    )
    assert sum(report["labelled_pairs_per_split"].values()) == labelled
    assert report["pairs_per_class"] == pairs["label"].value_counts().to_dict()


def test_unlabelled_and_bucketed_align(make_ingest, tmp_path, monkeypatch):
    """No labels at all: no classes, label_index -1; a tiny bucket size gives the same pairs."""
    import mmpipe.align as align_mod

    ingest = make_ingest(n_images=40)
    records = pd.read_parquet(ingest / "records.parquet")
    records["label"] = None  # an all-null column: Arrow type null, as pandas writes it
    records.to_parquet(ingest / "records.parquet", index=False)
    report = run_align(ingest, AlignParams(), tmp_path / "one")
    assert report["classes"] == [] and report["labelled_pairs"] == 0
    monkeypatch.setattr(align_mod, "BUCKET_ROWS", 4)  # -> 2 hex digits: many buckets
    run_align(ingest, AlignParams(), tmp_path / "many")
    one = (tmp_path / "one" / "pairs.parquet").read_bytes()
    many = pd.read_parquet(tmp_path / "many" / "pairs.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "one" / "pairs.parquet"), many)
    assert set(many["label_index"]) == {-1} and one


def test_no_leakage_and_duplicates_stay_together(make_ingest, tmp_path):
    _, pairs, _ = align(make_ingest, tmp_path, n_images=40)
    assert pairs.groupby("image_id")["split"].nunique().max() == 1
    dup = pairs[pairs["caption"] == "a duplicate's caption"].iloc[0]
    same_image = pairs[pairs["image_id"] == dup["image_id"]]
    assert len(same_image) > 1 and same_image["split"].nunique() == 1
    assert set(pairs["split"]) == {"train", "val", "test"}
    order = pairs["split"].map({"train": 0, "val": 1, "test": 2})
    assert pairs.assign(o=order).sort_values(["o", "image_id", "pair_id"]).index.tolist() == list(
        range(len(pairs))
    )


def test_split_formula_and_determinism(make_ingest, tmp_path):
    p = AlignParams(train=0.5, val=0.25, test=0.25, seed=3)
    _, a, _ = align(make_ingest, tmp_path, name="a", p=p, n_images=30)
    _, b, _ = align(make_ingest, tmp_path, name="b", p=p, n_images=30)
    assert a.equals(b)
    assert split_of("0123456789abcdef", p) == split_of("0123456789abcdef", p)
    for iid, split in zip(a["image_id"], a["split"], strict=True):
        assert split == split_of(iid, p)
    other = AlignParams(train=0.5, val=0.25, test=0.25, seed=4)
    assert [split_of(i, other) for i in a["image_id"]] != list(a["split"])  # seed matters


def test_split_stable_when_data_is_added(make_ingest, tmp_path):
    _, small, _ = align(make_ingest, tmp_path, name="small", n_images=20)
    _, big, _ = align(make_ingest, tmp_path, name="big", n_images=60)
    before = dict(zip(small["image_id"], small["split"], strict=True))
    after = dict(zip(big["image_id"], big["split"], strict=True))
    assert len(after) > len(before)
    assert all(after[i] == s for i, s in before.items())


def test_missing_inputs_name_the_stage_that_makes_them(tmp_path, make_ingest):
    with pytest.raises(
        InputError, match="records.parquet.*curate output not found; run `mmpipe curate` first"
    ):
        run_align(tmp_path / "nothing", AlignParams(), tmp_path / "out")
    ingest = make_ingest()
    pd.read_parquet(ingest / "images.parquet").drop(columns=["rel_path"]).to_parquet(
        ingest / "images.parquet"
    )
    with pytest.raises(InputError, match="images.parquet: missing column.*rel_path"):
        run_align(ingest, AlignParams(), tmp_path / "out")
    assert not (tmp_path / "out" / "report.json").exists()


def _relabel(ingest, labels, separator=None):
    """Rewrite records.parquet's labels (cycled over the rows), as ingest would with a separator."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mmpipe.io import LABEL_SEPARATOR_KEY

    table = pq.read_table(ingest / "records.parquet")
    column = pa.array([labels[i % len(labels)] for i in range(len(table))], pa.string())
    table = table.set_column(table.schema.get_field_index("label"), "label", column)
    if separator:
        table = table.replace_schema_metadata({LABEL_SEPARATOR_KEY: separator})
    pq.write_table(table, ingest / "records.parquet")


def test_multi_labels_become_class_lists(make_ingest, tmp_path):
    """With ingest's label separator, each class of a label is a class; label_indices lists a
    pair's classes (multi-hot), label_index is set only for a one-class label."""
    ingest = make_ingest(n_images=20)
    _relabel(ingest, ["cat|dog", "dog", None, "bird|cat|dog"], separator="|")
    report = run_align(ingest, AlignParams(), tmp_path / "a")
    pairs = pd.read_parquet(tmp_path / "a" / "pairs.parquet")
    assert report["classes"] == ["bird", "cat", "dog"] and report["label_separator"] == "|"
    for label, indices, index in zip(
        pairs["label"], pairs["label_indices"], pairs["label_index"], strict=True
    ):
        names = [] if pd.isna(label) else label.split("|")
        assert [report["classes"][i] for i in indices] == names
        assert index == (report["classes"].index(names[0]) if len(names) == 1 else -1)
    assert report["multi_label_pairs"] == sum(
        not pd.isna(label) and "|" in label for label in pairs["label"]
    )
    counts = pairs["label"].dropna().str.split("|").explode().value_counts().to_dict()
    assert report["pairs_per_class"] == counts


def test_top_k_labels_are_the_train_vocabulary(make_ingest, tmp_path):
    """top_k_labels (VQA's answer vocabulary): the K most frequent train labels are the classes;
    the rest keep their label for evaluation but have no class (counted per split)."""
    ingest = make_ingest(n_images=40)
    _relabel(ingest, ["yes", "yes", "yes", "no", "no", "2", "red", None])
    report = run_align(ingest, AlignParams(top_k_labels=2), tmp_path / "a")
    pairs = pd.read_parquet(tmp_path / "a" / "pairs.parquet")
    train = pairs[pairs["split"] == "train"]["label"].value_counts()
    assert report["classes"] == sorted(train.index[:2]) == ["no", "yes"]
    unknown = pairs["label"].notna() & ~pairs["label"].isin(["yes", "no"])
    assert (pairs.loc[unknown, "label_index"] == -1).all()
    assert pairs.loc[unknown, "label_indices"].map(len).eq(0).all()
    assert report["unknown_label_pairs_per_split"] == {
        s: int(unknown[pairs["split"] == s].sum()) for s in ("train", "val", "test")
    }
    assert report["labelled_pairs"] == int(pairs["label"].notna().sum())  # <unk> is labelled
