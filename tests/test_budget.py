"""Symmetry-breaking budget, equilibrium predictions and the dampening fix (THEORY.md 4, 6).

* Dampening: the paper theory's momentum kick is 2 eta |v|^2 / (1 - delta); on a delta = 0.5
  run it predicts the measured Q per neuron to about 0.1% where the authors' 2 eta (1 - delta)
  |v|^2 was off by tens of percent.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from Utils import fastsums, theory
from Utils.budget import TERMS, BudgetTracker, group_dot, group_total
from Utils.errors import CorruptFileError, UsageError
from Utils.groups import Member, SymmetryGroup, group_sum, groups_from_json
from Utils.metrics.equilibrium import predicted
from Utils.optimizers import build_optimizer


@pytest.fixture(params=[True, False], ids=["fused", "torch"], autouse=True)
def fused(request, monkeypatch) -> bool:
    """Every test runs with the fused CPU kernels (`Utils.fastsums`, numba is a requirement)
    and with the torch reductions (as on a GPU or without numba)."""
    if request.param:
        assert fastsums.AVAILABLE, "numba is in requirements.txt: the fused kernels must load"
    else:
        monkeypatch.setattr(fastsums, "AVAILABLE", False)
    return request.param


EPS_BN = 1e-30  # exact scale invariance (BatchNorm refuses eps = 0)


def bn_mlp(dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """Linear(8, 6) -> BN -> ReLU -> Linear(6, 3): a scale group on the first layer."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(8, 6), nn.BatchNorm1d(6, eps=EPS_BN), nn.ReLU(), nn.Linear(6, 3)
    ).to(dtype)


SCALE0 = SymmetryGroup("scale", "0", 6, (Member("0.weight", 0), Member("0.bias", 0)))


# ----------------------------------------------------------------------------- dampening


def test_kick_is_unchanged_without_dampening():
    """delta = 0: the corrected kick 2 eta / (1 - delta) is the old 2 eta (1 - delta)."""
    for lr, beta in ((0.1, 0.9), (0.03, 0.5), (0.2, 0.0)):
        hp = theory.Hyper(lr, beta, 0.0, 1e-3)
        assert hp.kick == 2.0 * hp.dt
    damped = theory.Hyper(0.1, 0.9, 0.5, 1e-3)
    assert damped.kick == pytest.approx(2.0 * damped.dt / 0.25)


