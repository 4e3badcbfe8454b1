"""The HDF5 layout of ``features.h5``: the only module that knows it (see docs/FORMATS.md).

Reading (metrics, plotting)::

    with open_features(run_dir) as f:
        n = num_rows(f)                                    # rows = extracted checkpoints
        steps = read_steps(f)                              # [N] int64, ascending
        w = read_param(f, "features.0.weight")             # [N, *shape]
        col = read_param(f, "features.0.weight", rows=slice(0, 10))
        g = read_buffer(f, "grad", "features.0.weight")    # [N, *shape]
        q = read_theory(f, "scale/features.0", "exact")    # [N, size] float64
        loss = read_metric(f, "test_loss")                 # [N] float64, NaN where absent

Every reader returns numpy arrays and never returns a row at or beyond `num_rows(f)`: rows past
it may exist after an interrupted extraction and hold nothing valid.

Writing (`FeaturesWriter`, used by Utils/extraction.py) is crash-safe against the process being
killed at any moment (SIGKILL, out of memory; not a power cut, since nothing is fsync'ed):

* Structure phase (`FeaturesWriter.prepare`): every dataset the coming rows need is created or
  resized to its final row count with all of its chunks allocated at once (HDF5 "early"
  allocation), then the file is flushed. The chunk index of a dataset is only changed here.
* Row phase (`FeaturesWriter.append`): rows are written into the pre-allocated chunks (raw data
  only, no change to the file's structure; a chunk shared with rows already counted is
  rewritten with the same bytes for them) and flushed; then ``/steps`` is extended and written
  and flushed again. A row counts once ``/steps`` covers it. ``/steps`` is filled with -1 where
  not yet written, and `num_rows` counts only the leading run of valid (>= 0, strictly
  increasing) steps, so a commit torn by a kill is not counted either.
* Opening for append (`FeaturesWriter.open`) checks the structure (attributes, datasets, the
  number of allocated chunks, the last counted row of every dataset) and raises
  `CorruptFileError` when anything is off; the extraction then rebuilds the file.

Files use the HDF5 1.8 format (``libver=("v108", "v108")``): its superblock has no
"open for writing" flag, so a file whose writer was killed stays readable, and large
attributes (JSON of many groups) are allowed.

Chunking: the step axis comes first; rows of more than `CHUNK_BYTES` are one row per chunk
(``f["params/w"][:, 3]`` reads N chunks of one row each), smaller rows share a chunk of up to
`MAX_ROWS_PER_CHUNK` rows so that whole time series of small tensors read quickly. Nothing is
compressed: on float32 weights gzip level 1 with shuffle saved 15% of the size but wrote about
13 times slower (41 against 532 MB/s, measured on this project's checkpoints).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from Utils import fileio
from Utils.errors import CorruptFileError, UserError
from Utils.groups import SymmetryGroup, groups_from_json
from Utils.rundir import RunDir

FORMAT = "neural-mechanics-features"
VERSION = 1
FILENAME = "features.h5"
LIBVER = ("v108", "v108")

STEPS = "steps"
EPOCH = "epoch"
LR = "lr"
SOURCES = "sources"
PARAMS = "params"
BUFFERS = "buffers"
THEORY = "theory"
METRICS = "metrics"
TIME_FIELD = "time"

SOURCE_DTYPE = np.dtype("S255")  # a file name is at most 255 bytes
CHUNK_BYTES = 64 * 1024
MAX_ROWS_PER_CHUNK = 64
STEPS_CHUNK = 8192
DIRECT_ROW_BYTES = 1 << 20  # rows this large are written one by one, without stacking

Rows = int | slice | Sequence[int] | np.ndarray


# ----------------------------------------------------------------------------- paths


def features_path(run_dir: str) -> str:
    """Path of a run's ``features.h5``."""
    return fileio.join(run_dir, FILENAME)


def param_path(name: str) -> str:
    """HDF5 path of a model entry, e.g. ``params/features.0.weight``."""
    return f"{PARAMS}/{name}"


def buffer_path(buffer: str, name: str) -> str:
    """HDF5 path of an optimizer buffer of one parameter, e.g. ``buffers/grad/fc.weight``."""
    return f"{BUFFERS}/{buffer}/{name}"


