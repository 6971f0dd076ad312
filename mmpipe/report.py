"""The run report: the page a person opens the morning after (``report.html``, and ``report.md``).

Built from evaluate's outputs in ``reports/`` (metrics.json, ablation.json, per_class.json, the
plots and the retrieval examples) and the run's context (``reports/run.json``, written by
``mmpipe.publish``: date, commit, params, timings, the registered version and the champion it
was compared with). Headline first: was the model promoted, the headline metrics against the
champion, what changed since the champion; then the training curves, retrieval, classification,
the fusion ablation, the data, examples, and every metric and param at the end.

``report.html`` is self-contained (charts and thumbnails embedded as data URIs), so it can be
mailed, opened from MLflow's artifact view or from disk; ``report.md`` links the files beside it.
"""

from __future__ import annotations

import base64
import html
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmpipe.io import read_json, write_bytes_atomic
from mmpipe.modelcard import comparison_rows, headline, trained_on
from mmpipe.objectives import chance_level, metric_of, task_label

log = logging.getLogger(__name__)

EXAMPLES_DIR = "examples"
EXAMPLES_JSON = "examples.json"
CAPTIONS_JSON = "captions.json"  # captioning's examples (evaluate.caption_result)
STAGE_ORDER = ("ingest", "curate", "align", "shard", "train", "evaluate", "register")


# ----------------------------------------------------------------------------- content


@dataclass
class Section:
    """A titled part of the report: paragraphs, tables and images, in order."""

    title: str
    items: list[tuple[Any, ...]] = field(default_factory=list)
    collapsed: bool = False  # <details> in HTML: long lists a reader opens on purpose

    def text(self, markdown: str) -> Section:
        """A paragraph (inline Markdown: **bold**, `code`)."""
        self.items.append(("p", markdown))
        return self

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> Section:
        """A table (cells formatted with ``fmt``)."""
        self.items.append(("table", list(headers), [list(r) for r in rows]))
        return self

    def image(self, path: str, alt: str, width: int = 520) -> Section:
        """An image file relative to the reports directory."""
        self.items.append(("img", path, alt, width))
        return self


def fmt(value: Any, key: str = "") -> str:
    """A cell: counts as integers with separators, rates with 4 decimals, None as a dash."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, int) or (isinstance(value, float) and _is_count(key)):
        return f"{int(value):,}"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _is_count(key: str) -> bool:
    return key.startswith("n_") or key.endswith("_n") or key in ("support", "epochs", "k")


def _read(path: Path) -> Any:
    return read_json(path) if path.is_file() else None


def _verdict(ctx: Mapping[str, Any]) -> tuple[str, str]:
    """(css class, sentence) of the night's outcome."""
    reg = ctx.get("registered")
    if not reg:
        return "neutral", (
            "Not registered: this report comes from `mmpipe evaluate` alone (the nightly flow "
            "registers the model and compares it with the champion)."
        )
    name, version, metric = reg.get("model_name"), reg.get("version"), reg.get("metric")
    value, old = reg.get("value"), reg.get("previous_champion_value")
    old_v = reg.get("previous_champion_version")
    if reg.get("compared_on") == "chance":
        stays = f"the champion v{old_v} stays" if old_v is not None else "no version is champion"
        return "bad", (
            f"{name} v{version} registered, not promoted: {metric} {fmt(value)} is at chance "
            f"(chance {fmt(reg.get('chance'))}, needs {fmt(reg.get('chance_bar'))}); {stays}."
        )
    if old_v is None:
        return (
            "good",
            f"{name} v{version} registered as the first champion ({metric} {fmt(value)}).",
        )
    if reg.get("promoted"):
        return "good", (
            f"{name} v{version} promoted to champion: {metric} {fmt(value)} beats "
            f"{fmt(old)} of v{old_v}."
        )
    return "bad", (
        f"{name} v{version} registered, not promoted: {metric} {fmt(value)} does not beat "
        f"{fmt(old)} of the champion v{old_v}, which stays."
    )


