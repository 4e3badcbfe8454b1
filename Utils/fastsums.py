"""Fused per-slice float64 sums of squares and products on CPU (numba), one pass per tensor.

The tracking optimizer and the budget tracker need, at every step, per-slice sums (a slice is
the part of a parameter that belongs to one neuron: a row, a column, a channel...) of squares
and products of float32 or float64 tensors, accumulated in float64. In eager torch each such
sum is a cast, a multiplication and a reduction, three passes through memory; the kernels here
read each input once, square or multiply in float64 (exact for float32 inputs) and accumulate
every wanted slice at once.

Every sum is computed in a fixed order that depends on the tensor's shape only (single-threaded,
no dependence on what else is reduced in the same call): results are reproducible bitwise.

`AVAILABLE` is False when numba is not installed or ``NM_FAST_SUMS=0`` is set; callers then use
their torch path (also for tensors that are not on the CPU or not float32/float64: `usable`).
The first call of each kernel signature compiles it (about a second, cached on disk by numba).
"""

from __future__ import annotations

import math
import operator
import os
import warnings
from collections.abc import Sequence

import numpy as np

try:  # optional: without numba the callers keep their torch path
    if os.environ.get("NM_FAST_SUMS", "1") == "0":
        raise ImportError("disabled by NM_FAST_SUMS=0")
    import numba
    from numba import njit, types
    from numba.extending import intrinsic

    @intrinsic
    def _pointer(typingctx, address, like):
        """A pointer to elements of the type of array `like` at an integer address."""
        signature = types.CPointer(like.dtype)(address, like)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return signature, codegen

    AVAILABLE = True
except Exception:  # pragma: no cover - numba missing, disabled or unusable here
    AVAILABLE = False

    def njit(*_args, **_kwargs):
        """Stand-in decorator: the kernels stay plain Python (never called)."""
        return lambda fn: fn


_FLAGS = {"cache": True, "nogil": True, "fastmath": {"reassoc", "contract"}}

# quantities of `product_sums` per slice, in order
QUADRATIC = ("theta_theta", "delta_delta", "theta_grad", "theta_delta", "grad_grad")
LINEAR = ("theta", "grad", "delta")


@njit(**_FLAGS)
def _square_into(x, work, row_at, mid_at):  # pragma: no cover - compiled by numba
    """x [B, K, A] -> work[row_at : row_at + B] (sums over K, A) and work[mid_at : mid_at + K]
    (sums over B, A) of x^2 in float64; an offset < 0 is not computed."""
    nb, nk, na = x.shape
    if mid_at >= 0:
        for k in range(nk):
            work[mid_at + k] = 0.0
    for b in range(nb):
        rb = 0.0
        if na == 1:
            if mid_at >= 0:
                for k in range(nk):
                    v = np.float64(x[b, k, 0])
                    q = v * v
                    work[mid_at + k] += q
                    rb += q
            else:
                for k in range(nk):
                    v = np.float64(x[b, k, 0])
                    rb += v * v
        else:
            for k in range(nk):
                s = 0.0
                for a in range(na):
                    v = np.float64(x[b, k, a])
                    s += v * v
                rb += s
                if mid_at >= 0:
                    work[mid_at + k] += s
        if row_at >= 0:
            work[row_at + b] = rb


@njit(**_FLAGS)
def _squares(xs, work, row_at, mid_at):  # pragma: no cover - compiled by numba
    """`_square_into` for every array of the tuple xs (same dtype and rank)."""
    for i in range(len(xs)):
        _square_into(xs[i], work, row_at[i], mid_at[i])


