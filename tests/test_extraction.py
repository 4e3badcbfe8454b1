"""extract.py and Utils/extraction.py, Utils/storage.py on real checkpoints of tiny runs.

Runs are built with the project's own pieces (a BatchNorm MLP, `Utils.symmetry.detect`, the
custom_sgd optimizer with buffers, `CheckpointWriter`), so the checkpoints have the real layout,
theory state included. One test trains with train.py's library entry point.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

import extract
from Utils import storage
from Utils.checkpoint import (
    CheckpointWriter,
    checkpoint_dir,
    list_checkpoints,
    load_checkpoint,
    rng_state,
)
from Utils.ckptread import read_arrays
from Utils.errors import CorruptFileError, UserError
from Utils.extraction import (
    LOCK_NAME,
    extract_run,
    measure_throughput,
    theory_arrays,
)
from Utils.groups import groups_from_json
from Utils.optimizers import build_optimizer
from Utils.symmetry import detect

ROOT = Path(__file__).resolve().parent.parent
METRICS = ("train_loss", "train_top1", "test_loss", "top1", "top5")


# ----------------------------------------------------------------------------- helpers


def build_run(
    save_dir: Path,
    expid: str,
    save_at: list[int],
    *,
    experiment: str = "t",
    width: int = 8,
    seed: int = 0,
    buffers: tuple[str, ...] = ("grad", "update"),
    dtype: torch.dtype = torch.float32,
) -> str:
    """Trains a tiny BatchNorm MLP with custom_sgd and saves checkpoints at `save_at`."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(6, width),
            bn=nn.BatchNorm1d(width),
            act1=nn.ReLU(),
            fc2=nn.Linear(width, width),
            act2=nn.ReLU(),
            head=nn.Linear(width, 3),
        )
    ).to(dtype)
    x = torch.randn(96, 6, dtype=dtype)  # [B, D]
    y = torch.randint(0, 3, (96,))  # [B]
    groups = detect(model, x[:32], y[:32], loss="ce")
    named = list(model.named_parameters())
    opt = build_optimizer(
        "custom_sgd", named, lr=0.1, momentum=0.9, weight_decay=5e-4, groups=groups, buffers=buffers
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5], gamma=0.5)
    config = {
        "experiment": experiment,
        "expid": expid,
        "save_dir": str(save_dir),
        "model": f"tiny-bn-{width}",
        "seed": seed,
        "lr": 0.1,
        "momentum": 0.9,
        "wd": 5e-4,
        "device": "cpu",
    }
    run_dir = str(save_dir / experiment / expid)
    writer = CheckpointWriter(run_dir, background=False)
    loss_fn = nn.CrossEntropyLoss()
    for step in range(max(save_at) + 1):
        if step in save_at:
            metrics = dict.fromkeys(METRICS, math.nan)
            if step % 3 == 0:
                metrics.update(train_loss=1.0 / (step + 1), test_loss=2.0 + step, top1=0.5)
                del metrics["top5"]  # a checkpoint without a metric key: NaN in the file
            writer.save(
                step,
                {
                    "format": "neural-mechanics-checkpoint",
                    "version": 1,
                    "step": step,
                    "epoch": step // 4,
                    "batch": step % 4,
                    "epoch_float": step / 4,
                    "lr": float(opt.param_groups[0]["lr"]),
                    "config": config,
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "param_names": [n for n, _ in named],
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(),
                    "metrics": metrics,
                    "running": {"loss_sum": 0.0, "top1_sum": 0.0, "count": 0},
                },
            )
        i = (step * 32) % 96
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x[i : i + 32]), y[i : i + 32]).backward()
        opt.step()
        sched.step()
    writer.close()
    return run_dir


def features_of(run_dir: str) -> dict[str, np.ndarray]:
    """Every dataset of a features file cut to its valid rows, plus the root attributes."""
    out: dict[str, np.ndarray] = {}
    with storage.open_features(run_dir) as f:
        n = storage.num_rows(f)

        def visit(name: str, obj) -> None:
            if isinstance(obj, h5py.Dataset):
                out[name] = obj[:n] if name != storage.STEPS else storage.read_steps(f)

        f.visititems(visit)
        for key, value in f.attrs.items():
            out[f"@{key}"] = np.asarray(value)
    return out


