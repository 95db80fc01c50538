"""Plots of a run: the loss curve and the precision-recall curves (matplotlib, drawn without a display)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ranking.core.files import write_atomically  # noqa: E402


def save_figure(figure: plt.Figure, path: Path) -> Path:
    try:
        return write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=100))
    finally:
        plt.close(figure)


def plot_loss(records: list[dict], path: Path, title: str) -> Path:
    figure, (loss_axes, active_axes) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for axes, key, label in (
        (loss_axes, "train/loss", "loss"),
        (active_axes, "train/active_fraction", "active triplets"),
    ):
        points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
        axes.plot(*zip(*points) if points else ([], []), linewidth=1.2)
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    active_axes.set_ylim(0, 1.05)
    active_axes.set_xlabel("step")
    loss_axes.set_title(f"training of {title}: loss and share of active (margin-violating) triplets")
    figure.tight_layout()
    return save_figure(figure, path)


def plot_pr_curve(metrics: dict, path: Path) -> Path:
    figure, axes = plt.subplots(figsize=(6, 5))
    for split in sorted(metrics.get("pr_curve", {}), key=lambda s: (s != "train", s)):
        curve = metrics["pr_curve"][split]
        mean_ap = metrics["splits"].get(split, {}).get("map", math.nan)
        axes.plot(curve["recall"], curve["precision"], label=f"{split} (mAP {mean_ap:.3f})")
    axes.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title=f"precision-recall, step {metrics.get('step', '?')}",
    )
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)


def plot_comparison(runs: dict[str, tuple[list[dict], dict | None]], path: Path, val_key: str | None) -> Path:
    """Overlaid curves of several runs: loss, the validation metric ``val_key`` over steps (if any run logged it),
    and the val PR curve of each run's newest evaluation. ``runs``: name -> (metrics.jsonl records, metrics.json)."""
    figure, (loss_axes, val_axes, pr_axes) = plt.subplots(1, 3, figsize=(16, 4.8))
    for name, (records, metrics) in runs.items():
        (line,) = loss_axes.plot(*_series(records, "train/loss"), linewidth=1.2, label=name)
        if val_key is not None:
            val_axes.plot(
                *_series(records, val_key), marker="o", markersize=3, linewidth=1.2, label=name, color=line.get_color()
            )
        curve = (metrics or {}).get("pr_curve", {}).get("val")
        if curve:
            pr_axes.plot(
                curve["recall"],
                curve["precision"],
                linewidth=1.2,
                color=line.get_color(),
                label=f"{name} (step {metrics.get('step', '?')})" if metrics else name,
            )
    loss_axes.set(xlabel="step", ylabel="loss", title="training loss")
    val_axes.set(
        xlabel="step",
        ylabel=val_key or "",
        ylim=(0, 1.02),
        title=f"validation during training: {val_key}" if val_key else "no validation during training",
    )
    pr_axes.set(
        xlabel="recall",
        ylabel="precision",
        xlim=(0, 1),
        ylim=(0, 1.02),
        title="val precision-recall (newest evaluation)",
    )
    for axes in (loss_axes, val_axes, pr_axes):
        axes.grid(alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=8)
    figure.tight_layout()
    return save_figure(figure, path)


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return ([p[0] for p in points], [p[1] for p in points]) if points else ([], [])
