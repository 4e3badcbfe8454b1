"""The figure registry: how each cached metric is drawn.

A figure family registers its full-figure function with `register_plotter`, naming the
metrics it draws and its compact views, exactly as a metric registers its compute step with
`Utils.metrics.base.register_metric`. A cache whose metric has no plotter of its own is drawn
by the one registered as `GENERIC` (every per-step series of the file).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from Utils.figures.data import CacheData
from Utils.figures.runs import Run
from Utils.figures.style import Options
from Utils.registry import Registry

# Registry name of the plotter of metrics without their own.
GENERIC = "generic"

FigureFn = Callable[[CacheData, Options], Figure]
PanelFn = Callable[[Axes, CacheData, Options], None]
CompareFn = Callable[[Sequence[Run], str, Options, str], Figure]


@dataclass(frozen=True)
class Plotter:
    """How one metric is drawn.

    Attributes:
        name: the metric (cache) name.
        figure: full figure of one run, ``figure(data, options) -> Figure``.
        panel: compact view drawn into one axes of a multi-run grid.
        errors: compact view of the theory's relative errors, drawn in a row of its own
            under each row of `panel` views in a multi-run grid (None: no error row).
        compare: figure of several runs together, ``compare(runs, metric, options, suffix)``
            (None: a grid of `panel` views).
        layer_wise: whether ``--layer-wise`` changes the figure (and its file name).
        description: one line for --help.
    """

    name: str
    figure: FigureFn
    panel: PanelFn
    errors: PanelFn | None = None
    compare: CompareFn | None = None
    layer_wise: bool = False
    description: str = ""


PLOTTERS: Registry[Plotter] = Registry("figure")


def register_plotter(
    *names: str,
    panel: PanelFn,
    errors: PanelFn | None = None,
    compare: CompareFn | None = None,
    layer_wise: bool = False,
    description: str = "",
) -> Callable[[FigureFn], FigureFn]:
    """Decorator registering a full-figure function for one or several metric names.

    Args:
        *names: the metrics it draws (e.g. "norms", "distance").
        panel: compact view for multi-run grids.
        errors: compact error view for the grid's error rows.
        compare: several runs in one figure instead of a grid.
        layer_wise: ``--layer-wise`` changes the figure.
        description: one line for --help.
    """

    def decorator(figure: FigureFn) -> FigureFn:
        for name in names:
            PLOTTERS.add(
                name,
                Plotter(name, figure, panel, errors, compare, layer_wise, description),
            )
        return figure

    return decorator


def plotter_for(metric: str) -> Plotter:
    """The plotter of a metric (the `GENERIC` one for metrics without their own)."""
    return PLOTTERS.get(metric if metric in PLOTTERS else GENERIC)