def assert_same_features(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    """Every dataset and attribute equal (NaN equal to NaN), bitwise."""
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert np.array_equal(x, y, equal_nan=x.dtype.kind == "f"), key


def run_extract(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """extract.py in a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / "extract.py"), *args, "--no-progress"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def cli(run_dir: str) -> list[str]:
    """--save-dir/--experiment/--expid of a run folder."""
    p = Path(run_dir)
    return ["--save-dir", str(p.parent.parent), "--experiment", p.parent.name, "--expid", p.name]


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> str:
    """A run with 7 checkpoints whose file names sort in reverse step order."""
    run_dir = build_run(tmp_path_factory.mktemp("runs"), "a", [0, 1, 2, 4, 5, 7, 9])
    folder = checkpoint_dir(run_dir)
    for name in os.listdir(folder):
        os.rename(os.path.join(folder, name), os.path.join(folder, "x" + name))
    for name in os.listdir(folder):
        step = int(load_checkpoint(os.path.join(folder, name))["step"])
        os.rename(os.path.join(folder, name), os.path.join(folder, f"step_{100 - step:08d}.pt"))
    return run_dir


def copy_run(run_dir: str, dest: Path) -> str:
    """A copy of a run folder (checkpoints and everything else)."""
    target = dest / Path(run_dir).parent.name / Path(run_dir).name
    shutil.copytree(run_dir, target)
    return str(target)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_is_bitwise_and_ordered_by_inside_step(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    report = extract_run(run, progress=False)
    ckpts = sorted((load_checkpoint(p) for p in list_checkpoints(run)), key=lambda c: c["step"])
    names_by_step = {
        int(load_checkpoint(p)["step"]): os.path.basename(p) for p in list_checkpoints(run)
    }
    assert [int(c["step"]) for c in ckpts] == [0, 1, 2, 4, 5, 7, 9]
    assert list(names_by_step) == [9, 7, 5, 4, 2, 1, 0]  # file name order is reversed
    assert report.extracted == report.rows == 7 and report.complete and not report.skipped
    with storage.open_features(run) as f:
        assert storage.num_rows(f) == 7
        assert storage.read_steps(f).tolist() == [0, 1, 2, 4, 5, 7, 9]
        assert storage.read_sources(f) == [names_by_step[int(c["step"])] for c in ckpts]
        assert storage.is_complete(f)
        assert storage.read_hyperparameters(f) == ckpts[0]["config"]
        groups = storage.read_groups(f)
        assert [g.key for g in groups] == [
            g.key for g in groups_from_json(ckpts[-1]["optimizer"]["theory"]["groups"])
        ]
        assert "bn.num_batches_tracked" not in storage.param_names(f)
        assert {"bn.running_mean", "bn.running_var", "fc1.weight"} <= set(storage.param_names(f))
        assert set(storage.buffer_names(f)) == {"momentum_buffer", "grad", "update"}
        np.testing.assert_array_equal(storage.read_epochs(f), [c["epoch_float"] for c in ckpts])
        np.testing.assert_array_equal(storage.read_lr(f), [c["lr"] for c in ckpts])
        for i, ckpt in enumerate(ckpts):
            for name, tensor in ckpt["model"].items():
                if tensor.is_floating_point():
                    got = storage.read_param(f, name, rows=i)
                    assert got.dtype == tensor.numpy().dtype
                    assert np.array_equal(got, tensor.numpy()), (name, i)
            state = ckpt["optimizer"]["state"]
            for index, pname in enumerate(ckpt["param_names"]):
                for buf in ("momentum_buffer", "grad", "update"):
                    got = storage.read_buffer(f, buf, pname, rows=i)
                    if index in state and buf in state[index]:
                        assert np.array_equal(got, state[index][buf].numpy()), (buf, pname, i)
                    else:
                        assert np.isnan(got).all()  # step 0: no optimizer state yet
            theory = ckpt["optimizer"]["theory"]
            for key, fields in theory["state"].items():
                for name, tensor in fields.items():
                    got = storage.read_theory(f, key, name, rows=i)
                    assert got.dtype == np.float64 and np.array_equal(got, tensor.numpy())
                assert storage.read_theory(f, key, "time", rows=i) == theory["time"][key]
            for name in METRICS:
                want = ckpt["metrics"].get(name, math.nan)
                got = storage.read_metric(f, name, rows=i)
                assert (math.isnan(want) and math.isnan(got)) or got == want
        assert storage.theory_keys(f) == list(ckpts[-1]["optimizer"]["theory"]["state"])
        assert np.isnan(storage.read_metric(f, "top5")).all()
        assert storage.read_metric(f, "top1")[0] == 0.5


def test_theory_arrays_reads_the_optimizer_layout(base_run):
    ckpt = load_checkpoint(list_checkpoints(base_run)[0])
    theory = ckpt["optimizer"]["theory"]
    arrays = theory_arrays(theory)
    assert list(arrays) == list(theory["state"])
    for key, fields in arrays.items():
        assert set(fields) == {*theory["state"][key], "time"}
        assert fields["time"].shape == () and fields["time"] == theory["time"][key]
        for name, tensor in theory["state"][key].items():
            assert fields[name].dtype == np.float64
            assert np.array_equal(fields[name], tensor.numpy())


def test_array_reader_matches_torch_load(tmp_path):
    """The torch-free reader returns what torch.load returns, views and bfloat16 included."""
    base = torch.arange(24, dtype=torch.float64).reshape(4, 6)
    payload = {
        "format": "neural-mechanics-checkpoint",
        "step": 3,
        "model": {
            "t": base.t(),  # non-contiguous view
            "slice": base[1:3, 2:],  # offset view sharing the storage
            "bf16": torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16),
            "half": torch.tensor([0.5, 7.0], dtype=torch.float16),
            "count": torch.tensor(7),
            "empty": torch.zeros(0, 3),
        },
        "rng": rng_state(),
    }
    path = tmp_path / "c.pt"
    torch.save(payload, path)
    got = read_arrays(str(path))
    assert got["step"] == 3
    for name, tensor in payload["model"].items():
        want = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        assert got["model"][name].dtype == want.numpy().dtype, name
        assert np.array_equal(got["model"][name], want.numpy()), name
    assert np.array_equal(got["rng"]["torch"], payload["rng"]["torch"].numpy())


# ----------------------------------------------------------------------------- reruns


def test_rerun_appends_only_new_checkpoints(tmp_path):
    run = build_run(tmp_path / "r", "a", [0, 2, 4, 6, 8, 10])
    folder = checkpoint_dir(run)
    late = sorted(os.listdir(folder))[3:]
    parked = tmp_path / "parked"
    parked.mkdir()
    for name in late:  # first extraction sees steps 0, 2, 4 only
        shutil.move(os.path.join(folder, name), parked / name)
    first = extract_run(run, progress=False)
    assert first.extracted == 3
    before = features_of(run)
    again = extract_run(run, progress=False)
    assert again.extracted == 0 and again.rows == 3 and not again.rebuilt
    assert_same_features(before, features_of(run))
    for name in late:
        shutil.move(parked / name, os.path.join(folder, name))
    third = extract_run(run, progress=False)
    assert third.extracted == 3 and third.rows == 6 and not third.rebuilt
    clean = copy_run(run, tmp_path / "clean")
    os.remove(storage.features_path(clean))
    extract_run(clean, progress=False)
    assert_same_features(features_of(run), features_of(clean))


def test_older_new_checkpoint_rebuilds_with_a_warning(tmp_path, capsys):
    run = build_run(tmp_path / "r", "a", [0, 3, 6, 9])
    folder = checkpoint_dir(run)
    name = sorted(os.listdir(folder))[1]  # step 3
    shutil.move(os.path.join(folder, name), tmp_path / name)
    extract_run(run, progress=False)
    shutil.move(tmp_path / name, os.path.join(folder, name))
    capsys.readouterr()
    report = extract_run(run, progress=False)
    err = capsys.readouterr().err
    assert report.rebuilt and "rebuilding" in err and name in err
    with storage.open_features(run) as f:
        assert storage.read_steps(f).tolist() == [0, 3, 6, 9]
    assert not os.path.exists(storage.features_path(run) + ".tmp")


def test_overwrite_rebuilds_atomically(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    extract_run(run, progress=False)
    before = features_of(run)
    report = extract_run(run, overwrite=True, progress=False)
    assert report.rebuilt and report.extracted == 7
    assert_same_features(before, features_of(run))
    assert not os.path.exists(storage.features_path(run) + ".tmp")


def test_leftover_rows_are_never_returned_and_are_completed(base_run, tmp_path):
    """A file left by a killed extraction: extra uncommitted rows and a torn /steps commit."""
    run = copy_run(base_run, tmp_path)
    extract_run(run, progress=False)
    clean = features_of(run)
    path = storage.features_path(run)
    with h5py.File(path, "r+") as f:  # drop the last 3 rows as if never committed
        f["steps"].resize(4, axis=0)
    writer = storage.FeaturesWriter.open(path)
    assert writer.rows == 4
    writer.prepare([], new_rows=3)  # datasets now hold 7 rows, /steps 4
    writer.close()
    with h5py.File(path, "r+") as f:  # a torn commit: /steps longer, values not written
        f["steps"].resize(6, axis=0)
        f["steps"][4:6] = -1
    with storage.open_features(run) as f:
        assert f["params/fc1.weight"].shape[0] == 7 and f["steps"].shape[0] == 6
        assert storage.num_rows(f) == 4
        assert storage.read_steps(f).tolist() == [0, 1, 2, 4]
        assert storage.read_param(f, "fc1.weight").shape[0] == 4
        assert storage.read_param(f, "fc1.weight", rows=slice(2, None)).shape[0] == 2
        assert storage.read_param(f, "fc1.weight", rows=slice(None, None, -1)).shape[0] == 4
        assert storage.read_metric(f, "test_loss").shape == (4,)
        assert storage.read_theory(f, storage.theory_keys(f)[0], "time").shape == (4,)
        assert storage.read_buffer(f, "grad", "fc1.weight", rows=[3, 0, 3]).shape[0] == 3
        np.testing.assert_array_equal(
            storage.read_param(f, "fc1.weight", rows=-1), clean["params/fc1.weight"][3]
        )
        mask = np.array([True, False, True, False])
        assert storage.read_param(f, "fc2.bias", rows=mask).shape[0] == 2
        for bad in (4, 6, -5, [1, 4], np.ones(7, dtype=bool)):
            with pytest.raises(IndexError):
                storage.read_param(f, "fc1.weight", rows=bad)
    report = extract_run(run, progress=False)
    assert report.extracted == 3 and not report.rebuilt
    assert_same_features(clean, features_of(run))
    with h5py.File(path, "r") as f:
        assert f["params/fc1.weight"].shape[0] == 7 and f["steps"].shape[0] == 7


def test_damaged_features_file_is_rebuilt_with_a_warning(base_run, tmp_path, capsys):
    run = copy_run(base_run, tmp_path)
    extract_run(run, progress=False)
    clean = features_of(run)
    path = storage.features_path(run)
    with open(path, "r+b") as fh:  # wipe the superblock
        fh.write(b"\0" * 64)
    with pytest.raises(CorruptFileError, match="--overwrite"):
        storage.open_features(run)
    capsys.readouterr()
    report = extract_run(run, progress=False)
    assert report.rebuilt and "rebuilding" in capsys.readouterr().err
    assert_same_features(clean, features_of(run))


# ----------------------------------------------------------------------------- errors


def test_corrupt_checkpoint_is_named_and_skip_bad_skips_it(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    bad = list_checkpoints(run)[2]
    size = os.path.getsize(bad)
    with open(bad, "r+b") as fh:
        fh.truncate(size // 2)
    result = run_extract(*cli(run))
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert bad in line and "--skip-bad" in line
    assert not os.path.exists(storage.features_path(run))  # nothing half-written
    with pytest.raises(CorruptFileError, match=os.path.basename(bad)):
        extract_run(run, progress=False)
    result = run_extract(*cli(run), "--skip-bad")
    assert result.returncode == 0, result.stderr
    assert "warning" in result.stderr and bad in result.stderr
    assert "Traceback" not in result.stderr
    with storage.open_features(run) as f:
        assert storage.num_rows(f) == 6 and not storage.is_complete(f)
        assert os.path.basename(bad) not in storage.read_sources(f)


def test_corrupt_checkpoint_keeps_what_was_extracted(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    extract_run(run, progress=False)
    before = features_of(run)
    dest = os.path.join(checkpoint_dir(run), "step_00000011.pt")
    shutil.copy(list_checkpoints(run)[0], dest)
    with open(dest, "r+b") as fh:
        fh.truncate(1000)
    with pytest.raises(CorruptFileError, match="step_00000011.pt"):
        extract_run(run, progress=False)
    assert_same_features(before, features_of(run))


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert extract.main(["--save-dir", str(tmp_path), "--experiment", "e", "--expid", "x"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "no run at" in line and "--save-dir" in line
    (tmp_path / "e" / "empty").mkdir(parents=True)
    assert extract.main(["--save-dir", str(tmp_path), "--experiment", "e", "--expid", "empty"]) == 1
    line = one_line_error(capsys.readouterr().err)
    assert "has no checkpoints" in line and "train.py" in line
    with pytest.raises(SystemExit) as exc:
        extract.main(["--expid", "x"])
    assert exc.value.code == 2
    with pytest.raises(UserError, match="has not been extracted"):
        storage.open_features(str(tmp_path / "e" / "empty"))
    with pytest.raises(UserError, match="no run at"):
        storage.open_features(str(tmp_path / "e" / "missing"))


def test_features_of_another_run_is_refused(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    other = build_run(tmp_path / "o", "a", [0, 1], seed=1)  # different config (seed)
    extract_run(other, progress=False)
    shutil.copy(storage.features_path(other), storage.features_path(run))
    result = run_extract(*cli(run))
    assert result.returncode == 1
    line = one_line_error(result.stderr)
    assert "different run" in line and "--overwrite" in line and "seed" in line
    assert extract.main([*cli(run), "--overwrite", "--no-progress"]) == 0
    with storage.open_features(run) as f:
        assert storage.num_rows(f) == 7


def test_checkpoint_of_another_model_is_named(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    wide = build_run(tmp_path / "w", "a", [3], width=5)
    intruder = os.path.join(checkpoint_dir(run), "step_00000003.pt")
    shutil.copy(list_checkpoints(wide)[0], intruder)
    with pytest.raises(UserError, match="step_00000003.pt.*does not belong"):
        extract_run(run, progress=False)
    assert not os.path.exists(storage.features_path(run))


# ----------------------------------------------------------------------------- kill


@pytest.mark.slow
def test_killed_extraction_resumes_to_a_clean_file(tmp_path):
    run = build_run(tmp_path / "r", "a", list(range(0, 80)), width=256)
    reference = copy_run(run, tmp_path / "ref")
    extract_run(reference, progress=False)
    clean = features_of(reference)
    target = storage.features_path(run)
    rng = random.Random(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    kills = 0
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "extract.py"), *cli(run), "--no-progress"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        start = os.path.getsize(target) if os.path.exists(target) else 0
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if os.path.exists(target) and os.path.getsize(target) != start:
                break
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
        if os.path.exists(target):
            try:
                partial = features_of(run)
            except CorruptFileError:
                continue  # the next extraction rebuilds it (with a warning)
            n = partial["steps"].shape[0]
            assert partial["steps"].tolist() == clean["steps"][:n].tolist()
            for key, value in partial.items():
                if not key.startswith("@") and value.shape[:1] == (n,):
                    want = clean[key][:n]
                    assert np.array_equal(value, want, equal_nan=value.dtype.kind == "f"), key
    assert kills >= 1
    result = run_extract(*cli(run))
    assert result.returncode == 0, result.stderr
    assert_same_features(clean, features_of(run))


# ----------------------------------------------------------------------------- other


def test_measure_throughput_leaves_the_run_alone(base_run):
    had = os.path.exists(storage.features_path(base_run))
    numbers = measure_throughput(base_run)
    assert numbers["files"] == 7 and numbers["mb"] > 0
    for key in ("read_mb_s", "load_mb_s", "copy_mb_s", "extract_mb_s", "ratio", "ratio_copy"):
        assert numbers[key] > 0 and math.isfinite(numbers[key]), key
    assert os.path.exists(storage.features_path(base_run)) == had


def test_url_run_folder(base_run):
    import fsspec

    fs = fsspec.filesystem("memory")
    url_run = "memory://extract-test/t/a"
    for path in list_checkpoints(base_run):
        fs.put_file(path, f"/extract-test/t/a/ckpt/{os.path.basename(path)}")
    try:
        report = extract_run(url_run, progress=False)
        assert report.rows == 7
        assert extract_run(url_run, progress=False).extracted == 0
        with storage.open_features(url_run) as f:
            assert storage.read_steps(f).tolist() == [0, 1, 2, 4, 5, 7, 9]
            ckpt = load_checkpoint(list_checkpoints(base_run)[0])
            row = storage.read_steps(f).tolist().index(ckpt["step"])
            assert np.array_equal(
                storage.read_param(f, "fc2.weight", rows=row), ckpt["model"]["fc2.weight"].numpy()
            )
    finally:
        fs.rm("/extract-test", recursive=True)


def test_float64_model_keeps_its_dtype(tmp_path):
    run = build_run(tmp_path / "r", "a", [0, 2], dtype=torch.float64, buffers=())
    extract_run(run, progress=False)
    ckpt = load_checkpoint(list_checkpoints(run)[-1])
    with storage.open_features(run) as f:
        got = storage.read_param(f, "fc1.weight", rows=1)
        assert got.dtype == np.float64
        assert np.array_equal(got, ckpt["model"]["fc1.weight"].numpy())
        assert storage.buffer_names(f) == ["momentum_buffer"]
        assert json.loads(f.attrs["hyperparameters"])["model"] == "tiny-bn-8"


def test_train_run_rows_align_with_the_theory(tmp_path):
    """A real train.py run: rows, eval metrics and theory state line up with the parameters."""
    from Utils.config import defaults as default_config
    from Utils.groups import group_sum_np
    from Utils.training import train

    cfg = default_config()
    cfg.update(
        dataset="synthetic",
        model="fc",
        epochs=2,
        train_batch_size=512,
        save_freq=3,
        eval_freq=4,
        no_progress=True,
        optimizer="custom_sgd",
        momentum=0.9,
        wd=5e-4,
        lr=0.1,
        save_buffers="grad,update",
        save_dir=str(tmp_path),
        experiment="t",
        expid="a",
    )
    result = train(cfg)
    run = result.run_dir
    report = extract_run(run, progress=False)
    steps = sorted(int(load_checkpoint(p)["step"]) for p in list_checkpoints(run))
    assert report.rows == len(steps) == result.checkpoints and report.complete
    evaluated = {h["step"] for h in json.loads(Path(run, "metrics.json").read_text())}
    with storage.open_features(run) as f:
        assert storage.read_steps(f).tolist() == steps
        test_loss = storage.read_metric(f, "test_loss")
        assert [s for s, v in zip(steps, test_loss) if not math.isnan(v)] == sorted(evaluated)
        assert storage.read_hyperparameters(f)["expid"] == "a"
        valid = [g for g in storage.read_groups(f) if g.valid]
        assert valid and sorted(g.key for g in valid) == sorted(storage.theory_keys(f))
        for g in valid:
            arrays = {p: storage.read_param(f, p).astype(np.float64) for p in g.params}
            if g.kind != "translation":
                arrays = {p: a * a for p, a in arrays.items()}
            measured = group_sum_np(arrays, g, lead=1)  # [N, size]
            exact = storage.read_theory(f, g.key, "exact")  # [N, size]
            scale = np.abs(measured).max()
            np.testing.assert_allclose(exact, measured, rtol=1e-4, atol=1e-5 * scale)
            np.testing.assert_allclose(
                storage.read_theory(f, g.key, "initial")[0], measured[0], rtol=1e-6, atol=1e-9
            )


# ----------------------------------------------------------------------------- two at once


def test_a_second_extraction_of_the_same_run_says_another_is_running(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    with open(os.path.join(run, LOCK_NAME), "w") as held:  # as a running extract.py holds it
        held.write("4242\n")
        held.flush()
        fcntl.flock(held, fcntl.LOCK_EX)
        busy = run_extract(*cli(run))
    assert busy.returncode == 1
    line = one_line_error(busy.stderr)
    assert "another extract.py" in line and "4242" in line and run in line
    assert not os.path.exists(storage.features_path(run))
    assert run_extract(*cli(run)).returncode == 0  # the lock is gone with its holder
    assert not os.path.exists(os.path.join(run, LOCK_NAME))  # removed at the end


@pytest.mark.slow
def test_two_extractions_at_once_never_both_fail(tmp_path):
    run = build_run(tmp_path / "r", "a", list(range(0, 40)), width=128)
    reference = copy_run(run, tmp_path / "ref")
    extract_run(reference, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    for flags in ([], ["--overwrite"]):
        procs = [
            subprocess.Popen(
                [sys.executable, str(ROOT / "extract.py"), *cli(run), "--no-progress", *flags],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
        for p in procs:
            p.stdout.close()
            p.stderr.close()
        assert any(code == 0 for code, _ in results), results
        for code, err in results:
            if code:
                assert "another extract.py" in one_line_error(err), err
        assert_same_features(features_of(reference), features_of(run))


# ----------------------------------------------------------------------------- Ctrl-C


def _interrupt(args: list[str], ready, delay: float) -> tuple[bool, int, str]:
    """Starts a script, sends SIGINT `delay` s after `ready()`; (sent, exit status, stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, *args, "--no-progress"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while proc.poll() is None and not ready():
        assert time.monotonic() < deadline, "the script made no progress"
        time.sleep(0.002)
    time.sleep(delay)
    sent = proc.poll() is None
    if sent:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=240)
    return sent, proc.returncode, err


@pytest.mark.slow
def test_ctrl_c_is_never_swallowed(tmp_path):
    """SIGINT at many points of extract.py and cache.py: always exit 130 with one line."""
    run = build_run(tmp_path / "r", "a", list(range(0, 60)), width=256)
    target = storage.features_path(run)
    extract_args = [str(ROOT / "extract.py"), *cli(run), "--overwrite"]
    extract_run(run, progress=False)
    cache_dir = os.path.join(run, "cache")
    cache_args = [str(ROOT / "cache.py"), *cli(run), "--overwrite"]
    outcomes = []
    for i in range(6):
        delay = 0.1 * i
        outcomes.append(
            _interrupt(extract_args, lambda: os.path.exists(target + ".tmp"), delay / 2)
        )
        assert not os.path.exists(target + ".tmp")  # an interrupted extraction cleans up
        # the signal must land in the script, not in the interpreter's start-up (which prints
        # a KeyboardInterrupt in `import warnings` and goes on): wait for this run's files
        shutil.rmtree(cache_dir, ignore_errors=True)
        outcomes.append(
            _interrupt(
                cache_args,
                lambda: os.path.isdir(cache_dir) and bool(os.listdir(cache_dir)),
                0.5 + delay,
            )
        )
        assert not [f for f in os.listdir(cache_dir) if ".tmp" in f]  # no temporary left
    for sent, code, err in outcomes:
        if not sent:
            continue  # finished before the signal: nothing to check
        assert code in (130, -signal.SIGINT), (code, err)  # never 0: the job did not go on
        if code == 130:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and "interrupted" in lines[0], err
    assert sum(sent for sent, _, _ in outcomes) >= 8


def test_cache_metrics_without_a_name_is_a_usage_error(base_run, tmp_path):
    run = copy_run(base_run, tmp_path)
    extract_run(run, progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(
        [sys.executable, str(ROOT / "cache.py"), *cli(run), "--metrics", ","],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 2
    assert "names no metric" in one_line_error(out.stderr)
    assert not os.path.exists(os.path.join(run, "cache")) or not os.listdir(
        os.path.join(run, "cache")
    )
