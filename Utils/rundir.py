"""The run folder ``<save-dir>/<experiment>/<expid>/``: its names, paths, lock and hints.

Every script finds a run's files through `RunDir`; no other module spells their names::

    hyperparameters.json   every flag, library versions, git commit (train.py)
    groups.json            the detected symmetry groups with their violations (train.py)
    metrics.json           evaluation history (train.py)
    ckpt/step_*.pt         one file per saved step (train.py)
    features.h5            extract.py
    cache/<metric>.h5      cache.py
    figures/               plot.py
    .lock                  the process id of the train.py writing the run

Run names (``--experiment``, ``--expid``) are checked by `check_name` (the one rule of
`Utils.names`: a single plain folder name), so a run folder always lies inside ``--save-dir``
and ``--overwrite`` can only empty that folder.
"""

from __future__ import annotations

import errno
import os
import re
import sys
import tempfile
import time

from Utils import fileio
from Utils.errors import UserError
from Utils.names import validate_run_name

HYPERPARAMETERS = "hyperparameters.json"
GROUPS = "groups.json"
METRICS = "metrics.json"
CKPT_DIR = "ckpt"
FEATURES = "features.h5"
CACHE_DIR = "cache"
FIGURES_DIR = "figures"
LOCK = ".lock"
TAKEOVER_WAIT = 60.0  # seconds --overwrite waits for the run's previous writer to stop
# what train.py, extract.py, cache.py and plot.py write: all that --overwrite removes
OWNED = (HYPERPARAMETERS, GROUPS, METRICS, CKPT_DIR, FEATURES, CACHE_DIR, FIGURES_DIR)


def check_name(name: str, flag: str) -> str:
    """Checks a run name (`Utils.names.validate_run_name`: one plain folder name).

    Raises:
        UsageError: empty, too long, or with characters outside the rule (``..``, ``/``...).
    """
    return validate_run_name(name, flag)