@njit(**_FLAGS)
def _quadratic_into(t0, t1, g, work, row_at, mid_at):  # pragma: no cover - compiled by numba
    """theta_k = t0, theta_{k+1} = t1, g_k = g, all [B, K, A] -> the sums of theta theta,
    Delta Delta, theta g, theta Delta and g g (Delta = t1 - t0 in float64) per row (over K, A)
    into work[:, row_at : row_at + B] and per middle index (over B, A) into
    work[:, mid_at : mid_at + K]; work is [5, W]; an offset < 0 is not computed."""
    nb, nk, na = t0.shape
    if mid_at >= 0:
        for q in range(5):
            for k in range(nk):
                work[q, mid_at + k] = 0.0
    for b in range(nb):
        r0 = 0.0
        r1 = 0.0
        r2 = 0.0
        r3 = 0.0
        r4 = 0.0
        if na == 1 and mid_at >= 0:  # columns: vectorised along k
            m0 = work[0, mid_at : mid_at + nk]
            m1 = work[1, mid_at : mid_at + nk]
            m2 = work[2, mid_at : mid_at + nk]
            m3 = work[3, mid_at : mid_at + nk]
            m4 = work[4, mid_at : mid_at + nk]
            for k in range(nk):
                th = np.float64(t0[b, k, 0])
                gr = np.float64(g[b, k, 0])
                de = np.float64(t1[b, k, 0]) - th
                q0 = th * th
                q1 = de * de
                q2 = th * gr
                q3 = th * de
                q4 = gr * gr
                m0[k] += q0
                m1[k] += q1
                m2[k] += q2
                m3[k] += q3
                m4[k] += q4
                r0 += q0
                r1 += q1
                r2 += q2
                r3 += q3
                r4 += q4
        else:
            for k in range(nk):
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                s3 = 0.0
                s4 = 0.0
                for a in range(na):
                    th = np.float64(t0[b, k, a])
                    gr = np.float64(g[b, k, a])
                    de = np.float64(t1[b, k, a]) - th
                    s0 += th * th
                    s1 += de * de
                    s2 += th * gr
                    s3 += th * de
                    s4 += gr * gr
                r0 += s0
                r1 += s1
                r2 += s2
                r3 += s3
                r4 += s4
                if mid_at >= 0:
                    work[0, mid_at + k] += s0
                    work[1, mid_at + k] += s1
                    work[2, mid_at + k] += s2
                    work[3, mid_at + k] += s3
                    work[4, mid_at + k] += s4
        if row_at >= 0:
            work[0, row_at + b] = r0
            work[1, row_at + b] = r1
            work[2, row_at + b] = r2
            work[3, row_at + b] = r3
            work[4, row_at + b] = r4


@njit(**_FLAGS)
def _linear_into(t0, t1, g, work, row_at, mid_at):  # pragma: no cover - compiled by numba
    """As `_quadratic_into` for the sums of theta, g and Delta: work is [3, W]."""
    nb, nk, na = t0.shape
    if mid_at >= 0:
        for q in range(3):
            for k in range(nk):
                work[q, mid_at + k] = 0.0
    for b in range(nb):
        r0 = 0.0
        r1 = 0.0
        r2 = 0.0
        if na == 1 and mid_at >= 0:  # columns: vectorised along k
            m0 = work[0, mid_at : mid_at + nk]
            m1 = work[1, mid_at : mid_at + nk]
            m2 = work[2, mid_at : mid_at + nk]
            for k in range(nk):
                th = np.float64(t0[b, k, 0])
                gr = np.float64(g[b, k, 0])
                de = np.float64(t1[b, k, 0]) - th
                m0[k] += th
                m1[k] += gr
                m2[k] += de
                r0 += th
                r1 += gr
                r2 += de
        else:
            for k in range(nk):
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                for a in range(na):
                    th = np.float64(t0[b, k, a])
                    s0 += th
                    s1 += np.float64(g[b, k, a])
                    s2 += np.float64(t1[b, k, a]) - th
                r0 += s0
                r1 += s1
                r2 += s2
                if mid_at >= 0:
                    work[0, mid_at + k] += s0
                    work[1, mid_at + k] += s1
                    work[2, mid_at + k] += s2
        if row_at >= 0:
            work[0, row_at + b] = r0
            work[1, row_at + b] = r1
            work[2, row_at + b] = r2


@njit(**_FLAGS)
def _quadratics(t0s, t1s, gs, work, row_at, mid_at):  # pragma: no cover - compiled by numba
    """`_quadratic_into` for every pair of the tuples t0s, t1s and the gradient at address
    gs[i] (contiguous, shaped and typed as t0s[i])."""
    for i in range(len(t0s)):
        t0 = t0s[i]
        g = numba.carray(_pointer(gs[i], t0), t0.shape)
        _quadratic_into(t0, t1s[i], g, work, row_at[i], mid_at[i])


