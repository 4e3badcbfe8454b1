"""Drawing helpers shared by the figure families: log axes, sparse series, legends, lr drops,
round-off.

Conventions: a quantity that spans decades gets a log axis (`spans_decades`, `use_log`);
values on a log axis that are not positive are hidden (`positive`); series evaluated at a few
steps only are drawn as markers (`plot_xy`); learning-rate changes are vertical lines
(`mark_lr_drops`); differences at floating-point round-off are labelled as such, never drawn
as if they were signal (`hold_round_off`, `round_off_band`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import matplotlib
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from Utils.figures.style import MAX_LEGEND_LAYERS, Options, short

# A series with fewer finite points than this is drawn as markers, not as a line.
SPARSE_POINTS = 20
# Relative changes below this many units of the training dtype's epsilon are round-off.
ROUND_OFF_EPS = 1.0
# Lowest value shown on a relative-error axis.
ERROR_FLOOR = 1e-17


def spans_decades(values: Iterable[np.ndarray], decades: float = 2.0) -> bool:
    """Whether finite values are all >= 0 and the positive ones span more than `decades`
    decades (zeros, e.g. a distance at step 0, are left out of a log axis)."""
    finite = [np.asarray(v, dtype=np.float64) for v in values]
    finite = [v[np.isfinite(v)] for v in finite]
    allv = np.concatenate([v.ravel() for v in finite]) if finite else np.zeros(0)
    if allv.size == 0 or np.any(allv < 0):
        return False
    positive_values = allv[allv > 0]
    if positive_values.size == 0:
        return False
    return bool(np.log10(positive_values.max() / positive_values.min()) > decades)


def positive(values: np.ndarray) -> np.ndarray:
    """Values for a log axis: non-positive and non-finite entries become NaN (not drawn)."""
    v = np.asarray(values, dtype=np.float64).copy()
    v[~np.isfinite(v) | (v <= 0)] = np.nan
    return v


def use_log(ax: Axes) -> None:
    """Switches the y axis to log scale, hiding the non-positive points of its lines."""
    for line in ax.lines:
        if line.get_label() == "_lr_drop":
            continue
        line.set_ydata(positive(np.asarray(line.get_ydata(), dtype=np.float64)))
    ax.set_yscale("log")


def normalise(values: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, bool]:
    """`values` divided by `reference` (broadcast); unchanged where the reference is zero."""
    ref = np.asarray(reference, dtype=np.float64)
    ok = np.isfinite(ref) & (np.abs(ref) > 0)
    safe = np.where(ok, ref, 1.0)
    return np.asarray(values, dtype=np.float64) / safe, bool(np.all(ok))


def plot_xy(ax: Axes, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> None:
    """Plots y(x) through its finite values. A series with fewer than `SPARSE_POINTS` finite
    values (evaluations, once per epoch) is drawn as markers only: a line would invent
    values between them."""
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    if not ok.any():
        ax.plot(x, y, **kwargs)
        return
    if ok.sum() >= SPARSE_POINTS:
        kwargs.pop("marker", None)
        ax.plot(np.asarray(x)[ok], y[ok], **kwargs)
        return
    kwargs.setdefault("marker", "o")
    kwargs.setdefault("markersize", 4)
    kwargs["ls"] = "none"
    kwargs.pop("linestyle", None)
    ax.plot(np.asarray(x)[ok], y[ok], **kwargs)


def empty_panel(ax: Axes, text: str) -> None:
    """Writes `text` in the middle of an axes that has nothing to show."""
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


def panels_grid(fig: Figure, n: int, max_cols: int = 4) -> list[Axes]:
    """`n` axes in a near-square grid (extra cells hidden)."""
    n = max(n, 1)
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    axes = list(np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def grid_size(n: int, max_cols: int = 4, w: float = 3.6, h: float = 3.0) -> tuple[float, float]:
    """Figure size (inches) of `panels_grid` with `n` panels of `w` x `h`."""
    n = max(n, 1)
    ncols = min(n, max_cols)
    return w * ncols + 0.8, h * math.ceil(n / ncols) + 0.8


def pick(n: int, limit: int) -> np.ndarray:
    """Indices of at most `limit` of `n` items, evenly spread."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def layer_key(fig: Figure, axes: Sequence[Axes], names: Sequence[str]) -> None:
    """A colour bar keyed by layer depth (many layers) or nothing (the legend does it)."""
    n = len(names)
    if n <= MAX_LEGEND_LAYERS:
        return
    sm = ScalarMappable(norm=mcolors.Normalize(0, n - 1), cmap=matplotlib.colormaps["viridis"])
    bar = fig.colorbar(sm, ax=list(axes), shrink=0.9, pad=0.01)
    bar.ax.set_title("layer\n(depth)", fontsize=7)
    ticks = sorted({0, n - 1, *range(0, n, max(1, n // 6))})
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{i}: {short(names[i])}" for i in ticks])


def layer_legend(fig: Figure, ax: Axes, layers: Sequence[str], options: Options) -> None:
    """A legend naming the layers (inside for up to 4, beside the axes up to
    `MAX_LEGEND_LAYERS` or with --legend) or a colour bar keyed by depth."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if len(layers) <= 4:
        ax.legend(loc="best", fontsize=7, framealpha=0.85)
    elif len(layers) <= MAX_LEGEND_LAYERS or options.legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, framealpha=0.85)
    else:
        layer_key(fig, [ax], layers)


def style_handles(with_paper: bool, with_exact: bool) -> list[Line2D]:
    """Legend entries of the line styles of the conservation figures."""
    handles = [Line2D([], [], color="0.35", lw=1.8, label="measured")]
    if with_exact:
        handles.append(
            Line2D(
                [], [], color="k", ls="--", lw=1.0, label="exact theory (discrete, THEORY.md §3)"
            )
        )
    if with_paper:
        handles.append(
            Line2D([], [], color="0.25", ls=":", lw=2.0, label="paper's theory (continuous, §4)")
        )
    return handles


def lr_drop_handle() -> Line2D:
    """Legend entry of the lr-drop lines."""
    return Line2D([], [], color="0.45", ls="-.", lw=0.9, label="lr drop")


def mark_lr_drops(ax: Axes, drops: Sequence[tuple[float, float]], label: bool = True) -> None:
    """Vertical lines where the learning rate changes.

    Args:
        ax: the axes (time series).
        drops: (x position, new lr / old lr) of every change.
        label: write the factor (``lr x0.2``) at the top of each line.
    """
    for x, factor in drops:
        ax.axvline(x, color="0.45", ls="-.", lw=0.9, zorder=0.5, label="_lr_drop")
        if label:
            ax.annotate(
                f"lr ×{factor:.3g}",
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(2, -2),
                textcoords="offset points",
                ha="left",
                va="top",
                fontsize=7,
                color="0.35",
            )


def round_off_level(dtype: str) -> float:
    """Relative size of round-off in the training dtype (`ROUND_OFF_EPS` epsilons)."""
    name = dtype if dtype in ("float16", "bfloat16", "float32", "float64") else "float32"
    eps = {"float16": 9.8e-4, "bfloat16": 7.8e-3}.get(name) or float(np.finfo(name).eps)
    return ROUND_OFF_EPS * eps


def round_off_band(ax: Axes, level: float, dtype: str) -> None:
    """Shades a log error axis below `level` and labels it as round-off, and keeps the axis
    from being stretched below `ERROR_FLOOR` by values at or near zero."""
    lo, hi = ax.get_ylim()
    lo = max(lo, ERROR_FLOOR)
    ax.set_ylim(max(min(lo, level / 10), ERROR_FLOOR), max(hi, level * 10))
    ax.axhspan(ERROR_FLOOR, level, color="0.85", alpha=0.5, lw=0, zorder=0)
    ax.text(
        0.99,
        level,
        f"{dtype} round-off",
        transform=ax.get_yaxis_transform(),
        ha="right",
        va="top",
        fontsize=6.5,
        color="0.35",
    )


def hold_round_off(
    ax: Axes, values: Sequence[np.ndarray], level: float, magnitude: float | None = None
) -> bool:
    """When every series is constant to round-off, centres the axis on them with a margin
    of a percent (instead of magnifying round-off into curves with seven-digit ticks) and
    says so on the axes.

    Args:
        ax: the axes the series are drawn on.
        values: the series [N] each.
        level: relative round-off level (`round_off_level`).
        magnitude: the size the round-off is relative to, e.g. the sum of |theta| that a
            translation sum S is computed from (default: the largest |value|).

    Returns:
        Whether the series were constant to round-off.
    """
    finite = [np.asarray(v, dtype=np.float64) for v in values]
    finite = [v[np.isfinite(v)] for v in finite if np.isfinite(v).any()]
    if not finite:
        return False
    change = max(float(np.ptp(v)) for v in finite)
    size = max(float(np.max(np.abs(v))) for v in finite)
    reference = max(size, magnitude or 0.0, 1e-300)
    if change > level * reference:
        return False
    lo = min(float(v.min()) for v in finite)
    hi = max(float(v.max()) for v in finite)
    margin = max(0.01 * size, 1e-12)
    ax.set_ylim(lo - margin, hi + margin)
    ax.text(
        0.5,
        0.04,
        f"constant to round-off\n(largest change {change:.1e}, {change / reference:.0e} of the "
        "magnitude)",
        transform=ax.transAxes,
        ha="center",
        va="bottom",
        fontsize=7,
        color="0.3",
        bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
    )
    return True


def note_in_gap(ax: Axes, values: Sequence[np.ndarray], text: str) -> None:
    """Writes a small note at the height of the widest empty band between flat lines."""
    lo, hi = ax.get_ylim()
    levels = sorted((float(np.nanmean(v)) - lo) / (hi - lo) for v in values if np.isfinite(v).any())
    edges = [0.0, *levels, 1.0]
    gaps = [(b - a, 0.5 * (a + b)) for a, b in zip(edges[:-1], edges[1:])]
    _, middle = max(gaps)
    ax.text(
        0.5, middle, text, transform=ax.transAxes, fontsize=7, color="0.3", ha="center", va="center"
    )


def flat_lines(values: Sequence[np.ndarray], fraction: float = 0.03) -> bool:
    """Whether several lines each vary by less than `fraction` of the range they span together
    (offsets between layers hide their dynamics)."""
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if len(finite) < 2:
        return False
    span = max(v.max() for v in finite) - min(v.min() for v in finite)
    return bool(span > 0 and max(np.ptp(v) for v in finite) < fraction * span)
