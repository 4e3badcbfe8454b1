"""Hostile files and names: nothing in a run folder or a name runs code, damage is detected.

Real processes and real files: a crafted pickle (``os.system`` / ``builtins.exec`` in a
``__reduce__``) placed in ``ckpt/`` must not run under extract.py (with and without
``--skip-bad``), ``train.py --resume`` or ``--restore-path``; the proof is a marker file that
the payload would create. Flipped bits in a checkpoint's pickle or tensor bytes are caught by
the zip CRC-32. The shell scripts reject names outside the Python rule and quote what they
send to a remote shell.
"""

from __future__ import annotations

import builtins
import os
import pickle
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from Utils import ckptread, names
from Utils.checkpoint import FORMAT, checkpoint_dir, list_checkpoints, load_checkpoint
from Utils.errors import CorruptFileError
from Utils.training import train

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"
SMALL = {
    "dataset": "synthetic",
    "model": "logistic",
    "epochs": 1,
    "train_batch_size": 512,
    "test_batch_size": 1024,
    "lr": 0.05,
    "momentum": 0.9,
    "save_freq": 2,
    "deterministic": True,
    "no_progress": True,
    "experiment": "t",
}
FLAGS = ["--dataset", "synthetic", "--model", "logistic", "--epochs", "1"]
FLAGS += ["--train-batch-size", "512", "--test-batch-size", "1024", "--lr", "0.05"]
FLAGS += ["--momentum", "0.9", "--save-freq", "2", "--deterministic", "--no-progress"]


class _System:
    """Unpickles to ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Exec:
    """Unpickles to ``exec(code)``."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.exec, (self.code,))


def payload(kind: str, marker: Path) -> object:
    """An object whose unpickling creates `marker`."""
    if kind == "system":
        return _System(f"touch {marker}")
    return _Exec(f"open({str(marker)!r}, 'w').close()")


def craft(path: Path, kind: str, marker: Path, zipped: bool = True) -> None:
    """Writes a checkpoint-looking file that runs code when unpickled without an allowlist."""
    obj = {"format": FORMAT, "step": 99, "model": {}, "config": {}, "x": payload(kind, marker)}
    if zipped:
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj))


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    env["OMP_NUM_THREADS"] = "1"
    return env


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / name), *args],
        cwd=ROOT,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> str:
    """A small trained run (5 checkpoints)."""
    root = tmp_path_factory.mktemp("base")
    return train({**SMALL, "expid": "a", "save_dir": str(root)}).run_dir


def copy_run(run: str, tmp_path: Path) -> Path:
    dest = tmp_path / "t" / "a"
    shutil.copytree(run, dest)
    return dest


def where(run: Path) -> list[str]:
    return ["--save-dir", str(run.parent.parent), "--experiment", "t", "--expid", run.name]


# ----------------------------------------------------------------------------- safe loading


@pytest.mark.slow
@pytest.mark.parametrize("kind,zipped", [("system", True), ("exec", True), ("system", False)])
def test_extract_refuses_a_crafted_checkpoint(base_run, tmp_path, kind, zipped):
    run = copy_run(base_run, tmp_path)
    marker = tmp_path / "INJECTED"
    evil = Path(checkpoint_dir(str(run))) / "step_00000099.pt"
    craft(evil, kind, marker, zipped)
    out = run_script("extract.py", *where(run))
    assert not marker.exists(), "the checkpoint's code ran"
    assert out.returncode != 0
    line = one_line(out.stderr)
    assert str(evil) in line
    if zipped:
        assert ("posix.system" if kind == "system" else "builtins.exec") in line
    skip = run_script("extract.py", *where(run), "--skip-bad")
    assert not marker.exists(), "the checkpoint's code ran under --skip-bad"
    assert skip.returncode == 0, skip.stderr
    warned = [line for line in skip.stderr.splitlines() if line.startswith("warning")]
    assert len(warned) == 1 and str(evil) in warned[0] and "Traceback" not in skip.stderr
    if zipped:
        assert "refusing" in warned[0] or "system" in warned[0] or "exec" in warned[0]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["system", "exec"])
