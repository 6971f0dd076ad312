"""The evaluation plots: their data (the rows `dvc plots` reads) and PNG renderings of the same.

Each plot is written twice under ``reports/plots/``: ``<name>.json``, the rows that the
top-level ``plots:`` of ``dvc.yaml`` draws with Vega-Lite (``dvc plots show`` / ``diff``), and
``<name>.png``, the same chart drawn with matplotlib, for eyes without a browser or offline
(the report embeds these). ``PLOT_FIELDS`` is what each JSON row holds, so the ``dvc.yaml``
declarations can be checked against it.

    recall_at_k   k, i2t, t2i, i2t_chance, t2i_chance     one row per K
    ablation      fusion, score                          one row per fusion head (score: the
                                                         task's primary metric, ablation.json
                                                         names it)
    confusion     actual, predicted                      one row per labelled test pair
    training      epoch, train_loss, val_loss (+ val_accuracy when labelled)
    roc           fpr, tpr                               binary task
    predicted_vs_true  true, predicted                   regression task

The PNGs are deterministic for the same data (no timestamps in the files): they are versioned
with the metrics.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mmpipe.io import atomic_path, write_json_atomic

PLOT_FIELDS: dict[str, tuple[str, ...]] = {
    "recall_at_k": ("k", "i2t", "t2i", "i2t_chance", "t2i_chance"),
    "ablation": ("fusion", "score"),
    "confusion": ("actual", "predicted"),
    "training": ("epoch", "train_loss", "val_loss"),
    "roc": ("fpr", "tpr"),
    "predicted_vs_true": ("true", "predicted"),
}
UNIMODAL = ("image_only", "text_only")
_PNG_META = {"Software": None}  # no matplotlib version in the file: same chart, same bytes


def _figure(width: float, height: float) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, 1, figsize=(width, height))


def _save(fig: Any, dest: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(dest) as tmp:
        fig.savefig(tmp, format="png", dpi=100, metadata=_PNG_META)
    plt.close(fig)


def recall_rows(ks: Sequence[int], i2t: dict, t2i: dict, chance: dict) -> list[dict[str, Any]]:
    """One row per K: R@K both ways and the chance level of each direction."""
    return [
        {
            "k": k,
            "i2t": i2t[k],
            "t2i": t2i[k],
            "i2t_chance": chance["i2t"][k],
            "t2i_chance": chance["t2i"][k],
        }
        for k in ks
    ]


def training_rows(history: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The per-epoch curves a reader checks for over-fitting: losses, and val accuracy if any."""
    keep = ("epoch", "train_loss", "val_loss", "val_accuracy", "val_rmse")
    return [{k: row[k] for k in keep if k in row} for row in history]


def plot_recall_at_k(rows: list[dict[str, Any]], dest: Path) -> None:
    """R@K of both directions against K, with each direction's chance level dashed."""
    fig, ax = _figure(5.0, 3.5)
    ks = [r["k"] for r in rows]
    for key, label, colour in (("i2t", "image → text", "C0"), ("t2i", "text → image", "C1")):
        ax.plot(ks, [r[key] for r in rows], marker="o", color=colour, label=label)
        ax.plot(ks, [r[f"{key}_chance"] for r in rows], ls="--", color=colour, alpha=0.5,
                label=f"{label} (chance)")  # fmt: skip
    ax.set(xlabel="K", ylabel="recall@K", ylim=(0, 1.02), xticks=ks, title="Retrieval, test split")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, dest)


def plot_ablation(rows: list[dict[str, Any]], configured: str, metric: str, dest: Path) -> None:
    """The task's primary test metric per fusion head, the configured one dark, unimodal
    baselines grey."""
    fig, ax = _figure(5.5, 0.4 * len(rows) + 1.2)
    names = [r["fusion"] for r in rows]
    acc = [r["score"] for r in rows]
    colours = [
        "#1f4e79" if n == configured else "#9e9e9e" if n in UNIMODAL else "#6fa8dc" for n in names
    ]
    ax.barh(names, acc, color=colours)
    for y, value in enumerate(acc):
        ax.text(value + 0.01, y, f"{value:.3f}", va="center", fontsize=8)
    ax.invert_yaxis()  # in the order evaluated: unimodal baselines first
    top = max(1.0, max(acc)) * 1.1  # errors (rmse, mae) may exceed 1
    ax.set(xlim=(0, top), xlabel=f"test {metric}", title=f"Fusion heads (trained: {configured})")
    _save(fig, dest)


def plot_training(rows: list[dict[str, Any]], dest: Path) -> None:
    """Train and validation loss per epoch; validation accuracy on a second axis if present."""
    fig, ax = _figure(5.5, 3.5)
    epochs = [r["epoch"] for r in rows]
    for key, colour in (("train_loss", "C0"), ("val_loss", "C1")):
        if any(key in r for r in rows):
            ax.plot(epochs, [r.get(key, np.nan) for r in rows], marker="o", color=colour,
                    label=key)  # fmt: skip
    ax.set(xlabel="epoch", ylabel="loss", xticks=epochs, title="Training")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if any("val_accuracy" in r for r in rows):
        acc_ax = ax.twinx()
        acc_ax.plot(epochs, [r.get("val_accuracy", np.nan) for r in rows], marker="s",
                    color="C2", label="val_accuracy")  # fmt: skip
        acc_ax.set(ylabel="val accuracy", ylim=(0, 1.02))
        more = acc_ax.get_legend_handles_labels()
        handles, labels = handles + more[0], labels + more[1]
    ax.legend(handles, labels, fontsize=8, loc="center right")
    _save(fig, dest)


def plot_confusion(cm: np.ndarray, names: list[str], dest: Path) -> None:
    """The confusion matrix with counts in the cells (rows: true class)."""
    size = max(4.0, 0.5 * len(names) + 2)
    fig, ax = _figure(size, size)
    ax.imshow(cm, cmap="Blues", vmin=0)  # 0 = white, so the text colour rule below holds
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set(xlabel="predicted", ylabel="true", title="Confusion matrix, test split")
    for (r, c), v in np.ndenumerate(cm):
        colour = "white" if v > cm.max() / 2 else "black"
        ax.text(c, r, str(v), ha="center", va="center", color=colour, fontsize=8)
    _save(fig, dest)


def plot_points(rows: list[dict[str, Any]], x: str, y: str, dest: Path, diagonal: bool) -> None:
    """A curve (ROC, ``diagonal``: from (0, 0) to (1, 1)) or a scatter (predicted vs true), with
    the y = x line (chance for ROC, perfect for the scatter)."""
    fig, ax = _figure(4.5, 4.5)
    xs, ys = [r[x] for r in rows], [r[y] for r in rows]
    if diagonal:
        ax.plot(xs, ys, lw=1.5)
    else:
        ax.scatter(xs, ys, s=6, alpha=0.5)
    low, high = (0.0, 1.0) if diagonal else (min(xs + ys), max(xs + ys))
    ax.plot([low, high], [low, high], ls="--", c="grey", lw=1)
    ax.set(xlabel=x, ylabel=y)
    _save(fig, dest)


def write_plot(plots_dir: Path, name: str, rows: list[dict[str, Any]], *args: Any) -> None:
    """``<name>.json`` (for dvc plots) and, when there are rows, ``<name>.png``."""
    write_json_atomic(plots_dir / f"{name}.json", rows)
    png = plots_dir / f"{name}.png"
    if not rows:
        png.unlink(missing_ok=True)  # no stale chart of an earlier run beside empty data
        return
    draw = {"recall_at_k": plot_recall_at_k, "ablation": plot_ablation, "training": plot_training}
    draw[name](rows, *args, png)
