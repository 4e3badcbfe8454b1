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
import os
import warnings
from collections.abc import Sequence

import numpy as np

try:  # optional: without numba the callers keep their torch path
    if os.environ.get("NM_FAST_SUMS", "1") == "0":
        raise ImportError("disabled by NM_FAST_SUMS=0")
    import llvmlite.ir
    import numba
    from numba import njit, types
    from numba.core import cgutils
    from numba.extending import intrinsic

    @intrinsic
    def _pointer(typingctx, address, like):
        """A pointer to elements of the type of array `like` at an integer address."""
        signature = types.CPointer(like.dtype)(address, like)

        def codegen(context, builder, sig, args):
            return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

        return signature, codegen

    @intrinsic
    def _memcpy(typingctx, target, source, nbytes):
        """Copies nbytes bytes from integer address source to integer address target."""
        signature = types.void(target, source, nbytes)

        def codegen(context, builder, sig, args):
            byte = llvmlite.ir.IntType(8).as_pointer()
            to, at = (builder.inttoptr(a, byte) for a in args[:2])
            cgutils.raw_memcpy(builder, to, at, args[2], 1)
            return context.get_dummy_value()

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
def _squares(xs, program, like, work):  # pragma: no cover - compiled by numba
    """`_square_into` for each call of the program (`SlicePlan`): the contiguous array at
    address xs[program[i, 0]] of the dtype of `like`, shaped program[i, 1:4]."""
    for i in range(program.shape[0]):
        c = program[i]
        x = numba.carray(_pointer(xs[c[0]], like), (c[1], c[2], c[3]))
        _square_into(x, work, c[4], c[5])


# what `_pair_into` sums of an element pair (x, y), per kind: the before-step kinds read
# (theta_k, g_k), the after-step kinds (theta_k, theta_{k+1}); Delta = theta_{k+1} - theta_k
THETA_GRAD = 0  # theta theta, theta g, g g (scale and rescale groups)
THETA_GRAD_NO_GG = 1  # theta theta, theta g, 0 (no scale group: g g is not wanted)
STEP = 2  # Delta Delta, theta Delta, 0
SUM_THETA_GRAD = 3  # theta, g, 0 (translation groups)
SUM_STEP = 4  # Delta, 0, 0


@njit(**_FLAGS, inline="always")
def _terms(kind, x, y):  # pragma: no cover - compiled by numba
    """The three quantities of one element pair that `_pair_into` sums, for its kind."""
    if kind == THETA_GRAD:
        return x * x, x * y, y * y
    if kind == THETA_GRAD_NO_GG:
        return x * x, x * y, 0.0
    if kind == STEP:
        d = y - x
        return d * d, x * d, 0.0
    if kind == SUM_THETA_GRAD:
        return x, y, 0.0
    return y - x, 0.0, 0.0


@njit(**_FLAGS, inline="always")
def _pair_loop(x, y, w0, w1, w2, row_at, mid_at, kind):  # pragma: no cover - numba
    """`_pair_into` for one kind, inlined where `kind` is a constant (no branch in the loops)."""
    nb, nk, na = x.shape
    if mid_at >= 0:
        for k in range(mid_at, mid_at + nk):
            w0[k] = 0.0
            w1[k] = 0.0
            w2[k] = 0.0
    for b in range(nb):
        r0 = 0.0
        r1 = 0.0
        r2 = 0.0
        if na == 1 and mid_at >= 0:  # columns: vectorised along k
            m0 = w0[mid_at : mid_at + nk]
            m1 = w1[mid_at : mid_at + nk]
            m2 = w2[mid_at : mid_at + nk]
            for k in range(nk):
                q0, q1, q2 = _terms(kind, np.float64(x[b, k, 0]), np.float64(y[b, k, 0]))
                m0[k] += q0
                m1[k] += q1
                m2[k] += q2
                r0 += q0
                r1 += q1
                r2 += q2
        else:
            for k in range(nk):
                s0 = 0.0
                s1 = 0.0
                s2 = 0.0
                for a in range(na):
                    q0, q1, q2 = _terms(kind, np.float64(x[b, k, a]), np.float64(y[b, k, a]))
                    s0 += q0
                    s1 += q1
                    s2 += q2
                r0 += s0
                r1 += s1
                r2 += s2
                if mid_at >= 0:
                    w0[mid_at + k] += s0
                    w1[mid_at + k] += s1
                    w2[mid_at + k] += s2
        if row_at >= 0:
            w0[row_at + b] = r0
            w1[row_at + b] = r1
            w2[row_at + b] = r2


