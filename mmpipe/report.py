"""A human-readable run report (Markdown + a simple HTML page) built from evaluate's outputs.

Reads ``<eval_dir>/metrics.json``, ``ablation.json``, ``plots/confusion_matrix.png`` and
``examples/examples.json`` (retrieval examples whose thumbnails evaluate saved as small PNGs in
``examples/``) and writes ``report.md`` and ``report.html`` beside them, with relative links, so
the directory can be logged to MLflow (by the caller) or opened as is.
"""

from __future__ import annotations

import html
import logging
import math
from pathlib import Path
from typing import Any

from mmpipe.io import read_json, write_bytes_atomic

log = logging.getLogger(__name__)

EXAMPLES_DIR = "examples"
EXAMPLES_JSON = "examples.json"
PLOTS = (  # (title, file in plots/) shown when evaluate wrote them (they depend on the task)
    ("Confusion matrix", "confusion_matrix.png"),
    ("ROC curve", "roc.png"),
    ("Predicted vs true", "predicted_vs_true.png"),
)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4f}"
    return str(value)


def _read(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _md_table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return lines + [""]


def _html_table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _sections(eval_dir: Path) -> list[tuple[str, list[str], list[list[Any]]]]:
    """(title, headers, rows) of every table the report shows."""
    out = []
    metrics = _read(eval_dir / "metrics.json") or {}
    out.append(("Metrics", ["metric", "value"], [[k, v] for k, v in sorted(metrics.items())]))
    ablation = _read(eval_dir / "ablation.json") or {}
    results = ablation.get("results", [])
    if results:  # the task's metrics, whatever the task (accuracy, map, rmse, vqa_accuracy, ...)
        keys = [k for k in results[0] if k not in ("fusion", "score", "seconds")]
        rows = [[r["fusion"], *(r.get(k) for k in keys)] for r in results]
        out.append(("Fusion ablation (heads on frozen features)", ["fusion", *keys], rows))
    by_type = _read(eval_dir / "per_question_type.json") or []
    if by_type:
        rows = [[r["question_type"], r["n"], r["vqa_accuracy"]] for r in by_type]
        out.append(("VQA accuracy per question type", ["question type", "n", "accuracy"], rows))
    per_class = _read(eval_dir / "per_class.json") or []
    cols = ["precision", "recall", "f1", *(["ap"] if per_class and "ap" in per_class[0] else [])]
    rows = [[r["class"], *(r[c] for c in cols), r["support"]] for r in per_class]
    if rows:  # multilabel adds each class's average precision
        out.append(("Per class", ["class", *cols, "support"], rows))
    return out


def _examples(eval_dir: Path) -> list[dict[str, Any]]:
    return _read(eval_dir / EXAMPLES_DIR / EXAMPLES_JSON) or []


def render_markdown(eval_dir: Path, title: str = "mmpipe evaluation") -> str:
    """The report as Markdown (links relative to ``eval_dir``)."""
    lines = [f"# {title}", ""]
    for name, headers, rows in _sections(eval_dir):
        lines += [f"## {name}", "", *_md_table(headers, rows)]
    for title, name in PLOTS:
        if (eval_dir / "plots" / name).is_file():
            lines += [f"## {title}", "", f"![{title.lower()}](plots/{name})", ""]
    examples = _examples(eval_dir)
    if examples:
        lines += ["## Retrieval examples (image → top-3 captions)", ""]
        for ex in examples:
            lines.append(f"![{ex['image_id']}]({EXAMPLES_DIR}/{ex['thumbnail']})")
            lines.append("")
            for hit in ex["top"]:
                mark = "✓" if hit["correct"] else "✗"
                lines.append(f"{hit['rank']}. {mark} {hit['caption']} ({hit['score']:.3f})")
            lines.append("")
    return "\n".join(lines)


def render_html(eval_dir: Path, title: str = "mmpipe evaluation") -> str:
    """The report as a self-contained-structure HTML page (images linked, not embedded)."""
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;margin:2em}td,th{border:1px solid #ccc;"
        "padding:2px 8px}table{border-collapse:collapse;margin-bottom:1em}</style></head>",
        f"<body><h1>{html.escape(title)}</h1>",
    ]
    for name, headers, rows in _sections(eval_dir):
        parts += [f"<h2>{html.escape(name)}</h2>", _html_table(headers, rows)]
    for title, name in PLOTS:
        if (eval_dir / "plots" / name).is_file():
            parts.append(f"<h2>{html.escape(title)}</h2><img src='plots/{name}' width='480'>")
    examples = _examples(eval_dir)
    if examples:
        parts.append("<h2>Retrieval examples</h2>")
        for ex in examples:
            items = "".join(
                f"<li>{'✓' if h['correct'] else '✗'} {html.escape(h['caption'])} "
                f"({h['score']:.3f})</li>"
                for h in ex["top"]
            )
            src = html.escape(f"{EXAMPLES_DIR}/{ex['thumbnail']}")
            parts.append(f"<div><img src='{src}' width='96'><ol>{items}</ol></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(eval_dir: str | Path, title: str = "mmpipe evaluation") -> dict[str, str]:
    """Write report.md and report.html into ``eval_dir``; returns their paths."""
    eval_dir = Path(eval_dir)
    md, page = eval_dir / "report.md", eval_dir / "report.html"
    write_bytes_atomic(md, render_markdown(eval_dir, title).encode("utf-8"))
    write_bytes_atomic(page, render_html(eval_dir, title).encode("utf-8"))
    return {"markdown": str(md), "html": str(page)}
