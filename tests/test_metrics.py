"""Every registered metric against a brute-force reference written here with explicit loops.

A tiny features.h5 is written with the real writer (`Utils.storage.FeaturesWriter`): a network
with a scale group, an invalid scale group, a rescale pair through a flatten (block 4) and a
translation group, rows at non-consecutive steps across an lr drop, NaN gradients at step 0 and
evaluation metrics on some rows only. Each metric's cache file is compared dataset by dataset
with its reference, and every dataset in the file must have a reference.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from Utils import storage
from Utils.errors import UnknownNameError
from Utils.groups import Member, SymmetryGroup, groups_to_json
from Utils.metrics import ALIASES, METRICS, cache_run, load_cache, parse_metric_list
from Utils.metrics import base as metrics_base
from Utils.metrics.base import FeaturesInfo

SHAPES = {
    "l1.weight": (4, 3),
    "l1.bias": (4,),
    "bn.weight": (4,),
    "bn.bias": (4,),
    "bn.running_mean": (4,),
    "bn.running_var": (4,),
    "c.weight": (2, 1, 2, 2),
    "c.bias": (2,),
    "l3.weight": (3, 8),
    "l3.bias": (3,),
}
TRAINABLE = [n for n in SHAPES if "running" not in n]
STEPS = [0, 1, 2, 4, 8, 9, 10]
STEPS_PER_EPOCH = 4
LR0, DROP_RATE, DROPS = 0.1, 0.1, [2]
WD = 5e-4
GROUPS = [
    SymmetryGroup(
        "translation",
        "l3",
        9,
        (Member("l3.weight", dim=1), Member("l3.bias", dim=None, offset=8)),
        violation=1e-7,
    ),
    SymmetryGroup("scale", "l1", 4, (Member("l1.weight", 0), Member("l1.bias", 0)), 2e-7),
    SymmetryGroup(
        "scale",
        "c",
        2,
        (Member("c.weight", 0), Member("c.bias", 0)),
        0.3,
        valid=False,
        reason="violation 0.3 above tolerance",
    ),
    SymmetryGroup(
        "rescale",
        "c->l3",
        2,
        (
            Member("c.weight", 0),
            Member("c.bias", 0),
            Member("l3.weight", dim=1, block=4, sign=-1),
        ),
        3e-7,
    ),
    # issue 13 structures: whole-layer scale (LayerNorm), per-GroupNorm-group scale, and a
    # norm-affine rescale (gamma, beta against the next layer's block of each unit)
    SymmetryGroup(
        "scale",
        "l1-layernorm",
        1,
        (Member("l1.weight", None), Member("l1.bias", None)),
        1e-7,
        meta={"structure": "layernorm"},
    ),
    SymmetryGroup(
        "scale",
        "l1-groupnorm",
        2,
        (Member("l1.weight", 0, block=2), Member("l1.bias", 0, block=2)),
        1e-7,
        meta={"structure": "groupnorm"},
    ),
    SymmetryGroup(
        "rescale",
        "bn->l3",
        4,
        (
            Member("bn.weight", 0),
            Member("bn.bias", 0),
            Member("l3.weight", dim=1, block=2, sign=-1),
        ),
        2e-7,
        meta={"structure": "norm-affine"},
    ),
]


def lr_at(step: int) -> float:
    """The MultiStepLR schedule of the fake run."""
    return LR0 * DROP_RATE ** sum(step >= e * STEPS_PER_EPOCH for e in DROPS)


def make_data(momentum: float, seed: int = 0) -> dict:
    """Arrays of a fake run: params, buffers, theory, metrics (what features.h5 will hold)."""
    rng = np.random.default_rng(seed)
    n = len(STEPS)
    params = {k: rng.normal(size=(n, *s)).astype(np.float32) for k, s in SHAPES.items()}
    grads = {k: rng.normal(size=(n, *SHAPES[k])).astype(np.float32) for k in TRAINABLE}
    updates = {k: rng.normal(size=(n, *SHAPES[k])).astype(np.float32) for k in TRAINABLE}
    for k in TRAINABLE:
        grads[k][0] = np.nan
        updates[k][0] = np.nan
    theory = {}
    for g in GROUPS:
        if g.valid:
            theory[g.key] = {
                "exact": rng.normal(size=(n, g.size)),
                "paper": rng.normal(size=(n, g.size)),
                "time": np.cumsum(rng.uniform(0.1, 0.2, size=n)),
            }
            budget = {"budget_initial": np.repeat(rng.normal(size=(1, g.size)), n, axis=0)}
            for term in ("decay", "leak", "kinetic", "discretisation"):
                budget[f"budget_{term}"] = rng.normal(size=(n, g.size))
            if g.kind == "scale":
                budget["budget_angle_sum"] = np.cumsum(rng.uniform(0, 0.1, (n, g.size)), axis=0)
                budget["budget_grad_sq_sum"] = np.cumsum(rng.uniform(0, 2, (n, g.size)), axis=0)
                budget["budget_angle"] = rng.uniform(0, 0.1, (n, g.size))
            theory[g.key].update(budget)
    metrics = {m: np.full(n, np.nan) for m in ("train_loss", "test_loss", "top1", "top5")}
    for m in metrics:
        metrics[m][[0, 3, 6]] = rng.uniform(size=3)
    metrics["top5"][3] = np.nan
    hp = {
        "lr": LR0,
        "lr_drops": DROPS,
        "lr_drop_rate": DROP_RATE,
        "wd": WD,
        "momentum": momentum,
        "dampening": 0.0,
        "nesterov": False,
        "optimizer": "custom_sgd",
    }
    return {
        "steps": np.array(STEPS, dtype=np.int64),
        "epoch": np.array(STEPS, dtype=np.float64) / STEPS_PER_EPOCH,
        "lr": np.array([lr_at(s) for s in STEPS]),
        "params": params,
        "grads": grads,
        "updates": updates,
        "theory": theory,
        "metrics": metrics,
        "hp": hp,
    }


def write_features(run_dir, data: dict) -> None:
    """Writes features.h5 of `data` with the real writer."""
    run_dir.mkdir(parents=True, exist_ok=True)
    w = storage.FeaturesWriter.create(
        str(run_dir / "features.h5"), json.dumps(data["hp"]), groups_to_json(GROUPS)
    )
    rows = []
    for i, step in enumerate(data["steps"]):
        v = {
            "epoch": np.asarray(data["epoch"][i]),
            "lr": np.asarray(data["lr"][i]),
            "sources": np.asarray(np.bytes_(f"step_{step:08d}.pt")),
        }
        v.update({f"params/{k}": a[i] for k, a in data["params"].items()})
        v.update({f"buffers/grad/{k}": a[i] for k, a in data["grads"].items()})
        v.update({f"buffers/update/{k}": a[i] for k, a in data["updates"].items()})
        for key, fields in data["theory"].items():
            v.update({f"theory/{key}/{f}": np.asarray(a[i]) for f, a in fields.items()})
        v.update({f"metrics/{m}": np.asarray(a[i]) for m, a in data["metrics"].items()})
        rows.append(storage.Row(int(step), v))
    w.prepare([storage.spec_of(k, x) for k, x in rows[0].values.items()], len(rows))
    w.append(rows)
    w.finish(True)


# ----------------------------------------------------------------------------- brute force


def neuron(member: Member, index: tuple[int, ...]) -> int:
    """The group a parameter element belongs to (explicit rule of Utils.groups.Member)."""
    if member.dim is None:
        return member.offset
    return member.offset + index[member.dim] // member.block


def loop_sum(arrays: dict, group: SymmetryGroup, fn, signed: bool = True) -> np.ndarray:
    """sum over each group's elements of fn(name, index, value), with the members' signs."""
    out = np.zeros(group.size)
    for m in group.members:
        a = arrays[m.param]
        for index in np.ndindex(*a.shape):
            sign = m.sign if signed else 1
            out[neuron(m, index)] += sign * fn(m.param, index, float(a[index]))
    return out


def over_steps(arrays: dict, group: SymmetryGroup, fn, signed: bool = True) -> np.ndarray:
    """`loop_sum` at every row, stacked: [N, n]."""
    return np.array([loop_sum(at(arrays, i), group, fn, signed) for i in range(len(STEPS))])


def value(name, index, v):
    """The element itself."""
    return v


def square(name, index, v):
    """The squared element."""
    return v * v


def absolute(name, index, v):
    """The absolute element."""
    return abs(v)


def at(arrays: dict, i: int) -> dict:
    """The arrays of one row."""
    return {k: v[i] for k, v in arrays.items()}


def axes(data: dict) -> dict:
    """The reference /steps, /epoch and /lr."""
    return {"steps": data["steps"], "epoch": data["epoch"], "lr": data["lr"]}


def groups_of(kinds) -> list[SymmetryGroup]:
    """The fake groups of some kinds, in kind order."""
    return [g for k in kinds for g in GROUPS if g.kind == k]


def ref_conservation(kind: str):
    """Reference of the translation, scale and rescale metrics."""

    def ref(data: dict, cache: dict) -> dict:
        out = axes(data)
        valid = [g for g in groups_of([kind]) if g.valid]
        out["time"] = data["theory"][valid[0].key]["time"]
        for g in groups_of([kind]):
            base = f"groups/{kind}/{g.name}"
            if kind == "translation":
                val = over_steps(data["params"], g, value)
                mag = over_steps(data["params"], g, absolute, False)
            else:
                val = over_steps(data["params"], g, square)
                mag = over_steps(data["params"], g, square, False)
            out[f"{base}/empirical"] = val
            out[f"{base}/magnitude"] = mag
            out[f"{base}/empirical_sum"] = val.sum(axis=1)
            out[f"{base}/magnitude_sum"] = mag.sum(axis=1)
            if not g.valid:
                continue
            th = data["theory"][g.key]
            out[f"{base}/time"] = th["time"]
            for name in ("exact", "paper"):
                t = th[name]
                err = np.zeros_like(t)
                for i in range(t.shape[0]):
                    for j in range(t.shape[1]):
                        err[i, j] = abs(t[i, j] - val[i, j]) / max(mag[i, j], 1e-300)
                out[f"{base}/theory_{name}"] = t
                out[f"{base}/error_{name}"] = err
                out[f"{base}/theory_{name}_sum"] = t.sum(axis=1)
                out[f"{base}/error_{name}_sum"] = np.array(
                    [
                        abs(t[i].sum() - val[i].sum()) / max(mag[i].sum(), 1e-300)
                        for i in range(t.shape[0])
                    ]
                )
        return out

    return ref


def ref_gradient(data: dict, cache: dict) -> dict:
    """Reference of `gradient`."""
    out = axes(data)
    for g in GROUPS:
        base = f"groups/{g.kind}/{g.name}"
        sq = over_steps(data["grads"], g, square, False)
        out[f"{base}/grad_sq"] = sq
        out[f"{base}/grad_sq_sum"] = sq.sum(axis=1)
        if g.kind == "rescale":
            sig = over_steps(data["grads"], g, square)
            out[f"{base}/grad_sq_signed"] = sig
            out[f"{base}/grad_sq_signed_sum"] = sig.sum(axis=1)
    return out


def ref_performance(data: dict, cache: dict) -> dict:
    """Reference of `performance`."""
    rows = [
        i
        for i in range(len(data["steps"]))
        if any(math.isfinite(v[i]) for v in data["metrics"].values())
    ]
    out = {
        "rows": np.array(rows),
        "steps": data["steps"][rows],
        "epoch": data["epoch"][rows],
        "lr": data["lr"][rows],
    }
    for m, v in data["metrics"].items():
        out[f"metrics/{m}"] = np.array([v[i] for i in rows])
    return out


def check_subset(index: np.ndarray, size: int, want: int) -> None:
    """A random subset's indices: sorted, distinct, in range, the right count."""
    assert len(index) == min(want, size)
    assert len(set(index.tolist())) == len(index)
    assert all(0 <= k < size for k in index)
    assert list(index) == sorted(index)


