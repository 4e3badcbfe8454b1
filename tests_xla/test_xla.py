"""torch-xla on its CPU device (``PJRT_DEVICE=CPU``): runs only in the XLA virtualenv.

``make test-xla`` builds ``.venv-xla`` (torch 2.9 + torch-xla 2.9) and runs this folder; the
main suite (``testpaths = tests``) never collects it. One XLA process, in place and through
``xmp.spawn``, trains the demo-sized model; its checkpoints (weights, gradients, per-group
theory state, metrics) match a plain CPU run of the same batches within float32 round-off.
Multi-replica logic is shared with DDP and tested there (tests/test_distributed.py): XLA's
CPU client cannot run collectives between two devices.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("PJRT_DEVICE", "CPU")
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402
import torch_xla  # noqa: E402, F401  (only in the XLA virtualenv: make test-xla)

from Utils import xla  # noqa: E402
from Utils.checkpoint import list_checkpoints, load_checkpoint  # noqa: E402
from Utils.config import defaults as default_config  # noqa: E402
from Utils.training import run_training, train  # noqa: E402

torch.set_num_threads(1)

RUN = {
    "dataset": "synthetic",
    "model": "fc",
    "epochs": 1,
    "train_batch_size": 512,
    "test_batch_size": 1024,
    "lr": 0.05,
    "momentum": 0.9,
    "wd": 5e-4,
    "save_freq": 2,
    "save_buffers": "grad",
    "no_progress": True,
    "experiment": "t",
}


def assert_close_nested(a, b, path: str = "", rtol: float = 1e-5) -> None:
    """Equal within float32 round-off, relative to each tensor's scale."""
    if isinstance(a, torch.Tensor):
        assert a.device.type == "cpu" and a.shape == b.shape and a.dtype == b.dtype, path
        if a.is_floating_point():
            scale = max(1.0, float(b.abs().max())) if b.numel() else 1.0
            torch.testing.assert_close(a, b, rtol=rtol, atol=rtol * scale, msg=path)
        else:
            assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_close_nested(a[k], b[k], f"{path}/{k}", rtol)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_nested(x, y, f"{path}[{i}]", rtol)
    elif isinstance(a, float) and a != a:
        assert b != b, path
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=rtol, abs=rtol), path
    else:
        assert a == b, path


def assert_runs_match(run_a: str, run_b: str) -> None:
    """Same steps; weights, optimizer state, theory state and metrics within round-off."""
    pa, pb = list_checkpoints(run_a), list_checkpoints(run_b)
    assert [Path(p).name for p in pa] == [Path(p).name for p in pb] and len(pa) >= 3
    for x, y in zip(pa, pb):
        a, b = load_checkpoint(x), load_checkpoint(y)
        assert (a["step"], a["epoch"], a["batch"]) == (b["step"], b["epoch"], b["batch"])
        assert_close_nested(a["model"], b["model"], f"{a['step']} model")
        assert_close_nested(a["optimizer"]["state"], b["optimizer"]["state"], "optimizer")
        ta, tb = a["optimizer"]["theory"], b["optimizer"]["theory"]
        assert ta["groups"] == tb["groups"] and ta["step"] == tb["step"] == a["step"]
        assert ta["state"], "the theory state is empty"
        assert_close_nested(ta["time"], tb["time"], "time")
        assert_close_nested(ta["state"], tb["state"], f"{a['step']} theory", rtol=1e-4)
        assert_close_nested(a["metrics"], b["metrics"], "metrics", rtol=1e-4)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    """The reference: the same run on the plain CPU device."""
    root = tmp_path_factory.mktemp("cpu")
    return train({**RUN, "device": "cpu", "expid": "cpu", "save_dir": str(root)})


def test_runtime_api_gives_a_single_replica_context():
    ctx = xla.context()
    assert (ctx.rank, ctx.world_size, ctx.backend) == (0, 1, "xla") and ctx.is_master
    assert xla.device().type == "xla"
    assert xla.uses_xla({"device": "xla"}) and xla.uses_xla({"tpu": "nm", "device": "auto"})


def test_one_xla_process_in_place_matches_the_cpu_run(cpu_run, tmp_path, capfd):
    cfg = {**default_config(), **RUN, "device": "xla", "expid": "x", "save_dir": str(tmp_path)}
    result = run_training(cfg, xla.context())
    assert "budget is not tracked on XLA" in capfd.readouterr().err  # said, not silently skipped
    assert result.steps == cpu_run.steps == 8
    assert_runs_match(result.run_dir, cpu_run.run_dir)
    for key in ("train_loss", "test_loss", "top1"):
        assert result.metrics[key] == pytest.approx(cpu_run.metrics[key], rel=1e-4)

    # interrupted after step 4 and resumed on the XLA device: the same trajectory
    cut = tmp_path / "t" / "cut"
    shutil.copytree(result.run_dir, cut)
    for path in list_checkpoints(str(cut)):
        if load_checkpoint(path)["step"] > 4:
            os.remove(path)
    resumed = run_training({**cfg, "expid": "cut", "resume": True}, xla.context())
    assert resumed.steps == 8
    assert_runs_match(str(cut), cpu_run.run_dir)


def test_xmp_spawn_with_one_process_matches_the_cpu_run(cpu_run, tmp_path):
    result = train(
        {**RUN, "device": "xla", "workers": 1, "expid": "spawn", "save_dir": str(tmp_path)}
    )
    assert result.steps == 8 and result.run_dir == str(tmp_path / "t" / "spawn")
    assert_runs_match(result.run_dir, cpu_run.run_dir)
    hp = (tmp_path / "t" / "spawn" / "hyperparameters.json").read_text()
    assert '"backend": "xla"' in hp and '"world_size": 1' in hp