@njit(**_FLAGS)
def _linears(t0s, t1s, gs, work, row_at, mid_at):  # pragma: no cover - compiled by numba
    """`_linear_into` for every pair of the tuples and gradient address (as `_quadratics`)."""
    for i in range(len(t0s)):
        t0 = t0s[i]
        g = numba.carray(_pointer(gs[i], t0), t0.shape)
        _linear_into(t0, t1s[i], g, work, row_at[i], mid_at[i])


_WORKING: bool | None = None  # the kernels compiled and ran (checked once per process)


def _working() -> bool:
    """Compiles and runs every kernel once on tiny inputs (numba's cache makes this fast after
    the first process); a failure (e.g. no usable compiler cache) switches to torch, said once."""
    global _WORKING
    if _WORKING is None:
        try:
            for dtype in (np.float32, np.float64):
                x = np.ones((2, 3, 1), dtype=dtype)
                offsets = np.array([0], dtype=np.int64), np.array([2], dtype=np.int64)
                work = np.zeros((5, 5))
                _squares((x,), work[0], *offsets)
                address = np.array([x.ctypes.data], dtype=np.int64)
                _quadratics((x,), (x,), address, work, *offsets)
                _linears((x,), (x,), address, work[:3], *offsets)
            index = np.zeros(1, dtype=np.int64)
            _scatter(work, index, np.array([0, 1], dtype=np.int64), np.ones(1), np.zeros((5, 1)))
            rates = np.zeros((1, 1))
            acc = np.zeros((6, 1))
            accumulate_budget(np.zeros((1, 5, 1)), rates, rates, index, np.ones(1), acc, acc[0])
            _WORKING = True
        except Exception as exc:  # pragma: no cover - depends on the environment
            warnings.warn(f"fused sums unavailable ({exc}); using torch reductions", stacklevel=3)
            _WORKING = False
    return _WORKING


def usable(tensors: Sequence) -> bool:
    """Whether the kernels can read these torch tensors (CPU, float32/float64, numba present)."""
    if not AVAILABLE or not _working():
        return False
    import torch  # lazily: this module is imported without torch by nothing else

    return all(
        t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64) for t in tensors
    )


@njit(**_FLAGS)
def _scatter(work, gather, starts, sign, out):  # pragma: no cover - compiled by numba
    """out[p, t] = sum of sign[i] * work[p, gather[i]] over i in starts[t]..starts[t + 1] (in
    that order) for every plane p and entry t."""
    for p in range(out.shape[0]):
        for t in range(out.shape[1]):
            total = 0.0
            for i in range(starts[t], starts[t + 1]):
                total += sign[i] * work[p, gather[i]]
            out[p, t] = total


@njit(cache=True, nogil=True)  # no fastmath: the IEEE order of every operation
def accumulate_budget(sums, lr, lwd, col, mask, acc, last):  # pragma: no cover - numba
    """Adds the budget terms of P steps to the cumulative sums, step after step.

    Args:
        sums: float64 [P, planes, T] per-step group sums: planes 5 (Q, |Delta|^2, <theta, g>,
            <theta, Delta>, |g|^2: scale/rescale) or 3 (S, <1, g>, <1, Delta>: translation).
        lr, lwd: float64 [P, C]: eta_k and eta_k lam per param-group column.
        col: int64 [T]: the column of each entry.
        mask: float64 [T]: 1 for the entries of scale groups (|g|^2 is summed there).
        acc: float64 [fields, T]: decay, leak, kinetic, discretisation (and, for planes 5,
            angle_sum, grad_sq_sum), updated in place.
        last: float64 [T]: set to the last step's angle (planes 5).
    """
    steps, planes, total = sums.shape
    factor = 2.0 if planes == 5 else 1.0
    for k in range(steps):
        for t in range(total):
            c = col[t]
            base = sums[k, 0, t]
            if planes == 5:
                dd = sums[k, 1, t]
                tg = sums[k, 2, t]
                td = sums[k, 3, t]
            else:
                dd = 0.0
                tg = sums[k, 1, t]
                td = sums[k, 2, t]
            decay = base * lwd[k, c] * -factor
            leak = tg * lr[k, c] * -factor
            acc[0, t] += decay
            acc[1, t] += leak
            acc[2, t] += td * factor - decay - leak
            acc[3, t] += dd
            if planes == 5:
                cross = math.sqrt(max(base * dd - td * td, 0.0))
                a = math.atan2(cross, base + td)
                acc[4, t] += a
                acc[5, t] += sums[k, 4, t] * mask[t]
                if k == steps - 1:
                    last[t] = a


