"""Paths that may be local or fsspec URLs (gs://, s3://, memory://, file://), written atomically.

Local files are written to a temporary file in the same folder and renamed into place, so a
reader never sees half a file. On object stores (gs://, s3://) an object only appears when its
upload completes, which gives the same guarantee; other fsspec filesystems get a temporary
name and a move.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any

import torch

_OBJECT_STORES = {"gs", "gcs", "s3", "s3a", "az", "abfs", "memory"}


def is_url(path: str) -> bool:
    """Whether `path` names an fsspec URL rather than a local path."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str) -> str:
    """Strips a ``file://`` prefix; other paths are returned as they are."""
    path = str(path)
    return path[len("file://") :] if path.startswith("file://") else path


def _fs(path: str):
    """The fsspec filesystem and in-filesystem path for a URL."""
    import fsspec

    return fsspec.core.url_to_fs(path)


def join(*parts: str) -> str:
    """Joins path parts with '/', for local paths and URLs alike."""
    head, *rest = (str(p) for p in parts)
    if not is_url(head):
        return os.path.join(local_path(head), *rest)
    return "/".join([head.rstrip("/"), *(p.strip("/") for p in rest)])


def exists(path: str) -> bool:
    """Whether a file or folder exists."""
    if is_url(path):
        fs, p = _fs(path)
        return fs.exists(p)
    return os.path.exists(local_path(path))


def makedirs(path: str) -> None:
    """Creates a folder and its parents (no-op on object stores without folders)."""
    if is_url(path):
        fs, p = _fs(path)
        fs.makedirs(p, exist_ok=True)
    else:
        os.makedirs(local_path(path), exist_ok=True)


def listdir(path: str) -> list[str]:
    """Names (not paths) of the entries of a folder, sorted; empty when it does not exist."""
    if is_url(path):
        fs, p = _fs(path)
        if not fs.exists(p):
            return []
        return sorted(os.path.basename(e.rstrip("/")) for e in fs.ls(p, detail=False))
    p = local_path(path)
    return sorted(os.listdir(p)) if os.path.isdir(p) else []


def remove(path: str) -> None:
    """Removes a file or a folder tree if it exists."""
    if is_url(path):
        fs, p = _fs(path)
        if fs.exists(p):
            fs.rm(p, recursive=True)
        return
    p = local_path(path)
    if os.path.isdir(p):
        import shutil

        shutil.rmtree(p)
    elif os.path.exists(p):
        os.remove(p)


def open_read(path: str) -> IO[bytes]:
    """Opens a file for binary reading."""
    if is_url(path):
        fs, p = _fs(path)
        return fs.open(p, "rb")
    return open(local_path(path), "rb")


def getsize(path: str) -> int:
    """Size of a file in bytes."""
    if is_url(path):
        fs, p = _fs(path)
        return int(fs.size(p))
    return os.path.getsize(local_path(path))


def atomic_write(path: str, write: Callable[[IO[bytes]], Any]) -> None:
    """Writes a file so that it appears complete or not at all.

    Args:
        path: destination (local path or fsspec URL).
        write: called with a binary file object to fill.
    """
    if is_url(path):
        fs, p = _fs(path)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in _OBJECT_STORES:
            buf = io.BytesIO()
            write(buf)
            with fs.open(p, "wb") as f:
                f.write(buf.getvalue())
            return
        tmp = f"{p}.tmp-{os.getpid()}"
        with fs.open(tmp, "wb") as f:
            write(f)
        fs.mv(tmp, p)
        return
    p = local_path(path)
    folder = os.path.dirname(os.path.abspath(p))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    """Writes a UTF-8 text file atomically."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def write_json(path: str, obj: Any) -> None:
    """Writes JSON (indented, keys sorted) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str) -> Any:
    """Reads a JSON file."""
    with open_read(path) as f:
        return json.loads(f.read().decode("utf-8"))


def atomic_torch_save(obj: Any, path: str) -> None:
    """`torch.save` to a temporary file, then renamed into place."""
    atomic_write(path, lambda f: torch.save(obj, f))


def torch_load(path: str, map_location: str | torch.device = "cpu") -> Any:
    """`torch.load` for local paths and URLs (full unpickling: only for the project's own files)."""
    if is_url(path):
        with open_read(path) as f:
            return torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=False)
    return torch.load(local_path(path), map_location=map_location, weights_only=False)
