"""The public API (Utils/api.py) and online tracking (Utils/online.py), against slow references.

References are per-neuron python loops over the groups' members on parameters, gradients and
updates recorded by the test itself; the online path of train.py is compared with the
checkpoint -> extract.py -> cache.py path of the same run.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from Utils import storage
from Utils.api import TrackingSGD, detect_groups, measure_groups, track
from Utils.online import FIELDS, ONLINE_FILE, measured_path

ROOT = Path(__file__).resolve().parent.parent
# (rtol, atol) per field: the conserved quantities are summed in float64; the diagnostics sum
# each slice in the parameters' float32 (as the tracked SGD step does) and combine in float64.
TOLERANCE = {
    "value": (1e-12, 1e-15),
    "magnitude": (1e-12, 1e-15),
    "grad_sq": (2e-6, 0.0),
    "update_sq": (2e-6, 0.0),
    "violation": (1e-4, 1e-6),
    "angular_update": (1e-5, 1e-9),
}


def _net(eps: float = 1e-5, dtype=torch.float32) -> nn.Module:
    """Linear-BN-ReLU (scale), Linear-ReLU-Linear (rescale), classifier (translation)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(6, 8),
        nn.BatchNorm1d(8, eps=eps),
        nn.ReLU(),
        nn.Linear(8, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
    ).to(dtype)


def _data(n: int = 64, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 6, generator=g, dtype=dtype)
    return x, (x[:, :3] + 0.5 * torch.randn(n, 3, generator=g, dtype=dtype)).argmax(1)


def _parts(group, tensors, i):
    """(elements of neuron i in one member, the member's sign) for every member: slow loop."""
    out = []
    for m in group.members:
        t = tensors[m.param].detach().double()
        if m.dim is None:
            if i == m.offset:
                out.append((t.reshape(-1), m.sign))
            continue
        local = i - m.offset
        count = t.shape[m.dim] // m.block
        if 0 <= local < count:
            idx = torch.arange(local * m.block, (local + 1) * m.block)
            out.append((t.index_select(m.dim, idx).reshape(-1), m.sign))
    return out


def _reference(group, theta, prev, grads, lr):
    """Every field of `FIELDS` for one group, neuron by neuron."""
    quad = group.kind != "translation"
    rows = {f: [] for f in FIELDS}
    for i in range(group.size):
        th = _parts(group, theta, i)
        value = sum(s * float((a * a).sum() if quad else a.sum()) for a, s in th)
        magnitude = sum(float((a * a).sum() if quad else a.abs().sum()) for a, _ in th)
        rows["value"].append(value)
        rows["magnitude"].append(magnitude)
        if prev is None:
            for f in FIELDS[2:]:
                rows[f].append(math.nan)
            continue
        pv = _parts(group, prev, i)
        gr = _parts(group, grads, i)
        g_sq = sum(float((g * g).sum()) for g, _ in gr)
        u_sq = sum(float((((p - t) / lr) ** 2).sum()) for (p, _), (t, _) in zip(pv, th))
        if quad:
            dot = sum(s * float((g * p).sum()) for (g, s), (p, _) in zip(gr, pv))
            c_sq = sum(float((p * p).sum()) for p, _ in pv)
            a = torch.cat([p for p, _ in pv])
            b = torch.cat([t for t, _ in th])
            cos = float(a @ b) / math.sqrt(float(a @ a) * float(b @ b))
            angle = math.acos(max(-1.0, min(1.0, cos)))
        else:
            dot = sum(s * float(g.sum()) for g, s in gr)
            c_sq = sum(g.numel() for g, _ in gr)
            angle = math.nan
        rows["grad_sq"].append(g_sq)
        rows["update_sq"].append(u_sq)
        rows["violation"].append(abs(dot) / math.sqrt(g_sq * c_sq))
        rows["angular_update"].append(angle)
    return {f: np.array(v) for f, v in rows.items()}


def test_detect_groups_finds_all_kinds_and_leaves_no_trace():
    model = _net()
    x, y = _data()
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    model.eval()
    groups = detect_groups(model, x, y)
    assert {g.kind for g in groups} == {"rescale", "scale", "translation"}
    assert all(g.valid for g in groups)
    assert not model.training
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


