"""Online tracking: per-group measured quantities and theory, recorded during training.

A `Tracker` attaches to any torch optimizer through its step hooks. Every `every`-th update it
measures, for each symmetry group (per neuron, float64):

* ``value``: the conserved quantity of the new parameters theta_s (translation S = sum theta_A,
  scale Q = |theta_A|^2, rescale R = |theta_A1|^2 - |theta_A2|^2), as `Utils.theory.measure`;
* ``magnitude``: the same sum with non-negative terms (sum |theta_A|; |theta_A1|^2 +
  |theta_A2|^2), the denominator of the relative errors of the conservation metrics;
* ``grad_sq`` |g_A|^2 and ``update_sq`` |u_A|^2 of the update s-1 -> s (u = (theta_{s-1} -
  theta_s) / eta, so decoupled weight decay is part of u), NaN on rows without an update;
* ``violation`` |<g_A, c_A>| / (|g_A| |c_A|) of that update's gradient (c_A = 1, theta_A,
  (theta_A1, -theta_A2) at theta_{s-1}), as the ``symmetry_violation`` metric;
* ``angular_update``: the angle in radians between theta_{A,s-1} and theta_{A,s} (scale and
  rescale; NaN for translation);

and the theory state of every *theory source* (an object with ``theory_snapshot()`` returning
``{group key: {field: array}}``, as `Utils.optimizers.TrackingSGD` does; the optimizer is one
when it has that method). Rows can also carry evaluation metrics (`Tracker.log`).

With a run folder the rows stream into ``<run>/online.h5``, which has the layout of
features.h5 (docs/FORMATS.md) without ``/params`` and ``/buffers`` and with
``/measured/<kind>/<layer>/<field>`` [N, size] float64. It is written by
`Utils.storage.FeaturesWriter` in blocks of rows, so a process killed at any moment leaves a
readable file whose committed rows are complete; cache.py reads it when the run has no
features.h5 (or with ``--source online``), and plot.py draws its caches like any other.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from Utils import fileio, storage
from Utils.errors import UsageError, UserError
from Utils.groups import SymmetryGroup, groups_to_json

ONLINE_FILE = "online.h5"
MEASURED = "measured"
FIELDS = ("value", "magnitude", "grad_sq", "update_sq", "violation", "angular_update")
TINY = 1e-300
BLOCK_ROWS = 64  # rows written to the file at once ...
BLOCK_SECONDS = 10.0  # ... or after this long, whichever comes first


def online_path(run_dir: str) -> str:
    """Path of a run's online tracking file, ``<run>/online.h5``."""
    return fileio.join(run_dir, ONLINE_FILE)


def measured_path(group_key: str, field_name: str) -> str:
    """HDF5 path of a measured field, e.g. ``measured/scale/features.0/value``."""
    return f"{MEASURED}/{group_key}/{field_name}"


