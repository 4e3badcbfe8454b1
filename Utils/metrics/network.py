"""The `network` metric: weight trajectories, all elements or a random subset per parameter.

With ``--subset N`` every trainable parameter contributes min(N, its size) elements drawn
without replacement by `choose_elements` from ``numpy.random.default_rng(seed)`` (parameters
taken in features.h5 order); without it, every element is stored.
"""

from __future__ import annotations

import numpy as np

from Utils.metrics.base import Context, register_metric


def choose_elements(size: int, subset: int | None, rng: np.random.Generator) -> np.ndarray:
    """Sorted flat indices of the elements kept from a parameter of `size` elements.

    Args:
        size: number of elements.
        subset: how many to keep (None or >= size: all).
        rng: the random generator (advanced only when a subset is drawn).

    Returns:
        int64 array of flat indices in ascending order.
    """
    if subset is None or subset >= size:
        return np.arange(size, dtype=np.int64)
    return np.sort(rng.choice(size, size=int(subset), replace=False)).astype(np.int64)


def select_elements(values: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Values of the chosen flat elements of each row.

    Args:
        values: [R, *shape].
        index: flat indices [m].

    Returns:
        [R, m] in the input dtype.
    """
    values = np.asarray(values)
    return values.reshape(values.shape[0], -1)[:, index]


@register_metric(
    "network",
    description="weights over time, per parameter (all elements or --subset N with --seed K)",
    options=("subset", "seed"),
)
def compute_network(ctx: Context) -> None:
    """Writes cache/network.h5 (layout in docs/METRICS.md)."""
    ctx.write_axes()
    subset = ctx.options.get("subset")
    rng = np.random.default_rng(int(ctx.options.get("seed", 0)))
    for p in ctx.info.weights:
        shape = ctx.info.shapes[p]
        index = choose_elements(int(np.prod(shape, dtype=np.int64)), subset, rng)
        ctx.writer.write(f"params/{p}/index", index, shape=list(shape))
        for rows in ctx.row_slices(ctx.row_bytes([p]), desc=f"network {p}"):
            values = ctx.read_params([p], rows)[p]
            ctx.writer.append(f"params/{p}/values", select_elements(values, index))
    ctx.writer.attrs(params=ctx.info.weights, subset=subset, seed=int(ctx.options.get("seed", 0)))