def test_tracking_sgd_theory_in_memory_at_any_step():
    """Exact SGD theory from the API agrees with measurement to round-off (float64, eps ~ 0)."""
    model = _net(eps=1e-30, dtype=torch.float64)
    x, y = _data(dtype=torch.float64)
    groups = detect_groups(model, x, y)
    opt = TrackingSGD(model.named_parameters(), 0.1, momentum=0.9, weight_decay=1e-3, groups=groups)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.5)
    tracker = track(model, opt)  # the groups come from the optimizer
    for step in range(20):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
        errors = tracker.errors()
        assert set(errors) == {g.key for g in groups}
        assert tracker.worst_error("exact") < 1e-10, step
        measured = tracker.measured()
        slow = {g.key: _reference(g, dict(model.named_parameters()), None, {}, 1.0) for g in groups}
        for key, value in measured.items():
            np.testing.assert_allclose(value, slow[key]["value"], rtol=1e-12, atol=1e-14)
            np.testing.assert_allclose(
                measure_groups(model, groups)[key].numpy(), value, rtol=1e-12, atol=1e-14
            )
    assert tracker.worst_error("paper") > tracker.worst_error("exact")
    tracker.close()


def test_online_rows_match_a_slow_reference_with_adamw(tmp_path):
    """Every field of every row of online.h5 (AdamW + StepLR) against per-neuron loops."""
    model = _net()
    x, y = _data()
    groups = detect_groups(model, x, y)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    run = tmp_path / "exp" / "run"
    tracker = track(model, opt, groups, run_dir=str(run), every=1, steps_per_epoch=5)
    params = dict(model.named_parameters())
    snaps = [({n: p.detach().clone() for n, p in params.items()}, None, None, None)]
    lrs = []
    for step in range(11):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        before = {n: p.detach().clone() for n, p in params.items()}
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        opt.step()
        sched.step()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        snaps.append(({n: p.detach().clone() for n, p in params.items()}, before, grads, lr))
        if step == 5:
            tracker.log({"test_loss": 1.5, "top1": 0.25})
    lrs.append(opt.param_groups[0]["lr"])
    tracker.close()
    with storage.open_features(str(run), ONLINE_FILE) as f:
        assert storage.num_rows(f) == 12 and f.attrs["complete"]
        np.testing.assert_array_equal(storage.read_steps(f), np.arange(12))
        np.testing.assert_allclose(storage.read_lr(f), lrs)  # lr of the next update
        np.testing.assert_allclose(storage.read_epochs(f), np.arange(12) / 5)
        loss = storage.read_metric(f, "test_loss")
        assert loss[6] == 1.5 and np.isnan(np.delete(loss, 6)).all()
        for g in groups:
            for row, (theta, prev, grads, lr) in enumerate(snaps):
                want = _reference(g, theta, prev, grads, lr)
                for name in FIELDS:
                    got = storage.read_rows(f, measured_path(g.key, name), row)
                    rtol, atol = TOLERANCE[name]
                    np.testing.assert_allclose(
                        got, want[name], rtol=rtol, atol=atol, err_msg=f"{g.key} {name} {row}"
                    )
    history = json.loads((run / "metrics.json").read_text())
    assert history == [{"step": 6, "epoch": 1.2, "test_loss": 1.5, "top1": 0.25}]
    assert json.loads((run / "hyperparameters.json").read_text())["config"]["optimizer"] == "adamw"


def test_every_n_and_log_between(tmp_path):
    model = _net()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = track(model, opt, detect_groups(model, x, y), run_dir=str(tmp_path / "r"), every=3)
    for step in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        if step == 3:
            tracker.log({"top1": 0.5})  # step 4: not a tracked step
    tracker.close()
    with storage.open_features(str(tmp_path / "r"), ONLINE_FILE) as f:
        np.testing.assert_array_equal(storage.read_steps(f), [0, 3, 4, 6])
        g_sq = storage.read_rows(f, measured_path("scale/0", "grad_sq"))
        assert np.isnan(g_sq[[0, 2]]).all() and np.isfinite(g_sq[[1, 3]]).all()


