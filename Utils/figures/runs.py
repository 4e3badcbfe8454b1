"""Run discovery: the run folders named on the command line and the caches they hold."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from Utils import fileio
from Utils.errors import UnknownNameError, UsageError, UserError
from Utils.figures.labels import CONSERVATION
from Utils.figures.style import warn
from Utils.metrics.io import cache_dir, cache_path


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
    memo: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def path(self) -> str:
        """The run folder."""
        return fileio.join(self.save_dir, self.experiment, self.expid)

    @property
    def cache_dir(self) -> str:
        """The run's cache folder."""
        return cache_dir(self.path)

    def cache_file(self, metric: str, suffix: str = "") -> str:
        """Path of one metric's cache file."""
        return cache_path(self.path, metric, suffix)

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
    union = sorted({m for have in per_run.values() for m in have}, key=metric_order)
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


def metric_order(name: str) -> tuple[int, str]:
    """Sort key of metric names: conservation first, then performance, then the rest."""
    order = {**{k: i for i, k in enumerate(CONSERVATION)}, "performance": 3}
    return (order.get(name, 10), name)
