"""The online theory of TrackingSGD against measurements on exactly symmetric models.

* Exact theory (THEORY.md section 3) vs the measured Q / S of the current parameters, for
  plain SGD + wd, heavy ball, nesterov and momentum + dampening, each with an lr drop.
  Relative errors use each group's natural magnitude: Q for scale, |theta_A1|^2 +
  |theta_A2|^2 for the signed rescale difference, sum |theta| for the signed translation sum
  (the size of the round-off of a signed sum is set by its terms, not by the sum).
* Paper theory (section 4) computed online vs a direct, slow implementation written here from
  the closed forms h(t), G(s): explicit sums over stored per-step |d_j|^2, |v_j|^2.
* The oscillator propagator vs scipy's matrix exponential in every damping regime.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.linalg
import torch
from torch import nn

from Utils import theory
from Utils.groups import Member, SymmetryGroup, group_sum, group_sum_np
from Utils.optimizers import build_optimizer

STEPS = 2000
DROP = 1000
RECORD = 100
EPS_BN = 1e-30  # BatchNorm refuses eps = 0 in training; 1e-30 is exact scale invariance here

CONFIGS = {
    "sgd_wd": {"lr": 0.1, "weight_decay": 5e-3},
    "heavy_ball": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-3},
    "nesterov": {"lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-3},
    "dampening": {"lr": 0.05, "momentum": 0.8, "dampening": 0.3, "weight_decay": 5e-3},
}


class TwoBranch(nn.Module):
    """Sum of the logits of a BN-MLP on x [B, 8] and of a small CNN on y [B, 1, 8, 8].

    Branch ``mlp``: Linear -> BN -> ReLU -> Linear -> ReLU -> Linear. Branch ``cnn``:
    Conv -> BN -> ReLU -> Conv -> ReLU -> MaxPool -> Flatten -> Linear. Every symmetry of each
    branch survives the sum (softmax cross-entropy of summed logits keeps both translations).
    """

    def __init__(self) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(8, 6),
            nn.BatchNorm1d(6, eps=EPS_BN),
            nn.ReLU(),
            nn.Linear(6, 5),
            nn.ReLU(),
            nn.Linear(5, 3),
        )
        self.cnn = nn.Sequential(
            nn.Conv2d(1, 3, 3),
            nn.BatchNorm2d(3, eps=EPS_BN),
            nn.ReLU(),
            nn.Conv2d(3, 4, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16, 3),
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mlp(x) + self.cnn(y)  # [B, 3]


def hand_groups() -> list[SymmetryGroup]:
    """The symmetry groups of `TwoBranch`, built by hand."""
    block = 2 * 2  # spatial size after the pool: one channel -> 4 flattened columns
    return [
        SymmetryGroup("scale", "mlp.0", 6, (Member("mlp.0.weight", 0), Member("mlp.0.bias", 0))),
        SymmetryGroup(
            "rescale",
            "mlp.3->mlp.5",
            5,
            (
                Member("mlp.3.weight", 0),
                Member("mlp.3.bias", 0),
                Member("mlp.5.weight", 1, sign=-1),
            ),
        ),
        SymmetryGroup(
            "translation",
            "mlp.5",
            6,
            (Member("mlp.5.weight", 1), Member("mlp.5.bias", None, offset=5)),
        ),
        SymmetryGroup("scale", "cnn.0", 3, (Member("cnn.0.weight", 0), Member("cnn.0.bias", 0))),
        SymmetryGroup(
            "rescale",
            "cnn.3->cnn.7",
            4,
            (
                Member("cnn.3.weight", 0),
                Member("cnn.3.bias", 0),
                Member("cnn.7.weight", 1, block, sign=-1),
            ),
        ),
        SymmetryGroup(
            "translation",
            "cnn.7",
            17,
            (Member("cnn.7.weight", 1), Member("cnn.7.bias", None, offset=16)),
        ),
    ]


def magnitude(group: SymmetryGroup, params: dict[str, torch.Tensor]) -> np.ndarray:
    """The natural size of a group's measured quantity (see the module docstring)."""
    wide = {n: params[n].detach().double().cpu() for n in group.params}
    unsigned = SymmetryGroup(
        group.kind,
        group.name,
        group.size,
        tuple(Member(m.param, m.dim, m.block, m.offset, 1) for m in group.members),
    )
    if group.kind == "translation":
        return group_sum({n: t.abs() for n, t in wide.items()}, unsigned).numpy()
    return group_sum({n: t * t for n, t in wide.items()}, unsigned).numpy()


