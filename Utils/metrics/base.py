"""The metric registry, what a metric needs from a run, and helpers shared by the metrics.

A metric is a `Metric`: a compute step ``compute(ctx)`` that reads features.h5 by slices of
rows through `Utils.storage` and writes its cache file through ``ctx.writer`` (a
`Utils.metrics.io.CacheWriter`), plus the declaration of what it needs (groups of some kind,
a stored optimizer buffer, evaluation metrics, a number of rows), from which
`Metric.applies` answers whether the metric can be computed for a run and, if not, why.
The arithmetic of every metric is a pure numpy function in the metric's own module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from Utils import interrupt
from Utils.errors import UnknownNameError
from Utils.groups import Member, SymmetryGroup
from Utils.kinds import KINDS
from Utils.registry import Registry

# Bytes of one slice of rows read from features.h5 at a time (per array being read).
ROW_BUDGET_BYTES = 64 << 20
# At most this many rows per slice (per-neuron metrics read 64 steps at a time).
MAX_CHUNK_ROWS = 64
# Denominator floor of relative errors.
TINY = 1e-300

_NOT_TRAINABLE = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class FeaturesInfo:
    """What a features.h5 file holds, read once and used by `Metric.applies`.

    Attributes:
        num_rows: number of extracted rows.
        last_step: step of the last row (-1 when there is none).
        groups: every symmetry group (valid or not).
        hyperparameters: the run's train.py flags (keys with underscores).
        params: names of every ``/params`` entry.
        weights: names of the trainable parameters (no BatchNorm running statistics).
        buffers: buffer name -> parameter names stored for it.
        metrics: evaluation metrics with at least one finite value.
        theory: keys ``<kind>/<layer>`` of the groups that have theory state.
        shapes: parameter name -> shape (without the step axis).
        dtypes: parameter name -> numpy dtype.
        measured: keys ``<kind>/<layer>`` of the groups whose measured quantities were
            recorded during training (``/measured``, online.h5 written by Utils/online.py).
    """

    num_rows: int
    last_step: int
    groups: list[SymmetryGroup]
    hyperparameters: dict[str, Any]
    params: list[str]
    weights: list[str]
    buffers: dict[str, list[str]]
    metrics: list[str]
    theory: set[str]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, np.dtype]
    measured: set[str] = field(default_factory=set)

    @classmethod
    def from_file(cls, f: h5py.File) -> FeaturesInfo:
        """Reads the summary of an open features.h5 file."""
        from Utils import storage

        n = int(storage.num_rows(f))
        steps = np.asarray(storage.read_steps(f))
        hp = dict(storage.read_hyperparameters(f) or {})
        if isinstance(hp.get("config"), dict):
            hp = dict(hp["config"])
        params = list(storage.param_names(f))
        buffers: dict[str, list[str]] = {}
        for b in storage.buffer_names(f):
            buffers[b] = list(storage.buffer_params(f, b))
        metrics = []
        for name in storage.metric_names(f):
            values = np.asarray(storage.read_metric(f, name), dtype=np.float64)[:n]
            if np.isfinite(values).any():
                metrics.append(name)
        theory = set(storage.theory_keys(f))
        measured: set[str] = set()
        if "measured" in f:  # online.h5 (Utils/online.py): per-group sums recorded in training
            for kind in f["measured"]:
                for layer in f["measured"][kind]:
                    measured.add(f"{kind}/{layer}")
        layout = storage.param_layout(f)
        shapes = {p: shape for p, (shape, _) in layout.items()}
        dtypes = {p: dtype for p, (_, dtype) in layout.items()}
        weights = [p for p in params if not p.endswith(_NOT_TRAINABLE)]
        return cls(
            num_rows=n,
            last_step=int(steps[n - 1]) if n else -1,
            groups=list(storage.read_groups(f)),
            hyperparameters=hp,
            params=params,
            weights=weights,
            buffers=buffers,
            metrics=metrics,
            theory=theory,
            shapes=shapes,
            dtypes=dtypes,
            measured=measured,
        )

    def groups_of(self, kinds: Sequence[str]) -> list[SymmetryGroup]:
        """The groups of the given kinds, in kind order then detection order."""
        return [g for k in kinds for g in self.groups if g.kind == k]

    def has_buffer(self, buffer: str, params: Sequence[str] | None = None) -> bool:
        """Whether `buffer` is stored for every parameter in `params` (default: weights)."""
        stored = set(self.buffers.get(buffer, []))
        wanted = self.weights if params is None else params
        return bool(stored) and all(p in stored for p in wanted)


@dataclass
class Context:
    """Everything a metric's compute step uses.

    Attributes:
        features: the open features.h5 file.
        info: its summary.
        writer: the cache file being written.
        options: the metric's options (``subset``, ``seed``) as passed to cache.py.
        progress: show a progress bar over slices of rows.
    """

    features: h5py.File
    info: FeaturesInfo
    writer: Any
    options: dict[str, Any] = field(default_factory=dict)
    progress: bool = False
    _axes: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def axis(self, name: str) -> np.ndarray:
        """``steps`` ([N] int64), ``epoch`` or ``lr`` ([N] float64) of every row."""
        if name not in self._axes:
            from Utils import storage

            read = {
                "steps": storage.read_steps,
                "epoch": storage.read_epochs,
                "lr": storage.read_lr,
            }[name]
            dtype = np.int64 if name == "steps" else np.float64
            values = np.asarray(read(self.features), dtype=dtype)[: self.info.num_rows]
            self._axes[name] = values
        return self._axes[name]

    def row_slices(self, bytes_per_row: int = 0, desc: str = "") -> Iterator[slice]:
        """Consecutive slices covering all rows, each at most `MAX_CHUNK_ROWS` rows and about
        `ROW_BUDGET_BYTES` of data (`bytes_per_row` is the size of one row of what is read)."""
        per = MAX_CHUNK_ROWS
        if bytes_per_row > 0:
            per = max(1, min(per, ROW_BUDGET_BYTES // bytes_per_row))
        starts = range(0, self.info.num_rows, per)
        if self.progress:
            from tqdm import tqdm

            starts = tqdm(starts, desc=desc, leave=False, unit="slice", dynamic_ncols=True)
        for start in starts:
            interrupt.check()
            yield slice(start, min(start + per, self.info.num_rows))

    def row_bytes(self, params: Sequence[str], copies: int = 1) -> int:
        """Bytes of one row of `params` read as float64, times `copies`."""
        return copies * 8 * sum(int(np.prod(self.info.shapes[p], dtype=np.int64)) for p in params)

    def read_params(self, names: Sequence[str], rows: slice) -> dict[str, np.ndarray]:
        """Parameter values [r, *shape] (training dtype) for a slice of rows."""
        from Utils import storage

        return {n: np.asarray(storage.read_param(self.features, n, rows=rows)) for n in names}

    def read_buffer(self, buffer: str, names: Sequence[str], rows: slice) -> dict[str, np.ndarray]:
        """Optimizer buffer values [r, *shape] for a slice of rows."""
        from Utils import storage

        return {
            n: np.asarray(storage.read_buffer(self.features, buffer, n, rows=rows)) for n in names
        }

    def read_theory(self, group: SymmetryGroup, name: str, rows: slice) -> np.ndarray:
        """A theory field of a group ([r, size] or [r] for ``time``) for a slice of rows."""
        from Utils import storage

        return np.asarray(storage.read_theory(self.features, group.key, name, rows=rows))

    def has_measured(self, group: SymmetryGroup) -> bool:
        """Whether the group's measured quantities were recorded online (``/measured``)."""
        return group.key in self.info.measured

    def read_measured(self, group: SymmetryGroup, name: str, rows: slice) -> np.ndarray:
        """A measured field of a group (``value``, ``magnitude``...) for rows: [r, size]."""
        from Utils import storage

        path = f"measured/{group.key}/{name}"
        return np.asarray(storage.read_rows(self.features, path, rows), dtype=np.float64)

    def has_theory(self, group: SymmetryGroup, name: str) -> bool:
        """Whether features.h5 holds the theory field `name` of `group`."""
        return f"theory/{group.key}/{name}" in self.features

    def write_axes(self) -> None:
        """Writes ``/steps``, ``/epoch`` and ``/lr`` of every row."""
        for name in ("steps", "epoch", "lr"):
            self.writer.write(name, self.axis(name))


