"""Paths that may be local or fsspec URLs (gs://, s3://, memory://, file://), written atomically.

Local files are written to a temporary file in the same folder and renamed into place, so a
reader never sees half a file. On object stores (gs://, s3://) an object only appears when its
upload completes, which gives the same guarantee; other fsspec filesystems get a temporary
name and a move.

Libraries that need a real local file (h5py) use `local_file`: a URL is downloaded to a
temporary file for reading, or written to one and uploaded with `upload` when the block
ends without an error.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from typing import IO, Any

from Utils.errors import UserError

_OBJECT_STORES = {"gs", "gcs", "s3", "s3a", "az", "abfs", "memory"}
_COPY_CHUNK = 16 << 20


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


class WriteError(UserError):
    """A file could not be written (disk full, quota, permissions, read-only filesystem...).

    Attributes:
        path: the file that was being written.
        errno: the operating system's error number (e.g. ``errno.ENOSPC``), or None.
    """

    def __init__(self, path: str, cause: OSError) -> None:
        self.path = path
        self.errno = cause.errno
        reason = cause.strerror or str(cause) or type(cause).__name__
        super().__init__(
            f"cannot write {path}: {reason}; free disk space or fix the folder's permissions "
            "(or write elsewhere), then rerun (train.py: add --resume)"
        )


def os_error_of(exc: BaseException) -> OSError | None:
    """The `OSError` behind an exception, following its cause/context chain (or None).

    Libraries re-raise write failures under their own types (``torch.save`` turns a full
    disk into a ``RuntimeError`` whose context is the ``OSError``).
    """
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, OSError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


_HDF5_WRITE_ERRNO = re.compile(r"write failed.*?errno = (\d+)", re.DOTALL)
# errors that only a write can cause: no space, quota, file too large, read-only filesystem
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


def write_error_of(exc: BaseException, path: str) -> WriteError | None:
    """A `WriteError` for `path` when `exc` comes from a failed write, else None.

    Recognises HDF5's reports of failed writes (h5py raises them as ``RuntimeError`` or
    ``OSError`` whose text holds ``file write failed ... errno = N``) and an `OSError` in the
    exception's chain whose error only a write can cause (disk full, quota, file too large,
    read-only filesystem).

    Args:
        exc: the exception raised while writing.
        path: the file being written (named in the message).
    """
    if isinstance(exc, WriteError):
        return exc
    if not isinstance(exc, Exception):
        return None
    found = _HDF5_WRITE_ERRNO.search(str(exc))
    if found and int(found.group(1)):
        number = int(found.group(1))
        return WriteError(path, OSError(number, os.strerror(number)))
    cause = os_error_of(exc)
    if cause is not None and cause.errno in _WRITE_ERRNOS:
        return WriteError(path, cause)
    return None


def current_umask() -> int:
    """The process's file-creation mask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no /proc: read by setting and restoring
    os.umask(mask)
    return mask


def atomic_write(
    path: str, write: Callable[[IO[bytes]], Any], before_commit: Callable[[], Any] | None = None
) -> None:
    """Writes a file so that it appears complete or not at all.

    A local file gets the permissions of any new file (0666 less the umask), not the 0600
    of its temporary file.

    Args:
        path: destination (local path or fsspec URL).
        write: called with a binary file object to fill.
        before_commit: called once the data is written, just before the file appears; an
            exception it raises drops the temporary file and nothing appears.

    Raises:
        WriteError: a local write failed (disk full...); no temporary file is left behind.
    """
    if is_url(path):
        fs, p = _fs(path)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        if protocol in _OBJECT_STORES:
            buf = io.BytesIO()
            write(buf)
            if before_commit is not None:
                before_commit()
            with fs.open(p, "wb") as f:
                f.write(buf.getvalue())
            return
        tmp = f"{p}.tmp-{os.getpid()}"
        try:
            with fs.open(tmp, "wb") as f:
                write(f)
            if before_commit is not None:
                before_commit()
            fs.mv(tmp, p)
        except BaseException:
            if fs.exists(tmp):
                fs.rm(tmp)
            raise
        return
    p = local_path(path)
    folder = os.path.dirname(os.path.abspath(p))
    tmp = ""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.", suffix=".tmp", dir=folder)
        os.fchmod(fd, 0o666 & ~current_umask())  # as open() would create it (security: ok)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if before_commit is not None:
            before_commit()
        os.replace(tmp, p)
    except BaseException as exc:
        if tmp and os.path.exists(tmp):
            os.remove(tmp)
        cause = os_error_of(exc)
        if cause is None or isinstance(exc, WriteError):
            raise
        raise WriteError(p, cause) from exc


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


def atomic_torch_save(obj: Any, path: str, before_commit: Callable[[], Any] | None = None) -> None:
    """`torch.save` to a temporary file, then renamed into place (see `atomic_write`)."""
    import torch

    atomic_write(path, lambda f: torch.save(obj, f), before_commit)


def upload(local: str, path: str) -> None:
    """Copies a local file to `path` (local or URL) so that it appears complete or not at all.

    Object stores get one put (an object only appears once its upload completes); other
    filesystems a temporary name and a move; local destinations `atomic_write`.

    Args:
        local: the local source file.
        path: the destination.
    """
    if not is_url(path):
        with open(local, "rb") as src:
            atomic_write(path, lambda f: shutil.copyfileobj(src, f, _COPY_CHUNK))
        return
    fs, p = _fs(path)
    parent = p.rsplit("/", 1)[0] if "/" in p else ""
    if parent:
        fs.makedirs(parent, exist_ok=True)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in _OBJECT_STORES:
        fs.put_file(local, p)
        return
    tmp = f"{p}.tmp-{os.getpid()}"
    try:
        fs.put_file(local, tmp)
        fs.mv(tmp, p)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


def download(path: str, local: str) -> None:
    """Copies `path` (local or URL) to a local file.

    Raises:
        FileNotFoundError: when `path` does not exist.
    """
    with open_read(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst, _COPY_CHUNK)


@contextlib.contextmanager
def local_file(path: str, mode: str = "r") -> Iterator[str]:
    """A local file standing for `path`, for libraries that need one (h5py).

    Local paths (and ``file://`` URLs) are yielded as they are. For other URLs:

    * ``"r"``: the file is downloaded to a temporary file, deleted afterwards;
    * ``"w"``: a temporary path (no file yet) is yielded; when the block ends without an
      exception the file is uploaded with `upload` (appearing complete or not at all);
    * ``"a"``: like "w", starting from a download of the existing file, if any.

    Args:
        path: local path or fsspec URL.
        mode: "r", "w" or "a".

    Yields:
        The local path to open.

    Raises:
        ValueError: unknown mode.
        FileNotFoundError: mode "r" and `path` does not exist.
    """
    if mode not in ("r", "w", "a"):
        raise ValueError(f"mode must be 'r', 'w' or 'a', got {mode!r}")
    if not is_url(path):
        yield local_path(path)
        return
    folder = tempfile.mkdtemp(prefix="nm-local-")
    local = os.path.join(folder, os.path.basename(path.rstrip("/")) or "file")
    try:
        if mode == "r" or (mode == "a" and exists(path)):
            download(path, local)
        yield local
        if mode != "r" and os.path.exists(local):
            upload(local, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
