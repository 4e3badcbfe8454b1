"""Tests of automatic symmetry-group detection and verification (Utils/symmetry.py)."""

from __future__ import annotations

import copy
import itertools
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from Utils.errors import UnknownNameError, UserError
from Utils.groups import Member, SymmetryGroup, groups_from_json, groups_to_json
from Utils.symmetry import (
    default_tol,
    detect,
    find_groups,
    loss_fn,
    skipped_layers,
    verify_groups,
)

F64 = torch.float64


def _batch(shape: tuple[int, ...], classes: int = 3, n: int = 8, seed: int = 0):
    """A float64 input batch [n, *shape] and integer targets [n]."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, *shape), generator=gen, dtype=F64)
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, y


def _by_key(groups: list[SymmetryGroup]) -> dict[str, SymmetryGroup]:
    return {g.key: g for g in groups}


def _seq(*layers: nn.Module) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*layers).to(F64)


# --------------------------------------------------------------------------- reference


def _reference_violations(
    model: nn.Module, group: SymmetryGroup, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"
) -> list[float]:
    """Slow, obviously correct per-group violations: Python loops over every element.

    Every parameter element is assigned to its group from the Member description by hand,
    and <g_A, c_A>, |g_A|^2, |c_A|^2 are accumulated one element at a time.
    """
    model = copy.deepcopy(model).train()
    params = dict(model.named_parameters())
    value = loss_fn(loss)(model(x), y)
    names = group.params
    grads = dict(zip(names, torch.autograd.grad(value, [params[n] for n in names])))
    dot = [0.0] * group.size
    g_sq = [0.0] * group.size
    c_sq = [0.0] * group.size
    for member in group.members:
        g = grads[member.param]
        theta = params[member.param].detach()
        for index in itertools.product(*(range(s) for s in theta.shape)):
            if member.dim is None:
                k = member.offset
            else:
                k = index[member.dim] // member.block + member.offset
            gi = float(g[index])
            ci = 1.0 if group.kind == "translation" else float(theta[index])
            dot[k] += member.sign * gi * ci
            g_sq[k] += gi * gi
            c_sq[k] += ci * ci
    out = []
    for k in range(group.size):
        denom = (g_sq[k] * c_sq[k]) ** 0.5
        out.append(abs(dot[k]) / denom if denom > 0 else 0.0)
    return out


class _AllKinds(nn.Module):
    """conv-BN-ReLU, conv-ReLU-pool-flatten-Linear, Linear-ReLU-Linear: all three kinds."""

    def __init__(self, eps: float = 1e-5) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(3, eps=eps)
        self.conv2 = nn.Conv2d(3, 2, 3, padding=1)
        self.fc1 = nn.Linear(8, 4)
        self.fc2 = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))  # [B, 3, 4, 4]
        x = F.max_pool2d(torch.relu(self.conv2(x)), 2)  # [B, 2, 2, 2]
        x = torch.flatten(x, 1)  # [B, 8]
        return self.fc2(F.relu(self.fc1(x)))  # [B, 3]


def _all_kinds(eps: float = 1e-5) -> nn.Module:
    torch.manual_seed(1)
    return _AllKinds(eps).to(F64)


def test_all_kinds_structure():
    model = _all_kinds()
    x, _ = _batch((2, 4, 4))
    groups = _by_key(find_groups(model, x))
    assert list(groups) == [
        "translation/fc2",
        "scale/conv1",
        "rescale/bn1->conv2",
        "rescale/conv2->fc1",
        "rescale/fc1->fc2",
    ]
    assert groups["rescale/bn1->conv2"].members == (
        Member("bn1.weight"),
        Member("bn1.bias"),
        Member("conv2.weight", dim=1, sign=-1),
    )
    assert groups["rescale/bn1->conv2"].meta["structure"] == "norm-affine"
    assert groups["translation/fc2"].size == 5
    assert groups["translation/fc2"].members == (
        Member("fc2.weight", dim=1),
        Member("fc2.bias", dim=None, offset=4),
    )
    assert groups["scale/conv1"].members == (Member("conv1.weight"), Member("conv1.bias"))
    assert groups["scale/conv1"].size == 3
    assert groups["scale/conv1"].meta["eps"] == pytest.approx(1e-5)
    assert groups["rescale/conv2->fc1"].members == (
        Member("conv2.weight"),
        Member("conv2.bias"),
        Member("fc1.weight", dim=1, block=4, sign=-1),
    )
    assert groups["rescale/conv2->fc1"].size == 2
    assert groups["rescale/fc1->fc2"].members[-1] == Member("fc2.weight", dim=1, sign=-1)


def test_verify_matches_slow_reference():
    model = _all_kinds(eps=1e-3)
    x, y = _batch((2, 4, 4))
    groups = find_groups(model, x)
    # a group that is not a symmetry (rescale across the BatchNorm) gives a large violation
    fake = SymmetryGroup(
        "rescale",
        "conv1->conv2",
        3,
        (Member("conv1.weight"), Member("conv1.bias"), Member("conv2.weight", dim=1, sign=-1)),
    )
    checked = verify_groups(model, [*groups, fake], x, y)
    for group in checked:
        ref = max(_reference_violations(model, group, x, y))
        assert group.violation == pytest.approx(ref, rel=1e-8, abs=1e-13), group.key
    by_key = _by_key(checked)
    assert by_key["scale/conv1"].violation > 1e-6  # eps > 0: a real, measured violation
    assert by_key["scale/conv1"].meta["eps_residual"] < 1e-12
    assert by_key["rescale/conv1->conv2"].violation > 1e-3
    assert not by_key["rescale/conv1->conv2"].valid
    assert "violated" in by_key["rescale/conv1->conv2"].reason


def test_float64_exact_symmetries_below_1e10():
    model = _all_kinds(eps=1e-12)  # eps = 0 is rejected by batch_norm in train mode
    x, y = _batch((2, 4, 4))
    groups = detect(model, x, y)
    assert {g.kind for g in groups} == {"translation", "scale", "rescale"}
    for group in groups:
        assert group.valid, group
        assert group.violation < 1e-10, group.key


# --------------------------------------------------------------------------- structures


def test_mlp_relu_rescale_pairs_and_translation():
    model = _seq(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 3))
    x, y = _batch((6,))
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/4", "rescale/0->2", "rescale/2->4"]
    assert groups["rescale/0->2"].members == (
        Member("0.weight"),
        Member("0.bias"),
        Member("2.weight", dim=1, sign=-1),
    )
    assert groups["rescale/0->2"].size == 5
    assert groups["rescale/2->4"].size == 4
    assert groups["translation/4"].size == 5
    assert all(g.valid and g.violation < 1e-10 for g in groups.values())


class _FunctionalNet(nn.Module):
    """Conv + functional ReLU / max-pool + one of several flatten spellings + Linears."""

    def __init__(self, flatten: str) -> None:
        super().__init__()
        self.flatten = flatten
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(12, 5)
        self.out = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(torch.relu(self.conv(x)), 2)  # [B, 3, 2, 2]
        if self.flatten == "view":
            h = h.view(h.size(0), -1)
        elif self.flatten == "reshape":
            h = h.reshape(h.shape[0], -1)
        elif self.flatten == "method":
            h = h.contiguous().flatten(1)
        else:
            h = torch.flatten(h, 1)  # [B, 12]
        h = F.dropout(F.relu(self.fc(h)), 0.2, self.training)  # [B, 5]
        return self.out(h)


@pytest.mark.parametrize("flatten", ["view", "reshape", "method", "torch"])
def test_conv_pool_flatten_linear_block(flatten):
    torch.manual_seed(0)
    model = _FunctionalNet(flatten).to(F64)
    x, y = _batch((2, 4, 4))
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/out", "rescale/conv->fc", "rescale/fc->out"]
    assert groups["rescale/conv->fc"].members[-1] == Member("fc.weight", dim=1, block=4, sign=-1)
    assert groups["rescale/conv->fc"].meta["block"] == 4
    assert groups["rescale/fc->out"].members[-1].block == 1
    assert all(g.valid and g.violation < 1e-10 for g in groups.values())


class _ChannelReshape(nn.Module):
    """Conv whose output is reshaped to [B, C, H*W] before a Linear over positions."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.fc = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))  # [B, 3, 4, 4]
        h = h.view(h.size(0), 3, 16)  # [B, 3, 16]
        return self.fc(h).mean(dim=1)  # [B, 3]


