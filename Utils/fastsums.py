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

import ctypes
import math
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
def _squares(xs, shapes, like, work, row_at, mid_at):  # pragma: no cover - compiled by numba
    """`_square_into` for the contiguous arrays at addresses xs (int64 [n]), shaped shapes[i]
    (int64 [n, 3]), of the dtype of `like`."""
    for i in range(xs.shape[0]):
        shape = (shapes[i, 0], shapes[i, 1], shapes[i, 2])
        _square_into(numba.carray(_pointer(xs[i], like), shape), work, row_at[i], mid_at[i])


@njit(**_FLAGS)
def _quadratic_into(t0, t1, g, work, row_at, mid_at, gg):  # pragma: no cover - numba
    """theta_k = t0, theta_{k+1} = t1, g_k = g, all [B, K, A] -> the sums of theta theta,
    Delta Delta, theta g, theta Delta and (if `gg`, else 0) g g (Delta = t1 - t0 in float64)
    per row (over K, A) into work[:, row_at : row_at + B] and per middle index (over B, A)
    into work[:, mid_at : mid_at + K]; work is [5, W]; an offset < 0 is not computed. (The
    compiler splits each loop on `gg`: four sums run about 1.6x faster than five.)"""
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
                m0[k] += q0
                m1[k] += q1
                m2[k] += q2
                m3[k] += q3
                r0 += q0
                r1 += q1
                r2 += q2
                r3 += q3
                if gg:
                    q4 = gr * gr
                    m4[k] += q4
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
                    if gg:
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
def _products(t0s, t1s, gs, shapes, like, work, row_at, mid_at, gg):  # pragma: no cover
    """`_quadratic_into` (work [5, W]; g g where gg[i]) or `_linear_into` (work [3, W]) for the
    contiguous arrays at addresses t0s, t1s, gs (int64 [n] each), shaped shapes[i] (int64
    [n, 3]), of the dtype of `like`."""
    for i in range(t0s.shape[0]):
        shape = (shapes[i, 0], shapes[i, 1], shapes[i, 2])
        t0 = numba.carray(_pointer(t0s[i], like), shape)
        t1 = numba.carray(_pointer(t1s[i], like), shape)
        g = numba.carray(_pointer(gs[i], like), shape)
        if work.shape[0] == 5:
            _quadratic_into(t0, t1, g, work, row_at[i], mid_at[i], gg[i])
        else:
            _linear_into(t0, t1, g, work, row_at[i], mid_at[i])


@njit(**_FLAGS)
def _products_scattered(
    t0s, t1s, gs, shapes, like, work, row_at, mid_at, gg, gather, starts, sign, out
):  # pragma: no cover - compiled by numba
    """`_products`, then `_scatter` of its work into out (one call from Python)."""
    _products(t0s, t1s, gs, shapes, like, work, row_at, mid_at, gg)
    _scatter(work, gather, starts, sign, out)


_WORKING: bool | None = None  # the kernels compiled and ran (checked once per process)


def _working() -> bool:
    """Compiles and runs every kernel once on tiny inputs (numba's cache makes this fast after
    the first process); a failure (e.g. no usable compiler cache) switches to torch, said once."""
    global _WORKING
    if _WORKING is None:
        try:
            for dtype in (np.float32, np.float64):
                x = np.ones((2, 3, 1), dtype=dtype)
                like = x[:0, 0, 0]
                offsets = np.array([0], dtype=np.int64), np.array([2], dtype=np.int64)
                work = np.zeros((5, 5))
                address = np.array([x.ctypes.data], dtype=np.int64)
                shape = np.array([[2, 3, 1]], dtype=np.int64)
                _squares(address, shape, like, work[0], *offsets)
                for gg in (np.ones(1, dtype=np.bool_), np.zeros(1, dtype=np.bool_)):
                    _products(address, address, address, shape, like, work, *offsets, gg)
                _products(address, address, address, shape, like, work[:3], *offsets, gg)
                args = (np.zeros(1, dtype=np.int64), np.array([0, 1], dtype=np.int64), np.ones(1))
                _products_scattered(
                    address,
                    address,
                    address,
                    shape,
                    like,
                    work,
                    *offsets,
                    gg,
                    *args,
                    np.zeros((5, 1)),
                )
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


def addresses(tensors: Sequence, keep: list) -> np.ndarray:
    """int64 [n]: the data addresses of the tensors; a non-contiguous one is read from a
    contiguous copy, appended to `keep` (which must live until the addresses are used)."""
    out = []
    for t in tensors:
        if not t.is_contiguous():
            t = t.contiguous()
            keep.append(t)
        out.append(t.data_ptr())
    return np.array(out, dtype=np.int64)


