"""Figures of the conservation metrics: translation, scale and rescale.

One run: the measured per-layer sums (solid) with the exact theory (black dashed) and the
paper's theory (dotted) on top, their relative errors below, with float round-off shaded;
``--layer-wise``: one panel per layer with its neurons. Several runs: a grid of value panels,
each with its error panel below.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from Utils.figures.axes import (
    empty_panel,
    flat_lines,
    hold_round_off,
    layer_key,
    lr_drop_handle,
    mark_lr_drops,
    normalise,
    note_in_gap,
    pick,
    positive,
    round_off_band,
    round_off_level,
    spans_decades,
    style_handles,
    use_log,
)
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.labels import CONSERVATION, conservation_kind, kind_label
from Utils.figures.style import (
    MAX_LEGEND_LAYERS,
    MAX_NEURONS,
    Options,
    darker,
    layer_colors,
    new_figure,
    short,
    warn,
)


def quantity_label(kind: str, options: Options, per: str = "sum over layer") -> str:
    """Label of the value axis of a conservation figure."""
    symbol = kind_label(kind, "quantity", "Q")
    if options.norm:
        return f"{symbol} / initial value ({per})"
    return f"{symbol} ({per})"


def _kind(data: CacheData) -> str:
    return conservation_kind(data.metric, str(data.attrs.get("kind") or ""))


def _error_series(values: np.ndarray) -> np.ndarray:
    """Relative errors for a log axis: the first row is left out (the theory starts from the
    measured value there, so its error is zero or round-off), as are values <= 0."""
    e = positive(values)
    if e.shape[0]:
        e[0] = np.nan
    return e


def _series(data: CacheData, kind: str, layer: str, options: Options) -> dict[str, np.ndarray]:
    """Layer sums of the measured value and theories (normalised if asked), and errors."""
    base = f"groups/{kind}/{layer}"
    out: dict[str, np.ndarray] = {}
    emp = data.get(f"{base}/empirical_sum")
    if emp is None:
        full = data.get(f"{base}/empirical")
        if full is None:
            return out
        emp = full.reshape(full.shape[0], -1).sum(axis=1)
    out["empirical"] = np.asarray(emp, dtype=np.float64)
    magnitude = data.get(f"{base}/magnitude_sum")
    if magnitude is not None and not options.norm:
        out["magnitude"] = np.asarray(magnitude, dtype=np.float64)
    for name in ("exact", "paper"):
        theory = data.get(f"{base}/theory_{name}_sum")
        if theory is not None:
            out[name] = np.asarray(theory, dtype=np.float64)
        error = data.get(f"{base}/error_{name}_sum")
        if error is not None:
            out[f"error_{name}"] = _error_series(error)
    if options.norm:
        ref = out["empirical"][0]
        ok = True
        for key in ("empirical", "exact", "paper"):
            if key in out:
                out[key], ok = normalise(out[key], np.asarray(ref))
        if not ok:
            warn(f"{kind} {layer}: initial value is 0; that layer is not normalised")
    return out


def draw_values(
    ax: Axes, data: CacheData, kind: str, options: Options, note: str = "gap"
) -> tuple[list[str], bool, bool]:
    """Draws layer sums (solid), exact theory (black dashed) and paper theory (dotted).

    Layers that change little against their offsets get a note suggesting --norm: in the
    widest gap between the lines (``note="gap"``) or as the axes title (``"title"``).

    Returns:
        (layers drawn, whether an exact theory was drawn, whether a paper theory was drawn).
    """
    x = data.x()
    layers = data.layers(kind)
    invalid = data.json_attr("invalid", {})
    has_exact = has_paper = False
    values: list[np.ndarray] = []
    magnitude = 0.0
    for layer, color in zip(layers, layer_colors(len(layers))):
        s = _series(data, kind, layer, options)
        if "empirical" not in s:
            continue
        if "magnitude" in s and np.isfinite(s["magnitude"]).any():
            magnitude = max(magnitude, float(np.nanmax(np.abs(s["magnitude"]))))
        label = short(layer)
        if f"{kind}/{layer}" in invalid:
            label += " (no theory: invalid group)"
        ax.plot(x, s["empirical"], color=color, lw=1.8, label=label)
        values.append(s["empirical"])
        if "exact" in s:
            ax.plot(x, s["exact"], color="k", ls="--", lw=1.0, alpha=0.85)
            has_exact = True
        if "paper" in s:
            ax.plot(x, s["paper"], color=darker(color), ls=":", lw=2.0)
            has_paper = True
    mark_lr_drops(ax, data.lr_drops())
    if hold_round_off(ax, values, round_off_level(data.dtype), magnitude):
        pass
    elif spans_decades(values, 2.0) and not options.norm:
        use_log(ax)
    elif not options.norm and flat_lines(values) and note == "title":
        ax.set_title(
            "each layer changes by < 3% of the axis range: --norm shows the relative changes",
            fontsize=7,
            color="0.3",
        )
    elif not options.norm and flat_lines(values) and note == "gap":
        note_in_gap(ax, values, "layers change < 3%: try --norm")
    return layers, has_exact, has_paper


def draw_errors(ax: Axes, data: CacheData, kind: str, options: Options) -> bool:
    """Draws each layer's relative errors (exact dashed, paper dotted) on a log axis with the
    round-off level shaded; returns whether anything was drawn."""
    x = data.x()
    layers = data.layers(kind)
    drawn = False
    for layer, color in zip(layers, layer_colors(len(layers))):
        s = _series(data, kind, layer, options)
        for name, ls in (("exact", "--"), ("paper", ":")):
            e = s.get(f"error_{name}")
            if e is not None and np.isfinite(e).any():
                ax.plot(x, e, color=color, ls=ls, lw=1.3)
                drawn = True
    if not drawn:
        empty_panel(ax, "no theory stored (optimizer without theory state)")
        return False
    ax.set_yscale("log")
    round_off_band(ax, round_off_level(data.dtype), data.dtype)
    mark_lr_drops(ax, data.lr_drops(), label=False)
    return True


def panel_conservation(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view for a grid of runs: layer sums and both theories."""
    kind = _kind(data)
    layers, _, _ = draw_values(ax, data, kind, options)
    if not layers:
        empty_panel(ax, f"no {kind} groups")