def test_reshape_that_keeps_channels_apart_breaks_rescale():
    torch.manual_seed(0)
    model = _ChannelReshape().to(F64)
    x, _ = _batch((2, 4, 4))
    assert find_groups(model, x) == []


def test_conv_bn_scale_one_group_per_channel():
    model = _seq(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 3, padding=1, bias=False),
        nn.BatchNorm2d(3, affine=False),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 2),
    )
    x, y = _batch((2, 4, 4), classes=2)
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/7", "scale/0", "scale/3", "rescale/1->3"]
    assert groups["scale/0"].size == 4
    assert groups["scale/0"].members == (Member("0.weight"), Member("0.bias"))
    assert groups["scale/3"].size == 3
    assert groups["scale/3"].members == (Member("3.weight"),)
    assert groups["scale/3"].meta == {
        "eps": 1e-5,
        "norm": "4",
        "norm_type": "BatchNorm2d",
        "structure": "batchnorm",
        "cause": "eps",
        "eps_residual": pytest.approx(0, abs=1e-12),
    }
    assert all(g.valid for g in groups.values())


def test_linear_batchnorm1d_scale():
    model = _seq(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3))
    x, y = _batch((5,))
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/3", "scale/0", "rescale/1->3"]
    assert groups["scale/0"].size == 6


