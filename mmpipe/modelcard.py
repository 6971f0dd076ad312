"""What a model was trained on, and the model card of a registered version (Markdown).

``training_data(layout)`` summarises the data the shards hold (source, counts per split, labels,
the manifest hash that names this data version); it is stored with the logged model, so
``mmpipe predict`` can say what the champion was trained on. ``render_card`` is the registered
version's description in MLflow: the training data, the task, the metrics against the champion
(and whether it was promoted), the commit and the params.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mmpipe.io import read_json, sha256_file
from mmpipe.layout import Layout
from mmpipe.manifest import MANIFEST, Manifest, read_manifest

# The few numbers a reader compares first (also the registered versions' tags), when present;
# register.metric is always put first.
HEADLINE_METRICS = ("accuracy", "macro_f1", "rmse", "mae", "i2t_r1", "t2i_r1", "fusion_gain")

SOURCES = {
    "synthetic": "mmpipe's generated default data (mmpipe/synthetic.py): coloured shapes on warm "
    "or cool backgrounds, captions that describe them and carry a mood word",
    "folder": "a folder of images with a captions file",
    "coco": "a COCO-captions collection",
}


def _read(path: Path) -> dict[str, Any]:
    return read_json(path) if path.is_file() else {}


def training_data(layout: Layout) -> dict[str, Any]:
    """The data in the project's shards: where it came from, how much, which labels, its hash."""
    manifest_path = layout.shard_dir / MANIFEST
    manifest = read_manifest(layout.shard_dir) if manifest_path.is_file() else Manifest(splits={})
    ingest = _read(layout.ingest_dir / "report.json")
    align = _read(layout.align_dir / "report.json")
    source = ingest.get("source", "unknown")
    return {
        "source": source,
        "description": SOURCES.get(source, f"source {source!r}"),
        "images": (ingest.get("images") or {}).get("accepted", align.get("images")),
        "captions": (ingest.get("captions") or {}).get("accepted", align.get("captions")),
        "rejected": {
            kind: (ingest.get(kind) or {}).get("rejected")
            for kind in ("images", "captions")
            if ingest.get(kind)
        }
        | _shard_rejected(manifest),
        "pairs_per_split": align.get("pairs_per_split")
        or {s: manifest.pairs(s) for s in manifest.splits},
        "classes": list(manifest.classes),
        "labels": manifest.labels,
        "image_size": manifest.image_size,
        "data_hash": sha256_file(manifest_path) if manifest_path.is_file() else None,
    }


def _shard_rejected(manifest: Manifest) -> dict[str, int]:
    """Pairs shard left out (ingest.image_check: header, an image it could not decode)."""
    per_split = manifest.rejected_pairs_per_split
    return {"shard pairs": sum(per_split.values())} if per_split is not None else {}


def _count(n: Any) -> str:
    return f"{int(n):,}" if isinstance(n, int | float) else "?"


def trained_on(data: Mapping[str, Any]) -> str:
    """One line: what the model saw in training (what predict and search print)."""
    parts = [f"{_count(data.get('images'))} images", f"{_count(data.get('captions'))} captions"]
    classes = data.get("classes") or []
    if classes:
        shown = ", ".join(classes[:6]) + (", ..." if len(classes) > 6 else "")
        parts.append(f"labels: {shown}")
    text = f"{data.get('description', 'unknown data')} ({'; '.join(parts)})"
    if data.get("data_hash"):
        text += f", data {str(data['data_hash'])[:12]}"
    return text


def fmt_metric(value: Any) -> str:
    """A metric as people read it: 4 decimals, counts as integers, missing as a dash."""
    if value is None:
        return "–"
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2:
        return f"{int(value):,}"
    if isinstance(value, int | float):
        return f"{value:.4f}"
    return str(value)


def headline(metrics: Mapping[str, Any], metric: str) -> list[str]:
    """The headline metric names present in ``metrics``, ``metric`` first."""
    keys = dict.fromkeys([metric, *HEADLINE_METRICS])
    return [k for k in keys if isinstance(metrics.get(k), int | float)]


