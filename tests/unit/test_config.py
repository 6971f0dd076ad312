"""params.yaml, the pydantic models and the CLI's --set / --help contract."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from mmpipe.cli import main
from mmpipe.config import Params, ParamsError, Section, flatten, load_params

REPO = Path(__file__).resolve().parents[2]


def test_repo_params_yaml_validates_and_matches_defaults():
    params = load_params(REPO / "params.yaml")
    assert params == Params()  # params.yaml documents the defaults; drift is a bug
    # and spells out every field, so users (and `dvc params diff`) see each one
    written = _keys(yaml.safe_load((REPO / "params.yaml").read_text()))
    assert written == set(flatten(Params()))


def _keys(tree: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _keys(value, f"{prefix}{key}.")
        else:
            out.add(f"{prefix}{key}")
    return out


def test_set_override_parses_yaml_values():
    p = load_params(
        REPO / "params.yaml",
        ["train.fusion=gated", "train.lr=0.01", "train.compile=true", "evaluate.ks=[1, 3]"],
    )
    assert (p.train.fusion, p.train.lr, p.train.compile, p.evaluate.ks) == (
        "gated",
        0.01,
        True,
        [1, 3],
    )


def test_nested_override():
    p = load_params(REPO / "params.yaml", ["ingest.synthetic.n_images=50"])
    assert p.ingest.synthetic.n_images == 50


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.fusoin=gated", "train.fusoin: unknown key"),
        ("trian.lr=1", "trian: unknown key"),
        ("train.fusion=mean", "train.fusion"),
        ("align.train=0.95", "must be 1.0"),
        ("train.lr", "expected section.key=value"),
    ],
)
def test_bad_override_names_the_key(override, fragment):
    with pytest.raises(ParamsError, match=fragment.replace(".", r"\.").replace("[", r"\[")):
        load_params(REPO / "params.yaml", [override])


def test_unknown_key_in_file(tmp_path):
    f = tmp_path / "params.yaml"
    f.write_text(yaml.safe_dump({"shard": {"image_sise": 32}}))
    with pytest.raises(ParamsError, match=r"shard\.image_sise: unknown key"):
        load_params(f)


def _fields(model: type[BaseModel]):
    for name, field in model.model_fields.items():
        yield model.__name__, name, field
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            yield from _fields(ann)


def test_every_field_is_documented():
    missing = [f"{m}.{n}" for m, n, f in _fields(Params) if not f.description]
    assert missing == []


def test_cli_unknown_key_exits_2_with_clear_message(capsys):
    code = main(["params", "--params", str(REPO / "params.yaml"), "--set", "shard.copis=2"])
    assert code == 2
    err = capsys.readouterr().err
    assert "shard.copis: unknown key" in err and "Traceback" not in err


def test_cli_params_applies_override(capsys):
    assert main(["params", "--params", str(REPO / "params.yaml"), "--set", "shard.copies=0"]) == 0
    assert '"copies": 0' in capsys.readouterr().out


def test_cli_reads_the_params_file_of_the_project_dir(tmp_path, monkeypatch, capsys):
    """`mmpipe <stage> --project-dir X` reads X/params.yaml, as `python -m flows.nightly` does."""
    (tmp_path / "proj").mkdir()
    (tmp_path / "proj" / "params.yaml").write_text("shard:\n  copies: 3\n")
    monkeypatch.chdir(tmp_path)  # no params.yaml here
    assert main(["params", "--project-dir", "proj"]) == 0
    assert '"copies": 3' in capsys.readouterr().out


def test_cli_stage_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["shard", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in Params.model_fields["shard"].annotation.model_fields:
        assert f"shard.{name} =" in out


def test_cli_params_path_is_relative_to_the_working_directory(tmp_path, monkeypatch, capsys):
    """`mmpipe run --params configs/x.yaml --project-dir runs/x` (what configs/*.yaml say): the
    file given is the one in the working directory, not runs/x/configs/x.yaml."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "x.yaml").write_text("shard:\n  copies: 5\n")
    (tmp_path / "runs" / "x").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["params", "--params", "configs/x.yaml", "--project-dir", "runs/x"]) == 0
    assert '"copies": 5' in capsys.readouterr().out
    # a relative path given to a process is still the one it meant once the flow resolves it
    from mmpipe.config import add_params_arguments, params_file

    parser = argparse.ArgumentParser()
    add_params_arguments(parser)
    args = parser.parse_args(["--params", "configs/x.yaml", "--project-dir", "runs/x"])
    assert params_file(args.params, args.project_dir) == tmp_path / "configs" / "x.yaml"