def relative_error(theory: np.ndarray, measured: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """|theory - measured| / max(magnitude, TINY), elementwise (the conservation metrics' error).

    Args:
        theory: predictions [size].
        measured: measured values [size].
        magnitude: the sums of non-negative terms [size].

    Returns:
        float64 [size].
    """
    theory = np.asarray(theory, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    return np.abs(theory - measured) / np.maximum(np.asarray(magnitude, dtype=np.float64), TINY)


def _rows(x: torch.Tensor, dim: int | None) -> torch.Tensor:
    """x as [slices, rest]: one row per index of `dim` (one row in all when dim is None)."""
    if dim is None:
        return x.reshape(1, -1)
    if x.ndim == 1:
        return x.reshape(-1, 1)
    if dim % x.ndim == 0:
        return x.reshape(x.shape[0], -1)
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)


class _Family:
    """The groups of one theory family (`Utils.kinds`: translation sums, quadratic squares).

    Every member of every group reduces a parameter-shaped tensor to one sum per slice along
    its axis (`_rows`); the slices of all members are scattered into the group entries by
    one ``index_add`` with the members' signs (signed sums) or without (unsigned sums).
    The measured quantity and its magnitude are summed in float64; the diagnostics (|g|^2,
    |u|^2, <g, c>) sum each slice in the parameters' dtype (float32: relative error ~1e-7)
    and combine the slices in float64, as the tracked SGD step does.

    Args:
        groups: groups of one family, in order.
        shapes: parameter name -> shape.
        device: where the parameters live.
    """

    def __init__(
        self,
        groups: Sequence[SymmetryGroup],
        shapes: Mapping[str, torch.Size],
        device: torch.device,
    ) -> None:
        self.groups = list(groups)
        self.quadratic = self.groups[0].spec.family == "quadratic"  # Utils/kinds.py
        self.members: list[tuple[str, int | None]] = []
        index: list[int] = []
        sign: list[float] = []
        start = 0
        for g in self.groups:
            for m in g.members:
                shape = shapes[m.param]
                dim = None if m.dim is None else m.dim % len(shape)
                n = 1 if dim is None else shape[dim]
                self.members.append((m.param, dim))
                index += [start + m.offset + j // m.block for j in range(n)]
                sign += [float(m.sign)] * n
            start += g.size
        self.total = start
        self.names = list(dict.fromkeys(name for name, _ in self.members))
        self.index = torch.tensor(index, dtype=torch.long, device=device)
        self.sign = torch.tensor(sign, dtype=torch.float64, device=device)
        self.bounds = np.cumsum([0] + [g.size for g in self.groups])

    def split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """{group key: flat[..., entries of the group]}."""
        return {g.key: flat[..., a:b] for g, a, b in zip(self.groups, self.bounds, self.bounds[1:])}

    def _slices(self, op, *tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """float64 [S]: op(rows of each tensor) for every member, concatenated."""
        parts = [
            op(*(_rows(t[name], dim) for t in tensors)).to(torch.float64)
            for name, dim in self.members
        ]
        return torch.cat(parts)

    def _scatter(self, flat: torch.Tensor, signed: bool) -> torch.Tensor:
        out = torch.zeros(self.total, dtype=torch.float64, device=flat.device)
        return out.index_add_(0, self.index, flat * self.sign if signed else flat)

    def current(self, params: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray]:
        """(value [total], magnitude [total]) of the parameters, summed in float64."""
        if self.quadratic:
            sq = self._slices(_square64, params)
            value, magnitude = self._scatter(sq, True), self._scatter(sq, False)
        else:
            value = self._scatter(self._slices(_sum64, params), True)
            magnitude = self._scatter(self._slices(_abs64, params), False)
        return value.cpu().numpy(), magnitude.cpu().numpy()

    def before_update(
        self, params: Mapping[str, torch.Tensor], grads: Mapping[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(<g, c> signed [total], |g|^2 [total]) at theta_k, before the update."""
        g_sq = self._scatter(self._slices(_square, grads), False)
        if self.quadratic:
            dot = self._scatter(self._slices(_dot, grads, params), True)
        else:
            dot = self._scatter(self._slices(_sum, grads), True)
        return dot, g_sq

    def after_update(
        self,
        params: Mapping[str, torch.Tensor],
        delta: Mapping[str, torch.Tensor],
        before: tuple[torch.Tensor, torch.Tensor],
        c_sq: np.ndarray,
        lr: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """Every field of `FIELDS` for the update theta_k -> theta_{k+1} = params.

        Args:
            params: theta_{k+1}.
            delta: theta_k - theta_{k+1}.
            before: `before_update` of this update.
            c_sq: |c_A|^2 at theta_k (float64 [total]).
            lr: learning rate of each entry's parameters [total].
        """
        value, magnitude = self.current(params)
        delta_sq = self._scatter(self._slices(_square, delta), False).cpu().numpy()
        dot, g_sq = (t.cpu().numpy() for t in before)
        with np.errstate(invalid="ignore", divide="ignore"):
            denom = np.sqrt(g_sq * c_sq)
            violation = np.where(denom > 0, np.abs(dot) / np.where(denom > 0, denom, 1.0), np.nan)
            update_sq = np.where(lr != 0, delta_sq / np.square(lr), np.nan)
            if self.quadratic:
                norms = np.sqrt(c_sq * magnitude)
                cos = (c_sq + magnitude - delta_sq) / (2 * np.where(norms > 0, norms, 1.0))
                angle = np.where(norms > 0, np.arccos(np.clip(cos, -1.0, 1.0)), np.nan)
            else:
                angle = np.full_like(value, np.nan)
        return {
            "value": value,
            "magnitude": magnitude,
            "grad_sq": g_sq,
            "update_sq": update_sq,
            "violation": violation,
            "angular_update": angle,
        }

    def c_sq(self, params: Mapping[str, torch.Tensor]) -> np.ndarray:
        """|c_A|^2 of the symmetry's generator at the parameters: [total] float64."""
        if self.quadratic:
            return self.current(params)[1]
        return self._scatter(self._slices(_count, params), False).cpu().numpy()


def _square64(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float64).square()  # [slices]


def _sum64(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=1, dtype=torch.float64)


def _abs64(x: torch.Tensor) -> torch.Tensor:
    return x.abs().sum(dim=1, dtype=torch.float64)


def _square(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(x, dim=1).double().square()


def _sum(x: torch.Tensor) -> torch.Tensor:
    return x.sum(dim=1)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(x, y, dim=1)


def _count(x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64, device=x.device)


class _Source:
    """A theory source: ``snapshot()`` -> {group key: {field: array}}, fields prefixed."""

    def __init__(self, obj: Any, prefix: str = "") -> None:
        method = getattr(obj, "theory_snapshot", None) or getattr(obj, "snapshot", None)
        if not callable(method):
            raise TypeError(f"theory source {obj!r} has no theory_snapshot() or snapshot()")
        self._method = method
        self.prefix = prefix

    def theory_snapshot(self) -> dict[str, dict[str, np.ndarray]]:
        return {
            key: {self.prefix + name: value for name, value in fields.items()}
            for key, fields in self._method().items()
        }


def _theory_sources(optimizer: torch.optim.Optimizer, extra: Iterable[Any]) -> list[_Source]:
    """The optimizer (when it carries theory) and the extra sources: objects, or
    ``(prefix, object)`` pairs whose fields are stored as ``<prefix><field>``."""
    sources = [_Source(optimizer)] if hasattr(optimizer, "theory_snapshot") else []
    for source in extra:
        prefix, obj = source if isinstance(source, tuple) else ("", source)
        sources.append(_Source(obj, str(prefix)))
    return sources


def default_config(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A train.py-like config describing a loop the tracker was attached to.

    The conservation metrics read ``optimizer``, ``lr``, ``wd``, ``momentum``, ``dampening``
    and ``nesterov`` from it (first param group).
    """
    pg = optimizer.param_groups[0]
    momentum = pg.get("momentum", 0.0)
    return {
        "model": type(model).__name__,
        "optimizer": type(optimizer).__name__.lower(),
        "lr": float(pg.get("lr", 0.0)),
        "wd": float(pg.get("weight_decay", 0.0)),
        "momentum": float(momentum) if isinstance(momentum, int | float) else 0.0,
        "dampening": float(pg.get("dampening", 0.0)),
        "nesterov": bool(pg.get("nesterov", False)),
        "lr_drops": [],
        "lr_drop_rate": 1.0,
    }


class Tracker:
    """Tracks the symmetry groups of a model while any torch optimizer trains it.

    Attaching registers step pre- and post-hooks on the optimizer: the training loop itself
    is not changed. Every `every`-th update (and at `log`) one row is recorded: the fields
    of `FIELDS` per group, the theory sources' state, the step, epoch and learning rate.

    Args:
        model: the network (the parameters named in the groups are read from it).
        optimizer: any torch optimizer over the model's parameters.
        groups: symmetry groups (e.g. from `Utils.api.detect_groups`); groups whose
            parameters are not all in the model are left out. With a `TrackingSGD`, its
            ``groups`` (which mark what it could not track) are used when this is None.
        run_dir: run folder to stream rows into (``<run>/online.h5``, ``metrics.json``,
            ``groups.json``, ``hyperparameters.json``); None keeps only the latest row in
            memory.
        every: record every N-th update (1: every update; 0: only at `log`).
        config: the run's configuration (stored in the files; cache.py reads ``lr``, ``wd``,
            ``momentum``...); missing keys come from `default_config`.
        steps_per_epoch: to store each row's epoch (NaN without it).
        theory_sources: more objects with ``theory_snapshot()`` or ``snapshot()`` returning
            ``{group key: {field: array}}``, or ``(prefix, object)`` pairs whose fields are
            stored as ``<prefix><field>`` (e.g. ``("budget_", budget_tracker)``).
        start_step: step count of the model as attached (resumed runs).
        resume: continue an existing ``online.h5`` (its rows after `start_step` are dropped
            and rewritten; its row of `start_step` is kept); otherwise a new file is made.
        run_files: also write ``hyperparameters.json``, ``groups.json`` and ``metrics.json``
            (train.py writes its own).
        overwrite: replace the online.h5 of an existing run (else that is refused).

    Raises:
        UsageError: `every` < 0, or a URL run folder.
        UserError: the run folder already has an online.h5 (without `resume`/`overwrite`).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        groups: Sequence[SymmetryGroup] | None = None,
        run_dir: str | None = None,
        every: int = 1,
        config: Mapping[str, Any] | None = None,
        steps_per_epoch: int | None = None,
        theory_sources: Iterable[Any] = (),
        start_step: int = 0,
        resume: bool = False,
        run_files: bool = True,
        overwrite: bool = False,
    ) -> None:
        if int(every) < 0:
            raise UsageError(f"tracking every {every} steps: give a number >= 0 (1: every step)")
        if groups is None:
            groups = list(getattr(optimizer, "groups", []))
        self.model = model
        self.optimizer = optimizer
        self.every = int(every)
        self.steps_per_epoch = steps_per_epoch
        self.step = int(start_step)
        self.params = dict(model.named_parameters())
        self.groups = [g for g in groups if all(n in self.params for n in g.params)]
        self.sources = _theory_sources(optimizer, theory_sources)
        shapes = {n: p.shape for n, p in self.params.items()}
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self._families = [
            _Family(fam, shapes, device)
            for fam in (
                [g for g in self.groups if g.spec.family == "translation"],
                [g for g in self.groups if g.spec.family == "quadratic"],
            )
            if fam
        ]
        self._names = list(dict.fromkeys(n for f in self._families for n in f.names))
        self._prev: dict[str, torch.Tensor] | None = None
        self._before_sums: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._c_sq: list[np.ndarray] = []
        self._magnitudes: tuple[int, list[np.ndarray]] = (-1, [])  # (step, per family)
        self._open: storage.Row | None = None
        self._last_row: storage.Row | None = None
        self._pending: list[storage.Row] = []
        self._last_write = time.monotonic()
        self._history: list[dict[str, float]] = []
        self._latest: dict[str, dict[str, np.ndarray]] = {}
        self.config = {**default_config(model, optimizer), **dict(config or {})}
        self.run_dir = run_dir or ""
        self._has_start_row = False
        self.run_files = run_files
        self._writer: storage.FeaturesWriter | None = None
        if self.run_dir:
            self._start_files(resume, overwrite)
        self._handles = [
            optimizer.register_step_pre_hook(self._before),
            optimizer.register_step_post_hook(self._after),
        ]
        if not self._has_start_row:  # a resumed file keeps its row of start_step
            self._open = self._row(self._current_fields())

    # ----------------------------------------------------------------- files

    def _start_files(self, resume: bool, overwrite: bool) -> None:
        if fileio.is_url(self.run_dir):
            raise UsageError(
                f"online tracking writes HDF5 and needs a local run folder (got {self.run_dir})"
            )
        path = fileio.local_path(online_path(self.run_dir))
        fileio.makedirs(self.run_dir)
        if resume and fileio.exists(path):
            self._writer = storage.FeaturesWriter.open(path)
            keep = int(np.searchsorted(self._writer.steps, self.step, side="right"))
            self._has_start_row = keep > 0 and int(self._writer.steps[keep - 1]) == self.step
            self._writer.rows = keep  # rows after start_step are rewritten
            self._writer.steps = self._writer.steps[:keep]
            mpath = fileio.join(self.run_dir, "metrics.json")
            if self.run_files and fileio.exists(mpath):
                self._history = [h for h in fileio.read_json(mpath) if h["step"] < self.step]
            return
        if fileio.exists(path) and not overwrite:
            raise UserError(
                f"{path} already exists; choose another run folder, or pass resume=True to "
                "continue it or overwrite=True to replace it"
            )
        self._writer = storage.FeaturesWriter.create(
            path,
            json.dumps(self.config, sort_keys=True, default=str),
            groups_to_json(self.groups),
        )
        self._writer._f.attrs["source"] = "online"
        self._writer._f.attrs["every"] = self.every
        if not self.run_files:
            return
        fileio.write_json(
            fileio.join(self.run_dir, "hyperparameters.json"), {"config": self.config}
        )
        fileio.write_json(
            fileio.join(self.run_dir, "groups.json"), json.loads(groups_to_json(self.groups))
        )
        fileio.write_json(fileio.join(self.run_dir, "metrics.json"), [])

    # ----------------------------------------------------------------- hooks

    def _before(self, optimizer, args, kwargs) -> None:
        """Pre-step hook: finishes the open row (its lr is now known); before a tracked
        update, sums <g, c> and |g|^2 at theta_k and keeps a copy of theta_k."""
        self._finish_open()
        if not (self.every and (self.step + 1) % self.every == 0 and self._families):
            return
        with torch.no_grad():
            params = {n: self.params[n].detach() for n in self._names}
            grads = {
                n: torch.zeros_like(p) if p.grad is None else p.grad.detach()
                for n, p in ((n, self.params[n]) for n in self._names)
            }
            self._before_sums = [fam.before_update(params, grads) for fam in self._families]
            cached_step, cached = self._magnitudes
            self._c_sq = [
                cached[i] if (fam.quadratic and cached_step == self.step) else fam.c_sq(params)
                for i, fam in enumerate(self._families)
            ]
            if self._prev is None:
                self._prev = {n: p.clone() for n, p in params.items()}
            else:
                torch._foreach_copy_(list(self._prev.values()), list(params.values()))

    def _after(self, optimizer, args, kwargs) -> None:
        """Post-step hook: counts the update and records a row on tracked updates."""
        self.step += 1
        if not (self.every and self.step % self.every == 0):
            return
        fields: dict[str, dict[str, np.ndarray]] = {}
        if self._families and self._prev is not None:
            lr_of = {id(p): float(pg["lr"]) for pg in optimizer.param_groups for p in pg["params"]}
            with torch.no_grad():
                params = {n: self.params[n].detach() for n in self._names}
                torch._foreach_sub_(list(self._prev.values()), [params[n] for n in self._prev])
                magnitudes = []
                for fam, before, c_sq in zip(self._families, self._before_sums, self._c_sq):
                    lr = np.concatenate(
                        [
                            np.full(g.size, lr_of.get(id(self.params[g.params[0]]), math.nan))
                            for g in fam.groups
                        ]
                    )
                    out = fam.after_update(params, self._prev, before, c_sq, lr)
                    magnitudes.append(out["magnitude"])
                    for name, flat in out.items():
                        for key, part in fam.split(flat).items():
                            fields.setdefault(key, {})[name] = part
                self._magnitudes = (self.step, magnitudes)
        self._open = self._row(fields)

    # ----------------------------------------------------------------- rows

    def _current_fields(self) -> dict[str, dict[str, np.ndarray]]:
        fields: dict[str, dict[str, np.ndarray]] = {}
        magnitudes = []
        with torch.no_grad():
            params = {n: self.params[n].detach() for n in self._names}
            for fam in self._families:
                value, magnitude = fam.current(params)
                magnitudes.append(magnitude)
                for key, part in fam.split(value).items():
                    fields[key] = {"value": part}
                for key, part in fam.split(magnitude).items():
                    fields[key]["magnitude"] = part
        self._magnitudes = (self.step, magnitudes)
        return fields

    def _row(self, fields: dict[str, dict[str, np.ndarray]]) -> storage.Row:
        values: dict[str, np.ndarray] = {
            storage.EPOCH: np.asarray(self.epoch, dtype=np.float64),
            storage.SOURCES: np.asarray(b"online", dtype=storage.SOURCE_DTYPE),
        }
        nan = {g.key: np.full(g.size, np.nan) for g in self.groups}
        for g in self.groups:
            got = fields.get(g.key, {})
            for name in FIELDS:
                values[measured_path(g.key, name)] = np.asarray(
                    got.get(name, nan[g.key]), dtype=np.float64
                )
        for source in self.sources:
            for key, state in source.theory_snapshot().items():
                for name, array in state.items():
                    values[storage.theory_path(key, name)] = np.asarray(array, dtype=np.float64)
        self._latest = {k: dict(v) for k, v in fields.items()}
        return storage.Row(step=self.step, values=values)

    @property
    def epoch(self) -> float:
        """The current epoch as a float (NaN without ``steps_per_epoch``)."""
        return self.step / self.steps_per_epoch if self.steps_per_epoch else math.nan

    def _finish_open(self) -> None:
        """Completes the open row with the next update's learning rate and queues it."""
        if self._open is None:
            return
        row, self._open = self._open, None
        self._last_row = row
        row.values[storage.LR] = np.asarray(
            float(self.optimizer.param_groups[0]["lr"]), dtype=np.float64
        )
        if self._writer is None:
            return
        self._pending.append(row)
        if len(self._pending) >= BLOCK_ROWS or time.monotonic() - self._last_write > BLOCK_SECONDS:
            self._write()

    def _write(self) -> None:
        """Commits the queued rows to online.h5 (crash-safe: see Utils/storage.py)."""
        if self._writer is None or not self._pending:
            return
        rows, self._pending = self._pending, []
        specs: dict[str, storage.DatasetSpec] = {}
        for row in rows:
            for path, value in row.values.items():
                specs.setdefault(path, storage.spec_of(path, value))
        try:
            self._writer.prepare(specs.values(), len(rows))
            self._writer.append(rows)
        except Exception as exc:
            failed = fileio.write_error_of(exc, self._writer.path)
            if failed is None:
                raise
            self._writer.abandon()
            self._writer = None
            raise failed from None
        self._last_write = time.monotonic()

    # ----------------------------------------------------------------- public

    def log(self, metrics: Mapping[str, float]) -> None:
        """Records evaluation metrics (losses, accuracies...) at the current step.

        The row of the current step is recorded now if the hooks did not (its gradient and
        update fields are then NaN), and the rows so far are committed to the file;
        ``metrics.json`` gets one more entry.

        Args:
            metrics: name -> value (floats; e.g. ``{"test_loss": 0.3, "top1": 0.9}``).
        """
        if self._open is None or self._open.step != self.step:
            self._finish_open()
            self._open = self._row(self._current_fields())
        for name, value in metrics.items():
            self._open.values[storage.metric_path(str(name))] = np.asarray(
                float(value), dtype=np.float64
            )
        self._history.append({"step": self.step, "epoch": self.epoch, **dict(metrics)})
        if self.run_dir:
            self._write()
            if self.run_files:
                fileio.write_json(fileio.join(self.run_dir, "metrics.json"), self._history)

    def measured(self) -> dict[str, np.ndarray]:
        """The measured quantity of every group for the model's current parameters.

        Returns:
            group key -> float64 [size] (S, Q or R per neuron).
        """
        return {k: v["value"] for k, v in self._current_fields().items()}

    def theory(self) -> dict[str, dict[str, np.ndarray]]:
        """The theory sources' current state: group key -> field -> array (e.g. exact, paper)."""
        out: dict[str, dict[str, np.ndarray]] = {}
        for source in self.sources:
            for key, state in source.theory_snapshot().items():
                out.setdefault(key, {}).update(
                    {k: np.asarray(v, dtype=np.float64) for k, v in state.items()}
                )
        return out

    def errors(self) -> dict[str, dict[str, np.ndarray]]:
        """Relative errors of the predictions for the current parameters.

        Returns:
            group key -> {"exact": [size], "paper": [size]} (the fields the sources have):
            |theory - measured| / max(magnitude, 1e-300), as the conservation metrics.
        """
        current = self._current_fields()
        out: dict[str, dict[str, np.ndarray]] = {}
        for key, state in self.theory().items():
            if key not in current:
                continue
            m = current[key]
            out[key] = {
                name: relative_error(state[name], m["value"], m["magnitude"])
                for name in ("exact", "paper")
                if name in state
            }
        return out

    def worst_error(self, name: str = "exact") -> float:
        """The largest relative error of one prediction over every group and neuron (NaN if none)."""
        values = [e[name][~np.isnan(e[name])] for e in self.errors().values() if name in e]
        worst = [float(v.max()) for v in values if v.size]  # a diverged run has NaN errors
        return max(worst) if worst else math.nan

    def last_row(self) -> storage.Row | None:
        """The last row recorded (its datasets and values, as written to online.h5)."""
        return self._open or self._last_row

    def latest(self) -> dict[str, dict[str, np.ndarray]]:
        """The fields of the last recorded row: group key -> field -> [size]."""
        return {k: dict(v) for k, v in self._latest.items()}

    def flush(self) -> None:
        """Commits the rows recorded so far (the open row of the current step stays open)."""
        self._write()

    def close(self) -> None:
        """Records the open row, commits everything, marks the file complete, removes the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._finish_open()
        self._write()
        if self._writer is not None:
            self._writer.finish(complete=True)
            self._writer = None

    def abandon(self) -> None:
        """Removes the hooks and closes the file without writing queued rows (after an error)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abandon()


def for_training(
    cfg: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[SymmetryGroup],
    run_dir: str,
    steps_per_epoch: int,
    step: int,
    theory_sources: Iterable[Any] = (),
) -> Tracker | None:
    """The tracker of a train.py run with ``--track-online N`` (None when it is off).

    Called by the training loop on the process that writes the run; records into
    ``<run>/online.h5`` (in memory when the run saves nothing).

    Args:
        cfg: the run's config (``track_online``, ``resume``).
        model: the model being trained (not a DDP wrapper).
        optimizer: its optimizer.
        groups: the groups found for the run (all optimizers get their measured quantities).
        run_dir: the run folder ("" when nothing is saved).
        steps_per_epoch: optimizer steps per epoch.
        step: the step training starts (or resumes) at.
        theory_sources: more theory sources (the run's budget tracker, with its field prefix).
    """
    every = int(cfg.get("track_online") or 0)
    if every <= 0:
        return None
    return Tracker(
        model,
        optimizer,
        list(getattr(optimizer, "groups", groups)),
        run_dir=run_dir or None,
        every=every,
        config=dict(cfg),
        steps_per_epoch=steps_per_epoch,
        theory_sources=theory_sources,
        start_step=step,
        resume=bool(cfg.get("resume")),
        run_files=False,
        overwrite=True,  # train.py decided (--overwrite, or a new run folder)
    )


def track(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[SymmetryGroup] | None = None,
    **kwargs: Any,
) -> Tracker:
    """Attaches a `Tracker` to an optimizer (see `Tracker` for the arguments)."""
    return Tracker(model, optimizer, groups, **kwargs)


__all__ = [
    "FIELDS",
    "ONLINE_FILE",
    "Tracker",
    "default_config",
    "measured_path",
    "online_path",
    "relative_error",
    "track",
]