def test_dampened_paper_theory_uses_the_corrected_kick():
    """delta = 0.5: corrected prediction within 2% of the measured Q; the old one >= 20% off."""
    lr, beta, delta, lam, steps = 0.05, 0.9, 0.5, 5e-3, 400
    model = bn_mlp()
    params = dict(model.named_parameters())
    opt = build_optimizer(
        "custom_sgd",
        list(model.named_parameters()),
        groups=[SCALE0],
        lr=lr,
        momentum=beta,
        dampening=delta,
        weight_decay=lam,
    )
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 8, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 3, (256,), generator=gen)
    hp = theory.Hyper(lr, beta, delta, lam)
    old = theory.measure(SCALE0, params)  # [6]
    old_rate = torch.zeros_like(old)
    for _ in range(steps):
        idx = torch.randint(0, 256, (16,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        bufs = {n: opt.state[p]["momentum_buffer"] for n, p in params.items()}
        v2 = theory.measure(SCALE0, bufs)  # |v_k|^2 [6]
        # the authors' kick 2 eta (1 - delta) |v|^2, as a forcing scaled by (1 - delta)^2
        old, old_rate = theory.paper_quadratic_step(old, old_rate, v2 * (1 - delta) ** 2, hp)
    q = theory.measure(SCALE0, params).numpy()
    snap = opt.theory_snapshot()["scale/0"]
    assert np.abs(snap["exact"] / q - 1).max() < 1e-12
    assert np.abs(q / snap["initial"] - 1).max() > 0.3  # Q really moved
    assert np.abs(snap["paper"] / q - 1).max() < 0.02
    assert np.abs(old.numpy() / q - 1).max() > 0.2


# ----------------------------------------------------------------------------- budget


class SymNet(nn.Module):
    """Linear(8, 6) -> BN -> ReLU -> Linear(6, 5) -> ReLU -> Linear(5, 3), softmax CE.

    Exact symmetries: scale of ``0`` (BN eps 1e-30), rescale ``3 -> 5`` (ReLU), translation of
    the last layer (cross-entropy).
    """

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(8, 6),
            nn.BatchNorm1d(6, eps=EPS_BN),
            nn.ReLU(),
            nn.Linear(6, 5),
            nn.ReLU(),
            nn.Linear(5, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 3]


SYM_GROUPS = [
    SymmetryGroup("scale", "net.0", 6, (Member("net.0.weight", 0), Member("net.0.bias", 0))),
    SymmetryGroup(
        "rescale",
        "net.3->net.5",
        5,
        (Member("net.3.weight", 0), Member("net.3.bias", 0), Member("net.5.weight", 1, sign=-1)),
    ),
    SymmetryGroup(
        "translation",
        "net.5",
        6,
        (Member("net.5.weight", 1), Member("net.5.bias", None, offset=5)),
    ),
]


def make_optimizer(name: str, named, lr: float = 0.02, wd: float = 1e-2):
    """A registered optimizer by name, or torch.optim.Adagrad (not registered) from Python."""
    if name == "adagrad":
        return torch.optim.Adagrad([p for _, p in named], lr=lr, weight_decay=wd)
    momentum = 0.9 if name in ("momentum", "nesterov", "rms") else 0.0
    return build_optimizer(
        "sgd" if name == "nesterov" else name,
        named,
        lr=lr,
        momentum=momentum,
        weight_decay=wd,
        nesterov=name == "nesterov",
    )


def unsigned_magnitude(g: SymmetryGroup, params) -> np.ndarray:
    """Q for scale, |A1|^2 + |A2|^2 for rescale, sum |theta| for translation [size]."""
    plain = SymmetryGroup(
        g.kind, g.name, g.size, tuple(Member(m.param, m.dim, m.block, m.offset) for m in g.members)
    )
    wide = {n: params[n].detach().double().cpu() for n in g.params}
    if g.kind == "translation":
        return group_sum({n: t.abs() for n, t in wide.items()}, plain).numpy()
    return group_sum({n: t * t for n, t in wide.items()}, plain).numpy()


def budget_run(name: str, dtype: torch.dtype, steps: int = 25, device: str = "cpu"):
    """Trains SymNet with a budget; per step: max relative identity error per group, terms."""
    torch.manual_seed(0)
    model = SymNet().to(device=device, dtype=dtype)
    named = list(model.named_parameters())
    params = dict(named)
    opt = make_optimizer(name, named)
    tracker = BudgetTracker(opt, named, SYM_GROUPS)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(128, 8, generator=gen).to(device=device, dtype=dtype)
    y = torch.randint(0, 3, (128,), generator=gen).to(device)
    worst = {g.key: 0.0 for g in SYM_GROUPS}
    per_step = []
    for _ in range(steps):
        before = {g.key: theory.measure(g, params).cpu().numpy() for g in SYM_GROUPS}
        cum = tracker.snapshot()
        idx = torch.randint(0, 128, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        now = tracker.snapshot()
        terms = {}
        for g in SYM_GROUPS:
            change = theory.measure(g, params).cpu().numpy() - before[g.key]
            parts = {t: now[g.key][t] - cum[g.key][t] for t in TERMS}
            total = sum(parts.values())
            err = np.abs(total - change) / unsigned_magnitude(g, params)
            worst[g.key] = max(worst[g.key], float(err.max()))
            terms[g.key] = parts
        per_step.append(terms)
    return worst, per_step, tracker


OPTIMIZERS_UNDER_TEST = ("sgd", "momentum", "nesterov", "adam", "adamw", "rms", "lamb", "adagrad")


@pytest.mark.parametrize("name", OPTIMIZERS_UNDER_TEST)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_budget_identity_holds_for_every_optimizer(name, dtype, tol):
    """decay + leak + kinetic + discretisation == measured change, every step, every group."""
    worst, per_step, tracker = budget_run(name, dtype)
    assert set(tracker.state) == {g.key for g in SYM_GROUPS}, tracker.skipped
    assert max(worst.values()) <= tol, worst
    # the terms are not trivial: the quantities move
    moved = [np.abs(sum(s["scale/net.0"].values())).max() for s in per_step]
    assert max(moved) > 1e-6


def test_budget_split_of_plain_sgd_and_adam():
    """Plain SGD: no kinetic term and no leak (exact symmetries); Adam: kinetic breaking."""
    _, sgd_steps, _ = budget_run("sgd", torch.float64, steps=10)
    for s in sgd_steps:
        for key, parts in s.items():
            scale = np.abs(parts["decay"]).max() + np.abs(parts["discretisation"]).max() + 1e-300
            assert np.abs(parts["leak"]).max() <= 1e-12 * max(scale, 1.0), key
            assert np.abs(parts["kinetic"]).max() <= 1e-12 * max(scale, 1.0), key
    _, adam_steps, _ = budget_run("adam", torch.float64, steps=10)
    kinetic = max(np.abs(s["scale/net.0"]["kinetic"]).max() for s in adam_steps)
    decay = max(np.abs(s["scale/net.0"]["decay"]).max() for s in adam_steps)
    assert kinetic > 10 * decay


def test_closure_step_gets_one_clear_line():
    """L-BFGS (closure-only) cannot be observed: a UsageError, not a wrong budget."""
    model = SymNet().double()
    named = list(model.named_parameters())
    opt = torch.optim.LBFGS([p for _, p in named], lr=0.1)
    tracker = BudgetTracker(opt, named, SYM_GROUPS)
    x, y = torch.randn(16, 8, dtype=torch.float64), torch.randint(0, 3, (16,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(UsageError, match="closure") as err:
        opt.step(closure)
    assert "\n" not in str(err.value)
    assert tracker.step == 0


def test_budget_state_dict_resumes_bitwise():
    """Stop after 7 steps, restore into a fresh model/optimizer/tracker: same sums bitwise."""

    def steps(model, opt, gen, n):
        x = torch.randn(n, 32, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (n, 32), generator=gen)
        for i in range(n):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i]), y[i]).backward()
            opt.step()

    def fresh():
        torch.manual_seed(0)
        model = SymNet().double()
        named = list(model.named_parameters())
        opt = make_optimizer("adamw", named)
        return model, opt, BudgetTracker(opt, named, SYM_GROUPS)

    model, opt, tracker = fresh()
    steps(model, opt, torch.Generator().manual_seed(5), 7)
    saved = (model.state_dict(), opt.state_dict(), tracker.state_dict())
    blob = io.BytesIO()
    torch.save(saved, blob)
    steps(model, opt, torch.Generator().manual_seed(6), 5)
    reference = tracker.snapshot()

    model2, opt2, tracker2 = fresh()
    blob.seek(0)
    m_sd, o_sd, b_sd = torch.load(blob, weights_only=True)
    model2.load_state_dict(m_sd)
    opt2.load_state_dict(o_sd)
    tracker2.load_state_dict(b_sd)
    assert tracker2.step == 7
    steps(model2, opt2, torch.Generator().manual_seed(6), 5)
    got = tracker2.snapshot()
    assert got.keys() == reference.keys()
    for key in got:
        for f in got[key]:
            assert np.array_equal(got[key][f], reference[key][f]), (key, f)
    with pytest.raises(CorruptFileError):
        tracker2.load_state_dict({"version": 99})


def scheduled_run(dtype: torch.dtype, pending: int, read_every_step: bool, via_data: bool):
    """AdamW on SymNet for 13 steps with an lr drop after 5 (MultiStepLR) and ``net.0.weight``
    halved in place between steps 7 and 8 (under no_grad, or through ``.data``, which
    autograd's version counter does not see).

    Returns:
        final snapshot; per step, per group, the measured change across the optimizer step
        and the sum of the step's terms (when `read_every_step`); the change of Q of
        ``scale/net.0`` by the halving [6] and Q at the end [6].
    """
    torch.manual_seed(0)
    model = SymNet().to(dtype)
    named = list(model.named_parameters())
    params = dict(named)
    opt = make_optimizer("adamw", named, lr=0.05)
    tracker = BudgetTracker(opt, named, SYM_GROUPS, pending=pending)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[5], gamma=0.1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(13, 32, 8, generator=gen).to(dtype)
    y = torch.randint(0, 3, (13, 32), generator=gen)
    steps = []
    for k in range(13):
        if k == 7:
            jump = -theory.measure(SYM_GROUPS[0], params).numpy()
            if via_data:
                params["net.0.weight"].data.mul_(0.5)
            else:
                with torch.no_grad():
                    params["net.0.weight"].mul_(0.5)
            jump += theory.measure(SYM_GROUPS[0], params).numpy()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        before = {g.key: theory.measure(g, params).cpu().numpy() for g in SYM_GROUPS}
        cum = tracker.snapshot() if read_every_step else None
        opt.step()
        scheduler.step()
        if read_every_step:
            now = tracker.snapshot()
            steps.append(
                {
                    g.key: (
                        theory.measure(g, params).numpy() - before[g.key],
                        sum(now[g.key][t] - cum[g.key][t] for t in TERMS),
                    )
                    for g in SYM_GROUPS
                }
            )
    assert tracker.step == 13
    return tracker.snapshot(), steps, jump, theory.measure(SYM_GROUPS[0], params).numpy()


@pytest.mark.parametrize("via_data", [False, True])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_budget_does_not_depend_on_the_flush_schedule(dtype, tol, via_data):
    """Buffered steps reduced every 4 steps (and at the end) give bitwise the budget of steps
    reduced one by one, through an lr drop and an in-place change of a parameter between two
    steps, which appears in neither step's terms (the identity holds across each step)."""
    every, steps, jump, q_end = scheduled_run(dtype, 1, read_every_step=True, via_data=via_data)
    buffered, *_ = scheduled_run(dtype, 4, read_every_step=False, via_data=via_data)
    assert every.keys() == buffered.keys()
    for key in every:
        for f in every[key]:
            assert np.array_equal(every[key][f], buffered[key][f]), (key, f)
    magnitude = {g.key: np.abs(every[g.key]["initial"]).max() for g in SYM_GROUPS}
    for k, step in enumerate(steps):
        for key, (change, total) in step.items():
            assert np.abs(change - total).max() <= tol * magnitude[key], (k, key)
    # the halving moved Q by far more than any step and is in no term: the carried sums
    # miss exactly it
    q = every["scale/net.0"]
    carried = q["initial"] + sum(q[t] for t in TERMS)  # [6]
    moves = max(np.abs(step["scale/net.0"][0]).max() for step in steps)
    assert np.abs(jump).min() > 4 * moves
    assert np.abs(q_end - jump - carried).max() <= 13 * tol * magnitude["scale/net.0"]


class FailingOnce(torch.optim.AdamW):
    """AdamW whose third step raises after the pre-hooks ran (nothing is updated)."""

    calls = 0

    def step(self, closure=None):
        """Raises on the third call."""
        FailingOnce.calls += 1
        if FailingOnce.calls == 3:
            raise FloatingPointError("step skipped")
        return super().step(closure)


def test_a_step_that_raises_is_not_counted():
    """A step that raises between the hooks leaves no trace: budget and identity as if it had
    not been called (its lr is not paired with a later step when the steps are buffered)."""
    results = []
    for raising in (False, True):
        torch.manual_seed(0)
        model = SymNet().double()
        named = list(model.named_parameters())
        cls = FailingOnce if raising else torch.optim.AdamW
        FailingOnce.calls = 0
        opt = cls([p for _, p in named], lr=0.05, weight_decay=1e-2)
        tracker = BudgetTracker(opt, named, SYM_GROUPS, pending=4)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(6, 32, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (6, 32), generator=gen)
        for k in range(6):
            for group in opt.param_groups:
                group["lr"] = 0.05 / (k + 1)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[k]), y[k]).backward()
            if raising and k == 2:
                with pytest.raises(FloatingPointError):
                    opt.step()
            opt.step()
        assert tracker.step == 6
        results.append(tracker.snapshot())
    for key in results[0]:
        for f in results[0][key]:
            assert np.array_equal(results[0][key][f], results[1][key][f]), (key, f)


