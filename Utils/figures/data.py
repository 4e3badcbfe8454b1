"""`CacheData`: one cache file of a run, as the figures read it (through `Utils.metrics.io`).

Adds to `Utils.metrics.io.CacheReader` what only figures need: the run it belongs to, the
horizontal axis (steps, the theory's time or epochs, taken from another cache of the run when
this one lacks it), layer order, learning-rate changes and the training dtype.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from Utils import fileio
from Utils.errors import CorruptFileError, UserError
from Utils.figures.labels import CONSERVATION, X_LABEL
from Utils.figures.runs import Run, metric_order
from Utils.figures.style import hp_text, warn
from Utils.metrics.io import CacheReader, check_cache


class CacheData(CacheReader):
    """The contents of one cache file of a run, read into memory lazily.

    Args:
        path: the cache file.
        run: the run it belongs to.
        metric: the metric's name (file name without suffix).
        x: the horizontal axis wanted ("steps", "time" or "epoch").

    Raises:
        CorruptFileError: when the file is not a readable cache file.
    """

    def __init__(self, path: str, run: Run, metric: str, x: str = "steps") -> None:
        super().__init__(path, hint=run.cache_command())
        self.run = run
        self.metric = metric
        self.x_name = x

    def x(self) -> np.ndarray:
        """The horizontal axis of every row (falls back to steps when it is not cached)."""
        name = self.x_name
        if name == "steps":
            return self.steps.astype(np.float64)
        values = self.get(name)
        if values is not None and values.shape[:1] == self.steps.shape:
            return np.asarray(values, dtype=np.float64)
        mapped = _from_other_caches(self.run, name, self.steps)
        if mapped is not None:
            return mapped
        warn(f"{self.path} has no /{name} and no other cache of the run does; plotting vs steps")
        self.x_name = "steps"
        return self.steps.astype(np.float64)

    @property
    def x_label(self) -> str:
        """Label of the horizontal axis."""
        return X_LABEL[self.x_name]

    @property
    def dtype(self) -> str:
        """The training dtype of the run (float32 unless its flags say otherwise)."""
        return str(self.run.hyperparameters.get("dtype") or "float32")

    def lr_drops(self) -> list[tuple[float, float]]:
        """(x position, new lr / old lr) of every learning-rate change of the run, at the
        first saved step with the new rate (from the run's cache with the most rows)."""
        steps = self.steps.astype(np.float64)
        lr = self.get("lr")
        found = _axis_of_other_caches(self.run, "lr")
        if found is not None and (lr is None or found[0].size > steps.size):
            src_steps, src_lr = found
        elif lr is not None and lr.shape == self.steps.shape:
            src_steps, src_lr = steps, np.asarray(lr, dtype=np.float64)
        else:
            return []
        ok = np.isfinite(src_lr) & (src_lr > 0)
        src_steps, src_lr = src_steps[ok], src_lr[ok]
        changes = np.nonzero(~np.isclose(src_lr[1:], src_lr[:-1], rtol=1e-6, atol=0))[0] + 1
        if not changes.size or steps.size == 0:
            return []
        x = self.x()
        out = []
        for i in changes:
            at = float(src_steps[i])
            if steps[0] <= at <= steps[-1]:
                out.append((float(np.interp(at, steps, x)), float(src_lr[i] / src_lr[i - 1])))
        return out

    def group_keys(self) -> list[tuple[str, str]]:
        """(kind, layer) of every ``groups/<kind>/<layer>`` in network order."""
        stored = [(k, layer) for k in self.keys("groups") for layer in self.keys(f"groups/{k}")]
        rank: dict[str, int] = {}
        for i, name in enumerate(self.json_attr("layers", [])):
            rank.setdefault(str(name), i)
        return sorted(
            stored,
            key=lambda kl: (
                CONSERVATION.index(kl[0]) if kl[0] in CONSERVATION else len(CONSERVATION),
                rank.get(f"{kl[0]}/{kl[1]}", rank.get(kl[1], len(rank))),
                natural_key(kl[1]),
            ),
        )

    def layers(self, kind: str) -> list[str]:
        """Layer names of a conservation cache in network order (``groups/<kind>/<layer>``)."""
        stored = self.keys(f"groups/{kind}")
        ordered = [name for name in self.json_attr("layers", []) if name in stored]
        return ordered + sorted((n for n in stored if n not in ordered), key=natural_key)

    def ordered(self, attr: str, group: str) -> list[str]:
        """Members of `group` in the order of the root attribute `attr` (then the others)."""
        order = self.json_attr(attr, [])
        stored = self.keys(group)
        return [n for n in order if n in stored] + [n for n in stored if n not in order]


def natural_key(text: str) -> list[Any]:
    """Sort key that orders ``layer2`` before ``layer10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _axis_of_other_caches(run: Run, name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """(steps, `name`) of the cache of the run with the most rows that stores both with the
    same length (read once per run)."""
    memo = run.memo.setdefault("axes", {})
    if name not in memo:
        best = None
        for metric in sorted(run.metrics(""), key=metric_order):
            try:
                with CacheReader(run.cache_file(metric)) as other:
                    steps, values = other.get("steps"), other.get(name)
            except CorruptFileError:
                continue
            if steps is None or values is None or values.shape != steps.shape:
                continue
            if best is None or steps.size > best[0].size:
                best = (np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64))
        memo[name] = best
    return memo[name]


def _from_other_caches(run: Run, name: str, steps: np.ndarray) -> np.ndarray | None:
    """`name` (time or epoch) at `steps`, interpolated from another cache of the run."""
    found = _axis_of_other_caches(run, name)
    if found is None or found[0].size < 2:
        return None
    return np.interp(np.asarray(steps, dtype=np.float64), *found)


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


def check_damage(run: Run, metric: str, suffix: str = "") -> None:
    """Reads a whole cache of a run to find damage (see `Utils.metrics.io.check_cache`).

    Raises:
        CorruptFileError: one line naming the file, the damage and the cache.py command.
    """
    path = run.cache_file(metric, suffix)
    problem = check_cache(path)
    if problem:
        if not problem.startswith(str(path)):
            problem = f"cache file {path} is damaged: {problem}"
        raise CorruptFileError(
            f"{problem}; rebuild it with {run.cache_command()} --metrics {metric}"
            + (f" --suffix {suffix}" if suffix else "")
        )


def run_title(run: Run, data: CacheData | None = None) -> str:
    """``experiment/expid (eta=..., lambda=..., beta=...)`` (values missing from the run's
    flags are taken from the cache's attributes)."""
    hp = dict(run.hyperparameters)
    if data is not None:
        for key in ("lr", "wd", "momentum"):
            if key not in hp and key in data.attrs:
                hp[key] = data.attrs[key]
    text = hp_text(hp)
    return f"{run.experiment}/{run.expid}" + (f" ({text})" if text else "")