def train(
    config: dict, dtype: torch.dtype, steps: int = STEPS, record: bool = False, device: str = "cpu"
) -> dict:
    """Trains `TwoBranch` with TrackingSGD and a MultiStepLR drop (x0.1) at step DROP.

    Returns:
        dict with ``errors`` (key -> max relative error of the exact theory over the recorded
        steps), ``strict`` (the same relative to |exact|, for information), the final
        ``snapshot``, the per-step ``lr`` and, if `record`, the per-step d_k and v_k of every
        parameter as float64 arrays [steps, *shape] (d from p.grad and theta_k, v from the
        momentum buffer after the step).
    """
    torch.manual_seed(0)
    model = TwoBranch().to(dtype)
    groups = hand_groups()
    x = torch.randn(64, 8, dtype=dtype)
    y = torch.randn(64, 1, 8, 8, dtype=dtype)
    labels = torch.randint(0, 3, (64,))
    model, x, y, labels = model.to(device), x.to(device), y.to(device), labels.to(device)
    opt = build_optimizer("custom_sgd", list(model.named_parameters()), groups=groups, **config)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [DROP], 0.1)
    params = dict(model.named_parameters())
    lam = config["weight_decay"]
    errors = {g.key: 0.0 for g in groups}
    strict = {g.key: 0.0 for g in groups}
    d_steps: dict[str, list] = {n: [] for n in params}
    v_steps: dict[str, list] = {n: [] for n in params}
    lrs = []
    for k in range(steps + 1):
        if k % RECORD == 0 or k == steps:
            snap = opt.theory_snapshot()
            for g in groups:
                diff = np.abs(theory.measure(g, params).cpu().numpy() - snap[g.key]["exact"])
                errors[g.key] = max(errors[g.key], float((diff / magnitude(g, params)).max()))
                strict[g.key] = max(
                    strict[g.key], float((diff / np.abs(snap[g.key]["exact"])).max())
                )
        if k == steps:
            break
        idx = torch.arange(16 * k, 16 * k + 16) % 64
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx], y[idx]), labels[idx]).backward()
        lrs.append(opt.param_groups[0]["lr"])
        if record and config.get("momentum", 0) == 0:
            for n, p in params.items():
                d_steps[n].append((p.grad + lam * p).detach().double().clone())
        opt.step()
        sched.step()
        if record and config.get("momentum", 0) != 0:
            for n, p in params.items():
                v_steps[n].append(opt.state[p]["momentum_buffer"].double().clone())
    assert all(g.valid for g in opt.groups)
    stack = {n: torch.stack(v).numpy() for n, v in d_steps.items() if v}
    return {
        "errors": errors,
        "strict": strict,
        "snapshot": opt.theory_snapshot(),
        "lr": lrs,
        "groups": groups,
        "hyper": config,
        "d": stack,
        "v": {n: torch.stack(v).numpy() for n, v in v_steps.items() if v},
    }


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_exact_and_paper_theory_float64(config):
    """Exact theory to 1e-9 at every recorded step; paper theory online == direct to 1e-10."""
    run = train(CONFIGS[config], torch.float64, record=True)
    assert max(run["errors"].values()) <= 1e-9, run["errors"]
    assert run["lr"][DROP - 1] == pytest.approx(10 * run["lr"][DROP])
    for g in run["groups"]:
        snap = run["snapshot"][g.key]
        expected = paper_direct(run, g, snap["initial"])
        scale = np.abs(expected).max()
        np.testing.assert_allclose(snap["paper"], expected, rtol=0, atol=1e-10 * scale)
        assert snap["time"] == pytest.approx(sum(run["lr"]) * (1 - direct_delta(run["hyper"])))


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_exact_theory_float32(config):
    errors = train(CONFIGS[config], torch.float32)["errors"]
    assert max(errors.values()) <= 1e-4, errors