def comparison_rows(
    metrics: Mapping[str, Any], champion: Mapping[str, Any] | None, keys: Sequence[str]
) -> list[list[str]]:
    """[metric, this run, champion, change] per key; change signed, '+' is this run's gain."""
    rows = []
    old = (champion or {}).get("metrics") or {}
    for key in keys:
        new, before = metrics.get(key), old.get(key)
        change = "–"
        if isinstance(new, int | float) and isinstance(before, int | float):
            change = f"{new - before:+.4f}"
        rows.append([key, fmt_metric(new), fmt_metric(before), change])
    return rows


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return lines + ["| " + " | ".join(r) + " |" for r in rows]


def decision(registered: Mapping[str, Any]) -> str:
    """One sentence: promoted or not, on which metric, against which champion (or chance)."""
    metric, value = registered.get("metric"), registered.get("value")
    old_v, old = (
        registered.get("previous_champion_version"),
        registered.get("previous_champion_value"),
    )
    if registered.get("compared_on") == "chance":
        return (
            f"**Not promoted**: {metric} {fmt_metric(value)} is at chance (chance "
            f"{fmt_metric(registered.get('chance'))}, needs "
            f"{fmt_metric(registered.get('chance_bar'))}); registered without the "
            f"`{registered.get('alias', 'champion')}` alias."
        )
    if old_v is None:
        return f"**Champion**: the first version of this model ({metric} {fmt_metric(value)})."
    verb = "**Promoted to champion**" if registered.get("promoted") else "**Not promoted**"
    return (
        f"{verb}: {metric} {fmt_metric(value)} against {fmt_metric(old)} of the champion "
        f"v{old_v} ({'better' if registered.get('promoted') else 'not better'})."
    )


def chance_rule(registered: Mapping[str, Any]) -> str:
    """The promotion rule against chance, with this version's numbers (or why it was not checked)."""
    level, bar, margin = (registered.get(k) for k in ("chance", "chance_bar", "chance_margin"))
    metric = registered.get("metric")
    if level is None:
        return f"No chance level was measured for {metric}: promotion did not check it."
    if bar is None or margin is None:
        return f"Chance level of {metric}: {fmt_metric(level)} (not checked: chance_margin null)."
    return (
        f"**Promotion rule**: {metric} must clear its chance level on the test split "
        f"({fmt_metric(level)}: an input-blind guess, or a random ranking for recall) by "
        f"{margin:.0%} of the way to a perfect score, i.e. reach {fmt_metric(bar)} "
        "(register.chance_margin)."
    )


def render_card(
    *,
    registered: Mapping[str, Any],
    metrics: Mapping[str, Any],
    data: Mapping[str, Any],
    task: str,
    champion: Mapping[str, Any] | None,
    commit: str,
    params_note: str,
) -> str:
    """The registered version's description: short, the decision first."""
    name, version = registered.get("model_name", "model"), registered.get("version")
    keys = headline(metrics, str(registered.get("metric", "accuracy")))
    champ = f"champion v{champion['version']}" if champion else "champion"
    splits = data.get("pairs_per_split") or {}
    split_text = ", ".join(f"{s} {_count(n)}" for s, n in splits.items())
    lines = [
        f"### {name} v{version}: {task}",
        "",
        decision(registered),
        "",
        chance_rule(registered),
        "",
        f"**Trained on** {trained_on(data)}.",
        f"Image-caption pairs per split: {split_text or 'unknown'}; labels: {data.get('labels')}.",
        f"Data hash (sha256 of the shard manifest): `{data.get('data_hash') or 'unknown'}`.",
        "",
        *_table(
            ["metric (test split)", f"v{version}", champ, "change"],
            comparison_rows(metrics, champion, keys),
        ),  # fmt: skip
        "",
        f"**Code** commit `{commit}`. **Params** {params_note}.",
    ]
    if data.get("source") == "synthetic":
        lines += [
            "",
            "*Trained on generated shapes, not photos: on real images its answers are not "
            "meaningful (`mmpipe predict` warns about such inputs).*",
        ]
    return "\n".join(lines)
