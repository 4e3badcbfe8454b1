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
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

from Utils.errors import CorruptFileError, UsageError
from Utils.groups import Member, SymmetryGroup, group_sum, groups_from_json, groups_to_json
from Utils.kinds import FAMILIES, spec

BUDGET_VERSION = 1
TERMS = ("decay", "leak", "kinetic", "discretisation")
SCALE_FIELDS = ("angle_sum", "grad_sq_sum", "angle")
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


class _Plan:
    """Signed per-group sums of all groups of one kind class at once ([total] float64).

    Each member is reduced to its per-slice sums on its [before, kept, after] view (a row-wise
    ``vecdot`` when the group axis leads, no temporary; a column sum when it is last), all
    slices are concatenated, cast to float64, signed and scattered into the groups' entries with
    one ``index_add`` (few torch calls per step: on small layers the cost is per call).

    Args:
        groups: the groups, in entry order.
        shapes: parameter name -> shape.
        device: where the index lives.
    """

    def __init__(self, groups: Sequence[SymmetryGroup], shapes, device) -> None:
        self.groups = list(groups)
        self.sizes = [g.size for g in self.groups]
        self.total = sum(self.sizes)
        self.members: list[Member] = []
        self.is_scale: list[bool] = []
        self.zeros: list[torch.Tensor] = []
        index: list[int] = []
        sign: list[float] = []
        start = 0
        for g in self.groups:
            for m in g.members:
                shape = shapes[m.param]
                slices = 1 if m.dim is None else shape[m.dim % len(shape)]
                self.members.append(m)
                self.is_scale.append(g.kind == "scale")
                self.zeros.append(torch.zeros(slices, device=device))
                index += [start + m.offset + j // m.block for j in range(slices)]
                sign += [float(m.sign)] * slices
            start += g.size
        self.index = torch.tensor(index, dtype=torch.long, device=device)
        self.sign = torch.tensor(sign, dtype=torch.float64, device=device)
        self.names = list(dict.fromkeys(m.param for m in self.members))

    def _scatter(self, parts: list[torch.Tensor]) -> torch.Tensor:
        flat = torch.cat(parts).to(torch.float64).mul_(self.sign)  # [slices] (cat copies)
        out = torch.zeros(self.total, dtype=torch.float64, device=flat.device)
        return out.index_add_(0, self.index, flat)  # [total]

    def views(self, a: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """The [before, kept, after] view of every member of tensors shaped like the params."""
        return [_member_view(a[m.param], m) for m in self.members]

    def dot(
        self, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], scale_only: bool = False
    ) -> torch.Tensor:
        """Signed group sums of a * b from member views (`views`): float64 [total].

        Args:
            a, b: member views.
            scale_only: compute only the members of scale groups (zeros elsewhere).
        """
        parts = []
        for i, (x, y) in enumerate(zip(a, b)):
            if scale_only and not self.is_scale[i]:
                parts.append(self.zeros[i])
            else:
                parts.append(_slice_dot(x, y))
        return self._scatter(parts)

    def sum(self, a: Sequence[torch.Tensor]) -> torch.Tensor:
        """Signed group sums of a from member views (`views`): float64 [total]."""
        return self._scatter([_slice_sum(x) for x in a])

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Per-group views of a [total] vector."""
        return list(torch.split(flat, self.sizes))


class BudgetTracker:
    """Carries the symmetry-breaking budget of every valid group through an optimizer's steps.

    Args:
        optimizer: any torch optimizer whose ``step()`` is called without a closure.
        named_params: ``(name, parameter)`` pairs of the model (the names the groups use).
        groups: symmetry groups; invalid ones and those with a parameter the optimizer does
            not hold or in param groups with different lr/weight_decay are not tracked
            (`skipped` says why).

    Attributes:
        groups: the tracked groups.
        skipped: key -> reason for the groups not tracked.
        step: steps observed.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_params: Iterable[tuple[str, torch.Tensor]],
        groups: Sequence[SymmetryGroup],
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
        self._saved: dict | None = None
        self._theta: dict[str, torch.Tensor] = {}
        self._delta: dict[str, torch.Tensor] = {}
        self._view_cache: dict[tuple, tuple] = {}
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
        """Packs the per-group state into one flat vector per field and kind class."""
        shapes = {n: tuple(p.shape) for n, p in self._by_name.items()}
        self._plans: dict[str, _Plan] = {}
        self._view_cache = {}
        self._flat: dict[str, dict[str, torch.Tensor]] = {}
        for cls in FAMILIES:
            gs = [g for g in self.groups if family(g.kind) == cls]
            if not gs:
                continue
            device = self._by_name[gs[0].params[0]].device
            self._plans[cls] = _Plan(gs, shapes, device)
            names = ("initial", *TERMS, *(SCALE_FIELDS if cls == "quadratic" else ()))
            flat = {}
            for f in names:
                parts = [
                    state[g.key][f] if f in state[g.key] else torch.zeros(g.size).to(device)
                    for g in gs
                ]
                flat[f] = torch.cat([t.to(device=device, dtype=torch.float64) for t in parts])
            self._flat[cls] = flat

    @property
    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """key -> field -> float64 [size] views of the live state."""
        out: dict[str, dict[str, torch.Tensor]] = {}
        for cls, plan in self._plans.items():
            views = {f: plan.split(t) for f, t in self._flat[cls].items()}
            for i, g in enumerate(plan.groups):
                out[g.key] = {f: views[f][i] for f in fields_of(g.kind)}
        return out

    def remove(self) -> None:
        """Detaches the hooks (the state stays readable)."""
        self._pre.remove()
        self._post.remove()

    # ------------------------------------------------------------------ hooks

    def _views(self, cls: str, which: str, tensors: Mapping[str, torch.Tensor]) -> list:
        """Member views of a persistent buffer set (theta or delta), cached while it lives."""
        plan = self._plans[cls]
        key = (cls, which)
        ids = tuple(id(tensors[m.param]) for m in plan.members)
        cached = self._view_cache.get(key)
        if cached is None or cached[0] != ids:
            cached = self._view_cache[key] = (ids, plan.views(tensors))
        return cached[1]

    def _rates(self, plan: _Plan) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """eta and eta * lam of a plan: floats when all its groups share them, else float64
        per entry [total]."""
        hypers = [self._hyper(self._pg_of[g.members[0].param]) for g in plan.groups]
        if len(set(hypers)) == 1:
            lr, wd = hypers[0]
            return lr, lr * wd
        lrs = [lr for (lr, _), n in zip(hypers, plan.sizes) for _ in range(n)]
        lwds = [lr * wd for (lr, wd), n in zip(hypers, plan.sizes) for _ in range(n)]
        device = plan.index.device
        return (
            torch.tensor(lrs, dtype=torch.float64, device=device),
            torch.tensor(lwds, dtype=torch.float64, device=device),
        )

    def _before(self, optimizer, args, kwargs) -> None:
        """Keeps theta_k and the group sums that need g_k or theta_k only."""
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)  # args[0]: self
        if closure is not None:
            raise UsageError(
                f"budget: {type(optimizer).__name__}.step() was called with a closure, so the "
                "update of the observed gradient cannot be seen; call loss.backward() before "
                "step() without a closure, or track no budget"
            )
        no_grad = {}
        for g in self.groups:
            missing = [n for n in g.params if self._by_name[n].grad is None]
            if missing:
                no_grad[g.key] = f"'{missing[0]}' had no gradient at step {self.step}"
        if no_grad:
            self._drop(no_grad)
        names = list(dict.fromkeys(n for plan in self._plans.values() for n in plan.names))
        params = [self._by_name[n].detach() for n in names]
        theta = dict(zip(names, _buffers(self._theta, names, params)))  # theta_k, persistent
        torch._foreach_copy_(list(theta.values()), params)
        grad = {n: self._by_name[n].grad.detach() for n in names}
        sums, views = {}, {}
        for cls, plan in self._plans.items():
            lr, lwd = self._rates(plan)
            vt, vg = self._views(cls, "theta", theta), plan.views(grad)
            views[cls] = vt
            if cls == "translation":
                sums[cls] = (lr, lwd, plan.sum(vt), plan.sum(vg), None)
            else:
                base, tg = plan.dot(vt, vt), plan.dot(vt, vg)
                sums[cls] = (lr, lwd, base, tg, plan.dot(vg, vg, scale_only=True))
        self._saved = {"theta": theta, "sums": sums, "views": views}

    def _after(self, optimizer, args, kwargs) -> None:
        """Adds this step's terms to the cumulative sums."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        theta = saved["theta"]
        with torch.no_grad():
            names = list(theta)
            params = [self._by_name[n].detach() for n in names]
            # Delta_k = theta_{k+1} - theta_k [*shape], in persistent buffers
            delta = dict(zip(names, _buffers(self._delta, names, params)))
            torch._foreach_copy_(list(delta.values()), params)
            torch._foreach_sub_(list(delta.values()), list(theta.values()))
            for cls, plan in self._plans.items():
                lr, lwd, base, tg, gsq = saved["sums"][cls]
                flat = self._flat[cls]
                vd = self._views(cls, "delta", delta)
                if cls == "translation":
                    terms = step_terms(1.0, lr, lwd, base, tg, plan.sum(vd), None)
                else:
                    vt = saved["views"][cls]
                    td, dd = plan.dot(vt, vd), plan.dot(vd, vd)
                    terms = step_terms(2.0, lr, lwd, base, tg, td, dd)
                    a = angle(base, td, dd)
                    flat["angle"].copy_(a)
                    flat["angle_sum"].add_(a)
                    flat["grad_sq_sum"].add_(gsq)
                for name, value in terms.items():
                    flat[name].add_(value)
        self.step += 1

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
        """Restores a `state_dict` exactly (bitwise resumption).

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


