"""The `equilibrium` metric: angular update and norm of scale groups vs their equilibrium.

Measured per scale neuron (THEORY.md section 7), at every extracted row i > 0, from the
budget's cumulative sums (`Utils.budget.BudgetTracker`): the mean angular update per step
between rows i - 1 and i (the angle between theta_k and theta_{k+1}, averaged over the steps in
between), the mean |g_k|^2 over those steps, and the norm |theta_A| at the row. Predicted at
the row's learning rate eta (the ``/lr`` of row i - 1, the one used in between) and weight
decay lam:

* SGD (custom_sgd, sgd, momentum; beta = momentum, 0 for plain SGD), Wan et al. 2021: angle
  sqrt(2 eta lam / (1 + beta)); norm^2 from the balance of decay and gradient noise,
  |theta|^2 = eta E|g|^2 / (2 lam (1 - beta)) with E|g|^2 the measured mean; time scale
  (1 - beta) / (eta lam).
* AdamW (betas 0.9, 0.999), Kosson et al. 2024: angle sqrt(2 eta lam (1 - beta1) / (1 + beta1));
  norm sqrt(eta C / (2 lam)) for a group of C elements; time scale 1 / (eta lam).

Other optimizers (adam, rms, lamb) and lam = 0 have no prediction: those datasets are NaN and
the ``prediction`` attribute says why.
"""

from __future__ import annotations

import numpy as np

from Utils.budget import FIELD_PREFIX
from Utils.groups import group_sum_np
from Utils.metrics.base import (
    Context,
    FeaturesInfo,
    group_attrs,
    hp_float,
    invalid_groups,
    register_metric,
)
from Utils.theory import measure

SGD_FAMILY = ("custom_sgd", "sgd", "momentum")
ADAMW_BETA1 = 0.9  # torch.optim.AdamW's default, used by the registered adamw


def prediction_reason(optimizer: str, wd: float) -> str:
    """Why there is no equilibrium prediction ("" when there is one)."""
    if wd <= 0:
        return "no weight decay: no equilibrium (train with --wd > 0)"
    if optimizer not in (*SGD_FAMILY, "adamw"):
        return f"no equilibrium prediction for optimizer {optimizer} (only SGD and AdamW)"
    return ""


def predicted(
    optimizer: str,
    lr: np.ndarray,
    wd: float,
    momentum: float,
    grad_sq_mean: np.ndarray,
    elements: np.ndarray,
) -> dict[str, np.ndarray]:
    """Equilibrium angular update, norm and time scale.

    Args:
        optimizer: registry name (see `prediction_reason` for the ones with a prediction).
        lr: eta per row [r].
        wd: lam (> 0).
        momentum: beta of SGD.
        grad_sq_mean: measured mean |g|^2 per step per group [r, n] (SGD's norm).
        elements: number of elements C of each group [n] (AdamW's norm).

    Returns:
        ``angle`` [r], ``norm`` [r, n], ``time_scale`` [r] (steps), float64.
    """
    eta = np.asarray(lr, dtype=np.float64)  # [r]
    if optimizer == "adamw":
        b1 = ADAMW_BETA1
        angle = np.sqrt(2 * eta * wd * (1 - b1) / (1 + b1))
        norm = np.sqrt(eta[:, None] * np.asarray(elements, np.float64)[None] / (2 * wd))
        return {"angle": angle, "norm": norm, "time_scale": 1.0 / (eta * wd)}
    beta = momentum
    angle = np.sqrt(2 * eta * wd / (1 + beta))
    norm = np.sqrt(eta[:, None] * np.asarray(grad_sq_mean, np.float64) / (2 * wd * (1 - beta)))
    return {"angle": angle, "norm": norm, "time_scale": (1 - beta) / (eta * wd)}


