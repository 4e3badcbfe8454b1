"""Reading checkpoint files safely: an allowlist of pickle globals and the zip CRC-32 checked.

A checkpoint is a ``torch.save`` zip archive: ``<prefix>/data.pkl`` is a pickle whose tensors
are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls and whose
storages are persistent ids ``("storage", torch.<Type>Storage, key, location, numel)``; the
bytes of storage ``key`` are the uncompressed zip record ``<prefix>/data/<key>``. Every record
carries a CRC-32 in the zip directory.

Unpickling runs whatever callables a pickle names, so no checkpoint is ever unpickled without
an allowlist:

* `safe_torch_load` (training's ``--resume`` and ``--restore-path``, `load_checkpoint`) is
  ``torch.load(weights_only=True)``: torch's own allowlist (tensors, storages, ``OrderedDict``,
  plain containers and numbers) plus `SAFE_GLOBALS`, and nothing else.
* `read_arrays` (extraction; numpy views of the tensors without torch) unpickles with a
  ``find_class`` that admits only the tensor rebuild it implements, the storage types and
  `SAFE_GLOBALS`; other ``torch.*`` globals fall back to `safe_torch_load`.

`SAFE_GLOBALS` is only what checkpoints of this project hold besides tensors: the numpy
arrays of old checkpoints' numpy random state (new checkpoints store it as plain ints, see
`Utils.checkpoint.rng_state`). A file that names any other global is refused with
`UnsafeCheckpointError`, one line naming the global and the file, before anything of it is
unpickled. Both readers check the CRC-32 of every record they use (`verify_crc`) and raise
`CorruptFileError` naming the file and the record on a mismatch: a flipped bit is never used.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import io
import math
import pickle
import re
import struct
import sys
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from Utils import fileio
from Utils.errors import CorruptFileError

# (module, name) of the globals a checkpoint may use beyond torch's weights_only defaults
SAFE_GLOBALS = (
    ("numpy._core.multiarray", "_reconstruct"),  # numpy >= 2 ndarray pickles
    ("numpy.core.multiarray", "_reconstruct"),  # numpy < 2 ndarray pickles
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.dtypes", "UInt32DType"),  # the state's dtype, restored by torch's BUILD
)
# what the array reader also admits: torch's defaults that this project's checkpoints use
_READER_GLOBALS = frozenset(SAFE_GLOBALS) | {
    ("collections", "OrderedDict"),
    ("_codecs", "encode"),  # bytes inside numpy array pickles
}
_CRC_CHUNK = 64 << 20

_STORAGE_DTYPES = {
    "FloatStorage": np.dtype(np.float32),
    "DoubleStorage": np.dtype(np.float64),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),  # converted to float32 when rebuilt
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
_LOCAL_HEADER = struct.Struct("<4s2B4HL2L2H")  # zip local file header, 30 bytes


class UnsafeCheckpointError(CorruptFileError):
    """A checkpoint names a pickle global outside the allowlist (it could run code).

    Attributes:
        path: the file.
        name: the offending global, ``module.name``.
    """

    def __init__(self, path: str, name: str) -> None:
        self.path = path
        self.name = name
        super().__init__(
            f"refusing to load {path}: it needs {name}, which no checkpoint of train.py uses "
            "(loading it could run code); delete the file or move it out of the run"
        )


class Unsupported(Exception):
    """The file uses torch features the array reader does not handle (torch.load does)."""


# ----------------------------------------------------------------------------- zip records


@contextlib.contextmanager
def _archive(path: str, data: bytes | None = None) -> Iterator[tuple[np.ndarray, zipfile.ZipFile]]:
    """The file's bytes (memory-mapped when local) and its zip directory.

    Args:
        path: local path or fsspec URL.
        data: the file's bytes when already read (a URL is read here otherwise).

    Raises:
        CorruptFileError: not a zip archive (truncated, or not written by torch.save).
    """
    if data is None and fileio.is_url(path):
        with fileio.open_read(path) as fh:
            data = fh.read()
    try:
        if data is not None:
            blob = np.frombuffer(data, dtype=np.uint8)
            archive = zipfile.ZipFile(io.BytesIO(data))
        else:
            local = fileio.local_path(path)
            blob = np.memmap(local, dtype=np.uint8, mode="r").view(np.ndarray)
            archive = zipfile.ZipFile(local)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as err:
        raise CorruptFileError(
            f"checkpoint {path} is corrupt or truncated (not a zip archive: {err}); delete it, "
            "or pass --skip-bad to go on without it"
        ) from None
    with archive:
        yield blob, archive


def _record_bytes(blob: np.ndarray, info: zipfile.ZipInfo, path: str) -> np.ndarray:
    """The stored bytes of an uncompressed zip record (a view of `blob`)."""
    if info.header_offset + _LOCAL_HEADER.size > blob.size:
        raise CorruptFileError(f"checkpoint {path}: record {info.filename} is truncated")
    header = _LOCAL_HEADER.unpack_from(blob, info.header_offset)
    if header[0] != b"PK\x03\x04":
        raise CorruptFileError(f"checkpoint {path}: record {info.filename} has a bad header")
    start = info.header_offset + _LOCAL_HEADER.size + header[-2] + header[-1]
    if start + info.file_size > blob.size:
        raise CorruptFileError(f"checkpoint {path}: record {info.filename} is truncated")
    return blob[start : start + info.file_size]


def _check_crc(data: np.ndarray, info: zipfile.ZipInfo, path: str) -> None:
    """Raises CorruptFileError when `data` does not match the record's CRC-32."""
    crc = 0
    for start in range(0, data.size, _CRC_CHUNK):
        crc = zlib.crc32(data[start : start + _CRC_CHUNK], crc)
    if crc != info.CRC:
        raise CorruptFileError(
            f"checkpoint {path} is damaged (record {info.filename} fails its CRC-32 check); "
            "delete it, or pass --skip-bad to go on without it"
        )


