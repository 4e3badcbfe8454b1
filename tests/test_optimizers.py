"""Optimizers: TrackingSGD == torch.optim.SGD, buffers, LAMB, names, state-dict round trip."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch import nn

from Utils import fastsums, theory
from Utils.errors import CorruptFileError, UnknownNameError, UsageError
from Utils.groups import Member, Reducer, SymmetryGroup, group_sum, group_sum_np
from Utils.optimizers import BUFFERS, LAMB, OPTIMIZERS, TrackingSGD, build_optimizer

SGD_CONFIGS = {
    "plain": {},
    "plain_wd": {"weight_decay": 1e-2},
    "momentum": {"momentum": 0.9, "weight_decay": 1e-2},
    "dampening": {"momentum": 0.8, "dampening": 0.3, "weight_decay": 1e-2},
    "nesterov": {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2},
}


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Linear(6, 8) -> ReLU -> Linear(8, 7) -> ReLU -> Linear(7, 3)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 7), nn.ReLU(), nn.Linear(7, 3)
    ).to(dtype)


def mlp_groups() -> list[SymmetryGroup]:
    """Rescale 0->2 and 2->4 and translation at 4, built by hand."""

    def rescale(a: str, b: str, size: int) -> SymmetryGroup:
        members = (
            Member(f"{a}.weight", 0),
            Member(f"{a}.bias", 0),
            Member(f"{b}.weight", 1, sign=-1),
        )
        return SymmetryGroup("rescale", f"{a}->{b}", size, members)

    return [
        rescale("0", "2", 8),
        rescale("2", "4", 7),
        SymmetryGroup(
            "translation", "4", 8, (Member("4.weight", 1), Member("4.bias", None, offset=7))
        ),
    ]


def param_groups(model: nn.Module, config: dict) -> list[dict]:
    """Two torch param groups: the first layer (lr 0.1, twice the wd) and the rest."""
    named = list(model.named_parameters())
    wd = config.get("weight_decay", 0.0)
    return [
        {"params": named[:2], "lr": 0.1, "weight_decay": 2 * wd},
        {"params": named[2:], "lr": 0.05, "weight_decay": wd},
    ]


def batches(steps: int, dtype: torch.dtype, seed: int = 1):
    """Deterministic random batches (x [16, 6], labels [16])."""
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 6, generator=gen, dtype=dtype), torch.randint(0, 3, (16,), generator=gen))
        for _ in range(steps)
    ]


def run_steps(model, opt, sched, data) -> None:
    """Plain training loop with cross-entropy."""
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("with_groups", [False, True])
@pytest.mark.parametrize("config", sorted(SGD_CONFIGS))
def test_tracking_sgd_equals_torch_sgd(config, with_groups, dtype):
    cfg = SGD_CONFIGS[config]
    hyper = {k: v for k, v in cfg.items() if k != "weight_decay"}
    ref_model, model = mlp(dtype), mlp(dtype)
    ref = torch.optim.SGD(param_groups(ref_model, cfg), lr=0.1, **hyper)
    groups = mlp_groups() if with_groups else ()
    opt = TrackingSGD(param_groups(model, cfg), lr=0.1, groups=groups, **hyper)
    scheds = [torch.optim.lr_scheduler.MultiStepLR(o, [50], 0.1) for o in (ref, opt)]
    data = batches(100, dtype)
    run_steps(ref_model, ref, scheds[0], data)
    run_steps(model, opt, scheds[1], data)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005)
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert torch.equal(p, q), name
        if cfg.get("momentum"):
            assert torch.equal(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])
    assert opt.param_names == [n for n, _ in model.named_parameters()]
    if with_groups:
        valid = {g.key: g.valid for g in opt.groups}
        # 0->2 spans both param groups (different lr): no theory; the others have theory
        assert valid == {"rescale/0->2": False, "rescale/2->4": True, "translation/4": True}
        assert "different" in opt.groups[0].reason
        snap = opt.theory_snapshot()
        assert set(snap) == {"rescale/2->4", "translation/4"}
        params = dict(model.named_parameters())
        for g in opt.groups[1:]:
            measured = theory.measure(g, params).numpy()
            scale = np.abs(measured).max()
            tol = 1e-9 if dtype == torch.float64 else 1e-3  # float32 round-off
            np.testing.assert_allclose(snap[g.key]["exact"], measured, atol=tol * scale)
            assert snap[g.key]["time"] == pytest.approx(
                50 * 0.05 * (1 - cfg.get("dampening", 0)) * 1.1
            )


def test_snapshot_at_step_zero_is_the_measurement():
    model = mlp()
    opt = build_optimizer("custom_sgd", model.named_parameters(), lr=0.1, groups=mlp_groups())
    snap = opt.theory_snapshot()
    theory_sd = opt.state_dict()["theory"]
    params = dict(model.named_parameters())
    for g in mlp_groups():
        measured = theory.measure(g, params).numpy()
        for field in ("exact", "paper", "initial"):
            assert np.array_equal(snap[g.key][field], measured)
            assert np.array_equal(theory_sd["state"][g.key][field].numpy(), measured)
        assert snap[g.key]["time"] == 0.0 and theory_sd["time"][g.key] == 0.0
    assert theory_sd["step"] == 0 and theory_sd["param_names"] == list(params)


@pytest.mark.parametrize("name", ["custom_sgd", "adam", "lamb", "sgd"])
def test_grad_and_update_buffers(name):
    model = mlp()
    buffers = ("grad", "update", "grad_norm", "update_norm")
    kwargs = {"momentum": 0.9, "nesterov": True} if name in ("custom_sgd", "sgd") else {}
    opt = build_optimizer(
        name, model.named_parameters(), lr=0.05, weight_decay=1e-2, buffers=buffers, **kwargs
    )
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [3], 0.5)
    for x, y in batches(6, torch.float64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        lr = opt.param_groups[0]["lr"]
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.step()
        sched.step()
        for n, p in model.named_parameters():
            st = opt.state[p]
            assert torch.equal(st["grad"], grads[n])
            assert torch.equal(st["grad_norm"], grads[n] ** 2)
            update = (before[n] - p.detach()) / lr
            scale = before[n].abs().max() / lr
            torch.testing.assert_close(st["update"], update, rtol=0, atol=1e-14 * scale)
            torch.testing.assert_close(st["update_norm"], st["update"] ** 2, rtol=1e-15, atol=0)
    assert opt.param_names == [n for n, _ in model.named_parameters()]


def test_sgd_and_mom_buffers_give_the_paper_prediction():
    """group_sum(sgd) + exp(-2 lam t) Q_0 and group_sum(mom) + h(t) Q_0 equal the paper's X."""
    lam = 1e-2
    for momentum, buffer in ((0.0, "sgd"), (0.9, "mom")):
        model = mlp()
        opt = build_optimizer(
            "custom_sgd",
            model.named_parameters(),
            lr=0.1,
            momentum=momentum,
            weight_decay=lam,
            groups=mlp_groups(),
            buffers=(buffer,),
        )
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [20 if momentum == 0 else 1000], 0.1)
        run_steps(model, opt, sched, batches(40, torch.float64))
        snap = opt.theory_snapshot()
        per_param = {n: opt.state[p][buffer] for n, p in model.named_parameters()}
        for g in mlp_groups()[:2]:
            s = snap[g.key]
            forced = group_sum(per_param, g).numpy()
            if momentum == 0:
                homogeneous = math.exp(-2 * lam * s["time"]) * s["initial"]
            else:
                hp = theory.Hyper(0.1, momentum, 0.0, lam)
                gamma, omega2 = hp.oscillator("scale")
                homogeneous = theory.oscillator_coefficients(gamma, omega2, float(s["time"]))[0]
                homogeneous = homogeneous * s["initial"]
            np.testing.assert_allclose(forced + homogeneous, s["paper"], rtol=1e-12)
            assert np.abs(forced).max() > 1e-6  # the forcing matters


