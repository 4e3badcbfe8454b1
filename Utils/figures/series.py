"""Lines of per-layer series, shared by the gradient, symmetry-violation, norms and generic
figures."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes

from Utils.figures.axes import normalise, plot_xy, positive, spans_decades, use_log
from Utils.figures.data import CacheData
from Utils.figures.style import Options, layer_colors, short

AXIS_DATASETS = ("steps", "time", "epoch", "lr")


def by_kind(keys: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    """(kind, layer) pairs grouped by kind, order kept."""
    out: dict[str, list[str]] = {}
    for kind, layer in keys:
        out.setdefault(kind, []).append(layer)
    return out


def kind_lines(
    ax: Axes,
    data: CacheData,
    kind: str,
    layers: Sequence[str],
    dataset: str,
    options: Options,
    log: bool | None = None,
) -> list[np.ndarray]:
    """One line per layer of ``groups/<kind>/<layer>/<dataset>`` ([N]) in layer colours, on a
    log axis when `log` is True (None: when the values span decades)."""
    x = data.x()
    drawn = []
    for layer, color in zip(layers, layer_colors(len(layers))):
        y = data.get(f"groups/{kind}/{layer}/{dataset}")
        if y is None:
            continue
        y = np.asarray(y, dtype=np.float64)
        if options.norm:
            first = y[np.isfinite(y)]
            y, _ = normalise(y, np.asarray(first[0] if first.size else 1.0))
        if log:
            y = positive(y)
        plot_xy(ax, x, y, color=color, lw=1.4, label=short(layer))
        drawn.append(y)
    if log or (log is None and spans_decades(drawn, 2.0)):
        if any(np.isfinite(d).any() for d in drawn):
            use_log(ax)
    return drawn


def draw_series(ax: Axes, x: np.ndarray, lines: dict[str, np.ndarray], options: Options) -> None:
    """One line per entry of `lines` in layer colours (log axis when they span decades)."""
    colors = layer_colors(len(lines))
    values = []
    for (name, y), color in zip(lines.items(), colors):
        if options.norm:
            finite = y[np.isfinite(y)]
            y, _ = normalise(y, np.asarray(finite[0] if finite.size else 1.0))
        plot_xy(ax, x, y, color=color, lw=1.4, label=short(name))
        values.append(y)
    if spans_decades(values, 2.0):
        use_log(ax)


def per_step_series(data: CacheData) -> dict[str, dict[str, np.ndarray]]:
    """Every per-step dataset of a cache, grouped into panels of lines.

    A dataset ``<parent>/<name>`` of shape [N] (or [N, n] without a ``<name>_sum`` sibling,
    summed over its neurons) goes to panel ``<name>`` as line ``<parent>`` when several
    parents hold a dataset of that name (per-layer groups), else to panel ``<parent>`` as
    line ``<name>``. The axes (steps, time, epoch, lr) are left out.

    Returns:
        ``{panel: {line: values [N]}}``.
    """
    n = data.num_rows
    found: list[tuple[str, str, np.ndarray]] = []
    paths = data.datasets()
    present = set(paths)
    for path in paths:
        parent, _, name = path.rpartition("/")
        if not parent and name in AXIS_DATASETS:
            continue
        shape = data.shape(path)
        if shape is None or shape[:1] != (n,) or not data.is_numeric(path):
            continue
        if len(shape) > 1:
            if f"{path}_sum" in present:
                continue
            values = np.asarray(data.get(path), dtype=np.float64).reshape(n, -1).sum(axis=1)
            name = f"{name} (sum)"
        else:
            values = np.asarray(data.get(path), dtype=np.float64)
        found.append((parent, name, values))
    parents_of: dict[str, set[str]] = {}
    for parent, name, _ in found:
        parents_of.setdefault(name, set()).add(parent)
    out: dict[str, dict[str, np.ndarray]] = {}
    for parent, name, values in found:
        if len(parents_of[name]) > 1:
            out.setdefault(name, {})[parent.split("/", 1)[-1] if "/" in parent else parent] = values
        else:
            out.setdefault(parent or data.metric, {})[name] = values
    return out
