"""Figures from cache files (``<run>/cache/<metric><suffix>.h5``), and nothing else.

This module never opens checkpoints, models or features.h5: every figure is drawn from the
cache files written by cache.py (layouts in docs/METRICS.md), plus the run's small
``hyperparameters.json`` for titles and for arranging several runs in a grid.

One run: `make_figures` draws one figure per cache (the metric's own plotter from `PLOTTERS`,
or a generic one that plots every per-step dataset of an unknown metric). Several runs
(``--expid a,b`` or a glob): the conservation metrics become a grid over the hyperparameters
that differ between the runs (e.g. learning rate x weight decay, as in the paper's figures),
and every other metric is tiled, one panel per run.

Figures are written atomically (temporary file in the same folder, then renamed), so a reader
never sees half a file. Figures are derived data: plotting again replaces them.

Example:
    >>> from Utils import plotting
    >>> runs = plotting.find_runs("results", "demo", "run1")
    >>> fig = plotting.figure_for(runs[0], "scale", plotting.Options(norm=True))
    >>> paths = plotting.save_figure(fig, "results/demo/run1/figures", "scale_norm")
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import shutil
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import h5py
import numpy as np
from matplotlib import colors as mcolors
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from Utils import fileio
from Utils.errors import CorruptFileError, UnknownNameError, UsageError, UserError
from Utils.registry import Registry

CONSERVATION = ("translation", "scale", "rescale")
FORMATS = ("png", "pdf", "svg")
X_AXES = ("steps", "time", "epoch")
AXIS_DATASETS = ("steps", "time", "epoch", "lr")
# Metrics whose figure changes with --layer-wise (per neuron / per parameter).
LAYER_WISE = (*CONSERVATION, "norms", "distance")
CACHE_FORMAT = "neural-mechanics-cache"
DPI = 150
# Above this many layers the colours are keyed by a colour bar instead of a legend.
MAX_LEGEND_LAYERS = 8
# At most this many neurons are drawn per layer panel of a layer-wise figure.
MAX_NEURONS = 48

QUANTITY = {
    "translation": r"$S = \sum\,\theta_A$",
    "scale": r"$|\theta_A|^2$",
    "rescale": r"$|\theta_{A_1}|^2 - |\theta_{A_2}|^2$",
}
SHORT_TITLE = {
    "translation": "translation (last linear layer)",
    "scale": "scale (channels feeding BatchNorm)",
    "rescale": "rescale (homogeneous hidden units)",
}
SYMMETRY_TITLE = {
    "translation": "translation symmetry (last layer before softmax)",
    "scale": "scale symmetry (channels feeding BatchNorm)",
    "rescale": "rescale symmetry (hidden units between homogeneous layers)",
}
X_LABEL = {
    "steps": "optimizer step",
    "time": r"time $t_k = \sum_{j<k} \eta_j (1-\delta)$",
    "epoch": "epoch",
}
# Keys of hyperparameters.json that name or locate a run rather than change its training.
_BOOKKEEPING = {
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
# Short names of hyperparameters in panel titles.
_HP_SHORT = {
    "lr": r"$\eta$",
    "wd": r"$\lambda$",
    "momentum": r"$\beta$",
    "dampening": r"$\delta$",
    "train_batch_size": "B",
}
# Preferred order of grid axes (rows first).
_HP_ORDER = ("lr", "wd", "momentum", "train_batch_size", "dampening", "optimizer", "model")


@dataclass(frozen=True)
class Options:
    """How figures are drawn.

    Attributes:
        layer_wise: one panel per layer showing individual neurons (conservation metrics).
        norm: divide every curve by its initial value.
        legend: name every layer in a legend, even when there are many (a colour bar keys
            the layers by depth above `MAX_LEGEND_LAYERS` otherwise).
        use_tex: typeset text with LaTeX (only when ``latex`` is on the PATH).
        x: horizontal axis: "steps", "time" or "epoch".
        formats: file formats written by `save_figure`.
        dpi: resolution of raster formats.
    """

    layer_wise: bool = False
    norm: bool = False
    legend: bool = False
    use_tex: bool = False
    x: str = "steps"
    formats: tuple[str, ...] = ("png",)
    dpi: int = DPI


def warn(message: str) -> None:
    """Prints a one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def tex_available() -> bool:
    """Whether a ``latex`` executable is on the PATH (needed by ``--use-tex``)."""
    return shutil.which("latex") is not None


def resolve_options(options: Options) -> Options:
    """Turns `use_tex` off (with a warning) when LaTeX is not installed."""
    if options.use_tex and not tex_available():
        warn("--use-tex: no latex executable found; using matplotlib's own math text")
        return replace(options, use_tex=False)
    return options


