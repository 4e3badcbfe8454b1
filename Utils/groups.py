"""The representation of symmetry groups shared by detection, tracking, extraction and metrics.

A `SymmetryGroup` is one layer's (or one layer pair's) set of neuron groups of one kind
(THEORY.md section 2). Which parameter elements belong to which neuron is described by
`Member`s, so that every per-group reduction is a vectorised sum over tensor axes:

* translation, last Linear ``W [C, D]``, ``b [C]``: ``Member(W, dim=1)`` gives groups 0..D-1
  (the columns) and ``Member(b, dim=None, offset=D)`` gives group D (the whole bias).
* scale, conv ``W [O, I, kh, kw]``, ``b [O]`` feeding BatchNorm: ``Member(W, dim=0)``,
  ``Member(b, dim=0)``.
* rescale, hidden unit i between layer l and l+1: ``Member(W_l, dim=0)``,
  ``Member(b_l, dim=0)`` with sign +1 and ``Member(W_{l+1}, dim=1, block=B, sign=-1)``, where
  ``B`` is the number of flattened input columns that came from one channel (1 without flatten).

Signed sums give the rescale differences |theta_A1|^2 - |theta_A2|^2 directly.

Group sums: `group_sum_np` (numpy, metrics), `group_sum` (torch, one group: detection and the
initial theory state) and `Reducer` (torch, all the groups of a bundle in a few calls: the
per-step sums of `Utils.optimizers.TrackingSGD`). Every sum is accumulated in float64, also for
float32 inputs. The kinds themselves are defined in `Utils.kinds`.

torch is imported inside the torch functions only: cache.py and the metrics use this module
without torch (importing it costs seconds).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from Utils import kinds
from Utils.kinds import KindSpec

if TYPE_CHECKING:
    import torch

# elements per tensor up to which `Reducer.squares` stacks same-shaped matrices, so that one
# reduction serves several members (small layers: the cost is per torch call, not per element)
_STACK_LIMIT = 1 << 16
# elements of one float64 chunk of `_wide` (1 MB: the temporary stays in cache)
_CHUNK = 1 << 17
_SQUARE_CHUNK = 1 << 18  # elements of the float64 buffer of `Reducer.square_sums`


@dataclass(frozen=True)
class Member:
    """How one parameter tensor splits into the groups of a `SymmetryGroup`.

    Attributes:
        param: parameter name as in ``model.named_parameters()``, e.g. ``features.0.weight``.
        dim: tensor axis that indexes groups; ``None`` means the whole tensor is one group.
        block: number of consecutive slices along ``dim`` that form one group (flatten).
        offset: index of this member's first group within the `SymmetryGroup`.
        sign: +1, or -1 for the outgoing side (A2) of a rescale pair.
    """

    param: str
    dim: int | None = 0
    block: int = 1
    offset: int = 0
    sign: int = 1


@dataclass
class SymmetryGroup:
    """All neuron groups of one kind at one layer (or layer pair).

    Attributes:
        kind: a kind of `Utils.kinds.KINDS` ("translation", "scale" or "rescale").
        name: layer key, e.g. ``classifier`` or ``features.0->features.3``.
        size: number of groups (neurons).
        members: the parameters and how they split into groups.
        violation: max over groups of |<g_A, c_A>| / (|g_A| |c_A|) measured on a batch.
        valid: whether the theory applies (constraint holds, same hyperparameters).
        reason: why the group is not valid, empty otherwise.
        meta: detection details: ``structure`` (one of the kind's `Utils.kinds.Structure`
            names), the normalisation layer and its eps, verification's eps residual.
    """

    kind: str
    name: str
    size: int
    members: tuple[Member, ...]
    violation: float = math.nan
    valid: bool = True
    reason: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """Unique key ``<kind>/<name>`` (also the HDF5 path below ``theory/``)."""
        return f"{self.kind}/{self.name}"

    @property
    def params(self) -> list[str]:
        """Names of the parameters that take part, in member order, without repeats."""
        return list(dict.fromkeys(m.param for m in self.members))

    def to_dict(self) -> dict:
        """A JSON-serialisable dict (inverse of `from_dict`)."""
        d = asdict(self)
        d["members"] = [asdict(m) for m in self.members]
        d["violation"] = None if math.isnan(self.violation) else float(self.violation)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> SymmetryGroup:
        """Builds a group from `to_dict` output."""
        d = dict(d)
        d["members"] = tuple(Member(**m) for m in d["members"])
        d["violation"] = math.nan if d.get("violation") is None else float(d["violation"])
        d.setdefault("meta", {})
        return cls(**d)

    @property
    def spec(self) -> KindSpec:
        """The definition of this group's kind (`Utils.kinds`)."""
        return kinds.spec(self.kind)

    def unsigned(self) -> SymmetryGroup:
        """A copy whose members all have sign +1 (sums of magnitudes)."""
        return replace(self, members=tuple(replace(m, sign=1) for m in self.members))

    def invalidated(self, reason: str) -> SymmetryGroup:
        """A copy marked invalid with a reason."""
        return replace(self, valid=False, reason=reason)


