"""The `translation` metric: S = sum(theta_A) per input feature of the last linear layer.

Measured per neuron (the columns, plus the bias vector as one more group) and per layer, with
the exact and the paper's theory and their relative errors.

The arithmetic is `Utils.metrics.conservation.conserved_quantity` and `relative_error`.
The alias `translation-momentum` (the original code's name for momentum runs) maps here: the theory
stored by custom_sgd already covers plain SGD, heavy-ball and Nesterov momentum.
"""

from __future__ import annotations

from Utils.metrics.base import Context, register_metric
from Utils.metrics.conservation import compute_conservation


@register_metric(
    "translation",
    description="S = sum(theta_A) per input feature of the last linear layer (plus the bias group): measured, exact and paper theory, relative errors",
    kinds=("translation",),
    aliases=("translation-momentum",),
    online=True,
)
def compute_translation(ctx: Context) -> None:
    """Writes cache/translation.h5 (layout in docs/METRICS.md)."""
    compute_conservation(ctx, "translation")