class FlatCopy:
    """Copies a list of tensors (all of one dtype, on the CPU) into one flat tensor, side by
    side: one ``memmove`` per tensor (torch's per-tensor copies cost microseconds each on
    CPU; a compiled element loop runs at a fraction of memmove's speed).

    Args:
        tensors: the sources.
        out: the destination, 1-d, contiguous, with their total number of elements.
    """

    def __init__(self, tensors: Sequence, out) -> None:
        self.tensors = list(tensors)
        self.out = out.detach()
        item = self.out.element_size()
        self.nbytes = [t.numel() * item for t in self.tensors]
        base = self.out.data_ptr()
        self.targets = [base + int(o) for o in np.cumsum([0, *self.nbytes[:-1]])]
        self._kept: list[tuple[int, int, int]] | None = None  # the last call's moves

    def __call__(self, same: bool = False) -> None:
        """Copies; `same`: the caller vouches that the tensors kept their storage since the
        last call (their addresses are then reused)."""
        if same and self._kept is not None:
            moves = self._kept
        else:
            keep: list = []
            sources = addresses(self.tensors, keep)
            moves = list(zip(self.targets, sources.tolist(), self.nbytes))
            self._kept = None if keep else moves
        for target, source, size in moves:  # keep: alive until the copies are done
            ctypes.memmove(target, source, size)


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
        planes: quantities per slice: 1 (`squares`), 5 (`products` of scale/rescale groups:
            theta theta, Delta Delta, theta g, theta Delta, g g) or 3 (`products` of translation
            groups: theta, g, Delta).
        names: the order of the tensors given to `squares` / `products`.
        total: the number of group entries.
        gg: per member, whether its g g sums are wanted (planes 5; default: all); a pass that
            serves no such member leaves them 0 and runs faster.
    """

    def __init__(
        self,
        members: Sequence[tuple[str, tuple[int, ...], int | None, Sequence[int], float]],
        planes: int,
        names: Sequence[str],
        total: int,
        gg: Sequence[bool] | None = None,
    ) -> None:
        self.planes = planes
        position = {n: i for i, n in enumerate(names)}
        by_name: dict[str, list[int]] = {}
        for i, member in enumerate(members):
            by_name.setdefault(member[0], []).append(i)
        wants_gg = [True] * len(members) if gg is None else list(gg)
        calls: list[tuple[int, tuple[int, int, int], int, int, bool]] = []
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
                served = [i for i in indices if members[i][2] == j]
                if n == 0 and row_members:
                    served += [i for i in indices if members[i][2] in (None, 0)]
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
                calls.append(
                    (position[name], view, row_at, mid_at, any(wants_gg[i] for i in served))
                )

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
        self.gg = np.array([c[4] for c in calls], dtype=np.bool_)
        self._positions = np.array([c[0] for c in calls], dtype=np.int64)
        self._shapes = np.array([c[1] for c in calls], dtype=np.int64).reshape(-1, 3)
        self._runs: list[tuple] | None = None  # calls of one dtype

    def bind(self, tensors: Sequence) -> list[tuple]:
        """Groups the calls by the dtype of their tensor (the first call's tensors decide).

        Returns:
            Per dtype: (the `names` positions of its calls' tensors; an empty array of the
            dtype; the calls' shapes, row offsets, middle offsets and g g flags).
        """
        if self._runs is None:
            by_dtype: dict[str, list[int]] = {}
            for c, pos in enumerate(self._positions):
                by_dtype.setdefault(str(tensors[pos].dtype).replace("torch.", ""), []).append(c)
            self._runs = [
                (
                    self._positions[calls],
                    np.zeros(0, dtype=np.dtype(name)),
                    self._shapes[calls],
                    self.row_at[calls],
                    self.mid_at[calls],
                    self.gg[calls],
                )
                for name, calls in ((n, np.array(cs, dtype=np.int64)) for n, cs in by_dtype.items())
            ]
        return self._runs

    def squares(self, tensors: Sequence, out: np.ndarray | None = None) -> np.ndarray:
        """Signed group sums of x^2 of the tensors (in `names` order) into `out`, float64
        [1, total] (default: a buffer that the next call reuses)."""
        keep: list = []  # contiguous copies: alive until the kernels ran
        at = addresses(tensors, keep)
        work = self.work[0]
        for pos, like, shapes, row_at, mid_at, _ in self.bind(tensors):
            _squares(at[pos], shapes, like, work, row_at, mid_at)
        out = self.out if out is None else out
        _scatter(self.work, self.gather, self.starts, self.sign, out)
        return out

    def products(
        self,
        before: Sequence,
        after: Sequence,
        grads: Sequence,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """Signed group sums of the quadratic (planes 5) or linear (planes 3) quantities
        of theta_k (`before`), theta_{k+1} (`after`) and g_k (`grads`: contiguous, each of its
        parameter's dtype; read in place through its address), each a list in `names` order,
        into `out`, float64 [planes, total] (default: a buffer the next call reuses)."""
        keep: list = []  # contiguous copies: alive until the kernels ran
        t0s, t1s, gs = (addresses(ts, keep) for ts in (before, after, grads))
        self.bind(before)
        return self.products_at(t0s, t1s, gs, out)

    def products_at(
        self, t0s: np.ndarray, t1s: np.ndarray, gs: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """`products` from the data addresses of contiguous tensors, int64 [len(names)] each
        (the caller keeps the tensors alive and unchanged; `bind` was called)."""
        out = self.out if out is None else out
        runs = self._runs
        if len(runs) == 1:  # one compiled call
            pos, like, shapes, row_at, mid_at, gg = runs[0]
            _products_scattered(
                t0s[pos], t1s[pos], gs[pos], shapes, like, self.work, row_at, mid_at, gg,
                self.gather, self.starts, self.sign, out,
            )  # fmt: skip
            return out
        for pos, like, shapes, row_at, mid_at, gg in runs:
            _products(t0s[pos], t1s[pos], gs[pos], shapes, like, self.work, row_at, mid_at, gg)
        _scatter(self.work, self.gather, self.starts, self.sign, out)
        return out