def groups_to_json(groups: Iterable[SymmetryGroup]) -> str:
    """Serialises groups to a JSON string, keys sorted so that equal groups give equal text
    (a group rebuilt from groups.json and a freshly verified one, for instance)."""
    return json.dumps([g.to_dict() for g in groups], sort_keys=True)


def groups_from_json(text: str) -> list[SymmetryGroup]:
    """Parses `groups_to_json` output."""
    return [SymmetryGroup.from_dict(d) for d in json.loads(text)]


def group_sum(tensors: Mapping[str, torch.Tensor], group: SymmetryGroup) -> torch.Tensor:
    """Signed per-group sum of elementwise tensors (torch), accumulated in float64.

    Args:
        tensors: parameter name -> tensor shaped like that parameter (e.g. theta * theta).
        group: the groups to reduce into.

    Returns:
        float64 tensor [group.size]: sum over each group's elements, with the members' signs.
    """
    return Reducer([group], {m.param: tensors[m.param].ndim for m in group.members})(tensors)


def _member_reduce_numpy(x: np.ndarray, member: Member, lead: int) -> np.ndarray:
    """Sums `x` [*lead_shape, *param_shape] into the member's groups [*lead_shape, n]."""
    if member.dim is None:
        return x.reshape(*x.shape[:lead], -1).sum(axis=-1)[..., None]
    ndim = x.ndim - lead
    dim = lead + member.dim % ndim
    other = tuple(d for d in range(lead, x.ndim) if d != dim)
    per_slice = x.sum(axis=other) if other else x  # [*lead, x.shape[dim]]
    if member.block == 1:
        return per_slice
    return per_slice.reshape(*per_slice.shape[:-1], -1, member.block).sum(axis=-1)


def group_sum_np(
    arrays: Mapping[str, np.ndarray], group: SymmetryGroup, lead: int = 0
) -> np.ndarray:
    """Signed per-group sum of elementwise arrays (numpy), keeping leading axes.

    Args:
        arrays: parameter name -> array shaped [*lead_shape, *param_shape].
        group: the groups to reduce into.
        lead: number of leading axes to keep (1 for a step axis).

    Returns:
        Array [*lead_shape, group.size] in float64.
    """
    first = np.asarray(arrays[group.members[0].param])
    out = np.zeros((*first.shape[:lead], group.size), dtype=np.float64)
    for m in group.members:
        part = _member_reduce_numpy(np.asarray(arrays[m.param], dtype=np.float64), m, lead)
        out[..., m.offset : m.offset + part.shape[-1]] += m.sign * part
    return out


@dataclass(frozen=True)
class _SquarePart:
    """One torch reduction of `Reducer.squares`, over one tensor or a stack of same-shaped ones.

    Attributes:
        op: "ident" (1-d member kept whole), "all" (dim None), "rows" (kept axis first): norms,
            squared afterwards; "cols" (2-d, kept axis 1), "sum" (other): sums of squares;
            "rowcol": one parameter kept by rows and by axis `dim` (two members), sums of
            squares of both from one pass.
        names: parameter names, stacked on a new leading axis when more than one.
        nd: number of dimensions of the parameters.
        dim: the kept axis (None for "all").
    """

    op: str
    names: tuple[str, ...]
    nd: int
    dim: int | None