def ref_network(data: dict, cache: dict, subset: int | None) -> dict:
    """Reference of `network` (random indices checked, then used)."""
    out = axes(data)
    for p in TRAINABLE:
        size = int(np.prod(SHAPES[p]))
        index = np.asarray(cache["params"][p]["index"])
        if subset is None:
            assert list(index) == list(range(size))
        else:
            check_subset(index, size, subset)
        out[f"params/{p}/index"] = index
        values = np.zeros((len(STEPS), len(index)), dtype=np.float32)
        for i in range(len(STEPS)):
            flat = data["params"][p][i].reshape(-1)
            for c, k in enumerate(index):
                values[i, c] = flat[k]
        out[f"params/{p}/values"] = values
    return out


def ref_phase(data: dict, cache: dict) -> dict:
    """Reference of `phase`."""
    out = axes(data)
    n = len(STEPS)
    paper = data["hp"]["momentum"] == 0
    lag = [0 if i + 1 < n and STEPS[i + 1] == STEPS[i] + 1 else 1 for i in range(n)]
    if paper:
        out["grad_lag"] = np.array(lag)
    for g in groups_of(["scale", "rescale"]):
        base = f"groups/{g.kind}/{g.name}"
        q = over_steps(data["params"], g, square)
        vel = np.full_like(q, np.nan)
        for i in range(n - 1):
            for j in range(g.size):
                vel[i, j] = (q[i + 1, j] - q[i, j]) / (data["lr"][i] * (STEPS[i + 1] - STEPS[i]))
        out[f"{base}/position"] = q
        out[f"{base}/velocity"] = vel
        out[f"{base}/position_sum"] = q.sum(axis=1)
        out[f"{base}/velocity_sum"] = vel.sum(axis=1)
        if not paper:
            continue
        pv = np.zeros_like(q)
        for i in range(n):
            gk = (
                data["grads"]
                if lag[i]
                else {k: np.roll(v, -1, axis=0) for k, v in data["grads"].items()}
            )
            theta = at(data["params"], i)

            def d_sq(name, index, value, gk=gk, theta=theta, i=i):
                return (float(gk[name][i][index]) + WD * float(theta[name][index])) ** 2

            dsum = loop_sum(theta, g, d_sq)
            eta = data["lr"][i]
            for j in range(g.size):
                pv[i, j] = -(2 * WD + eta * WD * WD) * q[i, j] + eta * dsum[j]
        out[f"{base}/velocity_paper"] = pv
        out[f"{base}/velocity_paper_sum"] = pv.sum(axis=1)
    return out


