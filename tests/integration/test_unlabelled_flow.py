"""The nightly flow on users' real, unlabelled collections (../shared/data), tiny epochs.

No labels: training is contrastive only, evaluate reports retrieval and skips the task metrics
and the ablation (saying why), and the registry compares runs on mean R@1.
"""

from __future__ import annotations

import pytest

from flows.nightly import nightly
from tests.conftest import SHARED_DATA, TINY_OVERRIDES, make_project, read_json

pytestmark = pytest.mark.slow


RETRIEVAL = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10", "mean_r1",
             "median_rank_i2t", "median_rank_t2i")  # fmt: skip


def _check_retrieval_only(project) -> dict:
    metrics = read_json(project / "reports/metrics.json")
    assert all(k in metrics for k in RETRIEVAL), sorted(metrics)
    assert not {"accuracy", "macro_f1", "n_labelled", "fusion_gain"} & set(metrics)
    assert metrics["mean_r1"] == pytest.approx((metrics["i2t_r1"] + metrics["t2i_r1"]) / 2)
    report = read_json(project / "reports/evaluation_report.json")
    assert report["labels"] == "none"
    assert "never trained" in report["skipped"]["task_metrics"]
    assert "no labelled pairs" in report["skipped"]["ablation"]
    train = read_json(project / "models/train_report.json")
    assert train["task_loss"].startswith("off: no labelled train pairs")
    assert all(row["train_task"] == 0.0 for row in train["history"])
    return metrics


def _champion(project):
    import mlflow

    uri = f"sqlite:///{project / '.mmpipe' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions("name='mmpipe-fusion'")
    champion = client.get_model_version_by_alias("mmpipe-fusion", "champion")
    return int(champion.version), {int(v.version): v.tags for v in versions}


def test_flickr30k_sample_stops_right_after_align(harness, shared_data, tmp_path):
    """The README's sample is 2 captioned images (1.jpg with 20 captions, its 3 byte-identical
    copies merged; another with 5): any split leaves at most 1 test image, where R@1 is 1.0
    whatever the model. The flow says so after align, before shard and training (it used to
    train, then evaluate R@K on that one image)."""
    from flows.nightly import UserError

    source = [
        "ingest.source=folder", f"ingest.root={SHARED_DATA / 'flickr30k-sample'}",
        "ingest.captions=captions.jsonl", "align.train=0.5", "align.val=0.0", "align.test=0.5",
        "align.seed=4",
    ]  # fmt: skip
    project = make_project(tmp_path / "proj", TINY_OVERRIDES + source)
    with pytest.raises(UserError) as exc:
        nightly(project_dir=str(project))
    assert exc.value.line == (
        "python -m flows.nightly: error: the test split has 1 images (images per split 1/0/1, "
        "pairs 5/0/20 (train/val/test)): recall@1 needs more than 1; raise align.test "
        "(align.train=0.5, align.val=0, align.test=0.5; the three sum to 1) or add data"
    )
    assert not (project / "models").exists()


def test_coco_mini_without_labels_keeps_the_better_retrieval_champion(
    harness, shared_data, tmp_path
):
    source = ["ingest.source=coco", f"ingest.root={SHARED_DATA / 'coco-mini'}",
              "ingest.captions=captions.json", "ingest.labels_file=null"]  # fmt: skip
    project = make_project(tmp_path / "proj", TINY_OVERRIDES + source)
    first = nightly(project_dir=str(project))
    metrics = _check_retrieval_only(project)
    assert metrics["n_test_images"] >= 2
    # a second night with another seed: the alias goes to whichever has the better mean R@1
    second = nightly(project_dir=str(project), overrides=["train.seed=1", "train.lr=1e-6"])
    assert (first["version"], second["version"]) == (1, 2)
    champion, tags = _champion(project)
    mean_r1 = {v: float(t["mean_r1"]) for v, t in tags.items()}
    assert "accuracy" not in tags[1] and "accuracy" not in tags[2]
    assert champion == (2 if mean_r1[2] > mean_r1[1] else 1)
    assert second["promoted"] == (champion == 2)