@njit(**_FLAGS)
def _pair_into(x, y, work, row_at, mid_at, kind, to):  # pragma: no cover - numba
    """x, y [B, K, A] -> the three sums of `_terms(kind)` (formed in float64) per row (over
    K, A) into work[to[q], row_at : row_at + B] and per middle index (over B, A) into
    work[to[q], mid_at : mid_at + K], q = 0, 1, 2 (distinct planes; an unwanted sum goes to a
    spare plane); an offset < 0 is not computed."""
    w0 = work[to[0]]
    w1 = work[to[1]]
    w2 = work[to[2]]
    if kind == THETA_GRAD:
        _pair_loop(x, y, w0, w1, w2, row_at, mid_at, THETA_GRAD)
    elif kind == THETA_GRAD_NO_GG:
        _pair_loop(x, y, w0, w1, w2, row_at, mid_at, THETA_GRAD_NO_GG)
    elif kind == STEP:
        _pair_loop(x, y, w0, w1, w2, row_at, mid_at, STEP)
    elif kind == SUM_THETA_GRAD:
        _pair_loop(x, y, w0, w1, w2, row_at, mid_at, SUM_THETA_GRAD)
    else:
        _pair_loop(x, y, w0, w1, w2, row_at, mid_at, SUM_STEP)


@njit(**_FLAGS)
def _pairs(xs, ys, program, side, like, work):  # pragma: no cover - compiled by numba
    """`_pair_into` for each call of the program (`SlicePlan`) on the contiguous arrays at
    addresses xs[program[i, 0]] and ys[program[i, 0]] of the dtype of `like`, before (side
    0) or after (side 1) the step."""
    for i in range(program.shape[0]):
        c = program[i]
        shape = (c[1], c[2], c[3])
        x = numba.carray(_pointer(xs[c[0]], like), shape)
        y = numba.carray(_pointer(ys[c[0]], like), shape)
        to = c[8 + 3 * side : 11 + 3 * side]
        _pair_into(x, y, work, c[4], c[5], c[6 + side], to)


@njit(**_FLAGS)
def _before_step(copies, t0s, gs, program, like, work):  # pragma: no cover - numba
    """Copies theta_k (copies: int64 [n, 3] of target address, source address, bytes), then
    `_pairs` of theta_k (t0s: the copies) and g_k (gs): one call from Python."""
    for i in range(copies.shape[0]):
        _memcpy(copies[i, 0], copies[i, 1], copies[i, 2])
    _pairs(t0s, gs, program, 0, like, work)


@njit(**_FLAGS)
def _after_step(
    t0s, t1s, program, like, work, gather, starts, sign, out
):  # pragma: no cover - compiled by numba
    """`_pairs` of theta_k and theta_{k+1}, then `_scatter` of the work into out (one call
    from Python)."""
    _pairs(t0s, t1s, program, 1, like, work)
    _scatter(work, gather, starts, sign, out)


_WORKING: bool | None = None  # the kernels compiled and ran (checked once per process)