def _array(t, view: tuple[int, ...]) -> np.ndarray:
    """A C-contiguous numpy view of a tensor with shape `view` (a copy only when the tensor is
    not contiguous)."""
    a = t.detach().numpy()
    return (a if a.flags.c_contiguous else np.ascontiguousarray(a)).reshape(view)


class _Arrays:
    """The numpy arrays a plan's kernel calls read from a list of tensors, kept while the same
    tensor objects with the same storage come back (parameters and optimizer buffers are
    converted once: a conversion costs microseconds, a large share of a small model's step).

    Args:
        positions: per kernel call, the index of its tensor in the list.
        views: per kernel call, the (B, K, A) shape it reads.
    """

    def __init__(self, positions: Sequence[int], views: Sequence[tuple[int, int, int]]) -> None:
        self.positions = list(positions)
        self.views = list(views)
        self.tensors: tuple = ()
        self.pointers: list[int] = []
        self.runs: list[tuple[tuple[np.ndarray, ...], slice]] = []

    def __call__(
        self, tensors: Sequence, same: bool = False
    ) -> list[tuple[tuple[np.ndarray, ...], slice]]:
        """Runs of calls whose arrays share a dtype: (their arrays, their slice of the calls).

        With `same` the caller vouches that the tensors are those of the previous call, with
        the same storage (checked once for several plans)."""
        if same and self.runs and self.tensors is not None:
            return self.runs
        if (
            len(tensors) == len(self.tensors)
            and all(map(operator.is_, tensors, self.tensors))
            and [t.data_ptr() for t in tensors] == self.pointers
        ):
            return self.runs
        arrays = [_array(tensors[i], v) for i, v in zip(self.positions, self.views)]
        runs: list[tuple[tuple[np.ndarray, ...], slice]] = []
        first = 0
        for i in range(1, len(arrays) + 1):
            if i == len(arrays) or arrays[i].dtype != arrays[first].dtype:
                runs.append((tuple(arrays[first:i]), slice(first, i)))
                first = i
        if all(t.is_contiguous() for t in tensors):
            self.tensors = tuple(tensors)
            self.pointers = [t.data_ptr() for t in tensors]
            self.runs = runs
        return runs