def test_symmetric_model_is_not_trivial():
    """The tracked quantities really move over training (so agreement is not vacuous)."""
    torch.manual_seed(0)
    model = TwoBranch().double()
    params = dict(model.named_parameters())
    start = {g.key: theory.measure(g, params).numpy() for g in hand_groups()}
    run = train(CONFIGS["heavy_ball"], torch.float64, steps=300)
    assert max(run["errors"].values()) <= 1e-9
    for g in hand_groups():
        change = np.abs(run["snapshot"][g.key]["exact"] - start[g.key]).max()
        assert change > 1e-3 * np.abs(start[g.key]).max(), g.key


# ----------------------------------------------------------------------------- direct theory


def closed_forms(gamma: float, omega2: float) -> tuple:
    """h(t), G(s) and their derivatives from THEORY.md section 4, by regime."""
    disc = gamma * gamma - omega2
    if abs(disc) <= 1e-12 * gamma * gamma:

        def h(t):
            return np.exp(-gamma * t) * (1 + gamma * t)

        def green(s):
            return s * np.exp(-gamma * s)

        def green_rate(s):
            return np.exp(-gamma * s) * (1 - gamma * s)

    elif disc < 0:
        w = math.sqrt(-disc)

        def h(t):
            return np.exp(-gamma * t) * (np.cos(w * t) + gamma / w * np.sin(w * t))

        def green(s):
            return np.exp(-gamma * s) * np.sin(w * s) / w

        def green_rate(s):
            return np.exp(-gamma * s) * (np.cos(w * s) - gamma / w * np.sin(w * s))

    else:
        ap = -gamma + math.sqrt(disc)
        am = -gamma - math.sqrt(disc)

        def h(t):
            return (ap * np.exp(am * t) - am * np.exp(ap * t)) / (ap - am)

        def green(s):
            return (np.exp(ap * s) - np.exp(am * s)) / (ap - am)

        def green_rate(s):
            return (ap * np.exp(ap * s) - am * np.exp(am * s)) / (ap - am)

    def h_rate(t):
        return -omega2 * green(t)

    return h, green, h_rate, green_rate


def oscillator_direct(x0, xdot0, kicks, lr, beta, delta, omega_factor, lam, k):
    """X(t_k), X'(t_k) for constant lr: homogeneous part plus the sum over kicks j < k."""
    m = lr * (1 - delta) * (1 + beta)
    gamma, omega2 = (1 - beta) / m, omega_factor * lam / m
    h, green, h_rate, green_rate = closed_forms(gamma, omega2)
    dt = lr * (1 - delta)
    t = k * dt
    s = t - dt * np.arange(k)  # t_k - t_j, j < k
    x = h(t) * x0 + green(t) * xdot0
    xdot = h_rate(t) * x0 + green_rate(t) * xdot0
    if kicks is not None and k > 0:
        x = x + (green(s)[:, None] * kicks[:k]).sum(axis=0)
        xdot = xdot + (green_rate(s)[:, None] * kicks[:k]).sum(axis=0)
    return x, xdot


def direct_delta(cfg: dict) -> float:
    """The dampening that acts (0 without momentum)."""
    return cfg.get("dampening", 0.0) if cfg.get("momentum", 0.0) else 0.0