def ref_weights_grads(data: dict, cache: dict, subset: int | None) -> dict:
    """Reference of `weights_grads` and `weights_grads_full`."""
    out = axes(data)
    sizes = [int(np.prod(SHAPES[p])) for p in TRAINABLE]
    param = np.asarray(cache["columns"]["param"])
    index = np.asarray(cache["columns"]["index"])
    flat = np.array([sum(sizes[:k]) + i for k, i in zip(param, index)])
    if subset is None:
        assert list(flat) == list(range(sum(sizes)))
    else:
        check_subset(flat, sum(sizes), subset)
    out["names"] = np.array([p.encode() for p in TRAINABLE], dtype=object)
    out["columns/param"] = param
    out["columns/index"] = index
    out["offsets"] = np.array([sum(sizes[:k]) for k in range(len(sizes) + 1)])
    for key, arrays in (("weights", data["params"]), ("grads", data["grads"])):
        m = np.zeros((len(STEPS), len(param)), dtype=np.float32)
        for i in range(len(STEPS)):
            for c, (k, e) in enumerate(zip(param, index)):
                m[i, c] = arrays[TRAINABLE[k]][i].reshape(-1)[e]
        out[key] = m
    return out


def ref_symmetry_violation(data: dict, cache: dict) -> dict:
    """Reference of `symmetry_violation`."""
    out = axes(data)
    n = len(STEPS)
    for g in GROUPS:
        base = f"groups/{g.kind}/{g.name}"
        per = np.full((n, g.size), np.nan)
        for i in range(1, n):
            # theta at which grad row i was taken: step STEPS[i] - 1
            if STEPS[i - 1] == STEPS[i] - 1:
                theta = at(data["params"], i - 1)
            else:
                eta = lr_at(STEPS[i] - 1)
                theta = {
                    k: data["params"][k][i].astype(np.float64)
                    + eta * data["updates"][k][i].astype(np.float64)
                    for k in TRAINABLE
                }
            grad = at(data["grads"], i)
            dot = np.zeros(g.size)
            gg = np.zeros(g.size)
            cc = np.zeros(g.size)
            for m in g.members:
                for index in np.ndindex(*SHAPES[m.param]):
                    j = neuron(m, index)
                    c = 1.0 if g.kind == "translation" else float(theta[m.param][index])
                    gv = float(grad[m.param][index])
                    dot[j] += m.sign * gv * c
                    gg[j] += gv * gv
                    cc[j] += c * c
            per[i] = np.abs(dot) / np.sqrt(gg * cc)
        out[f"{base}/per_group"] = per
        out[f"{base}/violation"] = np.array(
            [np.nan if np.all(np.isnan(r)) else np.nanmax(r) for r in per]
        )
    return out


