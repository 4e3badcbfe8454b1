"""cache.py on tiny real runs: train.py -> extract.py -> cache.py.

Two runs are trained in-process (synthetic data, custom_sgd, momentum 0.9, wd 5e-4, an lr drop
after epoch 1, mid-epoch evaluations): ``fc-bn`` (translation and scale groups, grad and update
buffers) and plain ``fc`` (translation and rescale groups, no buffers).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import extract
import train
from Utils.errors import UnknownNameError, UserError
from Utils.metrics import METRICS, cache_run, load_cache
from Utils.metrics.io import CacheWriter, cache_info, remove_stale_temporaries

ROOT = Path(__file__).resolve().parent.parent
TRAIN_FLAGS = [
    "--dataset",
    "synthetic",
    "--epochs",
    "2",
    "--lr-drops",
    "1",
    "--train-batch-size",
    "256",
    "--save-freq",
    "2",
    "--eval-freq",
    "6",
    "--optimizer",
    "custom_sgd",
    "--momentum",
    "0.9",
    "--wd",
    "5e-4",
    "--lr",
    "0.1",
    "--no-progress",
]


def make_run(
    save_dir: Path, model: str, buffers: str, expid: str = "a", device: str = "auto"
) -> Path:
    """Trains and extracts a tiny run; returns its folder."""
    flags = ["--experiment", "t", "--expid", expid, "--save-dir", str(save_dir)]
    model_flags = ["--model", model, "--device", device]
    assert train.main([*flags, *model_flags, *TRAIN_FLAGS, "--save-buffers", buffers]) == 0
    assert extract.main([*flags, "--no-progress"]) == 0
    return save_dir / "t" / expid


@pytest.fixture(scope="module")
def bn_run(tmp_path_factory) -> Path:
    """The fc-bn run (grad and update buffers)."""
    return make_run(tmp_path_factory.mktemp("bn"), "fc-bn", "grad,update")


@pytest.fixture(scope="module")
def fc_run(tmp_path_factory) -> Path:
    """The plain fc run (no buffers)."""
    return make_run(tmp_path_factory.mktemp("fc"), "fc", "")


@pytest.fixture(scope="module")
def bn_statuses(bn_run) -> dict[str, str]:
    """Every metric of the fc-bn run, cached once."""
    return cache_run(str(bn_run), progress=False)


def cache_files(run: Path) -> list[str]:
    """Names in a run's cache folder."""
    folder = run / "cache"
    return sorted(os.listdir(folder)) if folder.is_dir() else []


def max_errors(run: Path, kind: str, field: str = "exact") -> dict[str, float]:
    """Largest relative error per valid group of one kind (per neuron and layer sum)."""
    cache = load_cache(str(run / "cache" / f"{kind}.h5"))
    out = {}
    for layer, data in cache["groups"][kind].items():
        if layer == "attrs" or not bool(data["attrs"]["valid"]):
            continue
        per_neuron = data[f"error_{field}"][1:]  # row 0 is the initial value itself
        out[layer] = max(float(np.max(per_neuron)), float(np.max(data[f"error_{field}_sum"])))
        assert np.all(np.isfinite(per_neuron))
    return out


def test_bn_run_all_metrics(bn_run, bn_statuses):
    """Every metric is computed (rescale: the BatchNorm affine groups); exact theory within 1e-4."""
    expected = {n: "computed" for n in METRICS.names()}
    assert bn_statuses == expected
    assert cache_files(bn_run) == sorted(f"{n}.h5" for n in expected)
    for kind in ("translation", "scale", "rescale"):
        errors = max_errors(bn_run, kind)
        assert errors, f"no valid {kind} group"
        assert max(errors.values()) <= 1e-4, (kind, errors)
    groups = json.loads((bn_run / "groups.json").read_text())
    scale = load_cache(str(bn_run / "cache" / "scale.h5"))
    valid = {g["name"] for g in groups if g["kind"] == "scale" and g["valid"]}
    assert {k for k in scale["groups"]["scale"] if k != "attrs"} >= valid