class ConvMLP(nn.Module):
    """Conv2d(2, 4, 3) -> ReLU -> Conv2d(4, 4, 3, pad 1) -> ReLU -> flatten [B, 36] ->
    Linear(36, 16) -> ReLU -> 3 x (Linear(16, 16) -> ReLU) -> Linear(16, 3):
    same-shaped layers (one source for several parameters), a conv weight split by rows and
    by columns, a flatten block."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(2, 4, 3),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(36, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 16),
            nn.ReLU(),
            nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # [B, 3]


def _pair(a: str, b: str, size: int, block: int = 1) -> SymmetryGroup:
    """Rescale group between layers a (rows) and b (columns)."""
    return SymmetryGroup(
        "rescale",
        f"{a}->{b}",
        size,
        (
            Member(f"{a}.weight", 0),
            Member(f"{a}.bias", 0),
            Member(f"{b}.weight", 1, block, sign=-1),
        ),
    )


CONV_GROUPS = [
    _pair("net.0", "net.2", 4),
    SymmetryGroup("scale", "net.2", 4, (Member("net.2.weight", 0), Member("net.2.bias", 0))),
    _pair("net.2", "net.5", 4, block=9),
    _pair("net.5", "net.7", 16),
    _pair("net.7", "net.9", 16),
    _pair("net.9", "net.11", 16),
    SymmetryGroup("scale", "net.11", 16, (Member("net.11.weight", 0), Member("net.11.bias", 0))),
    SymmetryGroup(
        "translation",
        "net.13",
        17,
        (Member("net.13.weight", 1), Member("net.13.bias", None, offset=16)),
    ),
]


def reference_budget(groups, steps):
    """The budget of recorded steps, per step from `group_dot` / `group_total` in float64.

    Args:
        steps: (theta_k, g_k, theta_{k+1}, lr, wd) per step (name -> tensor).

    Returns:
        key -> field -> cumulative [size] (no ``initial``).
    """
    out = {}
    for g in groups:
        fields = {f: 0.0 for f in (*TERMS, "angle_sum", "grad_sq_sum")}
        for theta, grad, after, lr, wd in steps:
            delta = {n: after[n] - theta[n] for n in theta}
            if g.kind == "translation":
                base, tg, td, dd, factor = (
                    group_total(theta, g),
                    group_total(grad, g),
                    group_total(delta, g),
                    0.0,
                    1.0,
                )
            else:
                base, tg = group_dot(theta, theta, g), group_dot(theta, grad, g)
                td, dd, factor = group_dot(theta, delta, g), group_dot(delta, delta, g), 2.0
                cross = (base * dd - td * td).clamp_min(0.0).sqrt()
                fields["angle"] = torch.atan2(cross, base + td)
                fields["angle_sum"] = fields["angle_sum"] + fields["angle"]
                fields["grad_sq_sum"] = fields["grad_sq_sum"] + group_dot(grad, grad, g)
            decay = -factor * lr * wd * base
            leak = -factor * lr * tg
            fields["decay"] = fields["decay"] + decay
            fields["leak"] = fields["leak"] + leak
            fields["kinetic"] = fields["kinetic"] + factor * td - decay - leak
            fields["discretisation"] = fields["discretisation"] + dd
        out[g.key] = fields
    return out


@pytest.mark.parametrize("chunk", [None, 40])
@pytest.mark.parametrize("pending", [1, 3])
def test_budget_matches_a_direct_computation(monkeypatch, chunk, pending):
    """Every field of every group after 7 Adam steps (lr changed each step) equals the sums of
    the per-step terms computed directly in float64 from theta_k, g_k, theta_{k+1}: with
    products formed whole or in chunks of 40 elements (whole small parameters of a family,
    rows of each large one), reduced every step or every 3."""
    import Utils.budget as budget

    if chunk is not None:
        monkeypatch.setattr(budget, "CHUNK", chunk)
    torch.manual_seed(0)
    model = ConvMLP().double()
    named = list(model.named_parameters())
    params = dict(named)
    opt = torch.optim.Adam([p for _, p in named], lr=0.02, weight_decay=1e-2)
    tracker = BudgetTracker(opt, named, CONV_GROUPS, pending=pending)
    assert tracker.skipped == {}
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(7, 16, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (7, 16), generator=gen)
    steps = []
    for k in range(7):
        opt.param_groups[0]["lr"] = 0.02 / (1 + k)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        theta = {n: p.detach().clone() for n, p in params.items()}
        grad = {n: p.grad.clone() for n, p in params.items()}
        opt.step()
        after = {n: p.detach().clone() for n, p in params.items()}
        steps.append((theta, grad, after, opt.param_groups[0]["lr"], 1e-2))
    got = tracker.snapshot()
    want = reference_budget(CONV_GROUPS, steps)
    for g in CONV_GROUPS:
        scale = np.abs(got[g.key]["initial"]).max()
        for f, value in got[g.key].items():
            if f == "initial":
                continue
            ref = np.asarray(want[g.key][f])
            top = scale if f in TERMS else np.abs(ref).max() + 1e-300
            assert np.abs(value - ref).max() <= 1e-12 * top, (g.key, f)


def test_a_group_without_gradient_is_dropped_and_the_others_go_on():
    """From step 5 ``net.5.bias`` has no gradient: its translation group is dropped with a
    warning; the buffered steps of the others are kept and their budget stays exact."""
    torch.manual_seed(0)
    model = SymNet().double()
    named = list(model.named_parameters())
    params = dict(named)
    opt = make_optimizer("adamw", named)
    tracker = BudgetTracker(opt, named, SYM_GROUPS, pending=4)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(9, 32, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9, 32), generator=gen)
    for k in range(9):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        if k >= 5:
            params["net.5.bias"].grad = None
        if k == 5:
            with pytest.warns(UserWarning, match="no more budget"):
                opt.step()
        else:
            opt.step()
    state = tracker.snapshot()
    assert set(state) == {"scale/net.0", "rescale/net.3->net.5"}
    assert "net.5.bias" in tracker.skipped["translation/net.5"]
    for g in SYM_GROUPS[:2]:
        carried = state[g.key]["initial"] + sum(state[g.key][t] for t in TERMS)
        measured = theory.measure(g, params).numpy()
        assert np.abs(carried - measured).max() <= 1e-12 * np.abs(measured).max(), g.key


def test_reading_the_state_inside_a_step_changes_nothing():
    """A step pre-hook after the tracker's reads the budget (a flush while the step is open
    between the tracker's hooks): the budget stays bitwise that of a run that never reads."""
    results = []
    for read in (False, True):
        torch.manual_seed(0)
        model = SymNet().double()
        named = list(model.named_parameters())
        opt = make_optimizer("adamw", named)
        tracker = BudgetTracker(opt, named, SYM_GROUPS, pending=4)
        if read:

            def reader(*_, tracker=tracker) -> None:
                tracker.state_dict()

            opt.register_step_pre_hook(reader)
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(7, 32, 8, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (7, 32), generator=gen)
        for k in range(7):
            opt.param_groups[0]["lr"] = 0.02 / (k + 1)
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[k]), y[k]).backward()
            opt.step()
        assert tracker.step == 7
        results.append(tracker.snapshot())
    for key in results[0]:
        for f in results[0][key]:
            assert np.array_equal(results[0][key][f], results[1][key][f]), (key, f)