def parse_formats(text: str) -> tuple[str, ...]:
    """Splits ``png,pdf`` into formats.

    Raises:
        UsageError: for an unknown format, listing the valid ones.
    """
    out: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower().lstrip(".")
        if not name:
            continue
        if name not in FORMATS:
            raise UsageError(
                f"unknown figure format '{raw.strip()}'; choose from: {', '.join(FORMATS)}"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError(f"--format is empty; choose from: {', '.join(FORMATS)}")
    return tuple(out)


# ----------------------------------------------------------------------------------------
# Runs and their caches


@dataclass
class Run:
    """One run folder ``<save_dir>/<experiment>/<expid>`` and its cache files.

    Attributes:
        save_dir: root folder of all experiments.
        experiment: experiment name.
        expid: run id.
    """

    save_dir: str
    experiment: str
    expid: str
    _hp: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        """The run folder."""
        return fileio.join(self.save_dir, self.experiment, self.expid)

    @property
    def cache_dir(self) -> str:
        """The run's cache folder."""
        return fileio.join(self.path, "cache")

    def cache_file(self, metric: str, suffix: str = "") -> str:
        """Path of one metric's cache file."""
        return fileio.join(self.cache_dir, f"{metric}{suffix}.h5")

    def metrics(self, suffix: str = "") -> list[str]:
        """Names of the metrics cached with this suffix, sorted."""
        end = f"{suffix}.h5"
        names = []
        for entry in fileio.listdir(self.cache_dir):
            if entry.startswith(".") or not entry.endswith(end):
                continue
            name = entry[: -len(end)]
            if name:
                names.append(name)
        return sorted(names)

    def cache_command(self) -> str:
        """The cache.py command line that builds this run's caches."""
        cmd = f"python cache.py --experiment {self.experiment} --expid {self.expid}"
        if self.save_dir != "results":
            cmd += f" --save-dir {self.save_dir}"
        return cmd

    @property
    def hyperparameters(self) -> dict[str, Any]:
        """The run's train.py flags from ``hyperparameters.json`` (empty if it is missing)."""
        if self._hp is None:
            path = fileio.join(self.path, "hyperparameters.json")
            hp: dict[str, Any] = {}
            if fileio.exists(path):
                try:
                    with fileio.open_read(path) as f:
                        hp = json.loads(f.read().decode("utf-8"))
                except (OSError, ValueError):
                    warn(f"{path} cannot be read; titles will lack hyperparameters")
                    hp = {}
            if isinstance(hp.get("config"), dict):
                hp = dict(hp["config"])
            self._hp = hp
        return self._hp

    @property
    def label(self) -> str:
        """Short label of the run: its expid."""
        return self.expid


def _is_run(path: str) -> bool:
    """Whether a folder looks like a run (it has hyperparameters, checkpoints or caches)."""
    return any(
        fileio.exists(fileio.join(path, name))
        for name in ("hyperparameters.json", "cache", "ckpt", "metrics.json")
    )


def find_runs(save_dir: str, experiment: str, expid: str) -> list[Run]:
    """The runs named by `expid`: one id, a comma list, or glob patterns (``'lr*'``).

    Args:
        save_dir: root folder of all experiments.
        experiment: experiment name.
        expid: ``a``, ``a,b,c`` or a pattern with ``*``, ``?`` or ``[...]``.

    Returns:
        The runs, in the order given (patterns expand in sorted order), without repeats.

    Raises:
        UserError: when the experiment or a named run does not exist, or a pattern matches
            nothing; the message lists the runs that exist.
    """
    exp_dir = fileio.join(save_dir, experiment)
    if not expid.strip():
        raise UsageError("--expid is empty; name a run (or several: a,b or 'lr*')")
    if not fileio.exists(exp_dir):
        existing = [e for e in fileio.listdir(save_dir) if not e.startswith(".")]
        hint = f"experiments there: {', '.join(existing)}" if existing else "it is empty"
        raise UserError(
            f"no experiment '{experiment}' in {save_dir} ({hint}); check --experiment and --save-dir"
        )
    existing = [
        e
        for e in fileio.listdir(exp_dir)
        if not e.startswith(".") and _is_run(fileio.join(exp_dir, e))
    ]
    available = ", ".join(existing) if existing else "none"
    names: list[str] = []
    for raw in expid.split(","):
        name = raw.strip()
        if not name:
            continue
        if any(c in name for c in "*?["):
            matched = [e for e in existing if fnmatch.fnmatchcase(e, name)]
            if not matched:
                raise UserError(
                    f"--expid '{name}' matches no run in {exp_dir}; runs there: {available}"
                )
        elif name in existing:
            matched = [name]
        else:
            raise UserError(f"no run {fileio.join(exp_dir, name)}; runs in {exp_dir}: {available}")
        names.extend(m for m in matched if m not in names)
    return [Run(save_dir, experiment, n) for n in names]


def run_from_path(path: str) -> Run:
    """The run in folder ``<save_dir>/<experiment>/<expid>`` (for notebooks).

    Raises:
        UserError: when the folder does not exist.
    """
    path = str(path).rstrip("/")
    if not fileio.exists(path):
        raise UserError(f"no run {path}; give the folder <save-dir>/<experiment>/<expid> of a run")
    if fileio.is_url(path):
        head, expid = path.rsplit("/", 1)
        save_dir, experiment = head.rsplit("/", 1)
    else:
        head, expid = os.path.split(os.path.abspath(fileio.local_path(path)))
        save_dir, experiment = os.path.split(head)
    return Run(save_dir, experiment, expid)


def check_metrics(runs: Sequence[Run], metrics: Sequence[str] | None, suffix: str) -> list[str]:
    """The metrics to plot, checked against the caches of every run.

    Args:
        runs: the runs.
        metrics: requested metric names (None: every cache the runs hold).
        suffix: cache file suffix.

    Returns:
        Metric names in a stable order (conservation first, then performance, then the rest).

    Raises:
        UserError: a run has no caches (names the cache.py command).
        UnknownNameError: a requested metric has no cache in some run (lists those available).
    """
    per_run = {}
    for run in runs:
        have = run.metrics(suffix)
        if not have:
            extra = f" with suffix '{suffix}'" if suffix else ""
            raise UserError(f"run {run.path} has no caches{extra}; run {run.cache_command()}")
        per_run[run.expid] = have
    union = sorted({m for have in per_run.values() for m in have}, key=_metric_order)
    if metrics is None:
        common = [m for m in union if all(m in have for have in per_run.values())]
        skipped = [m for m in union if m not in common]
        if skipped:
            warn(f"not cached in every run, so not compared: {', '.join(skipped)}")
        if not common:
            raise UserError(
                "the runs share no cached metric; cache the same metrics in each "
                f"(e.g. {runs[0].cache_command()})"
            )
        return common
    for name in metrics:
        missing = [r for r in runs if name not in per_run[r.expid]]
        if missing:
            have = per_run[missing[0].expid]
            raise UnknownNameError(
                f"no '{name}' cache in run {missing[0].path}; available: {', '.join(have)} "
                f"(cache it with {missing[0].cache_command()} --metrics {name})"
            )
    return list(dict.fromkeys(metrics))


def _metric_order(name: str) -> tuple[int, str]:
    order = {**{k: i for i, k in enumerate(CONSERVATION)}, "performance": 3}
    return (order.get(name, 10), name)


# ----------------------------------------------------------------------------------------
# Reading one cache file


def _decode(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _json_attr(value: Any, default: Any) -> Any:
    """An attribute stored as a JSON string (lists and dicts), decoded."""
    value = _decode(value)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return default
    if isinstance(value, np.ndarray):
        return [_decode(v) for v in value.tolist()]
    return default if value is None else value


class CacheData:
    """The contents of one cache file, read into memory lazily.

    Args:
        path: the cache file.
        run: the run it belongs to.
        metric: the metric's name (file name without suffix).
        x: the horizontal axis wanted ("steps", "time" or "epoch").

    Raises:
        CorruptFileError: when the file is not a readable cache file.
    """

    def __init__(self, path: str, run: Run, metric: str, x: str = "steps") -> None:
        self.path = path
        self.run = run
        self.metric = metric
        self.x_name = x
        try:
            handle = fileio.open_read(path) if fileio.is_url(path) else fileio.local_path(path)
            self._file = h5py.File(handle, "r")
        except (OSError, ValueError) as exc:
            raise CorruptFileError(
                f"cache file {path} cannot be read ({exc}); rerun {run.cache_command()} --overwrite"
            ) from None
        fmt = _decode(self._file.attrs.get("format", ""))
        if fmt and fmt != CACHE_FORMAT:
            self._file.close()
            raise CorruptFileError(
                f"{path} is not a cache file written by cache.py; rerun {run.cache_command()}"
            )
        self.attrs = {k: _decode(v) for k, v in self._file.attrs.items()}
        self._memo: dict[str, np.ndarray] = {}

    def close(self) -> None:
        """Closes the file."""
        self._file.close()

    def __enter__(self) -> CacheData:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def get(self, name: str) -> np.ndarray | None:
        """A dataset as a numpy array (None when absent)."""
        if name not in self._memo:
            item = self._file.get(name)
            if not isinstance(item, h5py.Dataset):
                return None
            self._memo[name] = np.asarray(item[()])
        return self._memo[name]

    def node_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of a group or dataset (empty when absent)."""
        item = self._file.get(name)
        return {} if item is None else {k: _decode(v) for k, v in item.attrs.items()}

    def keys(self, group: str = "/") -> list[str]:
        """Names of the members of a group (empty when absent)."""
        item = self._file.get(group)
        return list(item.keys()) if isinstance(item, h5py.Group) else []

    def datasets(self) -> list[str]:
        """Paths of every dataset in the file."""
        out: list[str] = []
        self._file.visititems(
            lambda n, obj: out.append(n) if isinstance(obj, h5py.Dataset) else None
        )
        return out

    @property
    def steps(self) -> np.ndarray:
        """The step of every row."""
        steps = self.get("steps")
        if steps is None:
            raise CorruptFileError(f"{self.path} has no /steps; rerun {self.run.cache_command()}")
        return np.asarray(steps)

    @property
    def num_rows(self) -> int:
        """Number of rows (steps)."""
        return int(self.steps.shape[0])

    def x(self) -> np.ndarray:
        """The horizontal axis of every row (falls back to steps when it is not cached)."""
        name = self.x_name
        if name == "steps":
            return self.steps.astype(np.float64)
        values = self.get(name)
        if values is not None and values.shape[:1] == self.steps.shape:
            return np.asarray(values, dtype=np.float64)
        mapped = _x_from_other_caches(self.run, name, self.steps)
        if mapped is not None:
            return mapped
        warn(f"{self.path} has no /{name} and no other cache of the run does; plotting vs steps")
        self.x_name = "steps"
        return self.steps.astype(np.float64)

    @property
    def x_label(self) -> str:
        """Label of the horizontal axis."""
        return X_LABEL[self.x_name]

    def group_keys(self) -> list[tuple[str, str]]:
        """(kind, layer) of every ``groups/<kind>/<layer>`` in network order."""
        stored = [(k, layer) for k in self.keys("groups") for layer in self.keys(f"groups/{k}")]
        order = _json_attr(self.attrs.get("layers"), [])
        rank = {}
        for i, name in enumerate(order):
            rank.setdefault(str(name), i)
        return sorted(
            stored,
            key=lambda kl: (
                CONSERVATION.index(kl[0]) if kl[0] in CONSERVATION else len(CONSERVATION),
                rank.get(f"{kl[0]}/{kl[1]}", rank.get(kl[1], len(rank))),
                _natural_key(kl[1]),
            ),
        )

    def layers(self, kind: str) -> list[str]:
        """Layer names of a conservation cache in network order (``groups/<kind>/<layer>``)."""
        stored = self.keys(f"groups/{kind}")
        order = _json_attr(self.attrs.get("layers"), [])
        ordered = [name for name in order if name in stored]
        return ordered + sorted((n for n in stored if n not in ordered), key=_natural_key)


def _natural_key(text: str) -> list[Any]:
    """Sort key that orders ``layer2`` before ``layer10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _x_from_other_caches(run: Run, name: str, steps: np.ndarray) -> np.ndarray | None:
    """`name` (time or epoch) at `steps`, interpolated from another cache of the run that
    stores both ``/steps`` and ``/<name>``."""
    for metric in sorted(run.metrics(""), key=_metric_order):
        path = run.cache_file(metric)
        try:
            with h5py.File(fileio.local_path(path), "r") as f:
                if name in f and "steps" in f and f[name].shape == f["steps"].shape:
                    src_steps = np.asarray(f["steps"][()], dtype=np.float64)
                    src_x = np.asarray(f[name][()], dtype=np.float64)
                else:
                    continue
        except (OSError, ValueError):
            continue
        if src_steps.size >= 2:
            return np.interp(np.asarray(steps, dtype=np.float64), src_steps, src_x)
    return None


# ----------------------------------------------------------------------------------------
# Drawing helpers


def tex_escape(text: str) -> str:
    """Escapes what LaTeX treats specially in plain text (outside ``$...$``)."""
    parts = re.split(r"(\$[^$]*\$)", text)
    for i in range(0, len(parts), 2):
        plain = re.sub(r"([_%&#{}])", r"\\\1", parts[i])
        plain = plain.replace("->", r"$\to$").replace("<", r"$<$").replace(">", r"$>$")
        parts[i] = plain.replace("§", r"\S{}").replace("|", r"$|$")
    return "".join(parts)


def _texify(fig: Figure, options: Options) -> Figure:
    """With ``use_tex``, escapes every text of a finished figure for LaTeX."""
    if options.use_tex:
        from matplotlib.text import Text

        for artist in fig.findobj(Text):
            text = artist.get_text()
            if text:
                artist.set_text(tex_escape(text))
    return fig


def _rc(options: Options) -> dict[str, Any]:
    """Matplotlib settings of every figure."""
    return {
        "text.usetex": options.use_tex,
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "lines.linewidth": 1.5,
    }


def new_figure(width: float, height: float, options: Options) -> Figure:
    """A figure (without pyplot, so nothing is kept alive) with constrained layout."""
    import matplotlib

    with matplotlib.rc_context(_rc(options)):
        return Figure(figsize=(width, height), layout="constrained")


def layer_colors(n: int) -> list[tuple[float, float, float, float]]:
    """Colours of `n` layers: distinct hues up to `MAX_LEGEND_LAYERS`, else by depth."""
    import matplotlib

    if n <= MAX_LEGEND_LAYERS:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i % 10) for i in range(n)]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _darker(color: Any, amount: float = 0.45) -> tuple[float, float, float]:
    r, g, b = mcolors.to_rgb(color)
    return (r * (1 - amount), g * (1 - amount), b * (1 - amount))


