"""Several runs in one figure: a grid over the hyperparameters that differ between them (the
paper's learning rate x weight decay figures). Metrics whose plotter draws errors get an error
row under each row of value panels."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

import matplotlib
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from Utils.figures.axes import empty_panel, layer_key, lr_drop_handle, style_handles
from Utils.figures.base import plotter_for
from Utils.figures.conservation import quantity_label
from Utils.figures.data import open_cache
from Utils.figures.labels import CONSERVATION, HP_SHORT, kind_label
from Utils.figures.runs import Run
from Utils.figures.style import (
    MAX_LEGEND_LAYERS,
    Options,
    fmt,
    layer_colors,
    new_figure,
    rc,
    resolve_options,
    short,
    texify,
)

# Keys of hyperparameters.json that name or locate a run rather than change its training.
BOOKKEEPING = {
    "expid",
    "experiment",
    "save_dir",
    "data_dir",
    "model_dir",
    "overwrite",
    "resume",
    "verbose",
    "no_progress",
    "sync_save",
    "workers",
    "device",
    "gpu",
    "tpu",
    "deterministic",
    "test_batch_size",
}
# Preferred order of grid axes (rows first).
HP_ORDER = ("lr", "wd", "momentum", "train_batch_size", "dampening", "optimizer", "model")


def varying_hyperparameters(runs: Sequence[Run]) -> list[str]:
    """Training flags whose values differ between runs, most familiar first (lr, wd, ...)."""
    configs = [r.hyperparameters for r in runs]
    keys = sorted({k for c in configs for k in c} - BOOKKEEPING)
    varying = []
    for key in keys:
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
        if len(values) > 1:
            varying.append(key)
    order = {k: i for i, k in enumerate(HP_ORDER)}
    return sorted(varying, key=lambda k: (order.get(k, len(order)), k))


def grid_layout(runs: Sequence[Run]) -> tuple[list[list[Run | None]], list[str], list[str], str]:
    """Arranges runs in a grid over the hyperparameters that vary between them.

    Two varying flags (e.g. lr and wd) give rows x columns; one gives a single row; otherwise
    the runs are tiled in reading order.

    Returns:
        (cells [rows][cols] holding a run or None, row labels, column labels, description).
    """
    varying = varying_hyperparameters(runs)

    def sort_values(key: str) -> list[Any]:
        vals = {json.dumps(r.hyperparameters.get(key), default=str) for r in runs}
        decoded = [json.loads(v) for v in vals]
        try:
            return sorted(decoded)
        except TypeError:
            return sorted(decoded, key=str)

    if len(varying) == 2:
        rk, ck = varying
        rows, cols = sort_values(rk), sort_values(ck)
        cells: list[list[Run | None]] = [[None] * len(cols) for _ in rows]
        clash = False
        for run in runs:
            i = rows.index(run.hyperparameters.get(rk))
            j = cols.index(run.hyperparameters.get(ck))
            clash = clash or cells[i][j] is not None
            cells[i][j] = run
        if not clash:
            return (
                cells,
                [f"{HP_SHORT.get(rk, rk)}={fmt(v)}" for v in rows],
                [f"{HP_SHORT.get(ck, ck)}={fmt(v)}" for v in cols],
                f"rows: {rk}, columns: {ck}",
            )
    if len(varying) == 1:
        key = varying[0]
        vals = sort_values(key)
        ordered = sorted(runs, key=lambda r: vals.index(r.hyperparameters.get(key)))
        labels = [f"{HP_SHORT.get(key, key)}={fmt(r.hyperparameters.get(key))}" for r in ordered]
        if len(ordered) <= 4:
            return [list(ordered)], [""], labels, f"columns: {key}"
    ncols = min(len(runs), 4 if len(runs) > 4 else len(runs))
    nrows = math.ceil(len(runs) / ncols)
    cells = [[None] * ncols for _ in range(nrows)]
    for k, run in enumerate(runs):
        cells[k // ncols][k % ncols] = run
    return cells, [""] * nrows, [""] * ncols, "one panel per run"


def figure_grid(
    runs: Sequence[Run], metric: str, options: Options | None = None, suffix: str = ""
) -> Figure:
    """One metric across several runs: the metric's own comparison figure when it has one
    (performance: every run overlaid), else one panel per run arranged by `grid_layout` (the
    paper's hyperparameter grids for translation, scale and rescale), each with its error
    panel below when the metric's plotter draws errors."""
    options = resolve_options(options or Options())
    plotter = plotter_for(metric)
    with matplotlib.rc_context(rc(options)):
        if plotter.compare is not None:
            return texify(plotter.compare(runs, metric, options, suffix), options)
        cells, row_labels, col_labels, how = grid_layout(runs)
        nrows, ncols = len(cells), len(cells[0])
        with_errors = plotter.errors is not None
        height = 2.8 + (1.3 if with_errors else 0.0)
        fig = new_figure(3.4 * ncols + 1.0, height * nrows + 0.9, options)
        outer = fig.add_gridspec(nrows, ncols)
        layer_names: list[str] = []
        value_axes = []
        x_label = ""
        drops = False
        for i in range(nrows):
            for j in range(ncols):
                run = cells[i][j]
                if with_errors:
                    inner = outer[i, j].subgridspec(2, 1, height_ratios=[2.8, 1.3], hspace=0.06)
                    ax = fig.add_subplot(inner[0])
                    err_ax = fig.add_subplot(inner[1], sharex=ax)
                else:
                    ax, err_ax = fig.add_subplot(outer[i, j]), None
                value_axes.append(ax)
                if run is None:
                    empty_panel(ax, "no run")
                    if err_ax is not None:
                        err_ax.set_visible(False)
                    continue
                with open_cache(run, metric, suffix, options.x) as data:
                    plotter.panel(ax, data, options)
                    if err_ax is not None:
                        plotter.errors(err_ax, data, options)
                        ax.tick_params(labelbottom=False)
                        if j == 0:
                            err_ax.set_ylabel("rel. error")
                    if metric in CONSERVATION and len(data.layers(metric)) > len(layer_names):
                        layer_names = data.layers(metric)
                    x_label = data.x_label
                    drops = drops or bool(data.lr_drops())
                title = ", ".join(t for t in (row_labels[i], col_labels[j]) if t) or run.expid
                ax.set_title(title)
                bottom = err_ax if err_ax is not None else ax
                if i == nrows - 1 and not bottom.get_xlabel():
                    bottom.set_xlabel(x_label)
        what = f"{runs[0].experiment}, {len(runs)} runs ({how})"
        if metric in CONSERVATION:
            _conservation_legend(fig, metric, what, layer_names, value_axes, options, drops)
        else:
            fig.suptitle(f"{metric}: {what}")
            handles, labels = value_axes[0].get_legend_handles_labels()
            if handles and (len(handles) <= MAX_LEGEND_LAYERS or options.legend):
                fig.legend(
                    handles=handles,
                    labels=labels,
                    loc="outside lower center",
                    ncol=min(len(handles), 5),
                    framealpha=0.85,
                )
    return texify(fig, options)


def _conservation_legend(
    fig: Figure,
    metric: str,
    what: str,
    layer_names: list[str],
    axes: list[Axes],
    options: Options,
    drops: bool,
) -> None:
    """Title and legend (layers, line styles, lr drops) of a conservation grid."""
    fig.suptitle(f"{kind_label(metric, 'title')}: {quantity_label(metric, options)}\n{what}")
    handles = [
        Line2D([], [], color=c, lw=1.8, label=short(n))
        for n, c in zip(layer_names, layer_colors(len(layer_names)))
    ]
    if len(layer_names) > MAX_LEGEND_LAYERS and not options.legend:
        handles = []
        layer_key(fig, axes, layer_names)
    style = style_handles(True, True) + ([lr_drop_handle()] if drops else [])
    fig.legend(
        handles=handles + style,
        loc="outside lower center",
        ncol=min(len(handles) + len(style), 5),
        framealpha=0.85,
    )