def interval_mean(cumulative: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Per-step mean between consecutive rows of a cumulative sum.

    Args:
        cumulative: [R, n]; steps: [R].

    Returns:
        [R - 1, n]: (c[i+1] - c[i]) / (steps[i+1] - steps[i]), NaN where no step is between.
    """
    gap = np.diff(np.asarray(steps, dtype=np.float64))[:, None]  # [R - 1, 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(gap > 0, np.diff(cumulative, axis=0) / gap, np.nan)


def _needs_budget(info: FeaturesInfo) -> str:
    if not any(g.key in info.theory for g in info.groups_of(("scale",))):
        return (
            "features.h5 holds no budget of scale groups (train with this version, then "
            "extract.py --overwrite)"
        )
    return ""


@register_metric(
    "equilibrium",
    description="angular update and norm of scale groups vs the predicted equilibrium "
    "(SGD, momentum SGD, AdamW)",
    kinds=("scale",),
    check=_needs_budget,
)
def compute_equilibrium(ctx: Context) -> None:
    """Writes cache/equilibrium.h5 (layout in docs/METRICS.md)."""
    hp = ctx.info.hyperparameters
    optimizer = str(hp.get("optimizer", ""))
    wd, momentum = hp_float(hp, "wd"), hp_float(hp, "momentum")
    reason = prediction_reason(optimizer, wd)
    groups = [g for g in ctx.info.groups_of(("scale",)) if g.valid]
    groups = [g for g in groups if ctx.has_theory(g, FIELD_PREFIX + "angle_sum")]
    n = ctx.info.num_rows
    ctx.write_axes()
    steps, lr = ctx.axis("steps"), ctx.axis("lr")
    for g in groups:
        base = f"groups/{g.kind}/{g.name}"
        ctx.writer.group(base, **group_attrs(g))
        ones = {p: np.ones(ctx.info.shapes[p]) for p in g.params}
        elements = group_sum_np(ones, g)  # C per neuron [n] (scale: all signs +1)
        for rows in ctx.row_slices(ctx.row_bytes(g.params), desc=f"equilibrium {g.key}"):
            ext = slice(max(rows.start - 1, 0), rows.stop)  # one row before, for differences
            r = rows.stop - rows.start
            q = measure(g, ctx.read_params(g.params, rows), lead=1)  # [r, n]
            means = {}
            for field in ("angle_sum", "grad_sq_sum"):
                cum = np.asarray(ctx.read_theory(g, FIELD_PREFIX + field, ext), np.float64)
                mean = interval_mean(cum, steps[ext])  # [len(ext) - 1, n]
                if rows.start == 0:  # row 0 has no interval before it
                    mean = np.concatenate([np.full((1, g.size), np.nan), mean])
                means[field] = mean[-r:]
            prev_lr = lr[ext][:r] if rows.start > 0 else np.concatenate([[np.nan], lr[: r - 1]])
            values = {
                "angle": means["angle_sum"],
                "norm": np.sqrt(q),
                "grad_sq": means["grad_sq_sum"],
            }
            if reason:
                nan_r, nan_rn = np.full(r, np.nan), np.full((r, g.size), np.nan)
                pred = {"angle": nan_r, "norm": nan_rn, "time_scale": nan_r}
            else:
                pred = predicted(optimizer, prev_lr, wd, momentum, means["grad_sq_sum"], elements)
            for name, value in values.items():
                ctx.writer.append(f"{base}/{name}", value)
                ctx.writer.append(f"{base}/{name}_mean", value.mean(axis=-1))
            ctx.writer.append(f"{base}/predicted_angle", pred["angle"])
            ctx.writer.append(f"{base}/predicted_norm", pred["norm"])
            ctx.writer.append(f"{base}/predicted_norm_mean", pred["norm"].mean(axis=-1))
            ctx.writer.append(f"{base}/time_scale", pred["time_scale"])
    ctx.writer.attrs(
        layers=[g.key for g in groups],
        invalid=invalid_groups(ctx.info.groups_of(("scale",))),
        optimizer=optimizer,
        wd=wd,
        momentum=momentum,
        prediction=reason or "ok",
        rows=n,
    )
