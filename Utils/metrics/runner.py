"""`cache_run`: computes the cache files of a run (what cache.py does)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from Utils import fileio, interrupt, storage
from Utils.config import RUN_VARIABLE_KEYS
from Utils.errors import DataMissingError, UsageError, UserError
from Utils.metrics.base import METRICS, Context, FeaturesInfo, parse_metric_list
from Utils.metrics.io import CacheWriter, cache_path, out_of_date, remove_stale_temporaries

ONLINE_FILE = "online.h5"  # written during training by Utils/online.py (same layout)
SOURCES = ("auto", "features", "online")
UP_TO_DATE = "up to date"
COMPUTED = "computed"
SKIPPED = "skipped"


def _check_same_run(run_dir: str, info: FeaturesInfo) -> None:
    """Refuses a features.h5 extracted from another run than the one in its folder.

    The configs stored in features.h5 and in the run's ``hyperparameters.json`` are compared
    on the keys both have, machine settings aside. A run without a readable
    ``hyperparameters.json`` is not checked (cache.py does not need that file).

    Raises:
        UserError: the two configs differ (names up to three differing keys).
    """
    path = fileio.join(run_dir, "hyperparameters.json")
    try:
        stored = fileio.read_json(path)["config"] if fileio.exists(path) else None
    except (OSError, ValueError, KeyError, TypeError):
        stored = None
    if not isinstance(stored, dict) or not info.hyperparameters:
        return
    keys = sorted(set(stored) & set(info.hyperparameters) - RUN_VARIABLE_KEYS)
    differ = [k for k in keys if stored[k] != info.hyperparameters[k]]
    if differ:
        shown = ", ".join(
            f"{k}={info.hyperparameters[k]!r} (not {stored[k]!r})" for k in differ[:3]
        )
        raise UserError(
            f"{fileio.join(run_dir, storage.FILENAME)} was extracted from a different run "
            f"({shown}); rebuild it with {storage.extract_command(run_dir)} --overwrite"
        )


def source_file(run_dir: str, source: str = "auto") -> str:
    """The file cache.py reads for `source` ("auto", "features" or "online").

    Raises:
        UsageError: an unknown source.
        DataMissingError: the file is missing (names the command that makes it).
    """
    if source not in SOURCES:
        raise UsageError(f"--source must be one of {', '.join(SOURCES)} (got {source!r})")
    has_features = fileio.exists(fileio.join(run_dir, storage.FILENAME))
    has_online = fileio.exists(fileio.join(run_dir, ONLINE_FILE))
    if source == "online" or (source == "auto" and has_online and not has_features):
        if not has_online:
            raise DataMissingError(
                f"{run_dir} has no {ONLINE_FILE}; train with --track-online N (or attach "
                "Utils.api.track to your optimizer) to record one"
            )
        return ONLINE_FILE
    if not has_features:
        raise DataMissingError(
            f"{run_dir} has no {storage.FILENAME}; extract it first: {storage.extract_command(run_dir)}"
        )
    return storage.FILENAME


def _metric_names(metrics: str | Sequence[str] | None) -> list[str] | None:
    if metrics is None:
        return None
    text = metrics if isinstance(metrics, str) else ",".join(metrics)
    names = parse_metric_list(text)
    if not names and text.strip():
        raise UsageError(
            f"--metrics {text!r} names no metric; give a comma list such as scale,performance, "
            "or leave --metrics out to compute every metric that applies"
        )
    return names or None


def cache_run(
    run_dir: str,
    metrics: str | Sequence[str] | None = None,
    suffix: str = "",
    overwrite: bool = False,
    subset: int | None = None,
    seed: int = 0,
    progress: bool = True,
    source: str = "auto",
) -> dict[str, str]:
    """Writes ``<run_dir>/cache/<metric><suffix>.h5`` for the requested or applicable metrics.

    Args:
        run_dir: the run folder (holding features.h5).
        metrics: metric names (comma string or list, aliases allowed); None: every metric that
            applies to the run, the others reported as skipped.
        suffix: appended to the cache file names (e.g. "_subset" -> ``network_subset.h5``).
        overwrite: recompute even when an up-to-date cache exists.
        subset: number of elements kept by `network` (per parameter) and `weights_grads`.
        seed: seed of those random subsets.
        progress: tqdm progress bars on stderr.
        source: "features" (features.h5, from extract.py), "online" (online.h5, recorded
            during training with --track-online) or "auto" (features.h5 when the run has
            one, else online.h5).

    Returns:
        metric name -> "computed" (with the damage found when it replaced a damaged file),
        "up to date" or "skipped: <reason>", in registry order.

    Raises:
        UnknownNameError: an unknown metric name (lists the valid ones).
        UsageError: a bad suffix or subset.
        UserError: no run folder or no features.h5 (names the extract.py command), or an
            explicitly requested metric does not apply to the run (says why).
    """
    requested = _metric_names(metrics)
    if "/" in suffix or "\\" in suffix:
        raise UsageError(f"--suffix must not contain path separators (got {suffix!r})")
    if subset is not None and int(subset) < 1:
        raise UsageError(f"--subset must be >= 1 (got {subset})")
    if not fileio.exists(run_dir):
        raise UserError(
            f"run folder {run_dir} does not exist; check --save-dir, --experiment and --expid"
        )
    filename = source_file(run_dir, source)
    f = storage.open_features(run_dir, filename)
    try:
        info = FeaturesInfo.from_file(f)
        _check_same_run(run_dir, info)
        if info.num_rows == 0:
            raise UserError(
                f"{storage.FILENAME} of {run_dir} has no rows; rerun: {storage.extract_command(run_dir)}"
            )
        statuses: dict[str, str] = {}
        plan: list[str] = []
        for name in requested or METRICS.names():
            ok, reason = METRICS.get(name).applies(info)
            if ok:
                plan.append(name)
            elif requested:
                raise UserError(f"metric '{name}' does not apply to {run_dir}: {reason}")
            else:
                statuses[name] = f"{SKIPPED}: {reason}"
        bar = plan
        if progress:
            from tqdm import tqdm

            bar = tqdm(plan, desc="metrics", unit="metric", file=sys.stderr, dynamic_ncols=True)
        for name in bar:
            interrupt.check()
            if progress:
                bar.set_postfix_str(name)
            statuses[name] = _cache_one(
                f, info, run_dir, name, suffix, overwrite, subset, seed, progress, filename
            )
    finally:
        f.close()
    return {n: statuses[n] for n in METRICS.names() if n in statuses}


def _cache_one(
    f,
    info: FeaturesInfo,
    run_dir: str,
    name: str,
    suffix: str,
    overwrite: bool,
    subset: int | None,
    seed: int,
    progress: bool,
    filename: str = storage.FILENAME,
) -> str:
    """Computes one metric's cache file unless an up-to-date one exists; returns its status."""
    metric = METRICS.get(name)
    given = {"subset": None if subset is None else int(subset), "seed": int(seed)}
    options = {k: given[k] for k in metric.options}
    if filename != storage.FILENAME:
        options["source"] = filename
    path = cache_path(run_dir, name, suffix)
    remove_stale_temporaries(path)
    reason = out_of_date(path, name, info.num_rows, info.last_step, options)
    if not overwrite and not reason:
        return UP_TO_DATE
    try:
        with CacheWriter(path, name) as writer:
            metric.compute(Context(f, info, writer, options=options, progress=progress))
            writer.attrs(
                source_rows=info.num_rows,
                source_last_step=info.last_step,
                options=options,
                description=metric.description,
            )
            writer.commit()
    except Exception as exc:
        failed = fileio.write_error_of(exc, path)
        if failed is None or failed is exc:
            raise
        raise failed from None  # disk full...: the temporary file is gone, earlier caches stay
    if reason.startswith("damaged"):
        return f"{COMPUTED} (the old file was {reason})"
    return COMPUTED