def ref_norms(distance: bool):
    """Reference of `norms` or `distance`."""

    def ref(data: dict, cache: dict) -> dict:
        out = axes(data)
        layers: dict[str, np.ndarray] = {}
        total = np.zeros(len(STEPS))
        for p in TRAINABLE:
            sq = np.zeros(len(STEPS))
            for i in range(len(STEPS)):
                for index in np.ndindex(*SHAPES[p]):
                    v = float(data["params"][p][i][index])
                    if distance:
                        v -= float(data["params"][p][0][index])
                    sq[i] += v * v
            out[f"params/{p}"] = np.sqrt(sq)
            layer = p.rsplit(".", 1)[0]
            layers[layer] = layers.get(layer, 0) + sq
            total += sq
        for layer, sq in layers.items():
            out[f"layers/{layer}"] = np.sqrt(sq)
        out["total"] = np.sqrt(total)
        return out

    return ref


def ref_budget(data: dict, cache: dict) -> dict:
    """Reference of `budget`: measured quantity, stored terms, change and residual by loops."""
    out = axes(data)
    terms = ("decay", "leak", "kinetic", "discretisation")
    for g in groups_of(["translation", "scale", "rescale"]):
        if not g.valid:
            continue
        base = f"groups/{g.kind}/{g.name}"
        th = data["theory"][g.key]
        fn = value if g.kind == "translation" else square
        measured = over_steps(data["params"], g, fn)
        change = np.zeros_like(measured)
        residual = np.zeros_like(measured)
        for i in range(measured.shape[0]):
            for j in range(measured.shape[1]):
                change[i, j] = measured[i, j] - th["budget_initial"][i, j]
                residual[i, j] = change[i, j] - sum(th[f"budget_{t}"][i, j] for t in terms)
        values = {"measured": measured, "change": change, "residual": residual}
        values.update({t: th[f"budget_{t}"] for t in terms})
        for name, v in values.items():
            out[f"{base}/{name}"] = v
            out[f"{base}/{name}_sum"] = v.sum(axis=1)
    return out