def _buffers(
    store: dict[str, torch.Tensor], names: Sequence[str], like: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Persistent tensors shaped like `like` (made once, reused every step: no allocation)."""
    out = []
    for n, p in zip(names, like):
        buf = store.get(n)
        if buf is None or buf.shape != p.shape or buf.dtype != p.dtype or buf.device != p.device:
            buf = store[n] = torch.empty_like(p)
        out.append(buf)
    return out


def _slice_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-slice <x, y> of [before, kept, after] views: [kept], the fastest CPU/GPU path."""
    if x.shape[0] == 1:
        return torch.linalg.vecdot(x[0], y[0])  # rows: no temporary
    if x.shape[2] == 1:
        return (x[..., 0] * y[..., 0]).sum(dim=0)  # columns
    return (x * y).sum(dim=(0, 2))


def _slice_sum(x: torch.Tensor) -> torch.Tensor:
    """Per-slice sum of a [before, kept, after] view: [kept]."""
    if x.shape[0] == 1:
        return x[0].sum(dim=1)
    if x.shape[2] == 1:
        return x[..., 0].sum(dim=0)
    return x.sum(dim=(0, 2))


def _member_view(x: torch.Tensor, member: Member) -> torch.Tensor:
    """x as [before, kept, after] around the member's group axis (dim None: [1, 1, all])."""
    if member.dim is None:
        return x.reshape(1, 1, -1)
    dim = member.dim % x.ndim
    shape = x.shape
    return x.reshape(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]))


def group_dot(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], group: SymmetryGroup
) -> torch.Tensor:
    """Signed per-group <a, b> (`Utils.groups.group_sum` of a * b without forming it).

    Returns:
        float64 [group.size].
    """
    plan = _Plan([group], {n: tuple(t.shape) for n, t in a.items()}, a[group.params[0]].device)
    return plan.dot(plan.views(a), plan.views(b))


def group_total(a: Mapping[str, torch.Tensor], group: SymmetryGroup) -> torch.Tensor:
    """Signed per-group sum of a (`Utils.groups.group_sum`), float64 [group.size]."""
    plan = _Plan([group], {n: tuple(t.shape) for n, t in a.items()}, a[group.params[0]].device)
    return plan.sum(plan.views(a))


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
