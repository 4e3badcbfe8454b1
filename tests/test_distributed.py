"""Several processes, one trajectory: loss weighting, DistContext, torchrun DDP, shell scripts.

The torchrun tests run real gloo process groups on the CPU and compare their checkpoints with
a single-process run of the same global batches (models without BatchNorm, whose per-rank
statistics would differ by design).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from Utils import xla
from Utils.checkpoint import list_checkpoints, load_checkpoint
from Utils.distributed import DistContext, fingerprint, global_batch_size, slice_loss
from Utils.errors import UsageError, UserError
from Utils.losses import cross_entropy, mean_squared_error
from Utils.training import train

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "scripts"

RUN = {
    "dataset": "synthetic",
    "model": "fc",
    "epochs": 2,
    "train_batch_size": 512,
    "test_batch_size": 1024,
    "lr": 0.05,
    "momentum": 0.9,
    "save_freq": 4,
    "save_buffers": "grad",
    "no_progress": True,
    "device": "cpu",
    "experiment": "t",
}


def flags(cfg: dict) -> list[str]:
    """train.py flags for a config dict."""
    out: list[str] = []
    for key, value in cfg.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is not False:
            out += [flag, str(value)]
    return out


def env() -> dict[str, str]:
    """Environment of the child processes: one thread, the repository importable."""
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": str(ROOT),
    }


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc`` on the CPU (gloo)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env(),
        timeout=300,
    )


def assert_close_nested(a, b, path: str = "", rtol: float = 1e-5) -> None:
    """Float tensors equal within float32 round-off (relative to each tensor's scale)."""
    if isinstance(a, torch.Tensor):
        assert a.shape == b.shape and a.dtype == b.dtype, path
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
    elif isinstance(a, float):
        assert (np.isnan(a) and np.isnan(b)) or a == pytest.approx(b, rel=rtol, abs=rtol), path
    else:
        assert a == b, path


def assert_runs_match(run_a: str, run_b: str) -> None:
    """Two runs saved the same steps with the same weights, buffers, theory and metrics."""
    pa, pb = list_checkpoints(run_a), list_checkpoints(run_b)
    assert [Path(p).name for p in pa] == [Path(p).name for p in pb] and pa
    for x, y in zip(pa, pb):
        a, b = load_checkpoint(x), load_checkpoint(y)
        step = a["step"]
        assert (a["step"], a["epoch"], a["batch"], a["lr"]) == (
            b["step"],
            b["epoch"],
            b["batch"],
            b["lr"],
        )
        assert_close_nested(a["model"], b["model"], f"step {step} model")
        assert_close_nested(a["optimizer"]["state"], b["optimizer"]["state"], f"step {step} opt")
        ta, tb = a["optimizer"]["theory"], b["optimizer"]["theory"]
        assert ta["groups"] == tb["groups"] and ta["step"] == tb["step"]
        assert_close_nested(ta["time"], tb["time"], f"step {step} time")
        assert_close_nested(ta["state"], tb["state"], f"step {step} theory", rtol=1e-4)
        assert_close_nested(a["metrics"], b["metrics"], f"step {step} metrics", rtol=1e-4)
        assert a["running"]["count"] == b["running"]["count"]


# --------------------------------------------------------------------------- in process


def _rank_slices(size: int, world: int) -> list[slice]:
    """The contiguous slices Utils.data gives each rank."""
    return [slice(size * r // world, size * (r + 1) // world) for r in range(world)]


@pytest.mark.parametrize("size, world", [(8, 2), (7, 3), (2, 3), (1, 4), (12, 4)])
@pytest.mark.parametrize("loss_fn", [cross_entropy, mean_squared_error])
def test_slice_losses_average_to_the_global_mean_gradient(size, world, loss_fn):
    gen = torch.Generator().manual_seed(size * 10 + world)
    model = torch.nn.Linear(5, 3).double()
    x = torch.randn(size, 5, generator=gen, dtype=torch.float64)  # [B, 5]
    y = torch.randint(0, 3, (size,), generator=gen)  # [B]
    model.zero_grad()
    loss_fn(model(x), y).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    averaged = [torch.zeros_like(p) for p in model.parameters()]
    for part in _rank_slices(size, world):
        model.zero_grad()
        loss, mean = slice_loss(loss_fn, model(x[part]), y[part], size, world)
        loss.backward()
        if part.stop == part.start:
            assert mean is None and float(loss.detach()) == 0.0
        else:
            torch.testing.assert_close(mean, loss_fn(model(x[part]), y[part]))
        for acc, p in zip(averaged, model.parameters()):
            assert p.grad is not None  # an empty slice still yields (zero) gradients
            acc += p.grad / world  # what DDP / xm.optimizer_step do
    for got, want in zip(averaged, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_equal_slices_back_propagate_the_plain_mean():
    out = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    loss, mean = slice_loss(cross_entropy, out, y, 8, 2)
    assert loss is mean  # factor exactly 1: no extra rounding on the usual path


def test_global_batch_size():
    assert [global_batch_size(4096, 1365, b) for b in range(4)] == [1365, 1365, 1365, 1]
    assert global_batch_size(10, 5, 2) == 0
    assert sum(global_batch_size(1000, 96, b) for b in range(11)) == 1000


def test_single_process_context_is_transparent():
    ctx = DistContext()
    t = torch.arange(3.0)
    assert ctx.all_reduce_sum(t) is t and ctx.all_reduce_max(t) is t
    assert ctx.broadcast_object({"a": 1}) == {"a": 1}
    assert ctx.on_master(lambda: 7) == 7 and ctx.agree(t)
    with pytest.raises(UserError, match="boom"):
        ctx.on_master(lambda: (_ for _ in ()).throw(UserError("boom")))
    f = fingerprint([torch.ones(2, 2), torch.tensor([3.0])])
    assert f.dtype == torch.float64 and f.tolist() == [4.0, 4.0, 3.0, 9.0]


@pytest.mark.slow
def test_xla_without_torch_xla_is_a_usage_error(tmp_path):
    assert not xla.available(), "the main virtualenv has no torch-xla (see tests_xla/)"
    for extra in ({"device": "xla"}, {"tpu": "my-tpu"}):
        with pytest.raises(UsageError, match="requirements-tpu.txt"):
            train({**RUN, **extra, "expid": "x", "save_dir": str(tmp_path)})
    assert not any(tmp_path.iterdir())
    out = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--device", "xla", "--dataset", "synthetic"],
        capture_output=True,
        text=True,
        env=env(),
        timeout=120,
    )
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "torch-xla" in out.stderr


# --------------------------------------------------------------------------- torchrun

PROBE = textwrap.dedent("""
    import json, os, sys
    import torch
    from Utils.distributed import init_from_env, shutdown
    from Utils.errors import UserError

    ctx = init_from_env("cpu")
    out = {"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend}
    out["sum"] = ctx.all_reduce_sum(torch.tensor([ctx.rank + 1.0])).tolist()
    out["max"] = ctx.all_reduce_max(torch.tensor([float(ctx.rank)])).tolist()
    out["object"] = ctx.broadcast_object({"from": ctx.rank})
    out["shared"] = ctx.on_master(lambda: "decided on 0", share=True)
    out["kept"] = ctx.on_master(lambda: "only on 0")
    try:
        ctx.on_master(lambda: (_ for _ in ()).throw(UserError("run exists")))
    except UserError as err:
        out["error"] = str(err)
    buffers = [torch.full((2,), float(ctx.rank))]
    ctx.broadcast_tensors_(buffers)
    out["buffer"] = buffers[0].tolist()
    out["agree_same"] = ctx.agree(torch.tensor([1.0, 2.0]))
    out["agree_diff"] = ctx.agree(torch.tensor([1.0, float(ctx.rank)]))
    ctx.barrier()
    shutdown(ctx)
    with open(os.path.join(sys.argv[1], f"rank{ctx.rank}.json"), "w") as f:
        json.dump(out, f)
    """)


@pytest.mark.slow
def test_context_collectives_and_master_decisions_over_gloo(tmp_path):
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    done = torchrun(2, str(script), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["world"] == 2 and out["backend"] == "gloo" and out["rank"] == rank
        assert out["sum"] == [3.0] and out["max"] == [1.0]
        assert out["object"] == {"from": 0} and out["shared"] == "decided on 0"
        assert out["kept"] == ("only on 0" if rank == 0 else None)
        assert out["error"] == "run exists"  # rank 0's error raised on every rank
        assert out["buffer"] == [0.0, 0.0]
        assert out["agree_same"] is True and out["agree_diff"] is False


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """A 2-process DDP run and a 1-process run of the same global batches."""
    root = tmp_path_factory.mktemp("ddp")
    done = torchrun(2, "train.py", *flags({**RUN, "expid": "ddp", "save_dir": str(root)}))
    assert done.returncode == 0, done.stderr[-3000:]
    single = train({**RUN, "expid": "single", "save_dir": str(root)})
    return root, root / "t" / "ddp", Path(single.run_dir), done


@pytest.mark.slow
def test_two_processes_follow_the_single_process_trajectory(two_rank_run):
    _, ddp, single, done = two_rank_run
    assert_runs_match(str(ddp), str(single))
    assert "on 2 processes" in done.stderr and done.stderr.count("done:") == 1  # rank 0 prints
    hp = json.loads((ddp / "hyperparameters.json").read_text())
    assert hp["environment"]["world_size"] == 2 and hp["environment"]["backend"] == "gloo"
    metrics = json.loads((ddp / "metrics.json").read_text())
    single_metrics = json.loads((single / "metrics.json").read_text())
    assert [m["step"] for m in metrics] == [m["step"] for m in single_metrics] == [0, 8, 16]
    for m, s in zip(metrics, single_metrics):
        assert m["top1"] == pytest.approx(s["top1"], abs=1e-9)
        assert m["test_loss"] == pytest.approx(s["test_loss"], rel=1e-5)
        if m["step"]:
            assert m["train_loss"] == pytest.approx(s["train_loss"], rel=1e-5)
    assert not (ddp / ".lock").exists()


@pytest.mark.slow
def test_resume_across_ranks_and_world_sizes(two_rank_run, tmp_path):
    root, ddp, single, _ = two_rank_run
    cut = tmp_path / "t" / "cut"
    shutil.copytree(ddp, cut)
    for path in list_checkpoints(str(cut)):
        if load_checkpoint(path)["step"] > 6:
            os.remove(path)
    kept = list_checkpoints(str(cut))
    again = torchrun(2, "train.py", *flags({**RUN, "expid": "cut", "save_dir": str(tmp_path)}))
    assert again.returncode != 0 and "already exists" in again.stderr
    assert list_checkpoints(str(cut)) == kept  # refused on every rank, nothing written
    resumed = torchrun(
        2, "train.py", *flags({**RUN, "expid": "cut", "save_dir": str(tmp_path), "resume": True})
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stderr
    assert_runs_match(str(cut), str(ddp))
    # the same cut resumed by a single process: the global batches do not depend on ranks
    solo = tmp_path / "t" / "solo"
    shutil.copytree(ddp, solo)
    for path in list_checkpoints(str(solo)):
        if load_checkpoint(path)["step"] > 6:
            os.remove(path)
    train({**RUN, "expid": "solo", "save_dir": str(tmp_path), "resume": True})
    assert_runs_match(str(solo), str(single))


@pytest.mark.slow
def test_uneven_and_empty_slices_follow_the_single_process_trajectory(tmp_path):
    # 4096 = 3 * 1365 + 1: the last batch of each epoch has 1 sample, so two of the three
    # ranks get none; the last test batch (1024 = 1023 + 1) too
    cfg = {
        **RUN,
        "model": "logistic",
        "train_batch_size": 1365,
        "test_batch_size": 1023,
        "save_freq": 1,
    }
    done = torchrun(3, "train.py", *flags({**cfg, "expid": "ddp", "save_dir": str(tmp_path)}))
    assert done.returncode == 0, done.stderr[-3000:]
    single = train({**cfg, "expid": "single", "save_dir": str(tmp_path)})
    assert single.steps == 8
    assert_runs_match(str(tmp_path / "t" / "ddp"), single.run_dir)


# --------------------------------------------------------------------------- scripts


def script(name: str, *args: str, **kw) -> subprocess.CompletedProcess:
    """Runs one of scripts/*.sh."""
    return subprocess.run(
        ["bash", str(SCRIPTS / name), *args], capture_output=True, text=True, timeout=60, **kw
    )


@pytest.mark.parametrize("name", ["make_tpus.sh", "sync_gcloud.sh", "kill_all.sh"])
def test_scripts_pass_shellcheck_and_have_help(name):
    lint = subprocess.run(
        ["shellcheck", "--severity=style", str(SCRIPTS / name)], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout
    usage = script(name, "--help")
    assert usage.returncode == 0 and "Usage:" in usage.stdout and "--dry-run" in usage.stdout
    bad = script(name, "--no-such-flag")
    assert bad.returncode == 2 and "unknown option" in bad.stderr


def test_make_tpus_dry_run_prints_current_gcloud_commands():
    out = script("make_tpus.sh", "--dry-run", "--spot", "nm-tpu", "us-central1-a", "v3-8", "2")
    assert out.returncode == 0, out.stderr
    creates = [line for line in out.stdout.splitlines() if line.startswith("gcloud")]
    assert creates == [
        f"gcloud compute tpus tpu-vm create nm-tpu-{i} --zone=us-central1-a "
        "--accelerator-type=v3-8 --version=tpu-ubuntu2204-base --spot"
        for i in range(2)
    ]
    one = script("make_tpus.sh", "--dry-run", "--project", "p", "solo", "europe-west4-a", "v4-8")
    assert "tpu-vm create solo --zone=europe-west4-a" in one.stdout and "--project=p" in one.stdout
    for args in (["nm", "z"], ["nm", "z", "v3-8", "0"], ["Bad_Name", "z", "v3-8"]):
        assert script("make_tpus.sh", "--dry-run", *args).returncode == 2


def test_sync_gcloud_dry_run_keeps_the_run_layout():
    out = script(
        "sync_gcloud.sh", "--dry-run", "--dest", "here", "gs://bucket/results/", "demo", "run1"
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "mkdir -p here/demo/run1",
        "gcloud storage rsync --recursive gs://bucket/results/demo/run1 here/demo/run1",
    ]
    light = script("sync_gcloud.sh", "--dry-run", "--no-checkpoints", "gs://b/r", "demo")
    assert "--exclude=" in light.stdout and "results/demo" in light.stdout
    tpu = script(
        "sync_gcloud.sh", "--dry-run", "--tpu", "nm", "--zone", "z", "nm/results", "demo", "r1"
    )
    assert "gcloud compute tpus tpu-vm scp --recurse nm:nm/results/demo/r1 results/demo/" in (
        tpu.stdout
    )
    assert script("sync_gcloud.sh", "--dry-run", "/local/results", "demo").returncode == 2
    assert script("sync_gcloud.sh", "--dry-run", "gs://b", "demo/../x").returncode == 2


def _sleeper(*argv: str) -> subprocess.Popen:
    """A real process whose command line is `python -c <sleep> *argv`."""
    return subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def test_kill_all_ends_recorded_training_processes_only(tmp_path):
    trainer = _sleeper("train.py", "--expid", "x")
    other = _sleeper("not-training")
    try:
        run = tmp_path / "results" / "t" / "x"
        run.mkdir(parents=True)
        (run / ".lock").write_text(str(trainer.pid))
        (tmp_path / "other.pid").write_text(f"{other.pid}\n")
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        (tmp_path / "gone.pid").write_text(str(gone.pid))
        paths = [str(tmp_path / "results"), str(tmp_path / "other.pid"), str(tmp_path / "gone.pid")]

        dry = script("kill_all.sh", "--dry-run", *paths)
        assert dry.returncode == 0, dry.stderr
        assert f"kill -TERM {trainer.pid}" in dry.stdout
        assert trainer.poll() is None and other.poll() is None
        assert "not train.py" in dry.stderr and "has ended" in dry.stdout

        real = script("kill_all.sh", *paths)
        assert real.returncode == 0, real.stderr
        assert trainer.wait(timeout=20) != 0  # ended by SIGTERM
        assert other.poll() is None  # not recorded as training: left alone
        assert "1 process(es) signalled" in real.stdout
    finally:
        for proc in (trainer, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_kill_all_on_a_tpu_vm_dry_run():
    out = script("kill_all.sh", "--dry-run", "--tpu", "nm", "--zone", "z", "--signal", "KILL")
    assert out.returncode == 0
    assert out.stdout.startswith("gcloud compute tpus tpu-vm ssh nm --zone=z --worker=all")
    assert "kill_all.sh\\ --signal\\ KILL" in out.stdout
