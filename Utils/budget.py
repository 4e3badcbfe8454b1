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
from Utils.groups import KINDS as KINDS_ALL
from Utils.groups import Member, SymmetryGroup, group_sum, groups_from_json, groups_to_json

BUDGET_VERSION = 1
TERMS = ("decay", "leak", "kinetic", "discretisation")
SCALE_FIELDS = ("angle_sum", "grad_sq_sum", "angle")
FIELD_PREFIX = "budget_"  # prefix of the fields in features.h5 (theory/<key>/budget_<field>)


def fields_of(kind: str) -> tuple[str, ...]:
    """The state fields of a group of this kind."""
    return ("initial", *TERMS, *(SCALE_FIELDS if kind == "scale" else ()))


def step_terms(
    kind: str,
    lr: float,
    weight_decay: float,
    base: torch.Tensor,
    theta_grad: torch.Tensor,
    theta_delta: torch.Tensor,
    delta_sq: torch.Tensor | None,
) -> dict[str, torch.Tensor]:
    """The four budget terms of one step from its float64 group sums.

    Args:
        kind: "translation", "scale" or "rescale".
        lr: eta_k.
        weight_decay: lam.
        base: Q_k (scale, rescale) or S_k (translation) [n].
        theta_grad: <theta_k, g_k> (translation: <1, g_k>) [n].
        theta_delta: <theta_k, Delta_k> (translation: <1, Delta_k>) [n].
        delta_sq: |Delta_k|^2 [n] (None for translation).

    Returns:
        term name -> [n]; they sum to the change of the quantity (the identity).
    """
    if kind == "translation":
        decay = base * (-lr * weight_decay)
        leak = theta_grad * -lr
        kinetic = theta_delta - decay - leak
        return {
            "decay": decay,
            "leak": leak,
            "kinetic": kinetic,
            "discretisation": torch.zeros_like(base),
        }
    decay = base * (-2.0 * lr * weight_decay)
    leak = theta_grad * (-2.0 * lr)
    kinetic = 2.0 * theta_delta - decay - leak
    return {"decay": decay, "leak": leak, "kinetic": kinetic, "discretisation": delta_sq}


def angle(q: torch.Tensor, theta_delta: torch.Tensor, delta_sq: torch.Tensor) -> torch.Tensor:
    """Angle between theta_k and theta_{k+1} = theta_k + Delta_k per group, radians.

    ``atan2(sqrt(Q |Delta|^2 - <theta, Delta>^2), Q + <theta, Delta>)``: accurate for small
    angles (unlike arccos of the cosine).

    Args:
        q: Q_k [n]; theta_delta: <theta_k, Delta_k> [n]; delta_sq: |Delta_k|^2 [n].
    """
    cross = (q * delta_sq - theta_delta * theta_delta).clamp_min(0.0).sqrt()  # [n]
    return torch.atan2(cross, q + theta_delta)


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
        self.state = {g.key: self._initial(g) for g in self.groups}
        self._saved: dict | None = None
        self._theta: dict[str, torch.Tensor] = {}
        self._delta: dict[str, torch.Tensor] = {}
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
        first = group_sum(wide if g.kind == "translation" else _squares(wide), g)  # [n]
        state = {f: torch.zeros_like(first) for f in fields_of(g.kind)}
        state["initial"] = first
        return state

    def remove(self) -> None:
        """Detaches the hooks (the state stays readable)."""
        self._pre.remove()
        self._post.remove()

    # ------------------------------------------------------------------ hooks

    def _before(self, optimizer, args, kwargs) -> None:
        """Keeps theta_k (float64) and the group sums that need g_k or theta_k only."""
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
        names = _names(self.groups, KINDS_ALL)
        quadratic = _names(self.groups, ("scale", "rescale"))
        params = {n: self._by_name[n].detach() for n in names}
        theta = {}
        for n, p in params.items():  # theta_k, kept in persistent buffers (no allocation)
            buf = self._theta.get(n)
            if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                buf = self._theta[n] = torch.empty_like(p)
            theta[n] = buf.copy_(p)
        grad = {n: self._by_name[n].grad.detach() for n in names}
        sums = {}
        for g in self.groups:
            lr, wd = self._hyper(self._pg_of[g.members[0].param])
            if g.kind == "translation":
                sums[g.key] = (lr, wd, group_total(theta, g), group_total(grad, g), None)
            else:
                gsq = group_dot(grad, grad, g) if g.kind == "scale" else None
                base = group_dot(theta, theta, g)
                sums[g.key] = (lr, wd, base, group_dot(theta, grad, g), gsq)
        self._saved = {"theta": theta, "sums": sums, "quadratic": quadratic}

    def _after(self, optimizer, args, kwargs) -> None:
        """Adds this step's terms to the cumulative sums."""
        saved, self._saved = self._saved, None
        if saved is None:
            return
        theta = saved["theta"]
        with torch.no_grad():
            delta = {}  # Delta_k = theta_{k+1} - theta_k [*shape], in persistent buffers
            for n, t in theta.items():
                p = self._by_name[n].detach()
                buf = self._delta.get(n)
                if buf is None or buf.shape != p.shape or buf.dtype != p.dtype:
                    buf = self._delta[n] = torch.empty_like(p)
                delta[n] = torch.sub(p, t, out=buf)
            for g in self.groups:
                lr, wd, base, tg, gsq = saved["sums"][g.key]
                st = self.state[g.key]
                if g.kind == "translation":
                    terms = step_terms(g.kind, lr, wd, base, tg, group_total(delta, g), None)
                else:
                    td = group_dot(theta, delta, g)
                    dd = group_dot(delta, delta, g)
                    terms = step_terms(g.kind, lr, wd, base, tg, td, dd)
                    if g.kind == "scale":
                        a = angle(base, td, dd)
                        st["angle"] = a
                        st["angle_sum"] = st["angle_sum"] + a
                        st["grad_sq_sum"] = st["grad_sq_sum"] + gsq
                for name, value in terms.items():
                    st[name] = st[name] + value
        self.step += 1

    def _drop(self, reasons: Mapping[str, str]) -> None:
        for key, reason in reasons.items():
            warnings.warn(f"symmetry group {key}: no more budget ({reason})", stacklevel=4)
            self.skipped[key] = reason
            self.state.pop(key, None)
        self.groups = [g for g in self.groups if g.key not in reasons]

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
        state = {}
        for g in groups:
            fields = saved["state"].get(g.key, {})
            missing = [n for n in g.params if n not in self._by_name]
            if missing or set(fields) != set(fields_of(g.kind)):
                raise CorruptFileError(
                    f"checkpoint budget of {g.key} does not fit this model; resume with the "
                    "model and optimizer that wrote it"
                )
            device = self._by_name[g.params[0]].device
            state[g.key] = {f: t.to(device=device, dtype=torch.float64) for f, t in fields.items()}
        held = {id(p): i for i, pg in enumerate(self.optimizer.param_groups) for p in pg["params"]}
        for g in groups:
            reason = self._reason(g, held)
            if reason:
                raise CorruptFileError(f"checkpoint budget of {g.key}: {reason}")
        self.groups = groups
        self.state = state
        self.step = int(saved["step"])

    def snapshot(self) -> dict[str, dict[str, np.ndarray]]:
        """key -> field -> float64 numpy copy of the current state."""
        return {
            k: {f: t.detach().cpu().numpy().copy() for f, t in fs.items()}
            for k, fs in self.state.items()
        }