def ref_equilibrium(data: dict, cache: dict) -> dict:
    """Reference of `equilibrium` (SGD family: custom_sgd with the run's momentum)."""
    out = axes(data)
    beta, wd = data["hp"]["momentum"], data["hp"]["wd"]
    steps, lr = data["steps"], data["lr"]
    for g in groups_of(["scale"]):
        if not g.valid:
            continue
        base = f"groups/scale/{g.name}"
        th = data["theory"][g.key]
        q = over_steps(data["params"], g, square)
        n, size = q.shape
        angle = np.full((n, size), np.nan)
        gsq = np.full((n, size), np.nan)
        p_angle = np.full(n, np.nan)
        p_norm = np.full((n, size), np.nan)
        t_scale = np.full(n, np.nan)
        for i in range(1, n):
            gap = steps[i] - steps[i - 1]
            eta = lr[i - 1]
            p_angle[i] = math.sqrt(2 * eta * wd / (1 + beta))
            t_scale[i] = (1 - beta) / (eta * wd)
            for j in range(size):
                angle[i, j] = (
                    th["budget_angle_sum"][i, j] - th["budget_angle_sum"][i - 1, j]
                ) / gap
                gsq[i, j] = (
                    th["budget_grad_sq_sum"][i, j] - th["budget_grad_sq_sum"][i - 1, j]
                ) / gap
                p_norm[i, j] = math.sqrt(eta * gsq[i, j] / (2 * wd * (1 - beta)))
        norm = np.sqrt(q)
        for name, v in (("angle", angle), ("norm", norm), ("grad_sq", gsq)):
            out[f"{base}/{name}"] = v
            out[f"{base}/{name}_mean"] = v.mean(axis=1)
        out[f"{base}/predicted_angle"] = p_angle
        out[f"{base}/predicted_norm"] = p_norm
        out[f"{base}/predicted_norm_mean"] = p_norm.mean(axis=1)
        out[f"{base}/time_scale"] = t_scale
    return out


