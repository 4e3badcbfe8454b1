"""Figures of the `performance` metric: losses and accuracies at the evaluated steps.

Evaluations are few (once per epoch by default), so they are drawn as markers, never joined
by lines. A series that carries no information (an accuracy saturated at 100% at every
evaluation after the first, as top-5 on a 10-class problem) is named in the legend instead of
being drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from Utils.figures.axes import (
    empty_panel,
    lr_drop_handle,
    mark_lr_drops,
    plot_xy,
    spans_decades,
    use_log,
)
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, open_cache, run_title
from Utils.figures.grid import varying_hyperparameters
from Utils.figures.runs import Run
from Utils.figures.style import Options, hp_text, layer_colors, new_figure

LOSSES = (("train_loss", "train", "o"), ("test_loss", "test", "s"))
ACCURACIES = (
    ("train_top1", "train top-1", "o"),
    ("top1", "test top-1", "s"),
    ("top5", "test top-5", "^"),
)
# An accuracy at or above this (percent) at every evaluation after the first is saturated.
SATURATED = 99.5


def find(data: CacheData, name: str) -> np.ndarray | None:
    """An evaluation series by name (``<name>``, ``metrics/<name>`` or ``performance/<name>``)."""
    for path in (name, f"metrics/{name}", f"performance/{name}"):
        v = data.get(path)
        if v is not None and v.shape[:1] == data.steps.shape:
            return np.asarray(v, dtype=np.float64)
    return None


def as_percent(values: np.ndarray) -> np.ndarray:
    """Accuracies in percent (values stored as fractions in [0, 1] are scaled by 100)."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.max() <= 1.0:
        return values * 100.0
    return values


def saturated(percent: np.ndarray) -> bool:
    """Whether an accuracy is at 100% at every evaluation after the first."""
    finite = percent[np.isfinite(percent)]
    return finite.size >= 2 and bool(np.all(finite[1:] >= SATURATED))


def _draw_losses(ax: Axes, data: CacheData, color: Any = None) -> bool:
    x = data.x()
    drew = []
    for name, label, marker in LOSSES:
        v = find(data, name)
        if v is None or not np.isfinite(v).any():
            continue
        kw = {"color": color} if color is not None else {}
        plot_xy(ax, x, v, marker=marker, label=label if color is None else None, **kw)
        drew.append(v)
    if drew and spans_decades(drew, 1.0):
        use_log(ax)
    return bool(drew)


def _draw_accuracies(ax: Axes, data: CacheData) -> tuple[bool, list[str]]:
    """Draws the informative accuracies; returns (any drawn, legend texts of saturated ones)."""
    x = data.x()
    drew = False
    skipped = []
    for name, label, marker in ACCURACIES:
        v = find(data, name)
        if v is None or not np.isfinite(v).any():
            continue
        v = as_percent(v)
        if saturated(v):
            low = float(np.nanmin(v[np.isfinite(v)][1:]))
            skipped.append(f"{label}: {low:.1f}-100% after the first evaluation (not drawn)")
            continue
        plot_xy(ax, x, v, marker=marker, label=label)
        drew = True
    return drew, skipped


def panel_performance(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view for a grid of runs: losses (left axis) and top-1 accuracy (right axis)."""
    if not _draw_losses(ax, data):
        empty_panel(ax, "no losses")
        return
    ax.set_ylabel("loss")
    mark_lr_drops(ax, data.lr_drops(), label=False)
    v = find(data, "top1")
    if v is not None and np.isfinite(v).any():
        twin = ax.twinx()
        plot_xy(twin, data.x(), as_percent(v), color="tab:green", marker="s", label="test top-1")
        twin.set_ylabel("test top-1 (%)", color="tab:green")
        twin.grid(False)
    ax.legend(loc="best", fontsize=7)


def compare_performance(
    runs: Sequence[Run], metric: str, options: Options, suffix: str = ""
) -> Figure:
    """Losses and top-1 accuracies of several runs overlaid, one colour per run."""
    varying = varying_hyperparameters(runs)
    fig = new_figure(10.0, 4.2, options)
    ax_loss, ax_acc = fig.subplots(1, 2)
    handles = []
    x_label = ""
    for run, color in zip(runs, layer_colors(len(runs))):
        with open_cache(run, metric, suffix, options.x) as data:
            x = data.x()
            for name, _, marker in LOSSES:
                v = find(data, name)
                if v is not None and np.isfinite(v).any():
                    plot_xy(ax_loss, x, v, color=color, marker=marker)
            for name, _, marker in ACCURACIES[:2]:
                v = find(data, name)
                if v is not None and np.isfinite(v).any():
                    plot_xy(ax_acc, x, as_percent(v), color=color, marker=marker)
            x_label = data.x_label
        label = hp_text(run.hyperparameters, varying) if varying else run.expid
        handles.append(Line2D([], [], color=color, lw=2, label=label or run.expid))
    style = [
        Line2D([], [], color="0.3", marker="o", ls="none", label="train (loss, top-1)"),
        Line2D([], [], color="0.3", marker="s", ls="none", label="test (loss, top-1)"),
    ]
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel(x_label)
    if spans_decades([line.get_ydata() for line in ax_loss.lines], 1.0):
        use_log(ax_loss)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    ax_acc.legend(handles=style, loc="best", fontsize=7, framealpha=0.85)
    fig.legend(
        handles=handles,
        loc="outside right upper",
        title=", ".join(varying) if varying else "run",
        framealpha=0.85,
    )
    fig.suptitle(f"performance: {runs[0].experiment}, {len(runs)} runs")
    return fig


@register_plotter(
    "performance",
    panel=panel_performance,
    compare=compare_performance,
    description="losses and accuracies at the evaluated steps",
)
def figure_performance(data: CacheData, options: Options) -> Figure:
    """Training and test loss (left) and the informative accuracies (right)."""
    fig = new_figure(9.0, 3.6, options)
    ax_loss, ax_acc = fig.subplots(1, 2, sharex=True)
    drops = data.lr_drops()
    if _draw_losses(ax_loss, data):
        mark_lr_drops(ax_loss, drops)
        extra = [lr_drop_handle()] if drops else []
        ax_loss.legend(handles=ax_loss.get_legend_handles_labels()[0] + extra, loc="best")
    else:
        empty_panel(ax_loss, "no losses in this cache")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    drew, skipped = _draw_accuracies(ax_acc, data)
    if drew:
        mark_lr_drops(ax_acc, drops)
        handles = ax_acc.get_legend_handles_labels()[0]
        handles += [Line2D([], [], ls="none", label=text) for text in skipped]
        ax_acc.legend(handles=handles, loc="best")
    else:
        empty_panel(ax_acc, "no accuracies in this cache")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel(data.x_label)
    fig.suptitle(f"performance: {run_title(data.run, data)}")
    return fig
