"""The `weights_grads` metric: a step x element matrix of weights and of stored gradients for a
random subset of the network's elements (``--subset N``, default `DEFAULT_SUBSET`).

The N elements are drawn uniformly without replacement over all trainable parameter elements
(``numpy.random.default_rng(seed)``), so every layer is represented in proportion to its size.
`weights_grads_full` is the same matrix with every element.
"""

from __future__ import annotations

import h5py
import numpy as np

from Utils.metrics.base import Context, register_metric

DEFAULT_SUBSET = 1000


def element_columns(
    sizes: list[int], subset: int | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Which elements form the columns of the matrix.

    Args:
        sizes: number of elements of each parameter, in order.
        subset: number of columns (None or >= total: every element, in parameter order).
        rng: random generator.

    Returns:
        (parameter position [P] int64, flat index within that parameter [P] int64), sorted by
        parameter position then index.
    """
    offsets = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])
    total = int(offsets[-1])
    if subset is None or subset >= total:
        flat = np.arange(total, dtype=np.int64)
    else:
        flat = np.sort(rng.choice(total, size=int(subset), replace=False)).astype(np.int64)
    param = np.searchsorted(offsets, flat, side="right") - 1
    return param.astype(np.int64), flat - offsets[param]


def gather_columns(
    arrays: list[np.ndarray], param: np.ndarray, index: np.ndarray, dtype: np.dtype
) -> np.ndarray:
    """Builds the [R, P] matrix of the chosen elements.

    Args:
        arrays: one array [R, *shape] per parameter, in parameter order.
        param: parameter position of each column [P].
        index: flat index within the parameter of each column [P].
        dtype: output dtype.

    Returns:
        [R, P] array.
    """
    rows = arrays[0].shape[0] if arrays else 0
    out = np.empty((rows, param.size), dtype=dtype)
    for k, a in enumerate(arrays):
        cols = np.flatnonzero(param == k)
        if cols.size:
            out[:, cols] = np.asarray(a).reshape(rows, -1)[:, index[cols]]
    return out


def compute_matrix(ctx: Context, subset: int | None) -> None:
    """Writes ``/weights`` and ``/grads`` [N, P] with the column description.

    Args:
        ctx: the metric context.
        subset: number of columns, None for every element.
    """
    ctx.write_axes()
    names = ctx.info.weights
    sizes = [int(np.prod(ctx.info.shapes[p], dtype=np.int64)) for p in names]
    rng = np.random.default_rng(int(ctx.options.get("seed", 0)))
    param, index = element_columns(sizes, subset, rng)
    dtype = np.result_type(*[ctx.info.dtypes[p] for p in names]) if names else np.float32
    ctx.writer.write("names", np.array(names, dtype=object), dtype=h5py.string_dtype("utf-8"))
    ctx.writer.write("columns/param", param)
    ctx.writer.write("columns/index", index)
    ctx.writer.write("offsets", np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]))
    row_bytes = ctx.row_bytes(names, copies=2) + 2 * param.size * np.dtype(dtype).itemsize
    for rows in ctx.row_slices(row_bytes, desc=ctx.writer.metric):
        weights = ctx.read_params(names, rows)
        grads = ctx.read_buffer("grad", names, rows)
        ctx.writer.append(
            "weights", gather_columns([weights[p] for p in names], param, index, dtype)
        )
        ctx.writer.append("grads", gather_columns([grads[p] for p in names], param, index, dtype))
    ctx.writer.attrs(params=names, columns=int(param.size), subset=subset)


@register_metric(
    "weights_grads",
    description=f"step x element matrices of weights and grads, random --subset N (default {DEFAULT_SUBSET})",
    buffers=("grad",),
    options=("subset", "seed"),
)
def compute_weights_grads(ctx: Context) -> None:
    """Writes cache/weights_grads.h5 (layout in docs/METRICS.md)."""
    subset = ctx.options.get("subset")
    compute_matrix(ctx, DEFAULT_SUBSET if subset is None else int(subset))