def test_resume_refuses_a_crafted_checkpoint(base_run, tmp_path, kind):
    run = copy_run(base_run, tmp_path)
    marker = tmp_path / "INJECTED"
    evil = Path(checkpoint_dir(str(run))) / "step_00000099.pt"
    craft(evil, kind, marker)
    out = run_script("train.py", *FLAGS, *where(run), "--resume")
    assert not marker.exists(), "the checkpoint's code ran"
    assert out.returncode != 0
    line = one_line(out.stderr)
    assert str(evil) in line and ("system" in line or "exec" in line)


@pytest.mark.slow
@pytest.mark.parametrize("zipped", [True, False])
def test_restore_path_refuses_a_crafted_file(tmp_path, zipped):
    marker = tmp_path / "INJECTED"
    evil = tmp_path / "weights.pt"
    craft(evil, "system", marker, zipped)
    out = run_script(
        "train.py", *FLAGS, "--save-dir", str(tmp_path), "--experiment", "t", "--expid", "r",
        "--restore-path", str(evil),
    )  # fmt: skip
    assert not marker.exists(), "the file's code ran"
    assert out.returncode != 0
    assert str(evil) in one_line(out.stderr)


def test_both_readers_use_one_allowlist(base_run, tmp_path):
    """The array reader and the torch loader refuse and accept the same globals."""
    evil = tmp_path / "e.pt"
    torch.save({"format": FORMAT, "f": _Eval("1")}, evil)
    for read in (ckptread.read_arrays, load_checkpoint):
        with pytest.raises(ckptread.UnsafeCheckpointError, match=r"e\.pt: .*builtins\.eval"):
            read(str(evil))
    good = list_checkpoints(base_run)[-1]
    a, b = ckptread.read_arrays(good), load_checkpoint(good)
    assert a["step"] == b["step"] and set(a["model"]) == set(b["model"])


class _Eval:
    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self):
        return (builtins.eval, (self.code,))


def test_checkpoints_need_no_global_outside_torchs_defaults(base_run):
    """New checkpoints store the numpy random state as plain values."""
    path = list_checkpoints(base_run)[-1]
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    assert isinstance(load_checkpoint(path)["rng"]["numpy"]["key"], list)


def test_old_checkpoints_with_a_numpy_random_state_still_load(base_run, tmp_path):
    ckpt = load_checkpoint(list_checkpoints(base_run)[-1])
    legacy = np.random.get_state()  # noqa: NPY002 (the tuple older versions stored)
    ckpt["rng"]["numpy"] = legacy
    old = tmp_path / "old.pt"
    torch.save(ckpt, old)
    for read in (ckptread.read_arrays, load_checkpoint):
        state = read(str(old))["rng"]["numpy"]
        assert state[0] == "MT19937" and np.array_equal(state[1], legacy[1])


# ----------------------------------------------------------------------------- CRC-32


def _flip_bit_in(path: Path, member_suffix: str, offset: int = 7) -> None:
    """Flips one bit inside the stored bytes of the zip member ending in `member_suffix`."""
    with zipfile.ZipFile(path) as archive:
        info = next(i for i in archive.infolist() if i.filename.endswith(member_suffix))
    with open(path, "r+b") as fh:
        fh.seek(info.header_offset + 26)
        lengths = np.frombuffer(fh.read(4), dtype="<u2")
        start = info.header_offset + 30 + int(lengths[0]) + int(lengths[1])
        fh.seek(start + offset)
        byte = fh.read(1)[0]
        fh.seek(start + offset)
        fh.write(bytes([byte ^ 0x10]))


