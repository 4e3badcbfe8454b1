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
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import torch

KINDS = ("translation", "scale", "rescale")


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
        kind: "translation", "scale" or "rescale".
        name: layer key, e.g. ``classifier`` or ``features.0->features.3``.
        size: number of groups (neurons).
        members: the parameters and how they split into groups.
        violation: max over groups of |<g_A, c_A>| / (|g_A| |c_A|) measured on a batch.
        valid: whether the theory applies (constraint holds, same hyperparameters).
        reason: why the group is not valid, empty otherwise.
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

    def invalidated(self, reason: str) -> SymmetryGroup:
        """A copy marked invalid with a reason."""
        return replace(self, valid=False, reason=reason)


def groups_to_json(groups: Iterable[SymmetryGroup]) -> str:
    """Serialises groups to a JSON string."""
    return json.dumps([g.to_dict() for g in groups])


def groups_from_json(text: str) -> list[SymmetryGroup]:
    """Parses `groups_to_json` output."""
    return [SymmetryGroup.from_dict(d) for d in json.loads(text)]


def _member_reduce_torch(x: torch.Tensor, member: Member) -> torch.Tensor:
    """Sums `x` (shaped like the member's parameter) into that member's groups.

    Returns:
        Tensor [n] with n = x.shape[dim] // block (or [1] when dim is None).
    """
    if member.dim is None:
        return x.sum().reshape(1)
    dim = member.dim % x.ndim
    other = [d for d in range(x.ndim) if d != dim]
    per_slice = x.sum(dim=other) if other else x  # [x.shape[dim]]
    if member.block == 1:
        return per_slice
    return per_slice.reshape(-1, member.block).sum(dim=1)  # [n]


def group_sum(tensors: Mapping[str, torch.Tensor], group: SymmetryGroup) -> torch.Tensor:
    """Signed per-group sum of elementwise tensors (torch).

    Args:
        tensors: parameter name -> tensor shaped like that parameter (e.g. theta * theta).
        group: the groups to reduce into.

    Returns:
        Tensor [group.size] in the dtype of the inputs: sum over each group's elements,
        with the members' signs applied.
    """
    first = tensors[group.members[0].param]
    out = torch.zeros(group.size, dtype=first.dtype, device=first.device)
    for m in group.members:
        part = _member_reduce_torch(tensors[m.param], m)
        if m.sign < 0:
            part = -part
        out[m.offset : m.offset + part.numel()] += part
    return out


def _member_reduce_numpy(x: np.ndarray, member: Member, lead: int) -> np.ndarray:
    """Numpy twin of `_member_reduce_torch` with `lead` leading (e.g. step) axes kept."""
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


def group_index(
    group: SymmetryGroup, shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, np.ndarray]:
    """For each member parameter, the group index of every element (-1: in no group).

    Used by slow reference implementations and by plotting of individual neurons.

    Args:
        group: the groups.
        shapes: parameter name -> shape.

    Returns:
        name -> int array shaped like the parameter. A parameter that appears in several
        members of one group keeps the last member's index.
    """
    out: dict[str, np.ndarray] = {}
    for m in group.members:
        shape = tuple(shapes[m.param])
        if m.dim is None:
            idx = np.full(shape, m.offset, dtype=np.int64)
        else:
            dim = m.dim % len(shape)
            along = np.arange(shape[dim]) // m.block + m.offset
            view = [1] * len(shape)
            view[dim] = shape[dim]
            idx = np.broadcast_to(along.reshape(view), shape).copy()
        out[m.param] = idx
    return out