def _facts(ctx: Mapping[str, Any], metrics: Mapping[str, Any]) -> Section:
    params = ctx.get("params") or {}
    train = dict(params.get("train") or {})
    if "task" in train:  # an unlabelled run was scored on retrieval only, whatever train.task
        train["task"] = task_label(str(train["task"]), metrics)
    commit = str(ctx.get("commit", "unknown"))
    if ctx.get("dirty"):
        commit += " (with uncommitted changes)"
    overrides = ctx.get("overrides") or []
    rows = [
        ["date", ctx.get("date", "–")],
        ["run by", ctx.get("origin", "–")],
        ["commit", commit],
        [
            "params",
            f"{ctx.get('params_file')}" + (f" --set {' '.join(overrides)}" if overrides else ""),
        ],
        [
            "model",
            ", ".join(
                f"{k}={train.get(k)}"
                for k in ("task", "image_encoder", "text_encoder", "fusion", "epochs")
                if k in train
            ),
        ],
        ["trained on", trained_on(ctx.get("training_data") or {})],
    ]
    reg = ctx.get("registered") or {}
    if reg:
        rows.append(
            [
                "registered",
                f"{reg.get('model_name')} v{reg.get('version')}, champion is "
                + (f"v{reg['champion_version']}" if reg.get("champion_version") else "none"),
            ]
        )
    runs = {k: v for k, v in (ctx.get("mlflow") or {}).items() if v}
    if runs:
        rows.append(["MLflow runs", ", ".join(f"{k} {v}" for k, v in runs.items())])
    return Section("This run").table(["", ""], rows)


def _headline(metrics: Mapping[str, Any], ctx: Mapping[str, Any]) -> Section:
    configured = ((ctx.get("params") or {}).get("register") or {}).get("metric")
    metric, _ = metric_of(configured, None, metrics)  # null: the task's default
    keys = headline(metrics, metric)
    keys += [k for k in (f"best_unimodal_{metric}", "zero_shot_accuracy") if k in metrics]
    champion = ctx.get("champion")
    label = f"champion v{champion['version']}" if champion else "champion"
    sec = Section("Headline (test split)")
    rows = comparison_rows(metrics, champion, keys)
    for row in rows:  # each metric's chance level, where evaluate measured one
        row.append(fmt(chance_level(row[0], metrics)))
    sec.table(["metric", "this run", label, "change", "chance"], rows)
    n = metrics.get("n_test_pairs")
    if n is not None:
        sec.text(f"{fmt(n, 'n_')} test pairs, {fmt(metrics.get('n_test_images'), 'n_')} images.")
    return sec


def _changes(ctx: Mapping[str, Any]) -> Section | None:
    changes = ctx.get("changes")
    if ctx.get("champion") is None or changes is None:
        return None
    sec = Section(f"What changed since the champion (v{ctx['champion']['version']})")
    old_commit, new_commit = changes.get("commit") or [None, None]
    sec.text(
        "**Code**: "
        + ("same commit" if old_commit == new_commit else f"`{old_commit}` → `{new_commit}`")
        + ". **Data**: "
        + {
            None: "unknown",
            True: "different data (the shard manifest changed)",
            False: "the same data",
        }[changes.get("data")]
        + "."
    )
    diff = changes.get("params") or {}
    if diff:
        sec.table(["param", "champion", "this run"], [[k, *v] for k, v in diff.items()])
    else:
        sec.text("**Params**: the same (data, train and evaluate sections).")
    return sec


def _chart(eval_dir: Path, name: str, title: str) -> tuple[Section, list[dict[str, Any]]]:
    """A section opening with the ``plots/<name>.png`` chart, and the chart's rows (may be [])."""
    sec = Section(title)
    if (eval_dir / "plots" / f"{name}.png").is_file():
        sec.image(f"plots/{name}.png", title.lower())
    return sec, _read(eval_dir / "plots" / f"{name}.json") or []