def test_conv1d_variant():
    model = _seq(
        nn.Conv1d(2, 4, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool1d(2),
        nn.Conv1d(4, 3, 3, padding=1),
        nn.LeakyReLU(0.1),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(3, 2),
    )
    x, y = _batch((2, 8), classes=2)
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/7", "rescale/0->3", "rescale/3->7"]
    assert groups["rescale/0->3"].members[-1] == Member("3.weight", dim=1, sign=-1)
    assert groups["rescale/3->7"].members[-1] == Member("7.weight", dim=1, block=1, sign=-1)
    assert all(g.valid and g.violation < 1e-10 for g in groups.values())


def test_conv3d_variant():
    model = _seq(
        nn.Conv3d(1, 2, 3, padding=1),
        nn.BatchNorm3d(2),
        nn.ReLU(),
        nn.Conv3d(2, 3, 1),
        nn.ReLU(),
        nn.AvgPool3d(2),
        nn.Dropout3d(0.1),
        nn.Flatten(),
        nn.Linear(24, 2),
    )
    x, y = _batch((1, 4, 4, 4), classes=2)
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/8", "scale/0", "rescale/1->3", "rescale/3->8"]
    assert groups["rescale/3->8"].members[-1] == Member("8.weight", dim=1, block=8, sign=-1)
    assert groups["scale/0"].size == 2
    assert all(g.valid for g in groups.values())


class _Residual(nn.Module):
    """relu(conv2(relu(conv1 x)) + x) -> flatten -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.fc = nn.Linear(48, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(F.relu(self.conv1(x)))  # [B, 3, 4, 4]
        return self.fc(torch.flatten(F.relu(h + x), 1))  # [B, 2]


def test_no_rescale_across_residual_add():
    torch.manual_seed(0)
    model = _Residual().to(F64)
    x, y = _batch((3, 4, 4), classes=2)
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/fc", "rescale/conv1->conv2"]
    assert all(g.valid and g.violation < 1e-10 for g in groups.values())


class _Concat(nn.Module):
    """Two Linear branches concatenated into a third; one branch also feeds the output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 3)
        self.b = nn.Linear(4, 3)
        self.c = nn.Linear(6, 2)
        self.d = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)  # [B, 6]
        return self.c(h) + self.d(F.relu(self.a(x) * 2.0))  # [B, 2]


def test_concatenation_and_sum_output_give_nothing():
    torch.manual_seed(0)
    model = _Concat().to(F64)
    x, _ = _batch((4,))
    assert find_groups(model, x) == []


@pytest.mark.parametrize(
    "act",
    [
        nn.GELU(),
        nn.SiLU(),
        nn.ReLU6(),
        nn.Tanh(),
        nn.Sigmoid(),
        nn.ELU(),
        nn.Softplus(),
        nn.Hardswish(),
    ],
    ids=lambda m: type(m).__name__,
)
def test_non_homogeneous_activation_gives_no_rescale(act):
    model = _seq(nn.Linear(4, 6), act, nn.Linear(6, 3))
    with torch.no_grad():
        model[0].weight.mul_(8.0)  # drive every activation out of its linear range
    x, y = _batch((4,))
    groups = find_groups(model, x)
    assert [g.key for g in groups] == ["translation/2"]
    # the constraint really fails there: a hand-made rescale group is rejected
    fake = SymmetryGroup(
        "rescale",
        "0->2",
        6,
        (Member("0.weight"), Member("0.bias"), Member("2.weight", dim=1, sign=-1)),
    )
    (checked,) = verify_groups(model, [fake], x, y)
    assert checked.violation > 1e-6
    assert not checked.valid


