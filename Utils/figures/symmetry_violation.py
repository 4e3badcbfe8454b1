"""Figure of the `symmetry_violation` metric: how far the gradients are from each symmetry's
constraint, per layer, on one log scale shared by every kind."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from Utils.figures.axes import (
    empty_panel,
    grid_size,
    layer_legend,
    mark_lr_drops,
    panels_grid,
    plot_xy,
    positive,
)
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.labels import kind_label
from Utils.figures.series import by_kind, kind_lines
from Utils.figures.style import Options, layer_colors, new_figure, short


def panel_symmetry_violation(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: every layer of every kind, log scale."""
    keys = data.group_keys()
    x = data.x()
    for (kind, layer), color in zip(keys, layer_colors(len(keys))):
        y = data.get(f"groups/{kind}/{layer}/violation")
        if y is not None:
            plot_xy(ax, x, positive(y), color=color, lw=1.2, label=short(f"{kind}/{layer}"))
    if ax.lines and any(np.isfinite(line.get_ydata()).any() for line in ax.lines):
        ax.set_yscale("log")
    mark_lr_drops(ax, data.lr_drops(), label=False)
    ax.set_ylabel("violation")


@register_plotter(
    "symmetry_violation",
    panel=panel_symmetry_violation,
    description="|<g_A, c_A>| / (|g_A| |c_A|) per layer: 0 for an exact symmetry",
)
def figure_symmetry_violation(data: CacheData, options: Options) -> Figure:
    """How far the gradients are from each symmetry's constraint, per layer (log scale)."""
    kinds = by_kind(data.group_keys())
    fig = new_figure(*grid_size(len(kinds), 3, 4.0, 3.4), options)
    axes = panels_grid(fig, len(kinds), 3)
    for ax in axes[1:]:
        ax.sharey(axes[0])
    drops = data.lr_drops()
    for i, (ax, (kind, layers)) in enumerate(zip(axes, kinds.items())):
        drawn = kind_lines(ax, data, kind, layers, "violation", replace(options, norm=False), True)
        if not any(np.isfinite(d).any() for d in drawn):
            empty_panel(ax, "no finite values\n(needs consecutive steps or the update buffer)")
        mark_lr_drops(ax, drops)
        ax.set_title(kind_label(kind, "short"))
        if i == 0:
            ax.set_ylabel("violation (max over the layer's neurons)")
        ax.set_xlabel(data.x_label)
        layer_legend(fig, ax, layers, options)
    if not kinds:
        empty_panel(axes[0], "no symmetry groups in this network")
    fig.suptitle(
        r"symmetry violation $|\langle g_A, c_A\rangle| / (|g_A|\,|c_A|)$ "
        "(0: exact symmetry; float32 round-off: about 1e-7)\n"
        f"{run_title(data.run, data)}"
    )
    return fig
