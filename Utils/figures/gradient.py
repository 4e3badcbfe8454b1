"""Figure of the `gradient` metric: squared gradient norms |g_A|^2 per layer, one panel per
symmetry kind, every panel on a log axis (they span decades, and mixed scales mislead)."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from Utils.figures.axes import empty_panel, grid_size, layer_legend, mark_lr_drops, panels_grid
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.labels import kind_label
from Utils.figures.series import by_kind, kind_lines
from Utils.figures.style import Options, new_figure

LABEL = r"$|g_A|^2$ (sum over layer)"


def panel_gradient(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: every layer of every kind, log scale."""
    for kind, layers in by_kind(data.group_keys()).items():
        kind_lines(ax, data, kind, layers, "grad_sq_sum", options, True)
    mark_lr_drops(ax, data.lr_drops(), label=False)
    ax.set_ylabel(LABEL)


@register_plotter(
    "gradient", panel=panel_gradient, description="squared gradient norms per layer (log scale)"
)
def figure_gradient(data: CacheData, options: Options) -> Figure:
    """Squared gradient norms |g_A|^2 summed over each layer's groups, one panel per kind."""
    kinds = by_kind(data.group_keys())
    fig = new_figure(*grid_size(len(kinds), 3, 4.2, 3.4), options)
    axes = panels_grid(fig, len(kinds), 3)
    drops = data.lr_drops()
    for ax, (kind, layers) in zip(axes, kinds.items()):
        kind_lines(ax, data, kind, layers, "grad_sq_sum", options, True)
        mark_lr_drops(ax, drops)
        ax.set_title(kind_label(kind, "short"))
        ax.set_ylabel(LABEL + (" / initial value" if options.norm else ""))
        ax.set_xlabel(data.x_label)
        layer_legend(fig, ax, layers, options)
    if not kinds:
        empty_panel(axes[0], "no symmetry groups in this network")
    fig.suptitle(f"squared gradient norms per layer (log scale)\n{run_title(data.run, data)}")
    return fig