def test_bad_every_is_one_line():
    from Utils.errors import UsageError

    model = _net()
    with pytest.raises(UsageError, match="tracking every -1 steps"):
        track(model, torch.optim.SGD(model.parameters(), lr=0.1), [], every=-1)


_KILLED = """
import os, signal, sys, torch
from torch import nn
sys.path.insert(0, {root!r})
import Utils.online as online
from Utils.api import detect_groups, track
online.BLOCK_ROWS = 4
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
opt = torch.optim.Adam(model.parameters(), lr=1e-2)
tracker = track(model, opt, detect_groups(model, x, y), run_dir={run!r})
for step in range(50):
    opt.zero_grad(); nn.functional.cross_entropy(model(x), y).backward(); opt.step()
    if step == 21:
        os.kill(os.getpid(), signal.SIGKILL)
"""


@pytest.mark.slow
def test_killed_tracker_leaves_a_readable_file(tmp_path):
    run = tmp_path / "exp" / "killed"
    code = _KILLED.format(root=str(ROOT), run=str(run))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == -signal.SIGKILL, done.stderr
    with storage.open_features(str(run), ONLINE_FILE) as f:
        steps = storage.read_steps(f)
        assert len(steps) == 20 and not f.attrs["complete"]  # 5 blocks of 4 rows
        q = storage.read_rows(f, measured_path("scale/0", "value"))
        assert np.isfinite(q).all()
    out = subprocess.run(
        [sys.executable, "cache.py", "--save-dir", str(tmp_path), "--experiment", "exp"]
        + ["--expid", "killed", "--metrics", "scale,translation", "--no-progress"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_train_track_online_matches_checkpoint_extraction(tmp_path):
    """--track-online 1 gives the caches that checkpoints + extract.py give (same run)."""
    from Utils.extraction import extract_run
    from Utils.metrics import cache_run, load_cache
    from Utils.training import train

    train(
        {
            "save_dir": str(tmp_path),
            "experiment": "e",
            "expid": "a",
            "dataset": "synthetic",
            "model": "fc-bn",
            "epochs": 1,
            "lr": 0.05,
            "momentum": 0.9,
            "wd": 1e-3,
            "save_freq": 1,
            "track_online": 1,
            "eval_freq": 10,
            "no_progress": True,
        }
    )
    run = str(tmp_path / "e" / "a")
    extract_run(run, progress=False)
    metrics = "translation,scale,performance"
    cache_run(run, metrics=metrics, progress=False, source="features")
    cache_run(run, metrics=metrics, suffix="_online", progress=False, source="online")
    for kind in ("translation", "scale"):
        a = load_cache(os.path.join(run, "cache", f"{kind}.h5"))
        b = load_cache(os.path.join(run, "cache", f"{kind}_online.h5"))
        for axis in ("steps", "epoch", "lr", "time"):
            np.testing.assert_array_equal(a[axis], b[axis])
        layers = [k for k in a["groups"][kind] if k != "attrs"]
        assert layers
        for layer in layers:
            ga, gb = a["groups"][kind][layer], b["groups"][kind][layer]
            for name in ("empirical", "magnitude", "theory_exact", "theory_paper"):
                np.testing.assert_allclose(gb[name], ga[name], rtol=1e-13, atol=0)
            for name in ("error_exact", "error_paper"):
                np.testing.assert_allclose(gb[name], ga[name], rtol=1e-6, atol=1e-14)
    pa = load_cache(os.path.join(run, "cache", "performance.h5"))
    pb = load_cache(os.path.join(run, "cache", "performance_online.h5"))
    np.testing.assert_array_equal(pa["steps"], pb["steps"])
    for name in ("test_loss", "top1"):
        np.testing.assert_array_equal(pa["metrics"][name], pb["metrics"][name])


@pytest.mark.slow
def test_own_loop_example_then_cache_and_plot(tmp_path):
    """scripts/own_loop_example.py (own model, AdamW, own loop) -> cache.py -> plot.py."""
    run = tmp_path / "mine" / "run1"
    env = {**os.environ, "MPLBACKEND": "Agg"}

    def call(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    call(str(ROOT / "scripts" / "own_loop_example.py"), str(run), "60")
    flags = ["--save-dir", str(tmp_path), "--experiment", "mine", "--expid", "run1"]
    out = call(str(ROOT / "cache.py"), *flags, "--no-progress")
    for metric in ("translation", "scale", "rescale", "performance"):
        assert f"{metric}" in out and "computed" in out.split(metric, 1)[1].splitlines()[0]
    # an own loop writes no checkpoints: extract.py's one line points to cache.py instead
    extract = subprocess.run(
        [sys.executable, str(ROOT / "extract.py"), *flags, "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert extract.returncode != 0 and "Traceback" not in extract.stderr
    line = extract.stderr.strip().splitlines()[-1]
    assert "online.h5" in line and "cache.py" in line and "--source online" in line, line
    call(str(ROOT / "plot.py"), *flags)
    for name in ("translation", "scale", "rescale", "performance"):
        assert (run / "figures" / f"{name}.png").stat().st_size > 10_000
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss/train", "loss/test", "accuracy/test_top1", "lr"} <= tags
    assert any(t.startswith("violation/scale/") for t in tags)
    assert any(t.startswith("angular_update/rescale/") for t in tags)


_PLUGIN = """
import torch
from torch import nn


def tiny(input_shape, num_classes):
    size = int(torch.tensor(input_shape).prod())
    return nn.Sequential(
        nn.Flatten(), nn.Linear(size, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, num_classes)
    )


def broken(input_shape, num_classes):
    raise ValueError("no such layer size")


def not_a_model(input_shape, num_classes):
    return 3


def blobs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long() + (x[:, 0, 0, 0] > 0).long()
    return x[:192], y[:192], x[192:], y[192:]
"""


def _train_cli(cwd: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *flags],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model", "a.b:c"], "--model a.b:c: cannot import a.b"),
        pytest.param(
            ["--model", "mynets:nope"], "mynets has no attribute nope", marks=pytest.mark.slow
        ),
        pytest.param(["--model", "mynets"], "unknown --model 'mynets'", marks=pytest.mark.slow),
        pytest.param(
            ["--dataset", "mynets:nothere"],
            "--dataset mynets:nothere: mynets has no attribute",
            marks=pytest.mark.slow,
        ),
        (["--model", "mynets:broken", "--dataset", "mynets:blobs"], "raised ValueError"),
        pytest.param(
            ["--model", "mynets:not_a_model", "--dataset", "mynets:blobs"],
            "not a torch.nn.Module",
            marks=pytest.mark.slow,
        ),
    ],
)
def test_bad_model_or_dataset_spec_is_one_line_and_exit_2(tmp_path, flags, expected):
    """A bad --model/--dataset package.module:builder: one line, exit 2, nothing written."""
    (tmp_path / "mynets.py").write_text(_PLUGIN)
    run = ["--save-dir", str(tmp_path / "res"), "--expid", "x"]
    done = _train_cli(tmp_path, *flags, *run, "--epochs", "1", "--no-progress")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], done.stderr
    assert not (tmp_path / "res").exists()


@pytest.mark.slow
def test_own_model_and_dataset_from_the_cli_tracked_online(tmp_path):
    (tmp_path / "mynets.py").write_text(_PLUGIN)
    flags = ["--save-dir", str(tmp_path / "res"), "--experiment", "own", "--expid", "a"]
    done = _train_cli(
        tmp_path,
        *flags,
        "--model",
        "mynets:tiny",
        "--dataset",
        "mynets:blobs",
        "--epochs",
        "2",
        "--train-batch-size",
        "32",
        "--momentum",
        "0.9",
        "--track-online",
        "1",
        "--save-freq",
        "0",
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    run = tmp_path / "res" / "own" / "a"
    with storage.open_features(str(run), ONLINE_FILE) as f:
        assert storage.num_rows(f) == 13  # steps 0..12, every step
        assert "theory/scale/1/exact" in f
    cache = subprocess.run(
        [sys.executable, str(ROOT / "cache.py"), *flags, "--source", "online", "--no-progress"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert cache.returncode == 0, cache.stderr
    assert "scale" in cache.stdout


def test_live_lines_and_tensorboard_scalars_in_process(tmp_path):
    """LiveFeedback on an own loop: one line per evaluation, scalars read back by TensorBoard."""
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from Utils.live import LiveFeedback

    model = _net(eps=1e-30, dtype=torch.float64)
    x, y = _data(dtype=torch.float64)
    groups = detect_groups(model, x, y)
    opt = TrackingSGD(model.named_parameters(), 0.05, momentum=0.9, groups=groups)
    tracker = track(model, opt, every=5, steps_per_epoch=10)
    out = io.StringIO()
    live = LiveFeedback(
        tracker, total_steps=20, lines=True, tensorboard_dir=str(tmp_path / "tb"), stream=out
    )
    for step in range(20):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if (step + 1) % 5 == 0:
            live.evaluation({"train_loss": loss.item(), "test_loss": 1.0, "top1": 0.5})
    live.close()
    tracker.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[-1].startswith("step 20/20  epoch 2.00  lr 0.05  train_loss ")
    worst = float(lines[-1].split("worst exact error ")[1])
    assert worst < 1e-10  # exactly scale-invariant float64 model
    ea = EventAccumulator(str(tmp_path / "tb"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    for key in ("scale/0", "rescale/3->5", "translation/5"):
        assert f"theory_error_exact/{key}" in tags and f"theory_error_paper/{key}" in tags
        assert f"violation/{key}" in tags
    assert {"loss/train", "loss/test", "accuracy/test_top1", "lr"} <= tags
    angle = ea.Scalars("angular_update/scale/0")
    assert [e.step for e in angle] == [5, 10, 15, 20] and all(e.value > 0 for e in angle)
    assert all(e.value < 1e-10 for e in ea.Scalars("theory_error_exact/scale/0"))


@pytest.mark.slow
def test_train_lines_tensorboard_and_cache_summary(tmp_path):
    """train.py piped: a line per evaluation; --tensorboard events; cache.py's summary."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = ["--save-dir", str(tmp_path), "--experiment", "e", "--expid", "a"]
    done = _train_cli(
        tmp_path,
        *flags,
        *["--dataset", "synthetic", "--model", "fc", "--epochs", "1", "--eval-freq", "8"],
        *["--save-freq", "4", "--momentum", "0.9", "--tensorboard"],
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert [line.split()[1] for line in lines] == ["0/32", "8/32", "16/32", "24/32", "32/32"]
    assert all("test_loss" in line and "worst exact error" in line for line in lines)
    ea = EventAccumulator(str(tmp_path / "e" / "a" / "tensorboard"))
    ea.Reload()
    tags = set(ea.Tags()["scalars"])
    assert {"loss/train", "loss/test", "accuracy/test_top1"} <= tags
    assert any(t.startswith("theory_error_exact/rescale/") for t in tags)
    assert any(t.startswith("angular_update/rescale/") for t in tags)
    assert any(t.startswith("violation/translation/") for t in tags)
    for script in ("extract.py", "cache.py"):
        step = subprocess.run(
            [sys.executable, str(ROOT / script), *flags, "--no-progress"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert step.returncode == 0, step.stderr
    summary = step.stdout.strip().splitlines()
    assert summary[-1] == f"next: python plot.py --save-dir {tmp_path} --experiment e --expid a"
    table = summary[summary.index(next(s for s in summary if s.startswith("group "))) :]
    assert any(s.startswith("translation/") for s in table)
    assert any(s.startswith("rescale/") for s in table)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_files_follow_the_umask(tmp_path, mask):
    """JSON, checkpoints (torch.save) and copied files get 0666 & ~umask, not mkstemp's 0600."""
    from Utils import fileio

    old = os.umask(mask)
    try:
        fileio.write_json(str(tmp_path / "a.json"), {"x": 1})
        fileio.atomic_torch_save({"w": torch.zeros(2)}, str(tmp_path / "c.pt"))
        fileio.atomic_write_text(str(tmp_path / "t.txt"), "x")
    finally:
        os.umask(old)
    for name in ("a.json", "c.pt", "t.txt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


@pytest.mark.slow
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_every_file_of_a_run_follows_the_umask(tmp_path, mask):
    """train (checkpoints, online.h5, JSON) -> extract -> cache -> plot under umask 022 / 077."""
    code = f"""
import os, sys
os.umask({mask})
sys.path.insert(0, {str(ROOT)!r})
from Utils.training import train
from Utils.extraction import extract_run
from Utils.metrics import cache_run
from Utils.figures.runner import make_figures
train({{"save_dir": {str(tmp_path)!r}, "experiment": "e", "expid": "a", "dataset": "synthetic",
       "model": "fc-bn", "epochs": 1, "save_freq": 16, "track_online": 4, "no_progress": True}})
run = os.path.join({str(tmp_path)!r}, "e", "a")
extract_run(run, progress=False)
cache_run(run, metrics="scale,performance", progress=False)
make_figures({str(tmp_path)!r}, "e", "a", metrics=["scale", "performance"])
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, "MPLBACKEND": "Agg"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    files = [p for p in (tmp_path / "e" / "a").rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".pt", ".json", ".h5", ".png"} <= kinds, kinds
    for path in files:
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path


@pytest.mark.slow
def test_resumed_run_rewrites_online_rows_to_the_uninterrupted_file(tmp_path):
    """A run resumed from an earlier checkpoint rewrites online.h5 rows bitwise as before."""
    from Utils.training import train

    base = {
        "save_dir": str(tmp_path),
        "experiment": "e",
        "dataset": "synthetic",
        "model": "fc-bn",
        "epochs": 1,
        "lr": 0.05,
        "momentum": 0.9,
        "save_freq": 8,
        "track_online": 1,
        "deterministic": True,
        "no_progress": True,
    }
    train({**base, "expid": "a"})
    run = tmp_path / "e" / "a"
    with storage.open_features(str(run), ONLINE_FILE) as f:
        want = {p: f[p][:] for p in storage._row_datasets(f)}
        want_steps = storage.read_steps(f)
    for ckpt in sorted((run / "ckpt").iterdir())[-2:]:  # as if killed after step 16
        ckpt.unlink()
    train({**base, "expid": "a", "resume": True})
    with storage.open_features(str(run), ONLINE_FILE) as f:
        np.testing.assert_array_equal(storage.read_steps(f), want_steps)
        for path, values in want.items():
            if path != storage.SOURCES:
                np.testing.assert_array_equal(f[path][:], values, err_msg=path)


def test_existing_online_run_is_not_replaced_silently(tmp_path):
    from Utils.errors import UserError

    model = _net()
    run = str(tmp_path / "e" / "r")
    track(model, torch.optim.SGD(model.parameters(), lr=0.1), [], run_dir=run).close()
    with pytest.raises(UserError, match="already exists; choose another run folder"):
        track(model, torch.optim.SGD(model.parameters(), lr=0.1), [], run_dir=run)
    track(model, torch.optim.SGD(model.parameters(), lr=0.1), [], run_dir=run, overwrite=True)


def test_extra_theory_source_with_a_prefix(tmp_path):
    """A source with snapshot() (as a budget tracker has) lands in theory/<key>/<prefix><f>."""

    class Constant:
        def __init__(self, groups):
            self.groups = groups

        def snapshot(self):
            return {g.key: {"decay": np.full(g.size, 2.0)} for g in self.groups}

    model = _net()
    x, y = _data()
    groups = detect_groups(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = tmp_path / "e" / "r"
    tracker = track(model, opt, groups, run_dir=str(run), theory_sources=[("b_", Constant(groups))])
    for _ in range(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    assert tracker.theory()["scale/0"]["b_decay"].tolist() == [2.0] * 8
    tracker.close()
    with storage.open_features(str(run), ONLINE_FILE) as f:
        assert storage.read_theory(f, "scale/0", "b_decay").shape == (3, 8)
