"""Reading and writing cache files (``<run>/cache/<metric><suffix>.h5``).

A cache file is written through a `CacheWriter`: the datasets go into a temporary file in the
cache folder (``.<file>.<pid>.tmp``), which is renamed into place by `CacheWriter.commit`, so
a reader sees a complete file or none. Per-step datasets grow by `CacheWriter.append` (resizable
along the step axis), so a metric never holds more than one slice of rows in memory.

Root attributes of every cache file (see docs/METRICS.md):

``format`` ("neural-mechanics-cache"), ``version``, ``metric``, ``source_rows`` (rows of
features.h5 the cache was built from), ``source_last_step``, ``options`` (JSON of the metric's
options, e.g. subset and seed), ``datasets`` (JSON of every dataset's path and shape, written
by `CacheWriter.commit`), plus whatever the metric adds.

Damage is detectable: numeric datasets carry HDF5's Fletcher-32 checksum filter, and
`check_cache` reads every dataset listed in ``datasets`` (in slices of rows), so a flipped
byte, a missing dataset or a changed shape makes a cache "not up to date" for cache.py and an
error for plot.py. Everything that reads caches (cache.py, plot.py, notebooks) goes through
`open_cache`, `CacheReader` or `load_cache` here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import h5py
import numpy as np

from Utils import fileio
from Utils.errors import CorruptFileError
from Utils.rundir import pid_alive
from Utils.storage import abandon_h5, close_h5

FORMAT = "neural-mechanics-cache"
# 2: Fletcher-32 checksums and the ``datasets`` manifest.
VERSION = 2
CACHE_DIR = "cache"
_TMP_SUFFIX = ".tmp"
# Bytes read at a time by `check_cache`.
_CHECK_BYTES = 64 << 20


def cache_dir(run_dir: str) -> str:
    """The cache folder of a run."""
    return fileio.join(run_dir, CACHE_DIR)


def cache_path(run_dir: str, metric: str, suffix: str = "") -> str:
    """Path of one metric's cache file, ``<run_dir>/cache/<metric><suffix>.h5``."""
    return fileio.join(cache_dir(run_dir), f"{metric}{suffix}.h5")


def remove_stale_temporaries(path: str) -> list[str]:
    """Deletes temporary files left for `path` by writers that were killed.

    Only files named ``.<name>.<pid>.tmp`` whose process no longer exists are removed, so a
    cache.py running at the same time on the same run keeps its own temporary file.

    Returns:
        The removed paths.
    """
    if fileio.is_url(path):
        return []
    folder, name = os.path.split(fileio.local_path(path))
    removed: list[str] = []
    prefix = f".{name}."
    for entry in fileio.listdir(folder):
        if not (entry.startswith(prefix) and entry.endswith(_TMP_SUFFIX)):
            continue
        pid_text = entry[len(prefix) : -len(_TMP_SUFFIX)]
        if pid_text.isdigit() and not pid_alive(int(pid_text)):
            os.remove(os.path.join(folder, entry))
            removed.append(os.path.join(folder, entry))
    return removed