def pid_alive(pid: int) -> bool:
    """Whether a process with this id runs on this machine (a zombie, which has ended but
    was not yet waited for by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the field after "(name)"
    except (OSError, IndexError):
        return True  # no /proc (macOS): the signal check above decides
    return state not in (b"Z", b"X")


class RunDir:
    """The folder of one run and the paths of its files.

    Args:
        save_dir: root folder (or fsspec URL) of all experiments.
        experiment: experiment name.
        expid: run id.
        check: validate the two names (`check_name`); False only for paths that already
            exist (e.g. a run given by its path).
    """

    def __init__(self, save_dir: str, experiment: str, expid: str, check: bool = True) -> None:
        if check:
            check_name(experiment, "--experiment")
            check_name(expid, "--expid")
        self.save_dir = str(save_dir)
        self.experiment = experiment
        self.expid = expid
        self.path = fileio.join(self.save_dir, experiment, expid)

    @classmethod
    def from_path(cls, path: str) -> RunDir:
        """The run of a folder path ``<save-dir>/<experiment>/<expid>``."""
        path = str(path).rstrip("/")
        expid = os.path.basename(path)
        experiment = os.path.basename(os.path.dirname(path))
        save_dir = os.path.dirname(os.path.dirname(path)) or "."
        return cls(save_dir, experiment, expid, check=False)

    def __str__(self) -> str:
        return self.path

    def file(self, name: str) -> str:
        """The path of an entry of the run folder."""
        return fileio.join(self.path, name)

    @property
    def hyperparameters(self) -> str:
        """``hyperparameters.json``."""
        return self.file(HYPERPARAMETERS)

    @property
    def groups(self) -> str:
        """``groups.json``."""
        return self.file(GROUPS)

    @property
    def metrics(self) -> str:
        """``metrics.json``."""
        return self.file(METRICS)

    @property
    def ckpt(self) -> str:
        """The checkpoint folder."""
        return self.file(CKPT_DIR)

    @property
    def features(self) -> str:
        """``features.h5``."""
        return self.file(FEATURES)

    @property
    def cache(self) -> str:
        """The cache folder."""
        return self.file(CACHE_DIR)

    @property
    def figures(self) -> str:
        """The figure folder."""
        return self.file(FIGURES_DIR)

    @property
    def lock(self) -> str:
        """The lock file (see `lock_path`)."""
        return lock_path(self.path)

    def command(self, script: str, *extra: str) -> str:
        """The command line of a script for this run: the "run this next" hint.

        Args:
            script: "train.py", "extract.py", "cache.py" or "plot.py".
            extra: further flags, appended as given.
        """
        parts = ["python", script, "--experiment", self.experiment, "--expid", self.expid]
        if self.save_dir != "results":
            parts += ["--save-dir", self.save_dir]
        return " ".join([*parts, *extra])

    def exists(self) -> bool:
        """Whether the folder exists."""
        return fileio.exists(self.path)

    def entries(self) -> list[str]:
        """Names in the folder, the lock and temporary files (``.*``) left out."""
        if not self.exists():
            return []
        return [n for n in fileio.listdir(self.path) if not n.startswith(".")]

    def remove_temporaries(self) -> list[str]:
        """Deletes temporary files of train.py's JSON files left by a killed writer.

        Only the process holding the run's lock writes them, so every such file is a leftover
        (``.metrics.json.<random>.tmp``...). URL runs have none (objects appear whole).

        Returns:
            The removed names.
        """
        if fileio.is_url(self.path) or not self.exists():
            return []
        prefixes = tuple(f".{name}." for name in (HYPERPARAMETERS, GROUPS, METRICS))
        removed = []
        for name in fileio.listdir(self.path):
            if name.startswith(prefixes) and name.endswith(".tmp"):
                fileio.remove(self.file(name))
                removed.append(name)
        return removed

    def clear(self) -> list[str]:
        """Removes what the scripts wrote (`OWNED`) and their temporary files (--overwrite).

        Other entries (a user's own files) are kept; nothing outside the folder is touched.

        Returns:
            The removed names.
        """
        removed = []
        for name in fileio.listdir(self.path) if self.exists() else []:
            temporary = name.startswith(".") and name.endswith(".tmp")
            if name in OWNED or temporary:
                _remove_retrying(self.file(name))
                removed.append(name)
        return removed


def _remove_retrying(path: str, attempts: int = 20) -> None:
    """`fileio.remove`, retried while a process that is stopping still adds a file to the
    folder being removed (ENOTEMPTY) or removes one itself (ENOENT)."""
    for attempt in range(attempts):
        try:
            fileio.remove(path)
            return
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.ENOENT) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def lock_path(run_dir: str) -> str:
    """The lock file of a run, which holds the PID of the process writing it.

    ``<run>/.lock`` for local runs; for URL runs (gs://, s3://) a local file named after the
    URL in ``$NM_LOCK_DIR`` (default ``<tmp>/neural-mechanics-locks``); "" for memory://
    runs, which live inside one process. scripts/kill_all.sh reads these files.
    """
    if not fileio.is_url(run_dir):
        return os.path.join(fileio.local_path(run_dir), LOCK)
    if run_dir.startswith("memory://"):
        return ""
    folder = os.environ.get("NM_LOCK_DIR") or os.path.join(
        tempfile.gettempdir(), "neural-mechanics-locks"
    )
    return os.path.join(folder, re.sub(r"[^A-Za-z0-9._-]+", "_", run_dir) + ".lock")


def lock_holder(path: str) -> int:
    """The process id in a lock file (0 when missing, empty or unreadable)."""
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def held_by_other(run_dir: str) -> int:
    """The id of another live process holding the run's lock, else 0."""
    path = lock_path(run_dir)
    holder = lock_holder(path) if path else 0
    if holder and holder != os.getpid() and pid_alive(holder):
        return holder
    return 0


class RunLock:
    """A lock file that stops two processes of this machine from writing the same run.

    A lock whose process is gone, or which is empty (a write that failed), is stale and
    taken over; if the lock cannot be written (disk full), no lock file is left behind.

    Args:
        run_dir: the run folder (see `lock_path` for where the lock lives).
        force: take the lock even if another live process holds it (--overwrite).

    Raises:
        UserError: another live process holds the run (without `force`).
        OSError: the lock cannot be written (naming the lock file).
    """

    def __init__(self, run_dir: str, force: bool = False) -> None:
        self.run_dir = run_dir
        self.path = lock_path(run_dir)
        self.taken_from = 0  # the live process this lock was taken from (--overwrite)
        if not self.path:
            return
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                holder = held_by_other(run_dir)
                if holder and not force:
                    raise UserError(
                        f"run {run_dir} is being written by process {holder}; wait for it, "
                        "choose another --expid, or pass --overwrite"
                    ) from None
                self.taken_from = holder
                os.remove(self.path)
                continue
            try:
                with os.fdopen(fd, "w") as f:
                    f.write(str(os.getpid()))
            except OSError as err:
                os.remove(self.path)
                raise OSError(err.errno, err.strerror, self.path) from None
            return

    def wait_for_previous(self, timeout: float = TAKEOVER_WAIT) -> bool:
        """Waits until the process the lock was taken from has stopped.

        That process notices the takeover within about a second (`check`) and stops writing.

        Returns:
            Whether it stopped (or there was none) within `timeout` seconds.
        """
        if not self.taken_from:
            return True
        deadline = time.monotonic() + timeout
        if pid_alive(self.taken_from):
            print(
                f"--overwrite: waiting for process {self.taken_from} to stop writing "
                f"{self.run_dir}",
                file=sys.stderr,
            )
        while pid_alive(self.taken_from):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def check(self) -> None:
        """Raises `UserError` when another process took the run over (``--overwrite``)."""
        if self.path and lock_holder(self.path) != os.getpid():
            raise UserError(
                f"run {self.run_dir} was taken over by another process (--overwrite); this "
                "process stops without writing to it"
            )

    def release(self) -> None:
        """Removes the lock if this process holds it."""
        if self.path and lock_holder(self.path) == os.getpid():
            os.remove(self.path)
