"""Figure of the `phase` metric: phase portraits, position Q against velocity dQ/dt of each
scale and rescale layer, coloured by progress through training."""

from __future__ import annotations

from typing import Any

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from Utils.figures.axes import empty_panel, grid_size, panels_grid
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.labels import kind_label
from Utils.figures.style import Options, layer_colors, new_figure, short


def _phase_lines(
    ax: Axes,
    data: CacheData,
    kind: str,
    layer: str,
    options: Options,
    color: Any = None,
    relative: bool = False,
) -> bool:
    """Position against velocity of one layer, coloured by progress through training (or in
    one colour); `relative` draws (Q - Q_0) / |Q_0| against (dQ/dt) / |Q_0|, so that layers of
    any size share an axes."""
    base = f"groups/{kind}/{layer}"
    q = data.get(f"{base}/position_sum")
    v = data.get(f"{base}/velocity_sum")
    if q is None or v is None:
        return False
    q = np.asarray(q, dtype=np.float64)
    v = np.asarray(v, dtype=np.float64)
    ok = np.isfinite(q) & np.isfinite(v)
    if ok.sum() < 2:
        return False
    x = data.x()[ok]
    q, v = q[ok], v[ok]
    scale = abs(q[0]) if relative and q[0] != 0 else 1.0
    q, v = (q - q[0] if relative else q) / scale, v / scale
    if color is None:
        segments = np.stack([np.column_stack([q[:-1], v[:-1]]), np.column_stack([q[1:], v[1:]])], 1)
        lc = LineCollection(segments, cmap=matplotlib.colormaps["plasma"], lw=1.6)
        lc.set_array(0.5 * (x[:-1] + x[1:]))
        lc.set_clim(float(x[0]), float(x[-1]))
        ax.add_collection(lc)
        ax.autoscale_view()
        ax.plot(q[0], v[0], "o", color="k", ms=4, label="start")
        ax.plot(q[-1], v[-1], "s", color="k", ms=4, label="end")
    else:
        ax.plot(q, v, color=color, lw=1.2, label=short(layer))
        ax.plot(q[0], v[0], "o", color=color, ms=3)
    paper = data.get(f"{base}/velocity_paper_sum")
    if paper is not None and color is None:
        p = np.asarray(paper, dtype=np.float64)[ok] / scale
        ax.plot(q, p, color="k", ls="--", lw=0.9, alpha=0.8, label="paper's dQ/dt (plain SGD)")
    ax.axhline(0.0, color="0.5", lw=0.7)
    return True


def panel_phase(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: every layer's portrait in layer colours."""
    keys = data.group_keys()
    for (kind, layer), color in zip(keys, layer_colors(len(keys))):
        _phase_lines(ax, data, kind, layer, options, color=color, relative=True)
    ax.set_xlabel(r"$(Q - Q_0) / |Q_0|$ (layer sum)")
    ax.set_ylabel(r"$(dQ/dt) / |Q_0|$")
    ax.xaxis.set_major_locator(MaxNLocator(4))


@register_plotter(
    "phase", panel=panel_phase, description="phase portraits: position against velocity"
)
def figure_phase(data: CacheData, options: Options) -> Figure:
    """Phase portraits: position Q against velocity dQ/dt of each scale/rescale layer."""
    keys = data.group_keys()
    fig = new_figure(*grid_size(len(keys), 4, 3.5, 3.1), options)
    axes = panels_grid(fig, len(keys), 4)
    any_drawn = False
    for ax, (kind, layer) in zip(axes, keys):
        if not _phase_lines(ax, data, kind, layer, options):
            empty_panel(ax, "fewer than 2 finite rows")
            continue
        any_drawn = True
        ax.set_title(f"{kind}: {short(layer, 34)}", fontsize=9)
        ax.set_xlabel(kind_label(kind, "quantity", "Q") + " (sum over layer)")
        ax.set_ylabel(r"velocity $dQ/dt$")
        ax.xaxis.set_major_locator(MaxNLocator(4))
    if keys and any_drawn:
        axes[0].legend(loc="best", fontsize=7, framealpha=0.85)
        x = data.x()
        sm = ScalarMappable(
            norm=mcolors.Normalize(float(np.nanmin(x)), float(np.nanmax(x))),
            cmap=matplotlib.colormaps["plasma"],
        )
        bar = fig.colorbar(sm, ax=axes, shrink=0.9, pad=0.01)
        bar.set_label(data.x_label)
    if not keys:
        empty_panel(axes[0], "no scale or rescale groups in this network")
    fig.suptitle(
        "phase portraits: position against velocity (finite differences between saved "
        f"steps)\n{run_title(data.run, data)}"
    )
    return fig