class DoublingSGD(torch.optim.Optimizer):
    """SGD with coupled weight decay that doubles p.grad in place inside step() (written out:
    a subclass calling a hooked parent's step() would fire the step hooks twice)."""

    def __init__(self, params, lr: float, weight_decay: float) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        """Doubles every gradient, then steps."""
        for group in self.param_groups:
            for p in group["params"]:
                p.grad.mul_(2.0)
                p.add_(p.grad + group["weight_decay"] * p, alpha=-group["lr"])


def test_an_optimizer_changing_the_gradient_in_place_is_caught(fused: bool):
    """An optimizer that changes p.grad in place during step(). Fused kernels: g_k is summed
    in the pre-hook, so the leak is that of the gradient before the step, silently, at every
    step. Torch path with one buffered step: large parameters' gradients are read at the flush,
    after the step; the change is seen, said once, and from the next step on the gradients are
    copied before the step. The identity holds throughout."""
    torch.manual_seed(0)
    model = SymNet().double()
    named = list(model.named_parameters())
    params = dict(named)
    opt = DoublingSGD([p for _, p in named], lr=0.05, weight_decay=1e-2)
    tracker = BudgetTracker(opt, named, SYM_GROUPS, pending=1)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 32, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (4, 32), generator=gen)
    key = "scale/net.0"
    for k in range(4):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        theta = {n: p.detach().clone() for n, p in params.items()}
        grad = {n: p.grad.clone() for n, p in params.items()}
        before, cum = theory.measure(SYM_GROUPS[0], params).numpy(), tracker.snapshot()
        if k == 0 and not fused:
            with pytest.warns(UserWarning, match="changed p.grad in place"):
                opt.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                opt.step()
        now = tracker.snapshot()
        parts = {t: now[key][t] - cum[key][t] for t in TERMS}
        change = theory.measure(SYM_GROUPS[0], params).numpy() - before
        assert np.abs(sum(parts.values()) - change).max() <= 1e-12 * np.abs(before).max()
        leak = -2 * 0.05 * group_dot(theta, grad, SYM_GROUPS[0]).numpy()
        factor = 2.0 if k == 0 and not fused else 1.0  # torch, step 0: the doubled gradient
        np.testing.assert_allclose(parts["leak"], factor * leak, rtol=1e-10, atol=1e-14)


