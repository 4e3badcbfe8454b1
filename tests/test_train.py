"""train.py end to end on the offline synthetic dataset: flags, checkpoints, schedules, resume."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from Utils.checkpoint import list_checkpoints, load_checkpoint, save_steps
from Utils.training import train

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "dataset": "synthetic",
    "model": "fc-bn",
    "epochs": 2,
    "train_batch_size": 512,
    "test_batch_size": 1024,
    "lr": 0.05,
    "momentum": 0.9,
    "wd": 5e-4,
    "lr_drops": [1],
    "save_freq": 3,
    "no_progress": True,
    "deterministic": True,
    "experiment": "t",
}


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """Runs train.py in a subprocess."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def assert_equal_nested(a, b, path: str = "") -> None:
    """Bitwise equality of nested checkpoint structures (tensors, arrays, numbers, strings)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, path
        assert torch.equal(a, b), path
    elif isinstance(a, np.ndarray):
        assert np.array_equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_equal_nested(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal_nested(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), path
    else:
        assert a == b, path


def test_help_lists_flags_with_defaults():
    out = run_cli("--help")
    assert out.returncode == 0
    for flag in ("--save-buffers", "--save-schedule", "--resume", "--deterministic", "--nesterov"):
        assert flag in out.stdout
    assert "default: 0.1" in out.stdout  # --lr default shown


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--momentum", "1.0"], "--momentum"),
        (["--momentum", "-0.1"], "--momentum"),
        (["--nesterov"], "--nesterov"),
        (["--nesterov", "--momentum", "0.9", "--dampening", "0.1"], "--nesterov"),
        (["--train-batch-size", "0"], "--train-batch-size"),
        (["--epochs", "-1"], "--epochs"),
        (["--model-class", "nope"], "--model-class"),
        (["--dataset", "nope"], "--dataset"),
        (["--optimizer", "nope"], "--optimizer"),
        (["--loss", "nope"], "--loss"),
        (["--save-buffers", "grad,nope"], "nope"),
        (["--lr-drops", "5", "--epochs", "2"], "--lr-drops"),
        (["--lr", "abc"], "--lr"),
        (["--save-buffers", "sgd", "--optimizer", "adam"], "custom_sgd"),
    ],
)
def test_bad_flags_one_line_exit_2(tmp_path, args, needle):
    out = run_cli("--expid", "x", "--save-dir", str(tmp_path), "--dataset", "synthetic", *args)
    assert out.returncode == 2, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, out.stderr
    assert needle in lines[0]
    assert "Traceback" not in out.stderr
    assert not any(tmp_path.iterdir())


def test_unknown_model_is_one_line(tmp_path):
    out = run_cli(
        "--expid",
        "x",
        "--save-dir",
        str(tmp_path),
        "--dataset",
        "synthetic",
        "--model",
        "nope",
        "--epochs",
        "1",
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "nope" in lines[0] and "vgg-demo" in lines[0], out.stderr
    assert not (tmp_path / "t").exists()


def test_save_schedules():
    assert save_steps(10, "linear", 3).tolist() == [0, 3, 6, 9, 10]
    assert save_steps(10, "linear", 0).tolist() == [0, 10]
    log = save_steps(10000, "log", num_checkpoints=20)
    assert log[0] == 0 and log[-1] == 10000 and 10 <= len(log) <= 21
    gaps = np.diff(log)
    assert gaps[0] <= gaps[-1]  # dense early, sparse late


def test_run_writes_checkpoints_with_everything(tmp_path):
    cfg = {**TINY, "expid": "a", "save_dir": str(tmp_path), "save_buffers": "grad,update"}
    result = train(cfg)
    run = Path(result.run_dir)
    hp = json.loads((run / "hyperparameters.json").read_text())
    assert hp["config"]["lr"] == 0.05 and "torch" in hp["environment"]
    steps_per_epoch = 8  # 4096 samples / 512
    total = 2 * steps_per_epoch
    expected = sorted(set(range(0, total + 1, 3)) | {0, steps_per_epoch, total})
    paths = list_checkpoints(str(run))
    ckpts = [load_checkpoint(p) for p in paths]
    assert [c["step"] for c in ckpts] == expected
    assert result.steps == total
    for c in ckpts:
        assert Path(paths[ckpts.index(c)]).name == f"step_{c['step']:08d}.pt"
        assert set(c) >= {"model", "optimizer", "scheduler", "rng", "metrics", "param_names"}
        assert c["epoch_float"] == pytest.approx(c["step"] / steps_per_epoch)
        evaluated = c["step"] in (0, steps_per_epoch, total)
        assert math.isnan(c["metrics"]["test_loss"]) != evaluated
        state = c["optimizer"]["state"]
        names = c["param_names"]
        assert len(names) == len(dict(c["model"]).keys() & set(names))
        if c["step"] > 0:
            for i, name in enumerate(names):
                assert state[i]["grad"].shape == c["model"][name].shape
                assert "update" in state[i]
        assert "theory" in c["optimizer"]
    # the lr drop at epoch 1 shows in the stored lr
    lrs = {c["step"]: c["lr"] for c in ckpts}
    assert lrs[0] == pytest.approx(0.05) and lrs[total] == pytest.approx(0.005)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [m["step"] for m in metrics] == [0, steps_per_epoch, total]
    assert metrics[-1]["train_top1"] > 0.25  # learns the teacher better than chance (0.1)


def test_existing_run_refused_then_resume_and_overwrite(tmp_path):
    args = [
        "--experiment",
        "t",
        "--expid",
        "a",
        "--save-dir",
        str(tmp_path),
        "--dataset",
        "synthetic",
        "--model",
        "logistic",
        "--epochs",
        "1",
        "--train-batch-size",
        "1024",
        "--no-progress",
    ]
    assert run_cli(*args).returncode == 0
    again = run_cli(*args)
    assert again.returncode != 0
    assert "--overwrite" in again.stderr and "--resume" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert run_cli(*args, "--overwrite").returncode == 0
    nothing = run_cli(*[a if a != "a" else "b" for a in args], "--resume")
    assert nothing.returncode != 0 and "nothing to resume" in nothing.stderr


def test_resume_is_bitwise_equal(tmp_path):
    full = train({**TINY, "expid": "full", "save_dir": str(tmp_path), "save_buffers": "grad"})
    cut = train({**TINY, "expid": "cut", "save_dir": str(tmp_path), "save_buffers": "grad"})
    cut_paths = list_checkpoints(cut.run_dir)
    # interrupt after step 7: delete later checkpoints and metrics rows, then resume
    for p in cut_paths:
        if load_checkpoint(p)["step"] > 7:
            os.remove(p)
    train({**TINY, "expid": "cut", "save_dir": str(tmp_path), "resume": True})
    a = [load_checkpoint(p) for p in list_checkpoints(full.run_dir)]
    b = [load_checkpoint(p) for p in list_checkpoints(cut.run_dir)]
    assert [c["step"] for c in a] == [c["step"] for c in b]
    for x, y in zip(a, b):
        for key in (
            "model",
            "optimizer",
            "budget",
            "scheduler",
            "metrics",
            "running",
            "step",
            "rng",
        ):
            assert_equal_nested(x[key], y[key], f"step {x['step']} {key}")


def test_no_expid_saves_nothing(tmp_path):
    with pytest.warns(UserWarning, match="expid"):
        result = train({**TINY, "epochs": 1, "expid": "", "save_dir": str(tmp_path)})
    assert result.run_dir == "" and not any(tmp_path.iterdir())


def test_restore_path_from_other_model_is_refused(tmp_path):
    first = train(
        {**TINY, "epochs": 1, "model": "logistic", "expid": "a", "save_dir": str(tmp_path)}
    )
    path = list_checkpoints(first.run_dir)[-1]
    out = run_cli(
        "--experiment",
        "t",
        "--expid",
        "b",
        "--save-dir",
        str(tmp_path),
        "--dataset",
        "synthetic",
        "--model",
        "fc-bn",
        "--epochs",
        "1",
        "--restore-path",
        path,
        "--no-progress",
    )
    assert out.returncode != 0 and "different model" in out.stderr
    assert "Traceback" not in out.stderr
    ok = train(
        {
            **TINY,
            "epochs": 1,
            "model": "logistic",
            "expid": "c",
            "save_dir": str(tmp_path),
            "restore_path": path,
        }
    )
    start = load_checkpoint(list_checkpoints(ok.run_dir)[0])
    end = load_checkpoint(path)
    assert_equal_nested(start["model"], end["model"])


def test_float64_training_and_log_schedule(tmp_path):
    result = train(
        {
            **TINY,
            "epochs": 1,
            "dtype": "float64",
            "expid": "f64",
            "save_dir": str(tmp_path),
            "save_schedule": "log",
            "num_checkpoints": 4,
        }
    )
    ckpts = [load_checkpoint(p) for p in list_checkpoints(result.run_dir)]
    assert all(
        v.dtype == torch.float64 for v in ckpts[-1]["model"].values() if v.is_floating_point()
    )
    assert [c["step"] for c in ckpts][0] == 0 and ckpts[-1]["step"] == 8
