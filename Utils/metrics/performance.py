"""The `performance` metric: losses and accuracies at the rows where they were evaluated.

train.py evaluates once per epoch (or every ``--eval-freq`` steps, mid-epoch included) and
always saves a checkpoint at an evaluated step, so features.h5 holds every evaluation; the
other rows are NaN and are left out here.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from Utils.metrics.base import Context, register_metric


def evaluated_rows(metrics: Mapping[str, np.ndarray]) -> np.ndarray:
    """Indices of the rows where at least one metric is finite.

    Args:
        metrics: metric name -> values [N] (NaN where not evaluated).

    Returns:
        Sorted int64 row indices.
    """
    arrays = [np.isfinite(np.asarray(v, dtype=np.float64)) for v in metrics.values()]
    if not arrays:
        return np.zeros(0, dtype=np.int64)
    return np.flatnonzero(np.logical_or.reduce(arrays)).astype(np.int64)


@register_metric(
    "performance",
    description="train/test losses and accuracies over steps (evaluated rows only)",
    needs_metrics=True,
    online=True,
)
def compute_performance(ctx: Context) -> None:
    """Writes cache/performance.h5 (layout in docs/METRICS.md)."""
    from Utils import storage

    n = ctx.info.num_rows
    values = {
        m: np.asarray(storage.read_metric(ctx.features, m), dtype=np.float64)[:n]
        for m in ctx.info.metrics
    }
    rows = evaluated_rows(values)
    ctx.writer.write("rows", rows)
    for name in ("steps", "epoch", "lr"):
        ctx.writer.write(name, ctx.axis(name)[rows])
    for m, v in values.items():
        ctx.writer.write(f"metrics/{m}", v[rows])
    ctx.writer.attrs(metrics=list(values))