def numpy_lamb(w, b, x, y, steps, lr, wd, betas=(0.9, 0.999), eps=1e-6):
    """LAMB from You et al. 2019 on least squares 0.5 mean |x W^T + b - y|^2, in NumPy."""
    params = [w.copy(), b.copy()]
    m = [np.zeros_like(p) for p in params]
    v = [np.zeros_like(p) for p in params]
    history = []
    for t in range(1, steps + 1):
        r = x @ params[0].T + params[1] - y  # [B, out]
        grads = [r.T @ x / len(x), r.sum(axis=0) / len(x)]
        for i, (p, g) in enumerate(zip(params, grads)):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            m_hat = m[i] / (1 - betas[0] ** t)
            v_hat = v[i] / (1 - betas[1] ** t)
            update = m_hat / (np.sqrt(v_hat) + eps) + wd * p
            w_norm, u_norm = np.linalg.norm(p), np.linalg.norm(update)
            trust = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
            params[i] = p - lr * trust * update
        history.append([p.copy() for p in params])
    return history


def test_lamb_matches_numpy_reference():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)), rng.normal(size=(32, 3))
    w0, b0 = rng.normal(size=(3, 4)), np.zeros(3)  # zero bias: trust ratio 1 on step 1
    layer = nn.Linear(4, 3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(w0))
        layer.bias.copy_(torch.from_numpy(b0))
    opt = build_optimizer("lamb", layer.named_parameters(), lr=0.02, weight_decay=0.01)
    assert isinstance(opt, LAMB)
    expected = numpy_lamb(w0, b0, x, y, steps=25, lr=0.02, wd=0.01)
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    for want_w, want_b in expected:
        opt.zero_grad()
        (0.5 * ((layer(tx) - ty) ** 2).sum(dim=1).mean()).backward()
        opt.step()
        np.testing.assert_allclose(layer.weight.detach().numpy(), want_w, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(layer.bias.detach().numpy(), want_b, rtol=1e-12, atol=1e-14)
    assert np.abs(expected[-1][1]).max() > 1e-3  # the bias moved off zero


def test_every_registered_optimizer_builds_and_steps():
    assert set(OPTIMIZERS.names()) == {
        "custom_sgd",
        "sgd",
        "momentum",
        "adam",
        "adamw",
        "rms",
        "lamb",
    }
    assert set(BUFFERS.names()) == {"grad", "update", "grad_norm", "update_norm", "sgd", "mom"}
    for name in OPTIMIZERS.names():
        model = mlp()
        opt = build_optimizer(name, model.named_parameters(), lr=0.01, momentum=0.9)
        before = [p.detach().clone() for p in model.parameters()]
        x, y = batches(1, torch.float64)[0]
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters())), name
        assert opt.param_names[0] == "0.weight"


