"""Extraction of a run's checkpoints into one ``features.h5`` (layout in Utils/storage.py).

`extract_run(run_dir)` is everything extract.py does:

1. Scan: every checkpoint file is opened lazily (`Utils.ckptread.read_arrays` maps the file
   and unpickles only the small pickle under the allowlist, tensors become numpy views that
   are read when touched; the safe `load_checkpoint` is the fallback) to learn the step stored
   inside, the model layout and the config; the rows are ordered by that step, never by file
   name. Corrupt files (a CRC-32 mismatch included, checked before a row is used) and files
   refused by the allowlist raise `CorruptFileError` naming the file, or are skipped with a
   warning under ``skip_bad``. A checkpoint whose model
   layout or config differs from the rest of the run is an error naming it.
2. Plan: an existing ``features.h5`` is checked (a damaged one is rebuilt with a warning; one
   from another run is an error suggesting ``--overwrite``); checkpoints whose step is already
   in ``/steps`` are skipped. A new checkpoint older than the last extracted step forces a
   rebuild from scratch (with a warning), since rows must stay in step order.
3. Write: rows are appended in blocks with `Utils.storage.FeaturesWriter`; a row counts only
   once ``/steps`` covers it, so a killed extraction leaves a valid file that the next call
   completes. ``overwrite`` (and the out-of-order rebuild) builds into ``features.h5.tmp`` and
   renames it over the old file at the end, so the old file stays valid until then.

What is stored per checkpoint: every floating entry of ``ckpt["model"]`` (integer entries such
as BatchNorm's ``num_batches_tracked`` are not stored), every floating tensor of
``ckpt["optimizer"]["state"][i]`` as ``buffers/<entry>/<param_names[i]>`` (rows where a
checkpoint lacks it are NaN, e.g. momentum before the first step), the custom_sgd theory state
(`theory_arrays`), the symmetry-breaking budget of ``ckpt["budget"]`` as
``theory/<kind>/<layer>/budget_<field>`` (`Utils.budget.budget_arrays`), the metrics (NaN
where absent), step, epoch_float, lr and file name.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from Utils import ckptread, fileio, interrupt, storage
from Utils.budget import FIELD_PREFIX, budget_arrays
from Utils.checkpoint import FORMAT as CKPT_FORMAT
from Utils.checkpoint import METRIC_NAMES, checkpoint_dir, list_checkpoints, load_checkpoint
from Utils.config import RUN_VARIABLE_KEYS
from Utils.errors import CorruptFileError, UserError
from Utils.online import online_path
from Utils.rundir import RunDir
from Utils.storage import DatasetSpec, FeaturesWriter, LayoutMismatchError, Row

# Config keys that may differ between the checkpoints of one run (machine and location flags,
# --epochs extended on --resume); ignored when deciding whether two configs are one run.
MACHINE_KEYS = RUN_VARIABLE_KEYS

BLOCK_BYTES = 64 << 20  # rows are committed in blocks of at most this many bytes ...
BLOCK_ROWS = 32  # ... and at most this many rows
SCAN_KEEP_ROWS = 128  # rows kept from the scan for the extraction (one open mapping each)


# ----------------------------------------------------------------------------- rows


def _to_numpy(value: Any) -> np.ndarray | None:
    """A CPU numpy view of a tensor or array (bfloat16 becomes float32); None for others."""
    if isinstance(value, np.ndarray):
        return value
    if not isinstance(value, torch.Tensor):
        return None
    t = value.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.bfloat16:
        t = t.float()
    return t.numpy()


def _floating(value: Any) -> np.ndarray | None:
    """`_to_numpy` of a floating tensor or array, else None."""
    array = _to_numpy(value)
    return array if array is not None and array.dtype.kind == "f" else None


def theory_arrays(theory: Mapping[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """The custom_sgd theory state of a checkpoint as float64 arrays.

    Reads the layout documented in Utils/optimizers.py (``ckpt["optimizer"]["theory"]``):
    ``{"state": {key: {field: tensor [size]}}, "time": {key: float}, ...}``.

    Args:
        theory: the ``theory`` entry of a checkpoint's optimizer state.

    Returns:
        group key (``<kind>/<layer>``) -> field -> array: every field of the state as float64
        [size], plus ``time`` as a float64 0-d array (NaN when the time is missing).
    """
    out: dict[str, dict[str, np.ndarray]] = {}
    times = theory.get("time", {}) or {}
    for key, fields in (theory.get("state", {}) or {}).items():
        arrays: dict[str, np.ndarray] = {}
        for name, value in fields.items():
            array = _to_numpy(value)
            arrays[name] = np.asarray(value if array is None else array, dtype=np.float64)
        arrays[storage.TIME_FIELD] = np.asarray(times.get(key, math.nan), dtype=np.float64)
        out[str(key)] = arrays
    return out


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def checkpoint_row(ckpt: Mapping[str, Any], source: str) -> Row:
    """The features row of one checkpoint (arrays may be views of the checkpoint's tensors).

    Args:
        ckpt: a loaded checkpoint (see Utils/checkpoint.py), with torch tensors or, from
            `Utils.ckptread.read_arrays`, numpy arrays.
        source: the checkpoint's file name.

    Raises:
        CorruptFileError: the optimizer state does not match ``param_names``.
    """
    values: dict[str, np.ndarray] = {
        storage.EPOCH: np.asarray(_float(ckpt.get("epoch_float")), dtype=np.float64),
        storage.LR: np.asarray(_float(ckpt.get("lr")), dtype=np.float64),
        storage.SOURCES: np.asarray(source.encode("utf-8")[:255], dtype=storage.SOURCE_DTYPE),
    }
    for name, tensor in ckpt.get("model", {}).items():
        array = _floating(tensor)
        if array is not None:
            values[storage.param_path(name)] = array
    optimizer = ckpt.get("optimizer") or {}
    names = list(ckpt.get("param_names") or [])
    for index, entries in (optimizer.get("state") or {}).items():
        i = int(index)
        if not 0 <= i < len(names):
            raise CorruptFileError(
                f"{source}: optimizer state {i} has no entry in param_names "
                f"({len(names)} names); the checkpoint is damaged"
            )
        for key, value in entries.items():
            array = _floating(value)
            if array is not None:
                values[storage.buffer_path(str(key), names[i])] = array
    theory = optimizer.get("theory")
    if isinstance(theory, Mapping):
        for group_key, fields in theory_arrays(theory).items():
            for name, array in fields.items():
                values[storage.theory_path(group_key, name)] = array
    budget = ckpt.get("budget")
    if isinstance(budget, Mapping):
        for group_key, fields in budget_arrays(budget).items():
            for name, array in fields.items():
                values[storage.theory_path(group_key, FIELD_PREFIX + name)] = array
    metrics = ckpt.get("metrics") or {}
    for name in dict.fromkeys([*METRIC_NAMES, *metrics]):
        value = _float(metrics.get(name, math.nan))
        values[storage.metric_path(str(name))] = np.asarray(value, dtype=np.float64)
    return Row(step=int(ckpt["step"]), values=values)


def _config_json(config: Any) -> str:
    return json.dumps(config if isinstance(config, Mapping) else {}, sort_keys=True, default=str)


def run_identity(config: Mapping[str, Any] | None) -> str:
    """The config as JSON without `MACHINE_KEYS` (equal for all checkpoints of one run)."""
    config = config if isinstance(config, Mapping) else {}
    return _config_json({k: v for k, v in config.items() if k not in MACHINE_KEYS})


# ----------------------------------------------------------------------------- scanning


@dataclass
class _Scan:
    """What the scan learned about one checkpoint file."""

    path: str
    name: str
    step: int
    size: int
    specs: tuple[DatasetSpec, ...]
    model: tuple[tuple[str, tuple[int, ...], str], ...]
    identity: str
    config: str
    groups: str | None


# ----------------------------------------------------------------------------- reading


def _load(path: str, verify: bool = True) -> dict[str, Any]:
    """Loads a checkpoint for extraction: `ckptread.read_arrays`, else `load_checkpoint` (mmap).

    Args:
        path: the checkpoint.
        verify: check the CRC-32 of every record (else only the pickle's).

    Raises:
        CorruptFileError: naming the file (`UnsafeCheckpointError` for a refused global).
    """
    try:
        ckpt = ckptread.read_arrays(path, verify)
    except CorruptFileError:
        raise
    except Exception:  # Unsupported or damage: the checked torch loader reads or names it
        ckpt = load_checkpoint(path, mmap=not fileio.is_url(path))
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        raise CorruptFileError(f"{path} is not a checkpoint written by train.py")
    return ckpt


class _Interner:
    """Shares equal tuples/strings between scans (thousands of checkpoints, one layout)."""

    def __init__(self) -> None:
        self._seen: dict[Any, Any] = {}

    def __call__(self, value: Any) -> Any:
        return self._seen.setdefault(value, value)


def _scan_one(path: str, intern: _Interner) -> tuple[_Scan, Row]:
    ckpt = _load(path, verify=False)  # the tensors' CRC is checked before their row is used
    name = os.path.basename(str(path).rstrip("/"))
    try:
        row = checkpoint_row(ckpt, name)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise CorruptFileError(
            f"checkpoint {path} lacks expected entries ({type(err).__name__}: {err}); delete "
            "it, or pass --skip-bad to go on without it"
        ) from None
    specs = intern(tuple(storage.spec_of(p, v) for p, v in row.values.items()))
    model = intern(
        tuple(
            (s.path[len(storage.PARAMS) + 1 :], s.shape, str(s.dtype))
            for s in specs
            if s.path.startswith(storage.PARAMS + "/")
        )
    )
    theory = (ckpt.get("optimizer") or {}).get("theory")
    groups = theory.get("groups") if isinstance(theory, Mapping) else None
    config = ckpt.get("config")
    size = fileio.getsize(path)
    scan = _Scan(
        path=path,
        name=name,
        step=row.step,
        size=size,
        specs=specs,
        model=model,
        identity=intern(run_identity(config)),
        config=intern(_config_json(config)),
        groups=intern(groups) if isinstance(groups, str) else None,
    )
    return scan, row


class _Log:
    """Warnings (always) and detail (verbose) on stderr; warnings are also kept."""

    def __init__(self, verbose: bool) -> None:
        self.verbose = verbose
        self.warnings: list[str] = []

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        print(f"warning: {message}", file=sys.stderr, flush=True)

    def info(self, message: str) -> None:
        if self.verbose:
            print(message, file=sys.stderr, flush=True)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=total, desc=desc, unit="ckpt", file=sys.stderr, disable=None if enabled else True
    )


def _reason(err: BaseException) -> str:
    """The parenthesised cause in a `load_checkpoint` error, or the whole message."""
    if isinstance(err, ckptread.UnsafeCheckpointError):
        return f"refused: it needs {err.name}, and loading it could run code"
    text = str(err)
    start, end = text.find("("), text.find(")")
    return text[start + 1 : end] if 0 <= start < end else text


def _scan(
    paths: list[str],
    skip_bad: bool,
    progress: bool,
    log: _Log,
    keep: OrderedDict[str, Row] | None = None,
) -> tuple[list[_Scan], list[str]]:
    """Scans every checkpoint; returns the scans sorted by step and the skipped paths.

    The rows of the last `SCAN_KEEP_ROWS` files scanned are kept in `keep` (by path), so that
    a small extraction reads each file once (each kept row holds its file mapped).
    """
    intern = _Interner()
    scans: list[_Scan] = []
    skipped: list[str] = []
    with _progress(len(paths), "scan", progress) as bar:
        for path in paths:
            interrupt.check()
            try:
                scan, row = _scan_one(path, intern)
                scans.append(scan)
                if keep is not None:
                    keep[path] = row
                    while len(keep) > SCAN_KEEP_ROWS:
                        keep.popitem(last=False)
            except CorruptFileError as err:
                if not skip_bad:
                    raise
                log.warn(f"skipping corrupt checkpoint {path} ({_reason(err)})")
                skipped.append(path)
            bar.update(1)
    scans.sort(key=lambda s: s.step)
    for a, b in zip(scans, scans[1:]):
        if a.step == b.step:
            raise UserError(
                f"checkpoints {a.path} and {b.path} both hold step {a.step}; remove the one "
                "that does not belong to this run"
            )
    return scans, skipped


def _describe_model_difference(a: tuple, b: tuple) -> str:
    """One phrase naming the first model entry that differs between two layouts."""
    da = {n: (s, d) for n, s, d in a}
    db = {n: (s, d) for n, s, d in b}
    for name in dict.fromkeys([*da, *db]):
        if name not in db:
            return f"it has no entry {name!r}"
        if name not in da:
            return f"it has an extra entry {name!r}"
        if da[name] != db[name]:
            return f"{name!r} is {db[name][0]} {db[name][1]}, not {da[name][0]} {da[name][1]}"
    return "its model differs"


def _describe_config_difference(ref: str, other: str) -> str:
    a, b = json.loads(ref), json.loads(other)
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}={b.get(k)!r} (not {a.get(k)!r})" for k in keys[:3])
    return f"its config differs: {shown}" if shown else "its config differs"


def _reference(scans: list[_Scan]) -> _Scan:
    """The checkpoint that defines the run (most common layout and config), after checks.

    Raises:
        UserError: a checkpoint's model layout or config differs from the rest of the run.
    """
    counts = Counter((s.model, s.identity) for s in scans)
    best = max(counts.values())
    ref = next(s for s in scans if counts[(s.model, s.identity)] == best)
    for s in scans:
        if s.model != ref.model:
            why = _describe_model_difference(ref.model, s.model)
        elif s.identity != ref.identity:
            why = _describe_config_difference(ref.identity, s.identity)
        else:
            continue
        raise UserError(
            f"checkpoint {s.path} does not belong to this run ({why}, unlike {ref.name}); "
            f"move it out of {checkpoint_dir(os.path.dirname(os.path.dirname(s.path)))}"
        )
    return ref


# ----------------------------------------------------------------------------- extraction


@dataclass
class ExtractionReport:
    """What `extract_run` did.

    Attributes:
        run_dir: the run folder.
        path: the features file.
        checkpoints: checkpoint files found.
        extracted: rows added by this call.
        rows: rows in the file now.
        skipped: corrupt checkpoint files skipped (``skip_bad``).
        rebuilt: whether the file was rebuilt from scratch.
        complete: whether every readable checkpoint is in the file.
        bytes_read: bytes of the checkpoint files extracted by this call.
        seconds: wall time.
        warnings: the warnings printed.
    """

    run_dir: str
    path: str
    checkpoints: int = 0
    extracted: int = 0
    rows: int = 0
    skipped: list[str] = field(default_factory=list)
    rebuilt: bool = False
    complete: bool = False
    bytes_read: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)

    @property
    def mb_per_s(self) -> float:
        """Extraction throughput in MB/s of checkpoint bytes (1 MB = 1e6 bytes)."""
        return self.bytes_read / 1e6 / self.seconds if self.seconds > 0 else math.nan

    def summary(self) -> str:
        """One line for the user."""
        if self.rebuilt:
            what = "rebuilt"
        elif self.extracted:
            what = "created" if self.extracted == self.rows else "updated"
        else:
            what = "up to date"
        line = (
            f"{self.path}: {what}, {self.extracted} new row(s), {self.rows} in total "
            f"({self.bytes_read / 1e6:.1f} MB read in {self.seconds:.1f} s)"
        )
        if self.skipped:
            line += f"; skipped {len(self.skipped)} corrupt checkpoint(s)"
        return line


def _check_same_run(writer: FeaturesWriter, ref: _Scan, run_dir: str) -> None:
    """Raises UserError when the open file was extracted from another run."""
    fix = f"rebuild it with {RunDir.from_path(run_dir).command('extract.py', '--overwrite')}"
    try:
        stored = json.loads(writer.hyperparameters)
    except ValueError:
        stored = None
    if run_identity(stored) != ref.identity:
        why = _describe_config_difference(run_identity(stored), ref.identity)
        raise UserError(
            f"{writer.path} was extracted from a different run ({why} in the checkpoints); {fix}"
        )
    have = tuple(
        (p[len(storage.PARAMS) + 1 :], s.shape, str(s.dtype))
        for p, s in writer.specs().items()
        if p.startswith(storage.PARAMS + "/")
    )
    if sorted(have) != sorted(ref.model):
        why = _describe_model_difference(have, ref.model)
        raise UserError(
            f"{writer.path} was extracted from a different run (the checkpoints' model: {why}); "
            f"{fix}"
        )


def _union_specs(scans: Iterable[_Scan]) -> list[DatasetSpec]:
    """Every dataset the scans need (first spec of each path), in first-seen order.

    Raises:
        UserError: two checkpoints disagree on a dataset's shape or dtype.
    """
    out: dict[str, DatasetSpec] = {}
    owner: dict[str, str] = {}
    seen: set[int] = set()
    for s in scans:
        if id(s.specs) in seen:
            continue
        seen.add(id(s.specs))
        for spec in s.specs:
            have = out.get(spec.path)
            if have is None:
                out[spec.path], owner[spec.path] = spec, s.path
            elif have != spec:
                raise UserError(
                    f"checkpoint {s.path} does not belong to this run ({spec.path} is "
                    f"{spec.shape} {spec.dtype}, not {have.shape} {have.dtype} as in "
                    f"{owner[spec.path]})"
                )
    return list(out.values())


def _groups_json(run_dir: str, scans: list[_Scan]) -> str:
    """The newest checkpoint's groups, else the run's groups.json, else no groups."""
    for s in reversed(scans):
        if s.groups is not None:
            return s.groups
    path = fileio.join(run_dir, "groups.json")
    if fileio.exists(path):
        try:
            return json.dumps(fileio.read_json(path))
        except ValueError:
            pass
    return "[]"


def _write_rows(
    writer: FeaturesWriter,
    todo: list[_Scan],
    skip_bad: bool,
    progress: bool,
    log: _Log,
    report: ExtractionReport,
    kept: dict[str, Row],
) -> None:
    """Loads `todo` in order (or takes their rows from `kept`) and appends them in blocks.

    Rows loaded before a corrupt checkpoint are committed before the error is raised.
    """
    block: list[Row] = []
    block_bytes = 0

    def commit() -> None:
        nonlocal block, block_bytes
        if block:
            writer.append(block)
            report.extracted += len(block)
            report.bytes_read += sum(by_step[r.step].size for r in block)
        block, block_bytes = [], 0

    by_step = {s.step: s for s in todo}
    with _progress(len(todo), "extract", progress) as bar:
        for scan in todo:
            interrupt.check()
            try:
                row = kept.pop(scan.path, None)
                if row is None:
                    row = checkpoint_row(_load(scan.path), scan.name)
                else:
                    ckptread.verify_crc(scan.path)
            except CorruptFileError as err:
                if not skip_bad:
                    commit()
                    raise
                log.warn(f"skipping corrupt checkpoint {scan.path} ({_reason(err)})")
                report.skipped.append(scan.path)
                bar.update(1)
                continue
            if row.step != scan.step:
                commit()
                raise UserError(
                    f"checkpoint {scan.path} changed while extracting (step {row.step}, was "
                    f"{scan.step}); wait until training has finished and run again"
                )
            block.append(row)
            block_bytes += row.nbytes
            if block_bytes >= BLOCK_BYTES or len(block) >= BLOCK_ROWS:
                commit()
            bar.update(1)
        commit()


def _extract_local(
    target: str,
    run_dir: str,
    scans: list[_Scan],
    overwrite: bool,
    skip_bad: bool,
    progress: bool,
    log: _Log,
    report: ExtractionReport,
    kept: dict[str, Row],
) -> None:
    """Extracts `scans` into the local file `target` (see the module docstring).

    `kept` holds rows the scan already read (by path); they are used instead of reading the
    file again.
    """
    ref = _reference(scans)
    tmp = target + ".tmp"
    for leftover in (tmp, tmp + ".new", target + ".new"):  # left by a killed extraction
        _discard(leftover)
    writer: FeaturesWriter | None = None
    rebuild_via_tmp = overwrite and os.path.exists(target)
    if os.path.exists(target) and not overwrite:
        try:
            writer = FeaturesWriter.open(target, readonly=True)  # checked before any write
        except CorruptFileError as err:
            log.warn(f"{err}; rebuilding it from the checkpoints")
            os.remove(target)
            report.rebuilt = True
    if writer is not None and writer.rows == 0:  # killed before its first row: start afresh
        writer.close()
        writer = None
        os.remove(target)
    if writer is not None:
        try:
            _check_same_run(writer, ref, run_dir)
        except BaseException:
            writer.close()
            raise
        done = set(writer.steps.tolist())
        todo = [s for s in scans if s.step not in done]
        if todo and writer.rows and todo[0].step < int(writer.steps[-1]):
            log.warn(
                f"checkpoint {todo[0].path} (step {todo[0].step}) comes before the last "
                f"extracted step {int(writer.steps[-1])}; rebuilding {target} from scratch"
            )
            writer.close()
            writer = None
            rebuild_via_tmp = True
    if writer is not None:
        writer.close()
        writer = FeaturesWriter.open(target)
    groups = _groups_json(run_dir, scans)
    if writer is None:
        report.rebuilt = report.rebuilt or rebuild_via_tmp or overwrite
        todo = list(scans)
    # from here on the temporary file of a rebuild is removed whatever stops the extraction
    # (an interrupt can land in any line, also inside the clean-up of another error)
    try:
        if writer is None:
            path = tmp if rebuild_via_tmp else target
            _create_prepared(path, ref.config, groups, _union_specs(todo), len(todo))
            writer = FeaturesWriter.open(path)
        log.info(
            f"{len(scans)} readable checkpoint(s), {writer.rows} row(s) already extracted, "
            f"{len(todo)} to extract"
        )
        writer.prepare(_union_specs(todo), len(todo), groups=groups)
        _write_rows(writer, todo, skip_bad, progress, log, report, kept)
    except BaseException as err:
        try:
            if writer is None:
                pass
            elif isinstance(err, UserError) and not rebuild_via_tmp:
                writer.finish(complete=False)  # keeps every committed row
            elif isinstance(err, Exception) and fileio.write_error_of(err, target) is not None:
                writer.abandon()  # disk full: what was committed before stays as it is
            else:
                writer.close()
        finally:
            _discard(tmp if rebuild_via_tmp else None)
        if isinstance(err, LayoutMismatchError):
            raise UserError(
                f"{target} does not fit this run's checkpoints ({err}); rebuild it with "
                "--overwrite"
            ) from None
        raise
    steps = set(writer.steps.tolist())
    report.rows = writer.rows
    report.complete = not report.skipped and all(s.step in steps for s in scans)
    try:
        writer.finish(report.complete)
        if rebuild_via_tmp:
            os.replace(tmp, target)
    except BaseException:
        _discard(tmp if rebuild_via_tmp else None)  # the old file stays as it was
        raise


def _create_prepared(
    path: str, hyperparameters: str, groups: str, specs: list[DatasetSpec], rows: int
) -> None:
    """Creates a features file with all datasets sized for `rows`, then renames it to `path`.

    Building the structure under another name means a killed first extraction never leaves a
    half-created file behind.
    """
    staging = path + ".new"
    writer = FeaturesWriter.create(staging, hyperparameters, groups)
    try:
        writer.prepare(specs, rows)
        writer.close()
    except BaseException:
        writer.abandon()
        _discard(staging)
        raise
    os.replace(staging, path)


def _discard(path: str | None) -> None:
    if path and os.path.exists(path):
        os.remove(path)


def extract_run(
    run_dir: str,
    overwrite: bool = False,
    skip_bad: bool = False,
    verbose: bool = False,
    progress: bool = True,
) -> ExtractionReport:
    """Extracts (or brings up to date) a run's ``features.h5`` from its checkpoints.

    Args:
        run_dir: the run folder ``<save-dir>/<experiment>/<expid>`` (local or fsspec URL; a
            URL is extracted into a local temporary file and uploaded at the end).
        overwrite: rebuild from scratch (into a temporary file renamed at the end).
        skip_bad: skip corrupt checkpoints with a warning instead of failing.
        verbose: print details on stderr.
        progress: show tqdm progress bars on stderr (only when it is a terminal).

    Returns:
        An `ExtractionReport`.

    Raises:
        UserError: missing run, no checkpoints, checkpoints of another run, or a features file
            of another run.
        CorruptFileError: a corrupt checkpoint (without ``skip_bad``), naming the file.
    """
    t0 = time.perf_counter()
    run_dir = str(run_dir)
    if not fileio.exists(run_dir):
        raise UserError(f"no run at {run_dir}; check --save-dir/--experiment/--expid")
    with _extraction_lock(run_dir):
        return _extract_run(run_dir, overwrite, skip_bad, verbose, progress, t0)


LOCK_NAME = ".extract.lock"


@contextlib.contextmanager
def _extraction_lock(run_dir: str) -> Iterator[None]:
    """Holds ``<run>/.extract.lock`` (an flock, released by the OS if the process dies).

    The file holds the holder's PID and is removed when the extraction ends (a file left by a
    killed process is harmless: the OS released its lock). Local runs only (a URL run is
    extracted into a private temporary file and uploaded in one piece). A folder where the
    lock file cannot be created is extracted without it.

    Raises:
        UserError: another process holds the lock (names its PID).
    """
    if fileio.is_url(run_dir):
        yield
        return
    path = os.path.join(fileio.local_path(run_dir), LOCK_NAME)
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:  # read-only folder: writing features.h5 fails later with its own message
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise UserError(
                f"another extract.py (PID {holder}) is extracting {run_dir}; wait until it "
                "finishes (its result is this run's features.h5), then run again if needed"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # locked a file its holder removed on finishing: lock the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        try:
            os.remove(path)  # while still locked, so no one else holds this file
        except OSError:
            pass
        os.close(fd)


def _extract_run(
    run_dir: str, overwrite: bool, skip_bad: bool, verbose: bool, progress: bool, t0: float
) -> ExtractionReport:
    """`extract_run` once the run is locked."""
    paths = list_checkpoints(run_dir)
    if not paths:
        run = RunDir.from_path(run_dir)
        online = online_path(run_dir)
        if fileio.exists(online):
            raise UserError(
                f"run {run_dir} has no checkpoints to extract, but it tracked online into "
                f"{online}: compute its metrics with {run.command('cache.py', '--source', 'online')}"
            )
        hint = run.command("train.py", "...", "--save-freq", "N")
        raise UserError(f"run {run_dir} has no checkpoints; train it first with {hint}")
    log = _Log(verbose)
    target = storage.features_path(run_dir)
    report = ExtractionReport(run_dir=run_dir, path=target, checkpoints=len(paths))
    kept: OrderedDict[str, Row] = OrderedDict()
    scans, skipped = _scan(paths, skip_bad, progress, log, None if fileio.is_url(run_dir) else kept)
    report.skipped.extend(skipped)
    if not scans:
        raise UserError(
            f"run {run_dir} has no readable checkpoint ({len(skipped)} corrupt); train it "
            "again with train.py --overwrite"
        )
    if fileio.is_url(run_dir):
        with tempfile.TemporaryDirectory(prefix="extract-") as tmpdir:
            local = os.path.join(tmpdir, storage.FILENAME)
            if fileio.exists(target) and not overwrite:
                with fileio.open_read(target) as src, open(local, "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)
            _extract_local(local, run_dir, scans, overwrite, skip_bad, progress, log, report, kept)
            with open(local, "rb") as src:
                fileio.atomic_write(target, lambda dst: shutil.copyfileobj(src, dst, 16 << 20))
    else:
        local = fileio.local_path(target)
        try:
            _extract_local(local, run_dir, scans, overwrite, skip_bad, progress, log, report, kept)
        except Exception as exc:
            failed = fileio.write_error_of(exc, local)
            if failed is None or failed is exc:
                raise
            raise failed from None  # disk full...: committed rows stay readable
        finally:
            kept.clear()  # closes the mapped files
    report.warnings = log.warnings
    report.seconds = time.perf_counter() - t0
    log.info(
        f"extracted {report.extracted} checkpoint(s) ({report.bytes_read / 1e6:.1f} MB) in "
        f"{report.seconds:.2f} s ({report.mb_per_s:.1f} MB/s)"
    )
    return report


def measure_throughput(run_dir: str) -> dict[str, float]:
    """Times reading a run's checkpoint files against a full extraction of them.

    The files are read once untimed (so every timing sees the same page cache), then timed:
    ``read`` = reading every file's bytes; ``load`` = `load_checkpoint` of every file;
    ``copy`` = copying every file into the temporary folder (reading and writing the same
    bytes: an upper bound for any extraction, which must write them too); ``extract`` = a
    full extraction into a temporary file (the run's features.h5 is untouched). The temporary
    folder is Python's default (``$TMPDIR``).

    Args:
        run_dir: a local run folder with checkpoints.

    Returns:
        ``files``, ``mb`` (checkpoint MB, 1e6 bytes), ``read_mb_s``, ``load_mb_s``,
        ``copy_mb_s``, ``extract_mb_s`` and the ratios of ``extract_mb_s`` to the others:
        ``ratio`` (to read), ``ratio_load`` and ``ratio_copy``.
    """
    paths = list_checkpoints(run_dir)
    if not paths:
        raise UserError(f"run {run_dir} has no checkpoints to measure")
    total = sum(fileio.getsize(p) for p in paths)

    def read_all() -> None:
        for p in paths:
            with fileio.open_read(p) as fh:
                while fh.read(16 << 20):
                    pass

    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0

    read_all()
    read_s = timed(read_all)
    load_s = timed(lambda: [load_checkpoint(p) for p in paths])
    with tempfile.TemporaryDirectory(prefix="extract-bench-") as tmpdir:

        def copy_all() -> None:
            for i, p in enumerate(paths):
                with fileio.open_read(p) as src, open(os.path.join(tmpdir, f"{i}.pt"), "wb") as dst:
                    shutil.copyfileobj(src, dst, 16 << 20)

        copy_s = timed(copy_all)
        for i in range(len(paths)):
            os.remove(os.path.join(tmpdir, f"{i}.pt"))
        target = os.path.join(tmpdir, storage.FILENAME)
        log = _Log(False)
        report = ExtractionReport(run_dir=run_dir, path=target, checkpoints=len(paths))

        def extract_all() -> None:
            kept: OrderedDict[str, Row] = OrderedDict()
            scans, _ = _scan(paths, False, False, log, kept)
            _extract_local(target, run_dir, scans, False, False, False, log, report, kept)

        extract_s = timed(extract_all)
    mb = total / 1e6
    rates = {name: mb / s for name, s in (("read", read_s), ("load", load_s), ("copy", copy_s))}
    extract_mb_s = mb / extract_s
    return {
        "files": float(len(paths)),
        "mb": mb,
        "read_mb_s": rates["read"],
        "load_mb_s": rates["load"],
        "copy_mb_s": rates["copy"],
        "extract_mb_s": extract_mb_s,
        "ratio": extract_mb_s / rates["read"],
        "ratio_load": extract_mb_s / rates["load"],
        "ratio_copy": extract_mb_s / rates["copy"],
    }
