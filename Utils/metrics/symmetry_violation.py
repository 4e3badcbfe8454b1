"""The `symmetry_violation` metric: how far the stored gradients are from the symmetry's
constraint, |<g_A, c_A>| / (|g_A| |c_A|) per group (THEORY.md section 2), and its max over the
groups of each layer.

c_A = 1 (translation), theta_A (scale), (theta_A1, -theta_A2) (rescale). The ``grad`` buffer of
the row of step s holds g_{s-1}, the gradient at theta_{s-1}, so c_A is taken at theta_{s-1}:
the previous row's parameters when it is step s - 1, else theta_s + eta_{s-1} u_{s-1} from the
``update`` buffer (`Utils.metrics.base.previous_lr` gives eta_{s-1}); rows where neither is
available (and row 0, which has no gradient) are NaN for scale and rescale.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from Utils import kinds
from Utils.groups import SymmetryGroup, group_sum_np
from Utils.kinds import KIND_NAMES
from Utils.metrics.base import (
    Context,
    group_attrs,
    invalid_groups,
    nan_max,
    previous_lr,
    register_metric,
    unsigned,
)


def violation(
    kind: str,
    grads: Mapping[str, np.ndarray],
    params: Mapping[str, np.ndarray],
    group: SymmetryGroup,
) -> np.ndarray:
    """|<g_A, c_A>| / (|g_A| |c_A|) of every group.

    Args:
        kind: a kind of `Utils.kinds.KINDS` (its constraint direction c_A is used).
        grads: parameter name -> gradient [R, *shape].
        params: parameter name -> parameters [R, *shape] at which the gradient was taken
            (unused for translation).
        group: the groups.

    Returns:
        [R, n] float64; NaN where |g_A| |c_A| = 0 or the inputs are NaN.
    """
    spec = kinds.spec(kind)
    g = {k: np.asarray(v, dtype=np.float64) for k, v in grads.items()}
    source = g if spec.constraint == "ones" else params
    c = {k: spec.direction(np.asarray(source[k], dtype=np.float64)) for k in g}
    dot = group_sum_np({k: g[k] * c[k] for k in g}, group, lead=1)  # [R, n]
    g_sq = group_sum_np({k: g[k] * g[k] for k in g}, unsigned(group), lead=1)
    c_sq = group_sum_np({k: c[k] * c[k] for k in g}, unsigned(group), lead=1)
    return kinds.violation(dot, g_sq, c_sq)


def params_before(
    theta: np.ndarray,
    theta_prev_row: np.ndarray,
    consecutive: np.ndarray,
    update: np.ndarray | None,
    eta_prev: np.ndarray,
) -> np.ndarray:
    """theta_{s-1} for each row: the previous row where consecutive, else theta_s + eta u.

    Args:
        theta: theta_s [R, *shape].
        theta_prev_row: the previous row's parameters [R, *shape] (any value where not
            consecutive).
        consecutive: [R] bool, previous row is step s - 1.
        update: u_{s-1} [R, *shape] or None when not stored.
        eta_prev: eta_{s-1} [R] (NaN where unknown).

    Returns:
        [R, *shape] float64, NaN where unknown.
    """
    theta = np.asarray(theta, dtype=np.float64)
    shape = (-1,) + (1,) * (theta.ndim - 1)
    if update is None:
        rebuilt = np.full_like(theta, np.nan)
    else:
        rebuilt = theta + eta_prev.reshape(shape) * np.asarray(update, dtype=np.float64)
    prev = np.asarray(theta_prev_row, dtype=np.float64)
    return np.where(consecutive.reshape(shape), prev, rebuilt)


@register_metric(
    "symmetry_violation",
    description="|<g_A, c_A>| / (|g_A| |c_A|) per group and its max per layer (grad buffer)",
    kinds=KIND_NAMES,
    buffers=("grad",),
)
def compute_symmetry_violation(ctx: Context) -> None:
    """Writes cache/symmetry_violation.h5 (layout in docs/METRICS.md)."""
    groups = ctx.info.groups_of(KIND_NAMES)
    ctx.write_axes()
    steps = ctx.axis("steps")
    consecutive = np.zeros(steps.size, dtype=bool)
    consecutive[1:] = np.diff(steps) == 1
    eta_prev = previous_lr(ctx)
    for g in groups:
        base = f"groups/{g.kind}/{g.name}"
        ctx.writer.group(base, **group_attrs(g))
        has_update = ctx.info.has_buffer("update", g.params)
        for rows in ctx.row_slices(ctx.row_bytes(g.params, 5), desc=f"violation {g.key}"):
            grads = ctx.read_buffer("grad", g.params, rows)
            before: dict[str, np.ndarray] = {}
            if g.spec.constraint == "theta":
                ext = slice(max(rows.start - 1, 0), rows.stop)
                theta = ctx.read_params(g.params, ext)
                update = ctx.read_buffer("update", g.params, rows) if has_update else {}
                for p in g.params:
                    cur = theta[p][1:] if rows.start > 0 else theta[p]
                    prev = theta[p][:-1] if rows.start > 0 else np.roll(theta[p], 1, axis=0)
                    before[p] = params_before(
                        cur, prev, consecutive[rows], update.get(p), eta_prev[rows]
                    )
            per_group = violation(g.kind, grads, before, g)
            ctx.writer.append(f"{base}/per_group", per_group)
            ctx.writer.append(f"{base}/violation", nan_max(per_group, axis=-1))
    ctx.writer.attrs(
        layers=[g.key for g in groups],
        invalid=invalid_groups(groups),
        update_buffer=ctx.info.has_buffer("update"),
    )