@dataclass(frozen=True)
class Metric:
    """One cached quantity: how to compute it and what it needs.

    Attributes:
        name: registry name (also the cache file name).
        compute: ``compute(ctx)`` writes the cache file through ``ctx.writer``.
        description: one line for --help and docs.
        kinds: needs at least one group of one of these kinds (empty: no groups needed).
        buffers: optimizer buffers that must be stored for every trainable parameter.
        needs_metrics: needs evaluation metrics (losses, accuracies) in features.h5.
        min_rows: least number of extracted rows.
        options: names of the cache.py options that change the result (``subset``, ``seed``).
        check: extra condition: returns "" when fine, or the reason it does not apply.
        online: computable from an online-tracked run (online.h5: per-group measured
            quantities, theory and metrics, no parameters).
    """

    name: str
    compute: Callable[[Context], None]
    description: str
    kinds: tuple[str, ...] = ()
    buffers: tuple[str, ...] = ()
    needs_metrics: bool = False
    min_rows: int = 1
    options: tuple[str, ...] = ()
    check: Callable[[FeaturesInfo], str] | None = None
    online: bool = False

    def applies(self, features: FeaturesInfo) -> tuple[bool, str]:
        """Whether this metric can be computed for a run.

        Args:
            features: summary of the run's features.h5.

        Returns:
            (True, "") or (False, one-line reason naming what is missing and how to get it).
        """
        if not features.params and not self.online:
            return False, (
                "the run was tracked online (no parameters stored); this metric needs "
                "checkpoints: train with --save-freq N and run extract.py"
            )
        if features.num_rows < self.min_rows:
            return False, (
                f"needs at least {self.min_rows} extracted checkpoints "
                f"(features.h5 has {features.num_rows})"
            )
        if self.kinds and not features.groups_of(self.kinds):
            hints = "; or ".join(KINDS[k].hint for k in self.kinds)
            return False, f"the network has no {'/'.join(self.kinds)} groups (needs {hints})"
        for buffer in self.buffers:
            if not features.has_buffer(buffer):
                return False, (
                    f"the run did not store the '{buffer}' buffer; retrain with "
                    f"--save-buffers {buffer} (e.g. --save-buffers grad,update)"
                )
        if self.needs_metrics and not features.metrics:
            return False, "features.h5 holds no evaluated losses or accuracies"
        if self.check is not None:
            reason = self.check(features)
            if reason:
                return False, reason
        return True, ""