def _working() -> bool:
    """Compiles and runs every kernel once on tiny inputs (numba's cache makes this fast after
    the first process); a failure (e.g. no usable compiler cache) switches to torch, said once."""
    global _WORKING
    if _WORKING is None:
        try:
            for dtype in (np.float32, np.float64):
                x, y = np.ones((2, 3, 1), dtype=dtype), np.zeros((2, 3, 1), dtype=dtype)
                like = x[:0, 0, 0]
                at = np.array([x.ctypes.data], dtype=np.int64)
                copies = np.array([[y.ctypes.data, x.ctypes.data, x.nbytes]], dtype=np.int64)
                work = np.zeros((8, 5))
                scatter = (
                    np.zeros(1, dtype=np.int64),
                    np.array([0, 1], dtype=np.int64),
                    np.ones(1),
                    np.zeros((5, 1)),
                )
                for kinds in (
                    (THETA_GRAD, STEP),
                    (THETA_GRAD_NO_GG, STEP),
                    (SUM_THETA_GRAD, SUM_STEP),
                ):
                    program = np.array([[0, 2, 3, 1, 0, 2, *kinds, 0, 1, 2, 3, 4, 5]])
                    _squares(at, program, like, work[0])
                    _before_step(copies, at, at, program, like, work)
                    _after_step(at, at, program, like, work, *scatter)
            index = np.zeros(1, dtype=np.int64)
            rates = np.zeros((1, 1))
            acc = np.zeros((6, 1))
            sums = np.zeros((1, 5, 2))
            for part in (sums[:, :, :1], sums[:, :3, 1:]):  # contiguous, and a view
                accumulate_budget(part, rates, rates, index, np.ones(1), acc, acc[0])
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
        mask: float64 [T]: 1 for the entries of scale groups (their angle and |g|^2 are
            summed; 0 elsewhere: those fields are not kept for rescale groups).
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
            if planes == 5 and mask[t] != 0.0:  # scale groups only
                cross = math.sqrt(max(base * dd - td * td, 0.0))
                a = math.atan2(cross, base + td)
                acc[4, t] += a
                acc[5, t] += sums[k, 4, t]
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


