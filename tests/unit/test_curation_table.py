"""benchmarks/curation.py: its injected noise, the filter's figures and the README's table."""

from __future__ import annotations

import json

import pytest

from benchmarks import curation as cu
from tests.conftest import readme_table_from


def _rows(n_images=20, captions=5):
    return [{"image": f"images/{i}.jpg", "caption": f"photo {i} caption {c}"}
            for i in range(n_images) for c in range(captions)]  # fmt: skip


def test_noise_replaces_the_share_with_other_photos_captions_and_records_it():
    rows = _rows()
    noisy, injected = cu.inject_noise(rows, 0.3, seed=1)
    assert len(noisy) == len(rows) == 100 and len(injected) == 30
    changed = {i for i, (a, b) in enumerate(zip(rows, noisy, strict=True)) if a != b}
    assert changed == {d["line"] for d in injected}  # exactly the recorded lines changed
    for d in injected:
        line = d["line"]
        assert noisy[line]["image"] == rows[line]["image"] == d["image"]
        donor = noisy[line]["caption"].split()[1]  # "photo <i> caption <c>"
        assert f"images/{donor}.jpg" == d["caption_from"] != d["image"]
    assert cu.inject_noise(rows, 0.3, seed=1) == (noisy, injected)  # seeded
    assert cu.inject_noise(rows, 0.3, seed=2)[1] != injected


def test_keep_top_and_detection():
    scores = [0.9, 0.1, 0.8, 0.2, 0.7, 0.3, 0.5, 0.5]
    kept = cu.keep_top(scores, 0.5)
    assert kept == [0, 2, 4, 6]  # the tie at 0.5: the earlier line
    dropped = set(range(len(scores))) - set(kept)
    d = cu.detection(scores, dropped, injected={1, 3, 7})
    assert (d["dropped"], d["injected"], d["dropped_injected"]) == (4, 3, 3)
    assert d["precision"] == 0.75 and d["recall"] == 1.0
    # AUC over 5 clean x 3 injected pairs: clean 0.3 loses to injected 0.5, and line 6 ties
    # line 7 (half): 13.5 of 15
    assert d["roc_auc"] == pytest.approx(13.5 / 15, abs=1e-4)
    assert cu.detection([0.1, 0.9], {0}, {1})["roc_auc"] == 0.0  # all wrong way round


def test_recovered_share():
    def row(i2t, t2i):
        return {"scores": {"i2t": {"R@1": i2t}, "t2i": {"R@1": t2i}}}

    rows = {"clean": row(0.30, 0.20), "noisy": row(0.20, 0.20), "curated": row(0.26, 0.25)}
    assert cu.recovered(rows) == {"i2t": 0.6, "t2i": None}  # no cost t2i: nothing to recover


def _saved(tmp_path, mode="full", overrides=None):
    def scores(i2t, t2i):
        return {"i2t": {"R@1": i2t, "R@5": 0.5, "R@10": 0.6},
                "t2i": {"R@1": t2i, "R@5": 0.4, "R@10": 0.5}, "images": 1000, "captions": 5000}  # fmt: skip

    def row(i2t, t2i):
        return {"train_minutes": 7.5, "samples_per_s": 40.0, "load_at_start": 3.0,
                "scores": scores(i2t, t2i)}  # fmt: skip

    payload = {
        "mode": mode, "overrides": cu.FULL if overrides is None else overrides,
        "machine": {"cores": 2, "cpu": "Some CPU", "gpu": False},
        "data": "shared/data/flickr8k", "train_images": 4000, "noise": 0.3,
        "chance": {"i2t": {"R@1": 0.005, "R@5": 0.025, "R@10": 0.05},
                   "t2i": {"R@1": 0.001, "R@5": 0.005, "R@10": 0.01}},
        "rows": {"clean": row(0.25, 0.19), "noisy": row(0.20, 0.15), "curated": row(0.24, 0.17)},
        "recovered": {"i2t": 0.8, "t2i": 0.5}, "train_images_arg": 1000,
        "stage": {"flickr8k": {"images": 5000, "groups": 3, "grouped_images": 6, "workers": 1,
                               "images_per_s_per_core": 310.5}},
        "train_captions": 20000,
        "curation": {"by": "stage", "keep_fraction": 0.7, "pairs_in": 20000, "dropped": 6000,
                     "kept": 14000,
                     "injected": 6000, "precision": 0.9, "recall": 0.9, "roc_auc": 0.97},
    }  # fmt: skip
    path = tmp_path / "curation.json"
    path.write_text(json.dumps(payload))
    return path


def test_readme_and_docs_tables_from_a_saved_full_run(tmp_path, monkeypatch):
    doc = tmp_path / "curation-benchmark.md"
    doc.write_text(f"# doc\n{cu.START}\nold\n{cu.END}\n")
    monkeypatch.setattr(cu.update_docs, "__defaults__", (doc,))
    text = readme_table_from(cu, _saved(tmp_path), tmp_path, monkeypatch)
    # the README: R@1 per row, the recovered share and the link
    assert "| (a) clean | 0.250 | 0.190 |" in text
    assert "| (c) (b) curated by its own scores | 0.240 | 0.170 |" in text
    assert "recovered 80 % / 50 % of the R@1" in text and "precision 0.90 at" in text
    assert "(docs/curation-benchmark.md)" in text
    assert "`python -m benchmarks.curation --update-readme --train-images 1000`" in text
    assert "| Flickr8k, 4,000 training photos |" in text
    full = doc.read_text()
    assert "`--train-images 1000`: the first of the training photos" in full
    assert "| flickr8k | 5,000 | 3 | 6 | 310.5 | 1 |" in full
    assert full.startswith("# doc\n") and "old" not in full
    assert "| (a) clean captions | 0.250 | 0.500 | 0.600 | 0.190 | 0.400 | 0.500 | 7.5 min" in full
    assert "| (b) 30 % of the captions swapped | 0.200 |" in full
    assert "| chance | 0.005 |" in full
    assert "recovered **80 % / 50 %**" in full and "6,000 injected" in full
    assert "about ±0.014 / ±0.006" in full  # sqrt(.25 * .75 / 1000), sqrt(.19 * .81 / 5000)
    assert "precision 0.900, recall 0.900" in full and "ROC AUC of the score 0.970" in full
    assert "the curate stage did it" in full and "4,000 training photos" in full


@pytest.mark.parametrize("bad", [{"mode": "smoke"}, {"overrides": ["train.epochs=1"]}])
def test_readme_refuses_a_smoke_or_changed_run(tmp_path, bad):
    with pytest.raises(SystemExit, match="not a full-size run"):
        cu.main(["--readme-from", str(_saved(tmp_path, **bad))])


@pytest.mark.slow
def test_smoke_run_writes_the_table(tmp_path):
    """The whole script on 60 photos, 1 epoch: three rows trained, curated and scored."""
    assert cu.main(["--smoke", "--work-dir", str(tmp_path / "w"), "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "curation.json").read_text())
    assert result["mode"] == "smoke" and set(result["rows"]) == set(cu.ROWS)
    cur = result["curation"]
    assert cur["pairs_in"] == result["train_captions"] == 200
    assert cur["dropped"] == 60 == cur["injected"] == result["injected"]
    assert cur["kept"] + cur["dropped"] == cur["pairs_in"]
    assert 0 <= cur["precision"] <= 1 and 0 <= cur["roc_auc"] <= 1
    assert "| (c) = (b) curated: top 0.7" in result["table"]