def theory_path(group_key: str, field_name: str) -> str:
    """HDF5 path of a theory field of one group, e.g. ``theory/scale/features.0/exact``."""
    return f"{THEORY}/{group_key}/{field_name}"


def metric_path(name: str) -> str:
    """HDF5 path of a metric, e.g. ``metrics/test_loss``."""
    return f"{METRICS}/{name}"


def run_location(run_dir: str) -> tuple[str, str, str]:
    """``(save_dir, experiment, expid)`` of a run folder ``<save-dir>/<experiment>/<expid>``."""
    run = RunDir.from_path(fileio.local_path(str(run_dir)))
    return run.save_dir, run.experiment, run.expid


def extract_command(run_dir: str) -> str:
    """The extract.py command line that (re)builds a run's ``features.h5``."""
    return RunDir.from_path(fileio.local_path(str(run_dir))).command("extract.py")


# ----------------------------------------------------------------------------- reading


def _is_lock_error(err: BaseException) -> bool:
    text = str(err).lower()
    return "unable to lock file" in text or "resource temporarily unavailable" in text


def abandon_h5(f: h5py.File) -> None:
    """Closes an HDF5 file whose writes failed (disk full...), discarding what is unwritten.

    After a failed write, closing an HDF5 file normally fails again and leaves the library
    in a state that crashes the interpreter at exit. The file's descriptor is pointed at the
    null device first, so the writes HDF5 still wants to do succeed (and are dropped): what
    is on disk stays exactly as it was after the last successful write.

    Args:
        f: an open h5py file (nothing happens when it is already closed).
    """
    if not f.id.valid:
        return
    try:
        handle = f.id.get_vfd_handle()
    except Exception:  # a driver without a file descriptor (in-memory, file object)
        handle = None
    if isinstance(handle, int) and handle >= 0:
        sink = os.open(os.devnull, os.O_RDWR)
        try:
            os.dup2(sink, handle)
        finally:
            os.close(sink)
    try:
        f.close()
    except Exception:  # already broken: nothing more can be done for this file
        pass


def close_h5(f: h5py.File) -> None:
    """Flushes and closes an HDF5 file; when the flush fails, abandons it and re-raises.

    Args:
        f: an open h5py file (nothing happens when it is already closed).

    Raises:
        Whatever the flush raised (e.g. a write error naming ``errno = 28``).
    """
    if not f.id.valid:
        return
    if f.mode == "r":
        f.close()
        return
    try:
        f.flush()
    except BaseException:
        abandon_h5(f)
        raise
    f.close()


def open_features(run_dir: str, filename: str = FILENAME) -> h5py.File:
    """Opens a run's ``features.h5`` (or another file of its layout, e.g. online.h5) read-only.

    Use it as a context manager (``with open_features(run) as f:``) and pass the file to the
    other readers of this module.

    Args:
        run_dir: the run folder (local path or fsspec URL).
        filename: the file in the run folder (``online.h5``: written during training).

    Returns:
        The open h5py file.

    Raises:
        UserError: the run folder does not exist, has not been extracted, or its file is being
            written by another process.
        CorruptFileError: the file is unreadable or is not a features file.
    """
    path = fileio.join(run_dir, filename)
    if not fileio.exists(path):
        if not fileio.exists(run_dir):
            raise UserError(f"no run at {run_dir}; check --save-dir/--experiment/--expid")
        raise UserError(f"run {run_dir} has not been extracted; run {extract_command(run_dir)}")
    try:
        if fileio.is_url(path):
            f = h5py.File(fileio.open_read(path), "r")
        else:
            f = h5py.File(fileio.local_path(path), "r")
    except OSError as err:
        if _is_lock_error(err):
            raise UserError(
                f"{path} is being written by another process (extract.py?); wait until it "
                "finishes"
            ) from None
        raise CorruptFileError(
            f"{path} is unreadable ({err}); rebuild it with {extract_command(run_dir)} --overwrite"
        ) from None
    if f.attrs.get("format") != FORMAT or STEPS not in f:
        f.close()
        raise CorruptFileError(
            f"{path} is not a features file written by extract.py; rebuild it with "
            f"{extract_command(run_dir)} --overwrite"
        )
    return f