def test_bad_names_and_values():
    named = list(mlp().named_parameters())
    with pytest.raises(UnknownNameError, match="custom_sgd"):
        build_optimizer("nope", named, lr=0.1)
    with pytest.raises(UnknownNameError, match="update_norm"):
        build_optimizer("custom_sgd", named, lr=0.1, buffers=("grad", "nope"))
    with pytest.raises(UsageError, match="custom_sgd"):
        build_optimizer("adam", named, lr=0.1, buffers=("sgd",))
    with pytest.raises(UsageError, match="momentum"):
        build_optimizer("momentum", named, lr=0.1)
    for name in ("custom_sgd", "sgd"):
        with pytest.raises(UsageError, match="nesterov"):
            build_optimizer(name, named, lr=0.1, nesterov=True)
        with pytest.raises(UsageError, match="nesterov"):
            build_optimizer(name, named, lr=0.1, momentum=0.9, dampening=0.1, nesterov=True)
        with pytest.raises(UsageError, match="lr"):
            build_optimizer(name, named, lr=-1.0)
    with pytest.raises(UsageError):
        build_optimizer("adam", named, lr=-1.0)
    for err in (UnknownNameError, UsageError):
        assert issubclass(err, UsageError)


def test_reducer_equals_group_sum():
    """The fused reducer of TrackingSGD against Utils.groups.group_sum, with a step axis."""
    gen = torch.Generator().manual_seed(0)
    shapes = {"a": (5, 3, 2, 2), "b": (5,), "c": (4, 20), "d": (4,)}
    groups = [
        SymmetryGroup("scale", "a", 5, (Member("a", 0), Member("b", 0))),
        SymmetryGroup(
            "rescale", "a->c", 5, (Member("a", 0), Member("b", 0), Member("c", 1, 4, sign=-1))
        ),
        SymmetryGroup("translation", "c", 21, (Member("c", 1), Member("d", None, offset=20))),
        SymmetryGroup("rescale", "odd", 4, (Member("d", 0, offset=0), Member("c", 0, sign=-1))),
    ]
    x = {n: torch.randn(3, *s, generator=gen, dtype=torch.float64) for n, s in shapes.items()}
    reducer = Reducer(groups, {n: len(s) for n, s in shapes.items()})
    stacked = reducer(x)  # [3, total]
    single = reducer({n: t[1] for n, t in x.items()})  # [total]
    arrays = {n: t.numpy() for n, t in x.items()}
    want = np.concatenate([group_sum_np(arrays, g, lead=1) for g in groups], axis=-1)  # [3, total]
    np.testing.assert_allclose(stacked.numpy(), want, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(single, stacked[1], rtol=0, atol=0)
    for row in range(3):
        one = torch.cat([group_sum({n: t[row] for n, t in x.items()}, g) for g in groups])
        np.testing.assert_allclose(one.numpy(), want[row], rtol=1e-14, atol=1e-14)
    # squares: "c" is kept by rows in one group and by columns in another (one shared pass),
    # "a" (4-d) by rows; float32 and float64 inputs
    sq = {n: a * a for n, a in arrays.items()}
    want_sq = np.concatenate([group_sum_np(sq, g, lead=1) for g in groups], axis=-1)
    for dtype in (torch.float64, torch.float32):
        for row in range(3):
            got = reducer.squares({n: t[row].to(dtype) for n, t in x.items()})
            ref = want_sq[row]
            if dtype == torch.float32:
                narrow = {n: t[row].float().double().numpy() for n, t in x.items()}
                ref = np.concatenate(
                    [group_sum_np({n: a * a for n, a in narrow.items()}, g) for g in groups]
                )
            np.testing.assert_allclose(got.numpy(), ref, rtol=1e-13, atol=1e-14)
    pair = Reducer([groups[1], groups[3]], {n: len(s) for n, s in shapes.items()})
    got = pair.squares({n: t[0] for n, t in x.items()})
    ref = np.concatenate([group_sum_np(sq, g, lead=1)[0] for g in (groups[1], groups[3])])
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-13, atol=1e-14)
    plan = next(iter(pair._plans.values()))
    assert "rowcol" in [p.op for p in plan.parts]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_squares_equal_a_numpy_reference(dtype):
    """`Utils.fastsums` (one pass per tensor) against group_sum_np of the float64 squares:
    rows, columns, a middle axis of a 3-d tensor, 4-d rows and columns, a whole tensor, a
    flatten block, overlapping members, a 1-d member; non-contiguous input."""
    gen = torch.Generator().manual_seed(3)
    shapes = {"a": (5, 3, 2, 2), "b": (5,), "c": (4, 20), "d": (4,), "e": (2, 3, 5), "f": (3, 4)}
    groups = [
        SymmetryGroup("scale", "a", 5, (Member("a", 0), Member("b", 0))),
        SymmetryGroup(
            "rescale", "a->c", 5, (Member("a", 0), Member("b", 0), Member("c", 1, 4, sign=-1))
        ),
        SymmetryGroup("translation", "c", 21, (Member("c", 1), Member("d", None, offset=20))),
        SymmetryGroup("rescale", "odd", 4, (Member("d", 0), Member("c", 0, sign=-1))),
        SymmetryGroup("scale", "mid", 3, (Member("e", 1), Member("a", 1, sign=-1))),
        SymmetryGroup("scale", "last", 5, (Member("e", 2), Member("f", None, offset=4))),
        SymmetryGroup("scale", "whole", 1, (Member("a", None),)),
    ]
    x = {
        n: torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for n, s in shapes.items()
    }
    x["f"] = torch.randn(4, 3, generator=gen, dtype=torch.float64).to(dtype).t()  # strided
    reducer = Reducer(groups, {n: len(s) for n, s in shapes.items()})
    names = list(shapes)
    plan = reducer.fused_plan({n: t.shape for n, t in x.items()}, names)
    for _ in range(2):  # the second call reuses the kept arrays
        got = plan.squares([x[n] for n in names])[0]
    wide = {n: t.double().numpy() for n, t in x.items()}
    want = np.concatenate([group_sum_np({n: a * a for n, a in wide.items()}, g) for g in groups])
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    x["a"].mul_(2.0)  # same tensor, new values: read again
    got = plan.squares([x[n] for n in names])[0].copy()
    wide["a"] = x["a"].double().numpy()
    want = np.concatenate([group_sum_np({n: a * a for n, a in wide.items()}, g) for g in groups])
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=0)
    torch.testing.assert_close(torch.from_numpy(got), reducer.squares(x), rtol=1e-14, atol=0)


