"""The exact symmetry-breaking budget of any torch optimizer (THEORY.md section 6).

`BudgetTracker(optimizer, named_params, groups)` observes every ``optimizer.step()`` through
torch's step pre- and post-hooks (the optimizer itself is never re-implemented) and, per
symmetry group and per step, in float64, splits the change of the group's quantity into four
terms that sum to it exactly (an identity, so it holds to round-off for every optimizer):

* scale (Q = |theta_A|^2) and rescale (the signed R = |theta_A1|^2 - |theta_A2|^2), with
  Delta_k = theta_{k+1} - theta_k::

      Q_{k+1} - Q_k = 2 <theta_k, Delta_k> + |Delta_k|^2
                    = decay + leak + kinetic + discretisation
      decay          = -2 eta_k lam Q_k          (the step -eta lam theta of weight decay)
      leak           = -2 eta_k <theta_k, g_k>   (the gradient's own component; 0 for an
                                                  exact symmetry)
      kinetic        = 2 <theta_k, Delta_k> - decay - leak   (what momentum, preconditioning,
                                                  trust ratios... add: Tanaka & Kunin 2021)
      discretisation = |Delta_k|^2

  (signed group sums for rescale: A1 minus A2).
* translation (S = <theta_A, 1>): ``S_{k+1} - S_k = <1, Delta_k>`` = decay (-eta lam S_k) +
  leak (-eta <1, g_k>) + kinetic (the rest); no discretisation term (S is linear).

eta_k is the param group's ``lr`` and lam its ``weight_decay`` before the step (coupled for
SGD/Adam/RMSprop/Adagrad, decoupled for AdamW/LAMB: the decay term is the same displacement
-eta lam theta; what the optimizer makes of it beyond that is kinetic). g_k is ``p.grad`` before
the step (torch's optimizers add coupled weight decay to a copy).

For scale groups the tracker also carries the angular update per step (the angle between
theta_k and theta_{k+1}) and |g_k|^2, which the `equilibrium` metric compares with the
predicted equilibrium (section 7).

State (`state_dict`, saved in checkpoints as ``ckpt["budget"]``)::

    {"version": 1, "step": int, "groups": str (groups_to_json of the tracked groups),
     "state": {key: {field: float64 tensor [size]}}}

with fields ``initial`` (the quantity when tracking started), the cumulative sums ``decay``,
``leak``, ``kinetic``, ``discretisation`` over all steps so far, and for scale groups
``angle_sum`` (sum of the per-step angles, radians), ``grad_sq_sum`` (sum of |g_k|^2) and
``angle`` (the last step's angle).

A step called with a closure cannot be observed (the gradient at theta_k is computed inside
the step, and optimizers such as L-BFGS move theta several times): the tracker raises a
`UsageError` saying so instead of writing a wrong budget.

Cost: on the CPU with numba (`Utils.fastsums`), the pre-hook copies theta_k of the tracked
parameters and sums theta_k and g_k (g_k read in place, before the optimizer can change it)
per slice, and the post-hook sums theta_k and theta_{k+1} (Delta_k formed in float64): one
compiled call each, for the groups of every kind, that writes every group sum of the step; only
these sums are kept, and every `BudgetTracker.pending` steps (up to `FUSED_PENDING`) one more
kernel adds their terms to the cumulative sums in step order.

Elsewhere (GPU, no numba) the hooks copy theta_k and g_k (before) and Delta_k (after) into
buffers. Every `BudgetTracker.pending` steps
(as many as fit in `RING_BYTES`, so 1 for models of millions of parameters), and
whenever the state is read (`state`, `state_dict`, `snapshot`, `remove`, a group dropped),
the buffered steps are reduced at once: per family of same-shaped parameters and chunk of
`CHUNK` elements, the products theta theta, Delta Delta, theta g, theta Delta (and g g for
scale groups) are formed once and every member sums its slices from them (norms, read once,
for long rows), then the terms of all buffered steps are added in step order (a cumulative
sum: the result does not depend on when the flushes happen, bitwise, so resumed runs match
uninterrupted ones). theta_k is copied at every step rather than taken from the previous
step's theta_{k+1}, so a parameter changed between two steps (even through ``.data``) enters
no term. With one buffered step (large models), the large parameters' g_k and Delta_k are
read from the tensors at the flush, right after the step, instead of being buffered: an
optimizer that changes ``p.grad`` in place is caught (its version counter), said once, and
the gradients are copied before each step from then on.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from Utils import fastsums
from Utils.errors import CorruptFileError, UsageError
from Utils.groups import Member, SymmetryGroup, group_sum, groups_from_json, groups_to_json
from Utils.kinds import FAMILIES, spec

BUDGET_VERSION = 1
TERMS = ("decay", "leak", "kinetic", "discretisation")
SCALE_FIELDS = ("angle_sum", "grad_sq_sum", "angle")
RING_BYTES = 32 << 20  # memory of the buffered steps (default `BudgetTracker.pending`)
CHUNK = 1 << 19  # elements per buffered step whose products are formed at once
SUB_WIDTH = 1 << 20  # banks this wide form Delta_k per parameter (fewer passes, more calls)
MAX_PENDING = 32  # steps buffered at most before their sums are reduced
FUSED_PENDING = 256  # with the fused kernels: steps whose group sums are kept at most
FUSED_BYTES = 8 << 20  # ... within this memory (5 float64 sums per group entry and step)
FIELD_PREFIX = "budget_"  # prefix of the fields in features.h5 (theory/<key>/budget_<field>)


def family(kind: str) -> str:
    """The theory family of a kind: "translation" (S, linear) or "quadratic" (Q, R)."""
    return spec(kind).family


def fields_of(kind: str) -> tuple[str, ...]:
    """The state fields of a group of this kind."""
    return ("initial", *TERMS, *(SCALE_FIELDS if kind == "scale" else ()))


def angle(q: torch.Tensor, theta_delta: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
    """Angle between theta_k and theta_{k+1} = theta_k + Delta_k per group, radians.

    ``atan2(sqrt(Q |Delta|^2 - <theta, Delta>^2), Q + <theta, Delta>)``: accurate for small
    angles (unlike arccos of the cosine).

    Args:
        q: Q_k [n]; theta_delta: <theta_k, Delta_k> [n]; delta_sq: |Delta_k|^2 [n].
    """
    cross = (q * delta_sq - theta_delta * theta_delta).clamp_min(0.0).sqrt()  # [n]
    return torch.atan2(cross, q + theta_delta)


class _Bank:
    """The tracked parameters of one device and dtype, side by side in pending-step buffers.

    Attributes:
        names: parameter names, in layout order.
        params: the parameters, in layout order.
        offsets: name -> first flat index.
        width: flat size N (the parameters' numels).
        buffer: [3, K, N] in the parameters' dtype: theta_k, g_k and Delta_k of each pending
            step (allocated by `alloc`).
        scratch: [5 K chunk]: products of the flush (`_Source`).
        rows: [3 chunk]: theta_k, g_k, Delta_k of a chunk read from the live tensors.
        held: indices of the parameters whose g_k and Delta_k are buffered (all of them but
            those read live: `_Source.live`).
    """

    def __init__(self, names: Sequence[str], params: Mapping[str, torch.Tensor]) -> None:
        self.names = list(names)
        self.params = [params[n] for n in self.names]
        self.offsets: dict[str, int] = {}
        width = 0
        for n in self.names:
            self.offsets[n] = width
            width += params[n].numel()
        self.width = width
        first = params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.buffer = torch.empty(0, dtype=self.dtype, device=self.device)
        self.scratch = torch.empty(0, dtype=self.dtype, device=self.device)
        self.chunk = 0  # elements of the largest chunk per step (set by the sources)
        self.held = list(range(len(self.names)))  # parameters whose g_k, Delta_k are buffered
        self.rows = torch.empty(0, dtype=self.dtype, device=self.device)
        self.slots: list[tuple[list[torch.Tensor], ...]] = []

    def step_bytes(self) -> int:
        """Bytes one pending step takes (three buffer rows and five of scratch)."""
        itemsize = torch.empty(0, dtype=self.dtype).element_size()
        return (3 * self.width + 5 * self.chunk) * itemsize

    def alloc(
        self, pending: int, shapes: Mapping[str, tuple[int, ...]], fused: bool = False
    ) -> None:
        """Allocates the buffers of `pending` steps and the per-slot parameter views (with
        `fused`: theta_k and g_k of one step only, and no scratch)."""
        planes = 2 if fused else 3
        self.buffer = torch.empty(planes, pending, self.width, dtype=self.dtype, device=self.device)
        chunk = 0 if fused else self.chunk
        self.scratch = torch.empty(5 * pending * chunk, dtype=self.dtype, device=self.device)
        self.rows = torch.empty(3 * chunk, dtype=self.dtype, device=self.device)
        self.slots = []
        for k in range(pending):
            rows = []
            for j in range(planes):
                flat = self.buffer[j, k]  # [N]
                rows.append(
                    [
                        flat[self.offsets[n] : self.offsets[n] + math.prod(shapes[n])].view(
                            shapes[n]
                        )
                        for n in self.names
                    ]
                )
            self.slots.append(tuple(rows))


class _Source:
    """Same-shaped parameters side by side in a bank whose members split them alike.

    The products are formed chunk by chunk (`CHUNK` elements per buffered step: whole
    parameters of a family, or rows of a single large one), so that the scratch stays in
    cache and few calls serve many small parameters; a member whose group axis is the first
    (or a family's) takes its slices from each chunk, the others add up partial sums.

    Args:
        bank: their bank.
        names: the parameters, consecutive in the bank.
        shape: their shape.
        members: (dim or None, in a scale group) of their members, alike for all of them.
    """

    def __init__(
        self,
        bank: _Bank,
        names: Sequence[str],
        shape: tuple[int, ...],
        members: Sequence[tuple[int | None, bool]],
    ) -> None:
        self.bank = bank
        self.count = len(names)
        self.params = [bank.params[bank.names.index(n)] for n in names]
        self.live = False  # read g_k and Delta_k from the tensors (set by the tracker)
        self.shape = shape if shape else (1,)
        self.numel = math.prod(self.shape)
        self.start = bank.offsets[names[0]]
        self.stop = self.start + self.count * self.numel
        self.members = list(members)
        self.scale = any(scale for _, scale in self.members)
        rest = math.prod(self.shape[1:])
        if self.numel <= CHUNK:  # whole parameters per chunk
            self.per, self.lead = max(1, min(self.count, CHUNK // self.numel)), self.shape[0]
        else:  # rows of one parameter per chunk
            self.per, self.lead = 1, max(1, min(self.shape[0], CHUNK // max(rest, 1)))
        self.row_chunks = -(-self.shape[0] // self.lead)  # chunks per parameter
        bank.chunk = max(bank.chunk, self.per * self.lead * rest)

    def _chunks(self, pending: int):
        """(theta_k, g_k, Delta_k: [3, pending, size], or a tuple of [1, size] when read live;
        member views (params, before, kept, after)) per chunk."""
        rows = self.bank.buffer[:, :pending, self.start : self.stop]  # [3, pending, numel]
        rest = math.prod(self.shape[1:])
        for f in range(0, self.count, self.per):
            params = min(self.per, self.count - f)
            for r in range(0, self.shape[0], self.lead):
                lead = min(self.lead, self.shape[0] - r)
                first = f * self.numel + r * rest
                size = params * lead * rest
                if self.live:
                    chunk = self._live(f, r * rest, size)
                else:
                    chunk = rows[:, :, first : first + size]  # [3, pending, size]
                shape = (lead, *self.shape[1:])
                views = []
                for dim, _ in self.members:
                    if dim is None:
                        views.append((params, 1, 1, lead * rest))
                    else:
                        before, after = math.prod(shape[:dim]), math.prod(shape[dim + 1 :])
                        views.append((params, before, shape[dim], after))
                yield chunk, views

    def _live(self, f: int, first: int, size: int) -> tuple[torch.Tensor, ...]:
        """theta_k (buffered), g_k (the gradient) and Delta_k (the parameter minus theta_k,
        into scratch) of elements first..first + size of parameter f, for the one buffered
        step: [1, size] each."""
        p = self.params[f]
        start = self.start + f * self.numel + first
        theta = self.bank.buffer[0, 0:1, start : start + size]
        grad = p.grad.reshape(1, -1)[:, first : first + size]
        delta = torch.sub(
            p.detach().reshape(1, -1)[:, first : first + size],
            theta,
            out=self.bank.rows[:size].view(1, size),
        )
        return theta, grad, delta

    def _collect(self, pieces: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        """Per member: the chunks' slices side by side, or the partial sums of the row chunks
        of each parameter added."""
        parts = []
        for (dim, _), own in zip(self.members, pieces):
            if dim != 0 and self.row_chunks > 1:
                totals = []
                for i in range(0, len(own), self.row_chunks):
                    total = own[i].clone()
                    for piece in own[i + 1 : i + self.row_chunks]:
                        total.add_(piece)
                    totals.append(total)
                own = totals
            parts.append(torch.cat(own, dim=-1) if len(own) > 1 else own[0])
        return parts

    def linear(self, pending: int) -> list[torch.Tensor]:
        """Per member, per-slice sums of theta_k, g_k, Delta_k: [3, pending, slices]."""
        pieces: list[list[torch.Tensor]] = [[] for _ in self.members]
        for rows, views in self._chunks(pending):
            for own, view in zip(pieces, views):
                own.append(_slice_sums(rows.view(3, pending, *view)))
        return self._collect(pieces)

    def quadratic(self, pending: int) -> list[torch.Tensor]:
        """Per member, per-slice |theta_k|^2, |Delta_k|^2, <theta_k, g_k>, <theta_k, Delta_k>
        (and |g_k|^2 when some member is in a scale group): [4 or 5, pending, slices]."""
        rest = math.prod(self.shape[1:])
        if rest >= 64 and all(dim == 0 for dim, _ in self.members):
            return self._rows(pending, rest)
        # g g as a plane only for a scale member whose group axis is not the first; rows of
        # scale members take |g|^2 as norms (read once)
        planes = 5 if any(scale and dim != 0 for dim, scale in self.members) else 4
        pieces: list[list[torch.Tensor]] = [[] for _ in self.members]
        for (theta, grad, delta), views in self._chunks(pending):
            size = theta.shape[-1]
            # theta theta, Delta Delta, theta g, theta Delta(, g g) [planes, pending, size]
            prod = self.bank.scratch[: planes * pending * size].view(planes, pending, size)
            torch.mul(theta, theta, out=prod[0])
            torch.mul(delta, delta, out=prod[1])
            torch.mul(theta, grad, out=prod[2])
            torch.mul(theta, delta, out=prod[3])
            if planes == 5:
                torch.mul(grad, grad, out=prod[4])
            for own, view, (_, scale) in zip(pieces, views, self.members):
                if not scale:
                    own.append(_slice_sums(prod[:4].view(4, pending, *view)))
                elif planes == 5:
                    own.append(_slice_sums(prod.view(5, pending, *view)))
                else:  # rows: |g|^2 from norms [1, pending, slices]
                    norm = torch.linalg.vector_norm(grad.view(1, pending, *view), dim=(3, 5))
                    sums = _slice_sums(prod[:4].view(4, pending, *view))  # [4, pending, slices]
                    own.append(torch.cat([sums, norm.flatten(2).square_()]))
        return self._collect(pieces)

    def _rows(self, pending: int, rest: int) -> list[torch.Tensor]:
        """`quadratic` of long rows (group axis first): squares as norms, read once."""
        pieces = []
        for chunk, _ in self._chunks(pending):
            theta, grad, delta = (x.view(pending, -1, rest) for x in chunk)  # [pending, rows, rest]
            norms = [torch.linalg.vector_norm(x, dim=-1) for x in (theta, delta)]  # [pending, rows]
            prod = self.bank.scratch[: 2 * theta.numel()].view(2, *theta.shape)
            torch.mul(theta, grad, out=prod[0])
            torch.mul(theta, delta, out=prod[1])
            cross = prod.sum(dim=-1)  # [2, pending, rows]
            if self.scale:
                norms.append(torch.linalg.vector_norm(grad, dim=-1))  # [pending, rows]
            piece = torch.cat(
                [norms[0][None], norms[1][None], cross, *(n[None] for n in norms[2:])]
            )
            piece[0:2].square_()
            if self.scale:
                piece[4].square_()
            pieces.append(piece)
        part = torch.cat(pieces, dim=-1) if len(pieces) > 1 else pieces[0]
        return [part] * len(self.members)


class _Plan:
    """The groups of one kind class, reduced together to signed per-group sums.

    Each source (`_Source`) is reduced to the per-slice sums of its members over all buffered
    steps at once, the slices of all members are concatenated, cast to float64, signed and
    scattered into the groups' entries with one ``index_add`` (|g_k|^2 with another, over the
    members of scale groups).

    Args:
        groups: the groups, in entry order.
        banks: the banks; parameter names in layout order.
        shapes: parameter name -> shape.
        device: where the state lives.
    """

    def __init__(
        self,
        groups: Sequence[SymmetryGroup],
        banks: Sequence[_Bank],
        shapes: Mapping[str, tuple[int, ...]],
        device: torch.device,
    ) -> None:
        self.groups = list(groups)
        self.sizes = [g.size for g in self.groups]
        self.total = sum(self.sizes)
        # parameter -> (dim, in a scale group, entries of its slices, sign) per member
        members: dict[str, list[tuple[int | None, bool, list[int], float]]] = {}
        for g, m, dim, entries in _member_slices(self.groups, shapes):
            members.setdefault(m.param, []).append((dim, g.kind == "scale", entries, float(m.sign)))
        self.sources: list[_Source] = []
        index: list[int] = []
        sign: list[float] = []
        grad_index: list[int] = []
        grad_sign: list[float] = []
        self.scale_parts: list[bool] = []
        for bank in banks:
            for run in _runs(bank, members, shapes):
                signature = [(d, sc) for d, sc, _, _ in members[run[0]]]
                self.sources.append(_Source(bank, run, shapes[run[0]], signature))
                for j, (_, scale) in enumerate(signature):
                    self.scale_parts.append(scale)
                    for n in run:
                        _, _, entries, sg = members[n][j]
                        index += entries
                        sign += [sg] * len(entries)
                        if scale:
                            grad_index += entries
                            grad_sign += [sg] * len(entries)
        self.device = device
        self.sums = np.zeros((0, 0, 0))  # fused: [pending, planes, total] per buffered step
        self.index = torch.tensor(index, dtype=torch.long, device=device)
        self.sign = torch.tensor(sign, dtype=torch.float64, device=device)
        self.grad_index = torch.tensor(grad_index, dtype=torch.long, device=device)
        self.grad_sign = torch.tensor(grad_sign, dtype=torch.float64, device=device)

    def fuse(
        self, shapes: Mapping[str, tuple[int, ...]], start: int, sums: np.ndarray
    ) -> tuple[list[tuple], list[bool], list[bool]]:
        """Takes each step's group sums by the fused CPU kernels (`Utils.fastsums`): one pass
        over theta_k and g_k before the step and one over theta_k and theta_{k+1} after it per
        parameter, float64, kept per step until the flush. One `fastsums.SlicePlan` serves
        every kind class: this one's entries sit at `start` in it.

        Args:
            shapes: parameter name -> shape.
            start: the first entry of this class's groups in the tracker's plan.
            sums: float64 [pending, 5, entries of all classes]: the tracker's per-step sums;
                this class reads its planes and entries of it.

        Returns:
            The members ``(name, shape, dim, entries, sign)`` for the plan, whether each
            wants g g (scale groups) and whether each is linear (translation groups).
        """
        linear = self.groups[0].kind == "translation"
        self.sums = sums[:, : 3 if linear else 5, start : start + self.total]
        self.scale_mask = np.array(  # |g|^2 is summed for the entries of scale groups
            [float(g.kind == "scale") for g in self.groups for _ in range(g.size)]
        )
        self.columns = np.arange(self.total, dtype=np.int64)  # rates per entry
        self.zero_columns = np.zeros(self.total, dtype=np.int64)  # one rate for all
        self.no_angle = np.zeros(self.total)
        slices = list(_member_slices(self.groups, shapes))
        members = [
            (m.param, shapes[m.param], dim, [start + e for e in entries], float(m.sign))
            for _, m, dim, entries in slices
        ]
        return members, [g.kind == "scale" for g, _, _, _ in slices], [linear] * len(slices)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-group views of a [total] vector."""
        return list(torch.split(flat, self.sizes))

    def _scatter(
        self, parts: list[torch.Tensor], index: torch.Tensor, sign: torch.Tensor
    ) -> torch.Tensor:
        """[rows, pending, slices] pieces -> signed float64 group sums [rows, pending, total]."""
        flat = torch.cat(parts, dim=-1).to(torch.float64)  # [rows, pending, slices]
        out = flat.new_zeros(*flat.shape[:-1], self.total)
        return out.index_add_(-1, index, flat.mul_(sign))

    def linear(self, pending: int) -> torch.Tensor:
        """S_k, <1, g_k>, <1, Delta_k> of the pending steps: float64 [3, pending, total]."""
        parts = [part for src in self.sources for part in src.linear(pending)]
        return self._scatter(parts, self.index, self.sign)

    def quadratic(self, pending: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Q_k, |Delta_k|^2, <theta_k, g_k>, <theta_k, Delta_k> of the pending steps: float64
        [4, pending, total]; and |g_k|^2 [pending, total] (scale groups; 0 elsewhere)."""
        parts = [part for src in self.sources for part in src.quadratic(pending)]
        main = self._scatter([part[:4] for part in parts], self.index, self.sign)
        scale = [part[4:] for part, sc in zip(parts, self.scale_parts) if sc]
        if not scale:
            return main, main.new_zeros(main.shape[1:])
        return main, self._scatter(scale, self.grad_index, self.grad_sign)[0]


def _member_slices(groups: Sequence[SymmetryGroup], shapes: Mapping[str, tuple[int, ...]]):
    """(group, member, its kept axis or None, the group entry of each of its slices) for every
    member of the groups, their entries laid out group after group."""
    start = 0
    for g in groups:
        for m in g.members:
            shape = shapes[m.param]
            dim = None if m.dim is None else m.dim % max(len(shape), 1)
            slices = 1 if dim is None else shape[dim]
            yield g, m, dim, [start + m.offset + j // m.block for j in range(slices)]
        start += g.size


def _runs(bank: _Bank, members: Mapping[str, list], shapes: Mapping[str, tuple[int, ...]]):
    """The bank's parameters in `members`, in runs of consecutive, same-shaped ones whose
    members split them alike (one `_Source` each)."""
    run: list[str] = []
    key = None
    for n in bank.names:
        if n not in members:
            if run:
                yield run
            run, key = [], None
            continue
        this = (shapes[n], tuple((d, sc) for d, sc, _, _ in members[n]))
        if run and this == key:
            run.append(n)
        else:
            if run:
                yield run
            run, key = [n], this
    if run:
        yield run


class BudgetTracker:
    """Carries the symmetry-breaking budget of every valid group through an optimizer's steps.

    Per step the hooks only copy theta_k and g_k (before) and Delta_k (after) into buffers;
    every `pending` steps, and whenever the state is read, one flush reduces the buffered
    steps to their group sums and adds their terms in step order (the schedule depends on the
    step count and the reads only, so a resumed run reproduces an uninterrupted one bitwise).

    Args:
        optimizer: any torch optimizer whose ``step()`` is called without a closure.
        named_params: ``(name, parameter)`` pairs of the model (the names the groups use).
        groups: symmetry groups; invalid ones and those with a parameter the optimizer does
            not hold or in param groups with different lr/weight_decay are not tracked
            (`skipped` says why).
        pending: steps buffered before a flush; default: as many as fit in `RING_BYTES`
            (at most `MAX_PENDING`, at least 1).

    Attributes:
        groups: the tracked groups.
        skipped: key -> reason for the groups not tracked.
        step: steps observed.
        pending: steps buffered before a flush.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_params: Iterable[tuple[str, torch.Tensor]],
        groups: Sequence[SymmetryGroup],
        pending: int | None = None,
    ) -> None:
        self.optimizer = optimizer
        self._by_name = dict(named_params)
        held = {id(p): i for i, pg in enumerate(optimizer.param_groups) for p in pg["params"]}
        self._pg_of: dict[str, int] = {}
        self.groups: list[SymmetryGroup] = []
        self.skipped: dict[str, str] = {}
        for g in groups:
            reason = self._reason(g, held)
            if reason:
                self.skipped[g.key] = reason
            else:
                self.groups.append(g)
        self.step = 0
        self._requested = pending
        self._live_allowed = True  # until an optimizer is seen changing p.grad in place
        self._open = False  # a step's theta_k and g_k are buffered, Delta_k not yet
        self._build({g.key: self._initial(g) for g in self.groups})
        self._pre = optimizer.register_step_pre_hook(self._before)
        self._post = optimizer.register_step_post_hook(self._after)

    def _reason(self, g: SymmetryGroup, held: Mapping[int, int]) -> str:
        """Why a group cannot be tracked ("" when it can)."""
        if not g.valid:
            return g.reason or "invalid group"
        for n in g.params:
            p = self._by_name.get(n)
            if p is None or id(p) not in held:
                return f"parameter '{n}' is not optimised"
            self._pg_of[n] = held[id(p)]
        hypers = {self._hyper(self._pg_of[n]) for n in g.params}
        if len(hypers) > 1:
            return "its parameters sit in param groups with different lr/weight_decay"
        return ""

    def _hyper(self, pg_index: int) -> tuple[float, float]:
        pg = self.optimizer.param_groups[pg_index]
        return float(pg["lr"]), float(pg.get("weight_decay", 0.0) or 0.0)

    def _initial(self, g: SymmetryGroup) -> dict[str, torch.Tensor]:
        wide = {n: self._by_name[n].detach().to(torch.float64) for n in g.params}
        linear = family(g.kind) == "translation"
        first = group_sum(wide if linear else _squares(wide), g)  # [n]
        state = {f: torch.zeros_like(first) for f in fields_of(g.kind)}
        state["initial"] = first
        return state

    def _build(self, state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Lays out the buffers and packs the per-group state into one tensor per kind class.

        Pending steps are discarded: flush before.
        """
        shapes = {n: tuple(p.shape) for n, p in self._by_name.items()}
        names = list(dict.fromkeys(n for g in self.groups for n in g.params))
        first: dict[tuple[int, ...], int] = {}
        for n in names:
            first.setdefault(shapes[n], len(first))
        names.sort(key=lambda n: first[shapes[n]])  # same-shaped parameters side by side
        by_kind: dict[tuple, list[str]] = {}
        for n in names:
            p = self._by_name[n]
            by_kind.setdefault((p.device, p.dtype), []).append(n)
        self._banks = [_Bank(ns, self._by_name) for ns in by_kind.values()]
        self._plans: dict[str, _Plan] = {}
        self._acc: dict[str, torch.Tensor] = {}
        self._start: dict[str, torch.Tensor] = {}
        self._angle: dict[str, torch.Tensor] = {}
        self._pgs = sorted({self._pg_of[n] for n in names})
        self._pg_cols: dict[str, torch.Tensor | int] = {}
        for cls in FAMILIES:
            gs = [g for g in self.groups if family(g.kind) == cls]
            if not gs:
                continue
            device = self._by_name[gs[0].params[0]].device
            plan = self._plans[cls] = _Plan(gs, self._banks, shapes, device)
            rows = []
            for f in ("initial", *_accumulated(cls), *(("angle",) if cls == "quadratic" else ())):
                parts = [state[g.key][f] if f in state[g.key] else torch.zeros(g.size) for g in gs]
                rows.append(torch.cat([t.to(device=device, dtype=torch.float64) for t in parts]))
            self._start[cls] = rows[0]
            self._acc[cls] = torch.stack(rows[1 : 1 + len(_accumulated(cls))])  # [fields, total]
            if cls == "quadratic":
                self._angle[cls] = rows[-1]
            cols = [self._pgs.index(self._pg_of[g.params[0]]) for g in gs]
            if len(set(cols)) == 1:
                self._pg_cols[cls] = cols[0]
            else:
                per_entry = [c for c, size in zip(cols, plan.sizes) for _ in range(size)]
                self._pg_cols[cls] = torch.tensor(per_entry, dtype=torch.long, device=device)
        # the fused kernels: every tracked parameter on the CPU in float32/float64, numba present
        self._fused = bool(self._banks) and all(fastsums.usable(b.params) for b in self._banks)
        if self._requested is not None:
            self.pending = max(1, int(self._requested))
        elif self._fused:  # only the per-step group sums are kept
            entries = sum(plan.total for plan in self._plans.values()) or 1
            self.pending = max(MAX_PENDING, min(FUSED_PENDING, FUSED_BYTES // (40 * entries)))
        else:
            per_step = sum(b.step_bytes() for b in self._banks) or 1
            self.pending = max(1, min(MAX_PENDING, RING_BYTES // per_step))
        self._names = [n for b in self._banks for n in b.names]
        self._params = [p for b in self._banks for p in b.params]
        for b in self._banks:
            b.alloc(1 if self._fused else self.pending, shapes, self._fused)
        if self._fused:
            self._fuse(shapes)
        self._set_live()
        self._count = 0  # steps buffered
        self._hypers: list[tuple[tuple[float, float], ...]] = []  # (lr, wd) per step, pg

    def _fuse(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Sets up the fused kernels: one `fastsums.SlicePlan` for the groups of every kind
        class, the per-step sums, the addresses of the tracker's copy of theta_k and g_k."""
        entries = sum(plan.total for plan in self._plans.values())
        self._sums = np.zeros((self.pending, 5, entries))  # per buffered step
        members, gg, linear, start = [], [], [], 0
        for plan in self._plans.values():
            ms, gs, ls = plan.fuse(shapes, start, self._sums)
            members, gg, linear, start = members + ms, gg + gs, linear + ls, start + plan.total
        self._slices = fastsums.SlicePlan(members, 5, self._names, entries, gg=gg, linear=linear)
        self._slices.bind(self._params)
        self._pointers: list[int] = []  # storage of the parameters at the last step
        self._t1: np.ndarray | None = None  # their addresses (None: not contiguous)
        self._copies = np.zeros((0, 3), dtype=np.int64)  # theta_k -> slot 0: memcpy's
        self._before_list = [t for b in self._banks for t in b.slots[0][0]]  # theta_k
        self._grad_list = [t for b in self._banks for t in b.slots[0][1]]  # g_k
        self._t0 = fastsums.addresses(self._before_list, [])  # the tracker's own buffers
        self._g_slots = fastsums.addresses(self._grad_list, [])
        self._nbytes = np.array([p.numel() * p.element_size() for p in self._params])

    def _set_live(self) -> None:
        """With one buffered step, large parameters (chunked by rows) of the quadratic plan are
        read live at the flush: their g_k and Delta_k are not buffered (two passes fewer)."""
        if self._fused:  # g_k is summed before the step
            self._live_params = []
            return
        live = self.pending == 1 and self._live_allowed
        sources = [src for plan in self._plans.values() for src in plan.sources]
        quadratic = self._plans.get("quadratic")
        for src in sources:
            src.live = (
                live
                and quadratic is not None
                and src in quadratic.sources
                and src.per == 1
                and all(p.is_contiguous() for p in src.params)
            )
        buffered = {id(p) for src in sources if not src.live for p in src.params}
        self._live_params = [p for src in sources if src.live for p in src.params]
        for b in self._banks:
            b.held = [i for i, p in enumerate(b.params) if id(p) in buffered]

    @property
    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """key -> field -> float64 [size] views of the live state (flushed first)."""
        self._flush()
        out: dict[str, dict[str, torch.Tensor]] = {}
        for cls, plan in self._plans.items():
            fields = {"initial": self._start[cls]}
            fields.update(zip(_accumulated(cls), self._acc[cls]))
            if cls == "quadratic":
                fields["angle"] = self._angle[cls]
            views = {f: plan.split(t) for f, t in fields.items()}
            for i, g in enumerate(plan.groups):
                out[g.key] = {f: views[f][i] for f in fields_of(g.kind)}
        return out

    def remove(self) -> None:
        """Flushes and detaches the hooks (the state stays readable)."""
        self._flush()
        self._pre.remove()
        self._post.remove()

    # ------------------------------------------------------------------ hooks

    def _before(self, optimizer, args, kwargs) -> None:
        """Buffers theta_k and g_k and the step's lr and weight decay."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: self
        if closure is not None:
            raise UsageError(
                f"budget: {type(optimizer).__name__}.step() was called with a closure, so the "
                "update of the observed gradient cannot be seen; call loss.backward() before "
                "step() without a closure, or track no budget"
            )
        self._open = False
        grads = [p.grad for p in self._params]
        if any(g is None for g in grads):
            no_grad = {}
            for g in self.groups:
                missing = [n for n in g.params if self._by_name[n].grad is None]
                if missing:
                    no_grad[g.key] = f"'{missing[0]}' had no gradient at step {self.step}"
            self._drop(no_grad)
            grads = [p.grad for p in self._params]
        if not self._plans:
            return
        if self._fused:
            self._fused_before(grads)
            return
        k = self._count
        with torch.no_grad():
            for b in self._banks:
                theta, grad = b.slots[k][:2]
                torch._foreach_copy_(theta, b.params)
                torch._foreach_copy_([grad[i] for i in b.held], [b.params[i].grad for i in b.held])
        # gradients read live at the flush: (gradient, its version) to check they stay g_k
        self._live_grads = [(p.grad, p.grad._version) for p in self._live_params]
        del self._hypers[k:]  # a step that raised after this hook left its entry
        self._hypers.append(tuple(self._hyper(i) for i in self._pgs))
        self._open = True

    def _fused_before(self, grads: list[torch.Tensor]) -> None:
        """`_before` with the fused kernels: copies theta_k and takes the sums of theta_k and
        g_k (g_k read in place, so an optimizer may change it during the step) in one compiled
        call; notes the step's lr and decay. Kept lean: it runs at every step."""
        # the parameters keep their storage unless replaced (e.g. p.data = ...): checked here
        # and after the step
        pointers = [p.data_ptr() for p in self._params]
        if pointers != self._pointers:
            self._pointers = pointers
            contiguous = all(p.is_contiguous() for p in self._params)
            self._t1 = np.array(pointers, dtype=np.int64) if contiguous else None
            if contiguous:
                self._copies = np.stack([self._t0, self._t1, self._nbytes], axis=1)
        if self._t1 is not None and all(map(torch.Tensor.is_contiguous, grads)):
            at = np.array([g.data_ptr() for g in grads], dtype=np.int64)
            self._slices.before_at(self._t0, at, self._copies)
        else:
            with torch.no_grad():
                torch._foreach_copy_(self._before_list + self._grad_list, self._params + grads)
            self._slices.before_at(self._t0, self._g_slots)
        del self._hypers[self._count :]  # a step that raised after this hook left its entry
        self._hypers.append(tuple(self._hyper(i) for i in self._pgs))
        self._open = True

    def _after(self, optimizer, args, kwargs) -> None:
        """Buffers Delta_k = theta_{k+1} - theta_k; flushes when the buffers are full."""
        if not self._open:
            return
        self._open = False
        k = self._count
        if self._fused:  # g_k was summed before the step: a change of p.grad does not matter
            self._fused_step(k)
            self._count += 1
            self.step += 1
            if self._count == self.pending:
                self._flush()
            return
        with torch.no_grad():
            for b in self._banks:
                theta, _, delta = b.slots[k]
                if b.width >= SUB_WIDTH:  # one pass per parameter
                    for i in b.held:
                        torch.sub(b.params[i], theta[i], out=delta[i])  # Delta_k [*shape]
                else:  # few calls
                    torch._foreach_copy_([delta[i] for i in b.held], [b.params[i] for i in b.held])
                    b.buffer[2, k].sub_(b.buffer[0, k])  # Delta_k [N]
        changed = any(
            p.grad is not g or g._version != v
            for p, (g, v) in zip(self._live_params, self._live_grads)
        )
        if changed:
            warnings.warn(
                f"budget: {type(optimizer).__name__}.step() changed p.grad in place, so the "
                f"leak / kinetic split of step {self.step} used the changed gradient; gradients "
                "are copied before each step from now on",
                stacklevel=2,
            )
        self._count += 1
        self.step += 1
        if self._count == self.pending:
            self._flush()
        if changed:
            self._live_allowed = False
            self._build(self.state)

    def _fused_step(self, k: int) -> None:
        """Step k's group sums by the fused kernels (theta_k from slot 0, copied by the
        pre-hook, whose sums of theta_k and g_k wait in the work; theta_{k+1} from the
        parameters)."""
        keep: list = []
        t1 = self._t1
        if t1 is None or [p.data_ptr() for p in self._params] != self._pointers:
            with torch.no_grad():  # replaced during the step, or not contiguous
                t1 = fastsums.addresses(self._params, keep)
        self._slices.after_at(self._t0, t1, self._sums[k])

    def _rates(self, cls: str, pending: int) -> tuple[np.ndarray, np.ndarray]:
        """eta_k and eta_k lam of the first `pending` buffered steps: float64 [pending, 1], or
        [pending, total] when the plan's groups sit in several param groups."""
        hypers = np.array(self._hypers[:pending], dtype=np.float64)  # [pending, pgs, (lr, wd)]
        lr = hypers[..., 0]  # [pending, param groups]
        rates = np.stack([lr, lr * hypers[..., 1]])  # [2, pending, param groups]
        cols = self._pg_cols[cls]
        if isinstance(cols, int):
            rates = rates[..., cols : cols + 1]  # [2, pending, 1]
        else:
            rates = rates[..., cols.cpu().numpy()]  # [2, pending, total]
        return np.ascontiguousarray(rates[0]), np.ascontiguousarray(rates[1])

    def _flush(self) -> None:
        """Adds the terms of the buffered steps to the cumulative sums, in step order."""
        pending, self._count = self._count, 0
        if not pending:
            return
        with torch.no_grad():
            for cls, plan in self._plans.items():
                lr, lwd = self._rates(cls, pending)
                if self._fused:  # one pass, in step order (as the cumsum below)
                    cols = lr.shape[1]
                    fastsums.accumulate_budget(
                        plan.sums[:pending],
                        lr,
                        lwd,
                        plan.columns if cols > 1 else plan.zero_columns,
                        plan.scale_mask,
                        self._acc[cls].numpy(),
                        self._angle[cls].numpy() if cls == "quadratic" else plan.no_angle,
                    )
                    continue
                lr, lwd = (torch.from_numpy(r).to(plan.device) for r in (lr, lwd))
                if cls == "translation":
                    base, tg, td = plan.linear(pending)  # [pending, total] each
                    terms = step_terms(1.0, lr, lwd, base, tg, td, None)
                    steps = [terms[t] for t in TERMS]
                else:
                    (base, dd, tg, td), gsq = plan.quadratic(pending)  # [pending, total] each
                    terms = step_terms(2.0, lr, lwd, base, tg, td, dd)
                    a = angle(base, td, dd)  # [pending, total]
                    self._angle[cls].copy_(a[-1])
                    steps = [terms[t] for t in TERMS] + [a, gsq]
                acc = self._acc[cls]  # [fields, total]
                # sequential sums (cumsum), as if each step were added on its own
                sums = torch.cat([acc[:, None], torch.stack(steps)], dim=1).cumsum_(1)
                acc.copy_(sums[:, -1])
            if self._open and not self._fused:  # read between a step's hooks: its theta_k, g_k
                # move to slot 0
                for b in self._banks:
                    b.buffer[:2, 0].copy_(b.buffer[:2, pending])
        del self._hypers[:pending]

    def _drop(self, reasons: Mapping[str, str]) -> None:
        state = self.state
        for key, reason in reasons.items():
            warnings.warn(f"symmetry group {key}: no more budget ({reason})", stacklevel=4)
            self.skipped[key] = reason
        self.groups = [g for g in self.groups if g.key not in reasons]
        self._build(state)

    # ------------------------------------------------------------- state dict

    def state_dict(self) -> dict:
        """The budget state (layout in the module docstring); tensors are copies."""
        return {
            "version": BUDGET_VERSION,
            "step": self.step,
            "groups": groups_to_json(self.groups),
            "state": {k: {f: t.clone() for f, t in fs.items()} for k, fs in self.state.items()},
        }

    def load_state_dict(self, saved: Mapping) -> None:
        """Restores a `state_dict` exactly (bitwise resumption); buffered steps are dropped.

        Raises:
            CorruptFileError: when it is not a budget state or does not fit this model.
        """
        if not isinstance(saved, Mapping) or saved.get("version") != BUDGET_VERSION:
            raise CorruptFileError(
                "checkpoint budget is not version 1; resume with the code that wrote it"
            )
        groups = groups_from_json(saved["groups"])
        held = {id(p): i for i, pg in enumerate(self.optimizer.param_groups) for p in pg["params"]}
        for g in groups:
            fields = saved["state"].get(g.key, {})
            reason = self._reason(g, held)
            if reason or set(fields) != set(fields_of(g.kind)):
                raise CorruptFileError(
                    f"checkpoint budget of {g.key} does not fit this model ({reason or 'fields'})"
                    "; resume with the model and optimizer that wrote it"
                )
        self.groups = groups
        self._open = False
        self._build(saved["state"])
        self.step = int(saved["step"])

    def snapshot(self) -> dict[str, dict[str, np.ndarray]]:
        """key -> field -> float64 numpy copy of the current state."""
        return {
            k: {f: t.detach().cpu().numpy().copy() for f, t in fs.items()}
            for k, fs in self.state.items()
        }


def step_terms(
    factor: float,
    lr: torch.Tensor,
    lr_wd: torch.Tensor,
    base: torch.Tensor,
    theta_grad: torch.Tensor,
    theta_delta: torch.Tensor,
    delta_sq: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The four budget terms of one step from its float64 group sums.

    Args:
        factor: 2 for scale/rescale, 1 for translation.
        lr: eta_k (0-d or per entry [n]).
        lr_wd: eta_k lam (same shape as lr).
        base: Q_k (scale, rescale) or S_k (translation) [n].
        theta_grad: <theta_k, g_k> (translation: <1, g_k>) [n].
        theta_delta: <theta_k, Delta_k> (translation: <1, Delta_k>) [n].
        delta_sq: |Delta_k|^2 [n] (None for translation: no discretisation term).

    Returns:
        term name -> [n]; they sum to the change of the quantity (the identity).
    """
    decay = base * lr_wd * -factor
    leak = theta_grad * lr * -factor
    kinetic = theta_delta * factor - decay - leak
    disc = torch.zeros_like(base) if delta_sq is None else delta_sq
    return {"decay": decay, "leak": leak, "kinetic": kinetic, "discretisation": disc}


def _squares(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t * t for n, t in values.items()}


def _accumulated(cls: str) -> tuple[str, ...]:
    """The fields of a kind class carried as cumulative sums, in the order of its state rows."""
    return (*TERMS, *(("angle_sum", "grad_sq_sum") if cls == "quadratic" else ()))


def _slice_sums(x: torch.Tensor) -> torch.Tensor:
    """Per-slice sums of [rows, pending, params, before, kept, after]: [rows, pending,
    params kept] (parameter-major).

    The leading axis is summed first (a contiguous, vectorised reduction), then the trailing
    one: several times faster on CPU than both at once.
    """
    if x.shape[3] > 1:
        x = x.sum(dim=3, keepdim=True)  # [rows, pending, params, 1, kept, after]
    return x.sum(dim=(3, 5)).flatten(2)


def _member_sums(x: torch.Tensor, member: Member, size: int) -> torch.Tensor:
    """Signed sums of x [*shape] per group of one member, float64 [size] (zeros elsewhere)."""
    shape = x.shape
    if member.dim is None:
        per_slice = x.reshape(1, 1, -1).sum(dim=(0, 2))  # [1]
    else:
        dim = member.dim % x.ndim
        view = x.reshape(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]))
        per_slice = view.sum(dim=(0, 2))  # [kept]
    grouped = per_slice.reshape(-1, member.block).sum(dim=1) * member.sign  # [kept / block]
    out = torch.zeros(size, dtype=torch.float64, device=x.device)
    out[member.offset : member.offset + grouped.numel()] = grouped
    return out


def group_dot(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], group: SymmetryGroup
) -> torch.Tensor:
    """Signed per-group <a, b> in float64 (`Utils.groups.group_sum` of a * b).

    Returns:
        float64 [group.size].
    """
    wide = {n: a[n].to(torch.float64) * b[n].to(torch.float64) for n in group.params}
    return sum(_member_sums(wide[m.param], m, group.size) for m in group.members)


def group_total(a: Mapping[str, torch.Tensor], group: SymmetryGroup) -> torch.Tensor:
    """Signed per-group sum of a (`Utils.groups.group_sum`), float64 [group.size]."""
    return sum(_member_sums(a[m.param].to(torch.float64), m, group.size) for m in group.members)


def budget_arrays(budget: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """A checkpoint's ``budget`` entry as float64 arrays: key -> field -> [size]."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for key, fields in (budget.get("state", {}) or {}).items():
        out[str(key)] = {}
        for name, value in fields.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().numpy()
            out[str(key)][name] = np.asarray(value, dtype=np.float64)
    return out
