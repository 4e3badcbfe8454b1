"""Remote storage through fsspec: training into memory:// and file:// save dirs, atomic uploads."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import fsspec
import h5py
import numpy as np
import pytest
import torch

from Utils import fileio
from Utils.checkpoint import list_checkpoints, load_checkpoint
from Utils.errors import UserError
from Utils.training import lock_path, train

RUN = {
    "dataset": "synthetic",
    "model": "logistic",
    "epochs": 1,
    "train_batch_size": 1024,
    "test_batch_size": 1024,
    "lr": 0.05,
    "momentum": 0.9,
    "save_freq": 1,
    "save_buffers": "grad",
    "no_progress": True,
    "deterministic": True,
    "device": "cpu",
    "experiment": "t",
}


@pytest.fixture
def memory_root():
    """A fresh memory:// save dir, removed afterwards."""
    root = f"memory://nm-{uuid.uuid4().hex}/results"
    yield root
    fs = fsspec.filesystem("memory")
    bucket = root[len("memory://") :].split("/")[0]
    if fs.exists(f"/{bucket}"):
        fs.rm(f"/{bucket}", recursive=True)


def assert_same_checkpoints(paths_a: list[str], paths_b: list[str]) -> None:
    """Bitwise equal model, optimizer (theory included), metrics and steps."""
    assert [os.path.basename(p) for p in paths_a] == [os.path.basename(p) for p in paths_b]
    for x, y in zip(paths_a, paths_b):
        a, b = load_checkpoint(x), load_checkpoint(y)
        assert a["step"] == b["step"]
        for key in a["model"]:
            assert torch.equal(a["model"][key], b["model"][key]), (x, key)
        for group, fields in a["optimizer"]["theory"]["state"].items():
            for name, value in fields.items():
                assert torch.equal(value, b["optimizer"]["theory"]["state"][group][name])
        for i, state in a["optimizer"]["state"].items():
            assert torch.equal(state["grad"], b["optimizer"]["state"][i]["grad"])
        assert np.array_equal(
            np.array(list(a["metrics"].values())), np.array(list(b["metrics"].values())), True
        )


def test_training_into_memory_url_equals_local_run_and_resumes(memory_root, tmp_path):
    remote = train({**RUN, "expid": "a", "save_dir": memory_root})
    local = train({**RUN, "expid": "a", "save_dir": str(tmp_path)})
    assert remote.run_dir == f"{memory_root}/t/a" and remote.steps == local.steps == 4
    assert fileio.listdir(remote.run_dir) == [
        "ckpt",
        "groups.json",
        "hyperparameters.json",
        "metrics.json",
    ]
    remote_ckpts = list_checkpoints(remote.run_dir)
    assert all(p.startswith("memory://") for p in remote_ckpts) and len(remote_ckpts) == 5
    assert_same_checkpoints(remote_ckpts, list_checkpoints(local.run_dir))
    assert fileio.read_json(fileio.join(remote.run_dir, "metrics.json")) == fileio.read_json(
        os.path.join(local.run_dir, "metrics.json")
    )

    with pytest.raises(UserError, match="already exists"):
        train({**RUN, "expid": "a", "save_dir": memory_root})
    # interrupt after step 2, then resume: identical to the uninterrupted run
    for path in remote_ckpts:
        if load_checkpoint(path)["step"] > 2:
            fileio.remove(path)
    resumed = train({**RUN, "expid": "a", "save_dir": memory_root, "resume": True})
    assert resumed.steps == 4
    assert_same_checkpoints(list_checkpoints(remote.run_dir), list_checkpoints(local.run_dir))

    train({**RUN, "expid": "a", "save_dir": memory_root, "overwrite": True, "epochs": 0})
    assert [os.path.basename(p) for p in list_checkpoints(remote.run_dir)] == ["step_00000000.pt"]