def paper_direct(run: dict, group: SymmetryGroup, q0: np.ndarray) -> np.ndarray:
    """THEORY.md section 4 at the end of a run, directly; piecewise over the lr drop.

    The per-step |d_j|^2 and |v_j|^2 come from the stored d_j, v_j via group_sum_np.
    """
    cfg = run["hyper"]
    lam, beta, delta = cfg["weight_decay"], cfg.get("momentum", 0.0), direct_delta(cfg)
    lrs = np.array(run["lr"])
    n = len(lrs)
    if beta == 0:
        t = np.concatenate([[0.0], np.cumsum(lrs)])
        if group.kind == "translation":
            return np.exp(-lam * t[n]) * q0
        d2 = group_sum_np({k: a * a for k, a in run["d"].items()}, group, lead=1)  # [n, size]
        weights = lrs**2 * np.exp(-2 * lam * (t[n] - t[:n]))
        return np.exp(-2 * lam * t[n]) * q0 + (weights[:, None] * d2).sum(axis=0)
    factor = 2.0 if group.kind == "translation" else 4.0
    kicks = None
    if group.kind != "translation":
        v2 = group_sum_np({k: a * a for k, a in run["v"].items()}, group, lead=1)  # [n, size]
        kicks = 2 * lrs[:, None] / (1 - delta) * v2
    lr1, lr2 = lrs[0], lrs[-1]
    x, xdot = oscillator_direct(q0, 0.0 * q0, kicks, lr1, beta, delta, factor, lam, DROP)
    rest = None if kicks is None else kicks[DROP:]
    x, _ = oscillator_direct(x, xdot, rest, lr2, beta, delta, factor, lam, n - DROP)
    return x


@pytest.mark.parametrize(
    "beta, lam, regime",
    [(0.9, 1e-3, "over"), (0.99, 1e-4, "over"), (0.9, 0.5, "under"), (0.5, None, "critical")],
)
def test_paper_momentum_online_equals_direct_sum(beta, lam, regime):
    """theory.paper_quadratic_step over 3000 steps vs the explicit Green's function sum."""
    lr, delta, n = 0.1, 0.2, 3000
    m = lr * (1 - delta) * (1 + beta)
    if lam is None:  # critical: omega^2 = 4 lam / m equals gamma^2
        lam = ((1 - beta) / m) ** 2 * m / 4
    hp = theory.Hyper(lr, beta, delta, lam)
    gamma, omega2 = hp.oscillator("scale")
    disc = gamma * gamma - omega2
    assert {"over": disc > 0, "under": disc < 0, "critical": abs(disc) < 1e-12}[regime]
    rng = np.random.default_rng(1)
    forcing = rng.uniform(0.0, 2.0, (n, 4))  # [n, groups]
    q0 = rng.uniform(1.0, 3.0, 4)
    x, xdot = torch.tensor(q0), torch.zeros(4, dtype=torch.float64)
    for j in range(n):
        x, xdot = theory.paper_quadratic_step(x, xdot, torch.tensor(forcing[j]), hp)
    kicks = 2 * lr / (1 - delta) * forcing
    expected, expected_rate = oscillator_direct(q0, 0.0, kicks, lr, beta, delta, 4.0, lam, n)
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-10)
    np.testing.assert_allclose(
        xdot.numpy(), expected_rate, rtol=0, atol=1e-10 * np.abs(x.numpy()).max()
    )


