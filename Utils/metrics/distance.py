"""The `distance` metric: distance from initialisation ||theta_k - theta_0|| per parameter,
per layer and over the whole network (trainable parameters; theta_0 is the first row)."""

from __future__ import annotations

import numpy as np

from Utils.metrics.base import Context, register_metric
from Utils.metrics.norms import write_per_layer


def squared_distance(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Squared Euclidean distance of each row from a reference.

    Args:
        values: [R, *shape].
        reference: [*shape].

    Returns:
        [R] float64: sum over elements of (values - reference)^2.
    """
    diff = np.asarray(values, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    return np.square(diff).reshape(diff.shape[0], -1).sum(axis=1)


@register_metric(
    "distance",
    description="distance from initialisation ||theta_k - theta_0|| per parameter and layer",
)
def compute_distance(ctx: Context) -> None:
    """Writes cache/distance.h5 (layout in docs/METRICS.md)."""
    reference = ctx.read_params(ctx.info.weights, slice(0, 1))

    def per_param(name: str, rows: slice) -> np.ndarray:
        return squared_distance(ctx.read_params([name], rows)[name], reference[name][0])

    write_per_layer(ctx, per_param, "distance")
    ctx.writer.attrs(reference_row=0, reference_step=int(ctx.axis("steps")[0]))