def _training(eval_dir: Path) -> Section | None:
    sec, rows = _chart(eval_dir, "training", "Training")
    if not rows:
        return None
    keys = [k for k in ("train_loss", "val_loss", "val_accuracy", "val_rmse") if k in rows[-1]]
    return sec.table(["epoch", *keys], [[r["epoch"], *(r.get(k) for k in keys)] for r in rows])


def _retrieval(eval_dir: Path) -> Section | None:
    sec, rows = _chart(eval_dir, "recall_at_k", "Retrieval")
    if not rows:
        return None
    keys = ("k", "i2t", "t2i", "i2t_chance", "t2i_chance")
    return sec.table(
        ["K", "image → text", "text → image", "chance i→t", "chance t→i"],
        [[r.get(k) for k in keys] for r in rows],
    )


TASK_PLOTS = (  # (file in plots/, alt text) drawn when evaluate wrote them: they depend on the task
    ("confusion.png", "confusion matrix"),
    ("roc.png", "ROC curve"),
    ("predicted_vs_true.png", "predicted vs true"),
)


def _classification(eval_dir: Path) -> Section | None:
    """The task head's detail: per-class scores (multilabel: + AP), VQA per question type, and
    the task's charts (confusion matrix, ROC, predicted vs true)."""
    per_class = _read(eval_dir / "per_class.json") or []
    by_type = _read(eval_dir / "per_question_type.json") or []
    charts = [(f"plots/{name}", alt) for name, alt in TASK_PLOTS
              if (eval_dir / "plots" / name).is_file()]  # fmt: skip
    if not (per_class or by_type or charts):
        return None
    sec = Section("Classification" if per_class else "Task metrics in detail")
    for path, alt in charts:
        sec.image(path, alt, 360)
    if per_class:
        cols = ["precision", "recall", "f1", *(["ap"] if "ap" in per_class[0] else [])]
        sec.table(["class", *cols, "support"],
                  [[r.get("class"), *(r.get(c) for c in cols), r.get("support")]
                   for r in per_class])  # fmt: skip
    if by_type:
        sec.table(["question type", "n", "VQA accuracy"],
                  [[r["question_type"], r["n"], r["vqa_accuracy"]] for r in by_type])  # fmt: skip
    return sec


def _ablation(eval_dir: Path) -> Section | None:
    ablation = _read(eval_dir / "ablation.json") or {}
    rows = ablation.get("results") or []
    if not rows:
        return None
    sec = Section("Fusion ablation (heads trained on frozen features)")
    if (eval_dir / "plots" / "ablation.png").is_file():
        sec.image("plots/ablation.png", "fusion ablation")
    keys = [k for k in rows[0] if k not in ("fusion", "score")]  # the task's metrics
    sec.table(["fusion", *keys], [[r["fusion"], *(r.get(k) for k in keys)] for r in rows])
    return sec.text(f"*{ablation.get('note', '')}*")


def _data(ctx: Mapping[str, Any]) -> Section | None:
    data = ctx.get("training_data") or {}
    if not data:
        return None
    rows = [
        ["source", data.get("source")],
        ["images accepted", data.get("images")],
        ["captions accepted", data.get("captions")],
    ]
    rows += [[f"{kind} rejected", n] for kind, n in (data.get("rejected") or {}).items()]
    rows += [[f"{s} pairs", n] for s, n in (data.get("pairs_per_split") or {}).items()]
    rows += [
        ["labels", data.get("labels")],
        ["classes", ", ".join(data.get("classes") or [])],
        ["data hash", data.get("data_hash")],
    ]
    return Section("Data").table(["", ""], rows)


