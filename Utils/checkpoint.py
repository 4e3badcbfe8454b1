"""Dense checkpoints (atomic, optionally written in the background) and their schedules.

A run keeps one file per saved step in ``<run>/ckpt/step_00000120.pt`` (the step is also
stored inside; the run folder's other files: `Utils.rundir`). Each checkpoint is a dict
saved with ``torch.save``; see `CHECKPOINT_KEYS`.
"""

from __future__ import annotations

import collections
import math
import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from Utils import fileio
from Utils.ckptread import UnsafeCheckpointError, safe_torch_load
from Utils.errors import CorruptFileError, UserError
from Utils.rundir import CKPT_DIR

FORMAT = "neural-mechanics-checkpoint"
VERSION = 1
CKPT_PREFIX = "step_"
CKPT_SUFFIX = ".pt"

METRIC_NAMES = ("train_loss", "train_top1", "test_loss", "top1", "top5")  # ckpt["metrics"]

CHECKPOINT_KEYS = {
    "format": "the string FORMAT",
    "version": "format version (int)",
    "step": "optimizer updates done: the parameters are theta_step",
    "epoch": "epoch the next batch belongs to (int)",
    "batch": "index of the next batch within that epoch (int)",
    "epoch_float": "step / steps_per_epoch",
    "lr": "learning rate of the first parameter group for the next update",
    "config": "the run's hyperparameters (dict)",
    "model": "model.state_dict() (parameters and buffers such as BatchNorm statistics)",
    "optimizer": "optimizer.state_dict(); custom_sgd adds the per-group theory state under 'theory'",
    "budget": "Utils.budget.BudgetTracker.state_dict(): per-group symmetry-breaking budget sums",
    "param_names": "parameter names in the optimizer's order (maps optimizer state to names)",
    "scheduler": "lr scheduler state_dict",
    "rng": "python, numpy, torch (and cuda) random states",
    "metrics": "train_loss, train_top1, test_loss, top1, top5 (NaN where not evaluated at this step)",
    "running": "sums behind the running train loss since the last evaluation (for exact resume)",
}


def checkpoint_name(step: int) -> str:
    """File name of the checkpoint of `step` (zero-padded so names sort by step)."""
    return f"{CKPT_PREFIX}{step:08d}{CKPT_SUFFIX}"


def checkpoint_dir(run_dir: str) -> str:
    """The checkpoint folder of a run."""
    return fileio.join(run_dir, CKPT_DIR)


def list_checkpoints(run_dir: str) -> list[str]:
    """Paths of the checkpoint files of a run (temporary files excluded), in name order."""
    folder = checkpoint_dir(run_dir)
    names = [
        n
        for n in fileio.listdir(folder)
        if n.startswith(CKPT_PREFIX) and n.endswith(CKPT_SUFFIX) and not n.startswith(".")
    ]
    return [fileio.join(folder, n) for n in sorted(names)]