def _valid_prefix(steps: np.ndarray) -> int:
    """Length of the leading run of valid steps (>= 0 and strictly increasing)."""
    if steps.size == 0:
        return 0
    ok = steps >= 0
    ok[1:] &= np.diff(steps) > 0
    bad = np.flatnonzero(~ok)
    return int(bad[0]) if bad.size else int(steps.size)


def num_rows(f: h5py.File) -> int:
    """Number of extracted checkpoints N (rows beyond it are never valid).

    This is ``len(/steps)`` except after an extraction killed while committing a block, whose
    steps still read -1: those trailing rows are not counted.
    """
    return _valid_prefix(np.asarray(f[STEPS][:], dtype=np.int64))


def _rows_read(ds: h5py.Dataset, rows: Rows, n: int) -> np.ndarray:
    """Reads `rows` (index, slice, index array or boolean mask) of the first `n` rows of `ds`."""
    if isinstance(rows, slice):
        start, stop, step = rows.indices(n)
        if step > 0:
            return ds[start:stop:step] if stop > start else ds[0:0]
        rows = np.arange(start, stop, step)
    if isinstance(rows, int | np.integer):
        i = int(rows) + n if rows < 0 else int(rows)
        if not 0 <= i < n:
            raise IndexError(f"row {int(rows)} is out of range: the file has {n} rows")
        return ds[i]
    idx = np.asarray(rows)
    if idx.dtype == bool:
        if idx.shape != (n,):
            raise IndexError(f"boolean row mask of shape {idx.shape} does not match {n} rows")
        idx = np.flatnonzero(idx)
    idx = idx.astype(np.int64).reshape(-1)
    idx = np.where(idx < 0, idx + n, idx)
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        raise IndexError(f"rows out of range: the file has {n} rows")
    if idx.size == 0:
        return ds[0:0]
    uniq, inverse = np.unique(idx, return_inverse=True)
    data = ds[uniq]
    return data[inverse]


def _dataset(f: h5py.File, path: str, what: str) -> h5py.Dataset:
    obj = f.get(path)
    if not isinstance(obj, h5py.Dataset):
        raise KeyError(f"{what} is not in {f.filename}")
    return obj


def read_rows(f: h5py.File, path: str, rows: Rows = slice(None)) -> np.ndarray:
    """Rows of any per-checkpoint dataset by its HDF5 path (only rows below `num_rows`).

    Args:
        f: file from `open_features`.
        path: dataset path, e.g. ``params/fc.weight``.
        rows: an index, a slice, an index array or a boolean mask of length N.

    Returns:
        The selected rows, step axis first (no step axis for an integer index).

    Raises:
        KeyError: no such dataset.
        IndexError: an index is at or beyond `num_rows`.
    """
    return _rows_read(_dataset(f, path, path), rows, num_rows(f))


def read_steps(f: h5py.File) -> np.ndarray:
    """Step of every row: [N] int64, strictly increasing."""
    steps = np.asarray(f[STEPS][:], dtype=np.int64)
    return steps[: _valid_prefix(steps)]


def read_epochs(f: h5py.File) -> np.ndarray:
    """epoch_float of every row: [N] float64."""
    return read_rows(f, EPOCH)


def read_lr(f: h5py.File) -> np.ndarray:
    """Learning rate of the next update at every row: [N] float64."""
    return read_rows(f, LR)


def read_sources(f: h5py.File) -> list[str]:
    """Checkpoint file name of every row."""
    return [s.decode("utf-8") for s in read_rows(f, SOURCES)]


def read_groups(f: h5py.File) -> list[SymmetryGroup]:
    """The run's symmetry groups (valid and invalid), from the ``groups`` attribute."""
    return groups_from_json(str(f.attrs.get("groups", "[]")))


def read_hyperparameters(f: h5py.File) -> dict[str, Any]:
    """The run's configuration (every train.py flag) from the ``hyperparameters`` attribute."""
    return json.loads(str(f.attrs.get("hyperparameters", "{}")))