class ReplacingSGD(torch.optim.Optimizer):
    """Plain SGD that gives every parameter new storage at each step (``p.data = ...``)."""

    def __init__(self, params, lr: float) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        """theta <- theta - lr g, into a new tensor."""
        for group in self.param_groups:
            for p in group["params"]:
                p.data = p.data - group["lr"] * p.grad


def test_new_storage_and_non_contiguous_gradients_keep_the_identity():
    """Parameters that get new storage in the step and between steps, and gradients that are
    not contiguous (the fused kernels read tensors by address: they must follow the storage
    and copy what is not contiguous): every group's terms sum to its change, and the leak is
    that of the gradient before the step."""
    torch.manual_seed(0)
    model = SymNet().double()
    named = list(model.named_parameters())
    opt = ReplacingSGD([p for _, p in named], lr=0.05)
    tracker = BudgetTracker(opt, named, SYM_GROUPS)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(6, 32, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (6, 32), generator=gen)
    for k in range(6):
        params = dict(model.named_parameters())
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[k]), y[k]).backward()
        if k % 2 == 1:  # the same values, column-major
            for p in params.values():
                if p.dim() == 2:
                    p.grad = p.grad.t().contiguous().t()
                    assert not p.grad.is_contiguous()
        if k == 3:  # new storage between two steps
            for p in params.values():
                p.data = p.data.clone()
        theta = {n: p.detach().clone() for n, p in params.items()}
        grad = {n: p.grad.clone() for n, p in params.items()}
        before = {g.key: theory.measure(g, params).numpy() for g in SYM_GROUPS}
        cum = tracker.snapshot()
        opt.step()
        now = tracker.snapshot()
        params = dict(model.named_parameters())
        for g in SYM_GROUPS:
            parts = {t: now[g.key][t] - cum[g.key][t] for t in TERMS}
            change = theory.measure(g, params).numpy() - before[g.key]
            scale = np.abs(before[g.key]).max()
            assert np.abs(sum(parts.values()) - change).max() <= 1e-12 * scale, (k, g.key)
            factor = 1.0 if g.kind == "translation" else 2.0
            dot = group_total(grad, g) if g.kind == "translation" else group_dot(theta, grad, g)
            leak = -factor * 0.05 * dot.numpy()
            np.testing.assert_allclose(parts["leak"], leak, rtol=1e-10, atol=1e-14)


