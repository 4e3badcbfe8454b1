"""Shared core of the `translation`, `scale` and `rescale` metrics (THEORY.md sections 2-4).

For each group of one kind, per neuron and summed over the layer: the measured quantity
(translation S = sum theta_A, scale Q = |theta_A|^2, rescale R = |theta_A1|^2 - |theta_A2|^2),
its magnitude (the same sum with every term made non-negative: sum |theta_A| for translation,
|theta_A1|^2 + |theta_A2|^2 for rescale, Q itself for scale), the exact theory (section 3) and the
paper's continuous theory (section 4) stored by custom_sgd, and their relative errors
|theory - measured| / max(magnitude, TINY). Normalising by the magnitude, not by |measured|,
keeps the error meaningful where a translation sum or a rescale difference crosses zero: it
is the error relative to the size of the terms summed, which is what float round-off scales with.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from Utils import kinds
from Utils.groups import SymmetryGroup, group_sum_np
from Utils.metrics.base import (
    TINY,
    Context,
    group_attrs,
    hp_float,
    invalid_groups,
    time_axis,
    unsigned,
)

THEORY_FIELDS = ("exact", "paper")


def conserved_quantity(
    kind: str, params: Mapping[str, np.ndarray], group: SymmetryGroup
) -> tuple[np.ndarray, np.ndarray]:
    """The measured quantity of every group and its magnitude.

    Args:
        kind: a kind of `Utils.kinds.KINDS` (its `term` and `magnitude_term` are summed).
        params: parameter name -> values [R, *shape].
        group: the groups.

    Returns:
        (value [R, n], magnitude [R, n]) in float64.
    """
    spec = kinds.spec(kind)
    wide = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}  # [R, *shape]
    value = group_sum_np({k: spec.term(v) for k, v in wide.items()}, group, lead=1)  # [R, n]
    magnitude = {k: spec.magnitude_term(v) for k, v in wide.items()}
    return value, group_sum_np(magnitude, unsigned(group), lead=1)


def relative_error(theory: np.ndarray, measured: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """|theory - measured| / max(magnitude, TINY), elementwise (NaN where theory is NaN)."""
    theory = np.asarray(theory, dtype=np.float64)
    measured = np.asarray(measured, dtype=np.float64)
    return np.abs(theory - measured) / np.maximum(np.asarray(magnitude, dtype=np.float64), TINY)


def compute_conservation(ctx: Context, kind: str) -> None:
    """Writes the cache file of one conservation metric (layout in docs/METRICS.md).

    Args:
        ctx: the metric context.
        kind: "translation", "scale" or "rescale".
    """
    groups = ctx.info.groups_of([kind])
    ctx.write_axes()
    t, source = time_axis(ctx, [g for g in groups if g.valid])
    ctx.writer.write("time", t, source=source)
    hp = ctx.info.hyperparameters
    any_theory = False
    for g in groups:
        base = f"groups/{kind}/{g.name}"
        fields = [f for f in THEORY_FIELDS if g.valid and ctx.has_theory(g, f)]
        any_theory = any_theory or bool(fields)
        ctx.writer.group(base, **group_attrs(g), theory=fields)
        if g.valid and ctx.has_theory(g, "time"):
            ctx.writer.write(
                f"{base}/time", ctx.read_theory(g, "time", slice(0, ctx.info.num_rows))
            )
        online = ctx.has_measured(g)
        per_row = 8 * 3 * g.size if online else ctx.row_bytes(g.params, copies=3)
        for rows in ctx.row_slices(per_row, desc=f"{kind} {g.name}"):
            if online:  # recorded during training (Utils/online.py): same sums, no parameters
                value = ctx.read_measured(g, "value", rows)  # [r, n]
                magnitude = ctx.read_measured(g, "magnitude", rows)
            else:
                value, magnitude = conserved_quantity(kind, ctx.read_params(g.params, rows), g)
            ctx.writer.append(f"{base}/empirical", value)
            ctx.writer.append(f"{base}/magnitude", magnitude)
            ctx.writer.append(f"{base}/empirical_sum", value.sum(axis=-1))
            ctx.writer.append(f"{base}/magnitude_sum", magnitude.sum(axis=-1))
            for name in fields:
                theory = np.asarray(ctx.read_theory(g, name, rows), dtype=np.float64)  # [r, n]
                ctx.writer.append(f"{base}/theory_{name}", theory)
                ctx.writer.append(f"{base}/error_{name}", relative_error(theory, value, magnitude))
                total = theory.sum(axis=-1)  # [r]
                ctx.writer.append(f"{base}/theory_{name}_sum", total)
                ctx.writer.append(
                    f"{base}/error_{name}_sum",
                    relative_error(total, value.sum(axis=-1), magnitude.sum(axis=-1)),
                )
    ctx.writer.attrs(
        kind=kind,
        layers=[g.name for g in groups],
        invalid=invalid_groups(groups),
        theory=any_theory,
        lr=hp_float(hp, "lr"),
        wd=hp_float(hp, "wd"),
        momentum=hp_float(hp, "momentum"),
        dampening=hp_float(hp, "dampening"),
        nesterov=bool(hp.get("nesterov", False)),
        optimizer=str(hp.get("optimizer", "")),
    )