def errors_conservation(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view of the relative errors for the error rows of a grid of runs."""
    draw_errors(ax, data, _kind(data), options)


@register_plotter(
    *CONSERVATION,
    panel=panel_conservation,
    errors=errors_conservation,
    layer_wise=True,
    description="measured per-layer sums with the exact and the paper's theory, and errors",
)
def figure_conservation(data: CacheData, options: Options) -> Figure:
    """Translation, scale or rescale of one run: per-layer sums with both theories on top and
    their relative errors below (``--layer-wise``: one panel per layer with its neurons)."""
    kind = _kind(data)
    if options.layer_wise:
        return _figure_layers(data, kind, options)
    fig = new_figure(7.2, 5.6, options)
    ax, err_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    layers, has_exact, has_paper = draw_values(ax, data, kind, options, note="title")
    draw_errors(err_ax, data, kind, options)
    if not layers:
        empty_panel(ax, f"no {kind} groups in this network")
    ax.set_ylabel(quantity_label(kind, options))
    fig.suptitle(f"{kind_label(kind, 'title')}\n{run_title(data.run, data)}")
    err_ax.set_ylabel("relative error")
    err_ax.set_xlabel(data.x_label)
    style = style_handles(has_paper, has_exact)
    if data.lr_drops():
        style.append(lr_drop_handle())
    handles, _ = ax.get_legend_handles_labels()
    if len(layers) <= 4:
        ax.legend(handles=handles + style, loc="best", framealpha=0.85)
    elif len(layers) <= MAX_LEGEND_LAYERS or options.legend:
        ax.legend(
            handles=handles + style, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.85
        )
    else:
        fig.legend(handles=style, loc="outside lower center", ncol=4, framealpha=0.85)
        layer_key(fig, [ax, err_ax], layers)
    err_handles = [
        Line2D([], [], color="0.3", ls=ls, lw=1.3, label=label)
        for label, ls, shown in (("exact", "--", has_exact), ("paper", ":", has_paper))
        if shown
    ]
    if err_handles and err_ax.lines:
        err_ax.legend(handles=err_handles, loc="best", ncol=2, framealpha=0.85)
    return fig


def _figure_layers(data: CacheData, kind: str, options: Options) -> Figure:
    """One panel per layer: every neuron's quantity (thin) with its theories, and below it the
    median and range over neurons of each theory's relative error."""
    layers = data.layers(kind)
    x = data.x()
    drops = data.lr_drops()
    n = max(len(layers), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.0 * ncols + 0.6, 4.0 * nrows + 0.5, options)
    outer = fig.add_gridspec(nrows, ncols)
    has_exact = has_paper = False
    for i, (layer, color) in enumerate(zip(layers, layer_colors(len(layers)))):
        inner = outer[i // ncols, i % ncols].subgridspec(2, 1, height_ratios=[3, 1.3], hspace=0.05)
        ax = fig.add_subplot(inner[0])
        err_ax = fig.add_subplot(inner[1], sharex=ax)
        base = f"groups/{kind}/{layer}"
        emp = data.get(f"{base}/empirical")
        if emp is None:
            empty_panel(ax, "not cached")
            continue
        emp = np.asarray(emp, dtype=np.float64).reshape(emp.shape[0], -1)  # [N, n]
        chosen = pick(emp.shape[1], MAX_NEURONS)
        theories = {}
        for name in ("exact", "paper"):
            t = data.get(f"{base}/theory_{name}")
            if t is not None:
                t = np.asarray(t, dtype=np.float64).reshape(t.shape[0], -1)  # [N, n]
                theories[name] = t[:, chosen]
        emp = emp[:, chosen]
        if options.norm:
            ref = emp[0]
            emp, ok = normalise(emp, ref)
            theories = {k: normalise(v, ref)[0] for k, v in theories.items()}
            if not ok:
                warn(f"{kind} {layer}: some neurons start at 0 and are not normalised")
        ax.plot(x, emp, color=color, lw=0.7, alpha=0.6)
        if "exact" in theories:
            ax.plot(x, theories["exact"], color="k", ls="--", lw=0.5, alpha=0.6)
            has_exact = True
        if "paper" in theories:
            ax.plot(x, theories["paper"], color=darker(color), ls=":", lw=0.8, alpha=0.8)
            has_paper = True
        mark_lr_drops(ax, drops, label=i == 0)
        if hold_round_off(ax, list(emp.T), round_off_level(data.dtype)):
            pass
        elif spans_decades([emp], 2.0) and not options.norm:
            use_log(ax)
        total = data.node_attrs(base).get("size", emp.shape[1])
        shown = (
            f"{len(chosen)} of {total} neurons" if len(chosen) < int(total) else f"{total} neurons"
        )
        ax.set_title(f"{short(layer, 36)} ({shown})", fontsize=9)
        ax.tick_params(labelbottom=False)
        if i % ncols == 0:
            ax.set_ylabel(quantity_label(kind, options, per="per neuron"))
            err_ax.set_ylabel("rel. error")
        if _draw_neuron_errors(err_ax, data, base, x, color):
            round_off_band(err_ax, round_off_level(data.dtype), data.dtype)
            mark_lr_drops(err_ax, drops, label=False)
            if i == 0:
                err_ax.legend(loc="upper left", fontsize=7, framealpha=0.85)
        else:
            empty_panel(err_ax, "no theory")
        if i // ncols == nrows - 1 or i + ncols >= len(layers):
            err_ax.set_xlabel(data.x_label)
        else:
            err_ax.tick_params(labelbottom=False)
    if not layers:
        empty_panel(fig.add_subplot(outer[0, 0]), f"no {kind} groups in this network")
    fig.suptitle(f"{kind_label(kind, 'title')}, per neuron\n{run_title(data.run, data)}")
    style = style_handles(has_paper, has_exact) + ([lr_drop_handle()] if drops else [])
    fig.legend(handles=style, loc="outside lower center", ncol=4, framealpha=0.85)
    return fig


def _draw_neuron_errors(ax: Axes, data: CacheData, base: str, x: np.ndarray, color) -> bool:
    """Median and range over neurons of each theory's relative error; whether any was drawn."""
    drew = False
    for name, ls, shade in (("exact", "--", "0.2"), ("paper", ":", darker(color))):
        e = data.get(f"{base}/error_{name}")
        if e is None:
            continue
        e = _error_series(np.asarray(e, dtype=np.float64).reshape(e.shape[0], -1))  # [N, n]
        if not np.isfinite(e).any():
            continue
        with np.errstate(all="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (step 0)
            lo = np.nanmin(e, axis=1)
            hi = np.nanmax(e, axis=1)
            med = np.nanmedian(e, axis=1)
        ax.fill_between(x, lo, hi, color=shade, alpha=0.15, lw=0)
        ax.plot(x, med, color=shade, ls=ls, lw=1.2, label=f"{name} (median, range)")
        drew = True
    if drew:
        ax.set_yscale("log")
    return drew
