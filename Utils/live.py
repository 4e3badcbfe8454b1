"""Live feedback while training: a line per evaluation, TensorBoard scalars, cache.py's summary.

* When stdout is not a terminal (a log file, a pipe, a batch job), train.py prints one line
  per evaluation: step, epoch, learning rate, losses, accuracy and the worst exact-theory
  error so far (a terminal has the progress bar instead).
* ``--tensorboard`` writes scalars to ``<run>/tensorboard``: losses and accuracies, the
  learning rate and, per layer, the exact and the paper's theory errors, the symmetry
  violation and the angular update.
* `cache_summary` gives cache.py's closing lines: per group the largest exact and paper
  errors and violation, and the command that draws the figures.

The numbers come from a `Utils.online.Tracker` (the run's ``--track-online`` tracker, or an
in-memory one that records only the update before each evaluation).
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from typing import IO, Any

import numpy as np
import torch
from torch import nn

from Utils import fileio
from Utils.errors import UsageError
from Utils.groups import SymmetryGroup
from Utils.online import Tracker

TENSORBOARD_DIR = "tensorboard"
_METRIC_TAGS = {
    "train_loss": "loss/train",
    "test_loss": "loss/test",
    "train_top1": "accuracy/train_top1",
    "top1": "accuracy/test_top1",
    "top5": "accuracy/test_top5",
}


def layer_errors(tracker: Tracker) -> dict[str, dict[str, float]]:
    """Per-layer relative errors of the theory for the current parameters.

    Returns:
        group key -> {"exact": e, "paper": e}: |sum theory - sum measured| / sum magnitude
        over the layer's neurons (the ``error_<name>_sum`` of the conservation caches).
    """
    current = tracker._current_fields()
    out: dict[str, dict[str, float]] = {}
    for key, state in tracker.theory().items():
        m = current.get(key)
        if m is None:
            continue
        total = max(float(np.sum(m["magnitude"])), 1e-300)
        out[key] = {
            name: abs(float(np.sum(state[name])) - float(np.sum(m["value"]))) / total
            for name in ("exact", "paper")
            if name in state
        }
    return out


class LiveFeedback:
    """Reports each evaluation as a line and/or TensorBoard scalars.

    Args:
        tracker: the tracker whose groups, theory and last row are reported.
        total_steps: steps of the whole run (for the lines).
        lines: print a line per evaluation (default: when `stream` is not a terminal).
        tensorboard_dir: folder of the TensorBoard event files (None: no TensorBoard).
        purge_step: on resume, TensorBoard events from this step on are discarded.
        stream: where the lines go (default stdout).
    """

    def __init__(
        self,
        tracker: Tracker,
        total_steps: int = 0,
        lines: bool | None = None,
        tensorboard_dir: str | None = None,
        purge_step: int | None = None,
        stream: IO[str] | None = None,
    ) -> None:
        self.tracker = tracker
        self.total_steps = int(total_steps)
        self.stream = stream or sys.stdout
        self.lines = (not _isatty(self.stream)) if lines is None else bool(lines)
        self.worst = math.nan
        self.writer = None
        if tensorboard_dir:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError(
                    "--tensorboard needs the tensorboard package: pip install tensorboard "
                    "(it is in requirements.txt)"
                ) from None
            self.writer = SummaryWriter(fileio.local_path(tensorboard_dir), purge_step=purge_step)

    def evaluation(self, metrics: Mapping[str, float]) -> None:
        """Reports the evaluation just made at the tracker's current step.

        Args:
            metrics: train_loss, train_top1, test_loss, top1, top5 (NaN where not measured).
        """
        step = self.tracker.step
        errors = layer_errors(self.tracker)
        worst_now = self.tracker.worst_error("exact")
        if not math.isnan(worst_now):
            self.worst = worst_now if math.isnan(self.worst) else max(self.worst, worst_now)
        lr = float(self.tracker.optimizer.param_groups[0]["lr"])
        if self.lines:
            print(self._line(step, lr, metrics), file=self.stream, flush=True)
        if self.writer is not None:
            self._scalars(step, lr, metrics, errors)

    def _line(self, step: int, lr: float, metrics: Mapping[str, float]) -> str:
        total = f"/{self.total_steps}" if self.total_steps else ""
        parts = [f"step {step}{total}", f"epoch {self.tracker.epoch:.2f}", f"lr {lr:.4g}"]
        for name in ("train_loss", "test_loss", "train_top1", "top1"):
            value = metrics.get(name, math.nan)
            if value is not None and not math.isnan(float(value)):
                parts.append(f"{name} {float(value):.4f}")
        if not math.isnan(self.worst):
            parts.append(f"worst exact error {self.worst:.2e}")
        return "  ".join(parts)

    def _scalars(
        self,
        step: int,
        lr: float,
        metrics: Mapping[str, float],
        errors: Mapping[str, Mapping[str, float]],
    ) -> None:
        w = self.writer
        w.add_scalar("lr", lr, step)
        for name, tag in _METRIC_TAGS.items():
            value = metrics.get(name, math.nan)
            if value is not None and not math.isnan(float(value)):
                w.add_scalar(tag, float(value), step)
        for key, errs in errors.items():
            for name, value in errs.items():
                w.add_scalar(f"theory_error_{name}/{key}", value, step)
        if not math.isnan(self.worst):
            w.add_scalar("theory_error_exact/worst_neuron_so_far", self.worst, step)
        for key, fields in self.tracker.latest().items():
            violation = fields.get("violation")
            if violation is not None and np.isfinite(violation).any():
                w.add_scalar(f"violation/{key}", float(np.nanmax(violation)), step)
            angle = fields.get("angular_update")
            if angle is not None and np.isfinite(angle).any():
                w.add_scalar(f"angular_update/{key}", float(np.nanmean(angle)), step)
        w.flush()

    def close(self) -> None:
        """Flushes and closes the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def for_training(
    cfg: Mapping[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    groups: Sequence[SymmetryGroup],
    run_dir: str,
    steps_per_epoch: int,
    eval_every: int,
    total_steps: int,
    step: int,
    online: Tracker | None,
) -> LiveFeedback | None:
    """The live feedback of a train.py run (None when there is nothing to report).

    Lines are printed when stdout is not a terminal; ``--tensorboard`` adds the event files.
    Without ``--track-online`` an in-memory tracker records the update before each
    evaluation (for the violation and the angular update).
    """
    lines = not _isatty(sys.stdout)
    tensorboard = bool(cfg.get("tensorboard"))
    if not (lines or tensorboard):
        return None
    if tensorboard and (not run_dir or fileio.is_url(run_dir)):
        raise UsageError("--tensorboard writes into a local run folder: give --expid")
    on_xla = any(p.device.type == "xla" for p in model.parameters())
    tracker = online or Tracker(
        model,
        optimizer,
        [] if on_xla else list(getattr(optimizer, "groups", groups)),  # no extra XLA graphs
        every=max(int(eval_every), 1),
        config=dict(cfg),
        steps_per_epoch=steps_per_epoch,
        start_step=step,
    )
    return LiveFeedback(
        tracker,
        total_steps=total_steps,
        lines=lines,
        tensorboard_dir=os.path.join(run_dir, TENSORBOARD_DIR) if tensorboard else None,
        purge_step=step if cfg.get("resume") else None,
    )


def cache_summary(run_dir: str, suffix: str = "") -> list[str]:
    """cache.py's closing lines: per group the largest errors and violation, then the next step.

    Reads the translation, scale and rescale caches of the run (those that exist): per group,
    the largest relative error of the exact and the paper's theory over neurons and rows, and
    the violation (the largest of the ``symmetry_violation`` cache, else the one measured at
    detection).

    Returns:
        The lines (a header, one per group, the cache folder, the plot.py command).
    """
    from Utils.metrics.io import cache_path, open_cache

    violations: dict[str, float] = {}
    vpath = cache_path(run_dir, "symmetry_violation", suffix)
    if fileio.exists(vpath):
        with open_cache(vpath) as f:
            for kind in f.get("groups", {}):
                for layer, grp in f["groups"][kind].items():
                    if "violation" in grp:
                        violations[f"{kind}/{layer}"] = _nanmax(grp["violation"][()])
    rows: list[tuple[str, str, str, str]] = []
    for kind in ("translation", "scale", "rescale"):
        path = cache_path(run_dir, kind, suffix)
        if not fileio.exists(path):
            continue
        with open_cache(path) as f:
            for layer, grp in f.get(f"groups/{kind}", {}).items():
                key = f"{kind}/{layer}"
                exact = _nanmax(grp["error_exact"][()]) if "error_exact" in grp else math.nan
                paper = _nanmax(grp["error_paper"][()]) if "error_paper" in grp else math.nan
                violation = violations.get(key, math.nan)
                if math.isnan(violation):  # no stored gradients: the one measured at detection
                    violation = float(grp.attrs.get("violation", math.nan))
                rows.append((key, _fmt(exact), _fmt(paper), _fmt(violation)))
    lines: list[str] = []
    if rows:
        width = max(len(r[0]) for r in rows + [("group", "", "", "")])
        lines.append(f"{'group':<{width}}  {'max exact err':>13}  {'max paper err':>13}  violation")
        lines += [f"{k:<{width}}  {e:>13}  {p:>13}  {v}" for k, e, p, v in rows]
    path = fileio.local_path(str(run_dir)).rstrip("/")
    head, expid = os.path.split(path)
    save_dir, experiment = os.path.split(head)
    command = (
        f"python plot.py --save-dir {save_dir or '.'} --experiment {experiment} --expid {expid}"
    )
    if suffix:
        command += f" --suffix {suffix}"
    lines.append(f"caches: {fileio.join(run_dir, 'cache')}")
    lines.append(f"next: {command}")
    return lines


def _nanmax(values: Any) -> float:
    array = np.asarray(values, dtype=np.float64)
    if not array.size or not np.isfinite(array).any():
        return math.nan
    return float(np.nanmax(array))


def _fmt(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.2e}"


class TrackingCallback:
    """The training loop's hook (`Utils.training.Callback`) for ``--track-online``, the lines
    per evaluation and ``--tensorboard``: one code path with the API (`Utils.api.track`)."""

    def __init__(self) -> None:
        self.online: Tracker | None = None
        self.live: LiveFeedback | None = None
        self._started = False

    def _ensure(self, trainer) -> None:
        if self._started or not trainer.ctx.is_master:
            return
        self._started = True
        from Utils.budget import FIELD_PREFIX
        from Utils.online import for_training as online_for_training

        budget = getattr(trainer, "budget", None)
        cfg, model = trainer.cfg, getattr(trainer.model, "module", trainer.model)
        self.online = online_for_training(
            cfg,
            model,
            trainer.optimizer,
            trainer.groups,
            trainer.run_dir,
            trainer.steps_per_epoch,
            trainer.step,
            theory_sources=[(FIELD_PREFIX, budget)] if budget is not None else [],
        )
        self.live = for_training(
            cfg,
            model,
            trainer.optimizer,
            trainer.groups,
            trainer.run_dir,
            trainer.steps_per_epoch,
            trainer.eval_every,
            trainer.total_steps,
            trainer.step,
            self.online,
        )

    def on_train_start(self, trainer) -> None:  # noqa: D102
        self._ensure(trainer)

    def on_step_end(self, trainer) -> None:  # noqa: D102
        pass

    def on_checkpoint(self, trainer, step: int) -> None:  # noqa: D102
        pass

    def on_evaluation(self, trainer, metrics: dict[str, float]) -> None:  # noqa: D102
        self._ensure(trainer)
        if self.online is not None:
            self.online.log(metrics)
        if self.live is not None:
            self.live.evaluation(metrics)

    def on_train_end(self, trainer, result) -> None:  # noqa: D102
        if self.online is not None:
            self.online.close()
        if self.live is not None:
            self.live.close()