class SlicePlan:
    """Signed per-group sums of squares or products, by fused kernels and one scatter.

    Each member is ``(name, shape, dim, entries, sign)``: a parameter, its shape, the kept
    axis (None: the whole tensor is one slice), the group entry of each of its slices and its
    sign. The kernels write row sums (over all axes but the first) and middle sums (over all
    axes but the kept one) of a parameter into a float64 work vector [planes + 3, W] (a
    parameter is read once per distinct kept axis other than 0, once when it has none, and
    every member of it is served from that pass; once more for linear members); one scatter
    adds the signed work entries into the groups' entries (a row sum enters the entry of its
    row's slice; a whole-tensor member's rows all enter its one entry).

    The passes are a program, int64 [calls, 14], one row per pass: the tensor's position in
    `names`, its [B, K, A] view, the row and middle offsets in the work, the `_pair_into` kinds
    before and after the step, and the three work planes each of these writes.

    Args:
        members: ``(name, shape, dim, entries, sign)`` per member.
        planes: quantities per slice: 1 (`squares`), 5 (`products`: theta theta, Delta Delta,
            theta g, theta Delta, g g of quadratic members; theta, g, Delta in the first three
            planes of linear members) or 3 (`products` of linear members only).
        names: the order of the tensors given to `squares` / `products`.
        total: the number of group entries.
        gg: per member, whether its g g sums are wanted (default: all); a pass that serves no
            such member leaves them 0 and runs faster.
        linear: per member, whether it sums the linear quantities (translation groups) rather
            than the quadratic ones (default: all when planes is 3, else none).
    """

    def __init__(
        self,
        members: Sequence[tuple[str, tuple[int, ...], int | None, Sequence[int], float]],
        planes: int,
        names: Sequence[str],
        total: int,
        gg: Sequence[bool] | None = None,
        linear: Sequence[bool] | None = None,
    ) -> None:
        self.planes = planes
        position = {n: i for i, n in enumerate(names)}
        wants_gg = [True] * len(members) if gg is None else list(gg)
        is_linear = [planes == 3] * len(members) if linear is None else list(linear)
        by_pass: dict[tuple[str, bool], list[int]] = {}
        for i, member in enumerate(members):
            by_pass.setdefault((member[0], is_linear[i]), []).append(i)
        program: list[list[int]] = []
        gather: list[np.ndarray] = []
        index: list[np.ndarray] = []
        sign: list[np.ndarray] = []

        def add(work: np.ndarray, member: tuple, slice_of: np.ndarray) -> None:
            gather.append(work)
            index.append(np.asarray(member[3], dtype=np.int64)[slice_of])
            sign.append(np.full(len(work), float(member[4])))

        spare = [planes, planes + 1, planes + 2]
        width = 0
        for (name, lin), indices in by_pass.items():
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
                if lin:
                    kinds, writes = (SUM_THETA_GRAD, SUM_STEP), ([0, 1, spare[0]], [2, *spare[:2]])
                else:
                    before = THETA_GRAD if any(wants_gg[i] for i in served) else THETA_GRAD_NO_GG
                    kinds, writes = (before, STEP), ([0, 2, 4], [1, 3, spare[0]])
                program.append(
                    [position[name], *view, row_at, mid_at, *kinds, *writes[0], *writes[1]]
                )

        def cat(parts: list[np.ndarray], dtype) -> np.ndarray:
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype=dtype)

        entry = cat(index, np.int64)
        order = np.argsort(entry, kind="stable")  # by group entry, each in member order
        self.gather = cat(gather, np.int64)[order]
        self.sign = cat(sign, np.float64)[order]
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(entry, minlength=total))])
        self.work = np.zeros((planes + 3, max(width, 1)))  # + 3 spare planes (`_pair_into`)
        self.out = np.zeros((planes, total))
        self.program = np.array(program, dtype=np.int64).reshape(-1, 14)
        self._runs: list[tuple[np.ndarray, np.ndarray]] | None = None  # programs per dtype

    def bind(self, tensors: Sequence) -> list[tuple[np.ndarray, np.ndarray]]:
        """Splits the program by the dtype of the passes' tensors (these tensors decide).

        Returns:
            Per dtype: (an empty array of the dtype, its rows of the program).
        """
        if self._runs is None:
            by_dtype: dict[str, list[int]] = {}
            for c, pos in enumerate(self.program[:, 0]):
                by_dtype.setdefault(str(tensors[pos].dtype).replace("torch.", ""), []).append(c)
            self._runs = [
                (np.zeros(0, dtype=np.dtype(name)), self.program[np.array(cs, dtype=np.int64)])
                for name, cs in by_dtype.items()
            ]
        return self._runs

    def squares(self, tensors: Sequence, out: np.ndarray | None = None) -> np.ndarray:
        """Signed group sums of x^2 of the tensors (in `names` order) into `out`, float64
        [1, total] (default: a buffer that the next call reuses)."""
        keep: list = []  # contiguous copies: alive until the kernels ran
        at = addresses(tensors, keep)
        for like, program in self.bind(tensors):
            _squares(at, program, like, self.work[0])
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
        """Signed group sums of the quadratic and linear quantities (see ``planes``) of
        theta_k (`before`), theta_{k+1} (`after`) and g_k (`grads`), each a list in `names`
        order (every tensor of its parameter's dtype), into `out`, float64 [planes, total]
        (default: a buffer the next call reuses): `before_at`, then `after_at`."""
        keep: list = []  # contiguous copies: alive until the kernels ran
        t0s, t1s, gs = (addresses(ts, keep) for ts in (before, after, grads))
        self.bind(before)
        self.before_at(t0s, gs)
        return self.after_at(t0s, t1s, out)

    def before_at(self, t0s: np.ndarray, gs: np.ndarray, copies: np.ndarray | None = None):
        """The planes of theta_k and g_k (quadratic: theta theta, theta g, g g; linear: theta,
        g), kept in the work until `after_at`, from the data addresses of contiguous tensors,
        int64 [len(names)] each (the caller keeps them alive; `bind` was called). Taken before
        the step, the sums see g_k even if the optimizer then changes it in place.

        Args:
            t0s: addresses of theta_k; gs: addresses of g_k.
            copies: int64 [n, 3]: (target, source, bytes) of memory copies done first (the
                copy of theta_k that t0s point to), in the same compiled call.
        """
        copies = _NO_COPIES if copies is None else copies
        for like, program in self._runs:
            _before_step(copies, t0s, gs, program, like, self.work)
            copies = _NO_COPIES

    def after_at(
        self, t0s: np.ndarray, t1s: np.ndarray, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The planes of theta_k and theta_{k+1} (quadratic: Delta Delta, theta Delta; linear:
        Delta), then every plane's signed group sums into `out`, float64 [planes, total]
        (default: a buffer the next call reuses); addresses as in `before_at`, which ran
        since the last call."""
        out = self.out if out is None else out
        runs = self._runs
        if len(runs) == 1:  # one compiled call
            like, program = runs[0]
            _after_step(
                t0s, t1s, program, like, self.work, self.gather, self.starts, self.sign, out
            )
            return out
        for like, program in runs:
            _pairs(t0s, t1s, program, 1, like, self.work)
        _scatter(self.work, self.gather, self.starts, self.sign, out)
        return out


_NO_COPIES = np.zeros((0, 3), dtype=np.int64)