def is_complete(f: h5py.File) -> bool:
    """Whether the last extraction extracted every checkpoint present at the time."""
    return bool(f.attrs.get("complete", False))


def _names(f: h5py.File, path: str) -> list[str]:
    obj = f.get(path)
    return list(obj.keys()) if isinstance(obj, h5py.Group) else []


def param_names(f: h5py.File) -> list[str]:
    """Names of the extracted model entries (parameters and BatchNorm statistics), model order."""
    return _names(f, PARAMS)


def param_layout(f: h5py.File) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Model entry name -> (shape without the step axis, stored dtype), model order."""
    group = f.get(PARAMS)
    return {n: (tuple(group[n].shape[1:]), group[n].dtype) for n in param_names(f)}


def buffer_names(f: h5py.File) -> list[str]:
    """Names of the extracted optimizer buffers, e.g. ``["momentum_buffer", "grad"]``."""
    return _names(f, BUFFERS)


def buffer_params(f: h5py.File, buffer: str) -> list[str]:
    """Parameters that have `buffer` (in optimizer order)."""
    return _names(f, f"{BUFFERS}/{buffer}")


def theory_keys(f: h5py.File) -> list[str]:
    """Group keys ``<kind>/<layer>`` that have a theory state (custom_sgd runs only)."""
    return [
        f"{kind}/{layer}" for kind in _names(f, THEORY) for layer in _names(f, f"{THEORY}/{kind}")
    ]


def theory_fields(f: h5py.File, group_key: str) -> list[str]:
    """Fields stored for one group, e.g. ``["exact", "paper", "time"]``."""
    return _names(f, f"{THEORY}/{group_key}")


def metric_names(f: h5py.File) -> list[str]:
    """Names of the stored metrics."""
    return _names(f, METRICS)


def read_param(f: h5py.File, name: str, rows: Rows = slice(None)) -> np.ndarray:
    """A model entry over rows: [N, *shape] in its training dtype (bfloat16 stored as float32).

    Raises:
        KeyError: `name` is not extracted (the message lists none; see `param_names`).
        IndexError: a row is at or beyond `num_rows`.
    """
    return _rows_read(_dataset(f, param_path(name), f"parameter {name!r}"), rows, num_rows(f))


def read_buffer(f: h5py.File, buffer: str, name: str, rows: Rows = slice(None)) -> np.ndarray:
    """An optimizer buffer of one parameter over rows: [N, *shape]; NaN rows where absent."""
    ds = _dataset(f, buffer_path(buffer, name), f"buffer {buffer!r} of {name!r}")
    return _rows_read(ds, rows, num_rows(f))


def read_theory(
    f: h5py.File, group_key: str, field_name: str, rows: Rows = slice(None)
) -> np.ndarray:
    """A theory field of one group over rows: [N, size] float64 ([N] for ``time``)."""
    ds = _dataset(f, theory_path(group_key, field_name), f"theory {group_key}/{field_name}")
    return _rows_read(ds, rows, num_rows(f))


def read_metric(f: h5py.File, name: str, rows: Rows = slice(None)) -> np.ndarray:
    """A metric over rows: [N] float64, NaN where a checkpoint was not an evaluation step."""
    return _rows_read(_dataset(f, metric_path(name), f"metric {name!r}"), rows, num_rows(f))


# ----------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class DatasetSpec:
    """One per-checkpoint dataset: its path and the shape and dtype of one row."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def row_bytes(self) -> int:
        """Bytes of one row."""
        return int(math.prod(self.shape)) * self.dtype.itemsize


@dataclass
class Row:
    """One checkpoint's values: step, and path -> array for every per-checkpoint dataset.

    `values` holds ``epoch``, ``lr``, ``sources`` and the ``params/...``, ``buffers/...``,
    ``theory/...`` and ``metrics/...`` arrays; datasets missing from a row are filled with NaN
    (empty bytes for ``sources``).
    """

    step: int
    values: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of all values."""
        return sum(int(v.nbytes) for v in self.values.values())


class LayoutMismatchError(ValueError):
    """A row does not fit the file's datasets (different shape or dtype)."""

    def __init__(self, path: str, have: str, got: str) -> None:
        super().__init__(f"{path}: the file has {have}, the checkpoint has {got}")
        self.path = path