REFERENCES = {
    "translation": ref_conservation("translation"),
    "scale": ref_conservation("scale"),
    "rescale": ref_conservation("rescale"),
    "gradient": ref_gradient,
    "performance": ref_performance,
    "network": lambda d, c: ref_network(d, c, None),
    "phase": ref_phase,
    "weights_grads": lambda d, c: ref_weights_grads(d, c, 7),
    "weights_grads_full": lambda d, c: ref_weights_grads(d, c, None),
    "symmetry_violation": ref_symmetry_violation,
    "norms": ref_norms(False),
    "distance": ref_norms(True),
    "budget": ref_budget,
    "equilibrium": ref_equilibrium,
}


def flatten(tree: dict, prefix: str = "") -> dict:
    """Nested `load_cache` output -> {"a/b/c": array}, without attributes."""
    out = {}
    for k, v in tree.items():
        if k == "attrs":
            continue
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def assert_matches(name: str, cache: dict, expected: dict) -> None:
    """Every dataset of the cache equals its reference and every reference is in the cache."""
    got = flatten(cache)
    assert sorted(got) == sorted(expected), f"{name}: datasets differ from the reference"
    for key, want in expected.items():
        have = got[key]
        if want.dtype == object:
            assert [bytes(x) if isinstance(x, bytes) else x.encode() for x in have] == list(want)
            continue
        assert have.shape == np.shape(want), f"{name}:{key} shape {have.shape} != {want.shape}"
        np.testing.assert_allclose(
            have, want, rtol=1e-12, atol=1e-300, equal_nan=True, err_msg=f"{name}:{key}"
        )