def test_file_url_save_dir_writes_a_local_run(tmp_path):
    result = train({**RUN, "expid": "f", "save_dir": f"file://{tmp_path}", "save_freq": 0})
    run = tmp_path / "t" / "f"
    assert Path(result.run_dir) == run
    assert sorted(p.name for p in (run / "ckpt").iterdir()) == [
        "step_00000000.pt",
        "step_00000004.pt",
    ]
    assert not (run / ".lock").exists()


def test_lock_files_of_url_runs_live_in_the_lock_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NM_LOCK_DIR", str(tmp_path))
    assert lock_path(str(tmp_path / "run")) == str(tmp_path / "run" / ".lock")
    gs = lock_path("gs://bucket/results/t/a")
    assert os.path.dirname(gs) == str(tmp_path) and gs.endswith("bucket_results_t_a.lock")
    assert lock_path("memory://x/t/a") == ""


@pytest.mark.parametrize("scheme", ["memory", "local", "plain"])
def test_atomic_write_leaves_nothing_when_writing_fails(tmp_path, scheme, memory_root):
    target = {
        "memory": f"{memory_root}/f.bin",
        "local": f"local://{tmp_path}/f.bin",
        "plain": str(tmp_path / "f.bin"),
    }[scheme]

    def broken(f):
        f.write(b"half")
        raise OSError("disk full")

    # local writes report a fileio.WriteError (a UserError), URLs the OSError itself
    with pytest.raises((OSError, UserError), match="disk full"):
        fileio.atomic_write(target, broken)
    assert not fileio.exists(target)
    fileio.atomic_write(target, lambda f: f.write(b"whole"))
    with fileio.open_read(target) as f:
        assert f.read() == b"whole"
    if scheme != "memory":
        assert os.listdir(tmp_path) == ["f.bin"]  # no temporary file left


@pytest.mark.parametrize("scheme", ["memory", "local"])
def test_local_file_round_trips_hdf5_through_a_url(tmp_path, scheme, memory_root):
    url = {"memory": f"{memory_root}/run", "local": f"local://{tmp_path}/run"}[scheme]
    path = f"{url}/features.h5"
    with fileio.local_file(path, "w") as local:
        assert not fileio.exists(path)  # nothing visible before the block ends
        with h5py.File(local, "w") as f:
            f["steps"] = np.arange(3, dtype=np.int64)
    assert fileio.exists(path)
    with fileio.local_file(path, "a") as local:
        with h5py.File(local, "a") as f:
            f["lr"] = np.full(3, 0.1)
    with pytest.raises(RuntimeError, match="interrupted"):
        with fileio.local_file(path, "a") as local:
            with h5py.File(local, "a") as f:
                f["junk"] = np.zeros(2)
            raise RuntimeError("interrupted")
    with fileio.local_file(path, "r") as local:
        with h5py.File(local, "r") as f:
            assert sorted(f) == ["lr", "steps"]  # the failed append never reached the URL
            assert f["steps"][:].tolist() == [0, 1, 2]
    with pytest.raises(FileNotFoundError):
        with fileio.local_file(f"{url}/missing.h5", "r"):
            pass
    if scheme == "local":
        assert sorted(os.listdir(tmp_path / "run")) == ["features.h5"]


def test_local_file_passes_local_paths_through(tmp_path):
    with fileio.local_file(f"file://{tmp_path}/x.h5", "w") as local:
        assert local == f"{tmp_path}/x.h5"
    with pytest.raises(ValueError, match="mode"):
        with fileio.local_file(str(tmp_path / "x.h5"), "rw"):
            pass


def test_upload_and_download(tmp_path, memory_root):
    source = tmp_path / "src.bin"
    payload = os.urandom(1 << 16)
    source.write_bytes(payload)
    for target in (f"{memory_root}/a/b.bin", f"local://{tmp_path}/up/b.bin", str(tmp_path / "c")):
        fileio.upload(str(source), target)
        back = tmp_path / "back.bin"
        fileio.download(target, str(back))
        assert back.read_bytes() == payload