def test_paper_sgd_online_equals_authors_formula():
    """Plain SGD: exp(-2 lam t_k)[Q_0 + eta^2 sum_j exp(2 lam t_j) |d_j|^2] (short run)."""
    lr, lam, n = 0.1, 1e-2, 500
    rng = np.random.default_rng(2)
    d2 = rng.uniform(0, 1, (n, 3))
    q0 = rng.uniform(1, 2, 3)
    x, xdot = torch.tensor(q0), torch.zeros(3, dtype=torch.float64)
    hp = theory.Hyper(lr, 0.0, 0.0, lam)
    for j in range(n):
        x, xdot = theory.paper_quadratic_step(x, xdot, torch.tensor(d2[j]), hp)
    t = lr * np.arange(n + 1)
    authors = np.exp(-2 * lam * t[n]) * (
        q0 + lr**2 * (np.exp(2 * lam * t[:n])[:, None] * d2).sum(0)
    )
    np.testing.assert_allclose(x.numpy(), authors, rtol=1e-12)
    s, _ = theory.paper_translation_step(torch.tensor(q0), xdot, hp)
    np.testing.assert_allclose(s.numpy(), np.exp(-lam * lr) * q0, rtol=1e-15)


# ----------------------------------------------------------------------------- oscillator


def expm_propagator(gamma: float, omega2: float, dt: float) -> np.ndarray:
    """Reference 2x2 propagator of (X, X') from scipy's matrix exponential."""
    return scipy.linalg.expm(np.array([[0.0, 1.0], [-omega2, -2.0 * gamma]]) * dt)