def _squares(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t * t for n, t in values.items()}


def _member_view(x: torch.Tensor, member: Member) -> torch.Tensor:
    """x as [before, kept, after] around the member's group axis (dim None: [1, 1, all])."""
    if member.dim is None:
        return x.reshape(1, 1, -1)
    dim = member.dim % x.ndim
    shape = x.shape
    return x.reshape(math.prod(shape[:dim]), shape[dim], math.prod(shape[dim + 1 :]))


def _assemble(parts: Sequence[tuple[Member, torch.Tensor]], group: SymmetryGroup) -> torch.Tensor:
    """Per-slice float64 sums of the members into the group's signed entries [size]."""
    out = torch.zeros(group.size, dtype=torch.float64, device=parts[0][1].device)
    for m, per_slice in parts:
        part = per_slice.to(torch.float64)  # [slices]
        if m.block > 1:
            part = part.reshape(-1, m.block).sum(dim=1)  # [n]
        out[m.offset : m.offset + part.numel()] += -part if m.sign < 0 else part
    return out


def group_dot(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], group: SymmetryGroup
) -> torch.Tensor:
    """Signed per-group <a, b>: `Utils.groups.group_sum` of a * b without forming a * b.

    Each member is one ``einsum`` over its [before, kept, after] view (no temporary of the
    parameter's size), accumulated in the tensors' dtype and assembled in float64.

    Returns:
        float64 [group.size].
    """
    parts = []
    for m in group.members:
        x, y = _member_view(a[m.param], m), _member_view(b[m.param], m)
        parts.append((m, torch.einsum("bka,bka->k", x, y)))  # [slices]
    return _assemble(parts, group)


def group_total(a: Mapping[str, torch.Tensor], group: SymmetryGroup) -> torch.Tensor:
    """Signed per-group sum of a (`Utils.groups.group_sum`), float64 [group.size]."""
    return _assemble(
        [(m, _member_view(a[m.param], m).sum(dim=(0, 2))) for m in group.members], group
    )


def _names(groups: Sequence[SymmetryGroup], kinds: Sequence[str]) -> list[str]:
    """The parameters of the groups of these kinds, without repeats."""
    return list(dict.fromkeys(n for g in groups if g.kind in kinds for n in g.params))


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
