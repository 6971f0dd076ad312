"""docs/params.md, the params reference: current with mmpipe/config.py, every field in it, and
each field's type, default and allowed values read from the pydantic models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, Field, StringConstraints

from mmpipe import paramsdoc
from mmpipe.config import Params

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "params.md"
ROW_KEY = re.compile(r"^\| `([^`]+)` \|", re.M)


def field_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of ``model``, walked here independently of paramsdoc.rows."""
    keys = []
    for name, field in model.model_fields.items():
        keys.append(f"{prefix}{name}")
        ann, item = field.annotation, ""
        if get_origin(ann) is list:
            (ann,), item = get_args(ann), "[]"
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            keys += field_keys(ann, f"{prefix}{name}{item}.")
    return keys


def test_committed_page_is_current():
    assert PAGE.read_text(encoding="utf-8") == paramsdoc.render(), (
        f"docs/params.md is stale: run `make docs` ({paramsdoc.COMMAND}) and commit it"
    )


def test_every_section_has_a_heading_and_every_field_a_row():
    keys = field_keys(Params)
    assert len(keys) > 100 and "train.stages[].lr" in keys and "ingest.audio.min_seconds" in keys
    page = PAGE.read_text(encoding="utf-8")
    assert re.findall(r"^## (\w+)$", page, re.M) == [k for k in keys if "." not in k]
    assert ROW_KEY.findall(page) == [k for k in keys if "." in k]  # the sections' fields, in order


def _row(key: str) -> list[str]:
    (line,) = [r for r in paramsdoc.render().splitlines() if r.startswith(f"| `{key}` |")]
    return [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]


def test_rows_carry_type_default_bounds_and_choices():
    assert _row("ingest.synthetic.captions_per_image")[1:4] == ["int", "`3`", "`>= 1`, `<= 20`"]
    assert _row("ingest.source")[1:4] == [
        "str",
        '`"synthetic"`',
        '`"synthetic"`, `"folder"`, `"coco"`',
    ]
    assert _row("evaluate.ablation")[1:4] == [
        "bool \\| str",
        '`"auto"`',
        '`true`, `false`, `"auto"`',
    ]
    assert _row("train.image_encoder")[3].endswith("matches `^hf:.+`")
    assert _row("train.pretrained")[1:4] == ["str \\| null", "`null`", "matches `^hf:.+`, `null`"]
    assert _row("train.stages")[1:3] == ["list[mapping]", "`[]`"]
    assert _row("train.online_augment[].name")[2] == "required"
    assert _row("ingest.audio")[1:3] == ["mapping", ""]
    assert "&lt;project>" in _row("tracking.uri")[4]  # not an HTML tag on GitHub


class _Item(BaseModel):
    size: int = Field(2, gt=0, lt=10, description="Size | of <it>.")


class _Section(BaseModel):
    """A section: its docstring
    on two lines."""

    mode: Literal["a", "b"] | None = Field(None, description="Mode.")
    name: Annotated[str, StringConstraints(pattern="^x", max_length=5)] = Field("xy")
    tags: dict[str, Any] = Field(default_factory=dict, description="Tags.")
    items: list[_Item] = Field(default_factory=lambda: [_Item(size=3)], description="Items.")


class _Top(BaseModel):
    one: _Section = Field(default_factory=_Section)


def test_render_of_a_small_model():
    """Unions, string constraints, dicts and lists of models, on a model made for the test."""
    assert [(r.key, r.type, r.default, r.allowed) for r in paramsdoc.rows(_Section, "one.")] == [
        ("one.mode", "str | null", "`null`", '`"a"`, `"b"`, `null`'),
        ("one.name", "str", '`"xy"`', "matches `^x`, max length 5"),
        ("one.tags", "dict[str, any]", "`{}`", ""),
        ("one.items", "list[mapping]", '`[{"size": 3}]`', ""),
        ("one.items[].size", "int", "`2`", "`> 0`, `< 10`"),
    ]
    page = paramsdoc.render(_Top)
    assert "## one\n\nA section: its docstring on two lines.\n" in page
    assert "| Size \\| of &lt;it>. |" in page


def test_main_writes_the_page(tmp_path, capsys):
    out = tmp_path / "params.md"
    assert paramsdoc.main(["--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == paramsdoc.render()
    assert capsys.readouterr().out == ""