@dataclass
class _SquarePlan:
    """The reductions of `Reducer.squares` for given shapes and where their slices go.

    Attributes:
        parts: the reductions, in the order of their slices.
        index: group entry of every slice [S].
        norm_sign: float64 [S]: the slice's sign where it is a norm (to be squared), else 0.
        sum_sign: float64 [S]: the slice's sign where it is a sum of squares, else 0.
        zeros: float64 zeros [total] (the scatter's base, never written).
    """

    parts: list[_SquarePart]
    index: torch.Tensor
    norm_sign: torch.Tensor
    sum_sign: torch.Tensor
    zeros: torch.Tensor


class Reducer:
    """Signed per-group sums of elementwise products (or squares) for the groups of a bundle.

    ``reducer(products)`` equals ``torch.cat([group_sum(x, g) for g in groups])`` (tested
    against `Utils.groups.group_sum`), also for inputs with one leading axis [L, *param_shape]
    (L stacked products sharing each reduction). ``reducer.squares(values)`` gives the same
    for ``x * x`` with as few torch calls as possible, because on small layers the cost is per
    call: a member whose kept axis leads is a row-wise `vector_norm` (squared afterwards), a 1-d member kept whole needs no call, and same-shaped
    small matrices are stacked so that one reduction serves all of them (rows and columns
    share the stack).

    Every input is cast to float64 before it is reduced (float32 sums of large layers are off
    by 1e-8..3e-8 relative). The slices of all members are concatenated, signed (and squared where
    they are norms) by one ``addcmul`` and one ``mul``, and scattered into the groups' entries
    by one ``index_add`` (offsets and blocks are encoded in the index, built once per
    parameter shapes). Sums over leading and trailing axes reduce the leading axes first: a
    contiguous, vectorised CPU reduction, several times faster than summing all at once.

    Args:
        groups: the groups, in bundle order.
        ndims: parameter name -> number of dimensions of the parameter.
    """

    def __init__(self, groups: Sequence[SymmetryGroup], ndims: Mapping[str, int]) -> None:
        self.groups = list(groups)
        self.members = []  # (name, nd, dim, block, entry of the first slice, sign)
        start = 0
        for g in self.groups:
            for m in g.members:
                nd = ndims[m.param]
                dim = None if m.dim is None else m.dim % nd
                self.members.append((m.param, nd, dim, m.block, start + m.offset, float(m.sign)))
            start += g.size
        self.total = start
        self.names = list(dict.fromkeys(m[0] for m in self.members))
        self._layouts: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._plans: dict[tuple, _SquarePlan] = {}
        self._buffer = None  # float64 scratch of `square_sums`

    def __call__(self, products: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Reduces {name: [*lead, *shape]} (lead: none or one axis) to float64 [*lead, total]."""
        import torch  # lazily: see the module docstring

        parts = []
        for n, nd, dim, *_ in self.members:
            x = products[n]  # [*lead, *shape]
            if x.ndim == nd:  # no leading axis: float64 chunks along the first axis
                combine = "cat" if dim == 0 else "sum"
                parts.append(_wide(x, lambda c, nd=nd, dim=dim: _sum_member(c, nd, dim), combine))
            else:
                parts.append(_sum_member(x.to(torch.float64), nd, dim))
        return self._scatter(parts)

    def square_sums(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Group sums of ``x * x`` for {name: [L, *shape]} (one leading axis): float64 [L, total].

        Each parameter is squared once, in float64 (exact for float32 inputs), on chunks of
        the leading axis in a reused float64 buffer (cache-sized; a fresh large tensor would
        cost page faults; a 1-d member's squares are copied out of it), and every member of it
        is reduced from that chunk: the number of
        torch calls does not grow with L. Each entry's sums do not depend on L (tested).
        """
        import torch  # lazily: see the module docstring

        of_name: dict[str, list[int]] = {}
        for i, m in enumerate(self.members):
            of_name.setdefault(m[0], []).append(i)
        parts: list = [None] * len(self.members)
        for name, indices in of_name.items():
            x = values[name]  # [L, *shape]
            rows = max(1, _SQUARE_CHUNK // max(1, x[0].numel()))
            sums: dict[int, list] = {i: [] for i in indices}
            for chunk in x.split(rows):
                sq = self._scratch(chunk).copy_(chunk).square_()  # float64 [l, *shape]
                for i in indices:
                    nd, dim = self.members[i][1:3]
                    out = _sum_member(sq, nd, dim)  # [l, slices]
                    sums[i].append(out.clone() if nd == 1 and dim is not None else out)
            for i in indices:
                parts[i] = sums[i][0] if len(sums[i]) == 1 else torch.cat(sums[i])
        return self._scatter(parts)

    def fused_plan(self, shapes: Mapping[str, Sequence[int]], names: Sequence[str]):
        """A `Utils.fastsums.SlicePlan` of the squares of these groups: its ``squares(tensors)``
        (tensors in `names` order, CPU float32/float64: `Utils.fastsums.usable`) gives the
        group sums of ``x * x``, float64 [1, total], by fused kernels that read each tensor
        once; equal to `squares` up to the order of the float64 additions."""
        from Utils import fastsums

        shapes = {n: tuple(shapes[n]) for n in self.names}
        sizes = [1 if m[2] is None else (shapes[m[0]] or (1,))[m[2]] for m in self.members]
        index, _ = self._entries(self.members, sizes)
        members, start = [], 0
        for m, size in zip(self.members, sizes):
            members.append((m[0], shapes[m[0]], m[2], index[start : start + size], m[5]))
            start += size
        return fastsums.SlicePlan(members, 1, names, self.total)

    def _scratch(self, like: torch.Tensor) -> torch.Tensor:
        """The reused float64 buffer of `square_sums`, viewed with the shape of `like`."""
        import torch  # lazily: see the module docstring

        n = like.numel()
        buf = self._buffer
        if buf is None or buf.numel() < n or buf.device != like.device:
            size = max(n, _SQUARE_CHUNK)
            buf = self._buffer = torch.empty(size, dtype=torch.float64, device=like.device)
        return buf[:n].view(like.shape)

    def _scatter(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Signed sum of the members' per-slice sums [*lead, slices] into the group entries."""
        import torch  # lazily: see the module docstring

        flat = torch.cat(parts, dim=-1)  # float64 [*lead, slices of all members]
        sizes = tuple(p.shape[-1] for p in parts)
        key = (sizes, flat.device)
        if key not in self._layouts:
            index, sign = self._entries(self.members, sizes)
            self._layouts[key] = (
                torch.tensor(index, dtype=torch.long, device=flat.device),
                torch.tensor(sign, dtype=torch.float64, device=flat.device),
            )
        index, sign = self._layouts[key]
        out = flat.new_zeros(*flat.shape[:-1], self.total)  # [*lead, total]
        return out.index_add_(-1, index, flat * sign)

    def squares(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Group sums of ``x * x`` for {name: [*shape]} (no leading axis): float64 [total]."""
        import torch  # lazily: see the module docstring

        device = values[self.names[0]].device
        key = (tuple(values[n].shape for n in self.names), device)
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = self._plan({n: values[n].shape for n in self.names}, device)
        stacks: dict[tuple[str, ...], torch.Tensor] = {}
        outs = []
        for part in plan.parts:
            if len(part.names) > 1:
                x = stacks.get(part.names)
                if x is None:
                    x = stacks[part.names] = torch.stack([values[n] for n in part.names])
            else:
                x = values[part.names[0]]  # [*shape] or stacked [P, *shape]
            # every reduction runs on float64 chunks (accumulated in float64 for any dtype)
            stacked = len(part.names) > 1
            if part.op == "rowcol":
                out = _rows_and_columns(x, part.dim)  # [shape[0] + shape[dim]]
            elif part.op == "ident":
                out = x.to(torch.float64)  # [slices]
            elif part.op == "all":
                total = _wide(x, lambda c: c.square().sum().reshape(1), "sum")  # [1]
                out = torch.sqrt(total)  # a norm, squared below
            elif part.op == "rows":
                rows = x if part.nd == 2 else x.reshape(x.shape[0], -1)  # [(P,) slices, rest]
                out = _wide(rows, lambda c: torch.linalg.vector_norm(c, dim=-1), "cat")
            elif part.op == "cols":
                out = _wide(x, lambda c: c.square().sum(dim=-2), "cat" if stacked else "sum")
            else:
                kept = x.shape[part.dim]
                after = math.prod(x.shape[part.dim + 1 :])
                flat = x.reshape(-1, kept * after)  # [before, kept * after]
                cells = _wide(flat, lambda c: c.square().sum(dim=0), "sum")  # [kept * after]
                out = cells.reshape(kept, after).sum(dim=1)  # [slices]
            outs.append(out.reshape(-1) if out.ndim > 1 else out)
        flat = torch.cat(outs)  # float64 [S]
        # sign * norm^2 for norms, sign * sum for sums: flat * (flat * norm_sign + sum_sign)
        signed = torch.addcmul(plan.sum_sign, flat, plan.norm_sign).mul_(flat)  # [S]
        return torch.index_add(plan.zeros, 0, plan.index, signed)  # [total]

    def _plan(self, shapes: Mapping[str, torch.Size], device: torch.device) -> _SquarePlan:
        """The reductions of `squares` for these parameter shapes."""
        import torch  # lazily: see the module docstring

        order = {n: i for i, n in enumerate(self.names)}
        batches: dict[tuple, list[tuple]] = {}  # (op, shape or a unique key) -> members
        for i, m in enumerate(self.members):
            name, nd, dim = m[:3]
            shape = tuple(shapes[name])
            if dim is None:
                op = "all"
            elif nd == 1:
                op = "ident"
            elif dim == 0:
                op = "rows"
            else:
                op = "cols" if nd == 2 else "sum"
            small = op in ("rows", "cols") and nd == 2 and math.prod(shape) <= _STACK_LIMIT
            batches.setdefault((op, shape) if small else (op, i), []).append(m)
        # a parameter reduced both by rows (its own units) and by another axis (the units of
        # the layer before it): one pass over one float64 copy serves both ("rowcol")
        single = {k: ms[0] for k, ms in batches.items() if len(ms) == 1}
        rows_of = {m[0]: k for k, m in single.items() if k[0] == "rows"}
        for key, m in list(single.items()):
            if key[0] in ("cols", "sum") and m[0] in rows_of and rows_of[m[0]] in batches:
                row_member = batches.pop(rows_of.pop(m[0]))[0]
                del batches[key]
                batches[("rowcol", key[1])] = [row_member, m]
        parts, members, sizes, norm = [], [], [], []
        for (op, _), ms in batches.items():
            if op == "rowcol":
                (name, nd, _), col_dim = ms[0][:3], ms[1][2]
                parts.append(_SquarePart(op, (name,), nd, col_dim))
                for m in ms:
                    members.append(m)
                    sizes.append(shapes[name][m[2]])
                    norm += [False] * sizes[-1]
                continue
            ms = sorted(ms, key=lambda m: order[m[0]])  # same order -> shared stacks
            name, nd, dim = ms[0][:3]
            parts.append(_SquarePart(op, tuple(m[0] for m in ms), nd, dim))
            for m in ms:
                members.append(m)
                sizes.append(1 if dim is None else shapes[m[0]][dim])
                norm += [op in ("ident", "all", "rows")] * sizes[-1]
        index, sign = self._entries(members, sizes)
        as_norm = torch.tensor(norm, device=device)  # [S] bool

        def f64(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.float64, device=device)

        return _SquarePlan(
            parts=parts,
            index=torch.tensor(index, dtype=torch.long, device=device),
            norm_sign=torch.where(as_norm, f64(sign), 0.0),
            sum_sign=torch.where(as_norm, 0.0, f64(sign)),
            zeros=torch.zeros(self.total, dtype=torch.float64, device=device),
        )

    @staticmethod
    def _entries(members: Sequence[tuple], sizes: Sequence[int]) -> tuple[list[int], list[float]]:
        """Group entry and sign of every slice of the members (slice counts in `sizes`)."""
        index: list[int] = []
        sign: list[float] = []
        for (_, _, _, block, first, s), n in zip(members, sizes):
            index += [first + j // block for j in range(n)]
            sign += [s] * n
        return index, sign


def _rows_and_columns(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Sums of squares of x [*shape] per index of axis 0 and per index of axis `dim` >= 1.

    Returns:
        float64 [shape[0] + shape[dim]]: the row sums, then the `dim` sums, accumulated in
        float64 on cache-sized chunks along axis 0.
    """
    import torch  # lazily: see the module docstring

    kept, after = x.shape[dim], math.prod(x.shape[dim + 1 :])
    flat = x.reshape(x.shape[0], -1)  # [rows, rest]
    step = max(1, _CHUNK // max(1, flat.shape[1]))
    rows, cells = [], None
    for chunk in flat.split(step):
        sq = chunk.to(torch.float64).square_() if chunk.dtype != torch.float64 else chunk.square()
        rows.append(sq.sum(dim=1))  # [k]
        part = sq.reshape(-1, kept * after).sum(dim=0)  # [kept * after]
        cells = part if cells is None else cells.add_(part)
    columns = cells.reshape(kept, after).sum(dim=1)  # [kept]
    return torch.cat([*rows, columns])


def _wide(x: torch.Tensor, fn, combine: str) -> torch.Tensor:
    """``fn(x in float64)`` computed on chunks along axis 0, combined by "cat" or "sum".

    A float32 tensor is cast chunk by chunk (at most `_CHUNK` elements each), so that the
    float64 temporary stays in cache: float64 accumulation at a fraction of the cost of
    casting the whole tensor first.
    """
    import torch  # lazily: see the module docstring

    if x.dtype == torch.float64 or x.ndim == 0 or x.numel() <= _CHUNK or x.shape[0] == 1:
        return fn(x.to(torch.float64))
    rows = max(1, _CHUNK // max(1, x.numel() // x.shape[0]))
    parts = [fn(c.to(torch.float64)) for c in x.split(rows)]
    if combine == "cat":
        return torch.cat(parts)
    return torch.stack(parts).sum(dim=0)


def _sum_member(x: torch.Tensor, nd: int, dim: int | None) -> torch.Tensor:
    """Sum of x over its last `nd` axes but `dim`, keeping one leading axis if any.

    Args:
        x: [*lead, *shape] with ``len(shape) == nd``.
        nd: number of parameter axes.
        dim: the kept parameter axis (non-negative), or None to sum everything.

    Returns:
        [*lead, shape[dim]], or [*lead, 1] when dim is None.
    """
    lead = x.shape[: x.ndim - nd]
    if dim is None:
        # rows first: each leading entry's total then does not depend on how many entries
        # are reduced at once (a single large total is split across threads)
        x = x.reshape(*lead, x.shape[x.ndim - nd], -1) if nd > 1 else x  # [*lead, rows, rest]
        return x.sum(dim=-1).sum(dim=-1, keepdim=True) if nd > 1 else x.sum(-1, keepdim=True)
    if nd == 1:
        return x  # [*lead, slices]
    if nd == 2:
        return x.sum(dim=-1 if dim == 0 else -2)  # [*lead, slices]
    shape = x.shape[x.ndim - nd :]
    before, kept, after = math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :])
    x = x.reshape(*lead, before, kept, after)  # [*lead, before, kept, after]
    if before > 1:
        x = x.sum(dim=-3)  # [*lead, kept, after]
    else:
        x = x.squeeze(-3)  # [*lead, kept, after]
    return x.sum(dim=-1) if after > 1 else x.squeeze(-1)  # [*lead, kept]