def test_functional_gelu_gives_no_rescale():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 5)
            self.fc2 = nn.Linear(5, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(F.gelu(self.fc1(x)))

    x, _ = _batch((4,))
    assert [g.key for g in find_groups(Net().to(F64), x)] == ["translation/fc2"]


def test_leaky_relu_rescale():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(4, 5)
            self.fc2 = nn.Linear(5, 5)
            self.fc3 = nn.Linear(5, 3)
            self.act = nn.LeakyReLU(0.3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc3(F.leaky_relu(self.fc2(self.act(self.fc1(x))), 0.05))

    torch.manual_seed(0)
    model = Net().to(F64)
    x, y = _batch((4,))
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/fc3", "rescale/fc1->fc2", "rescale/fc2->fc3"]
    assert all(g.valid and g.violation < 1e-10 for g in groups.values())


def test_mse_has_no_translation_and_verifies():
    model = _seq(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, y = _batch((4,))
    groups = detect(model, x, y, loss="mse")
    assert [g.key for g in groups] == ["rescale/0->2"]
    assert groups[0].valid and groups[0].violation < 1e-10
    soft = torch.randn(8, 3, dtype=F64)
    (checked,) = verify_groups(model, groups, x, soft, loss="mse")
    assert checked.valid and checked.violation < 1e-10


def test_depthwise_conv_on_both_sides():
    model = _seq(
        nn.Conv2d(2, 4, 1),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1, groups=4),
        nn.ReLU(),
        nn.Conv2d(4, 3, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(48, 2),
    )
    x, y = _batch((2, 4, 4), classes=2)
    groups = _by_key(detect(model, x, y))
    assert list(groups) == ["translation/7", "rescale/0->2", "rescale/2->4", "rescale/4->7"]
    assert groups["rescale/0->2"].members[-1] == Member("2.weight", dim=0, block=1, sign=-1)
    assert groups["rescale/4->7"].members[-1].block == 16
    assert all(g.valid and g.violation < 1e-10 for g in groups.values())


def test_shared_and_tied_weights_are_skipped():
    class Reused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.out = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(F.relu(self.fc(F.relu(self.fc(x)))))

    x, _ = _batch((4,))
    assert [g.key for g in find_groups(Reused().to(F64), x)] == ["translation/out"]
    tied = _seq(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4))
    tied[2].weight = tied[0].weight
    assert find_groups(tied, x) == []
    assert skipped_layers(Reused().to(F64), x) == {"fc": "called 2 times (weights reused)"}
    assert skipped_layers(tied, x) == {
        "0": "its weight is tied to another module's parameter",
        "2": "its weight is tied to another module's parameter",
    }


def test_dead_relu_group_counts_zero():
    model = _seq(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every hidden unit is off: zero gradient
    x, y = _batch((4,))
    groups = _by_key(detect(model, x, y))
    assert groups["rescale/0->2"].violation == 0.0
    assert groups["rescale/0->2"].valid


# --------------------------------------------------------------------------- verification


def test_batchnorm_eps_physics_is_measured_and_bounded():
    model = _seq(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 2))
    x, y = _batch((2, 4, 4), classes=2)
    (good,) = [g for g in detect(model, x, y) if g.kind == "scale"]
    assert good.valid and 1e-9 < good.violation < 1e-2
    with torch.no_grad():
        model[0].weight.mul_(1e-4)  # channel variance far below eps
        model[0].bias.zero_()
    (bad,) = [g for g in detect(model, x, y) if g.kind == "scale"]
    assert bad.violation > 1e-2
    assert bad.meta["eps_residual"] < 1e-10
    assert not bad.valid and "eps" in bad.reason


def test_verification_leaves_model_state_alone():
    model = _seq(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Dropout(0.5), nn.Linear(5, 3))
    model.eval()
    x, y = _batch((4,))
    stats = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    groups = detect(model, x, y)
    assert {g.key for g in groups} == {"translation/4", "scale/0", "rescale/1->4"}
    assert all(g.valid for g in groups)  # verified in train mode although the model is in eval
    assert not model.training and not model[1].training
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, stats[k]), k
    assert all(p.grad is None for p in model.parameters())


def test_default_tolerance_and_float32():
    model = _seq(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    assert default_tol(model) == 1e-8
    model32 = copy.deepcopy(model).float()
    assert default_tol(model32) == 1e-3
    x, y = _batch((4,))
    groups = detect(model32, x.float(), y)
    assert all(g.valid and g.violation < 1e-5 for g in groups)
    strict = verify_groups(model32, groups, x.float(), y, tol=0.0)
    # above tol in float32, within tol in a float64 copy: valid, the cause named
    assert all(g.valid and g.meta["cause"] == "round-off" for g in strict)
    assert all(g.meta["float64_violation"] < 1e-12 for g in strict)
    assert all("float32 round-off" in g.meta["note"] for g in strict)
    assert all(g.violation == h.violation for g, h in zip(groups, strict))
    fake = SymmetryGroup("scale", "0", 5, (Member("0.weight"), Member("0.bias")))
    (checked,) = verify_groups(model32, [fake], x.float(), y)
    assert not checked.valid and "in float64" in checked.reason


def test_groups_json_round_trip_keeps_verification():
    model = _all_kinds()
    x, y = _batch((2, 4, 4))
    groups = detect(model, x, y)
    again = groups_from_json(groups_to_json(groups))
    rechecked = verify_groups(model, again, x, y)
    assert [g.violation for g in rechecked] == pytest.approx([g.violation for g in groups])


def test_errors_are_user_errors():
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    x, y = _batch((4,))
    with pytest.raises(UserError, match="Branchy") as info:
        find_groups(Branchy(), x)
    assert "\n" not in str(info.value)
    model = _seq(nn.Linear(4, 3))
    missing = SymmetryGroup("scale", "nope", 3, (Member("nope.weight"),))
    with pytest.raises(UserError, match="nope.weight"):
        verify_groups(model, [missing], x, y)
    with pytest.raises(UserError, match="cannot run"):
        find_groups(model, torch.randn(2, 7, dtype=F64))
    with pytest.raises(UnknownNameError, match="ce"):
        loss_fn("hinge")
    with pytest.raises(UnknownNameError):
        find_groups(model, x, loss="hinge")


def test_loss_fn():
    out = torch.randn(6, 4, dtype=F64)
    y = torch.tensor([0, 1, 2, 3, 0, 1])
    assert loss_fn("ce")(out, y) == pytest.approx(float(F.cross_entropy(out, y)))
    onehot = F.one_hot(y, 4).to(F64)
    mse = loss_fn("mse")
    assert float(mse(out, y)) == pytest.approx(float(mse(out, onehot)))
    assert float(mse(onehot, y)) == 0.0
    assert float(mse(out, y)) > 0


# --------------------------------------------------------------------------- registry models


def _check_detected(groups: list[SymmetryGroup], tol: float) -> None:
    """Exact symmetries verify to `tol`; scale groups to `tol` after the BatchNorm eps term."""
    for group in groups:
        if group.kind == "scale" and "eps_residual" in group.meta:
            assert group.meta["eps_residual"] < tol, group.key
        else:
            assert group.violation < tol and group.valid, group.key
        if group.valid:
            assert group.violation < max(tol, 1e-2), group.key


@pytest.mark.parametrize("shape", [(1, 12, 12), (1, 20)], ids=["image", "signal"])
def test_default_registry_models(shape):
    from Models import get_model, list_models

    x = torch.randn(6, *shape)
    y = torch.arange(6) % 5
    names = list_models("default")
    assert "vgg-demo" in names
    for name in names:
        torch.manual_seed(0)
        model = get_model(name, "default", shape, 5)
        groups = detect(model, x, y)
        assert any(g.kind == "translation" for g in groups), name
        _check_detected(groups, 1e-3)
        if name == "vgg-demo":
            assert {g.kind for g in groups} == {"translation", "scale", "rescale"}
            assert all(g.valid for g in groups)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vgg11-bn", "resnet18", "resnet18-nobn"])
def test_tinyimagenet_registry_models(name):
    from Models import get_model, list_models

    assert name in list_models("tinyimagenet")
    torch.manual_seed(0)
    model = get_model(name, "tinyimagenet", (3, 16, 16), 7)
    x = torch.randn(4, 3, 16, 16)
    y = torch.arange(4)
    groups = detect(model, x, y)
    _check_detected(groups, 1e-3)
    kinds = {g.kind for g in groups}
    assert "translation" in kinds
    rescale = [g.name for g in groups if g.meta.get("structure") == "layer"]
    if name == "resnet18":
        assert rescale == []  # every conv feeds a BatchNorm or a residual sum
    if name == "resnet18-nobn":
        # only inside a block: conv1 -> (Identity) -> ReLU -> conv2, never across a sum
        assert len(rescale) == 8
        assert all(r.endswith(".conv2") and ".conv1->" in r for r in rescale)
    if name == "vgg11-bn":
        assert "scale" in kinds and len(rescale) == 2


# --------------------------------------------------------------------------- torchvision


def _sibling_conv_bn(model: nn.Module) -> dict[str, int]:
    """Conv modules directly followed (in registration order, same parent) by a BatchNorm."""
    mods = list(model.named_modules())
    found = {}
    for (n1, m1), (n2, m2) in zip(mods, mods[1:]):
        same_parent = n1.rpartition(".")[0] == n2.rpartition(".")[0]
        if isinstance(m1, nn.Conv2d) and isinstance(m2, nn.BatchNorm2d) and same_parent:
            found[n1] = m1.out_channels
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "last", "rescale"),
    [
        ("vgg11_bn", "classifier.6", ["classifier.0->classifier.3", "classifier.3->classifier.6"]),
        ("densenet121", "classifier", []),
        ("efficientnet_b0", "classifier.1", []),
    ],
)
def test_torchvision_models(name, last, rescale):
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(2, 3, 64, 64)
    y = torch.tensor([3, 7])
    groups = detect(model, x, y)
    scale = {g.name: g.size for g in groups if g.kind == "scale"}
    assert scale == _sibling_conv_bn(model)
    layer = [g.name for g in groups if g.meta["structure"] == "layer"]
    assert layer == rescale
    assert [g.name for g in groups if g.kind == "translation"] == [last]
    _check_detected(groups, 1e-3)