def _chunks(tail: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    """Chunk shape for a dataset [rows, *tail] appended by slices of rows (about 1 MiB)."""
    per_row = max(int(np.prod(tail, dtype=np.int64)) * itemsize, 1)
    budget = 1 << 20
    if per_row <= budget:
        return (max(1, min(64, budget // per_row)), *tail)
    if not tail:
        return (1,)
    # A row alone is larger than the budget: split the first trailing axis.
    inner = max(int(np.prod(tail[1:], dtype=np.int64)) * itemsize, 1)
    first = max(1, min(tail[0], budget // inner))
    return (1, first, *tail[1:])


class CacheWriter:
    """Builds one cache file in a temporary file and renames it into place on `commit`.

    Args:
        path: final path of the cache file (a local path or an fsspec URL).
        metric: the metric's name (stored in the root attributes).

    Use as a context manager: leaving the block by an exception removes the temporary file.
    """

    def __init__(self, path: str, metric: str) -> None:
        self.path = path
        self.metric = metric
        self._upload_dir: str | None = None
        if fileio.is_url(path):
            self._upload_dir = tempfile.mkdtemp(prefix="nm-cache-")
            self.tmp_path = os.path.join(self._upload_dir, os.path.basename(path))
        else:
            final = fileio.local_path(path)
            folder, name = os.path.split(os.path.abspath(final))
            os.makedirs(folder, exist_ok=True)
            self.tmp_path = os.path.join(folder, f".{name}.{os.getpid()}{_TMP_SUFFIX}")
        self.file = h5py.File(self.tmp_path, "w")
        self.file.attrs["format"] = FORMAT
        self.file.attrs["version"] = VERSION
        self.file.attrs["metric"] = metric
        self._closed = False

    def __enter__(self) -> CacheWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or not self._closed:
            self.abort()

    def write(self, path: str, data: Any, dtype: Any = None, **attrs: Any) -> h5py.Dataset:
        """Writes a whole dataset at once (for small, step-independent arrays).

        Args:
            path: path inside the file, e.g. ``groups/scale/features.0/index``.
            data: the array.
            dtype: storage dtype (default: the array's), e.g. ``h5py.string_dtype()``.
            **attrs: attributes set on the dataset.
        """
        arr = np.asarray(data)
        dt = np.dtype(dtype) if dtype is not None else arr.dtype
        with self._guard():
            ds = self.file.create_dataset(
                path, data=arr, dtype=dtype, fletcher32=_checksummed(arr.shape, dt)
            )
            set_attrs(ds, attrs)
        return ds

    def append(self, name: str, data: Any, dtype: Any = None) -> None:
        """Appends rows (first axis) to a resizable dataset, creating it on first use.

        Args:
            name: path inside the file.
            data: array [r, *tail]; the tail shape must stay the same across calls.
            dtype: storage dtype at creation (default: the array's dtype).
        """
        arr = np.asarray(data)
        with self._guard():
            if name not in self.file:
                dt = np.dtype(dtype if dtype is not None else arr.dtype)
                self.file.create_dataset(
                    name,
                    shape=(0, *arr.shape[1:]),
                    maxshape=(None, *arr.shape[1:]),
                    dtype=dt,
                    chunks=_chunks(tuple(arr.shape[1:]), dt.itemsize),
                    fletcher32=_checksummed((1, *arr.shape[1:]), dt),
                )
            ds = self.file[name]
            start = ds.shape[0]
            ds.resize(start + arr.shape[0], axis=0)
            ds[start:] = arr

    def group(self, path: str, **attrs: Any) -> h5py.Group:
        """Creates (or opens) an HDF5 group and sets attributes on it."""
        with self._guard():
            grp = self.file.require_group(path)
            set_attrs(grp, attrs)
        return grp

    def attrs(self, **attrs: Any) -> None:
        """Sets root attributes (dicts and lists are stored as JSON strings)."""
        with self._guard():
            set_attrs(self.file, attrs)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Runs one write and flushes it, so that a full disk is reported here.

        HDF5 reports a failed write late (when a cached chunk is evicted or a dataset object
        is freed, where it can only print a warning). Flushing after every write makes the
        failure surface as an exception of this call; the temporary file is then abandoned
        at once (see `Utils.storage.abandon_h5`) and a `WriteError` naming the cache raised.
        """
        try:
            yield
            self.file.flush()
        except Exception as exc:
            failed = fileio.write_error_of(exc, self.path)
            if failed is None:
                raise
            self.abort()
            raise failed from None

    def commit(self) -> str:
        """Closes the temporary file and renames it to the final path.

        Returns:
            The final path.
        """
        with self._guard():
            set_attrs(self.file, {"datasets": _manifest(self.file)})
        close_h5(self.file)
        self._closed = True
        if self._upload_dir is not None:
            with open(self.tmp_path, "rb") as src:
                payload = src.read()
            fileio.atomic_write(self.path, lambda f: f.write(payload))
            shutil.rmtree(self._upload_dir, ignore_errors=True)
        else:
            with open(self.tmp_path, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp_path, fileio.local_path(self.path))
        return self.path

    def abort(self) -> None:
        """Closes and deletes the temporary file (the final path is left untouched)."""
        if not self._closed:
            abandon_h5(self.file)  # the file is deleted: nothing more needs writing
            self._closed = True
        if os.path.exists(self.tmp_path):
            os.remove(self.tmp_path)
        if self._upload_dir is not None:
            shutil.rmtree(self._upload_dir, ignore_errors=True)


def _checksummed(shape: tuple[int, ...], dtype: np.dtype) -> bool:
    """Whether a dataset gets the Fletcher-32 filter (numeric, non-empty arrays; HDF5 cannot
    filter scalars, and strings are checked by reading them)."""
    return len(shape) > 0 and all(int(n) > 0 for n in shape) and dtype.kind in "biufc"


def _manifest(f: h5py.File) -> dict[str, list[int]]:
    """Path -> shape of every dataset of an open file."""
    out: dict[str, list[int]] = {}
    f.visititems(
        lambda name, obj: (
            out.__setitem__(name, [int(n) for n in obj.shape])
            if isinstance(obj, h5py.Dataset)
            else None
        )
    )
    return out


def set_attrs(obj: h5py.Group | h5py.Dataset, attrs: Mapping[str, Any]) -> None:
    """Sets HDF5 attributes; dicts, lists and tuples are stored as JSON strings, None as ""."""
    for key, value in attrs.items():
        if isinstance(value, (dict, list, tuple)):
            value = json.dumps(value, sort_keys=True, default=str)
        elif value is None:
            value = ""
        obj.attrs[key] = value


def open_cache(path: str) -> h5py.File:
    """Opens a cache file for reading.

    Raises:
        CorruptFileError: when the file is not a readable cache file.
    """
    try:
        if fileio.is_url(path):
            f = h5py.File(fileio.open_read(path), "r")
        else:
            f = h5py.File(fileio.local_path(path), "r")
    except (OSError, ValueError) as exc:
        raise CorruptFileError(
            f"cache file {path} cannot be read ({exc}); delete it or rerun cache.py --overwrite"
        ) from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CorruptFileError(
            f"{path} is not a cache file written by cache.py; delete it or rerun with --overwrite"
        )
    return f


def cache_info(path: str) -> dict[str, Any] | None:
    """The root attributes of a cache file, or None if it is missing or unreadable."""
    if not fileio.exists(path):
        return None
    try:
        with open_cache(path) as f:
            return {k: decode(v) for k, v in f.attrs.items()}
    except CorruptFileError:
        return None


def decode(value: Any) -> Any:
    """HDF5 attribute value -> plain python (bytes to str, numpy scalars to python)."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def json_attr(value: Any, default: Any) -> Any:
    """An attribute stored as a JSON string by `set_attrs` (lists and dicts), decoded."""
    value = decode(value)
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return default
    if isinstance(value, np.ndarray):
        return [decode(v) for v in value.tolist()]
    return default if value is None else value


def check_cache(path: str) -> str:
    """Reads a whole cache file to find damage.

    Every dataset named in the ``datasets`` manifest must exist with its recorded shape and
    read back without error (Fletcher-32 checksums catch changed bytes); a file written
    before the manifest existed has only its datasets read.

    Args:
        path: the cache file.

    Returns:
        "" when the file is sound, else a short description of the first problem found.
    """
    try:
        with open_cache(path) as f:
            manifest = json_attr(f.attrs.get("datasets"), None)
            if manifest is None:
                manifest = _manifest(f)
            elif not isinstance(manifest, dict):
                return "its list of datasets is unreadable"
            for name, shape in manifest.items():
                item = f.get(name)
                if not isinstance(item, h5py.Dataset):
                    return f"dataset /{name} is missing"
                if list(item.shape) != list(shape):
                    return f"dataset /{name} has shape {list(item.shape)}, not {list(shape)}"
                try:
                    _read_all(item)
                except (OSError, ValueError, RuntimeError) as exc:
                    reason = str(exc).splitlines()[0][:100] if str(exc) else type(exc).__name__
                    return f"dataset /{name} cannot be read back ({reason})"
    except CorruptFileError as exc:
        return str(exc).split(";")[0]
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        return f"a dataset cannot be read ({str(exc).splitlines()[0][:120]})"
    return ""


def _read_all(ds: h5py.Dataset) -> None:
    """Reads a dataset in slices of rows (so that checksums are verified), discarding it."""
    if ds.ndim == 0 or ds.shape[0] == 0:
        ds[()]
        return
    per_row = max(int(np.prod(ds.shape[1:], dtype=np.int64)) * ds.dtype.itemsize, 1)
    step = max(1, _CHECK_BYTES // per_row)
    for start in range(0, ds.shape[0], step):
        ds[start : start + step]


def is_up_to_date(
    path: str, metric: str, source_rows: int, source_last_step: int, options: Mapping[str, Any]
) -> bool:
    """Whether an existing cache was built from the same features rows with the same options,
    and is undamaged (see `out_of_date`)."""
    return not out_of_date(path, metric, source_rows, source_last_step, options)


def out_of_date(
    path: str, metric: str, source_rows: int, source_last_step: int, options: Mapping[str, Any]
) -> str:
    """Why an existing cache must be recomputed ("" when it is up to date).

    Returns:
        "" when it was built from the same features rows with the same options and
        `check_cache` finds no damage; "missing", "outdated" (other rows, options or format
        version) or ``"damaged: <problem>"`` otherwise.
    """
    info = cache_info(path)
    if info is None:
        return "missing" if not fileio.exists(path) else "damaged: it cannot be opened"
    try:
        stored_options = json.loads(info.get("options", "{}"))
    except (TypeError, ValueError):
        return "damaged: its options attribute is unreadable"
    same = (
        info.get("version") == VERSION
        and info.get("metric") == metric
        and info.get("source_rows") == int(source_rows)
        and info.get("source_last_step") == int(source_last_step)
        and stored_options == json.loads(json.dumps(dict(options), sort_keys=True))
    )
    if not same:
        return "outdated"
    problem = check_cache(path)
    return f"damaged: {problem}" if problem else ""


def load_cache(path: str) -> dict[str, Any]:
    """Reads a whole cache file into nested dicts (for tests, notebooks and small files).

    Returns:
        ``{"attrs": {...}, "<name>": array or nested dict with its own "attrs"}``.
    """

    def walk(node: h5py.Group) -> dict[str, Any]:
        out: dict[str, Any] = {"attrs": {k: decode(v) for k, v in node.attrs.items()}}
        for key, item in node.items():
            out[key] = walk(item) if isinstance(item, h5py.Group) else item[()]
        return out

    with open_cache(path) as f:
        return walk(f)


class CacheReader:
    """One cache file open for reading, with its datasets read into memory on first use.

    Args:
        path: the cache file (local path or fsspec URL).
        hint: what to run to rebuild it, appended to errors (default: cache.py --overwrite).

    Raises:
        CorruptFileError: when the file is not a readable cache file.
    """

    def __init__(self, path: str, hint: str = "") -> None:
        self.path = path
        self.hint = hint or "cache.py"
        try:
            self._file = open_cache(path)
        except CorruptFileError as exc:
            problem = str(exc).split(";")[0]
            raise CorruptFileError(f"{problem}; rerun {self.hint} --overwrite") from None
        self.attrs = {k: decode(v) for k, v in self._file.attrs.items()}
        self._memo: dict[str, np.ndarray] = {}

    def close(self) -> None:
        """Closes the file."""
        self._file.close()

    def __enter__(self) -> CacheReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def get(self, name: str) -> np.ndarray | None:
        """A dataset as a numpy array (None when absent).

        Raises:
            CorruptFileError: the dataset cannot be read (damaged file).
        """
        if name not in self._memo:
            item = self._file.get(name)
            if not isinstance(item, h5py.Dataset):
                return None
            try:
                self._memo[name] = np.asarray(item[()])
            except (OSError, ValueError) as exc:
                raise CorruptFileError(
                    f"{self.path}: /{name} cannot be read ({str(exc).splitlines()[0][:100]}); "
                    f"rerun {self.hint} --overwrite"
                ) from None
        return self._memo[name]

    def shape(self, name: str) -> tuple[int, ...] | None:
        """Shape of a dataset without reading it (None when absent)."""
        item = self._file.get(name)
        return tuple(item.shape) if isinstance(item, h5py.Dataset) else None

    def is_numeric(self, name: str) -> bool:
        """Whether a dataset holds numbers."""
        item = self._file.get(name)
        return isinstance(item, h5py.Dataset) and np.issubdtype(item.dtype, np.number)

    def json_attr(self, name: str, default: Any) -> Any:
        """A root attribute stored as JSON (lists, dicts), decoded."""
        return json_attr(self.attrs.get(name), default)

    def node_attrs(self, name: str) -> dict[str, Any]:
        """Attributes of a group or dataset (empty when absent)."""
        item = self._file.get(name)
        return {} if item is None else {k: decode(v) for k, v in item.attrs.items()}

    def keys(self, group: str = "/") -> list[str]:
        """Names of the members of a group (empty when absent)."""
        item = self._file.get(group)
        return list(item.keys()) if isinstance(item, h5py.Group) else []

    def datasets(self) -> list[str]:
        """Paths of every dataset in the file."""
        return list(_manifest(self._file))

    @property
    def steps(self) -> np.ndarray:
        """The step of every row.

        Raises:
            CorruptFileError: the file has no ``/steps``.
        """
        steps = self.get("steps")
        if steps is None:
            raise CorruptFileError(f"{self.path} has no /steps; rerun {self.hint} --overwrite")
        return np.asarray(steps)

    @property
    def num_rows(self) -> int:
        """Number of rows (steps)."""
        return int(self.steps.shape[0])