@pytest.mark.slow
@pytest.mark.parametrize("member", ["data/0", "data.pkl"])
def test_a_flipped_bit_is_caught_by_the_crc(base_run, tmp_path, member):
    run = copy_run(base_run, tmp_path)
    bad = Path(list_checkpoints(str(run))[1])
    _flip_bit_in(bad, member, offset=7 if member == "data/0" else 60)
    with pytest.raises(CorruptFileError, match="CRC"):
        load_checkpoint(str(bad))
    out = run_script("extract.py", *where(run))
    assert out.returncode == 1
    line = one_line(out.stderr)
    assert str(bad) in line
    assert not (run / "features.h5").exists() or _sources(run).count(bad.name) == 0


def _sources(run: Path) -> list[str]:
    from Utils import storage

    with storage.open_features(str(run)) as f:
        return storage.read_sources(f)


# ----------------------------------------------------------------------------- names


def test_the_shell_scripts_use_the_python_name_rule():
    lib = (SCRIPTS / "lib.sh").read_text()
    found = re.search(r"^NM_NAME_RE='([^']*)'$", lib, re.MULTILINE)
    assert found and found.group(1) == names.NAME_PATTERN
    cases = ["run1", "lr0.1_wd1e-05", "a" * 100, "a" * 101, "", ".", "..", "-x", ".hidden"]
    cases += ["x;touch${IFS}INJECTED;", "a/b", "a b", "$(id)", "é"]
    for name in cases:
        shell = subprocess.run(
            ["bash", "-c", f'source {SCRIPTS / "lib.sh"}; nm_valid_name "$1"', "_", name],
            capture_output=True,
        )
        assert (shell.returncode == 0) == names.is_valid_run_name(name), name


def test_sync_gcloud_rejects_an_injected_name_and_quotes_remote_commands(tmp_path):
    evil = "x;touch${IFS}INJECTED;"
    for args in (["gs://b/r", "demo", evil], ["--tpu", "nm", "--zone", "z", "r", evil]):
        out = sync("--dry-run", *args, cwd=tmp_path)
        assert out.returncode == 2 and "INJECTED" in out.stderr and out.stdout == ""
    assert not (tmp_path / "INJECTED").exists()
    spaced = sync("--dry-run", "--tpu", "nm", "--zone", "z", "my results;x", "demo", "r1")
    assert spaced.returncode == 2 and "plain path" in spaced.stderr
    out = sync(
        "--dry-run", "--no-checkpoints", "--tpu", "nm", "--zone", "z", "nm/res", "demo", "r1"
    )
    assert out.returncode == 0, out.stderr
    ssh = next(line for line in out.stdout.splitlines() if " ssh " in line)
    assert (
        words_of(ssh)[-1]
        == "--command=tar -C nm/res/demo --exclude=ckpt -cf /tmp/nm-sync-r1.tar r1"
    )
    remote = words_of(ssh)[-1].split("=", 1)[1]
    assert (
        words_of(remote) == "tar -C nm/res/demo --exclude=ckpt -cf /tmp/nm-sync-r1.tar r1".split()
    )
    kill = subprocess.run(
        ["bash", str(SCRIPTS / "kill_all.sh"), "--dry-run", "--tpu", "nm", "--zone", "z",
         "--repo", "my repo", "a;b", "$(x)"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert kill.returncode == 0, kill.stderr
    remote = words_of(kill.stdout.strip())[-1].split("=", 1)[1]
    assert words_of(remote) == ["cd", "my repo", "&&", "scripts/kill_all.sh", "--signal", "TERM",
                                "a;b", "$(x)"]  # fmt: skip


def sync(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs scripts/sync_gcloud.sh."""
    return subprocess.run(
        ["bash", str(SCRIPTS / "sync_gcloud.sh"), *args], capture_output=True, text=True, cwd=cwd
    )


def words_of(line: str) -> list[str]:
    """The words a shell makes of `line` (quotes removed, nothing expanded or run)."""
    import shlex

    return shlex.split(line)


def test_lib_sh_passes_shellcheck():
    lint = subprocess.run(
        ["shellcheck", "--severity=style", str(SCRIPTS / "lib.sh")], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout
