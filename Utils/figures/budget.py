"""Figures of the `budget` and `equilibrium` metrics (THEORY.md sections 6 and 7).

* budget: per layer, the cumulative contribution of each term (decay, gradient leak, kinetic,
  discretisation) to the change of Q / R / S since the start, with the measured change on top
  (the terms add up to it); ``--layer-wise`` draws every neuron's terms instead of the sums.
* equilibrium: per scale layer, the measured angular update per step against the predicted
  equilibrium value, and the measured norm against the predicted norm, with the time scale
  1 / (eta_eff lam) marked.
"""

from __future__ import annotations

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from Utils.figures.axes import empty_panel, grid_size, mark_lr_drops, panels_grid
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.labels import kind_label
from Utils.figures.style import Options, layer_colors, new_figure, short

TERMS = ("decay", "leak", "kinetic", "discretisation")
TERM_COLORS = {
    "decay": "tab:blue",
    "leak": "tab:orange",
    "kinetic": "tab:red",
    "discretisation": "tab:green",
}
TERM_LABELS = {
    "decay": r"decay $-2\eta\lambda Q$",
    "leak": r"gradient leak $-2\eta\langle\theta, g\rangle$",
    "kinetic": "kinetic (momentum, preconditioning)",
    "discretisation": r"discretisation $|\Delta\theta|^2$",
}


def _series(data: CacheData, path: str) -> np.ndarray | None:
    value = data.get(path)
    return None if value is None else np.asarray(value, dtype=np.float64)


def budget_lines(ax: Axes, data: CacheData, kind: str, layer: str, neurons: bool) -> bool:
    """The cumulative terms and the measured change of one layer (or of each of its neurons).

    Returns:
        Whether anything was drawn.
    """
    base = f"groups/{kind}/{layer}"
    suffix = "" if neurons else "_sum"
    change = _series(data, f"{base}/change{suffix}")
    if change is None:
        return False
    x = data.x()
    for term in TERMS:
        y = _series(data, f"{base}/{term}{suffix}")
        if y is None:
            continue
        if neurons:
            ax.plot(x, y, color=TERM_COLORS[term], lw=0.6, alpha=0.5)
        else:
            ax.plot(x, y, color=TERM_COLORS[term], lw=1.4)
    if neurons:
        ax.plot(x, change, color="k", lw=0.6, alpha=0.5, ls="--")
    else:
        ax.plot(x, change, color="k", lw=1.0, ls="--")
    ax.axhline(0.0, color="0.6", lw=0.6)
    mark_lr_drops(ax, data.lr_drops(), label=False)
    return True


def term_handles() -> list[Line2D]:
    """Legend entries of the terms and of the measured change."""
    handles = [Line2D([], [], color=TERM_COLORS[t], lw=1.4, label=TERM_LABELS[t]) for t in TERMS]
    return handles + [Line2D([], [], color="k", ls="--", lw=1.0, label="measured change")]


