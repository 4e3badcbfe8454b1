"""The figure of any cache without a plotter of its own: every per-step series, one panel per
quantity, one line per layer."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from Utils.figures.axes import empty_panel, layer_key, mark_lr_drops
from Utils.figures.base import GENERIC, register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.series import draw_series, per_step_series
from Utils.figures.style import MAX_LEGEND_LAYERS, Options, new_figure

# At most this many quantities get a panel.
MAX_PANELS = 12


def panel_generic(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view for a grid of runs: the first quantity of the cache."""
    series = per_step_series(data)
    if not series:
        empty_panel(ax, "no per-step series")
        return
    quantity = next(iter(series))
    draw_series(ax, data.x(), series[quantity], options)
    mark_lr_drops(ax, data.lr_drops(), label=False)
    ax.set_ylabel(quantity.replace("_", " "))


@register_plotter(
    GENERIC, panel=panel_generic, description="any other cache: every per-step series"
)
def figure_generic(data: CacheData, options: Options) -> Figure:
    """Any cache: one panel per quantity, one line per layer (log scale where it spans decades)."""
    series = per_step_series(data)
    quantities = list(series)[:MAX_PANELS]
    n = max(len(quantities), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.2 * ncols + 0.8, 3.2 * nrows + 0.6, options)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    x = data.x()
    drops = data.lr_drops()
    for ax, quantity in zip(axes, quantities):
        lines = series[quantity]
        draw_series(ax, x, lines, options)
        mark_lr_drops(ax, drops)
        label = quantity.replace("_", " ")
        ax.set_title(label)
        ax.set_ylabel(label + (" / initial value" if options.norm else ""))
        ax.set_xlabel(data.x_label)
        if 1 < len(lines) <= MAX_LEGEND_LAYERS or (options.legend and len(lines) > 1):
            ax.legend(loc="best", fontsize=7)
        elif len(lines) > MAX_LEGEND_LAYERS:
            layer_key(fig, [ax], list(lines))
    for ax in axes[len(quantities) :]:
        ax.set_visible(False)
    if not quantities:
        empty_panel(axes[0], "no per-step series in this cache")
    fig.suptitle(f"{data.metric}: {run_title(data.run, data)}")
    return fig
