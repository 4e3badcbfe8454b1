"""Figures from cache files (``<run>/cache/<metric><suffix>.h5``), and nothing else.

Mirrors `Utils.metrics`: one small module per figure family registers its plotter with
`register_plotter` (`PLOTTERS` maps metric names to `Plotter`s; a cache without one is drawn
by the generic plotter), and `make_figures` is everything plot.py does. Shared pieces live in
their own modules: run discovery (`runs`), the run-aware cache reader (`data`, built on
`Utils.metrics.io.CacheReader`), style (`style`, `labels`), drawing helpers (`axes`,
`series`) and several-run grids (`grid`).

This package never opens checkpoints, models or features.h5: every figure is drawn from the
cache files written by cache.py (layouts in docs/METRICS.md), plus the run's small
``hyperparameters.json`` for titles and for arranging several runs in a grid. Figures are
written atomically; they are derived data, so plotting again replaces them.

Example:
    >>> from Utils import figures
    >>> run = figures.find_runs("results", "demo", "run1")[0]
    >>> fig = figures.figure_for(run, "scale", figures.Options(norm=True))
    >>> paths = figures.save_figure(fig, "results/demo/run1/figures", "scale_norm")
"""

# isort: off
# Registration order is the order plot.py lists the figures in.
from Utils.figures import (  # noqa: F401  (each module registers its plotter)
    conservation,
    performance,
    phase,
    symmetry_violation,
    gradient,
    norms,
    network,
    weights_grads,
    budget,
    generic,
)

# isort: on
from Utils.figures.base import GENERIC, PLOTTERS, Plotter, plotter_for, register_plotter
from Utils.figures.data import CacheData, open_cache
from Utils.figures.grid import figure_grid, grid_layout, varying_hyperparameters
from Utils.figures.runner import figure_for, figure_name, make_figures, save_figure
from Utils.figures.runs import Run, check_metrics, find_runs, run_from_path
from Utils.figures.style import FORMATS, X_AXES, Options, parse_formats, tex_escape

__all__ = [
    "FORMATS",
    "GENERIC",
    "PLOTTERS",
    "X_AXES",
    "CacheData",
    "Options",
    "Plotter",
    "Run",
    "check_metrics",
    "figure_for",
    "figure_grid",
    "figure_name",
    "find_runs",
    "grid_layout",
    "make_figures",
    "open_cache",
    "parse_formats",
    "plotter_for",
    "register_plotter",
    "run_from_path",
    "save_figure",
    "tex_escape",
    "varying_hyperparameters",
]