@pytest.fixture(scope="module")
def fake_runs(tmp_path_factory):
    """Two fake runs: plain SGD and heavy-ball momentum."""
    root = tmp_path_factory.mktemp("fake")
    runs = {}
    for momentum in (0.0, 0.9):
        data = make_data(momentum)
        run = root / f"m{momentum}"
        write_features(run, data)
        runs[momentum] = (run, data)
    return runs


def test_every_metric_has_a_reference():
    """A new metric without a brute-force reference fails here."""
    assert set(REFERENCES) == set(METRICS.names())


@pytest.mark.parametrize("chunk_rows", [2, 64])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_metric_matches_brute_force(fake_runs, monkeypatch, name, momentum, chunk_rows):
    """Each metric equals its reference, with slices of 2 and 64 rows."""
    monkeypatch.setattr(metrics_base, "MAX_CHUNK_ROWS", chunk_rows)
    run, data = fake_runs[momentum]
    suffix = f"_{chunk_rows}"
    subset = 7 if name == "weights_grads" else None
    status = cache_run(str(run), metrics=[name], suffix=suffix, subset=subset, progress=False)
    assert status == {name: "computed"}
    cache = load_cache(str(run / "cache" / f"{name}{suffix}.h5"))
    assert cache["attrs"]["metric"] == name
    assert cache["attrs"]["source_rows"] == len(STEPS)
    assert cache["attrs"]["source_last_step"] == STEPS[-1]
    assert_matches(name, cache, REFERENCES[name](data, cache))


def test_conservation_attributes_list_invalid_groups(fake_runs):
    """Invalid groups are listed with their reason and get no theory."""
    run, _ = fake_runs[0.9]
    cache_run(str(run), metrics="scale", suffix="_attrs", progress=False)
    cache = load_cache(str(run / "cache" / "scale_attrs.h5"))
    assert json.loads(cache["attrs"]["invalid"]) == {"scale/c": "violation 0.3 above tolerance"}
    bad = cache["groups"]["scale"]["c"]["attrs"]
    assert bad["valid"] is False or bad["valid"] == np.False_
    assert bad["reason"] == "violation 0.3 above tolerance"
    assert "theory_exact" not in cache["groups"]["scale"]["c"]
    good = cache["groups"]["scale"]["l1"]["attrs"]
    assert bool(good["valid"]) and good["size"] == 4
    assert json.loads(good["theory"]) == ["exact", "paper"]
    assert cache["attrs"]["momentum"] == 0.9


def test_phase_paper_form_only_for_plain_sgd(fake_runs):
    """The paper's phase form exists only for momentum 0."""
    for momentum, expected in ((0.0, True), (0.9, False)):
        run, _ = fake_runs[momentum]
        cache_run(str(run), metrics="phase", suffix="_p", progress=False)
        cache = load_cache(str(run / "cache" / "phase_p.h5"))
        assert bool(cache["attrs"]["paper"]) is expected
        assert ("momentum" in cache["attrs"]["paper_reason"]) is (not expected)


def test_network_subset_is_seeded(fake_runs):
    """The same seed gives the same subset, another seed another one."""
    run, data = fake_runs[0.0]
    indices = []
    for seed, suffix in ((3, "_a"), (3, "_b"), (4, "_c")):
        cache_run(str(run), metrics="network", suffix=suffix, subset=5, seed=seed, progress=False)
        cache = load_cache(str(run / "cache" / f"network{suffix}.h5"))
        assert_matches("network", cache, ref_network(data, cache, 5))
        indices.append(np.concatenate([cache["params"][p]["index"] for p in TRAINABLE]))
    assert np.array_equal(indices[0], indices[1])
    assert not np.array_equal(indices[0], indices[2])


