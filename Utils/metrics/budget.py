"""The `budget` metric: the symmetry-breaking budget of every group (THEORY.md section 6).

Per group (per neuron and summed over the layer), at every extracted row: the measured quantity
(Q for scale, the signed R for rescale, S for translation), its change since tracking started
(``measured - budget_initial``), the cumulative decay, leak, kinetic and discretisation terms
carried by `Utils.budget.BudgetTracker` (stored by extraction as
``theory/<kind>/<layer>/budget_<term>``), and the residual ``change - sum of the terms``, which
is round-off when every step was observed (the terms are an identity).
"""

from __future__ import annotations

import numpy as np

from Utils.budget import FIELD_PREFIX, TERMS
from Utils.kinds import KIND_NAMES
from Utils.metrics.base import Context, FeaturesInfo, group_attrs, invalid_groups, register_metric
from Utils.theory import measure

KINDS = KIND_NAMES


def budget_reason(info: FeaturesInfo) -> str:
    """Why the metric does not apply ("" when some group may carry a budget)."""
    if not any(g.key in info.theory for g in info.groups_of(KINDS)):
        return (
            "features.h5 holds no symmetry-breaking budget (train with this version, then "
            "extract.py --overwrite)"
        )
    return ""


def budget_values(
    measured: np.ndarray, initial: np.ndarray, terms: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """The change since tracking started and the residual of the identity.

    Args:
        measured: the quantity at each row [r, n].
        initial: the quantity when tracking started [r, n] (the same at every row).
        terms: term name -> cumulative sum [r, n].

    Returns:
        ``change`` and ``residual`` = change - sum of the terms, [r, n] float64.
    """
    change = np.asarray(measured, np.float64) - np.asarray(initial, np.float64)
    total = sum(np.asarray(terms[t], np.float64) for t in TERMS)
    return {"change": change, "residual": change - total}


@register_metric(
    "budget",
    description="symmetry-breaking budget per group: change of Q/R/S split into decay, "
    "gradient leak, kinetic and discretisation terms",
    kinds=KINDS,
    check=budget_reason,
)
def compute_budget(ctx: Context) -> None:
    """Writes cache/budget.h5 (layout in docs/METRICS.md)."""
    groups = [g for g in ctx.info.groups_of(KINDS) if g.valid]
    with_budget = [g for g in groups if ctx.has_theory(g, FIELD_PREFIX + "decay")]
    ctx.write_axes()
    for g in with_budget:
        base = f"groups/{g.kind}/{g.name}"
        ctx.writer.group(base, **group_attrs(g))
        for rows in ctx.row_slices(ctx.row_bytes(g.params, 2), desc=f"budget {g.key}"):
            theta = ctx.read_params(g.params, rows)
            measured = measure(g, theta, lead=1)  # [r, n]
            initial = ctx.read_theory(g, FIELD_PREFIX + "initial", rows)  # [r, n]
            terms = {t: ctx.read_theory(g, FIELD_PREFIX + t, rows) for t in TERMS}
            values = {"measured": measured, **terms, **budget_values(measured, initial, terms)}
            for name, value in values.items():
                value = np.asarray(value, dtype=np.float64)
                ctx.writer.append(f"{base}/{name}", value)
                ctx.writer.append(f"{base}/{name}_sum", value.sum(axis=-1))
    ctx.writer.attrs(
        layers=[g.key for g in with_budget],
        invalid=invalid_groups(ctx.info.groups_of(KINDS)),
        no_budget=[g.key for g in groups if g not in with_budget],
        terms=list(TERMS),
    )