METRICS: Registry[Metric] = Registry("metric")
ALIASES: dict[str, str] = {}


def register_metric(
    name: str,
    *,
    description: str,
    kinds: Sequence[str] = (),
    buffers: Sequence[str] = (),
    needs_metrics: bool = False,
    min_rows: int = 1,
    options: Sequence[str] = (),
    check: Callable[[FeaturesInfo], str] | None = None,
    aliases: Sequence[str] = (),
    online: bool = False,
) -> Callable[[Callable[[Context], None]], Callable[[Context], None]]:
    """Decorator that registers a compute function as the metric `name`.

    Args:
        name: the metric's name.
        description: one line.
        kinds: symmetry kinds needed (any of them).
        buffers: optimizer buffers needed.
        needs_metrics: needs evaluation metrics.
        min_rows: least number of extracted rows.
        options: cache.py options that change the result.
        check: extra applicability test (see `Metric.check`).
        aliases: other names accepted on the command line for this metric.
        online: computable from an online-tracked run (see `Metric.online`).

    Returns:
        The decorator (it returns the function unchanged).
    """
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown symmetry kind {k!r}")

    def decorator(fn: Callable[[Context], None]) -> Callable[[Context], None]:
        METRICS.add(
            name,
            Metric(
                name=name,
                compute=fn,
                description=description,
                kinds=tuple(kinds),
                buffers=tuple(buffers),
                needs_metrics=needs_metrics,
                min_rows=min_rows,
                options=tuple(options),
                check=check,
                online=online,
            ),
            kinds=tuple(kinds),
            buffers=tuple(buffers),
        )
        for alias in aliases:
            ALIASES[alias] = name
        return fn

    return decorator


def resolve_metric(name: str) -> str:
    """The registered name for `name` or one of its aliases.

    Raises:
        UnknownNameError: listing the valid names.
    """
    name = ALIASES.get(name.strip(), name.strip())
    METRICS.get(name)
    return name


def parse_metric_list(text: str) -> list[str]:
    """Splits a comma list of metric names (aliases allowed) into registered names.

    Raises:
        UnknownNameError: one line naming the unknown metric and every valid name.
    """
    names: list[str] = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        try:
            name = resolve_metric(raw)
        except UnknownNameError:
            valid = ", ".join(METRICS.names() + sorted(ALIASES))
            raise UnknownNameError(
                f"unknown metric '{raw.strip()}'; choose from: {valid}"
            ) from None
        if name not in names:
            names.append(name)
    return names


def unsigned(group: SymmetryGroup) -> SymmetryGroup:
    """A copy of `group` whose members all have sign +1 (sums of magnitudes)."""
    return group.unsigned()


def group_attrs(group: SymmetryGroup) -> dict[str, Any]:
    """HDF5 attributes describing a group (kind, size, violation, valid, reason, members)."""
    return {
        "kind": group.kind,
        "name": group.name,
        "size": int(group.size),
        "violation": float("nan") if group.violation is None else float(group.violation),
        "valid": bool(group.valid),
        "reason": group.reason,
        "members": [_member_dict(m) for m in group.members],
    }