class SlicePlan:
    """Signed per-group sums of squares or products, by fused kernels and one scatter.

    Each member is ``(name, shape, dim, entries, sign)``: a parameter, its shape, the kept
    axis (None: the whole tensor is one slice), the group entry of each of its slices and its
    sign. The kernels write row sums (over all axes but the first) and middle sums (over all
    axes but the kept one) of a parameter into a float64 work vector [planes, W] (a parameter
    is read once per distinct kept axis other than 0, once when it has none, and every member
    of it is served from that pass); one scatter adds the signed work entries into the groups'
    entries (a row sum enters the entry of its row's slice; a whole-tensor member's rows all
    enter its one entry).

    Args:
        members: ``(name, shape, dim, entries, sign)`` per member.
        planes: quantities per slice (1 for `squares`, 5 for `products` of QUADRATIC, 3 for
            LINEAR).
        names: the order of the tensors given to `squares` / `products`.
        total: the number of group entries.
    """

    def __init__(
        self,
        members: Sequence[tuple[str, tuple[int, ...], int | None, Sequence[int], float]],
        planes: int,
        names: Sequence[str],
        total: int,
    ) -> None:
        self.planes = planes
        position = {n: i for i, n in enumerate(names)}
        by_name: dict[str, list[int]] = {}
        for i, member in enumerate(members):
            by_name.setdefault(member[0], []).append(i)
        calls: list[tuple[int, tuple[int, int, int], int, int]] = []
        gather: list[np.ndarray] = []
        index: list[np.ndarray] = []
        sign: list[np.ndarray] = []

        def add(work: np.ndarray, member: tuple, slice_of: np.ndarray) -> None:
            gather.append(work)
            index.append(np.asarray(member[3], dtype=np.int64)[slice_of])
            sign.append(np.full(len(work), float(member[4])))

        width = 0
        for name, indices in by_name.items():
            shape = tuple(members[indices[0]][1]) or (1,)
            dims = {members[i][2] for i in indices}
            mids = sorted(d for d in dims if d not in (None, 0))
            row_members = [members[i] for i in indices if members[i][2] in (None, 0)]
            for n, j in enumerate(mids or [None]):
                if j is None:  # rows only
                    view = (shape[0], 1, math.prod(shape[1:]))
                else:
                    view = (math.prod(shape[:j]), shape[j], math.prod(shape[j + 1 :]))
                row_at = mid_at = -1
                if n == 0 and row_members:
                    row_at, width = width, width + view[0]
                    rows = np.arange(row_at, row_at + view[0], dtype=np.int64)
                    fold = view[0] // shape[0]  # view rows per row of axis 0
                    for m in row_members:
                        local = np.arange(view[0], dtype=np.int64) // fold
                        add(rows, m, np.zeros_like(local) if m[2] is None else local)
                if j is not None:
                    mid_at, width = width, width + view[1]
                    for i in indices:
                        if members[i][2] == j:
                            work = np.arange(mid_at, mid_at + view[1], dtype=np.int64)
                            add(work, members[i], np.arange(view[1], dtype=np.int64))
                calls.append((position[name], view, row_at, mid_at))

        def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        entry = cat(index, np.int64)
        order = np.argsort(entry, kind="stable")  # by group entry, each in member order
        self.gather = cat(gather, np.int64)[order]
        self.sign = cat(sign, np.float64)[order]
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(entry, minlength=total))])
        self.work = np.zeros((planes, max(width, 1)))
        self.out = np.zeros((planes, total))
        self.row_at = np.array([c[2] for c in calls], dtype=np.int64)
        self.mid_at = np.array([c[3] for c in calls], dtype=np.int64)
        views = [c[1] for c in calls]
        positions = [c[0] for c in calls]
        self._positions = positions
        self._arrays = [_Arrays(positions, views) for _ in range(2 if planes > 1 else 1)]

    def squares(self, tensors: Sequence, out: np.ndarray | None = None) -> np.ndarray:
        """Signed group sums of x^2 of the tensors (in `names` order) into `out`, float64
        [1, total] (default: a buffer that the next call reuses)."""
        work = self.work[0]
        for arrays, calls in self._arrays[0](tensors):
            _squares(arrays, work, self.row_at[calls], self.mid_at[calls])
        out = self.out if out is None else out
        _scatter(self.work, self.gather, self.starts, self.sign, out)
        return out

    def products(
        self,
        before: Sequence,
        after: Sequence,
        grads: Sequence,
        out: np.ndarray | None = None,
        same: bool = False,
    ) -> np.ndarray:
        """Signed group sums of the `QUADRATIC` (planes 5) or `LINEAR` (planes 3) quantities
        of theta_k (`before`), theta_{k+1} (`after`) and g_k (`grads`: contiguous, each of its
        parameter's dtype; read in place through its address), each a list in `names` order,
        into `out`, float64 [planes, total] (default: a buffer the next call reuses).
        `same`: the caller vouches that `before` and `after` hold the tensors of the previous
        call, with the same storage (their arrays are then not checked again)."""
        kernel = _quadratics if self.planes == 5 else _linears
        runs = [cache(ts, same) for cache, ts in zip(self._arrays, (before, after))]
        addresses = np.array([grads[i].data_ptr() for i in self._positions], dtype=np.int64)
        for (t0, calls), (t1, _) in zip(*runs):
            kernel(t0, t1, addresses[calls], self.work, self.row_at[calls], self.mid_at[calls])
        out = self.out if out is None else out
        _scatter(self.work, self.gather, self.starts, self.sign, out)
        return out
