"""The `mmpipe` command line: what each command dispatches to, with which params; its help."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmpipe import cli, pipeline
from mmpipe.config import Params
from mmpipe.errors import InputError


@pytest.fixture
def project(tmp_path: Path) -> Path:
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n")
    return tmp_path


@pytest.fixture
def calls(monkeypatch) -> list[tuple]:
    """Record what the CLI asks the pipeline to run instead of running it."""
    seen: list[tuple] = []

    def run_stage(stage, params, layout, *, resume=False, parent_run_id=None):
        seen.append((stage, params, layout.root, resume))
        return {"stage": stage}

    def run_all(params, layout, *, resume=False, until=None):
        seen.append(("all" if until is None else f"all until {until}", params, layout.root, resume))
        return {}

    monkeypatch.setattr(pipeline, "run_stage", run_stage)
    monkeypatch.setattr(pipeline, "run_all", run_all)
    return seen


def test_stage_runs_with_the_projects_params_and_overrides(project, calls, capsys):
    assert cli.main(["align", "--project-dir", str(project), "--set", "align.seed=3"]) == 0
    [(stage, params, root, resume)] = calls
    assert (stage, root, resume) == ("align", project, False)
    assert isinstance(params, Params) and params.train.epochs == 3 and params.align.seed == 3
    assert '"stage": "align"' in capsys.readouterr().out  # the report, as JSON


def test_resume_reaches_train_and_run(project, calls):
    cli.main(["train", "--project-dir", str(project), "--resume"])
    cli.main(["run", "--project-dir", str(project)])
    assert [(c[0], c[3]) for c in calls] == [("train", True), ("all", False)]


def test_run_until_a_stage(project, calls, capsys):
    cli.main(["run", "--project-dir", str(project), "--until", "shard"])
    assert [c[0] for c in calls] == ["all until shard"]
    with pytest.raises(SystemExit):  # argparse: exit 2, the valid choices named
        cli.main(["run", "--project-dir", str(project), "--until", "shrad"])
    assert "invalid choice: 'shrad'" in capsys.readouterr().err


def test_run_until_shard_runs_the_data_stages_only(tmp_path, tiny_overrides):
    from mmpipe.config import load_params
    from mmpipe.layout import Layout

    params = load_params(Path(__file__).parents[2] / "params.yaml", tiny_overrides)
    layout = Layout(tmp_path)
    done = pipeline.run_all(params, layout, until="shard")
    assert list(done) == ["ingest", "curate", "align", "shard"]
    assert (layout.root / "data" / "shards" / "manifest.json").is_file()
    assert not (layout.root / "models").exists()


def test_a_users_error_is_one_line_and_exit_2(project, monkeypatch, capsys):
    def fail(*args, **kwargs):
        raise InputError("data/shards/manifest.json: shard manifest not found")

    monkeypatch.setattr(pipeline, "run_stage", fail)
    assert cli.main(["train", "--project-dir", str(project)]) == 2
    err = capsys.readouterr().err
    assert err == "mmpipe train: error: data/shards/manifest.json: shard manifest not found\n"


def test_predict_asks_the_registry_named_in_params(project, monkeypatch, capsys):
    """`mmpipe predict` reads tracking.* and register.* from the project's params."""
    from mmpipe import predict, tracking

    (project / "params.yaml").write_text(
        "register: {model_name: my-model, alias: best}\ntracking: {uri: 'sqlite:///t.db'}\n"
    )
    seen = {}

    def resolve_model(source, tracking_params, register, layout):
        seen.update(source=source, uri=tracking_params.uri, register=register, root=layout.root)
        return project / "ckpt.pt", {"image_size": 8}

    class FakePredictor:
        profile = None

        def classify_pair(self, image, caption):
            return {"label": "x", "image": image, "caption": caption}

        def trained_on(self):
            return "generated shapes"

    monkeypatch.setattr(tracking, "resolve_model", resolve_model)
    monkeypatch.setattr(predict, "load_predictor", lambda *a, **kw: FakePredictor())
    assert cli.main(["predict", "a.jpg", "a cat", "--project-dir", str(project)]) == 0
    assert seen["source"] is None and seen["uri"] == "sqlite:///t.db"
    assert (seen["register"].model_name, seen["register"].alias) == ("my-model", "best")
    out = capsys.readouterr()
    assert '"caption": "a cat"' in out.out
    # what the model knows goes to stderr, before the answer
    assert "model: models:/my-model@best\ntrained on: generated shapes" in out.err


def test_predict_works_outside_a_project_without_params_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli.main(["predict", "a.jpg", "a cat", "--model", str(tmp_path / "none.pt")])
    assert code == 2  # params defaults applied; the missing checkpoint is the one error
    assert "none.pt: not found" in capsys.readouterr().err


def test_schedule_hands_every_argument_to_flows_schedule(monkeypatch):
    seen = []

    # exec, not a child process: SIGTERM/SIGHUP must reach the process that owns the server
    def execv(exe, argv):
        seen.append(argv)
        raise SystemExit(0)  # a real exec never returns

    monkeypatch.setattr(cli.os, "execv", execv)
    with pytest.raises(SystemExit):
        cli.main(["schedule", "--cron", "0 3 * * *", "--help"])
    assert seen[0][1:] == ["-m", "flows.schedule", "--cron", "0 3 * * *", "--help"]


def test_top_level_help_says_what_mmpipe_is_and_lists_the_commands(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "pipeline for image + text collections" in out
    for command in ("ingest", "train", "evaluate", "register", "run", "predict", "search", "ui"):
        assert f"\n    {command} " in out


def test_stage_help_lists_enum_choices_and_only_the_stages_sections(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())  # help wraps long lines
    assert 'train.fusion = "concat"' in out
    assert (
        "One of: concat, sum, weighted, gated, cross_attention, cross_attention_pooled, "
        "single_stream, late, image_only, text_only." in out
    )
    assert "One of: multiclass, binary, multilabel, regression, vqa, captioning." in out
    assert "tracking.uri" in out and "evaluate.ks" not in out
