"""The `gradient` metric: per-neuron squared gradient norms |g_A|^2 of every symmetry group.

Read from the stored ``grad`` buffer (train.py ``--save-buffers grad``). For rescale groups the
signed difference |g_A1|^2 - |g_A2|^2 (the forcing of THEORY.md section 4) is stored as well
(kinds whose `Utils.kinds.KindSpec.signed` is set).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from Utils.groups import SymmetryGroup, group_sum_np
from Utils.kinds import KIND_NAMES
from Utils.metrics.base import Context, group_attrs, invalid_groups, register_metric, unsigned


def grad_norms(
    grads: Mapping[str, np.ndarray], group: SymmetryGroup
) -> tuple[np.ndarray, np.ndarray]:
    """Squared gradient norms of every group.

    Args:
        grads: parameter name -> gradient [R, *shape].
        group: the groups.

    Returns:
        (|g_A|^2 summed over all members [R, n], the same with the members' signs [R, n]).
    """
    squares = {k: np.square(np.asarray(v, dtype=np.float64)) for k, v in grads.items()}
    return group_sum_np(squares, unsigned(group), lead=1), group_sum_np(squares, group, lead=1)


@register_metric(
    "gradient",
    description="per-neuron squared gradient norms |g_A|^2 of every group (grad buffer)",
    kinds=KIND_NAMES,
    buffers=("grad",),
)
def compute_gradient(ctx: Context) -> None:
    """Writes cache/gradient.h5 (layout in docs/METRICS.md)."""
    groups = ctx.info.groups_of(KIND_NAMES)
    ctx.write_axes()
    for g in groups:
        base = f"groups/{g.kind}/{g.name}"
        ctx.writer.group(base, **group_attrs(g))
        for rows in ctx.row_slices(ctx.row_bytes(g.params, 2), desc=f"gradient {g.key}"):
            total, signed = grad_norms(ctx.read_buffer("grad", g.params, rows), g)
            ctx.writer.append(f"{base}/grad_sq", total)
            ctx.writer.append(f"{base}/grad_sq_sum", total.sum(axis=-1))
            if g.spec.signed:
                ctx.writer.append(f"{base}/grad_sq_signed", signed)
                ctx.writer.append(f"{base}/grad_sq_signed_sum", signed.sum(axis=-1))
    ctx.writer.attrs(layers=[g.key for g in groups], invalid=invalid_groups(groups))