def test_bn_run_other_metrics(bn_run, bn_statuses):
    """Performance, weight matrices, violations and distances on the real run."""
    history = json.loads((bn_run / "metrics.json").read_text())
    perf = load_cache(str(bn_run / "cache" / "performance.h5"))
    assert perf["steps"].tolist() == [h["step"] for h in history] == [0, 6, 12, 18, 24, 30, 32]
    np.testing.assert_allclose(perf["metrics"]["test_loss"], [h["test_loss"] for h in history])
    full = load_cache(str(bn_run / "cache" / "weights_grads_full.h5"))
    rows = len(full["steps"])
    assert rows == 17 and full["weights"].shape == full["grads"].shape
    assert full["weights"].shape[1] == int(full["offsets"][-1])
    sub = load_cache(str(bn_run / "cache" / "weights_grads.h5"))
    assert sub["weights"].shape == (rows, 1000)
    assert np.all(np.isnan(sub["grads"][0])) and np.all(np.isfinite(sub["grads"][1:]))
    viol = load_cache(str(bn_run / "cache" / "symmetry_violation.h5"))
    for kind in ("translation", "scale"):
        for layer, data in viol["groups"][kind].items():
            if layer != "attrs" and bool(data["attrs"]["valid"]):
                # c_A is taken at the parameters the gradient was computed at (a step earlier)
                assert np.nanmax(data["violation"]) < 1e-3, (kind, layer)
    dist = load_cache(str(bn_run / "cache" / "distance.h5"))
    assert dist["total"][0] == 0 and np.all(dist["total"][1:] > 0)


def test_fc_run_rescale_and_skips(fc_run):
    """Rescale theory within 1e-4; metrics that do not apply are skipped with a reason."""
    statuses = cache_run(str(fc_run), progress=False)
    for name in ("translation", "rescale", "performance", "network", "phase", "norms"):
        assert statuses[name] == "computed", (name, statuses[name])
    assert "BatchNorm" in statuses["scale"]
    for name in ("gradient", "weights_grads", "weights_grads_full", "symmetry_violation"):
        assert statuses[name].startswith("skipped: ") and "--save-buffers grad" in statuses[name]
    for kind in ("translation", "rescale"):
        errors = max_errors(fc_run, kind)
        assert errors and max(errors.values()) <= 1e-4, (kind, errors)
    phase = load_cache(str(fc_run / "cache" / "phase.h5"))
    assert not bool(phase["attrs"]["paper"])


def test_reuse_overwrite_and_suffix(bn_run, bn_statuses):
    """Up-to-date caches are reused; --overwrite, --suffix and --subset."""
    again = cache_run(str(bn_run), progress=False)
    assert {n for n, s in again.items() if s == "up to date"} == set(bn_statuses)
    before = os.stat(bn_run / "cache" / "scale.h5").st_mtime_ns
    assert cache_run(str(bn_run), metrics="scale-momentum", progress=False) == {
        "scale": "up to date"
    }
    assert os.stat(bn_run / "cache" / "scale.h5").st_mtime_ns == before
    assert cache_run(str(bn_run), metrics="scale", overwrite=True, progress=False) == {
        "scale": "computed"
    }
    status = cache_run(str(bn_run), metrics="norms", suffix="_b", progress=False)
    assert status == {"norms": "computed"}
    a = load_cache(str(bn_run / "cache" / "norms.h5"))
    b = load_cache(str(bn_run / "cache" / "norms_b.h5"))
    np.testing.assert_array_equal(a["total"], b["total"])
    os.remove(bn_run / "cache" / "norms_b.h5")
    # A different subset is a different result: recomputed, not reused.
    assert cache_run(str(bn_run), metrics="network", subset=3, progress=False) == {
        "network": "computed"
    }
    net = load_cache(str(bn_run / "cache" / "network.h5"))
    assert net["params"]["fc1.weight"]["values"].shape == (17, 3)
    assert cache_run(str(bn_run), metrics="network", progress=False) == {"network": "computed"}


def test_more_rows_recompute(fc_run, tmp_path):
    """A cache is recomputed once extract.py has added rows."""
    run = Path(shutil.copytree(fc_run.parent.parent, tmp_path / "copy")) / "t" / "a"
    shutil.rmtree(run / "cache", ignore_errors=True)
    os.remove(run / "features.h5")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    ckpts = sorted(os.listdir(run / "ckpt"))
    for name in ckpts[-3:]:
        shutil.move(run / "ckpt" / name, hidden / name)
    flags = ["--experiment", "t", "--expid", "a", "--save-dir", str(tmp_path / "copy")]
    assert extract.main([*flags, "--no-progress"]) == 0
    assert cache_run(str(run), metrics="norms", progress=False) == {"norms": "computed"}
    assert cache_info(str(run / "cache" / "norms.h5"))["source_rows"] == len(ckpts) - 3
    for name in ckpts[-3:]:
        shutil.move(hidden / name, run / "ckpt" / name)
    assert extract.main([*flags, "--no-progress"]) == 0
    assert cache_run(str(run), metrics="norms", progress=False) == {"norms": "computed"}
    info = cache_info(str(run / "cache" / "norms.h5"))
    assert info["source_rows"] == len(ckpts) and info["source_last_step"] == 32


