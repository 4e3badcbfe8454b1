"""Faults lose nothing: kill -9 and resume, corrupt checkpoints, NaN losses, full disks, two writers.

Real subprocesses and real signals wherever a user would meet the fault:

* train.py is killed with SIGKILL at random moments (after checkpoints appear, so often while
  a checkpoint is being written), alternately with the background and the synchronous
  writer, and resumed with ``--resume`` each time; every checkpoint and metrics.json then
  equal an uninterrupted run's bitwise (CPU, ``--deterministic``). The same run then goes
  through extract.py and cache.py killed part-way and rerun; their files equal clean ones.
* Write failures are real OS errors (a file-size limit, ``RLIMIT_FSIZE``, makes writes fail
  with EFBIG exactly as a full disk fails them with ENOSPC) for the command lines, and an
  injected "disk full after N bytes" (the OS simulated below `Utils.fileio`) for the in-process
  checks that a run resumes to the same result after space is freed.
"""

from __future__ import annotations

import errno
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from Utils import fileio
from Utils.checkpoint import checkpoint_dir, list_checkpoints, load_checkpoint
from Utils.errors import UserError
from Utils.extraction import extract_run
from Utils.metrics import cache_run
from Utils.training import TrainingDivergedError, train

ROOT = Path(__file__).resolve().parent.parent

# The run that is killed: fc-bn (scale and translation groups, BatchNorm statistics), momentum,
# weight decay, an lr drop, the grad buffer, a checkpoint at every step (49 files).
KILL_CONFIG = {
    "dataset": "synthetic",
    "model": "fc-bn",
    "epochs": 3,
    "train_batch_size": 256,
    "test_batch_size": 1024,
    "lr": 0.05,
    "momentum": 0.9,
    "wd": 5e-4,
    "lr_drops": [2],
    "save_freq": 1,
    "save_buffers": "grad",
    "deterministic": True,
    "no_progress": True,
    "experiment": "t",
}
KILL_FLAGS = [
    "--dataset",
    "synthetic",
    "--model",
    "fc-bn",
    "--epochs",
    "3",
    "--train-batch-size",
    "256",
    "--test-batch-size",
    "1024",
    "--lr",
    "0.05",
    "--momentum",
    "0.9",
    "--wd",
    "5e-4",
    "--lr-drops",
    "2",
    "--save-freq",
    "1",
    "--save-buffers",
    "grad",
    "--deterministic",
    "--no-progress",
    "--experiment",
    "t",
]
# A small run for the in-process faults: 8 steps, a checkpoint at every step.
SMALL = {
    "dataset": "synthetic",
    "model": "logistic",
    "epochs": 1,
    "train_batch_size": 512,
    "test_batch_size": 1024,
    "lr": 0.05,
    "momentum": 0.9,
    "save_freq": 1,
    "deterministic": True,
    "no_progress": True,
    "experiment": "t",
}
COMPARED = ("step", "epoch", "batch", "lr", "param_names", "model", "optimizer", "scheduler")
COMPARED += ("metrics", "running", "rng")


# ----------------------------------------------------------------------------- helpers


def child_env() -> dict[str, str]:
    """The environment of the scripts: the user's, one thread."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def script(name: str, *args: str, limit_bytes: int = 0) -> list[str]:
    """The command line of a script; with `limit_bytes`, under a file-size limit.

    The limit is set by a tiny launcher that ignores SIGXFSZ and then execs the script, so a
    write beyond the limit fails with EFBIG (as a full disk fails with ENOSPC).
    """
    cmd = [sys.executable, str(ROOT / name), *args]
    if not limit_bytes:
        return cmd
    launcher = (
        "import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
        "os.execv(sys.argv[1], sys.argv[1:])"
    )
    return [sys.executable, "-c", launcher, *cmd]


def run_script(name: str, *args: str, limit_bytes: int = 0) -> subprocess.CompletedProcess:
    """Runs a script to the end."""
    return subprocess.run(
        script(name, *args, limit_bytes=limit_bytes),
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def start_script(name: str, *args: str, log: Path) -> subprocess.Popen:
    """Starts a script in the background; its stderr goes to `log`."""
    with open(log, "ab") as err:
        return subprocess.Popen(
            script(name, *args),
            cwd=ROOT,
            env=child_env(),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def one_line(stderr: str) -> str:
    """The single non-empty stderr line of a failed command (no traceback)."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def kill_when(proc: subprocess.Popen, ready: Callable[[], bool], delay: float) -> bool:
    """SIGKILLs `proc` `delay` seconds after `ready()` holds; False if it ended first."""
    deadline = time.monotonic() + 240
    while proc.poll() is None and not ready():
        assert time.monotonic() < deadline, "the process made no progress"
        time.sleep(0.002)
    time.sleep(delay)
    if proc.poll() is not None:
        return False
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def visible(folder: Path) -> set[str]:
    """Names in a folder that do not start with '.' (temporaries and the lock do)."""
    return {n for n in os.listdir(folder) if not n.startswith(".")} if folder.is_dir() else set()