def _spans_decades(values: Iterable[np.ndarray], decades: float = 2.0) -> bool:
    """Whether finite values are all >= 0 and the positive ones span more than `decades`
    decades (zeros, e.g. a distance at step 0, are left out of a log axis)."""
    finite = [np.asarray(v, dtype=np.float64) for v in values]
    finite = [v[np.isfinite(v)] for v in finite]
    allv = np.concatenate([v.ravel() for v in finite]) if finite else np.zeros(0)
    if allv.size == 0 or np.any(allv < 0):
        return False
    positive = allv[allv > 0]
    if positive.size == 0:
        return False
    return bool(np.log10(positive.max() / positive.min()) > decades)


def _use_log(ax: Axes) -> None:
    """Switches the y axis to log scale, hiding the non-positive points of its lines."""
    for line in ax.lines:
        line.set_ydata(_positive(np.asarray(line.get_ydata(), dtype=np.float64)))
    ax.set_yscale("log")


def _positive(values: np.ndarray) -> np.ndarray:
    """Values for a log axis: non-positive and non-finite entries become NaN (not drawn)."""
    v = np.asarray(values, dtype=np.float64).copy()
    v[~np.isfinite(v) | (v <= 0)] = np.nan
    return v


def _normalise(values: np.ndarray, reference: np.ndarray) -> tuple[np.ndarray, bool]:
    """`values` divided by `reference` (broadcast); unchanged where the reference is zero."""
    ref = np.asarray(reference, dtype=np.float64)
    ok = np.isfinite(ref) & (np.abs(ref) > 0)
    safe = np.where(ok, ref, 1.0)
    return np.asarray(values, dtype=np.float64) / safe, bool(np.all(ok))


def _style_handles(with_paper: bool, with_exact: bool) -> list[Line2D]:
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


