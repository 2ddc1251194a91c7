"""Figure helpers shared by scripts 8-11: file-only matplotlib, atomic saving, line/bar/ECDF/heatmap plots.

matplotlib is imported lazily with the Agg backend, so modules that only write tables never load it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from lib.core.files_and_cache import atomic_path

__all__ = ["pyplot", "save_figure", "line_plot", "bar_plot", "draw_ecdf", "label_ecdf_axes",
           "ecdf_plot", "count_heatmap"]


def pyplot():
    """matplotlib with the file-only backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    """Save a figure atomically and close it."""
    plt = pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "pdf", bbox_inches="tight")
    plt.close(fig)


def line_plot(df: pd.DataFrame, x: str, y: str, hue: str, path: Path, ylabel: str,
              err: str | None = None) -> None:
    """One line per `hue` value (optional ± error column)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, sub in sorted(df.groupby(hue), key=lambda kv: str(kv[0])):
        sub = sub.sort_values(x)
        ax.plot(sub[x], sub[y], marker="o", ms=3, label=str(key))
        if err and err in sub.columns:
            ax.fill_between(sub[x], sub[y] - sub[err], sub[y] + sub[err], alpha=0.2)
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    save_figure(fig, path)


def bar_plot(labels: Sequence[str], values: Sequence[float], path: Path, ylabel: str,
             errors: Sequence[float] | None = None) -> None:
    """A simple bar chart."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 4))
    ax.bar(range(len(labels)), np.nan_to_num(np.asarray(values, float)), yerr=errors)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(ylabel)
    save_figure(fig, path)


def draw_ecdf(ax: Any, vals: np.ndarray, label: str) -> None:
    """Step ECDF of one sample on an axis (NaN dropped; nothing drawn for an empty sample)."""
    v = np.sort(vals[~np.isnan(vals)])
    if v.size:
        ax.step(v, np.arange(1, v.size + 1) / v.size, where="post", label=label)


def label_ecdf_axes(ax: Any, xlabel: str, legend_fontsize: int = 7) -> None:
    """Axis labels of an ECDF panel, and its legend when any curve was drawn."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("ECDF")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=legend_fontsize)


def ecdf_plot(series: dict[str, np.ndarray], path: Path, xlabel: str) -> None:
    """ECDF of several samples."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 4))
    for label, vals in sorted(series.items()):
        draw_ecdf(ax, vals, label)
    label_ecdf_axes(ax, xlabel)
    save_figure(fig, path)


def count_heatmap(piv: pd.DataFrame, path: Path, title: str) -> None:
    """Annotated heatmap of counts (rows = factor values, columns = thresholds)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1 + 0.9 * max(1, piv.shape[1]), 1 + 0.6 * max(1, piv.shape[0])))
    data = piv.to_numpy(float) if piv.size else np.zeros((1, 1))
    ax.imshow(data, aspect="auto", cmap="viridis")
    ax.set_xticks(range(piv.shape[1]))
    ax.set_xticklabels([f"{c:.2f}" for c in piv.columns], fontsize=7)
    ax.set_yticks(range(piv.shape[0]))
    ax.set_yticklabels([str(i) for i in piv.index], fontsize=7)
    for (i, j), v in np.ndenumerate(data if piv.size else np.zeros((0, 0))):
        ax.text(j, i, "NA" if math.isnan(v) else f"{v:.0f}", ha="center", va="center", fontsize=7, color="w")
    ax.set_title(title, fontsize=8)
    save_figure(fig, path)