BASE_SPECS = (
    DatasetSpec(EPOCH, (), np.dtype(np.float64)),
    DatasetSpec(LR, (), np.dtype(np.float64)),
    DatasetSpec(SOURCES, (), SOURCE_DTYPE),
)


def spec_of(path: str, value: np.ndarray) -> DatasetSpec:
    """The dataset spec of a row value."""
    value = np.asarray(value)
    return DatasetSpec(path, tuple(int(s) for s in value.shape), value.dtype)


def _rows_per_chunk(row_bytes: int) -> int:
    return max(1, min(MAX_ROWS_PER_CHUNK, CHUNK_BYTES // max(row_bytes, 1)))


def _fill_value(dtype: np.dtype) -> Any:
    return b"" if dtype.kind == "S" else (np.nan if dtype.kind in "fc" else 0)


def _early_dcpl() -> h5py.h5p.PropDCID:
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    return dcpl


def _row_datasets(f: h5py.File) -> dict[str, h5py.Dataset]:
    """Every per-checkpoint dataset of the file except ``/steps``, by path."""
    found: dict[str, h5py.Dataset] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and name != STEPS:
            found[name] = obj

    f.visititems(visit)
    return found


class FeaturesWriter:
    """Appends checkpoint rows to ``features.h5`` so that a killed process leaves a valid file.

    Use `create` or `open`, then `prepare` with the specs of all coming rows and their number,
    `append` blocks of rows in step order, and `finish`. See the module docstring for the
    guarantees.
    """

    def __init__(self, f: h5py.File) -> None:
        self._f = f
        self._steps: h5py.Dataset = f[STEPS]
        self._datasets = _row_datasets(f)
        self._specs = {
            p: DatasetSpec(p, tuple(ds.shape[1:]), ds.dtype) for p, ds in self._datasets.items()
        }
        self.steps = read_steps(f)
        self.rows = int(self.steps.size)
        self._capacity = self.rows

    @property
    def path(self) -> str:
        """The file's path."""
        return self._f.filename

    @classmethod
    def create(cls, path: str, hyperparameters: str, groups: str) -> FeaturesWriter:
        """Creates an empty features file (replacing any file at `path`).

        Args:
            path: local file path.
            hyperparameters: the run's config as a JSON string.
            groups: `Utils.groups.groups_to_json` output.
        """
        f = h5py.File(path, "w", libver=LIBVER, track_order=True)
        try:
            f.attrs["format"] = FORMAT
            f.attrs["version"] = VERSION
            f.attrs["hyperparameters"] = hyperparameters
            f.attrs["groups"] = groups
            f.attrs["complete"] = False
            for group in (PARAMS, BUFFERS, THEORY, METRICS):
                f.create_group(group, track_order=True)
            f.create_dataset(
                STEPS,
                shape=(0,),
                maxshape=(None,),
                chunks=(STEPS_CHUNK,),
                dtype=np.int64,
                fillvalue=-1,
                dcpl=_early_dcpl(),
            )
            f.flush()
        except BaseException:
            abandon_h5(f)
            raise
        return cls(f)

    @classmethod
    def open(cls, path: str, readonly: bool = False) -> FeaturesWriter:
        """Opens an existing features file for appending, after checking its structure.

        Args:
            path: local file path.
            readonly: open for reading only (to inspect the file without touching it).

        Raises:
            UserError: another process holds the file open for writing.
            CorruptFileError: the file is unreadable, not a features file, or damaged.
        """
        try:
            f = h5py.File(path, "r" if readonly else "r+", libver=LIBVER)
        except OSError as err:
            if _is_lock_error(err):
                raise UserError(
                    f"{path} is open in another process (another extract.py?); wait until it "
                    "finishes"
                ) from None
            raise CorruptFileError(f"{path} is unreadable ({err})") from None
        try:
            _check_structure(f)
            return cls(f)
        except CorruptFileError:
            f.close()
            raise
        except Exception as err:  # any HDF5 error while checking means damage
            f.close()
            raise CorruptFileError(f"{path} is damaged ({type(err).__name__}: {err})") from None

    @property
    def hyperparameters(self) -> str:
        """The ``hyperparameters`` attribute (JSON string)."""
        return str(self._f.attrs.get("hyperparameters", "{}"))

    def specs(self) -> dict[str, DatasetSpec]:
        """Specs of the file's per-checkpoint datasets (``/steps`` excluded)."""
        return dict(self._specs)

    def check_spec(self, spec: DatasetSpec) -> None:
        """Raises `LayoutMismatchError` when `spec` conflicts with an existing dataset."""
        have_spec = self._specs.get(spec.path)
        if have_spec is None:
            return
        have = (have_spec.shape, have_spec.dtype)
        if have != (spec.shape, spec.dtype):
            raise LayoutMismatchError(
                spec.path, f"shape {have[0]} {have[1]}", f"shape {spec.shape} {spec.dtype}"
            )

    def prepare(
        self, specs: Iterable[DatasetSpec], new_rows: int, groups: str | None = None
    ) -> None:
        """Creates and sizes every dataset for `new_rows` more rows, then flushes.

        New datasets get fill values (NaN) in the rows already counted.

        Args:
            specs: the datasets the coming rows hold (``epoch``, ``lr``, ``sources`` implied).
            new_rows: number of rows that will be appended.
            groups: when given and different, replaces the ``groups`` attribute.

        Raises:
            LayoutMismatchError: a spec conflicts with an existing dataset.
        """
        n = self.rows
        target = n + int(new_rows)
        wanted = {s.path: s for s in specs}
        wanted.update({s.path: s for s in BASE_SPECS})  # fixed dtypes (values are cast)
        for spec in wanted.values():
            self.check_spec(spec)
        if groups is not None and str(self._f.attrs.get("groups")) != groups:
            self._f.attrs["groups"] = groups
        for ds in self._datasets.values():
            if ds.shape[0] != target:
                ds.resize(target, axis=0)
        for spec in wanted.values():
            if spec.path not in self._datasets:
                self._datasets[spec.path] = self._create(spec, target)
                self._specs[spec.path] = spec
        if target > n:  # stale steps of an interrupted extraction must read -1
            self._steps.resize(target, axis=0)
            self._steps[n:target] = -1
        self._steps.resize(n, axis=0)
        self._capacity = target
        self._f.flush()

    def _create(self, spec: DatasetSpec, target: int) -> h5py.Dataset:
        parent, _, name = spec.path.rpartition("/")
        group = self._require_ordered(parent) if parent else self._f
        ds = group.create_dataset(
            name,
            shape=(target, *spec.shape),
            maxshape=(None, *spec.shape),
            chunks=(_rows_per_chunk(spec.row_bytes), *spec.shape),
            dtype=spec.dtype,
            dcpl=_early_dcpl(),
            fill_time="never",
        )
        n = self.rows
        if n:
            per = max(1, (64 << 20) // max(spec.row_bytes, 1))
            fill = np.full((min(per, n), *spec.shape), _fill_value(spec.dtype), spec.dtype)
            for start in range(0, n, per):
                stop = min(n, start + per)
                ds.write_direct(fill[: stop - start], dest_sel=np.s_[start:stop])
        return ds

    def _require_ordered(self, path: str) -> h5py.Group:
        """Creates the groups along `path`, tracking creation order."""
        group: h5py.Group = self._f
        for part in path.split("/"):
            if part not in group:
                group.create_group(part, track_order=True)
            group = group[part]
        return group

    def append(self, rows: Sequence[Row]) -> None:
        """Writes a block of rows (ascending steps, after the last row) and commits it.

        Raises:
            ValueError: steps out of order, more rows than prepared, or an unknown dataset.
            LayoutMismatchError: a value's shape or dtype does not fit its dataset.
        """
        if not rows:
            return
        n, k = self.rows, len(rows)
        if n + k > self._capacity:
            raise ValueError(f"{k} rows exceed the {self._capacity - n} prepared rows")
        steps = np.array([r.step for r in rows], dtype=np.int64)
        last = int(self.steps[-1]) if self.rows else -1
        if steps[0] <= last or np.any(np.diff(steps) <= 0) or steps[0] < 0:
            raise ValueError(f"steps {steps.tolist()} do not follow step {last} in order")
        unknown = set().union(*(r.values for r in rows)) - set(self._datasets)
        if unknown:
            raise ValueError(f"datasets {sorted(unknown)} were not prepared")
        for path, ds in self._datasets.items():
            self._write(ds, self._specs[path], [r.values.get(path) for r in rows], n)
        self._f.flush()
        self._steps.resize(n + k, axis=0)
        self._steps.write_direct(steps, dest_sel=np.s_[n : n + k])
        self._f.flush()
        self.rows = n + k
        self.steps = np.concatenate([self.steps, steps])

    @staticmethod
    def _value(spec: DatasetSpec, value: np.ndarray) -> np.ndarray:
        value = np.asarray(value)
        if value.shape != spec.shape:
            raise LayoutMismatchError(spec.path, f"rows of shape {spec.shape}", f"{value.shape}")
        if value.dtype != spec.dtype:
            if not np.can_cast(value.dtype, spec.dtype, "safe"):
                raise LayoutMismatchError(spec.path, f"dtype {spec.dtype}", f"{value.dtype}")
            value = value.astype(spec.dtype)
        return value if value.flags.c_contiguous else np.ascontiguousarray(value)

    def _write(self, ds: h5py.Dataset, spec: DatasetSpec, values: list, n: int) -> None:
        fill = _fill_value(spec.dtype)
        if spec.row_bytes >= DIRECT_ROW_BYTES:
            for i, value in enumerate(values):
                row = (
                    np.full(spec.shape, fill, spec.dtype)
                    if value is None
                    else self._value(spec, value)
                )
                ds.write_direct(row, dest_sel=np.s_[n + i])
            return
        block = np.empty((len(values), *spec.shape), spec.dtype)  # [k, *shape]
        for i, value in enumerate(values):
            block[i] = fill if value is None else self._value(spec, value)
        ds.write_direct(block, dest_sel=np.s_[n : n + len(values)])

    def finish(self, complete: bool) -> None:
        """Trims datasets to the counted rows, sets the ``complete`` attribute and closes."""
        try:
            n = self.rows
            for ds in self._datasets.values():
                if ds.shape[0] != n:
                    ds.resize(n, axis=0)
            self._f.attrs.modify("complete", bool(complete))
        except BaseException:
            abandon_h5(self._f)
            raise
        close_h5(self._f)

    def close(self) -> None:
        """Closes without changing anything (rows not yet committed are dropped)."""
        close_h5(self._f)

    def abandon(self) -> None:
        """Closes after a failed write without writing anything more (see `abandon_h5`)."""
        abandon_h5(self._f)


def _check_structure(f: h5py.File) -> None:
    """Raises `CorruptFileError` when an opened features file is not sound."""
    name = f.filename
    if f.attrs.get("format") != FORMAT:
        raise CorruptFileError(f"{name} is not a features file written by extract.py")
    if int(f.attrs.get("version", -1)) != VERSION:
        raise CorruptFileError(f"{name} has features format version {f.attrs.get('version')}")
    for key in ("hyperparameters", "groups", "complete"):
        if key not in f.attrs:
            raise CorruptFileError(f"{name} lacks the {key!r} attribute")
    json.loads(str(f.attrs["hyperparameters"]))
    json.loads(str(f.attrs["groups"]))
    if not isinstance(f.get(STEPS), h5py.Dataset):
        raise CorruptFileError(f"{name} has no /steps")
    n = num_rows(f)
    datasets = _row_datasets(f)
    for spec in BASE_SPECS:
        if spec.path not in datasets and n:
            raise CorruptFileError(f"{name} lacks /{spec.path}")
    for path, ds in datasets.items():
        if ds.ndim < 1 or ds.shape[0] < n:
            raise CorruptFileError(f"{name}: /{path} has fewer rows than /steps")
        rows_per_chunk = ds.chunks[0] if ds.chunks else 0
        if rows_per_chunk and ds.id.get_num_chunks() != math.ceil(ds.shape[0] / rows_per_chunk):
            raise CorruptFileError(f"{name}: /{path} lost some of its chunks")
        if n:
            ds[n - 1]
