"""Figures of the `weights_grads` and `weights_grads_full` metrics: the stored weights x steps
and gradients x steps matrices, as their norms and the angle between them.

(The trajectory's projection on principal components is the `network` figure's; it is not
repeated here.)
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from Utils.figures.axes import empty_panel, lr_drop_handle, mark_lr_drops, plot_xy, positive
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.style import Options, new_figure


def _rows(data: CacheData, name: str) -> np.ndarray | None:
    values = data.get(name)
    if values is None:
        return None
    return np.asarray(values, dtype=np.float64).reshape(data.num_rows, -1)  # [N, m]


def draw_norms(ax: Axes, data: CacheData) -> None:
    """Euclidean norms of the stored weights and gradients of every row (log scale)."""
    x = data.x()
    for name, label, color in (
        ("weights", "weights", "tab:blue"),
        ("grads", "gradients", "tab:red"),
    ):
        rows = _rows(data, name)
        if rows is not None:
            plot_xy(ax, x, positive(np.sqrt(np.square(rows).sum(axis=1))), color=color, label=label)
    if ax.lines:
        ax.set_yscale("log")
        ax.set_ylabel("norm of the stored elements")
    else:
        empty_panel(ax, "no /weights or /grads")


def draw_cosine(ax: Axes, data: CacheData) -> None:
    """cos(weights, gradients) of every row: 0 when the gradient is orthogonal to the weights
    (as scale symmetry makes it for the weights feeding BatchNorm)."""
    w, g = _rows(data, "weights"), _rows(data, "grads")
    if w is None or g is None:
        empty_panel(ax, "needs /weights and /grads")
        return
    with np.errstate(all="ignore"):
        cos = (w * g).sum(axis=1) / (np.linalg.norm(w, axis=1) * np.linalg.norm(g, axis=1))
    plot_xy(ax, data.x(), cos, color="k", lw=1.2)
    ax.axhline(0.0, color="0.5", lw=0.7)
    ax.set_ylabel(r"$\cos(\theta, g)$ of the stored elements")


def panel_weights_grads(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: the norms of the weights and gradients."""
    draw_norms(ax, data)
    mark_lr_drops(ax, data.lr_drops(), label=False)


@register_plotter(
    "weights_grads",
    "weights_grads_full",
    panel=panel_weights_grads,
    description="norms of the stored weights and gradients, and the angle between them",
)
def figure_weights_grads(data: CacheData, options: Options) -> Figure:
    """Norms of the stored weights and gradients over training, and their cosine."""
    fig = new_figure(10.0, 3.8, options)
    ax_norm, ax_cos = fig.subplots(1, 2, sharex=True)
    draw_norms(ax_norm, data)
    draw_cosine(ax_cos, data)
    drops = data.lr_drops()
    for ax in (ax_norm, ax_cos):
        mark_lr_drops(ax, drops)
        ax.set_xlabel(data.x_label)
    if ax_norm.lines:
        handles = ax_norm.get_legend_handles_labels()[0] + ([lr_drop_handle()] if drops else [])
        ax_norm.legend(handles=handles, loc="best")
    ax_norm.set_title("norms")
    ax_cos.set_title("angle between weights and gradients")
    cols = data.attrs.get("columns", "")
    fig.suptitle(f"{data.metric} ({cols} columns): {run_title(data.run, data)}")
    return fig
