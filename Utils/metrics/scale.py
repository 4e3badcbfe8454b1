"""The `scale` metric: Q = |theta_A|^2 per channel feeding BatchNorm.

Measured per neuron and per layer, with the exact and the paper's theory and their relative
errors.

The arithmetic is `Utils.metrics.conservation.conserved_quantity` and `relative_error`.
The alias `scale-momentum` (the original code's name for momentum runs) maps here: the theory
stored by custom_sgd already covers plain SGD, heavy-ball and Nesterov momentum.
"""

from __future__ import annotations

from Utils.metrics.base import Context, register_metric
from Utils.metrics.conservation import compute_conservation


@register_metric(
    "scale",
    description="Q = |theta_A|^2 per channel feeding BatchNorm: measured, exact and paper theory, relative errors",
    kinds=("scale",),
    aliases=("scale-momentum",),
    online=True,
)
def compute_scale(ctx: Context) -> None:
    """Writes cache/scale.h5 (layout in docs/METRICS.md)."""
    compute_conservation(ctx, "scale")
