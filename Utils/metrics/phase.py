"""The `phase` metric: phase portraits of the scale and rescale quantities (THEORY.md section 5).

Per neuron (and summed over the layer): position Q_k and velocity
(Q_{k'} - Q_k) / (eta_k (k' - k)) between consecutive extracted rows k < k' (eta_k is the row's
``/lr``; the last row has no velocity: NaN). For plain SGD the paper's form
dQ/dt = -(2 lam + eta lam^2) Q + eta |d|^2 (d = g + lam theta; signed A1 - A2 sums for rescale)
is stored as well. It needs g_k, the gradient at theta_k, which the ``grad`` buffer of the row
of step k + 1 holds: when the next row is not step k + 1 the row's own buffer g_{k-1} is used
(one step stale, a first-order approximation like the paper's form), and ``grad_lag`` says which.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from Utils.groups import SymmetryGroup, group_sum_np
from Utils.kinds import QUADRATIC
from Utils.metrics.base import (
    Context,
    FeaturesInfo,
    group_attrs,
    hp_float,
    invalid_groups,
    register_metric,
)

KINDS = QUADRATIC  # the kinds whose quantity is quadratic (Utils.kinds)
PAPER_OPTIMIZERS = ("custom_sgd", "sgd")


def position(params: Mapping[str, np.ndarray], group: SymmetryGroup) -> np.ndarray:
    """Q (signed group sum of theta^2) of every group: [R, n] float64."""
    return group_sum_np(
        {k: np.square(np.asarray(v, dtype=np.float64)) for k, v in params.items()},
        group,
        lead=1,
    )


def velocity(q: np.ndarray, steps: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """Finite-difference velocity between consecutive rows.

    Args:
        q: positions [R, n].
        steps: steps of the rows [R].
        lr: learning rate of each row [R].

    Returns:
        [R - 1, n]: (q[i+1] - q[i]) / (lr[i] * (steps[i+1] - steps[i])).
    """
    dt = np.asarray(lr, dtype=np.float64)[:-1] * np.diff(np.asarray(steps, dtype=np.float64))
    return np.diff(np.asarray(q, dtype=np.float64), axis=0) / dt[:, None]


def paper_velocity(
    q: np.ndarray,
    grads: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    group: SymmetryGroup,
    lr: np.ndarray,
    wd: float,
) -> np.ndarray:
    """The paper's plain-SGD form -(2 lam + eta lam^2) Q + eta |d|^2 with d = g + lam theta.

    Args:
        q: positions [R, n].
        grads: parameter name -> g [R, *shape].
        params: parameter name -> theta [R, *shape].
        group: the groups (signed sums for rescale).
        lr: eta of each row [R].
        wd: weight decay lam.

    Returns:
        [R, n] float64.
    """
    d_sq = {
        k: np.square(np.asarray(grads[k], dtype=np.float64) + wd * np.asarray(v, np.float64))
        for k, v in params.items()
    }
    eta = np.asarray(lr, dtype=np.float64)[:, None]
    return -(2 * wd + eta * wd * wd) * q + eta * group_sum_np(d_sq, group, lead=1)


def paper_reason(info: FeaturesInfo) -> str:
    """Why the paper's form is not stored ("" when it is)."""
    hp = info.hyperparameters
    if hp_float(hp, "momentum") != 0 or hp.get("optimizer") not in PAPER_OPTIMIZERS:
        return "the paper's phase form is for plain SGD (momentum 0)"
    if not info.has_buffer("grad"):
        return "needs the grad buffer (train with --save-buffers grad)"
    return ""


@register_metric(
    "phase",
    description="phase portraits: Q_k and dQ/dt per scale/rescale neuron (plus the paper's "
    "plain-SGD form)",
    kinds=KINDS,
    min_rows=2,
)
def compute_phase(ctx: Context) -> None:
    """Writes cache/phase.h5 (layout in docs/METRICS.md)."""
    n = ctx.info.num_rows
    groups = ctx.info.groups_of(KINDS)
    ctx.write_axes()
    steps = ctx.axis("steps")
    lr = ctx.axis("lr")
    reason = paper_reason(ctx.info)
    wd = hp_float(ctx.info.hyperparameters, "wd")
    lag = np.ones(n, dtype=np.int64)
    lag[:-1] = np.where(np.diff(steps) == 1, 0, 1)
    if not reason:
        ctx.writer.write("grad_lag", lag)
    for g in groups:
        base = f"groups/{g.kind}/{g.name}"
        ctx.writer.group(base, **group_attrs(g))
        for rows in ctx.row_slices(ctx.row_bytes(g.params, 4), desc=f"phase {g.key}"):
            ext = slice(rows.start, min(rows.stop + 1, n))  # one row more for the difference
            theta = ctx.read_params(g.params, ext)
            q = position(theta, g)  # [r (+1), n]
            vel = velocity(q, steps[ext], lr[ext])
            r = rows.stop - rows.start
            if vel.shape[0] < r:  # the last row has no successor
                vel = np.concatenate([vel, np.full((1, g.size), np.nan)])
            ctx.writer.append(f"{base}/position", q[:r])
            ctx.writer.append(f"{base}/velocity", vel)
            ctx.writer.append(f"{base}/position_sum", q[:r].sum(axis=-1))
            ctx.writer.append(f"{base}/velocity_sum", vel.sum(axis=-1))
            if reason:
                continue
            grads = ctx.read_buffer("grad", g.params, ext)
            own = {p: v[:r] for p, v in grads.items()}
            if ext.stop > rows.stop:
                nxt = {p: v[1:] for p, v in grads.items()}
            else:
                nxt = {p: np.concatenate([v[1:], v[-1:]]) for p, v in grads.items()}
            g_k = {
                p: np.where(lag[rows].reshape(-1, *([1] * (v.ndim - 1))) == 0, nxt[p], v)
                for p, v in own.items()
            }
            paper = paper_velocity(
                q[:r], g_k, {p: v[:r] for p, v in theta.items()}, g, lr[rows], wd
            )
            ctx.writer.append(f"{base}/velocity_paper", paper)
            ctx.writer.append(f"{base}/velocity_paper_sum", paper.sum(axis=-1))
    ctx.writer.attrs(
        layers=[g.key for g in groups],
        invalid=invalid_groups(groups),
        paper=not reason,
        paper_reason=reason,
        wd=wd,
    )