def _member_dict(m: Member) -> dict[str, Any]:
    return {"param": m.param, "dim": m.dim, "block": m.block, "offset": m.offset, "sign": m.sign}


def invalid_groups(groups: Sequence[SymmetryGroup]) -> dict[str, str]:
    """``{group key: reason}`` of the groups that are not valid."""
    return {g.key: g.reason or "not valid" for g in groups if not g.valid}


def layer_of(param: str) -> str:
    """The layer (module) a parameter belongs to: its name without the last component."""
    return param.rsplit(".", 1)[0] if "." in param else param


def hp_float(hp: dict[str, Any], key: str, default: float = 0.0) -> float:
    """A float hyperparameter, `default` when absent or null."""
    value = hp.get(key)
    return default if value is None else float(value)


def time_axis(ctx: Context, groups: Sequence[SymmetryGroup]) -> tuple[np.ndarray, str]:
    """The time t_k of every row: the theory's time of the first group that has it, else
    sum over the intervals between rows of lr(row) * (1 - dampening) * (steps in between).

    Returns:
        (time [N] float64, source: "theory:<group key>" or "lr at the rows").
    """
    for g in groups:
        if ctx.has_theory(g, "time"):
            t = ctx.read_theory(g, "time", slice(0, ctx.info.num_rows))
            return np.asarray(t, dtype=np.float64).reshape(ctx.info.num_rows), f"theory:{g.key}"
    n = ctx.info.num_rows
    steps = ctx.axis("steps").astype(np.float64)
    lr = ctx.axis("lr")
    damp = hp_float(ctx.info.hyperparameters, "dampening")
    if hp_float(ctx.info.hyperparameters, "momentum") == 0:
        damp = 0.0
    t = np.zeros(n, dtype=np.float64)
    if n > 1:
        t[1:] = np.cumsum(lr[:-1] * (1 - damp) * np.diff(steps))
    return t, "lr at the rows"


def nan_max(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Max over an axis ignoring NaN; NaN where every value is NaN (no warnings)."""
    x = np.asarray(x, dtype=np.float64)
    filled = np.where(np.isnan(x), -math.inf, x)
    out = filled.max(axis=axis) if x.shape[axis] else np.full(x.shape[:axis], -math.inf)
    return np.where(np.isneginf(out), np.nan, out)


def previous_lr(ctx: Context) -> np.ndarray:
    """The learning rate eta_{s-1} of the update that produced each row's parameters theta_s.

    The stored ``/lr`` of a row is eta_s (the next update's). When the previous row is step
    s - 1, its ``/lr`` is exact. Otherwise the run's MultiStepLR schedule (``lr``, ``lr_drops``,
    ``lr_drop_rate`` and the steps per epoch read from ``/epoch``) is used if it reproduces
    ``/lr`` at every row; failing that, eta_s where the two neighbouring rows have the same lr
    (a monotone schedule cannot change in between), else NaN.

    Returns:
        [N] float64 (NaN at row 0 unless it follows nothing, and where unknown).
    """
    n = ctx.info.num_rows
    steps = ctx.axis("steps")
    lr = ctx.axis("lr")
    out = np.full(n, np.nan)
    if n < 2:
        return out
    scheduled = _scheduled_lr(ctx, steps, lr)
    if scheduled is not None:
        out[1:] = scheduled(steps[1:] - 1)
    else:
        same = lr[1:] == lr[:-1]
        out[1:] = np.where(same, lr[1:], np.nan)
    consecutive = steps[1:] - steps[:-1] == 1
    out[1:] = np.where(consecutive, lr[:-1], out[1:])
    return out


def _scheduled_lr(
    ctx: Context, steps: np.ndarray, lr: np.ndarray
) -> Callable[[np.ndarray], np.ndarray] | None:
    """eta(step) of the run's MultiStepLR schedule, or None when it does not match ``/lr``."""
    hp = ctx.info.hyperparameters
    if "lr" not in hp:
        return None
    epochs = ctx.axis("epoch")
    usable = (steps > 0) & (epochs > 0)
    if not usable.any():
        return None
    per_epoch = np.rint(steps[usable] / epochs[usable])
    if np.any(per_epoch != per_epoch[0]) or per_epoch[0] < 1:
        return None
    milestones = np.sort(np.asarray(hp.get("lr_drops") or [], dtype=np.int64)) * int(per_epoch[0])
    rate = hp_float(hp, "lr_drop_rate", 1.0)
    base = hp_float(hp, "lr")

    def eta(s: np.ndarray) -> np.ndarray:
        drops = np.searchsorted(milestones, np.asarray(s), side="right")
        return base * rate ** drops.astype(np.float64)

    if not np.allclose(eta(steps), lr, rtol=1e-9, atol=0.0):
        return None
    return eta
