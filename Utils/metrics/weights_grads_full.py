"""The `weights_grads_full` metric: the `weights_grads` matrices with every parameter element
(columns in parameter order; ``/offsets`` gives each parameter's column range)."""

from __future__ import annotations

from Utils.metrics.base import Context, register_metric
from Utils.metrics.weights_grads import compute_matrix


@register_metric(
    "weights_grads_full",
    description="step x element matrices of weights and grads, every element",
    buffers=("grad",),
)
def compute_weights_grads_full(ctx: Context) -> None:
    """Writes cache/weights_grads_full.h5 (layout in docs/METRICS.md)."""
    compute_matrix(ctx, None)