# (kind/structure -> (layers, units)) on the smallest input each model accepts (issue 13)
TORCHVISION_COUNTS = {
    "resnet18": (
        32,
        {
            "translation/softmax": (1, 513),
            "scale/batchnorm": (20, 4800),
            "rescale/norm-affine": (8, 1920),
        },
    ),
    "mobilenet_v2": (
        32,
        {
            "translation/softmax": (1, 1281),
            "scale/batchnorm": (52, 17056),
            "rescale/norm-affine": (2, 336),
        },
    ),
    "convnext_tiny": (
        32,
        {
            "translation/softmax": (1, 769),
            "scale/layernorm": (18, 18),
            "rescale/norm-affine": (18, 6624),
        },
    ),
    "vit_b_16": (224, {"translation/softmax": (1, 769), "rescale/norm-affine": (12, 9216)}),
    "squeezenet1_0": (64, {"rescale/layer": (9, 416)}),
    "swin_t": (
        32,
        {
            "translation/softmax": (1, 769),
            "scale/layernorm": (1, 1),
            "rescale/norm-affine": (15, 7104),
        },
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHVISION_COUNTS))
def test_torchvision_symmetry_counts_and_transformations(name):
    """Issue 13: counts per kind and structure, and every group transformed leaves the
    outputs unchanged (float64, eps ~0, all groups at once)."""
    import torchvision

    size, counts = TORCHVISION_COUNTS[name]
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=10)
    x = torch.randn(2, 3, size, size)
    groups = find_groups(model, x)
    found: dict[str, tuple[int, int]] = {}
    for g in groups:
        key = f"{g.kind}/{g.meta['structure']}"
        layers, units = found.get(key, (0, 0))
        found[key] = (layers + 1, units + g.size)
    assert found == counts
    if name == "squeezenet1_0":
        fire = [g for g in groups if "+" in g.name]
        assert len(fire) == 8 and sum(g.size for g in fire) == 320
    _assert_symmetries(model, groups, x, each=False)