def _layer_key(fig: Figure, axes: Sequence[Axes], names: Sequence[str], options: Options) -> None:
    """A colour bar keyed by layer depth (many layers) or nothing (the legend does it)."""
    n = len(names)
    if n <= MAX_LEGEND_LAYERS:
        return
    import matplotlib

    sm = ScalarMappable(norm=mcolors.Normalize(0, n - 1), cmap=matplotlib.colormaps["viridis"])
    bar = fig.colorbar(sm, ax=list(axes), shrink=0.9, pad=0.01)
    bar.ax.set_title("layer\n(depth)", fontsize=7)
    ticks = sorted({0, n - 1, *range(0, n, max(1, n // 6))})
    bar.set_ticks(ticks)
    bar.set_ticklabels([f"{i}: {_short(names[i])}" for i in ticks])


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def _hp_text(hp: dict[str, Any], keys: Sequence[str] = ("lr", "wd", "momentum")) -> str:
    parts = []
    for key in keys:
        if key in hp and hp[key] is not None:
            parts.append(f"{_HP_SHORT.get(key, key)}={_fmt(hp[key])}")
    return ", ".join(parts)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _run_title(run: Run, data: CacheData | None = None) -> str:
    hp = dict(run.hyperparameters)
    if data is not None:
        for key in ("lr", "wd", "momentum"):
            if key not in hp and key in data.attrs:
                hp[key] = data.attrs[key]
    text = _hp_text(hp)
    return f"{run.experiment}/{run.expid}" + (f" ({text})" if text else "")


def _plot_xy(ax: Axes, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> None:
    """Plots y(x); sparse series (NaN between evaluations) are joined and marked."""
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(y)
    if ok.all() or not ok.any():
        ax.plot(x, y, **kwargs)
        return
    kwargs.setdefault("marker", "o")
    kwargs.setdefault("markersize", 3)
    ax.plot(np.asarray(x)[ok], y[ok], **kwargs)


def _finish_x(ax: Axes, data: CacheData, options: Options) -> None:
    ax.set_xlabel(data.x_label)


def _empty_panel(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])


# ----------------------------------------------------------------------------------------
# Conservation metrics: translation, scale, rescale


def _quantity_label(kind: str, options: Options, per: str = "sum over layer") -> str:
    label = f"{QUANTITY[kind]} ({per})"
    if options.norm:
        label = f"{QUANTITY[kind]} / initial value ({per})"
    return label


def _conservation_series(
    data: CacheData, kind: str, layer: str, options: Options
) -> dict[str, np.ndarray]:
    """Layer sums of the measured value and theories (normalised if asked)."""
    base = f"groups/{kind}/{layer}"
    out: dict[str, np.ndarray] = {}
    emp = data.get(f"{base}/empirical_sum")
    if emp is None:
        full = data.get(f"{base}/empirical")
        if full is None:
            return out
        emp = full.reshape(full.shape[0], -1).sum(axis=1)
    out["empirical"] = np.asarray(emp, dtype=np.float64)
    for name in ("exact", "paper"):
        theory = data.get(f"{base}/theory_{name}_sum")
        if theory is not None:
            out[name] = np.asarray(theory, dtype=np.float64)
        error = data.get(f"{base}/error_{name}_sum")
        if error is not None:
            out[f"error_{name}"] = np.asarray(error, dtype=np.float64)
    if options.norm:
        ref = out["empirical"][0]
        for key in ("empirical", "exact", "paper"):
            if key in out:
                out[key], ok = _normalise(out[key], np.asarray(ref))
        if not ok:
            warn(f"{kind} {layer}: initial value is 0; that layer is not normalised")
    return out


def _draw_conservation(
    ax: Axes,
    err_ax: Axes | None,
    data: CacheData,
    kind: str,
    options: Options,
    with_labels: bool = True,
) -> tuple[list[str], bool, bool]:
    """Draws layer sums (solid), exact theory (black dashed) and paper theory (dotted) on `ax`
    and their relative errors on `err_ax`.

    Returns:
        (layers drawn, whether an exact theory was drawn, whether a paper theory was drawn).
    """
    x = data.x()
    layers = data.layers(kind)
    colors = layer_colors(len(layers))
    invalid = _json_attr(data.attrs.get("invalid"), {})
    has_exact = has_paper = False
    values: list[np.ndarray] = []
    errors: list[np.ndarray] = []
    for layer, color in zip(layers, colors):
        s = _conservation_series(data, kind, layer, options)
        if "empirical" not in s:
            continue
        label = _short(layer)
        if f"{kind}/{layer}" in invalid:
            label += " (no theory: invalid group)"
        ax.plot(x, s["empirical"], color=color, lw=1.8, label=label)
        values.append(s["empirical"])
        if "exact" in s:
            ax.plot(x, s["exact"], color="k", ls="--", lw=1.0, alpha=0.85)
            has_exact = True
        if "paper" in s:
            ax.plot(x, s["paper"], color=_darker(color), ls=":", lw=2.0)
            has_paper = True
        if err_ax is not None:
            for name, ls in (("exact", "--"), ("paper", ":")):
                if f"error_{name}" in s:
                    e = _positive(s[f"error_{name}"])
                    errors.append(e)
                    err_ax.plot(x, e, color=color, ls=ls, lw=1.3)
    if _spans_decades(values, 2.0) and not options.norm:
        _use_log(ax)
    elif not options.norm and _flat_lines(values):
        if err_ax is not None:
            ax.set_title(
                "each layer changes by < 3% of the axis range: --norm shows the relative changes",
                fontsize=7,
                color="0.3",
            )
        else:
            _note_in_gap(ax, values, "layers change < 3%: try --norm")
    if err_ax is not None:
        finite = [e for e in errors if np.isfinite(e).any()]
        if finite:
            err_ax.set_yscale("log")
        else:
            _empty_panel(err_ax, "no theory stored (optimizer without theory state)")
    return layers, has_exact, has_paper


def _note_in_gap(ax: Axes, values: Sequence[np.ndarray], text: str) -> None:
    """Writes a small note at the height of the widest empty band between flat lines."""
    lo, hi = ax.get_ylim()
    levels = sorted((float(np.nanmean(v)) - lo) / (hi - lo) for v in values if np.isfinite(v).any())
    edges = [0.0, *levels, 1.0]
    gaps = [(b - a, 0.5 * (a + b)) for a, b in zip(edges[:-1], edges[1:])]
    _, middle = max(gaps)
    ax.text(
        0.5, middle, text, transform=ax.transAxes, fontsize=7, color="0.3", ha="center", va="center"
    )


def _flat_lines(values: Sequence[np.ndarray], fraction: float = 0.03) -> bool:
    """Whether several lines each vary by less than `fraction` of the range they span together
    (offsets between layers hide their dynamics)."""
    finite = [v[np.isfinite(v)] for v in values]
    finite = [v for v in finite if v.size]
    if len(finite) < 2:
        return False
    span = max(v.max() for v in finite) - min(v.min() for v in finite)
    return bool(span > 0 and max(np.ptp(v) for v in finite) < fraction * span)


def figure_conservation(data: CacheData, options: Options) -> Figure:
    """Translation, scale or rescale of one run: per-layer sums with both theories on top and
    their relative errors below (``--layer-wise``: one panel per layer with its neurons)."""
    kind = str(data.attrs.get("kind") or data.metric)
    if kind not in CONSERVATION:
        kind = next((k for k in CONSERVATION if data.metric.startswith(k)), "scale")
    if options.layer_wise:
        return _figure_conservation_layers(data, kind, options)
    fig = new_figure(7.2, 5.6, options)
    ax, err_ax = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1.4]})
    layers, has_exact, has_paper = _draw_conservation(ax, err_ax, data, kind, options)
    if not layers:
        _empty_panel(ax, f"no {kind} groups in this network")
    ax.set_ylabel(_quantity_label(kind, options))
    fig.suptitle(f"{SYMMETRY_TITLE[kind]}\n{_run_title(data.run, data)}")
    err_ax.set_ylabel("relative error")
    _finish_x(err_ax, data, options)
    style = _style_handles(has_paper, has_exact)
    if len(layers) <= 4:
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(handles=handles + style, loc="best", framealpha=0.85)
    elif len(layers) <= MAX_LEGEND_LAYERS or options.legend:
        handles, _ = ax.get_legend_handles_labels()
        ax.legend(
            handles=handles + style, loc="upper left", bbox_to_anchor=(1.01, 1.0), framealpha=0.85
        )
    else:
        fig.legend(handles=style, loc="outside lower center", ncol=3, framealpha=0.85)
        _layer_key(fig, [ax, err_ax], layers, options)
    err_handles = [
        Line2D([], [], color="0.3", ls=ls, lw=1.3, label=label)
        for label, ls, shown in (("exact", "--", has_exact), ("paper", ":", has_paper))
        if shown
    ]
    if err_handles:
        err_ax.legend(handles=err_handles, loc="best", ncol=2, framealpha=0.85)
    return fig


def _pick(n: int, limit: int) -> np.ndarray:
    """Indices of at most `limit` of `n` items, evenly spread."""
    if n <= limit:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, limit).round().astype(int))