def test_group_dot_equals_group_sum():
    """`group_dot` / `group_total` against `Utils.groups.group_sum` of the elementwise terms."""
    gen = torch.Generator().manual_seed(0)
    a = {
        "w": torch.randn(4, 6, 3, 3, generator=gen, dtype=torch.float64),
        "v": torch.randn(5, 12, generator=gen, dtype=torch.float64),
        "b": torch.randn(4, generator=gen, dtype=torch.float64),
    }
    b = {n: torch.randn(t.shape, generator=gen, dtype=torch.float64) for n, t in a.items()}
    groups = [
        SymmetryGroup("scale", "w", 4, (Member("w", 0), Member("b", 0))),
        SymmetryGroup("rescale", "w->v", 4, (Member("w", 0), Member("v", 1, block=3, sign=-1))),
        SymmetryGroup("translation", "v", 13, (Member("v", 1), Member("b", None, offset=12))),
    ]
    for g in groups:
        prod = {n: a[n] * b[n] for n in a}
        np.testing.assert_allclose(group_dot(a, b, g), group_sum(prod, g), rtol=1e-13)
        np.testing.assert_allclose(group_total(a, g), group_sum(a, g), rtol=1e-13)


# ----------------------------------------------------------------------------- equilibrium


def equilibrate(optimizer: str, lr: float, wd: float, steps: int = 600) -> dict:
    """A BN-MLP (16 -> 16 BN ReLU -> 4) trained from noise-like labels, budget tracked.

    Returns:
        ``angle``: measured mean angular update per step over the second half [16];
        ``grad_sq``: mean |g|^2 over it [16]; ``norm``: |theta_A| at the end [16];
        ``prediction``: `Utils.metrics.equilibrium.predicted` at (lr, wd).
    """
    torch.manual_seed(0)
    width = 16
    model = nn.Sequential(
        nn.Linear(16, width), nn.BatchNorm1d(width, eps=EPS_BN), nn.ReLU(), nn.Linear(width, 4)
    )
    group = SymmetryGroup("scale", "0", width, (Member("0.weight", 0), Member("0.bias", 0)))
    named = list(model.named_parameters())
    momentum = 0.9 if optimizer == "momentum" else 0.0
    opt = build_optimizer(optimizer, named, lr=lr, momentum=momentum, weight_decay=wd)
    tracker = BudgetTracker(opt, named, [group])
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(512, 16, generator=gen)
    y = torch.randint(0, 4, (512,), generator=gen)
    half = {}
    for k in range(steps):
        if k == steps // 2:
            half = {f: t.clone() for f, t in tracker.state[group.key].items()}
        idx = torch.randint(0, 512, (32,), generator=gen)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    end = tracker.state[group.key]
    count = steps - steps // 2
    angle = ((end["angle_sum"] - half["angle_sum"]) / count).numpy()
    grad_sq = ((end["grad_sq_sum"] - half["grad_sq_sum"]) / count).numpy()
    norm = np.sqrt(theory.measure(group, dict(named)).numpy())
    pred = predicted(optimizer, np.array([lr]), wd, momentum, grad_sq[None], np.full(width, 17.0))
    return {"angle": angle, "grad_sq": grad_sq, "norm": norm, "prediction": pred}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, lr, wd", [("momentum", 0.1, 0.02), ("adamw", 0.01, 1.0)])
