"""The `rescale` metric: R = |theta_A1|^2 - |theta_A2|^2 per hidden unit.

Measured per neuron and per layer, with the exact and the paper's theory and their relative
errors.

The arithmetic is `Utils.metrics.conservation.conserved_quantity` and `relative_error`.
The alias `rescale-momentum` (the original code's name for momentum runs) maps here: the theory
stored by custom_sgd already covers plain SGD, heavy-ball and Nesterov momentum.
"""

from __future__ import annotations

from Utils.metrics.base import Context, register_metric
from Utils.metrics.conservation import compute_conservation


@register_metric(
    "rescale",
    description="R = |theta_A1|^2 - |theta_A2|^2 per hidden unit: measured, exact and paper theory, relative errors",
    kinds=("rescale",),
    aliases=("rescale-momentum",),
    online=True,
)
def compute_rescale(ctx: Context) -> None:
    """Writes cache/rescale.h5 (layout in docs/METRICS.md)."""
    compute_conservation(ctx, "rescale")