def test_reducer_accumulates_float32_in_float64():
    """Issue 13: float32 products are summed in float64 (a float32 sum is off by ~1e-8)."""
    gen = torch.Generator().manual_seed(1)
    x = {"w": torch.rand(3, 200_000, generator=gen) + 0.5, "b": torch.rand(3, generator=gen)}
    group = SymmetryGroup("scale", "w", 3, (Member("w", 0), Member("b", 0)))
    reducer = Reducer([group], {"w": 2, "b": 1})
    wide = {n: t.double() for n, t in x.items()}
    want = wide["w"].sum(dim=1) + wide["b"]  # [3] exact sums of the float32 values
    got = reducer(x)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    squares = reducer.squares(x)
    want_sq = (wide["w"] ** 2).sum(dim=1) + wide["b"] ** 2
    torch.testing.assert_close(squares, want_sq, rtol=1e-13, atol=0)
    steps = reducer.square_sums({n: torch.stack([t, 2 * t]) for n, t in x.items()})  # [2, 3]
    torch.testing.assert_close(steps, torch.stack([want_sq, 4 * want_sq]), rtol=1e-13, atol=0)
    torch.testing.assert_close(group_sum(x, group), want, rtol=1e-13, atol=0)


def make_run(buffers=("grad", "update", "sgd", "mom")):
    """A model, TrackingSGD (heavy ball + wd, groups, buffers) and a MultiStepLR at 40."""
    model = mlp(torch.float32)
    opt = build_optimizer(
        "custom_sgd",
        model.named_parameters(),
        lr=0.05,
        momentum=0.9,
        weight_decay=5e-3,
        groups=mlp_groups(),
        buffers=buffers,
    )
    return model, opt, torch.optim.lr_scheduler.MultiStepLR(opt, [40], 0.1)