def _figure_conservation_layers(data: CacheData, kind: str, options: Options) -> Figure:
    """One panel per layer: every neuron's quantity (thin) with its theories, and below it the
    median and range over neurons of each theory's relative error."""
    layers = data.layers(kind)
    x = data.x()
    n = max(len(layers), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.0 * ncols + 0.6, 4.0 * nrows + 0.5, options)
    outer = fig.add_gridspec(nrows, ncols)
    colors = layer_colors(len(layers))
    has_exact = has_paper = False
    for i, (layer, color) in enumerate(zip(layers, colors)):
        inner = outer[i // ncols, i % ncols].subgridspec(2, 1, height_ratios=[3, 1.3], hspace=0.05)
        ax = fig.add_subplot(inner[0])
        err_ax = fig.add_subplot(inner[1], sharex=ax)
        base = f"groups/{kind}/{layer}"
        emp = data.get(f"{base}/empirical")
        if emp is None:
            _empty_panel(ax, "not cached")
            continue
        emp = np.asarray(emp, dtype=np.float64).reshape(emp.shape[0], -1)  # [N, n]
        pick = _pick(emp.shape[1], MAX_NEURONS)
        theories = {}
        for name in ("exact", "paper"):
            t = data.get(f"{base}/theory_{name}")
            if t is not None:
                theories[name] = np.asarray(t, dtype=np.float64).reshape(t.shape[0], -1)[:, pick]
        emp = emp[:, pick]
        if options.norm:
            ref = emp[0]
            emp, ok = _normalise(emp, ref)
            theories = {k: _normalise(v, ref)[0] for k, v in theories.items()}
            if not ok:
                warn(f"{kind} {layer}: some neurons start at 0 and are not normalised")
        ax.plot(x, emp, color=color, lw=0.7, alpha=0.6)
        if "exact" in theories:
            ax.plot(x, theories["exact"], color="k", ls="--", lw=0.5, alpha=0.6)
            has_exact = True
        if "paper" in theories:
            ax.plot(x, theories["paper"], color=_darker(color), ls=":", lw=0.8, alpha=0.8)
            has_paper = True
        if _spans_decades([emp], 2.0) and not options.norm:
            _use_log(ax)
        total = data.node_attrs(base).get("size", emp.shape[1])
        shown = f"{len(pick)} of {total} neurons" if len(pick) < int(total) else f"{total} neurons"
        ax.set_title(f"{_short(layer, 36)} ({shown})", fontsize=9)
        ax.tick_params(labelbottom=False)
        if i % ncols == 0:
            ax.set_ylabel(_quantity_label(kind, options, per="per neuron"))
            err_ax.set_ylabel("rel. error")
        drew = False
        for name, ls, shade in (("exact", "--", "0.2"), ("paper", ":", _darker(color))):
            e = data.get(f"{base}/error_{name}")
            if e is None:
                continue
            e = _positive(np.asarray(e, dtype=np.float64).reshape(e.shape[0], -1))  # [N, n]
            if not np.isfinite(e).any():
                continue
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (step 0)
                lo = np.nanmin(np.where(np.isfinite(e), e, np.inf), axis=1)
                hi = np.nanmax(np.where(np.isfinite(e), e, -np.inf), axis=1)
                med = np.nanmedian(e, axis=1)
            lo[~np.isfinite(lo)] = np.nan
            hi[~np.isfinite(hi)] = np.nan
            err_ax.fill_between(x, lo, hi, color=shade, alpha=0.15, lw=0)
            err_ax.plot(x, med, color=shade, ls=ls, lw=1.2, label=f"{name} (median, range)")
            drew = True
        if drew:
            err_ax.set_yscale("log")
            if i == 0:
                err_ax.legend(loc="best", fontsize=7, framealpha=0.85)
        else:
            _empty_panel(err_ax, "no theory")
        if i // ncols == nrows - 1 or i + ncols >= len(layers):
            _finish_x(err_ax, data, options)
        else:
            err_ax.tick_params(labelbottom=False)
    if not layers:
        _empty_panel(fig.add_subplot(outer[0, 0]), f"no {kind} groups in this network")
    fig.suptitle(f"{SYMMETRY_TITLE[kind]}, per neuron\n{_run_title(data.run, data)}")
    fig.legend(
        handles=_style_handles(has_paper, has_exact),
        loc="outside lower center",
        ncol=3,
        framealpha=0.85,
    )
    return fig


def panel_conservation(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view for a grid of runs: layer sums and both theories, no error axis."""
    kind = str(data.attrs.get("kind") or data.metric)
    if kind not in CONSERVATION:
        kind = next((k for k in CONSERVATION if data.metric.startswith(k)), "scale")
    layers, _, _ = _draw_conservation(ax, None, data, kind, options)
    if not layers:
        _empty_panel(ax, f"no {kind} groups")


# ----------------------------------------------------------------------------------------
# Performance: losses and accuracies


_LOSSES = (("train_loss", "train"), ("test_loss", "test"))
_ACCURACIES = (("train_top1", "train top-1"), ("top1", "test top-1"), ("top5", "test top-5"))


def _find(data: CacheData, name: str) -> np.ndarray | None:
    for path in (name, f"metrics/{name}", f"performance/{name}"):
        v = data.get(path)
        if v is not None and v.shape[:1] == data.steps.shape:
            return np.asarray(v, dtype=np.float64)
    return None


def _as_percent(values: np.ndarray) -> np.ndarray:
    """Accuracies in percent (values stored as fractions in [0, 1] are scaled by 100)."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.max() <= 1.0:
        return values * 100.0
    return values


def _draw_losses(ax: Axes, data: CacheData, options: Options, color: Any = None) -> bool:
    x = data.x()
    drew = []
    for (name, label), ls in zip(_LOSSES, ("-", "--")):
        v = _find(data, name)
        if v is None or not np.isfinite(v).any():
            continue
        kw = {"color": color} if color is not None else {}
        _plot_xy(ax, x, v, ls=ls, label=label if color is None else None, **kw)
        drew.append(v)
    if drew and _spans_decades(drew, 1.0):
        _use_log(ax)
    return bool(drew)


def _draw_accuracies(ax: Axes, data: CacheData, options: Options, color: Any = None) -> bool:
    x = data.x()
    drew = False
    for (name, label), ls in zip(_ACCURACIES, ("-", "--", ":")):
        v = _find(data, name)
        if v is None or not np.isfinite(v).any():
            continue
        kw = {"color": color} if color is not None else {}
        _plot_xy(ax, x, _as_percent(v), ls=ls, label=label if color is None else None, **kw)
        drew = True
    return drew


def figure_performance(data: CacheData, options: Options) -> Figure:
    """Training and test loss (left) and top-1 / top-5 accuracy (right) over training."""
    fig = new_figure(9.0, 3.6, options)
    ax_loss, ax_acc = fig.subplots(1, 2, sharex=True)
    if _draw_losses(ax_loss, data, options):
        ax_loss.legend(loc="best")
    else:
        _empty_panel(ax_loss, "no losses in this cache")
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    if _draw_accuracies(ax_acc, data, options):
        ax_acc.legend(loc="best")
    else:
        _empty_panel(ax_acc, "no accuracies in this cache")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    for ax in (ax_loss, ax_acc):
        _finish_x(ax, data, options)
    fig.suptitle(f"performance: {_run_title(data.run, data)}")
    return fig


def panel_performance(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view for a grid of runs: losses (left axis) and top-1 accuracy (right axis)."""
    if not _draw_losses(ax, data, options):
        _empty_panel(ax, "no losses")
        return
    ax.set_ylabel("loss")
    v = _find(data, "top1")
    if v is not None and np.isfinite(v).any():
        twin = ax.twinx()
        _plot_xy(twin, data.x(), _as_percent(v), color="tab:green", lw=1.2, label="test top-1")
        twin.set_ylabel("test top-1 (%)", color="tab:green")
        twin.grid(False)
    ax.legend(loc="best", fontsize=7)


# ----------------------------------------------------------------------------------------
# Per-group series of the other metrics: phase, symmetry_violation, gradient


def _panels_grid(fig: Figure, n: int, max_cols: int = 4) -> list[Axes]:
    """`n` axes in a near-square grid (extra cells hidden)."""
    n = max(n, 1)
    ncols = min(n, max_cols)
    nrows = math.ceil(n / ncols)
    axes = list(np.asarray(fig.subplots(nrows, ncols, squeeze=False)).ravel())
    for ax in axes[n:]:
        ax.set_visible(False)
    return axes[:n]


def _grid_size(n: int, max_cols: int = 4, w: float = 3.6, h: float = 3.0) -> tuple[float, float]:
    n = max(n, 1)
    ncols = min(n, max_cols)
    return w * ncols + 0.8, h * math.ceil(n / ncols) + 0.8


def _by_kind(keys: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for kind, layer in keys:
        out.setdefault(kind, []).append(layer)
    return out


def _kind_lines(
    ax: Axes,
    data: CacheData,
    kind: str,
    layers: Sequence[str],
    dataset: str,
    options: Options,
    log: bool | None = None,
) -> list[np.ndarray]:
    """One line per layer of ``groups/<kind>/<layer>/<dataset>`` ([N]) in layer colours."""
    x = data.x()
    drawn = []
    for layer, color in zip(layers, layer_colors(len(layers))):
        y = data.get(f"groups/{kind}/{layer}/{dataset}")
        if y is None:
            continue
        y = np.asarray(y, dtype=np.float64)
        if options.norm:
            first = y[np.isfinite(y)]
            y, _ = _normalise(y, np.asarray(first[0] if first.size else 1.0))
        if log:
            y = _positive(y)
        _plot_xy(ax, x, y, color=color, lw=1.4, label=_short(layer))
        drawn.append(y)
    if log or (log is None and _spans_decades(drawn, 2.0)):
        if any(np.isfinite(d).any() for d in drawn):
            _use_log(ax)
    return drawn


def _layer_legend(fig: Figure, ax: Axes, layers: Sequence[str], options: Options) -> None:
    """A legend naming the layers (inside for up to 4, beside the axes up to
    `MAX_LEGEND_LAYERS` or with --legend) or a colour bar keyed by depth."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if len(layers) <= 4:
        ax.legend(loc="best", fontsize=7, framealpha=0.85)
    elif len(layers) <= MAX_LEGEND_LAYERS or options.legend:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, framealpha=0.85)
    else:
        _layer_key(fig, [ax], layers, options)


def figure_symmetry_violation(data: CacheData, options: Options) -> Figure:
    """How far the gradients are from each symmetry's constraint, per layer (log scale)."""
    kinds = _by_kind(data.group_keys())
    fig = new_figure(*_grid_size(len(kinds), 3, 4.0, 3.4), options)
    axes = _panels_grid(fig, len(kinds), 3)
    for ax in axes[1:]:
        ax.sharey(axes[0])
    for i, (ax, (kind, layers)) in enumerate(zip(axes, kinds.items())):
        drawn = _kind_lines(ax, data, kind, layers, "violation", replace(options, norm=False), True)
        if not any(np.isfinite(d).any() for d in drawn):
            _empty_panel(ax, "no finite values\n(needs consecutive steps or the update buffer)")
        ax.set_title(SHORT_TITLE.get(kind, kind))
        if i == 0:
            ax.set_ylabel("violation (max over the layer's neurons)")
        _finish_x(ax, data, options)
        _layer_legend(fig, ax, layers, options)
    if not kinds:
        _empty_panel(axes[0], "no symmetry groups in this network")
    fig.suptitle(
        r"symmetry violation $|\langle g_A, c_A\rangle| / (|g_A|\,|c_A|)$ "
        "(0: exact symmetry; float32 round-off: about 1e-7)\n"
        f"{_run_title(data.run, data)}"
    )
    return fig


def panel_symmetry_violation(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: every layer of every kind, log scale."""
    keys = data.group_keys()
    names = [f"{k}/{layer}" for k, layer in keys]
    x = data.x()
    for (kind, layer), name, color in zip(keys, names, layer_colors(len(keys))):
        y = data.get(f"groups/{kind}/{layer}/violation")
        if y is not None:
            _plot_xy(ax, x, _positive(y), color=color, lw=1.2, label=_short(name))
    if ax.lines and any(np.isfinite(line.get_ydata()).any() for line in ax.lines):
        ax.set_yscale("log")
    ax.set_ylabel("violation")


def figure_gradient(data: CacheData, options: Options) -> Figure:
    """Squared gradient norms |g_A|^2 summed over each layer's groups, one panel per kind."""
    kinds = _by_kind(data.group_keys())
    fig = new_figure(*_grid_size(len(kinds), 3, 4.2, 3.4), options)
    axes = _panels_grid(fig, len(kinds), 3)
    for ax, (kind, layers) in zip(axes, kinds.items()):
        _kind_lines(ax, data, kind, layers, "grad_sq_sum", options, None)
        ax.set_title(SHORT_TITLE.get(kind, kind))
        label = r"$|g_A|^2$ (sum over layer)"
        ax.set_ylabel(label + (" / initial value" if options.norm else ""))
        _finish_x(ax, data, options)
        _layer_legend(fig, ax, layers, options)
    if not kinds:
        _empty_panel(axes[0], "no symmetry groups in this network")
    fig.suptitle(f"squared gradient norms per layer\n{_run_title(data.run, data)}")
    return fig


def panel_gradient(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: every layer of every kind."""
    keys = data.group_keys()
    for kind, layers in _by_kind(keys).items():
        _kind_lines(ax, data, kind, layers, "grad_sq_sum", options, True)
    ax.set_ylabel(r"$|g_A|^2$ (sum over layer)")


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
    import matplotlib
    from matplotlib.collections import LineCollection

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
        ax.plot(q, v, color=color, lw=1.2, label=_short(layer))
        ax.plot(q[0], v[0], "o", color=color, ms=3)
    paper = data.get(f"{base}/velocity_paper_sum")
    if paper is not None and color is None:
        p = np.asarray(paper, dtype=np.float64)[ok] / scale
        ax.plot(q, p, color="k", ls="--", lw=0.9, alpha=0.8, label="paper's dQ/dt (plain SGD)")
    ax.axhline(0.0, color="0.5", lw=0.7)
    return True


def figure_phase(data: CacheData, options: Options) -> Figure:
    """Phase portraits: position Q against velocity dQ/dt of each scale/rescale layer."""
    import matplotlib

    keys = data.group_keys()
    fig = new_figure(*_grid_size(len(keys), 4, 3.5, 3.1), options)
    axes = _panels_grid(fig, len(keys), 4)
    any_drawn = False
    for ax, (kind, layer) in zip(axes, keys):
        if not _phase_lines(ax, data, kind, layer, options):
            _empty_panel(ax, "fewer than 2 finite rows")
            continue
        any_drawn = True
        ax.set_title(f"{kind}: {_short(layer, 34)}", fontsize=9)
        ax.set_xlabel(QUANTITY.get(kind, "Q") + " (sum over layer)")
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
        _empty_panel(axes[0], "no scale or rescale groups in this network")
    fig.suptitle(
        "phase portraits: position against velocity (finite differences between saved "
        f"steps)\n{_run_title(data.run, data)}"
    )
    return fig


def panel_phase(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: every layer's portrait in layer colours."""
    keys = data.group_keys()
    for (kind, layer), color in zip(keys, layer_colors(len(keys))):
        _phase_lines(ax, data, kind, layer, options, color=color, relative=True)
    ax.set_xlabel(r"$(Q - Q_0) / |Q_0|$ (layer sum)")
    ax.set_ylabel(r"$(dQ/dt) / |Q_0|$")
    ax.xaxis.set_major_locator(MaxNLocator(4))


# ----------------------------------------------------------------------------------------
# Norms and distance from initialisation


_NORM_LABEL = {
    "norms": (r"$\|\theta\|$", "weight norm"),
    "distance": (r"$\|\theta_k - \theta_0\|$", "distance from initialisation"),
}


def figure_layer_norms(data: CacheData, options: Options) -> Figure:
    """Norms or distance from initialisation: per layer (``--layer-wise``: per parameter) and
    over the whole network."""
    symbol, title = _NORM_LABEL.get(data.metric, (data.metric, data.metric))
    where = "params" if options.layer_wise else "layers"
    order = _json_attr(data.attrs.get(where if where == "params" else "layers"), [])
    stored = data.keys(where)
    names = [n for n in order if n in stored] + [n for n in stored if n not in order]
    fig = new_figure(10.0, 4.0, options)
    ax, ax_total = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.5, 1]})
    x = data.x()
    values = []
    for name, color in zip(names, layer_colors(len(names))):
        y = np.asarray(data.get(f"{where}/{name}"), dtype=np.float64)
        if options.norm:
            y, _ = _normalise(y, np.asarray(y[0]))
        _plot_xy(ax, x, y, color=color, lw=1.4, label=_short(name))
        values.append(y)
    if _spans_decades(values, 2.0):
        _use_log(ax)
    unit = "parameter" if options.layer_wise else "layer"
    ax.set_title(f"per {unit}")
    ax.set_ylabel(f"{symbol} ({unit})" + (" / initial value" if options.norm else ""))
    if names:
        _layer_legend(fig, ax, names, options)
    else:
        _empty_panel(ax, f"no /{where} in this cache")
    total = data.get("total")
    if total is not None:
        y = np.asarray(total, dtype=np.float64)
        if options.norm:
            y, _ = _normalise(y, np.asarray(y[0]))
        _plot_xy(ax_total, x, y, color="k", lw=1.6)
    else:
        _empty_panel(ax_total, "no /total in this cache")
    ax_total.set_title("whole network")
    ax_total.set_ylabel(f"{symbol} (all trainable parameters)")
    for a in (ax, ax_total):
        _finish_x(a, data, options)
    fig.suptitle(f"{title}: {_run_title(data.run, data)}")
    return fig


def panel_layer_norms(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: the per-layer curves."""
    symbol, _ = _NORM_LABEL.get(data.metric, (data.metric, data.metric))
    order = _json_attr(data.attrs.get("layers"), [])
    stored = data.keys("layers")
    names = [n for n in order if n in stored] + [n for n in stored if n not in order]
    lines = {n: np.asarray(data.get(f"layers/{n}"), dtype=np.float64) for n in names}
    _draw_series(ax, data.x(), lines, options)
    ax.set_ylabel(f"{symbol} (layer)")


# ----------------------------------------------------------------------------------------
# Weight trajectories: network and weights_grads


def _trajectory_pca(blocks: Iterable[np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Projects a trajectory [N, M] (given as column blocks [N, m]) on its top two principal
    components without forming it: the N x N Gram matrix is accumulated block by block.

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


def _draw_pca(
    ax: Axes, fig: Figure | None, coords: np.ndarray, frac: np.ndarray, x: np.ndarray, label: str
) -> None:
    import matplotlib

    ax.plot(coords[:, 0], coords[:, 1], color="0.6", lw=0.8, zorder=1)
    sc = ax.scatter(
        coords[:, 0], coords[:, 1], c=x, cmap=matplotlib.colormaps["plasma"], s=14, zorder=2
    )
    ax.plot(coords[0, 0], coords[0, 1], "o", mfc="none", mec="k", ms=9, label="start")
    ax.set_xlabel(f"PC 1 ({100 * frac[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * frac[1]:.1f}% of variance)")
    ax.legend(loc="best", fontsize=7)
    if fig is not None:
        fig.colorbar(sc, ax=ax, shrink=0.9, pad=0.01).set_label(label)


def figure_network(data: CacheData, options: Options) -> Figure:
    """Weight trajectories: the whole trajectory projected on its two principal components, and
    sampled individual weights of each parameter over training."""
    params = _json_attr(data.attrs.get("params"), []) or data.keys("params")
    params = [p for p in params if f"params/{p}/values" in data]
    n = data.num_rows
    x = data.x()
    shown = params[:7]
    fig = new_figure(*_grid_size(len(shown) + 1, 4, 3.6, 3.0), options)
    axes = _panels_grid(fig, len(shown) + 1, 4)
    if params and n >= 2:
        coords, frac = _trajectory_pca((data.get(f"params/{p}/values") for p in params), n)
        _draw_pca(axes[0], fig, coords, frac, x, data.x_label)
        axes[0].set_title("trajectory of all stored weights (PCA)")
    else:
        _empty_panel(axes[0], "needs at least 2 rows")
    for ax, p in zip(axes[1:], shown):
        values = np.asarray(data.get(f"params/{p}/values"), dtype=np.float64)  # [N, m]
        pick = _pick(values.shape[1], 16)
        ax.plot(x, values[:, pick], lw=0.8, alpha=0.8)
        ax.set_title(f"{_short(p, 34)} ({len(pick)} of {values.shape[1]} stored)", fontsize=9)
        ax.set_ylabel("weight value")
        _finish_x(ax, data, options)
    more = f"; first 7 of {len(params)} parameters shown" if len(params) > len(shown) else ""
    fig.suptitle(f"network trajectories{more}\n{_run_title(data.run, data)}")
    return fig


def panel_network(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: the PCA projection of the trajectory."""
    params = [p for p in data.keys("params") if f"params/{p}/values" in data]
    if not params or data.num_rows < 2:
        _empty_panel(ax, "needs at least 2 rows")
        return
    coords, frac = _trajectory_pca((data.get(f"params/{p}/values") for p in params), data.num_rows)
    _draw_pca(ax, None, coords, frac, data.x(), "")


def figure_weights_grads(data: CacheData, options: Options) -> Figure:
    """The weights x steps matrix: its trajectory on two principal components, and the norm of
    the stored weights and gradients over training."""
    n = data.num_rows
    x = data.x()
    fig = new_figure(10.0, 4.0, options)
    ax_pca, ax_norm = fig.subplots(1, 2)
    weights = data.get("weights")
    grads = data.get("grads")
    if weights is not None and n >= 2:
        coords, frac = _trajectory_pca([weights], n)
        _draw_pca(ax_pca, fig, coords, frac, x, data.x_label)
        ax_pca.set_title("weight trajectory (PCA)")
    else:
        _empty_panel(ax_pca, "needs /weights with at least 2 rows")
    for arr, label, color in ((weights, "weights", "tab:blue"), (grads, "gradients", "tab:red")):
        if arr is None:
            continue
        norm = np.sqrt(np.square(np.asarray(arr, dtype=np.float64)).reshape(n, -1).sum(axis=1))
        _plot_xy(ax_norm, x, _positive(norm), color=color, label=f"|{label}|")
    if ax_norm.lines:
        ax_norm.set_yscale("log")
        ax_norm.legend(loc="best")
    ax_norm.set_ylabel("Euclidean norm of the stored columns")
    _finish_x(ax_norm, data, options)
    cols = data.attrs.get("columns", "")
    fig.suptitle(f"{data.metric} ({cols} columns): {_run_title(data.run, data)}")
    return fig


def panel_weights_grads(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view: the PCA projection of the weights."""
    weights = data.get("weights")
    if weights is None or data.num_rows < 2:
        _empty_panel(ax, "needs /weights with at least 2 rows")
        return
    coords, frac = _trajectory_pca([weights], data.num_rows)
    _draw_pca(ax, None, coords, frac, data.x(), "")


# ----------------------------------------------------------------------------------------
# Any other cache: every per-step series


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
        item = data._file[path]
        if item.shape[:1] != (n,) or not np.issubdtype(item.dtype, np.number):
            continue
        if len(item.shape) > 1:
            if f"{path}_sum" in present:
                continue
            values = np.asarray(item[()], dtype=np.float64).reshape(n, -1).sum(axis=1)
            name = f"{name} (sum)"
        else:
            values = np.asarray(item[()], dtype=np.float64)
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


def _draw_series(ax: Axes, x: np.ndarray, lines: dict[str, np.ndarray], options: Options) -> None:
    names = list(lines)
    colors = layer_colors(len(names))
    values = []
    for name, color in zip(names, colors):
        y = lines[name]
        if options.norm:
            y, _ = _normalise(y, np.asarray(y[np.isfinite(y)][0] if np.isfinite(y).any() else 1.0))
        _plot_xy(ax, x, y, color=color, lw=1.4, label=_short(name))
        values.append(y)
    if _spans_decades(values, 2.0):
        _use_log(ax)


def figure_generic(data: CacheData, options: Options) -> Figure:
    """Any cache: one panel per quantity, one line per layer (log scale where it spans decades)."""
    series = per_step_series(data)
    quantities = list(series)[:12]
    n = max(len(quantities), 1)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig = new_figure(4.2 * ncols + 0.8, 3.2 * nrows + 0.6, options)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    x = data.x()
    for ax, quantity in zip(axes, quantities):
        lines = series[quantity]
        _draw_series(ax, x, lines, options)
        label = quantity.replace("_", " ")
        ax.set_title(label)
        ax.set_ylabel(label + (" / initial value" if options.norm else ""))
        _finish_x(ax, data, options)
        if 1 < len(lines) <= MAX_LEGEND_LAYERS or (options.legend and len(lines) > 1):
            ax.legend(loc="best", fontsize=7)
        elif len(lines) > MAX_LEGEND_LAYERS:
            _layer_key(fig, [ax], list(lines), options)
    for ax in axes[len(quantities) :]:
        ax.set_visible(False)
    if not quantities:
        _empty_panel(axes[0], "no per-step series in this cache")
    fig.suptitle(f"{data.metric}: {_run_title(data.run, data)}")
    return fig


def panel_generic(ax: Axes, data: CacheData, options: Options) -> None:
    """Compact view for a grid of runs: the first quantity of the cache."""
    series = per_step_series(data)
    if not series:
        _empty_panel(ax, "no per-step series")
        return
    quantity = next(iter(series))
    _draw_series(ax, data.x(), series[quantity], options)
    ax.set_ylabel(quantity.replace("_", " "))


# ----------------------------------------------------------------------------------------
# Registry of plotters


@dataclass(frozen=True)
class Plotter:
    """How one metric is drawn.

    Attributes:
        figure: full figure of one run, ``figure(data, options) -> Figure``.
        panel: compact view drawn into one axes of a multi-run grid.
        compare: figure of several runs together, ``compare(runs, metric, options, suffix)``
            (None: a grid of `panel` views).
    """

    figure: Callable[[CacheData, Options], Figure]
    panel: Callable[[Axes, CacheData, Options], None]
    compare: Callable[[Sequence[Run], str, Options, str], Figure] | None = None


def plotter_for(metric: str) -> Plotter:
    """The plotter of a metric (the generic one for metrics without their own)."""
    return PLOTTERS.get(metric) if metric in PLOTTERS else GENERIC


def open_cache(run: Run, metric: str, suffix: str = "", x: str = "steps") -> CacheData:
    """Opens one cache of a run.

    Raises:
        UserError: when the cache is missing (names the cache.py command).
        CorruptFileError: when it cannot be read.
    """
    path = run.cache_file(metric, suffix)
    if not fileio.exists(path):
        raise UserError(f"run {run.path} has no {metric}{suffix} cache; run {run.cache_command()}")
    return CacheData(path, run, metric, x)


def figure_for(run: Run, metric: str, options: Options | None = None, suffix: str = "") -> Figure:
    """The figure of one metric of one run.

    Args:
        run: the run (see `find_runs`).
        metric: cache name, e.g. "scale".
        options: drawing options.
        suffix: cache file suffix.
    """
    options = resolve_options(options or Options())
    import matplotlib

    with matplotlib.rc_context(_rc(options)):
        with open_cache(run, metric, suffix, options.x) as data:
            return _texify(plotter_for(metric).figure(data, options), options)


# ----------------------------------------------------------------------------------------
# Several runs


def varying_hyperparameters(runs: Sequence[Run]) -> list[str]:
    """Training flags whose values differ between runs, most familiar first (lr, wd, ...)."""
    configs = [r.hyperparameters for r in runs]
    keys = sorted({k for c in configs for k in c} - _BOOKKEEPING)
    varying = []
    for key in keys:
        values = {json.dumps(c.get(key), sort_keys=True, default=str) for c in configs}
        if len(values) > 1:
            varying.append(key)
    order = {k: i for i, k in enumerate(_HP_ORDER)}
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
                [f"{_HP_SHORT.get(rk, rk)}={_fmt(v)}" for v in rows],
                [f"{_HP_SHORT.get(ck, ck)}={_fmt(v)}" for v in cols],
                f"rows: {rk}, columns: {ck}",
            )
    if len(varying) == 1:
        key = varying[0]
        vals = sort_values(key)
        ordered = sorted(runs, key=lambda r: vals.index(r.hyperparameters.get(key)))
        labels = [f"{_HP_SHORT.get(key, key)}={_fmt(r.hyperparameters.get(key))}" for r in ordered]
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
    paper's hyperparameter grids for translation, scale and rescale)."""
    options = resolve_options(options or Options())
    import matplotlib

    plotter = plotter_for(metric)
    if plotter.compare is not None:
        with matplotlib.rc_context(_rc(options)):
            return _texify(plotter.compare(runs, metric, options, suffix), options)
    cells, row_labels, col_labels, how = grid_layout(runs)
    nrows, ncols = len(cells), len(cells[0])
    with matplotlib.rc_context(_rc(options)):
        fig = new_figure(3.4 * ncols + 1.0, 2.8 * nrows + 0.9, options)
        axes = fig.subplots(nrows, ncols, squeeze=False, sharex=False)
        layer_names: list[str] = []
        for i in range(nrows):
            for j in range(ncols):
                ax = axes[i][j]
                run = cells[i][j]
                if run is None:
                    _empty_panel(ax, "no run")
                    continue
                with open_cache(run, metric, suffix, options.x) as data:
                    plotter.panel(ax, data, options)
                    if metric in CONSERVATION and len(data.layers(metric)) > len(layer_names):
                        layer_names = data.layers(metric)
                    x_label = data.x_label
                title = ", ".join(t for t in (row_labels[i], col_labels[j]) if t) or run.expid
                ax.set_title(title)
                if i == nrows - 1 and not ax.get_xlabel():
                    ax.set_xlabel(x_label)
        what = f"{runs[0].experiment}, {len(runs)} runs ({how})"
        if metric in CONSERVATION:
            quantity = _quantity_label(metric, options)
            fig.suptitle(f"{SYMMETRY_TITLE[metric]}: {quantity}\n{what}")
            handles = [
                Line2D([], [], color=c, lw=1.8, label=_short(n))
                for n, c in zip(layer_names, layer_colors(len(layer_names)))
            ]
            if len(layer_names) > MAX_LEGEND_LAYERS and not options.legend:
                handles = []
                _layer_key(fig, list(axes.ravel()), layer_names, options)
            fig.legend(
                handles=handles + _style_handles(True, True),
                loc="outside lower center",
                ncol=min(len(handles) + 3, 5),
                framealpha=0.85,
            )
        else:
            fig.suptitle(f"{metric}: {what}")
            handles, labels = axes[0][0].get_legend_handles_labels()
            if handles and (len(handles) <= MAX_LEGEND_LAYERS or options.legend):
                fig.legend(
                    handles=handles,
                    labels=labels,
                    loc="outside lower center",
                    ncol=min(len(handles), 5),
                    framealpha=0.85,
                )
    return _texify(fig, options)


def compare_performance(
    runs: Sequence[Run], metric: str, options: Options, suffix: str = ""
) -> Figure:
    """Losses and top-1 accuracies of several runs overlaid, one colour per run."""
    varying = varying_hyperparameters(runs)
    fig = new_figure(10.0, 4.2, options)
    ax_loss, ax_acc = fig.subplots(1, 2)
    colors = layer_colors(len(runs))
    handles = []
    for run, color in zip(runs, colors):
        with open_cache(run, metric, suffix, options.x) as data:
            x = data.x()
            for (name, _), ls in zip(_LOSSES, ("-", "--")):
                v = _find(data, name)
                if v is not None and np.isfinite(v).any():
                    _plot_xy(ax_loss, x, v, color=color, ls=ls, lw=1.4)
            for (name, _), ls in zip(_ACCURACIES, ("-", "--", ":")):
                v = _find(data, name)
                if v is not None and np.isfinite(v).any():
                    _plot_xy(ax_acc, x, _as_percent(v), color=color, ls=ls, lw=1.4)
            x_label = data.x_label
        label = _hp_text(run.hyperparameters, varying) if varying else run.expid
        handles.append(Line2D([], [], color=color, lw=2, label=label or run.expid))
    style = [
        Line2D([], [], color="0.3", ls="-", label="train (loss, top-1)"),
        Line2D([], [], color="0.3", ls="--", label="test (loss, top-1)"),
        Line2D([], [], color="0.3", ls=":", label="test top-5"),
    ]
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel(x_label)
    if _spans_decades([line.get_ydata() for line in ax_loss.lines], 1.0):
        _use_log(ax_loss)
    ax_loss.set_ylabel("loss")
    ax_loss.set_title("loss")
    ax_acc.set_ylabel("accuracy (%)")
    ax_acc.set_title("accuracy")
    ax_acc.legend(handles=style, loc="best", fontsize=7, framealpha=0.85)
    fig.legend(
        handles=handles,
        loc="outside right upper",
        title=", ".join(varying) if varying else "run",
        framealpha=0.85,
    )
    fig.suptitle(f"performance: {runs[0].experiment}, {len(runs)} runs")
    return fig


PLOTTERS: Registry[Plotter] = Registry("figure")
GENERIC = Plotter(figure_generic, panel_generic)
for _kind in CONSERVATION:
    PLOTTERS.add(_kind, Plotter(figure_conservation, panel_conservation))
PLOTTERS.add("performance", Plotter(figure_performance, panel_performance, compare_performance))
PLOTTERS.add("phase", Plotter(figure_phase, panel_phase))
PLOTTERS.add("symmetry_violation", Plotter(figure_symmetry_violation, panel_symmetry_violation))
PLOTTERS.add("gradient", Plotter(figure_gradient, panel_gradient))
PLOTTERS.add("norms", Plotter(figure_layer_norms, panel_layer_norms))
PLOTTERS.add("distance", Plotter(figure_layer_norms, panel_layer_norms))
PLOTTERS.add("network", Plotter(figure_network, panel_network))
PLOTTERS.add("weights_grads", Plotter(figure_weights_grads, panel_weights_grads))
PLOTTERS.add("weights_grads_full", Plotter(figure_weights_grads, panel_weights_grads))


# ----------------------------------------------------------------------------------------
# Saving and the whole command


def save_figure(
    fig: Figure,
    folder: str,
    name: str,
    formats: Sequence[str] = ("png",),
    dpi: int = DPI,
    use_tex: bool = False,
) -> list[str]:
    """Writes a figure atomically in every format (temporary file in `folder`, then renamed).

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
    import matplotlib

    fileio.makedirs(folder)
    paths = []
    for fmt in formats:
        path = fileio.join(folder, f"{name}.{fmt}")
        with matplotlib.rc_context({"text.usetex": use_tex}):
            fileio.atomic_write(
                path,
                lambda f, fmt=fmt: fig.savefig(
                    f, format=fmt, dpi=dpi, bbox_inches="tight", facecolor="white"
                ),
            )
        paths.append(path)
    return paths


def figure_name(metric: str, suffix: str, options: Options, multi: bool = False) -> str:
    """File name (without extension) of a figure: the metric plus the options that change it."""
    name = f"{metric}{suffix}"
    if multi:
        name += "_grid"
    if options.layer_wise and metric in LAYER_WISE and not multi:
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
        UserError: no such run, no caches, unknown metric or bad option (nothing is written).
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
            path = run.cache_file(metric, suffix)
            CacheData(path, run, metric, options.x).close()
    options = resolve_options(options)
    written: list[str] = []
    if len(runs) == 1:
        run = runs[0]
        folder = plot_dir or fileio.join(run.path, "figures")
        for metric in names:
            if verbose:
                print(f"reading {run.cache_file(metric, suffix)}", file=sys.stderr)
            fig = figure_for(run, metric, options, suffix)
            written += save_figure(
                fig,
                folder,
                figure_name(metric, suffix, options),
                options.formats,
                options.dpi,
                options.use_tex,
            )
        return written
    folder = plot_dir or fileio.join(save_dir, experiment, "figures")
    for metric in names:
        if verbose:
            print(f"reading {metric}{suffix} of {len(runs)} runs", file=sys.stderr)
        fig = figure_grid(runs, metric, options, suffix)
        written += save_figure(
            fig,
            folder,
            figure_name(metric, suffix, options, multi=True),
            options.formats,
            options.dpi,
            options.use_tex,
        )
    return written