def hidden(folder: Path) -> list[str]:
    """Temporary files in a folder (names starting with '.', the lock excepted)."""
    if not folder.is_dir():
        return []
    return sorted(n for n in os.listdir(folder) if n.startswith(".") and n != ".lock")


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Name -> (size, mtime in ns) of the files directly in a folder (empty if none)."""
    if not folder.is_dir():
        return {}
    out = {}
    for entry in os.scandir(folder):
        try:
            if entry.is_file():
                st = entry.stat()
                out[entry.name] = (st.st_size, st.st_mtime_ns)
        except FileNotFoundError:  # renamed or removed while listing
            continue
    return out


def assert_equal_nested(a, b, where: str = "") -> None:
    """Bitwise equality of checkpoint structures (tensors, arrays, numbers, strings; NaN == NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f"), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_equal_nested(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def assert_same_checkpoints(run: str, ref: str) -> None:
    """Same checkpoint names and, in each, bitwise the same training state."""
    mine, theirs = list_checkpoints(run), list_checkpoints(ref)
    assert [os.path.basename(p) for p in mine] == [os.path.basename(p) for p in theirs]
    for p, q in zip(mine, theirs):
        a, b = load_checkpoint(p), load_checkpoint(q)
        for key in COMPARED:
            assert_equal_nested(a[key], b[key], f"{os.path.basename(p)}:{key}")


def h5_contents(path: Path, skip_attrs: tuple[str, ...] = ()) -> dict:
    """Every dataset (as arrays) and attribute of an HDF5 file, keyed by path."""
    out: dict = {}
    with h5py.File(path, "r") as f:

        def visit(name: str, obj) -> None:
            for key, value in obj.attrs.items():
                out[f"{name}@{key}"] = np.asarray(value)
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[()]

        f.visititems(visit)
        for key, value in f.attrs.items():
            if key not in skip_attrs:
                out[f"@{key}"] = np.asarray(value)
    return out


def assert_same_h5(a: Path, b: Path, skip_attrs: tuple[str, ...] = ()) -> None:
    """Two HDF5 files hold the same datasets and attributes (NaN == NaN)."""
    x, y = h5_contents(a, skip_attrs), h5_contents(b, skip_attrs)
    assert sorted(x) == sorted(y), (a, b)
    for key in x:
        u, v = np.asarray(x[key]), np.asarray(y[key])
        assert u.dtype == v.dtype and u.shape == v.shape, key
        assert np.array_equal(u, v, equal_nan=u.dtype.kind == "f"), key


def metrics_equal(a: list[dict], b: list[dict]) -> bool:
    """metrics.json histories equal (NaN == NaN)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if set(x) != set(y):
            return False
        for k in x:
            if x[k] != y[k] and not (x[k] != x[k] and y[k] != y[k]):
                return False
    return True


# ----------------------------------------------------------------------------- kill -9


@pytest.fixture(scope="module")
def killed_training(tmp_path_factory) -> dict:
    """An uninterrupted run and the same run killed three times and resumed until done."""
    save = tmp_path_factory.mktemp("kill")
    ref = train({**KILL_CONFIG, "expid": "ref", "save_dir": str(save)})
    run = save / "t" / "k"
    ckpt = run / "ckpt"
    log = save / "train.log"
    rng = random.Random(20240601)
    kills: list[dict] = []
    launches = 0
    while True:
        args = ["--save-dir", str(save), "--expid", "k", *KILL_FLAGS]
        args += ["--resume"] if launches else []
        args += ["--sync-save"] if launches % 2 else []
        proc = start_script("train.py", *args, log=log)
        launches += 1
        if len(kills) < 3:
            before = visible(ckpt)
            wanted = rng.randint(1, 8)
            delay = rng.uniform(0.0, 0.1)
            if kill_when(proc, lambda b=before, w=wanted: len(visible(ckpt) - b) >= w, delay):
                lock = (run / ".lock").read_text() if (run / ".lock").exists() else ""
                kills.append({"pid": proc.pid, "lock": lock, "files": len(visible(ckpt))})
                continue
        code = proc.wait(timeout=300)
        assert code == 0, log.read_text()
        break
    return {"ref": ref.run_dir, "run": str(run), "kills": kills, "launches": launches}


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_checkpoints(killed_training):
    run, ref = killed_training["run"], killed_training["ref"]
    kills = killed_training["kills"]
    assert len(kills) == 3 and killed_training["launches"] == 4
    # a killed process leaves its lock behind; the next one (--resume) takes it over
    assert all(k["lock"] == str(k["pid"]) for k in kills), kills
    assert not os.path.exists(os.path.join(run, ".lock"))
    assert_same_checkpoints(run, ref)
    mine = json.loads(Path(run, "metrics.json").read_text())
    theirs = json.loads(Path(ref, "metrics.json").read_text())
    assert [m["step"] for m in mine] == [0, 16, 32, 48]
    assert metrics_equal(mine, theirs), (mine, theirs)


@pytest.mark.slow
def test_killed_training_leaves_no_temporary_files(killed_training):
    """Temporary checkpoint files of killed writers are removed by the next --resume."""
    assert hidden(Path(killed_training["run"], "ckpt")) == []


@pytest.fixture(scope="module")
def killed_pipeline(killed_training, tmp_path_factory) -> dict:
    """extract.py and cache.py on the killed run, each killed twice part-way then rerun."""
    ref, run = killed_training["ref"], killed_training["run"]
    extract_run(ref, progress=False)
    cache_run(ref, progress=False)
    save = os.path.dirname(os.path.dirname(run))
    args = ["--save-dir", save, "--experiment", "t", "--expid", "k", "--no-progress"]
    log = tmp_path_factory.mktemp("pipeline") / "pipeline.log"
    rng = random.Random(7)
    kills = {"extract.py": 0, "cache.py": 0}
    features = Path(run, "features.h5")
    cache = Path(run, "cache")

    def forget(name: str) -> None:
        """A run that ended before its kill starts again from nothing (to be killed)."""
        if name == "extract.py":
            features.unlink()
        else:
            shutil.rmtree(cache)

    for name, folder, delay in (("extract.py", Path(run), 0.1), ("cache.py", cache, 0.3)):
        for _ in range(8):
            proc = start_script(name, *args, log=log)
            if kills[name] < 2:
                # killed a random moment after it first changes its folder
                at_launch = folder_state(folder)

                def ready(f: Path = folder, s: dict = at_launch) -> bool:
                    return folder_state(f) != s

                if kill_when(proc, ready, rng.uniform(0.0, delay)):
                    kills[name] += 1
                    continue
                assert proc.returncode == 0, log.read_text()
                forget(name)
                continue
            assert proc.wait(timeout=300) == 0, log.read_text()
            break
    return {"ref": ref, "run": run, "kills": kills}


@pytest.mark.slow
def test_killed_extraction_and_cache_equal_clean_ones(killed_pipeline):
    ref, run = Path(killed_pipeline["ref"]), Path(killed_pipeline["run"])
    assert killed_pipeline["kills"] == {"extract.py": 2, "cache.py": 2}
    # the stored config names the run (expid): everything else is equal
    assert_same_h5(run / "features.h5", ref / "features.h5", skip_attrs=("hyperparameters",))
    assert sorted(visible(run / "cache")) == sorted(visible(ref / "cache"))
    assert hidden(run / "cache") == [] and hidden(run) == [] and visible(run) == visible(ref)
    for name in sorted(visible(ref / "cache")):
        assert_same_h5(run / "cache" / name, ref / "cache" / name)


# ----------------------------------------------------------------------------- corrupt files


@pytest.fixture(scope="module")
def small_reference(tmp_path_factory) -> str:
    """A finished small run (9 checkpoints) to compare resumed runs with."""
    save = tmp_path_factory.mktemp("small")
    return train({**SMALL, "expid": "ref", "save_dir": str(save)}).run_dir


def test_resume_skips_corrupt_checkpoints_and_says_which(small_reference, tmp_path, capfd):
    run = os.path.join(tmp_path, "t", "c")
    shutil.copytree(small_reference, run)
    paths = list_checkpoints(run)
    truncated, zeroed = paths[-1], paths[-2]  # a killed copy and a lost tail (power cut)
    with open(truncated, "r+b") as fh:
        fh.truncate(os.path.getsize(truncated) // 2)
    size = os.path.getsize(zeroed)
    with open(zeroed, "r+b") as fh:
        fh.seek(size - 4096)
        fh.write(bytes(4096))
    capfd.readouterr()
    train({**SMALL, "expid": "c", "save_dir": str(tmp_path), "resume": True})
    err = capfd.readouterr().err
    skipped = [line for line in err.splitlines() if "skipping corrupt checkpoint" in line]
    assert [line.split()[-1] for line in skipped] == [truncated, zeroed], err
    assert "resuming" in err and "at step 6" in err
    assert_same_checkpoints(run, small_reference)


def test_resume_removes_temporaries_of_a_killed_writer(small_reference, tmp_path):
    run = os.path.join(tmp_path, "t", "c")
    shutil.copytree(small_reference, run)
    stale = Path(checkpoint_dir(run), ".step_00000008.pt.k2j4x9.tmp")
    stale.write_bytes(b"half a checkpoint")
    train({**SMALL, "expid": "c", "save_dir": str(tmp_path), "resume": True})
    assert not stale.exists()
    assert_same_checkpoints(run, small_reference)


# ----------------------------------------------------------------------------- NaN


def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
    config = {**SMALL, "model": "fc", "lr": 1e6, "momentum": 0.0, "save_dir": str(tmp_path)}
    with pytest.raises(TrainingDivergedError) as info:
        train({**config, "expid": "nan"})
    err = info.value
    assert err.exit_code == 3 and "\n" not in str(err) and "--allow-nan" in str(err)
    step = int(str(err).split(" at step ")[1].split()[0])
    run = os.path.join(tmp_path, "t", "nan")
    ckpts = [load_checkpoint(p) for p in list_checkpoints(run)]
    assert [c["step"] for c in ckpts] == list(range(step + 1))
    for c in ckpts[:-1]:  # the states before the divergent step are all finite
        assert all(torch.isfinite(v).all() for v in c["model"].values() if v.is_floating_point())
    assert [m["step"] for m in json.loads(Path(run, "metrics.json").read_text())] == [0]
    assert not os.path.exists(os.path.join(run, ".lock"))
    done = train({**config, "expid": "allowed", "allow_nan": True})
    assert done.steps == 8
    last = load_checkpoint(list_checkpoints(done.run_dir)[-1])
    assert last["step"] == 8


# ----------------------------------------------------------------------------- full disk


class _Disk:
    """Free space shared by every file written through the injected writer."""

    def __init__(self, free: int) -> None:
        self.free = free


class _FillingFile:
    """A binary file whose writes fail with ENOSPC once `disk` is full (part is written)."""

    def __init__(self, f, disk: _Disk) -> None:
        self._f = f
        self._disk = disk

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if view.nbytes > self._disk.free:
            self._f.write(view[: self._disk.free])
            self._disk.free = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._disk.free -= view.nbytes
        return self._f.write(view)

    def __getattr__(self, name: str):
        return getattr(self._f, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()


def fill_disk_after(monkeypatch, free: int) -> None:
    """Makes every binary file opened by `Utils.fileio` fail once `free` bytes are written."""
    disk = _Disk(free)
    real = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        f = real(fd, mode, *args, **kwargs)
        return _FillingFile(f, disk) if "w" in mode and "b" in mode else f

    monkeypatch.setattr(fileio.os, "fdopen", fdopen)


@pytest.mark.parametrize("where", ["checkpoint", "checkpoint-sync", "hyperparameters"])
def test_disk_full_is_one_error_and_resume_completes_the_run(
    small_reference, tmp_path, monkeypatch, where
):
    ckpt_size = os.path.getsize(list_checkpoints(small_reference)[0])
    free = 100 if where == "hyperparameters" else int(3.5 * ckpt_size) + 8000
    config = {**SMALL, "expid": "full", "save_dir": str(tmp_path)}
    config["sync_save"] = where == "checkpoint-sync"
    fill_disk_after(monkeypatch, free)
    with pytest.raises(UserError) as info:
        train(config)
    message = str(info.value)
    assert "\n" not in message and "No space left on device" in message, message
    assert "free disk space" in message
    run = Path(tmp_path, "t", "full")
    # nothing partial: every visible file is complete, no temporaries, no lock
    assert hidden(run) == [] and hidden(run / "ckpt") == []
    assert not (run / ".lock").exists()
    written = list_checkpoints(str(run))
    for path in written:
        load_checkpoint(path)
    for name in visible(run) - {"ckpt"}:
        json.loads((run / name).read_text())
    monkeypatch.undo()  # space freed
    if where == "hyperparameters":
        assert not (run / "hyperparameters.json").exists() and written == []
        train(config)  # the same command again
    else:
        assert 1 <= len(written) <= 4
        train({**config, "resume": True})
    assert_same_checkpoints(str(run), small_reference)


# ----------------------------------------------------------------------------- command lines


@pytest.fixture(scope="module")
def small_extracted(small_reference, tmp_path_factory) -> str:
    """A copy of the small run, extracted."""
    save = tmp_path_factory.mktemp("small-extracted")
    run = os.path.join(save, "t", "x")
    shutil.copytree(small_reference, run)
    extract_run(run, progress=False)
    return run


@pytest.mark.slow
def test_command_line_faults(small_reference, small_extracted, tmp_path):
    """Real write failures (file-size limit) and a NaN loss through the scripts, side by side."""
    save = str(tmp_path)
    for name in ("ex", "ca"):
        shutil.copytree(small_extracted if name == "ca" else small_reference, tmp_path / "t" / name)
    (tmp_path / "t" / "ex" / "features.h5").unlink(missing_ok=True)
    where = ["--save-dir", save, "--experiment", "t"]
    features_size = os.path.getsize(Path(small_extracted, "features.h5"))
    jobs = {
        "train": (
            "train.py",
            [*where, "--expid", "tr", "--dataset", "synthetic", "--model", "fc-bn"]
            + ["--epochs", "1", "--train-batch-size", "1024", "--save-freq", "1"],
            200_000,  # a checkpoint of fc-bn is about 550 kB
        ),
        "nan": (
            "train.py",
            [*where, "--expid", "nan", "--dataset", "synthetic", "--model", "fc", "--lr", "1e6"]
            + ["--epochs", "1", "--train-batch-size", "512", "--save-freq", "1"],
            0,
        ),
        "extract": ("extract.py", [*where, "--expid", "ex"], features_size // 3),
        "cache": ("cache.py", [*where, "--expid", "ca"], 2_000),
    }
    with ThreadPoolExecutor(2) as pool:
        futures = {
            k: pool.submit(run_script, s, *a, limit_bytes=lim) for k, (s, a, lim) in jobs.items()
        }
        out = {k: f.result() for k, f in futures.items()}
    for key in ("train", "extract", "cache"):
        line = one_line(out[key].stderr)
        assert out[key].returncode == 1, (key, line)
        assert "File too large" in line and "free disk space" in line, line
    run = tmp_path / "t"
    assert list_checkpoints(str(run / "tr")) == [] and hidden(run / "tr" / "ckpt") == []
    assert not (run / "tr" / ".lock").exists()
    assert visible(run / "ex") == visible(Path(small_reference)) and hidden(run / "ex") == []
    assert not (run / "ca" / "cache").exists() or os.listdir(run / "ca" / "cache") == []
    line = one_line(out["nan"].stderr)
    assert out["nan"].returncode == 3 and " at step " in line and "--allow-nan" in line, line


@pytest.mark.slow
def test_second_writer_is_refused_unless_overwrite(tmp_path):
    """A live train.py holds the run: --resume of the same run is refused; --overwrite takes it."""
    save = str(tmp_path)
    where = ["--save-dir", save, "--experiment", "t", "--expid", "a", "--dataset", "synthetic"]
    long_run = [*where, "--model", "fc-bn", "--epochs", "100", "--train-batch-size", "64"]
    run = tmp_path / "t" / "a"
    first = start_script("train.py", *long_run, "--save-freq", "0", log=tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 240
        while not (run / "ckpt" / "step_00000000.pt").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert (run / ".lock").read_text() == str(first.pid)
        second = run_script("train.py", *long_run, "--resume")
        line = one_line(second.stderr)
        assert second.returncode == 1 and str(first.pid) in line and "--overwrite" in line, line
        assert first.poll() is None, "the first run ended before the check"
        third = run_script(
            "train.py", *where, "--model", "logistic", "--epochs", "1", "--overwrite"
        )
        assert third.returncode == 0, third.stderr
        # the first process notices that its run was taken over and stops writing to it
        first.wait(timeout=20)
        assert first.returncode == 1, (tmp_path / "first.log").read_text()
        assert "--overwrite" in (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    configs = {load_checkpoint(p)["config"]["model"] for p in list_checkpoints(str(run))}
    assert configs == {"logistic"}
    assert json.loads((run / "hyperparameters.json").read_text())["config"]["model"] == "logistic"


# ----------------------------------------------------------------------------- run names


def assert_refused(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """A command refused with one line holding every needle and the exit status `code`."""
    line = one_line(result.stderr)
    assert result.returncode == code, (result.returncode, line)
    for needle in needles:
        assert needle in line, (needle, line)
    return line


def tree(root: Path) -> dict[str, int]:
    """Relative path -> size of every file (-1: folder) under a folder."""
    return {
        str(p.relative_to(root)): p.stat().st_size if p.is_file() else -1
        for p in sorted(root.rglob("*"))
    }


def test_run_names_are_validated_and_overwrite_stays_inside_the_run(tmp_path):
    """--expid .., ., ../../x, an absolute --experiment, empty or too long names: refused."""
    save = tmp_path / "save"
    for name in ("t/other/ckpt/step_00000000.pt", "t/other/hyperparameters.json", "mine.txt"):
        (save / name).parent.mkdir(parents=True, exist_ok=True)
        (save / name).write_text("keep me")
    outside = tmp_path / "abs"
    before = tree(tmp_path)
    quick = ["--dataset", "synthetic", "--model", "logistic", "--epochs", "1", "--no-progress"]
    where = ["--save-dir", str(save)]
    cases = [
        ("train.py", [*where, "--experiment", "t", "--expid", "..", "--overwrite", *quick]),
        ("train.py", [*where, "--experiment", "t", "--expid", ".", "--overwrite", *quick]),
        ("train.py", [*where, "--experiment", "t", "--expid", "../../x", *quick]),
        ("train.py", [*where, "--experiment", str(outside), "--expid", "a", *quick]),
        ("train.py", [*where, "--experiment", "", "--expid", "a", *quick]),
        ("train.py", [*where, "--experiment", "t", "--expid", "x" * 300, *quick]),
        ("extract.py", [*where, "--experiment", "t", "--expid", ""]),
        ("cache.py", [*where, "--experiment", "t", "--expid", ".."]),
        ("plot.py", [*where, "--experiment", "..", "--expid", "a"]),
    ]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: run_script(c[0], *c[1]), cases))
    for (_, args), result in zip(cases, results):
        flag = "--experiment" if args[args.index("--experiment") + 1] in ("", "..") else "--expid"
        if args[args.index("--experiment") + 1] == str(outside):
            flag = "--experiment"
        assert_refused(result, 2, flag)
    assert tree(tmp_path) == before, "a refused command wrote or deleted files"
    assert not outside.exists() and not (tmp_path / "x").exists()


def test_overwrite_removes_only_what_the_scripts_wrote(small_reference, tmp_path):
    run = tmp_path / "t" / "o"
    shutil.copytree(small_reference, run)
    (run / "notes.txt").write_text("my notes")
    (run / "ckpt" / ".step_00000009.pt.x.tmp").write_bytes(b"half")
    train({**SMALL, "expid": "o", "save_dir": str(tmp_path), "overwrite": True})
    assert (run / "notes.txt").read_text() == "my notes"
    assert hidden(run / "ckpt") == []
    assert_same_checkpoints(str(run), small_reference)


# ----------------------------------------------------------------------------- interrupts


INTERRUPT_SAVE = r"""
import linecache, os, sys, threading
sys.path.insert(0, sys.argv[1])
from Utils.checkpoint import CheckpointWriter, list_checkpoints, load_checkpoint
import torch

folder, limit = sys.argv[2], int(sys.argv[3])
watched = ("checkpoint.py", "queue.py", "threading.py")
copying = {"copy", "tensor", "_copy", "finish", "_to_cpu_copy", "<dictcomp>", "<listcomp>"}


def inject(at):
    count = [0]

    def local(frame, event, arg):
        if event != "line" or frame.f_code.co_name in copying:
            return local
        # a `with` line is also reported when the block is left, before __exit__ runs; a
        # signal cannot arrive there (no eval-breaker check), an injected exception can
        if linecache.getline(frame.f_code.co_filename, frame.f_lineno).strip().startswith("with "):
            return local
        count[0] += 1
        if count[0] == at:
            raise KeyboardInterrupt
        return local

    def glob(frame, event, arg):
        return local if frame.f_code.co_filename.endswith(watched) else None

    return glob, count


payload = {"format": "neural-mechanics-checkpoint", "version": 1, "step": 0,
           "model": {"w": torch.ones(3, 3)}}
reached = 0
for at in range(1, limit):
    run = os.path.join(folder, str(at))
    writer = CheckpointWriter(run, background=True)
    tracer, count = inject(at)
    sys.settrace(tracer)
    try:
        writer.save(1, dict(payload, step=1))
        interrupted = False
    except KeyboardInterrupt:
        interrupted = True
    finally:
        sys.settrace(None)
    if interrupted:
        writer.abort()
    writer.close()  # must return: neither call may wait forever
    for path in list_checkpoints(run):
        load_checkpoint(path)
    left = [n for n in os.listdir(os.path.join(run, "ckpt")) if n.startswith(".")]
    assert not left, (at, left)
    if not interrupted:
        reached = at
        break
print("reached", reached, flush=True)
"""


def test_interrupt_anywhere_in_checkpoint_save_never_hangs(tmp_path):
    """Ctrl-C at every line of CheckpointWriter.save (and the queue code it calls): no hang.

    An interrupt is injected at the N-th line run by save and the threading/queue code it
    calls (the tensor copies aside) for N = 1, 2, ... until save completes
    uninterrupted; after each, the writer must close within seconds, leaving only complete
    checkpoint files and no temporaries.
    """
    done = subprocess.run(
        [sys.executable, "-c", INTERRUPT_SAVE, str(ROOT), str(tmp_path), "3000"],
        capture_output=True,
        text=True,
        timeout=240,
        env=child_env(),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 10, done.stdout


LONG_RUN = ["--dataset", "synthetic", "--model", "logistic", "--epochs", "200"]
LONG_RUN += ["--train-batch-size", "64", "--save-freq", "1", "--no-progress"]


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_ctrl_c_end_the_run_cleanly_and_it_resumes(tmp_path, sig, code):
    """A signal while checkpoints are written: one line, exit 130/143 within seconds, the lock
    released, no temporary files, and --resume continues the run."""
    where = ["--save-dir", str(tmp_path), "--experiment", "t", "--expid", "s"]
    run = tmp_path / "t" / "s"
    log = tmp_path / "train.log"
    proc = start_script("train.py", *where, *LONG_RUN, log=log)
    try:
        deadline = time.monotonic() + 240
        while len(visible(run / "ckpt")) < 3:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, sig)
        returncode = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert "Traceback" not in log.read_text() and len(lines) == 1, lines
    assert returncode == code and "--resume" in lines[0], (returncode, lines)
    assert not (run / ".lock").exists()
    assert hidden(run) == [] and hidden(run / "ckpt") == []
    steps = [load_checkpoint(p)["step"] for p in list_checkpoints(str(run))]
    assert steps == list(range(len(steps)))
    # 64 steps per epoch; --epochs may change on --resume: end the run soon after the signal
    epochs = str(max(steps) // 64 + 1)
    resumed = run_script(
        "train.py", *where, *LONG_RUN[:4], "--epochs", epochs, *LONG_RUN[6:], "--resume"
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {max(steps)}" in resumed.stderr


# ----------------------------------------------------------------------------- --resume


@pytest.fixture
def resumable(small_reference, tmp_path) -> tuple[Path, list[str]]:
    """A copy of the small run cut after step 5, and the command line that resumes it."""
    run = tmp_path / "t" / "r"
    shutil.copytree(small_reference, run)
    for path in list_checkpoints(str(run)):
        if load_checkpoint(path)["step"] > 5:
            os.remove(path)
    flags = ["--save-dir", str(tmp_path), "--experiment", "t", "--expid", "r", "--resume"]
    return run, flags


@pytest.mark.parametrize(
    "name, content",
    [
        ("groups.json", '[{"kind": "scale",'),
        ("groups.json", '{"not": "a list"}'),
        ("metrics.json", '[{"step": 0,'),
        ("metrics.json", "[1, 2]"),
        ("metrics.json", '[{"epoch": 0}]'),
        ("metrics.json", '{"step": 3}'),
    ],
)
def test_resume_with_damaged_json_is_one_line(resumable, name, content):
    run, flags = resumable
    (run / name).write_text(content)
    assert_refused(run_script("train.py", *flags), 1, name)
    assert not (run / ".lock").exists()


def test_resume_refuses_edited_hyperparameters_and_changed_flags(resumable):
    run, flags = resumable
    path = run / "hyperparameters.json"
    original = path.read_text()
    edited = json.loads(original)
    edited["config"]["lr"] = 0.07
    path.write_text(json.dumps(edited))
    assert_refused(run_script("train.py", *flags), 1, "hyperparameters.json", "lr=0.07")
    path.write_text(original)
    changed = run_script("train.py", *flags, "--lr", "0.5", "--model", "fc", "--epochs", "1")
    assert_refused(changed, 2, "--lr 0.5", "--model 'fc'", "--epochs")
    assert "--epochs 1 " not in changed.stderr  # --epochs may change: not among the refused
    assert path.read_text() == original
    assert list_checkpoints(str(run))[-1].endswith("step_00000005.pt")


def test_resume_extends_a_run_with_more_epochs_and_records_it(resumable):
    run, flags = resumable
    done = run_script("train.py", *flags, "--epochs", "2")
    assert done.returncode == 0, done.stderr
    steps = [load_checkpoint(p)["step"] for p in list_checkpoints(str(run))]
    assert steps == list(range(17))
    stored = json.loads((run / "hyperparameters.json").read_text())
    assert stored["config"]["epochs"] == 2
    assert [c["changed"] for c in stored["changes"]] == [{"epochs": [1, 2]}]
    assert stored["changes"][0]["step"] == 5
    report = extract_run(str(run), progress=False)  # one run despite the changed --epochs
    assert report.rows == 17


def test_resume_takes_the_machine_flags_of_the_command_line(resumable, tmp_path):
    """--resume --data-dir X trains from X (it used to take the stored data folder)."""
    run, flags = resumable
    other = str(tmp_path / "elsewhere")
    train({**SMALL, "expid": "r", "save_dir": str(tmp_path), "resume": True, "data_dir": other})
    configs = [load_checkpoint(p)["config"] for p in list_checkpoints(str(run))]
    assert [c["data_dir"] for c in configs[6:]] == [other] * 3


# ----------------------------------------------------------------------------- run folder


def test_lock_that_cannot_be_written_is_removed_and_named(tmp_path):
    """A full disk at start (file-size limit): one line naming the lock; a rerun succeeds."""
    where = ["--save-dir", str(tmp_path), "--experiment", "t", "--expid", "d"]
    quick = ["--dataset", "synthetic", "--model", "logistic", "--epochs", "1"]
    quick += ["--train-batch-size", "1024", "--no-progress"]
    full = run_script("train.py", *where, *quick, limit_bytes=1)
    line = assert_refused(full, 1, "File too large", ".lock", "free disk space")
    assert str(tmp_path / "t" / "d" / ".lock") in line
    assert not (tmp_path / "t" / "d" / ".lock").exists()
    again = run_script("train.py", *where, *quick)
    assert again.returncode == 0, again.stderr


def test_run_killed_before_its_first_checkpoint_is_rerun_or_resumed(small_reference, tmp_path):
    """What a kill before step 0's checkpoint leaves (hyperparameters, groups, an empty ckpt/
    and the dead process's lock) is accepted by the same command and by --resume."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for expid in ("again", "resume"):
        run = tmp_path / "t" / expid
        shutil.copytree(small_reference, run)
        for path in list_checkpoints(str(run)):
            os.remove(path)
        (run / "metrics.json").unlink()
        (run / ".lock").write_text(str(dead.pid))
    where = ["--save-dir", str(tmp_path), "--experiment", "t"]
    small = ["--dataset", "synthetic", "--model", "logistic", "--epochs", "1"]
    small += ["--train-batch-size", "512", "--test-batch-size", "1024", "--lr", "0.05"]
    small += ["--momentum", "0.9", "--save-freq", "1", "--deterministic", "--no-progress"]
    again = run_script("train.py", *where, "--expid", "again", *small)
    assert again.returncode == 0, again.stderr
    resumed = run_script("train.py", *where, "--expid", "resume", "--resume")
    assert resumed.returncode == 0, resumed.stderr
    for expid in ("again", "resume"):
        assert_same_checkpoints(str(tmp_path / "t" / expid), small_reference)


def test_duplicate_lr_drops_and_abbreviated_sweep_flags_are_refused(tmp_path):
    drops = run_script(
        "train.py", "--save-dir", str(tmp_path), "--expid", "x", "--epochs", "2",
        "--dataset", "synthetic", "--lr-drops", "1", "1",
    )  # fmt: skip
    assert_refused(drops, 2, "--lr-drops", "twice")
    for flag in ("--expi", "--exp", "--save", "--l", "--w"):
        sweep = run_script(
            "scripts/sweep.py", "--save-dir", str(tmp_path), "--lrs", "0.1", "--dry-run",
            "--", flag, "X",
        )  # fmt: skip
        assert_refused(sweep, 2, flag, "set by the sweep")
    assert not any(tmp_path.iterdir())


def test_resume_removes_temporaries_of_the_json_files(small_reference, tmp_path):
    """A kill while metrics.json (or another JSON file) is being written leaves its temporary
    file; the next --resume removes it."""
    run = Path(tmp_path, "t", "j")
    shutil.copytree(small_reference, run)
    stale = [run / ".metrics.json.ooo42yf4.tmp", run / ".hyperparameters.json.x1.tmp"]
    for path in stale:
        path.write_text("[{")
    (run / "notes.tmp").write_text("mine")
    train({**SMALL, "expid": "j", "save_dir": str(tmp_path), "resume": True})
    assert hidden(run) == [] and (run / "notes.tmp").exists()


# ----------------------------------------------------------------------------- takeover


def test_a_zombie_process_is_not_alive():
    """A child that ended but was not yet waited for (a zombie) no longer holds a run."""
    from Utils.rundir import pid_alive

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 60
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert not pid_alive(child.pid)
        assert pid_alive(os.getpid())
    finally:
        child.wait()


def test_overwrite_waits_for_the_previous_writer(tmp_path):
    """--overwrite takes the lock of a live process, then waits (up to a limit) until it ends."""
    from Utils.rundir import RunLock

    for seconds, timeout, stopped in ((0.5, 60.0, True), (60.0, 0.3, False)):
        holder = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
        try:
            (tmp_path / ".lock").write_text(str(holder.pid))
            with pytest.raises(UserError, match="--overwrite"):
                RunLock(str(tmp_path))
            lock = RunLock(str(tmp_path), force=True)
            assert lock.taken_from == holder.pid
            assert (tmp_path / ".lock").read_text() == str(os.getpid())
            assert lock.wait_for_previous(timeout) is stopped
            assert (holder.poll() is not None) is stopped
            lock.release()
        finally:
            holder.kill()
            holder.wait()


def test_a_taken_over_writer_publishes_no_checkpoint(tmp_path):
    """A checkpoint writer whose run was taken over leaves no file, not even a temporary."""
    from Utils.checkpoint import CheckpointWriter
    from Utils.rundir import RunLock

    run = str(tmp_path / "run")
    for background in (True, False):
        lock = RunLock(run)
        writer = CheckpointWriter(run, background=background, guard=lock.check)
        writer.save(0, {"w": torch.ones(3)})
        writer.flush()
        (tmp_path / "run" / ".lock").write_text("1")  # another process took the run over
        with pytest.raises(UserError, match="taken over"):
            writer.save(1, {"w": torch.zeros(3)})
            writer.close()
        writer.abort()
        assert sorted(os.listdir(tmp_path / "run" / "ckpt")) == ["step_00000000.pt"]
        shutil.rmtree(tmp_path / "run")


def test_clear_retries_while_a_stopping_writer_adds_a_file(tmp_path, monkeypatch):
    """Emptying a run folder survives a file that appears while its ckpt/ is being removed."""
    from Utils.rundir import RunDir

    run = tmp_path / "e" / "r"
    (run / "ckpt").mkdir(parents=True)
    (run / "ckpt" / "step_00000000.pt").write_bytes(b"x")
    (run / "mine.txt").write_text("keep me")
    real = shutil.rmtree
    calls = []

    def racing_rmtree(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 1:  # as a stopping writer would: a new file lands mid-removal
            (Path(path) / ".step_00000001.pt.abc.tmp").write_bytes(b"y")
            raise OSError(errno.ENOTEMPTY, "Directory not empty", str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", racing_rmtree)
    removed = RunDir(str(tmp_path), "e", "r").clear()
    assert removed == ["ckpt"] and len(calls) == 2
    assert sorted(os.listdir(run)) == ["mine.txt"]


def test_an_interrupt_that_breaks_an_import_is_an_interrupt(capsys):
    """Ctrl-C while numpy (or torch) is being imported surfaces as an ImportError (numpy:
    "PyCapsule_Import could not import module datetime"): still exit 130 and one line."""
    import signal

    from Utils.flags import main_wrapper

    def main(argv):
        try:
            signal.raise_signal(signal.SIGINT)  # arrives inside the import
        except KeyboardInterrupt:
            raise ImportError('PyCapsule_Import could not import module "datetime"') from None
        return 0

    def broken(argv):
        raise ImportError("no module named nothing")  # no interrupt: a real error stays one

    assert main_wrapper(main, [], interrupted="interrupted; rerun") == 130
    assert capsys.readouterr().err.strip().splitlines() == ["interrupted; rerun"]
    with pytest.raises(ImportError, match="nothing"):
        main_wrapper(broken, [])