def test_aliases_and_unknown_names():
    """Aliases map to the plain metrics; unknown names list the valid ones."""
    assert ALIASES == {
        "translation-momentum": "translation",
        "scale-momentum": "scale",
        "rescale-momentum": "rescale",
    }
    assert parse_metric_list("scale-momentum, scale,translation") == ["scale", "translation"]
    with pytest.raises(UnknownNameError) as err:
        parse_metric_list("scale,bogus")
    message = str(err.value)
    assert "bogus" in message and "\n" not in message
    assert all(n in message for n in METRICS.names())


def test_applies_reasons(fake_runs):
    """Metrics say why they do not apply."""
    run, _ = fake_runs[0.0]
    with storage.open_features(str(run)) as f:
        info = FeaturesInfo.from_file(f)
    assert info.weights == TRAINABLE
    assert info.metrics == ["train_loss", "test_loss", "top1", "top5"]
    for name in METRICS.names():
        assert METRICS.get(name).applies(info) == (True, "")
    no_grad = FeaturesInfo(**{**vars(info), "buffers": {"update": TRAINABLE}})
    ok, reason = METRICS.get("gradient").applies(no_grad)
    assert not ok and "--save-buffers grad" in reason
    no_scale = FeaturesInfo(**{**vars(info), "groups": groups_of(["translation"])})
    ok, reason = METRICS.get("scale").applies(no_scale)
    assert not ok and "no scale groups" in reason and "BatchNorm" in reason
    one_row = FeaturesInfo(**{**vars(info), "num_rows": 1})
    assert not METRICS.get("phase").applies(one_row)[0]
    no_metrics = FeaturesInfo(**{**vars(info), "metrics": []})
    assert not METRICS.get("performance").applies(no_metrics)[0]


def test_one_violation_definition():
    """Issue 13: verification and the metric share `Utils.kinds.violation` (NaN at zero)."""
    from Utils import kinds
    from Utils.metrics.symmetry_violation import violation

    group = GROUPS[1]
    zeros = {n: np.zeros((1, *SHAPES[n])) for n in group.params}
    ones = {n: np.ones((1, *SHAPES[n])) for n in group.params}
    assert np.isnan(violation("scale", zeros, ones, group)).all()
    assert np.isnan(kinds.violation(np.zeros(3), np.zeros(3), np.ones(3))).all()
    rng = np.random.default_rng(0)
    grads = {n: rng.normal(size=(2, *SHAPES[n])) for n in group.params}
    params = {n: rng.normal(size=(2, *SHAPES[n])) for n in group.params}
    got = violation("scale", grads, params, group)  # [2, 4]
    for r in range(2):
        dot = sum((grads[n][r] * params[n][r]).reshape(4, -1).sum(1) for n in group.params)
        g_sq = sum((grads[n][r] ** 2).reshape(4, -1).sum(1) for n in group.params)
        c_sq = sum((params[n][r] ** 2).reshape(4, -1).sum(1) for n in group.params)
        np.testing.assert_allclose(got[r], np.abs(dot) / np.sqrt(g_sq * c_sq), rtol=1e-12)


def test_pure_functions_edge_cases():
    """Zero denominators, all-NaN maxima and subsets larger than the array."""
    from Utils.metrics.base import nan_max
    from Utils.metrics.conservation import relative_error
    from Utils.metrics.network import choose_elements

    err = relative_error(np.array([1.0, 0.0, np.nan]), np.array([1.5, 0.0, 1.0]), np.zeros(3))
    assert err[0] == pytest.approx(0.5 / 1e-300) and err[1] == 0.0 and np.isnan(err[2])
    x = np.array([[np.nan, np.nan], [1.0, np.nan], [2.0, 3.0]])
    out = nan_max(x)
    assert np.isnan(out[0]) and out[1] == 1.0 and out[2] == 3.0
    rng = np.random.default_rng(0)
    assert list(choose_elements(4, None, rng)) == [0, 1, 2, 3]
    assert list(choose_elements(4, 10, rng)) == [0, 1, 2, 3]
    picked = choose_elements(100, 10, rng)
    check_subset(picked, 100, 10)
