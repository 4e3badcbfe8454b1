"""`make_figures`: everything plot.py does (check the runs and caches, draw, write atomically)."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import matplotlib
from matplotlib.figure import Figure

from Utils import fileio
from Utils.errors import UsageError
from Utils.figures.base import plotter_for
from Utils.figures.data import check_damage, open_cache
from Utils.figures.grid import figure_grid
from Utils.figures.runs import Run, check_metrics, find_runs
from Utils.figures.style import DPI, FORMATS, X_AXES, Options, rc, resolve_options, texify
from Utils.metrics.io import remove_stale_temporaries


def figure_for(run: Run, metric: str, options: Options | None = None, suffix: str = "") -> Figure:
    """The figure of one metric of one run.

    Args:
        run: the run (see `find_runs`).
        metric: cache name, e.g. "scale".
        options: drawing options.
        suffix: cache file suffix.
    """
    options = resolve_options(options or Options())
    with matplotlib.rc_context(rc(options)):
        with open_cache(run, metric, suffix, options.x) as data:
            return texify(plotter_for(metric).figure(data, options), options)


def save_figure(
    fig: Figure,
    folder: str,
    name: str,
    formats: Sequence[str] = ("png",),
    dpi: int = DPI,
    use_tex: bool = False,
) -> list[str]:
    """Writes a figure atomically in every format.

    A local file is written as ``.<file>.<pid>.tmp`` beside it and renamed; temporary files
    of earlier writers that were killed (their process is gone) are deleted first.

    Args:
        fig: the figure.
        folder: destination folder (created if needed; local path or fsspec URL).
        name: file name without extension.
        formats: e.g. ("png", "pdf").
        dpi: resolution of raster formats.
        use_tex: typeset the texts made while drawing (tick labels) with LaTeX too.

    Returns:
        The paths written.
    """
    fileio.makedirs(folder)
    paths = []
    for fmt in formats:
        path = fileio.join(folder, f"{name}.{fmt}")
        with matplotlib.rc_context({"text.usetex": use_tex}):
            _write(fig, path, fmt, dpi)
        paths.append(path)
    return paths


def _write(fig: Figure, path: str, fmt: str, dpi: int) -> None:
    """Saves `fig` to `path` so that it appears complete or not at all."""
    options = {"format": fmt, "dpi": dpi, "bbox_inches": "tight", "facecolor": "white"}
    if fileio.is_url(path):
        fileio.atomic_write(path, lambda f: fig.savefig(f, **options))
        return
    remove_stale_temporaries(path)
    final = fileio.local_path(path)
    folder, base = os.path.split(os.path.abspath(final))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            fig.savefig(f, **options)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        failed = fileio.write_error_of(exc, path)
        if failed is not None and failed is not exc:
            raise failed from None
        raise


def figure_name(metric: str, suffix: str, options: Options, multi: bool = False) -> str:
    """File name (without extension) of a figure: the metric plus the options that change it."""
    name = f"{metric}{suffix}"
    if multi:
        name += "_grid"
    if options.layer_wise and plotter_for(metric).layer_wise and not multi:
        name += "_layerwise"
    if options.norm:
        name += "_norm"
    if options.x != "steps":
        name += f"_{options.x}"
    return name


def make_figures(
    save_dir: str,
    experiment: str,
    expid: str,
    metrics: Sequence[str] | None = None,
    options: Options | None = None,
    suffix: str = "",
    plot_dir: str = "",
    verbose: bool = False,
) -> list[str]:
    """Draws and writes the figures of one or several runs (what plot.py does).

    Every cache to be drawn is read whole first (`check_damage`), so that a damaged one stops
    the command before anything is written.

    Args:
        save_dir: root folder of all experiments.
        experiment: experiment name.
        expid: run id, comma list, or glob pattern.
        metrics: metrics to plot (None: every cached metric).
        options: drawing options.
        suffix: cache file suffix.
        plot_dir: output folder (default ``<run>/figures``; for several runs
            ``<save_dir>/<experiment>/figures``).
        verbose: print what is read.

    Returns:
        The paths written.

    Raises:
        UserError: no such run, no caches, unknown metric, bad option or a damaged cache
            (nothing is written).
    """
    options = options or Options()
    if options.x not in X_AXES:
        raise UsageError(f"unknown --x '{options.x}'; choose from: {', '.join(X_AXES)}")
    for fmt in options.formats:
        if fmt not in FORMATS:
            raise UsageError(f"unknown figure format '{fmt}'; choose from: {', '.join(FORMATS)}")
    runs = find_runs(save_dir, experiment, expid)
    names = check_metrics(runs, metrics, suffix)
    for run in runs:
        for metric in names:
            check_damage(run, metric, suffix)
    options = resolve_options(options)
    written: list[str] = []
    multi = len(runs) > 1
    folder = plot_dir or (
        fileio.join(save_dir, experiment, "figures")
        if multi
        else fileio.join(runs[0].path, "figures")
    )
    for metric in names:
        if verbose:
            where = f"{len(runs)} runs" if multi else runs[0].cache_file(metric, suffix)
            print(f"reading {metric}{suffix} of {where}", file=sys.stderr)
        if multi:
            fig = figure_grid(runs, metric, options, suffix)
        else:
            fig = figure_for(runs[0], metric, options, suffix)
        written += save_figure(
            fig,
            folder,
            figure_name(metric, suffix, options, multi=multi),
            options.formats,
            options.dpi,
            options.use_tex,
        )
    return written