# --------------------------------------------------------------------------- command line


@pytest.mark.slow
def test_cli_table_json_and_errors(repo_root, tmp_path):
    base = [sys.executable, "-m", "Utils.symmetry", "--dataset", "synthetic"]
    args = [*base, "--model", "vgg-demo", "--data-dir", str(tmp_path), "--batch-size", "8"]
    table = subprocess.run(args, cwd=repo_root, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["kind", "structure", "layer"]
    assert any(line.startswith("rescale") and "conv3->fc1" in line for line in lines)
    assert any(line.startswith("scale") and "conv1" in line for line in lines)
    out = subprocess.run(
        [*args, "--json"], cwd=repo_root, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert {r["kind"] for r in rows} == {"translation", "scale", "rescale"}
    for row in rows:
        assert {"kind", "params", "groups", "max_violation", "layer", "valid"} <= set(row)
        assert row["max_violation"] < 1e-2
    scale = next(r for r in rows if r["layer"] == "conv1")
    assert scale["params"] == ["conv1.weight", "conv1.bias"] and scale["groups"] == 16
    bad = subprocess.run(
        [*base, "--model-class", "default", "--model", "nope"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2
    assert bad.stderr.count("\n") == 1 and "nope" in bad.stderr and "vgg-demo" in bad.stderr
    assert "Traceback" not in bad.stderr


# --------------------------------------------------------------------------- transformations


def _element_groups(member: Member, shape: tuple[int, ...]) -> torch.Tensor:
    """The group index of every element of a member's parameter (int64, shaped like it)."""
    if member.dim is None:
        return torch.full(shape, member.offset, dtype=torch.int64)
    dim = member.dim % len(shape)
    along = torch.arange(shape[dim]) // member.block + member.offset  # [shape[dim]]
    view = [1] * len(shape)
    view[dim] = shape[dim]
    return along.reshape(view).expand(shape)


def _transformed(model: nn.Module, group: SymmetryGroup, seed: int) -> nn.Module:
    """A copy of `model` with the group's symmetry applied, a random factor per neuron.

    Translation: theta_A + c_A; scale and rescale: theta_A1 * alpha_A, theta_A2 / alpha_A.
    """
    gen = torch.Generator().manual_seed(seed)
    out = copy.deepcopy(model)
    params = dict(out.named_parameters())
    shift = torch.randn(group.size, generator=gen, dtype=F64)  # [size]
    factor = torch.exp(torch.randn(group.size, generator=gen, dtype=F64) * 0.5)  # [size]
    with torch.no_grad():
        for member in group.members:
            p = params[member.param]
            index = _element_groups(member, tuple(p.shape))
            if group.spec.family == "translation":
                p.add_(shift[index])
            else:
                p.mul_(factor[index] ** member.sign)
    return out


def _exact(model: nn.Module) -> nn.Module:
    """A float64 copy whose normalisation eps are ~0 (their symmetries are then exact)."""
    model = copy.deepcopy(model).double().train()
    for m in model.modules():
        if hasattr(m, "eps"):
            m.eps = 1e-30
    return model


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """log_softmax of the outputs (a translation shifts logits by a per-sample constant)."""
    torch.manual_seed(0)  # the same dropout masks every time
    with torch.no_grad():
        return torch.log_softmax(model(x), dim=-1)


def _assert_symmetries(model: nn.Module, groups, x: torch.Tensor, each: bool = True) -> None:
    """Every group, transformed, leaves the outputs unchanged to 1e-10 (float64, eps ~0)."""
    model = _exact(model)
    x = x.double()
    want = _outputs(model, x)
    scale = float(want.abs().max())
    todo = [[g] for g in groups] if each else [list(groups)]
    for seed, batch in enumerate(todo):
        changed = model
        for group in batch:
            changed = _transformed(changed, group, seed)
        diff = float((_outputs(changed, x) - want).abs().max()) / scale
        assert diff <= 1e-10, ([g.key for g in batch], diff)


class _Branches(nn.Module):
    """A squeezenet Fire module: one squeeze conv feeding two expand convs, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.squeeze = nn.Conv2d(3, 4, 1)
        self.expand1 = nn.Conv2d(4, 5, 1)
        self.expand3 = nn.Conv2d(4, 5, 3, padding=1)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.relu(self.squeeze(x))  # [B, 4, H, W]
        x = torch.cat([F.relu(self.expand1(s)), F.relu(self.expand3(s))], 1)  # [B, 10, H, W]
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))  # [B, 3]


class _ChannelsLast(nn.Module):
    """A ConvNeXt block: depthwise conv -> permute -> LayerNorm -> Linear -> GELU -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4)
        self.norm = nn.LayerNorm(4)
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(torch.permute(self.dw(x), (0, 2, 3, 1)))  # [B, H, W, 4]
        y = self.fc2(F.gelu(self.fc1(y))).permute(0, 3, 1, 2)  # [B, 4, H, W]
        return self.head((x + y).mean(dim=(2, 3)))  # [B, 3]


class _LogSoftmax(nn.Module):
    """A classifier ending in functional log_softmax (trained with nll)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 5)
        self.fc2 = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(self.fc2(torch.relu(self.fc1(x))), dim=1)


def _symmetric_cases():
    """(name, model, input shape, loss, the keys that must be reported)."""
    torch.manual_seed(0)
    yield (
        "batchnorm2d",
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 3, 3, padding=1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 3),
        ),
        (2, 4, 4),
        "ce",
        {"translation/6", "scale/0", "rescale/1->3", "rescale/3->6"},
    )
    yield (
        "batchnorm1d",
        nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)),
        (5,),
        "ce",
        {"translation/3", "scale/0", "rescale/1->3"},
    )
    yield (
        "groupnorm",
        nn.Sequential(
            nn.Conv2d(2, 6, 3, padding=1),
            nn.GroupNorm(3, 6),
            nn.ReLU(),
            nn.Conv2d(6, 3, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(3, 3),
        ),
        (2, 4, 4),
        "ce",
        {"translation/7", "scale/0", "rescale/1->3", "rescale/3->7"},
    )
    yield (
        "instancenorm",
        nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1),
            nn.InstanceNorm2d(4, affine=True),
            nn.LeakyReLU(0.1),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 3, 1),
            nn.Flatten(),
            nn.Linear(12, 3),
        ),
        (2, 4, 4),
        "ce",
        {"translation/6", "scale/0", "rescale/1->4", "rescale/4->6"},
    )
    yield (
        "layernorm",
        nn.Sequential(
            nn.Linear(5, 6), nn.LayerNorm(6), nn.ReLU(), nn.Dropout(0.2), nn.Linear(6, 3)
        ),
        (5,),
        "ce",
        {"translation/4", "scale/0", "rescale/1->4"},
    )
    yield (
        "depthwise",
        nn.Sequential(
            nn.Conv2d(2, 4, 1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 8, 3, padding=1, groups=4),
            nn.ReLU(),
            nn.Conv2d(8, 3, 1),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(48, 3),
        ),
        (2, 4, 4),
        "ce",
        {"translation/8", "scale/0", "rescale/1->3", "rescale/3->5", "rescale/5->8"},
    )
    yield (
        "branches",
        _Branches(),
        (3, 4, 4),
        "ce",
        {"translation/head", "rescale/squeeze->expand1+expand3"},
    )
    yield (
        "channels-last-layernorm",
        _ChannelsLast(),
        (4, 3, 3),
        "ce",
        {"translation/head", "scale/dw", "rescale/norm->fc1"},
    )
    yield ("log_softmax", _LogSoftmax(), (4,), "nll", {"translation/fc2", "rescale/fc1->fc2"})
    yield (
        "LogSoftmax-mse",
        nn.Sequential(nn.Linear(4, 3), nn.LogSoftmax(dim=-1)),
        (4,),
        "mse",
        {"translation/0"},
    )


@pytest.mark.parametrize("case", list(_symmetric_cases()), ids=lambda c: c[0])
def test_every_known_symmetry_is_reported_and_exact(case):
    """Issue 13: each reported group is a symmetry (transformed: outputs unchanged to 1e-10),
    and every known symmetry of the module is reported, for every kind and norm type."""
    _, model, shape, loss, keys = case
    model = model.to(F64)
    x, y = _batch(shape)
    if loss == "mse":
        y = torch.randn(len(x), 3, dtype=F64)
    groups = detect(model, x, y, loss)
    assert {g.key for g in groups} == keys
    assert all(g.valid for g in groups), [(g.key, g.reason) for g in groups if not g.valid]
    _assert_symmetries(model, groups, x)


def test_false_groups_change_the_outputs():
    """The transformation check itself: groups that are not symmetries are caught."""
    model = _seq(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    x, _ = _batch((4,))
    false = [
        SymmetryGroup("scale", "0", 5, (Member("0.weight"), Member("0.bias"))),
        SymmetryGroup("translation", "0", 4, (Member("0.weight", dim=1),)),
        SymmetryGroup("rescale", "0->2", 5, (Member("0.weight"), Member("2.weight", dim=1))),
    ]
    for group in false:
        with pytest.raises(AssertionError):
            _assert_symmetries(model, [group], x)


def test_eps_residual_round_off_is_named():
    """Issue 13: an eps residual above tol in float32 but at round-off in float64 is named
    float32 round-off, with the float64 figure; a real eps violation keeps its own reason."""
    model = _seq(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(48, 2))
    x, y = _batch((2, 4, 4), classes=2)
    model32 = copy.deepcopy(model).float()
    groups = find_groups(model32, x.float())
    (scale,) = verify_groups(
        model32, [g for g in groups if g.kind == "scale"], x.float(), y, tol=1e-12
    )
    assert scale.valid and scale.meta["cause"] == "round-off"
    assert scale.meta["eps_residual"] > 1e-12 > scale.meta["float64_eps_residual"]
    assert "float32 round-off" in scale.meta["note"] and "float64" in scale.meta["note"]
    (exact,) = verify_groups(model32, [g for g in groups if g.kind == "scale"], x.float(), y)
    assert exact.valid and exact.meta["cause"] == "eps" and "note" not in exact.meta


def test_kinds_list_on_the_command_line(repo_root):
    out = subprocess.run(
        [sys.executable, "-m", "Utils.symmetry", "--kinds"],
        cwd=repo_root,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    from Utils.kinds import KINDS

    for spec in KINDS.values():
        for structure in spec.structures:
            assert any(
                line.split()[:2] == [spec.name, structure.name] for line in out.stdout.splitlines()
            )