def assert_same(a, b, path="") -> None:
    """Bitwise equality of nested state (tensors, numbers, strings)."""
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, path


def test_state_dict_round_trip_is_bitwise():
    data = batches(60, torch.float32)
    model, opt, sched = make_run()
    run_steps(model, opt, sched, data)

    first, first_opt, first_sched = make_run()
    run_steps(first, first_opt, first_sched, data[:30])
    blob = io.BytesIO()
    torch.save(
        {
            "model": first.state_dict(),
            "opt": first_opt.state_dict(),
            "sched": first_sched.state_dict(),
        },
        blob,
    )
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    resumed, resumed_opt, resumed_sched = make_run()
    resumed.load_state_dict(saved["model"])
    resumed_opt.load_state_dict(saved["opt"])
    resumed_sched.load_state_dict(saved["sched"])
    run_steps(resumed, resumed_opt, resumed_sched, data[30:])

    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    assert_same(opt.state_dict(), resumed_opt.state_dict())
    assert opt.state_dict()["theory"]["step"] == 60
    assert set(opt.state_dict()["state"][0]) >= {"momentum_buffer", "grad", "update", "sgd", "mom"}


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "copies"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("config", sorted(SGD_CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deferred_theory_reads_the_same_at_any_step(dtype, config, threads, fused, monkeypatch):
    """The ring's deferred group sums are invisible: the theory read after every step (a flush
    each time) is bitwise the one read only at the end, across an lr drop, and matches the
    per-step path without a ring to round-off; with the fused kernels (sums kept) and
    without them (copies of the terms kept)."""
    if fused:
        assert fastsums.AVAILABLE, "numba is in requirements.txt: the fused kernels must load"
    else:
        monkeypatch.setattr(fastsums, "AVAILABLE", False)
    data = batches(40, dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = {}
        for read in ("every step", "at the end", "no ring"):
            model = mlp(dtype)
            opt = build_optimizer(
                "custom_sgd",
                model.named_parameters(),
                lr=0.05,
                groups=mlp_groups(),
                **SGD_CONFIGS[config],
            )
            assert any(b.ring is not None for b in opt._bundles)
            assert all(b.ring.fast == fused for b in opt._bundles if b.ring is not None)
            if read == "no ring":
                for b in opt._bundles:
                    b.ring = None
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, [17], 0.1)
            for x, y in data:
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                opt.step()
                sched.step()
                if read == "every step":
                    opt.theory_snapshot()
            runs[read] = opt.theory_snapshot()
    finally:
        torch.set_num_threads(before)
    assert set(runs["every step"]) == {g.key for g in mlp_groups()}
    for key, fields in runs["at the end"].items():
        for name, value in fields.items():
            assert np.array_equal(value, runs["every step"][key][name]), (key, name)
            np.testing.assert_allclose(value, runs["no ring"][key][name], rtol=1e-12, atol=1e-300)


def test_reducer_sums_of_one_step_do_not_depend_on_the_steps_reduced_with_it():
    """A whole-tensor member (dim None) summed with a leading axis of 1 was split across
    threads, so the deferred sums of one step depended on how many steps were reduced."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gen = torch.Generator().manual_seed(0)
        x = {
            "w": torch.randn(16, 300, 400, generator=gen, dtype=torch.float64),
            "c": torch.randn(16, 32, 16, 3, 3, generator=gen, dtype=torch.float64),
            "d": torch.randn(16, 64, 32, 3, 3, generator=gen, dtype=torch.float64),
        }
        groups = [
            SymmetryGroup("scale", "w", 1, (Member("w", None),)),
            SymmetryGroup("rescale", "c->d", 32, (Member("c", 0), Member("d", 1, sign=-1))),
        ]
        reducer = Reducer(groups, {"w": 2, "c": 4, "d": 4})
        for reduce in (reducer, reducer.square_sums):
            together = reduce(x)  # [16, 33]
            for k in (1, 3, 5):
                for j in range(0, 16 - k + 1, k):
                    part = reduce({n: t[j : j + k] for n, t in x.items()})
                    assert torch.equal(part, together[j : j + k]), (k, j)
    finally:
        torch.set_num_threads(before)


def test_load_refuses_a_state_without_theory():
    model = mlp()
    plain = torch.optim.SGD(model.named_parameters(), lr=0.1)
    opt = build_optimizer("custom_sgd", model.named_parameters(), lr=0.1)
    with pytest.raises(CorruptFileError, match="theory"):
        opt.load_state_dict(plain.state_dict())


def test_group_loses_theory_when_a_parameter_gets_no_gradient():
    model = mlp()
    opt = build_optimizer("custom_sgd", model.named_parameters(), lr=0.1, groups=mlp_groups())
    x, y = batches(1, torch.float64)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    model[4].bias.grad = None
    with pytest.warns(UserWarning, match="translation/4"):
        opt.step()
    valid = {g.key: g.valid for g in opt.groups}
    assert valid == {"rescale/0->2": True, "rescale/2->4": True, "translation/4": False}
    assert "4.bias" in opt.groups[2].reason
    assert set(opt.theory_snapshot()) == {"rescale/0->2", "rescale/2->4"}
    restored = build_optimizer("custom_sgd", model.named_parameters(), lr=0.1, groups=mlp_groups())
    restored.load_state_dict(opt.state_dict())
    assert [g.valid for g in restored.groups] == [True, True, False]


def test_group_across_param_groups_with_equal_hyperparameters():
    """Valid while the two param groups agree; loses its theory when a scheduler splits them."""
    model = mlp()
    named = list(model.named_parameters())
    pgs = [{"params": named[:2]}, {"params": named[2:]}]
    opt = build_optimizer("custom_sgd", pgs, lr=0.1, momentum=0.9, groups=mlp_groups())
    assert all(g.valid for g in opt.groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda k: 1.0, lambda k: 0.5 ** (k >= 3)])
    params = dict(named)
    for i, (x, y) in enumerate(batches(5, torch.float64)):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        if i == 3:
            with pytest.warns(UserWarning, match="rescale/0->2"):
                opt.step()
        else:
            opt.step()
        sched.step()
        if i == 2:
            snap = opt.theory_snapshot()["rescale/0->2"]
            measured = theory.measure(mlp_groups()[0], params).numpy()
            np.testing.assert_allclose(snap["exact"], measured, rtol=1e-12)
    assert [g.valid for g in opt.groups] == [False, True, True]
    assert "diverged" in opt.groups[0].reason


def test_fused_products_equal_a_numpy_reference():
    """`SlicePlan.products` against numpy loops: the five budget planes (g g only where asked),
    the three translation planes, and both kinds of members in one plan, with float32 and
    float64 tensors in one plan (one compiled call per dtype), rows, columns and whole-tensor
    members, signs."""
    from Utils.fastsums import SlicePlan

    rng = np.random.default_rng(5)
    shapes = {"w": (6, 7), "b": (6,), "v": (3, 6), "u": (4, 2, 3)}
    dtypes = {"w": np.float32, "b": np.float32, "v": np.float64, "u": np.float64}
    t0 = {n: rng.standard_normal(s).astype(dtypes[n]) for n, s in shapes.items()}
    t1 = {n: (a + 0.01 * rng.standard_normal(a.shape)).astype(a.dtype) for n, a in t0.items()}
    g = {n: rng.standard_normal(a.shape).astype(a.dtype) for n, a in t0.items()}
    # (param, kept axis or None, entries, sign, wants g g)
    layout = [
        ("w", 0, range(0, 6), 1.0, True),
        ("b", 0, range(0, 6), 1.0, True),
        ("w", 0, range(6, 12), 1.0, False),
        ("v", 1, range(6, 12), -1.0, False),
        ("u", 1, range(12, 14), 1.0, True),
        ("v", None, [14], 1.0, False),
    ]
    names = list(shapes)
    members = [(n, shapes[n], d, list(e), s) for n, d, e, s, _ in layout]
    tensors = {
        k: [torch.from_numpy(v[n]) for n in names] for k, v in (("0", t0), ("1", t1), ("g", g))
    }

    def reference(planes: int, linear: list[bool]) -> np.ndarray:
        out = np.zeros((planes, 15))
        for (n, d, entries, sign, wants), lin in zip(layout, linear):
            a, b, c = (x[n].astype(np.float64) for x in (t0, t1, g))
            delta = b - a
            if lin:
                parts = [a, c, delta]
            else:
                parts = [a * a, delta * delta, a * c, a * delta, c * c if wants else 0 * c]
            for q, part in enumerate(parts):
                axes = tuple(i for i in range(part.ndim) if i != d)
                sums = part.sum(axis=axes) if d is not None else np.array([part.sum()])
                for e, value in zip(entries, sums):
                    out[q, e] += sign * value
        return out

    mixed = [False] * 4 + [True] * 2  # u's columns and all of v: translation-like members
    for planes, linear in ((5, [False] * 6), (3, [True] * 6), (5, mixed)):
        gg = [w for *_, w in layout]
        plan = SlicePlan(members, planes, names, 15, gg=gg, linear=linear)
        got = plan.products(tensors["0"], tensors["1"], tensors["g"]).copy()
        assert len(plan.bind(tensors["0"])) == 2  # one run per dtype
        want = reference(planes, linear)
        if linear == mixed:  # linear entries: theta, g, Delta in planes 0-2, nothing else
            np.testing.assert_array_equal(got[3:, 12:], 0.0)
            np.testing.assert_allclose(got[:3, 12:], want[:3, 12:], rtol=1e-12, atol=1e-12)
            got, want = got[:, :12], want[:, :12]
        if planes == 5:
            # g g: exact where asked, 0 where no pass asked for it; entries 6-11 mix a member
            # read in a pass that computes it (w rows) with one whose pass does not
            asked = [*range(6), 12, 13][: 6 if linear == mixed else 8]
            np.testing.assert_allclose(got[4, asked], want[4, asked], rtol=1e-12, atol=1e-12)
            assert linear == mixed or got[4, 14] == 0.0
            got, want = got[:4], want[:4]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
