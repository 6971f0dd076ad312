"""mmpipe.synthetic: determinism, sizes, idempotence, and the label needing both modalities."""

from __future__ import annotations

import collections
import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmpipe import synthetic
from mmpipe.config import SyntheticParams
from mmpipe.metrics import vqa_normalize
from mmpipe.synthetic import SENTIMENT_WORDS, SHAPE_WORDS, generate, sample_scene, write_question


def _files(d: Path) -> dict[str, bytes]:
    return {
        p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()
    }


def _rows(d: Path) -> list[dict[str, str]]:
    with (d / "captions.csv").open(encoding="utf-8", newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> list[dict[str, str]]:
    """400 images x 2 captions: enough to measure balance and chance levels."""
    out = tmp_path_factory.mktemp("syn") / "big"
    generate(out, SyntheticParams(n_images=400, captions_per_image=2, image_size=32, seed=3))
    return _rows(out)


def test_same_seed_gives_identical_bytes(tmp_path):
    p = SyntheticParams(n_images=12, captions_per_image=2, image_size=48, seed=7)
    generate(tmp_path / "a", p)
    generate(tmp_path / "b", p)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 12 + 2  # images, captions.csv, .complete
    assert a == b


def test_different_seed_gives_different_data(tmp_path):
    generate(tmp_path / "a", SyntheticParams(n_images=5, image_size=32, seed=1))
    generate(tmp_path / "b", SyntheticParams(n_images=5, image_size=32, seed=2))
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert a["images/000000.jpg"] != b["images/000000.jpg"]
    assert a["captions.csv"] != b["captions.csv"]


def test_image_depends_only_on_seed_and_index(tmp_path):
    generate(tmp_path / "small", SyntheticParams(n_images=3, image_size=32))
    generate(tmp_path / "large", SyntheticParams(n_images=9, image_size=32))
    small, large = _files(tmp_path / "small"), _files(tmp_path / "large")
    assert all(small[k] == large[k] for k in small if k.startswith("images/"))


def test_pool_gives_the_same_bytes_as_one_process(tmp_path, monkeypatch):
    monkeypatch.setattr(synthetic, "POOL_MIN_IMAGES", 1)
    p = SyntheticParams(n_images=70, captions_per_image=2, image_size=32)
    generate(tmp_path / "one", p, workers=1)
    generate(tmp_path / "two", p, workers=2)
    assert _files(tmp_path / "one") == _files(tmp_path / "two")


def test_size_and_layout(tmp_path):
    report = generate(tmp_path, SyntheticParams(n_images=7, captions_per_image=3, image_size=40))
    assert report["n_images"] == 7 and report["n_captions"] == 21
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [
        f"{i:06d}.jpg" for i in range(7)
    ]
    rows = _rows(tmp_path)
    assert len(rows) == 21
    assert list(rows[0]) == list(synthetic.COLUMNS)
    assert {r["image"] for r in rows} == {f"images/{i:06d}.jpg" for i in range(7)}
    with Image.open(tmp_path / "images" / "000003.jpg") as im:
        assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (40, 40))


def test_idempotent_skip_and_regenerate_on_change(tmp_path):
    p = SyntheticParams(n_images=4, image_size=32)
    assert generate(tmp_path, p)["skipped"] is False
    stamp = (tmp_path / "images" / "000000.jpg").stat().st_mtime_ns
    assert generate(tmp_path, p)["skipped"] is True
    assert (tmp_path / "images" / "000000.jpg").stat().st_mtime_ns == stamp
    assert generate(tmp_path, p.model_copy(update={"n_images": 6}))["skipped"] is False
    assert len(list((tmp_path / "images").iterdir())) == 6
    assert (tmp_path / ".complete").read_text().strip() == synthetic.params_digest(
        p.model_copy(update={"n_images": 6})
    )
    assert not list(tmp_path.parent.glob(f".{tmp_path.name}.tmp-*"))  # temp dir renamed away


def test_captions_name_main_shape_and_sentiment(big):
    for r in big:
        text = r["caption"].lower()
        assert any(w in text for w in SHAPE_WORDS[r["main_shape"]]), r
        assert any(w in text for w in SENTIMENT_WORDS[r["sentiment"]]), r
        other = "negative" if r["sentiment"] == "positive" else "positive"
        assert not any(w in text.split() for w in SENTIMENT_WORDS[other]), r


def test_captions_are_varied(big):
    assert len({r["caption"] for r in big}) > 0.9 * len(big)
    # several templates: captions start in many different ways
    assert len({r["caption"].split()[0] for r in big}) >= 8


def _best_single_feature_accuracy(rows: list[dict[str, str]], key: str) -> float:
    """Accuracy of the best mapping from one attribute's value to the label."""
    hits = sum((r[key] == "positive") == (r["label"] == "consistent") for r in rows)
    return max(hits, len(rows) - hits) / len(rows)


def test_label_is_balanced_and_needs_both_modalities(big):
    consistent = sum(r["label"] == "consistent" for r in big) / len(big)
    assert 0.43 < consistent < 0.57
    assert _best_single_feature_accuracy(big, "mood") < 0.57
    assert _best_single_feature_accuracy(big, "sentiment") < 0.57
    both = sum((r["mood"] == r["sentiment"]) == (r["label"] == "consistent") for r in big)
    assert 0.9 < both / len(big) < 1.0  # label_noise 0.05 flips a few


def test_label_noise_zero_means_exact_rule(tmp_path):
    generate(tmp_path, SyntheticParams(n_images=60, image_size=16, label_noise=0.0))
    for r in _rows(tmp_path):
        assert (r["label"] == "consistent") == (r["mood"] == r["sentiment"])


def test_mood_is_visible_in_the_palette(tmp_path):
    generate(tmp_path, SyntheticParams(n_images=120, captions_per_image=1, image_size=32))
    rows = _rows(tmp_path)
    agree = 0
    for r in rows:
        with Image.open(tmp_path / r["image"]) as im:
            px = np.asarray(im, dtype=np.float32)
        warm = px[..., 0].mean() > px[..., 2].mean()
        agree += warm == (r["mood"] == "positive")
    assert agree / len(rows) > 0.85  # ~10 % ambiguous images may go either way


def test_questions_need_the_image_text_alone_is_at_the_answer_prior():
    """Question mode: knowing the exact question (the best text-only guess, fitted on half the
    questions) scores no better on the other half than the answer prior of its type, while
    the scene answers every question."""
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(4000):
        scene = sample_scene(rng)
        question, answer, kind = write_question(scene, rng)
        rows.append((question, vqa_normalize(answer), kind))
        if kind == "how many":  # the image answers it: the count of that shape in the scene
            shape = question.removeprefix("how many ").removesuffix("s are there?")
            assert int(vqa_normalize(answer)) == sum(o["shape"] == shape for o in scene["objects"])
    fit, held = rows[::2], rows[1::2]

    def majority(key):
        counts = collections.defaultdict(collections.Counter)
        for row in fit:
            counts[key(row)][row[1]] += 1
        return {k: c.most_common(1)[0][0] for k, c in counts.items()}

    by_question, by_type = majority(lambda r: r[0]), majority(lambda r: r[2])
    for kind in ("what colour", "how many", "is left of"):
        rows_of = [r for r in held if r[2] == kind]
        assert len(rows_of) > 100, kind
        text_only = np.mean([by_question.get(r[0]) == r[1] for r in rows_of])
        prior = np.mean([by_type[kind] == r[1] for r in rows_of])
        assert text_only <= prior + 0.05 and prior < 0.7, (kind, text_only, prior)
