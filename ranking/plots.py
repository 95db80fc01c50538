"""Plots of a run: the loss curve and the precision-recall curves (matplotlib, drawn without a display)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from ranking.files import write_atomically  # noqa: E402


def save_figure(figure: plt.Figure, path: Path) -> Path:
    try:
        return write_atomically(path, lambda f: figure.savefig(f, format="png", dpi=100))
    finally:
        plt.close(figure)


def plot_loss(records: list[dict], path: Path, title: str) -> Path:
    figure, (loss_axes, active_axes) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    for axes, key, label in ((loss_axes, "loss", "loss"), (active_axes, "active_fraction", "active triplets")):
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
    axes.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
             title=f"precision-recall, step {metrics.get('step', '?')}")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    return save_figure(figure, path)
