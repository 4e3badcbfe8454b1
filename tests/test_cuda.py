"""The theory, the budget and the pipeline on a CUDA GPU (skipped where none is visible).

CI has no GPU; these run where one is lent (``python -m pytest tests/test_cuda.py``). The
fused CPU kernels (`Utils.fastsums`) are not used on a GPU: the torch path runs there.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from test_budget import OPTIMIZERS_UNDER_TEST, SYM_GROUPS, budget_run
from test_cache import make_run, max_errors
from test_theory import CONFIGS, train
from test_train import TINY, assert_equal_nested

from Utils.checkpoint import list_checkpoints, load_checkpoint
from Utils.metrics import cache_run, load_cache
from Utils.training import train as train_run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_budget_identity_on_cuda(name, dtype, tol):
    """decay + leak + kinetic + discretisation == measured change on the GPU too."""
    worst, _, tracker = budget_run(name, dtype, device="cuda")
    assert set(tracker.state) == {g.key for g in SYM_GROUPS}, tracker.skipped
    assert max(worst.values()) <= tol, worst


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_exact_theory_on_cuda(config):
    """TrackingSGD's exact theory matches the GPU's measurement (float64 1e-9, float32 1e-4)."""
    errors = train(CONFIGS[config], torch.float64, device="cuda")["errors"]
    assert max(errors.values()) <= 1e-9, errors
    errors = train(CONFIGS[config], torch.float32, device="cuda")["errors"]
    assert max(errors.values()) <= 1e-4, errors


def test_cuda_run_resumes_bitwise_and_matches_the_cpu(tmp_path):
    """A float64 GPU run resumes bitwise and ends within 1e-9 of the same run on the CPU."""
    base = {**TINY, "save_dir": str(tmp_path), "dtype": "float64", "save_buffers": "grad"}
    full = train_run({**base, "expid": "full", "device": "cuda"})
    cut = train_run({**base, "expid": "cut", "device": "cuda"})
    for path in list_checkpoints(cut.run_dir):
        if load_checkpoint(path)["step"] > 7:
            os.remove(path)
    train_run({**base, "expid": "cut", "device": "cuda", "resume": True})
    a = [load_checkpoint(p) for p in list_checkpoints(full.run_dir)]
    b = [load_checkpoint(p) for p in list_checkpoints(cut.run_dir)]
    assert [c["step"] for c in a] == [c["step"] for c in b]
    for x, y in zip(a, b):
        for key in ("model", "optimizer", "budget", "step"):
            assert_equal_nested(x[key], y[key], f"step {x['step']} {key}")
    cpu = train_run({**base, "expid": "cpu", "device": "cpu"})
    last_gpu = load_checkpoint(list_checkpoints(full.run_dir)[-1])["model"]
    last_cpu = load_checkpoint(list_checkpoints(cpu.run_dir)[-1])["model"]
    for name, value in last_cpu.items():
        if value.is_floating_point():
            scale = max(float(value.abs().max()), 1e-3)
            err = float((last_gpu[name].cpu() - value).abs().max()) / scale
            assert err <= 1e-9, (name, err)


def test_pipeline_on_cuda(tmp_path):
    """train.py --device cuda -> extract -> cache: exact theory within 1e-4 (float32)."""
    run = make_run(tmp_path, "fc-bn", "grad,update", device="cuda")
    statuses = cache_run(str(run), progress=False)
    assert statuses["scale"] == statuses["translation"] == "computed", statuses
    for kind in ("translation", "scale", "rescale"):
        errors = max_errors(run, kind)
        assert errors and max(errors.values()) <= 1e-4, (kind, errors)
    features = load_cache(str(run / "cache" / "weights_grads_full.h5"))
    assert np.all(np.isfinite(features["weights"]))