def load_checkpoint(
    path: str, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """Loads and checks one checkpoint, safely (`Utils.ckptread.safe_torch_load`).

    Args:
        path: the checkpoint file (local path or fsspec URL).
        map_location: as for ``torch.load``.
        mmap: memory-map a local file (tensors are read when touched).

    Raises:
        UnsafeCheckpointError: the file names a pickle global outside the allowlist.
        CorruptFileError: when the file is truncated, damaged (CRC-32), unreadable or not a
            checkpoint.
    """
    try:
        ckpt = safe_torch_load(path, map_location=map_location, mmap=mmap)
    except CorruptFileError:
        raise
    except Exception as exc:  # any unpickling/zip error means a damaged file
        raise CorruptFileError(
            f"checkpoint {path} is corrupt or truncated ({type(exc).__name__}); delete it, "
            "or pass --skip-bad to go on without it"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CorruptFileError(f"{path} is not a checkpoint written by train.py")
    return ckpt


def rng_state() -> dict[str, Any]:
    """Random states of python, numpy and torch (and CUDA when used).

    Only plain values and tensors, so that checkpoints load under the allowlist of
    `Utils.ckptread`: numpy's state is a dict of ints, a float and a list of ints.
    """
    kind, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": str(kind),
            "key": [int(k) for k in key],
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores `rng_state` output (also the numpy tuple of older checkpoints)."""
    random.setstate(state["python"])
    numpy_state = state["numpy"]
    if isinstance(numpy_state, dict):
        numpy_state = (
            numpy_state["bit_generator"],
            np.asarray(numpy_state["key"], dtype=np.uint32),
            int(numpy_state["pos"]),
            int(numpy_state["has_gauss"]),
            float(numpy_state["cached_gaussian"]),
        )
    np.random.set_state(numpy_state)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# leaf types returned as they are (immutable)
_ATOMS = (int, float, str, bytes, bool, type(None))


class _HostCopier:
    """Copies the tensors of a snapshot to the CPU, keeping shared storages shared.

    Tensors that view one storage (the theory state of `TrackingSGD`, tied weights) become
    views of one copy of it with their offsets and strides, so `torch.save` writes one record
    for them, as it would have for the originals; a view of part of a storage copies the
    whole storage, which is what `torch.save` writes for it too. CUDA tensors are copied
    asynchronously into pinned memory and each device is synchronised once in `finish` (one
    host-device sync per checkpoint instead of one per tensor).
    """

    def __init__(self) -> None:
        self.storages: dict[tuple, torch.UntypedStorage] = {}
        self.devices: set[torch.device] = set()

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """A CPU copy of t with its strides (asynchronous for CUDA until `finish`)."""
        if t.device.type == "cuda":
            try:
                out = torch.empty_like(t, device="cpu", pin_memory=True)
            except RuntimeError:  # no pinned memory here: a synchronous copy
                return t.to("cpu", copy=True)
            self.devices.add(t.device)
            return out.copy_(t, non_blocking=True)
        return t.to("cpu", copy=True)

    def tensor(self, t: torch.Tensor) -> torch.Tensor:
        """The CPU copy of one tensor."""
        t = t.detach()
        if t.device.type not in ("cpu", "cuda"):  # XLA and others have no visible storage
            return t.to("cpu", copy=True)
        storage = t.untyped_storage()
        if storage.nbytes() == 0:
            return self._copy(t)
        key = (t.device, storage.data_ptr())
        if key not in self.storages:
            if t.storage_offset() == 0 and t.nbytes == storage.nbytes():
                out = self._copy(t)  # covers its storage: the copy is the storage's copy
                if out.stride() == t.stride():
                    self.storages[key] = out.untyped_storage()
                return out
            whole = torch.empty(0, dtype=torch.uint8, device=t.device)
            whole.set_(storage)  # [nbytes] uint8 over the whole storage
            self.storages[key] = self._copy(whole).untyped_storage()
        view = torch.empty(0, dtype=t.dtype)
        return view.set_(self.storages[key], t.storage_offset(), t.size(), t.stride())

    def copy(self, obj: Any) -> Any:
        """Deep copy of nested dicts/lists/tuples with every tensor copied to the CPU."""
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, dict):
            return {k: self.copy(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            if all(type(v) in _ATOMS for v in obj):  # e.g. python's random state: 625 ints
                return list(obj) if isinstance(obj, list) else obj
            items = [self.copy(v) for v in obj]
            return items if isinstance(obj, list) else tuple(items)
        return obj

    def finish(self) -> None:
        """Waits for the asynchronous device-to-host copies."""
        for device in self.devices:
            torch.cuda.current_stream(device).synchronize()


def _to_cpu_copy(obj: Any) -> Any:
    """Deep copy of nested dicts/lists with every tensor copied to CPU (shared storages kept).

    Returns once every copy is complete, so the caller may change the originals.
    """
    copier = _HostCopier()
    out = copier.copy(obj)
    copier.finish()
    return out


def remove_temporaries(run_dir: str) -> list[str]:
    """Deletes the temporary files of killed checkpoint writers (``ckpt/.step_*.tmp``).

    Only the process holding the run's lock writes checkpoints, so every such file in a run
    it starts writing is a leftover. URL runs have none (objects appear whole).

    Returns:
        The removed paths.
    """
    if fileio.is_url(run_dir):
        return []
    folder = fileio.local_path(checkpoint_dir(run_dir))
    removed = []
    for name in fileio.listdir(folder):
        if name.startswith("." + CKPT_PREFIX) and name.endswith(".tmp"):
            os.remove(os.path.join(folder, name))
            removed.append(os.path.join(folder, name))
    return removed


class CheckpointWriter:
    """Saves checkpoints atomically, optionally in a background thread.

    The training loop hands over a snapshot (tensors copied to CPU at once, so training may
    go on changing them) and continues; a single writer thread serialises and writes files in
    order. `close()` waits until every file is complete and re-raises any write error;
    `abort()` (after an interrupt) drops the snapshots not yet started, lets the file being
    written complete and stops the thread.

    The hand-over is a list guarded by a lock. The training thread never waits on a
    condition (whose wait an interrupt can leave with its lock released): it polls, sleeping
    outside the lock; the writer thread's waits time out. So an interrupt at any point of
    `save` (even between queueing a snapshot and waking the thread) cannot leave `close` or
    `abort` waiting forever.

    Args:
        run_dir: the run folder.
        background: write in a thread (True) or synchronously.
        max_pending: snapshots allowed in the queue before `save` blocks (bounds memory).
        guard: called just before each file appears (e.g. `RunLock.check`); an exception it
            raises leaves that file unwritten and is re-raised to the training thread.
    """

    _POLL = 0.05  # seconds between re-checks of every wait

    def __init__(
        self,
        run_dir: str,
        background: bool = True,
        max_pending: int = 8,
        guard: Callable[[], Any] | None = None,
    ) -> None:
        self.run_dir = run_dir
        self.guard = guard
        self.background = background
        self.max_pending = max_pending
        self.bytes_written = 0
        self.files_written = 0
        self._error: BaseException | None = None
        fileio.makedirs(checkpoint_dir(run_dir))
        self.removed = remove_temporaries(run_dir)
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # waited on by the writer thread only
        self._items: collections.deque = collections.deque()
        self._busy = False
        self._stop = False
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._work, name="ckpt-writer", daemon=True)
            self._thread.start()

    def _write(self, step: int, payload: dict[str, Any]) -> None:
        path = fileio.join(checkpoint_dir(self.run_dir), checkpoint_name(step))
        fileio.atomic_torch_save(payload, path, self.guard)
        self.files_written += 1
        if not fileio.is_url(path):
            self.bytes_written += fileio.getsize(path)

    def _next(self) -> tuple[int, dict[str, Any]] | None:
        """The writer thread's next snapshot (None: stop)."""
        with self._cond:
            while not self._items:
                if self._stop:
                    return None
                self._cond.wait(self._POLL)
            self._busy = True
            return self._items.popleft()

    def _work(self) -> None:
        while True:
            item = self._next()
            if item is None:
                return
            try:
                if self._error is None:
                    self._write(*item)
            except BaseException as exc:  # reported by the training thread
                self._error = exc
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _raise_pending(self) -> None:
        if self._error is not None:
            err, self._error = self._error, None
            if isinstance(err, UserError):
                raise err
            raise UserError(
                f"writing a checkpoint in {self.run_dir} failed: {err}; free disk space or "
                "choose another --save-dir, then rerun with --resume"
            ) from None

    def save(self, step: int, payload: dict[str, Any]) -> None:
        """Queues (or writes) the checkpoint of `step`; tensors are copied before returning."""
        self._raise_pending()
        snapshot = _to_cpu_copy(payload)
        if self._thread is None:
            try:
                self._write(step, snapshot)
            except OSError as err:
                self._error = err
        else:
            while not self._offer((step, snapshot)):
                time.sleep(self._POLL)
        self._raise_pending()

    def _offer(self, item: tuple[int, dict[str, Any]]) -> bool:
        """Queues a snapshot if there is room (or the thread is gone); whether it did."""
        with self._lock:
            if len(self._items) >= self.max_pending and self._thread.is_alive():
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def _idle(self) -> bool:
        """Whether nothing is queued or being written (or the thread is gone)."""
        alive = self._thread is not None and self._thread.is_alive()
        return not alive or (not self._items and not self._busy)

    def flush(self) -> None:
        """Blocks until every queued checkpoint is on disk."""
        if self._thread is not None:
            while True:
                with self._lock:
                    if self._idle():
                        break
                time.sleep(self._POLL)
        self._raise_pending()

    def _stop_thread(self) -> None:
        if self._thread is not None:
            with self._lock:
                self._stop = True
                self._cond.notify_all()
            self._thread.join()
            self._thread = None

    def close(self) -> None:
        """Flushes and stops the writer thread."""
        try:
            self.flush()
        finally:
            self._stop_thread()

    def abort(self) -> None:
        """Drops the queued snapshots, waits for the file being written, stops the thread.

        Every file on disk is then complete: the run resumes from the newest one.
        """
        with self._lock:
            self._items.clear()
        self._stop_thread()
        self._error = None


def save_steps(
    total_steps: int, schedule: str = "linear", save_freq: int = 0, num_checkpoints: int = 0
) -> np.ndarray:
    """Steps at which checkpoints are written (always 0 and the last step).

    Args:
        total_steps: number of optimizer updates of the whole run.
        schedule: "linear" (every `save_freq` steps) or "log" (`num_checkpoints` steps spaced
            evenly in log(step + 1): dense early, sparse late).
        save_freq: spacing for the linear schedule; 0 saves only the first and last step.
        num_checkpoints: number of checkpoints for the log schedule.

    Returns:
        Sorted unique int64 array of steps in [0, total_steps].
    """
    if schedule == "linear":
        steps = np.arange(0, total_steps + 1, save_freq) if save_freq > 0 else np.array([0])
    elif schedule == "log":
        n = max(int(num_checkpoints), 2)
        steps = np.rint(np.expm1(np.linspace(0.0, math.log1p(total_steps), n))).astype(np.int64)
    else:
        raise ValueError(f"unknown save schedule {schedule!r}")
    return np.unique(np.concatenate([steps, [0, total_steps]]).astype(np.int64))


def latest_valid_checkpoint(
    run_dir: str, map_location: str | torch.device = "cpu"
) -> tuple[dict[str, Any] | None, list[str]]:
    """The newest checkpoint that loads, and the paths of newer ones that did not.

    Damaged files are skipped; a file refused by the allowlist stops the search (someone
    placed it there: resuming past it would hide that).

    Returns:
        (checkpoint or None, list of skipped corrupt paths, newest first).

    Raises:
        UnsafeCheckpointError: a checkpoint names a pickle global outside the allowlist.
    """
    skipped: list[str] = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(path, map_location), skipped
        except UnsafeCheckpointError:
            raise
        except CorruptFileError:
            skipped.append(path)
    return None, skipped