def _examples(eval_dir: Path) -> Section | None:
    examples = _read(eval_dir / EXAMPLES_DIR / EXAMPLES_JSON) or []
    if not examples:
        return None
    sec = Section("Retrieval examples (image → top-3 captions)")
    for ex in examples:
        sec.image(f"{EXAMPLES_DIR}/{ex['thumbnail']}", ex["image_id"], 96)
        tops = [
            f"{h['rank']}. {'✓' if h['correct'] else '✗'} {h['caption']} ({h['score']:.3f})"
            for h in ex["top"]
        ]
        sec.text("  \n".join(tops))
    return sec


def _captions(eval_dir: Path, metrics: Mapping[str, Any]) -> Section | None:
    """Captioning: the decoder's BLEU-4/CIDEr beside the nearest-train-caption baseline, then
    example test images with the generated (beam) caption, the baseline's and the references."""
    if "bleu4" not in metrics:
        return None
    sec = Section("Captioning (beam search vs the nearest train caption)")
    sec.table(["captions", "BLEU-4", "CIDEr"], [
        ["decoder (beam search)", fmt(metrics["bleu4"]), fmt(metrics.get("cider"))],
        ["nearest-neighbour train caption", fmt(metrics.get("nn_bleu4")),
         fmt(metrics.get("nn_cider"))],
    ])  # fmt: skip
    for ex in _read(eval_dir / EXAMPLES_DIR / CAPTIONS_JSON) or []:
        sec.image(f"{EXAMPLES_DIR}/{ex['thumbnail']}", ex["image_id"], 96)
        refs = " / ".join(ex["references"])
        sec.text(f"generated: {ex['generated']}  \nnearest: {ex['nearest']}  \n"
                 f"references: {refs}")  # fmt: skip
    return sec


def _timings(ctx: Mapping[str, Any]) -> Section | None:
    timings = ctx.get("timings") or {}
    if not timings:
        return None
    rows = [[s, f"{timings[s]:.1f}"] for s in STAGE_ORDER if s in timings]
    rows.append(["total", f"{sum(timings.values()):.1f}"])
    return Section("Stage timings (seconds)").table(["stage", "seconds"], rows)


def sections(eval_dir: Path, ctx: Mapping[str, Any] | None = None) -> list[Section]:
    """Every section of the report, headline first."""
    ctx = ctx or {}
    metrics = _read(eval_dir / "metrics.json") or {}
    parts: list[Section | None] = [
        _facts(ctx, metrics) if ctx else None,
        _headline(metrics, ctx),
        _changes(ctx),
        _training(eval_dir),
        _retrieval(eval_dir),
        _classification(eval_dir),
        _ablation(eval_dir),
        _data(ctx),
        _examples(eval_dir),
        _captions(eval_dir, metrics),
        _timings(ctx),
        Section("All metrics", collapsed=True).table(
            ["metric", "value"], [[k, fmt(v, k)] for k, v in sorted(metrics.items())]
        ),
    ]
    if ctx.get("params"):
        import yaml

        dump = yaml.safe_dump(ctx["params"], sort_keys=False)
        parts.append(Section("Params", [("pre", dump)], collapsed=True))
    return [p for p in parts if p is not None]


def title(ctx: Mapping[str, Any] | None) -> str:
    """The report's title: the run's date when known."""
    date = (ctx or {}).get("date")
    return (
        f"mmpipe run of {date.replace('T', ' ').replace('Z', ' UTC')}"
        if date
        else "mmpipe evaluation"
    )


# ----------------------------------------------------------------------------- Markdown


def _md_cell(value: Any) -> str:
    return fmt(value).replace("|", "\\|")