@pytest.mark.parametrize(
    "gamma, omega2, dt",
    [
        (1.0, 0.3, 0.1),  # over-damped
        (1.0, 5.0, 0.1),  # under-damped
        (1.0, 1.0, 0.1),  # critical
        (1.0, 1.0 + 1e-9, 0.7),  # near-critical, both sides
        (1.0, 1.0 - 1e-9, 0.7),
        (1.0, 1.0 - 3e-3, 0.7),
        (1.0, 1.0 + 2.0e-4, 0.7),  # just inside the series branch (|z| < 1e-4)
        (1.0, 1.0 - 2.1e-4, 0.7),  # just outside it
        (0.5, 0.0, 0.3),  # no restoring force
        (0.0, 0.0, 0.3),  # free motion
        (0.0, 4.0, 0.3),  # undamped
        (5.26, 0.0105, 0.1),  # beta = 0.9, lr = 0.1, wd = 5e-4
    ],
)
def test_propagate_oscillator_matches_expm(gamma, omega2, dt):
    x = torch.tensor([1.0, 0.0, -2.5], dtype=torch.float64)
    xdot = torch.tensor([0.0, 1.0, 0.7], dtype=torch.float64)
    got_x, got_xdot = theory.propagate_oscillator(x, xdot, gamma, omega2, dt)
    prop = expm_propagator(gamma, omega2, dt)
    want = prop @ np.stack([x.numpy(), xdot.numpy()])
    np.testing.assert_allclose(got_x.numpy(), want[0], rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(got_xdot.numpy(), want[1], rtol=1e-13, atol=1e-15)


def test_oscillator_is_smooth_across_critical_and_never_overflows():
    gamma, dt = 2.0, 0.5
    ref = np.array(theory.oscillator_coefficients(gamma, gamma * gamma, dt))
    for rel in (1e-15, 1e-12, 1e-9, 1e-6, 1e-5):
        for sign in (-1, 1):
            got = np.array(
                theory.oscillator_coefficients(gamma, gamma * gamma * (1 + sign * rel), dt)
            )
            # the coefficients are analytic in omega^2: a change of rel moves them by O(rel)
            assert np.all(np.abs(got - ref) <= 10 * rel * np.abs(ref).max() + 1e-15)
    for gamma, omega2, dt in [(1e3, 1.0, 10.0), (1e3, 0.0, 10.0), (1.0, 1e6, 1e3), (400, 1.0, 1)]:
        coeffs = theory.oscillator_coefficients(gamma, omega2, dt)
        assert all(math.isfinite(c) for c in coeffs)
        assert abs(coeffs[0]) <= 1.0 + 1e-12


def test_exact_recursions_by_hand():
    """Two steps of each exact recursion against hand-expanded THEORY.md section 3."""
    q, carry = torch.tensor([2.0], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    uu, uv = torch.tensor([0.5], dtype=torch.float64), torch.tensor([0.3], dtype=torch.float64)
    lr, beta, delta, lam = 0.1, 0.9, 0.2, 0.01
    hp = theory.Hyper(lr, beta, delta, lam, nesterov=True)
    q1, c1 = theory.exact_quadratic_step(q, carry, uu, uv, hp, has_buffer=False)
    p0 = lam * 2.0
    assert q1.item() == pytest.approx(2.0 - 2 * lr * (lam * 2.0 + beta * p0) + lr**2 * 0.5)
    assert c1.item() == pytest.approx(p0 - lr * 0.3)
    q2, c2 = theory.exact_quadratic_step(q1, c1, uu, uv, hp, has_buffer=True)
    p1 = beta * c1.item() + (1 - delta) * lam * q1.item()
    assert q2.item() == pytest.approx(
        q1.item() - 2 * lr * (lam * q1.item() + beta * p1) + lr**2 * 0.5
    )
    s = torch.tensor([3.0], dtype=torch.float64)
    s1, m1 = theory.exact_translation_step(s, carry, theory.Hyper(lr, beta, delta, lam), False)
    assert (s1.item(), m1.item()) == pytest.approx((3.0 - lr * lam * 3.0, lam * 3.0))
    s2, _ = theory.exact_translation_step(s1, m1, theory.Hyper(lr, beta, delta, lam), True)
    assert s2.item() == pytest.approx(
        s1.item() - lr * (beta * m1.item() + (1 - delta) * lam * s1.item())
    )
    plain = theory.Hyper(lr, 0.0, 0.0, lam)
    q1, _ = theory.exact_quadratic_step(q, carry, uu, None, plain, False)
    assert q1.item() == pytest.approx((1 - 2 * lr * lam) * 2.0 + lr**2 * 0.5)


# ----------------------------------------------------------------------------- long run


@pytest.mark.slow
def test_long_momentum_run_stays_finite():
    """20000 steps at beta 0.9, lr 0.1, wd 5e-4 (the authors' float32 buffers overflowed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).float()
    groups = [
        SymmetryGroup(
            "rescale",
            "0->2",
            4,
            (Member("0.weight", 0), Member("0.bias", 0), Member("2.weight", 1, sign=-1)),
        ),
        SymmetryGroup(
            "translation", "2", 5, (Member("2.weight", 1), Member("2.bias", None, offset=4))
        ),
    ]
    opt = build_optimizer(
        "custom_sgd",
        list(model.named_parameters()),
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        groups=groups,
        buffers=("sgd", "mom"),
    )
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(1)
    noise = [torch.randn(500, *p.shape, generator=gen) for p in params]
    for k in range(20000):
        for p, z in zip(params, noise):
            p.grad = z[k % 500]
        opt.step()
    snap = opt.theory_snapshot()
    assert snap["rescale/0->2"]["time"] == pytest.approx(2000.0)
    for fields in snap.values():
        for value in fields.values():
            assert np.all(np.isfinite(value))
    for p in params:
        for name in ("sgd", "mom", "mom_rate"):
            assert torch.isfinite(opt.state[p][name]).all()
    # the paper's prediction stays of the order of the measured quantity
    measured = theory.measure(groups[0], dict(model.named_parameters())).numpy()
    paper = snap["rescale/0->2"]["paper"]
    assert np.abs(paper).max() < 1e3 * (np.abs(measured).max() + 1)


class NewSymmetries(nn.Module):
    """Every structure of issue 13 in one small network on x [B, 1, 8, 8].

    conv -> GroupNorm (per-group scale) -> ReLU -> squeeze -> ReLU -> two expand convs (one
    rescale into several consumers; the GroupNorm affine into squeeze) -> cat -> conv2 ->
    InstanceNorm (per-channel scale; its affine into a depthwise conv) -> depthwise conv ->
    pool -> flatten -> LayerNorm (whole-layer scale; its affine into fc) -> ReLU -> fc ->
    log_softmax (translation, trained with nll).
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.gn = nn.GroupNorm(2, 4, eps=EPS_BN)
        self.squeeze = nn.Conv2d(4, 3, 1)
        self.expand1 = nn.Conv2d(3, 2, 1)
        self.expand3 = nn.Conv2d(3, 2, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 1)
        self.inorm = nn.InstanceNorm2d(4, affine=True, eps=EPS_BN)
        self.dw = nn.Conv2d(4, 8, 3, groups=4)
        self.ln = nn.LayerNorm(8, eps=EPS_BN)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.relu(self.squeeze(torch.relu(self.gn(self.conv(x)))))  # [B, 3, 6, 6]
        x = torch.cat([torch.relu(self.expand1(s)), torch.relu(self.expand3(s))], 1)
        x = self.dw(torch.relu(self.inorm(self.conv2(x))))  # [B, 8, 4, 4]
        x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)  # [B, 8]
        return nn.functional.log_softmax(self.fc(torch.relu(self.ln(x))), dim=1)  # [B, 3]


NEW_KEYS = {
    "translation/fc",
    "scale/conv",
    "scale/conv2",
    "scale/dw",
    "rescale/gn->squeeze",
    "rescale/squeeze->expand1+expand3",
    "rescale/inorm->dw",
    "rescale/ln->fc",
}


def train_new(dtype: torch.dtype, steps: int = 300) -> dict[str, float]:
    """Trains `NewSymmetries` (heavy ball, wd, lr drop) on its detected groups (nll loss).

    Returns:
        key -> max relative error of the exact theory over the recorded steps.
    """
    from Utils.symmetry import find_groups

    torch.manual_seed(0)
    model = NewSymmetries().to(dtype)
    x = torch.randn(64, 1, 8, 8, dtype=dtype)
    labels = torch.randint(0, 3, (64,))
    groups = find_groups(model, x, "nll")
    assert {g.key for g in groups} == NEW_KEYS
    config = {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-3}
    opt = build_optimizer("custom_sgd", list(model.named_parameters()), groups=groups, **config)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, [steps // 2], 0.1)
    params = dict(model.named_parameters())
    errors = {g.key: 0.0 for g in groups}
    for k in range(steps + 1):
        if k % 50 == 0 or k == steps:
            snap = opt.theory_snapshot()
            for g in groups:
                diff = np.abs(theory.measure(g, params).cpu().numpy() - snap[g.key]["exact"])
                errors[g.key] = max(errors[g.key], float((diff / magnitude(g, params)).max()))
        if k == steps:
            break
        idx = torch.arange(16 * k, 16 * k + 16) % 64
        opt.zero_grad()
        nn.functional.nll_loss(model(x[idx]), labels[idx]).backward()
        opt.step()
        sched.step()
    assert all(g.valid for g in opt.groups)
    assert all(np.isfinite(s["paper"]).all() for s in opt.theory_snapshot().values())
    return errors


def test_exact_theory_of_new_groups_float64():
    """Issue 13: the exact theory of every new structure within 1e-12 of a float64 run."""
    errors = train_new(torch.float64)
    assert max(errors.values()) <= 1e-12, errors


def test_exact_theory_of_new_groups_float32():
    errors = train_new(torch.float32)
    assert max(errors.values()) <= 1e-5, errors


def test_public_measure_torch_and_numpy_agree():
    """`theory.measure` takes torch tensors or numpy arrays with a step axis."""
    torch.manual_seed(0)
    model = TwoBranch().double()
    params = dict(model.named_parameters())
    for g in hand_groups():
        one = theory.measure(g, params).numpy()  # [size]
        stacked = {n: np.stack([p.detach().numpy()] * 2) for n, p in params.items()}
        two = theory.measure(g, stacked, lead=1)  # [2, size]
        np.testing.assert_allclose(two, np.stack([one, one]), rtol=1e-15, atol=1e-15)