def test_late_angular_update_reaches_the_predicted_equilibrium(optimizer, lr, wd):
    """600 steps = 12 (momentum SGD) and 6 (AdamW) time scales: within 10% of the prediction.

    Measured here (mean over the 16 neurons of the late angular update / prediction): momentum
    SGD 0.967, AdamW 0.953; norms / prediction: momentum SGD (from the measured |g|^2) and
    AdamW (sqrt(eta C / (2 lam))) within 15%.
    """
    run = equilibrate(optimizer, lr, wd)
    pred = run["prediction"]
    assert pred["time_scale"][0] * 6 <= 600
    ratio = run["angle"].mean() / pred["angle"][0]
    assert abs(ratio - 1) <= 0.10, ratio
    norm_ratio = run["norm"].mean() / pred["norm"][0].mean()
    assert abs(norm_ratio - 1) <= 0.15, norm_ratio


# ----------------------------------------------------------------------------- training


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "lamb"])
def test_training_detects_groups_and_saves_the_budget_for_any_optimizer(tmp_path, optimizer):
    """Groups were detected only for custom_sgd: now every optimizer gets them and a budget."""
    from Utils.checkpoint import list_checkpoints, load_checkpoint
    from Utils.training import train

    result = train(
        {
            "dataset": "synthetic",
            "model": "fc-bn",
            "optimizer": optimizer,
            "epochs": 1,
            "train_batch_size": 512,
            "lr": 1e-3,
            "wd": 1e-2,
            "save_freq": 2,
            "no_progress": True,
            "experiment": "t",
            "expid": optimizer,
            "save_dir": str(tmp_path),
        }
    )
    kinds = {g["kind"] for g in result.groups if g["valid"]}
    assert {"translation", "scale"} <= kinds, result.groups
    last = load_checkpoint(list_checkpoints(result.run_dir)[-1])
    budget = last["budget"]
    assert budget["step"] == last["step"] > 0
    params = last["model"]
    for g in groups_from_json(budget["groups"]):
        measured = theory.measure(g, {n: params[n] for n in g.params}).numpy()
        fields = budget["state"][g.key]
        change = measured - fields["initial"].numpy()
        total = sum(fields[t].numpy() for t in TERMS)
        scale = np.abs(fields["initial"].numpy()).max() + np.abs(measured).max()
        assert np.abs(change - total).max() <= 1e-5 * scale, g.key