def _verify_archive(blob: np.ndarray, archive: zipfile.ZipFile, path: str) -> None:
    for info in archive.infolist():
        if info.compress_type == zipfile.ZIP_STORED:
            _check_crc(_record_bytes(blob, info, path), info, path)
        else:  # zipfile checks the CRC of what it decompresses
            try:
                with archive.open(info) as fh:
                    while fh.read(_CRC_CHUNK):
                        pass
            except (zipfile.BadZipFile, zlib.error, EOFError) as err:
                raise CorruptFileError(
                    f"checkpoint {path} is damaged (record {info.filename}: {err}); delete it, "
                    "or pass --skip-bad to go on without it"
                ) from None


def verify_crc(path: str) -> None:
    """Checks the CRC-32 of every record of a checkpoint (reads the whole file).

    Args:
        path: a checkpoint file (local path or fsspec URL).

    Raises:
        CorruptFileError: not a zip archive, or a record whose bytes do not match its CRC,
            naming the file and the record.
    """
    with _archive(path) as (blob, archive):
        _verify_archive(blob, archive, path)


# ----------------------------------------------------------------------------- torch.load


def _allowed_callables() -> list[Any]:
    """`SAFE_GLOBALS` as torch.serialization wants them (objects, or (object, name))."""
    import importlib
    import warnings

    out: list[Any] = []
    for module, name in SAFE_GLOBALS:
        with warnings.catch_warnings():  # numpy 2 warns on numpy.core
            warnings.simplefilter("ignore")
            try:
                obj = getattr(importlib.import_module(module), name)
            except (ImportError, AttributeError):  # not in this numpy version
                continue
        qualified = f"{module}.{name}"
        out.append(obj if f"{obj.__module__}.{obj.__name__}" == qualified else (obj, qualified))
    return out


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def safe_torch_load(path: str, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load`` with the allowlist (see the module docstring), after `verify_crc`.

    Args:
        path: local path or fsspec URL.
        map_location: as for ``torch.load``.
        mmap: memory-map a local file (tensors read when touched).

    Raises:
        UnsafeCheckpointError: the file names a global outside the allowlist.
        CorruptFileError: not a zip archive, or a CRC mismatch.
        Exception: other damage, as torch raises it.
    """
    import torch

    data = None
    if fileio.is_url(path):
        with fileio.open_read(path) as fh:
            data = fh.read()
    with _archive(path, data) as (blob, archive):
        _verify_archive(blob, archive, path)
    with torch.serialization.safe_globals(_allowed_callables()):
        source: Any = fileio.local_path(path) if data is None else io.BytesIO(data)
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(source)
        if data is not None:
            source.seek(0)
        if unsafe:
            raise UnsafeCheckpointError(path, unsafe[0])
        try:
            mmap = mmap and isinstance(source, str)
            return torch.load(source, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as err:  # anything the scan above did not name
            found = _GLOBAL_IN_MESSAGE.search(str(err))
            if found:
                raise UnsafeCheckpointError(path, found.group(1)) from None
            raise


# ----------------------------------------------------------------------------- array reader


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    array: np.ndarray  # [numel] in the storage's dtype
    bfloat16: bool


def _rebuild_array(
    storage: _Storage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> np.ndarray:
    """Numpy twin of ``torch._utils._rebuild_tensor_v2``: a strided view of the storage."""
    if not isinstance(storage, _Storage) or backward_hooks or metadata:
        raise Unsupported("tensor with hooks or metadata")
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    base = storage.array
    if any(s < 0 for s in stride) or len(size) != len(stride):
        raise Unsupported("negative or malformed strides")
    numel = math.prod(size)
    offset = int(storage_offset)
    if numel:
        last = offset + sum((n - 1) * st for n, st in zip(size, stride))
        if offset < 0 or last >= base.size:
            raise CorruptFileError("a tensor reaches past the end of its storage")
        contiguous, expected = True, 1
        for n, st in zip(reversed(size), reversed(stride)):
            contiguous &= n == 1 or st == expected
            expected *= n
        if contiguous:
            view = base[offset : offset + numel].reshape(size)
        else:
            view = np.lib.stride_tricks.as_strided(
                base[offset:],
                shape=size,
                strides=tuple(st * base.itemsize for st in stride),
                writeable=False,
            )
    else:
        view = np.empty(size, dtype=base.dtype)
    if storage.bfloat16:  # bfloat16 is the top half of a float32
        return (view.astype(np.uint32) << 16).view(np.float32)
    return view


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` with numpy arrays for tensors, admitting only allowed globals."""

    def __init__(self, data: bytes, record: Any, path: str) -> None:
        super().__init__(io.BytesIO(data))
        self._record = record
        self._path = path
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_array
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" or module.startswith("torch."):
            raise Unsupported(f"{module}.{name}")  # safe_torch_load decides
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)  # protocol 2 names
        if (module, name) in _READER_GLOBALS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(self._path, f"{module}.{name}")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise Unsupported(f"persistent id {pid!r:.60}")
        _, storage_type, key, _, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise Unsupported(f"storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            dtype = _STORAGE_DTYPES[storage_type.name]
            raw = self._record(f"data/{key}")  # [bytes] uint8
            need = int(numel) * dtype.itemsize
            if raw.size < need:
                raise CorruptFileError(f"storage {key} is shorter than its {numel} elements")
            self._storages[key] = _Storage(
                raw[:need].view(dtype), storage_type.name == "BFloat16Storage"
            )
        return self._storages[key]


def read_arrays(path: str, verify: bool = True) -> dict[str, Any]:
    """Reads a checkpoint with every tensor as a read-only numpy array, without torch.

    Local files are memory-mapped: arrays are views that read the file when touched, so
    reading the step or the layout costs only the pickle (with ``verify=False``). bfloat16
    tensors become float32. The pickle's CRC is always checked; ``verify`` checks every record.

    Args:
        path: a checkpoint written by train.py (local path or fsspec URL).
        verify: check the CRC-32 of every record (reads the whole file).

    Returns:
        The checkpoint dict, numpy arrays in place of tensors.

    Raises:
        Unsupported: the file uses torch features this reader does not handle.
        UnsafeCheckpointError: the pickle names a global outside the allowlist.
        CorruptFileError: a CRC mismatch or other damage, naming the file.
        zipfile.BadZipFile, pickle.UnpicklingError, ...: other damage.
    """
    with _archive(path) as (blob, archive):
        infos = {i.filename: i for i in archive.infolist()}
        pickles = [n for n in infos if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise Unsupported("not a torch zip checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        order = infos.get(prefix + "byteorder")
        if order is not None and archive.read(order).decode() != sys.byteorder:
            raise Unsupported("byte order differs from this machine")
        if verify:
            _verify_archive(blob, archive, path)
        try:
            pickled = archive.read(pickles[0])  # checks its CRC
        except zipfile.BadZipFile as err:
            raise CorruptFileError(
                f"checkpoint {path} is damaged ({err}); delete it, or pass --skip-bad to go on "
                "without it"
            ) from None

    def record(name: str) -> np.ndarray:
        info = infos.get(prefix + name)
        if info is None:
            raise CorruptFileError(f"record {name} is missing")
        if info.compress_type != zipfile.ZIP_STORED:
            raise Unsupported("compressed record")
        return _record_bytes(blob, info, path)

    return _ArrayUnpickler(pickled, record, path).load()
