"""The `norms` metric: weight norms ||theta_k|| per parameter, per layer and over the network
(trainable parameters only)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from Utils.metrics.base import Context, layer_of, register_metric


def squared_norm(values: np.ndarray) -> np.ndarray:
    """Squared Euclidean norm of each row.

    Args:
        values: [R, *shape].

    Returns:
        [R] float64.
    """
    v = np.asarray(values, dtype=np.float64)
    return np.square(v).reshape(v.shape[0], -1).sum(axis=1)


def write_per_layer(ctx: Context, per_param: Callable[[str, slice], np.ndarray], desc: str) -> None:
    """Writes ``/params/<name>``, ``/layers/<layer>`` and ``/total`` [N] from squared values.

    Args:
        ctx: the metric context.
        per_param: (parameter name, rows) -> squared quantity [r] of that parameter.
        desc: progress-bar label.
    """
    ctx.write_axes()
    names = ctx.info.weights
    layers: dict[str, list[str]] = {}
    for p in names:
        layers.setdefault(layer_of(p), []).append(p)
    squared = {p: np.zeros(ctx.info.num_rows, dtype=np.float64) for p in names}
    for p in names:
        for rows in ctx.row_slices(ctx.row_bytes([p], 2), desc=f"{desc} {p}"):
            squared[p][rows] = per_param(p, rows)
        ctx.writer.write(f"params/{p}", np.sqrt(squared[p]), layer=layer_of(p))
    for layer, members in layers.items():
        ctx.writer.write(
            f"layers/{layer}", np.sqrt(sum(squared[p] for p in members)), params=members
        )
    total = sum(squared.values()) if names else np.zeros(ctx.info.num_rows)
    ctx.writer.write("total", np.sqrt(total))
    ctx.writer.attrs(params=names, layers=list(layers))


@register_metric("norms", description="weight norms ||theta_k|| per parameter and layer")
def compute_norms(ctx: Context) -> None:
    """Writes cache/norms.h5 (layout in docs/METRICS.md)."""
    write_per_layer(ctx, lambda p, rows: squared_norm(ctx.read_params([p], rows)[p]), "norms")