def panel_budget(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: each term summed over every group of the run, and the measured change."""
    x = data.x()
    totals = {t: np.zeros_like(x) for t in (*TERMS, "change")}
    found = False
    for kind, layer in data.group_keys():
        for t in totals:
            y = _series(data, f"groups/{kind}/{layer}/{t}_sum")
            if y is not None:
                totals[t] = totals[t] + y
                found = True
    if not found:
        empty_panel(ax, "no budget")
        return
    for t in TERMS:
        ax.plot(x, totals[t], color=TERM_COLORS[t], lw=1.2)
    ax.plot(x, totals["change"], color="k", ls="--", lw=1.0)
    ax.set_xlabel(data.x_label)
    ax.set_ylabel("cumulative change (all groups)")


@register_plotter(
    "budget",
    panel=panel_budget,
    layer_wise=True,
    description="symmetry-breaking budget: cumulative decay, leak, kinetic and "
    "discretisation terms of the change of Q/R/S per layer",
)
def figure_budget(data: CacheData, options: Options) -> Figure:
    """Cumulative contribution of each budget term to the change of each layer's quantity."""
    keys = data.group_keys()
    fig = new_figure(*grid_size(max(len(keys), 1), 4, 3.6, 3.0), options)
    axes = panels_grid(fig, max(len(keys), 1), 4)
    for ax, (kind, layer) in zip(axes, keys):
        if not budget_lines(ax, data, kind, layer, options.layer_wise):
            empty_panel(ax, "no budget stored")
            continue
        symbol = kind_label(kind, "quantity", "Q")
        ax.set_title(f"{kind}: {short(layer, 34)}", fontsize=9)
        ax.set_xlabel(data.x_label)
        ax.set_ylabel(f"change of {symbol}" + (" per neuron" if options.layer_wise else ""))
    if not keys:
        empty_panel(axes[0], "no group carries a budget (train with this version)")
    else:
        fig.legend(handles=term_handles(), loc="outside lower center", ncol=3, fontsize=8)
    fig.suptitle(
        "symmetry-breaking budget: cumulative terms of the change since step 0 "
        f"(they sum to it)\n{run_title(data.run, data)}"
    )
    return fig


def equilibrium_lines(ax_angle: Axes, ax_norm: Axes | None, data: CacheData, layer: str) -> bool:
    """Measured vs predicted angular update (and norm) of one scale layer."""
    base = f"groups/scale/{layer}"
    angle = _series(data, f"{base}/angle_mean")
    if angle is None:
        return False
    x = data.x()
    ax_angle.plot(x, angle, color="tab:blue", lw=1.3, label="measured (layer mean)")
    pred = _series(data, f"{base}/predicted_angle")
    if pred is not None and np.isfinite(pred).any():
        ax_angle.plot(x, pred, color="k", ls="--", lw=1.0, label="predicted equilibrium")
    scale = _series(data, f"{base}/time_scale")
    if scale is not None and np.isfinite(scale).any():
        t0 = float(np.nanmedian(scale))
        steps = data.steps.astype(np.float64)
        if steps.size and steps[0] + t0 <= steps[-1]:
            at = float(np.interp(steps[0] + t0, steps, x))
            ax_angle.axvline(at, color="0.5", lw=0.8, ls=":", label=r"$1/(\eta_{eff}\lambda)$")
    finite = angle[np.isfinite(angle) & (angle > 0)]
    if finite.size:
        ax_angle.set_yscale("log")
    mark_lr_drops(ax_angle, data.lr_drops(), label=False)
    if ax_norm is not None:
        norm = _series(data, f"{base}/norm_mean")
        pnorm = _series(data, f"{base}/predicted_norm_mean")
        if norm is not None:
            ax_norm.plot(x, norm, color="tab:purple", lw=1.3, label="measured (layer mean)")
        if pnorm is not None and np.isfinite(pnorm).any():
            ax_norm.plot(x, pnorm, color="k", ls="--", lw=1.0, label="predicted equilibrium")
    return True


def panel_equilibrium(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: measured / predicted angular update of every scale layer."""
    layers = data.layers("scale")
    x = data.x()
    drawn = False
    for layer, color in zip(layers, layer_colors(len(layers))):
        angle = _series(data, f"groups/scale/{layer}/angle_mean")
        pred = _series(data, f"groups/scale/{layer}/predicted_angle")
        if angle is None or pred is None or not np.isfinite(pred).any():
            continue
        with np.errstate(invalid="ignore", divide="ignore"):
            ax.plot(x, angle / pred, color=color, lw=1.1, label=short(layer))
        drawn = True
    if not drawn:
        empty_panel(ax, "no prediction for this optimizer")
        return
    ax.axhline(1.0, color="k", ls="--", lw=0.8)
    ax.set_xlabel(data.x_label)
    ax.set_ylabel("angular update / predicted")


@register_plotter(
    "equilibrium",
    panel=panel_equilibrium,
    description="angular update and norm of scale layers vs the predicted equilibrium",
)
def figure_equilibrium(data: CacheData, options: Options) -> Figure:
    """Per scale layer: angular update per step and norm, measured vs predicted."""
    layers = data.layers("scale")
    n = max(len(layers), 1)
    fig = new_figure(*grid_size(2 * n, 4, 3.4, 2.9), options)
    axes = panels_grid(fig, 2 * n, 4)
    for i, layer in enumerate(layers):
        ax_angle, ax_norm = axes[2 * i], axes[2 * i + 1]
        if not equilibrium_lines(ax_angle, ax_norm, data, layer):
            empty_panel(ax_angle, "no budget stored")
            continue
        ax_angle.set_title(f"{short(layer, 30)}: angle per step", fontsize=9)
        ax_norm.set_title(rf"{short(layer, 30)}: $|\theta|$", fontsize=9)
        ax_angle.set_xlabel(data.x_label)
        ax_norm.set_xlabel(data.x_label)
        ax_angle.set_ylabel("radians per step")
    if layers:
        axes[0].legend(loc="best", fontsize=7, framealpha=0.85)
        axes[1].legend(loc="best", fontsize=7, framealpha=0.85)
    else:
        empty_panel(axes[0], "no scale groups with a budget")
    reason = str(data.attrs.get("prediction", "ok"))
    note = "" if reason == "ok" else f" ({reason})"
    fig.suptitle(
        f"equilibrium of scale-invariant layers: measured vs predicted{note}\n"
        f"{run_title(data.run, data)}"
    )
    return fig
