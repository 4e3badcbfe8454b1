"""Figures of the `norms` and `distance` metrics: weight norms and distance from
initialisation per layer (``--layer-wise``: per parameter) and over the whole network."""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from Utils.figures.axes import (
    empty_panel,
    layer_legend,
    mark_lr_drops,
    normalise,
    plot_xy,
    spans_decades,
    use_log,
)
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.series import draw_series
from Utils.figures.style import Options, layer_colors, new_figure, short

NORM_LABEL = {
    "norms": (r"$\|\theta\|$", "weight norm"),
    "distance": (r"$\|\theta_k - \theta_0\|$", "distance from initialisation"),
}


def panel_layer_norms(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: the per-layer curves."""
    symbol, _ = NORM_LABEL.get(data.metric, (data.metric, data.metric))
    names = data.ordered("layers", "layers")
    lines = {n: np.asarray(data.get(f"layers/{n}"), dtype=np.float64) for n in names}
    draw_series(ax, data.x(), lines, options)
    mark_lr_drops(ax, data.lr_drops(), label=False)
    ax.set_ylabel(f"{symbol} (layer)")


@register_plotter(
    "norms",
    "distance",
    panel=panel_layer_norms,
    layer_wise=True,
    description="norms / distance from initialisation per layer and over the network",
)
def figure_layer_norms(data: CacheData, options: Options) -> Figure:
    """Norms or distance from initialisation: per layer (``--layer-wise``: per parameter) and
    over the whole network."""
    symbol, title = NORM_LABEL.get(data.metric, (data.metric, data.metric))
    where = "params" if options.layer_wise else "layers"
    names = data.ordered(where, where)
    fig = new_figure(10.0, 4.0, options)
    ax, ax_total = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    x = data.x()
    values = []
    for name, color in zip(names, layer_colors(len(names))):
        y = np.asarray(data.get(f"{where}/{name}"), dtype=np.float64)
        if options.norm:
            y, _ = normalise(y, np.asarray(y[0]))
        plot_xy(ax, x, y, color=color, lw=1.4, label=short(name))
        values.append(y)
    if spans_decades(values, 2.0):
        use_log(ax)
    unit = "parameter" if options.layer_wise else "layer"
    ax.set_title(f"per {unit}")
    ax.set_ylabel(f"{symbol} ({unit})" + (" / initial value" if options.norm else ""))
    if names:
        layer_legend(fig, ax, names, options)
    else:
        empty_panel(ax, f"no /{where} in this cache")
    total = data.get("total")
    if total is not None:
        y = np.asarray(total, dtype=np.float64)
        if options.norm:
            y, _ = normalise(y, np.asarray(y[0]))
        plot_xy(ax_total, x, y, color="k", lw=1.6)
    else:
        empty_panel(ax_total, "no /total in this cache")
    ax_total.set_title("whole network")
    ax_total.set_ylabel(f"{symbol} (all trainable parameters)")
    drops = data.lr_drops()
    for a in (ax, ax_total):
        mark_lr_drops(a, drops)
        a.set_xlabel(data.x_label)
    fig.suptitle(f"{title}: {run_title(data.run, data)}")
    return fig