def render_markdown(eval_dir: Path, ctx: Mapping[str, Any] | None = None) -> str:
    """The report as Markdown (images linked relative to ``eval_dir``)."""
    lines = [f"# {title(ctx)}", ""]
    if ctx:
        lines += [f"**{_verdict(ctx)[1]}**", ""]
    for sec in sections(Path(eval_dir), ctx):
        lines += [f"## {sec.title}", ""]
        for item in sec.items:
            kind = item[0]
            if kind == "p":
                lines += [item[1], ""]
            elif kind == "pre":
                lines += ["```yaml", item[1].rstrip(), "```", ""]
            elif kind == "img":
                lines += [f"![{item[2]}]({item[1]})", ""]
            else:
                headers, rows = item[1], item[2]
                lines += ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                lines += ["| " + " | ".join(_md_cell(v) for v in r) + " |" for r in rows] + [""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;
max-width:1100px;padding:1.5em 2em;color:#1d2330;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.3em}h2{font-size:1.2em;margin-top:1.6em;
border-bottom:1px solid #dde2ea;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0 1em}td,th{border:1px solid #d5dae3;
padding:3px 10px;text-align:left;font-variant-numeric:tabular-nums}th{background:#f3f5f8}
.verdict{padding:.8em 1em;border-radius:6px;font-size:1.1em;font-weight:600}
.good{background:#e3f4e5;border:1px solid #8fce97}.bad{background:#fdf0e0;border:1px solid #f0b46c}
.neutral{background:#eef1f6;border:1px solid #c4ccd9}
img{max-width:100%;vertical-align:top;margin:.3em 1em .3em 0}code{background:#f3f5f8;
padding:0 3px}pre{background:#f6f8fa;padding:.8em;overflow:auto}summary{cursor:pointer;
font-weight:600}
"""


def _inline(text: str) -> str:
    """Escape, then the two inline Markdown marks the report uses: **bold**, `code`, *em*."""
    out = html.escape(text)
    for mark, tag in (("**", "strong"), ("`", "code"), ("*", "em")):
        parts = out.split(mark)
        if len(parts) >= 3 and len(parts) % 2 == 1:
            out = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(parts))
    return out.replace("  \n", "<br>")


def _data_uri(path: Path) -> str | None:
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _html_item(item: tuple[Any, ...], eval_dir: Path) -> str:
    kind = item[0]
    if kind == "p":
        return f"<p>{_inline(item[1])}</p>"
    if kind == "pre":
        return f"<pre>{html.escape(item[1])}</pre>"
    if kind == "img":
        src = _data_uri(eval_dir / item[1]) or html.escape(item[1])
        return f"<img src='{src}' alt='{html.escape(item[2])}' width='{item[3]}'>"
    headers, rows = item[1], item[2]
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers) if any(headers) else ""
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(fmt(v))}</td>" for v in r) + "</tr>" for r in rows
    )
    return f"<table>{f'<tr>{head}</tr>' if head else ''}{body}</table>"


def render_html(eval_dir: Path, ctx: Mapping[str, Any] | None = None) -> str:
    """The report as one self-contained HTML page."""
    eval_dir = Path(eval_dir)
    name = html.escape(title(ctx))
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title>",
        f"<style>{_CSS}</style></head><body><h1>{name}</h1>",
    ]
    if ctx:
        css, sentence = _verdict(ctx)
        parts.append(f"<div class='verdict {css}'>{_inline(sentence)}</div>")
    for sec in sections(eval_dir, ctx):
        body = "\n".join(_html_item(item, eval_dir) for item in sec.items)
        if sec.collapsed:
            parts.append(f"<details><summary>{html.escape(sec.title)}</summary>{body}</details>")
        else:
            parts.append(f"<h2>{html.escape(sec.title)}</h2>\n{body}")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(eval_dir: str | Path, ctx: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Write report.md and report.html into ``eval_dir``; returns their paths."""
    eval_dir = Path(eval_dir)
    md, page = eval_dir / "report.md", eval_dir / "report.html"
    write_bytes_atomic(md, render_markdown(eval_dir, ctx).encode("utf-8"))
    write_bytes_atomic(page, render_html(eval_dir, ctx).encode("utf-8"))
    return {"markdown": str(md), "html": str(page)}
