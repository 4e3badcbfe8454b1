"""Figure of the `network` metric: the whole weight trajectory on its two principal components,
and sampled weights of every parameter over training.

Rows holding NaN or Inf (a run trained with ``--allow-nan``) are left out of the projection,
with a one-line warning, instead of failing the eigendecomposition.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import matplotlib
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from Utils.figures.axes import empty_panel, grid_size, mark_lr_drops, panels_grid, pick
from Utils.figures.base import register_plotter
from Utils.figures.data import CacheData, run_title
from Utils.figures.style import Options, distinct_colors, new_figure, short, warn

# Weights drawn per parameter panel (each in its own colour).
WEIGHTS_PER_PANEL = 10


def trajectory_pca(blocks: Iterable[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Projects a trajectory [N, M] (given as column blocks [N, m]) on its top two principal
    components without forming it: the N x N Gram matrix is accumulated block by block.

    Args:
        blocks: column blocks of the trajectory, finite values only.
        n: number of rows N.

    Returns:
        (coordinates [N, 2], fraction of the variance along each component [2]).
    """
    gram = np.zeros((n, n), dtype=np.float64)
    for block in blocks:
        b = np.asarray(block, dtype=np.float64).reshape(n, -1)  # [N, m]
        b = b - b.mean(axis=0, keepdims=True)
        gram += b @ b.T
    eigval, eigvec = np.linalg.eigh(gram)  # ascending
    eigval = np.clip(eigval[::-1], 0.0, None)
    eigvec = eigvec[:, ::-1]
    total = eigval.sum()
    coords = eigvec[:, :2] * np.sqrt(eigval[:2])[None, :]  # [N, 2]
    frac = eigval[:2] / total if total > 0 else np.zeros(2)
    if coords.shape[1] < 2:
        coords = np.pad(coords, ((0, 0), (0, 2 - coords.shape[1])))
        frac = np.pad(frac, (0, 2 - frac.size))
    return coords, frac


def finite_rows(data: CacheData, params: Sequence[str]) -> np.ndarray:
    """Mask [N] of the rows whose stored weights are all finite; warns once about the others."""
    ok = np.ones(data.num_rows, dtype=bool)
    for p in params:
        values = np.asarray(data.get(f"params/{p}/values"), dtype=np.float64)
        ok &= np.isfinite(values.reshape(values.shape[0], -1)).all(axis=1)
    bad = int((~ok).sum())
    if bad:
        warn(
            f"{data.path}: {bad} of {ok.size} rows hold NaN or Inf weights (a run trained with "
            "--allow-nan?); they are left out of the trajectory's PCA"
        )
    return ok


def draw_pca(ax: Axes, fig: Figure | None, data: CacheData, params: Sequence[str]) -> None:
    """The trajectory of the finite rows on its two principal components, coloured by x."""
    ok = finite_rows(data, params)
    if ok.sum() < 2:
        empty_panel(ax, "needs at least 2 rows with finite weights")
        return
    blocks = (np.asarray(data.get(f"params/{p}/values"))[ok] for p in params)
    coords, frac = trajectory_pca(blocks, int(ok.sum()))
    x = data.x()[ok]
    ax.plot(coords[:, 0], coords[:, 1], color="0.6", lw=0.8, zorder=1)
    sc = ax.scatter(
        coords[:, 0], coords[:, 1], c=x, cmap=matplotlib.colormaps["plasma"], s=14, zorder=2
    )
    ax.plot(coords[0, 0], coords[0, 1], "o", mfc="none", mec="k", ms=9, label="start")
    ax.set_xlabel(f"PC 1 ({100 * frac[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * frac[1]:.1f}% of variance)")
    ax.legend(loc="best", fontsize=7)
    if fig is not None:
        fig.colorbar(sc, ax=ax, shrink=0.9, pad=0.01).set_label(data.x_label)


def stored_params(data: CacheData) -> list[str]:
    """The parameters of a network cache, in network order."""
    params = data.json_attr("params", []) or data.keys("params")
    return [p for p in params if f"params/{p}/values" in data]


def panel_network(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: the PCA projection of the trajectory."""
    params = stored_params(data)
    if not params or data.num_rows < 2:
        empty_panel(ax, "needs at least 2 rows")
        return
    draw_pca(ax, None, data, params)


@register_plotter(
    "network",
    panel=panel_network,
    description="weight trajectory (PCA) and sampled weights of every parameter",
)
def figure_network(data: CacheData, options: Options) -> Figure:
    """Weight trajectories: the whole trajectory projected on its two principal components, and
    sampled weights of every parameter over training, each weight of a panel in its own
    colour."""
    params = stored_params(data)
    x = data.x()
    fig = new_figure(*grid_size(len(params) + 1, 5, 3.3, 2.7), options)
    axes = panels_grid(fig, len(params) + 1, 5)
    if params and data.num_rows >= 2:
        draw_pca(axes[0], fig, data, params)
        axes[0].set_title("trajectory of all stored weights (PCA)", fontsize=9)
    else:
        empty_panel(axes[0], "needs at least 2 rows")
    drops = data.lr_drops()
    for ax, p in zip(axes[1:], params):
        values = np.asarray(data.get(f"params/{p}/values"), dtype=np.float64)  # [N, m]
        chosen = pick(values.shape[1], WEIGHTS_PER_PANEL)
        shown = values[:, chosen]
        shown[~np.isfinite(shown)] = np.nan
        for column, color in zip(shown.T, distinct_colors(len(chosen))):
            ax.plot(x, column, color=color, lw=0.8, alpha=0.9)
        mark_lr_drops(ax, drops, label=False)
        ax.set_title(f"{short(p, 30)} ({len(chosen)} of {values.shape[1]})", fontsize=8.5)
        ax.set_ylabel("weight value")
        ax.set_xlabel(data.x_label)
    fig.suptitle(
        f"network trajectories: all {len(params)} parameters, {WEIGHTS_PER_PANEL} sampled "
        f"weights each{' (dash-dot: lr drops)' if drops else ''}\n{run_title(data.run, data)}"
    )
    return fig