def bad_cases(fc_run: Path, tmp_path: Path) -> list[tuple[list[str], int, str]]:
    """(cache.py arguments, exit status, text the one-line error must contain)."""
    save = str(fc_run.parent.parent)
    (tmp_path / "t" / "empty").mkdir(parents=True)
    return [
        (["--save-dir", save, "--expid", "a", "--metrics", "scale,nope"], 2, "nope"),
        (["--save-dir", str(tmp_path), "--expid", "empty"], 1, "python extract.py"),
        (["--save-dir", str(tmp_path), "--expid", "missing"], 1, "does not exist"),
        (["--save-dir", save, "--expid", "a", "--metrics", "scale"], 1, "BatchNorm"),
        (["--save-dir", save, "--expid", "a", "--metrics", "gradient"], 1, "--save-buffers grad"),
        (["--save-dir", save, "--expid", "a", "--subset", "0"], 2, "--subset"),
    ]


def test_bad_inputs_in_process(fc_run, tmp_path, capsys):
    """Bad inputs: one-line error, exit status, nothing written (cache.main)."""
    import cache

    shutil.rmtree(fc_run / "cache", ignore_errors=True)
    for args, code, text in bad_cases(fc_run, tmp_path):
        assert cache.main(["--experiment", "t", *args]) == code, args
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and text in err and "\n" not in err, err
        assert cache_files(fc_run) == []
    with pytest.raises(UnknownNameError):
        cache_run(str(fc_run), metrics="bogus")
    with pytest.raises(UserError):
        cache_run(str(fc_run), metrics=["rescale", "scale"])
    assert cache_files(fc_run) == []


@pytest.mark.slow
def test_bad_inputs_real_cli(fc_run, tmp_path):
    """Bad inputs through the real CLI: one line, no traceback, nothing written."""
    shutil.rmtree(fc_run / "cache", ignore_errors=True)
    for args, code, text in bad_cases(fc_run, tmp_path):
        proc = subprocess.run(
            [sys.executable, "cache.py", "--experiment", "t", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        err = proc.stderr.strip()
        assert proc.returncode == code, (args, proc.returncode, err)
        assert "Traceback" not in proc.stderr and len(err.splitlines()) == 1, err
        assert text in err
        assert cache_files(fc_run) == []
    assert cache_files(tmp_path / "t" / "empty") == []


@pytest.mark.slow
def test_killed_then_rerun_equals_clean(bn_run, bn_statuses, tmp_path):
    """cache.py killed part-way, then rerun, equals a clean run."""
    copy = tmp_path / "copy"
    run = copy / "t" / "a"
    shutil.copytree(bn_run, run, ignore=shutil.ignore_patterns("cache", "ckpt"))
    cmd = [sys.executable, "cache.py", "--experiment", "t", "--expid", "a"]
    proc = subprocess.Popen(
        [*cmd, "--save-dir", str(copy)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 120
    while not (run / "cache" / "translation.h5").exists() and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    done = [n for n in cache_files(run) if n.endswith(".h5") and not n.startswith(".")]
    assert 0 < len(done) < len(bn_statuses) - 1, done
    statuses = cache_run(str(run), progress=False)
    reused = {n for n, s in statuses.items() if s == "up to date"}
    assert reused == {n[: -len(".h5")] for n in done}
    assert {n for n, s in statuses.items() if s == "computed"} == set(statuses) - reused
    assert not [n for n in cache_files(run) if n.endswith(".tmp")]
    assert cache_files(run) == cache_files(bn_run)
    for name in cache_files(bn_run):
        assert load_equal(run / "cache" / name, bn_run / "cache" / name), name


def load_equal(a: Path, b: Path) -> bool:
    """Whether two cache files hold the same datasets and attributes."""

    def same(x, y) -> bool:
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(same(x[k], y[k]) for k in x)
        return np.array_equal(
            np.asarray(x), np.asarray(y), equal_nan=np.asarray(x).dtype.kind == "f"
        )

    return same(load_cache(str(a)), load_cache(str(b)))


def test_writer_is_atomic(tmp_path):
    """CacheWriter leaves nothing on failure; stale temporaries are removed."""
    path = tmp_path / "cache" / "x.h5"
    with pytest.raises(RuntimeError), CacheWriter(str(path), "x") as w:
        w.append("a", np.ones((2, 3)))
        assert len(os.listdir(tmp_path / "cache")) == 1 and not path.exists()
        raise RuntimeError("stop")
    assert os.listdir(tmp_path / "cache") == []
    with CacheWriter(str(path), "x") as w:
        w.append("a", np.ones((2, 3)))
        w.append("a", np.zeros((1, 3)))
        w.commit()
    assert os.listdir(tmp_path / "cache") == ["x.h5"]
    assert load_cache(str(path))["a"].tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    stale = tmp_path / "cache" / ".x.h5.999999999.tmp"
    stale.write_bytes(b"partial")
    mine = tmp_path / "cache" / f".x.h5.{os.getpid()}.tmp"
    mine.write_bytes(b"in progress")
    assert remove_stale_temporaries(str(path)) == [str(stale)]
    assert mine.exists() and not stale.exists()
