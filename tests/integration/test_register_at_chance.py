"""Coco-mini without labels, a run at chance. Register keeps the alias off it and
says why, the model card names the task retrieval, and `mmpipe predict` prints valid JSON."""

from __future__ import annotations

import json

import pytest

from mmpipe.cli import main
from tests.conftest import SHARED_DATA, TINY_OVERRIDES

pytestmark = pytest.mark.slow

COCO_UNLABELLED = [
    "ingest.source=coco", f"ingest.root={SHARED_DATA / 'coco-mini'}",
    "ingest.captions=captions.json", "ingest.labels_file=null",
]  # fmt: skip


def _strict(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_coco_mini_unlabelled_at_chance_is_registered_without_the_alias(
    shared_data, tmp_path, capsys
):
    import mlflow

    project = tmp_path / "proj"
    project.mkdir()
    (project / "params.yaml").write_text("{}\n")
    argv = ["run", "--project-dir", str(project)]
    for o in [*TINY_OVERRIDES, *COCO_UNLABELLED, "register.chance_margin=0.1"]:
        argv += ["--set", o]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    register = _strict(capsys.readouterr().out)["register"]
    assert register["metric"] == "mean_r1" and register["chance"] == pytest.approx(0.25)
    assert register["value"] < register["chance_bar"]  # one epoch on 24 images: at chance
    assert (register["promoted"], register["champion_version"]) == (False, None)
    assert register["compared_on"] == "chance" and "does not clear chance" in register["reason"]

    uri = f"sqlite:///{project / '.mmpipe' / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    assert client.get_registered_model("mmpipe-fusion").aliases == {}
    card = client.get_model_version("mmpipe-fusion", "1").description
    assert card.startswith("### mmpipe-fusion v1: retrieval")
    assert "**Not promoted**" in card and "**Promotion rule**" in card

    image = next((SHARED_DATA / "coco-mini" / "images").glob("*.jpg"))
    argv = ["predict", str(image), "a dog on a couch", "--project-dir", str(project)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    out = _strict(capsys.readouterr().out)  # no alias: models/best.pt; no NaN in the JSON
    assert out["confidence"] is None and "without labels" in out["note"]
