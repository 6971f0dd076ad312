"""The params reference, ``docs/params.md``, generated from the models in ``mmpipe/config.py``.

    python -m mmpipe.paramsdoc [--output docs/params.md]      (`make docs`)

One section per ``params.yaml`` section (the fields of ``config.Params``), one table each: every
field by its dotted key (``ingest.audio.min_seconds``; the items of a list of objects as
``train.stages[].lr``), its type, default, constraints and allowed values, and its description,
all read from the pydantic fields, so the page says what ``mmpipe <stage> --help`` says. The
output depends only on the models (deterministic); tests/unit/test_paramsdoc.py fails when the
committed page is not what this prints.
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, StringConstraints
from pydantic.fields import FieldInfo

from mmpipe.config import Params
from mmpipe.io import write_bytes_atomic

COMMAND = "python -m mmpipe.paramsdoc --output docs/params.md"
HEADER = f"""\
# Params reference

Every field of `params.yaml`, generated from the pydantic models in `mmpipe/config.py`: do not
edit this page, change a field's `description` and run `make docs`
(`{COMMAND}`); a unit test fails when the page is out of date.
`mmpipe <stage> --help` prints the same fields for one stage;
[stages and artifacts](stages-and-artifacts.md) says which stage reads which section.

Unknown keys are errors, in the file and in `--set section.key=value`. Nested keys are dotted;
`[]` marks the fields of each item of a list. `allowed`: the bounds of a number and the values a
field takes (`null` is allowed where the type says so).
"""
# the attributes of pydantic's constraint metadata (annotated_types.Ge, ...), as a reader writes them
_BOUNDS = {
    "ge": ">=",
    "gt": ">",
    "le": "<=",
    "lt": "<",
    "multiple_of": "multiple of",
    "min_length": "min length",
    "max_length": "max length",
}


@dataclass(frozen=True)
class Row:
    """One field of the reference: its dotted key and the four cells beside it."""

    key: str
    type: str
    default: str
    allowed: str
    description: str


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds, itself or as the items of a list; None otherwise."""
    if get_origin(annotation) is list:
        (annotation,) = get_args(annotation)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return None


def type_name(annotation: Any) -> str:
    """A field's type as a reader writes it in YAML terms: ``int``, ``str | null``, ``list[str]``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is Literal:
        return " | ".join(dict.fromkeys(type(v).__name__ for v in args))
    if origin is Annotated:
        return type_name(args[0])
    if origin in (Union, types.UnionType):
        return " | ".join(dict.fromkeys(type_name(a) for a in args))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]"
    if annotation is Any:
        return "any"
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return "mapping"
    return annotation.__name__


def allowed_values(annotation: Any) -> list[str]:
    """A type's own limits: the values of a ``Literal`` and the patterns of a constrained string,
    also inside unions (``Literal[...] | Annotated[str, pattern]``, ``X | None``)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Literal:
        return [f"`{json.dumps(v)}`" for v in args]
    if origin is Annotated:
        return [c for meta in args[1:] for c in _string_constraints(meta)]
    if origin in (Union, types.UnionType):
        restricted = [allowed_values(a) for a in args]
        if not any(restricted):
            return []  # `int | None`: the type says it all
        return [c for a, r in zip(args, restricted, strict=True) for c in r or _any_of(a)]
    return []


def _any_of(annotation: Any) -> list[str]:
    """An unrestricted member of a union that has restricted ones: ``bool | Literal["auto"]``."""
    if annotation is bool:
        return ["`true`", "`false`"]
    if annotation is type(None):
        return ["`null`"]
    return [f"any {type_name(annotation)}"]


def _string_constraints(meta: Any) -> list[str]:
    if not isinstance(meta, StringConstraints):
        return []
    found = [f"matches `{meta.pattern}`"] if meta.pattern else []
    found += [f"min length {meta.min_length}"] if meta.min_length is not None else []
    return found + ([f"max length {meta.max_length}"] if meta.max_length is not None else [])


def bounds(field: FieldInfo) -> list[str]:
    """The field's numeric and length constraints (``ge=1`` -> ``>= 1``), in declared order; one
    this module does not know is shown as pydantic spells it rather than left out."""
    found = []
    for meta in field.metadata:
        if isinstance(meta, StringConstraints):  # pydantic moves a top-level Annotated's here
            found += _string_constraints(meta)
            continue
        known = [f"`{op} {getattr(meta, a)}`" for a, op in _BOUNDS.items() if hasattr(meta, a)]
        found += known or [f"`{meta!r}`"]
    return found


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return ""  # a nested section: its defaults are the rows below it
    if isinstance(value, list):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    return f"`{json.dumps(value)}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[Row]:
    """A row per field of ``model`` in declared order, each nested model's fields after it."""
    out: list[Row] = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        allowed = bounds(field) + allowed_values(field.annotation)
        out.append(
            Row(
                key=key,
                type=type_name(field.annotation),
                default=_default(field),
                allowed=", ".join(allowed),
                description=" ".join((field.description or "").split()),
            )
        )
        if sub := _model_in(field.annotation):
            item = "[]" if get_origin(field.annotation) is list else ""
            out.extend(rows(sub, f"{key}{item}."))
    return out


def _cell(text: str) -> str:
    """Markdown table cell: ``|`` escaped everywhere; outside code spans ``<`` too, so
    ``<project>`` is text, not an HTML tag."""
    pieces = text.split("`")
    pieces[::2] = [p.replace("<", "&lt;") for p in pieces[::2]]
    return "`".join(pieces).replace("|", "\\|")


def _doc(model: type[BaseModel]) -> str:
    return " ".join((inspect.getdoc(model) or "").split())


def render(model: type[BaseModel] = Params) -> str:
    """The whole page: the header, then per section its docstring and its table."""
    parts = [HEADER]
    for section, field in model.model_fields.items():
        sub = _model_in(field.annotation)
        assert sub is not None, f"{section} is not a section"
        parts.append(f"\n## {section}\n\n{_doc(sub)}\n\n")
        parts.append("| key | type | default | allowed | description |\n|---|---|---|---|---|\n")
        for r in rows(sub, f"{section}."):
            cells = (f"`{r.key}`", r.type, r.default, r.allowed, r.description)
            parts.append("| " + " | ".join(_cell(c) for c in cells) + " |\n")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """CLI: print the page, or write it (atomically) to ``--output``."""
    ap = argparse.ArgumentParser(
        prog="python -m mmpipe.paramsdoc", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--output", help="write the page to this file instead of printing it")
    args = ap.parse_args(argv)
    page = render()
    if args.output:
        write_bytes_atomic(args.output, page.encode("utf-8"))
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
