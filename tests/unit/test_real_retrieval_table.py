"""benchmarks/real_retrieval.py: its held-out split and the README's real-photo table."""

from __future__ import annotations

import json

import pytest

from benchmarks import real_retrieval as rr
from tests.conftest import readme_table_from


def _collection(root, n_images=10, captions=3):
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_images):
        (root / "images" / f"{i}.jpg").write_bytes(b"jpeg %d" % i)
        rows += [{"image": f"images/{i}.jpg", "caption": f"photo {i} caption {c}"}
                 for c in range(captions)]  # fmt: skip
    (root / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _images(collection):
    lines = (collection / "captions.jsonl").read_text().splitlines()
    return [json.loads(line)["image"] for line in lines]


def test_split_is_disjoint_complete_and_stable(tmp_path):
    data = _collection(tmp_path / "data")
    train, test = rr.split_collection(data, tmp_path / "w", test_images=4)
    tr, te = _images(train), _images(test)
    assert len(set(te)) == 4 and len(set(tr)) == 6 and not set(tr) & set(te)
    assert len(tr) + len(te) == 30  # every caption goes with its photo
    assert all((test / name).is_file() for name in te)
    again = rr.split_collection(data, tmp_path / "w2", test_images=4)[1]
    assert _images(again) == te  # the same photos every run, on any machine


def _saved(tmp_path, mode="full", overrides=None):
    def scores(i2t, t2i):
        return {"i2t": {"R@1": i2t, "R@5": 0.5, "R@10": 0.6},
                "t2i": {"R@1": t2i, "R@5": 0.4, "R@10": 0.5}, "images": 1000, "captions": 5000}  # fmt: skip

    row = {"train_minutes": 12.5, "samples_per_s": 40.0}
    payload = {
        "mode": mode, "overrides": rr.FULL if overrides is None else overrides,
        "machine": {"cores": 2, "cpu": "Some CPU", "gpu": False},
        "data": "shared/data/flickr8k", "train_images": 4000,
        "chance": {"i2t": {"R@1": 0.005, "R@5": 0.025, "R@10": 0.05},
                   "t2i": {"R@1": 0.001, "R@5": 0.005, "R@10": 0.01}},
        "rows": {"frozen": {**row, "scores": scores(0.18, 0.13)},
                 "recipe": {**row, "scores": scores(0.31, 0.24)}},
    }  # fmt: skip
    path = tmp_path / "real_retrieval.json"
    path.write_text(json.dumps(payload))
    return path


def test_readme_table_from_a_saved_full_run(tmp_path, monkeypatch):
    text = readme_table_from(rr, _saved(tmp_path), tmp_path, monkeypatch)
    assert "| **the recipe** (`configs/real_photos.yaml`) | 0.310 | 0.500 | 0.600 | 0.240 |" in text
    assert "| chance | 0.005 | 0.025 | 0.050 | 0.001 |" in text
    assert "+13.0 / +11.0 points R@1" in text and "1000 test photos" in text
    assert "Karpathy & Fei-Fei 2015" in text and "0.165" in text
    assert "`python -m benchmarks.real_retrieval --update-readme`" in text


@pytest.mark.parametrize("bad", [{"mode": "smoke"}, {"overrides": ["train.epochs=1"]}])
def test_readme_refuses_a_smoke_or_changed_run(tmp_path, bad):
    with pytest.raises(SystemExit, match="not a full-size run"):
        rr.main(["--readme-from", str(_saved(tmp_path, **bad))])
