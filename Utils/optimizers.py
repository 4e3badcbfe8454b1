"""Optimizers, per-parameter optimizer buffers and the online theory of `TrackingSGD`.

`build_optimizer(name, named_params, ...)` makes any optimizer of the `OPTIMIZERS` registry:

* ``custom_sgd``: `TrackingSGD`, torch.optim.SGD's update (THEORY.md section 1) plus the exact
  (section 3) and the paper's (section 4) predictions of every valid symmetry group;
* ``sgd``, ``momentum`` (momentum required): torch.optim.SGD; ``adam``, ``adamw``,
  ``rms`` (RMSprop): torch's; ``lamb``: `LAMB` (You et al. 2019). adam, adamw and lamb ignore
  momentum/dampening/nesterov (their betas play that role); rms ignores dampening/nesterov.

Buffers (`BUFFERS`) are per-parameter tensors kept in ``optimizer.state[p][name]`` after every
step, so they ride in checkpoints: ``grad`` (g_k), ``update`` (u_k with
theta_{k+1} = theta_k - eta_k u_k), ``grad_norm`` and ``update_norm`` (their elementwise
squares), and, for custom_sgd only, ``sgd`` (J with J_{k+1} = exp(-2 lam dt_k)(J_k + eta_k^2
d_k^2)) and ``mom`` (the forced heavy-ball oscillator per element: X in ``mom``, X' in
``mom_rate``, kicked by 2 eta v^2 / (1 - delta), with the scale/rescale omega^2).

Checkpoint layout of `TrackingSGD.state_dict()` (read as ``ckpt["optimizer"]["theory"]``)::

    {"version": 1,
     "groups": str,              # Utils.groups.groups_to_json of ALL groups (invalid ones too)
     "param_names": [str],       # names in state-dict index order (same as self.param_names)
     "step": int,                # optimizer updates done, k
     "time": {key: float},       # t_k = sum_{j<k} eta_j (1 - delta) per valid group key
     "state": {key: {field: float64 tensor [size]}}}   # valid groups only

with ``key = "<kind>/<name>"`` and fields, all describing the current parameters theta_k:

* ``exact``: THEORY.md section 3 prediction, Q_k (scale, rescale) or S_k (translation);
* ``paper``: section 4 prediction X(t_k) (Q or S); ``paper_rate``: its time derivative;
* ``carry``: <theta_k, v_{k-1}> (translation: <v_{k-1}, 1>), signed for rescale;
* ``initial``: the measured Q_0 or S_0.

The state tensors of one state dict are views of a single float64 vector, so that
`torch.save` writes them as one storage record (a few hundred bytes of zip and pickle
overhead per record otherwise, more than the data of a small group).

Each prediction is compared with the measured quantity of `Utils.theory.measure`:
scale ``Q = group_sum(theta^2)`` (sum over each group's elements), rescale the signed
``group_sum(theta^2) = |theta_A1|^2 - |theta_A2|^2``, translation ``S = group_sum(theta)``.
`TrackingSGD.theory_snapshot()` returns the same fields (plus ``time``) as NumPy arrays.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from Utils import fastsums, theory
from Utils.errors import CorruptFileError, UsageError
from Utils.groups import Reducer, SymmetryGroup, groups_from_json, groups_to_json
from Utils.kinds import KINDS
from Utils.registry import Registry

THEORY_VERSION = 1
THEORY_FIELDS = ("exact", "carry", "paper", "paper_rate", "initial")
STATE_ROWS = THEORY_FIELDS[:4]  # the fields a step changes: rows of a bundle's state matrix
# Deferred group sums (see `_Ring`): a bundle keeps up to RING_STEPS steps of its one step term
# when they fit in RING_BYTES and at least RING_MIN_STEPS fit; otherwise every step
# is reduced at once.
RING_STEPS = 32
RING_MIN_STEPS = 4
RING_BYTES = 1 << 26


@dataclass(frozen=True)
class BufferSpec:
    """A per-parameter optimizer buffer.

    Attributes:
        name: registry name, also the key in ``optimizer.state[p]``.
        description: one line for help texts.
        tracking_only: only custom_sgd can compute it.
        fields: the keys it fills in ``optimizer.state[p]``.
    """

    name: str
    description: str
    tracking_only: bool = False
    fields: tuple[str, ...] = ()


BUFFERS: Registry[BufferSpec] = Registry("buffer")
for _spec in (
    BufferSpec("grad", "last batch gradient g_k", fields=("grad",)),
    BufferSpec("update", "last update u_k (theta_{k+1} = theta_k - lr u_k)", fields=("update",)),
    BufferSpec("grad_norm", "elementwise g_k^2", fields=("grad_norm",)),
    BufferSpec("update_norm", "elementwise u_k^2", fields=("update_norm",)),
    BufferSpec("sgd", "paper's plain-SGD integral J per element", True, ("sgd",)),
    BufferSpec("mom", "paper's forced momentum oscillator per element", True, ("mom", "mom_rate")),
):
    BUFFERS.add(_spec.name, _spec, tracking_only=_spec.tracking_only)

OPTIMIZERS: Registry = Registry("optimizer")


def _check_sgd_hyper(lr: float, momentum: float, dampening: float, wd: float, nesterov: bool):
    """Raises UsageError for hyperparameters torch.optim.SGD refuses."""
    if lr < 0:
        raise UsageError(f"learning rate must be >= 0, got {lr}; pass a non-negative --lr")
    if momentum < 0:
        raise UsageError(f"momentum must be >= 0, got {momentum}; pass a non-negative --momentum")
    if wd < 0:
        raise UsageError(f"weight decay must be >= 0, got {wd}; pass a non-negative --wd")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise UsageError("nesterov needs momentum > 0 and dampening 0; set --momentum or drop it")


@dataclass
class _Bundle:
    """Valid groups of one kind class driven by one param group, stored as flat vectors."""

    kind: str  # the groups' family (Utils.kinds.FAMILIES): "translation" or "quadratic"
    pg: int
    time: float
    groups: list[SymmetryGroup]
    mat: torch.Tensor  # float64 [4, sum of sizes]: rows STATE_ROWS
    initial: torch.Tensor  # float64 [sum of sizes]
    params: list[torch.Tensor]  # the parameters of its groups, without repeats
    names: list[str]  # their names
    first: torch.Tensor  # the first member parameter of the first group
    reducer: Reducer | None = None
    ring: _Ring | None = None

    def field(self, name: str) -> torch.Tensor:
        """One field of THEORY_FIELDS, float64 [sum of sizes] (a view, not a copy)."""
        return self.initial if name == "initial" else self.mat[STATE_ROWS.index(name)]


class _Ring:
    """Deferred theory steps of one quadratic bundle (its squared step term and step matrix).

    A ring keeps up to `steps` steps and applies them in order at its flush. On the CPU with
    numba (`Utils.fastsums`), each step's group sums of its squared term (v_k with momentum,
    d_k without) are taken at once, by a fused float64 kernel that reads each tensor once, and
    only they are kept: the ring holds [steps, n] float64, and any bundle size fits. Elsewhere
    a copy of each step's term is kept (one `torch._foreach_copy_` per step; only when it
    fits in `RING_BYTES`) and `flush` squares the kept terms in float64 and reduces them with
    one leading axis (`Reducer.square_sums`: the same calls for any number of steps): on a
    small model the cost of the per-step group sums is the number of torch calls.

    Either way each step's sums do not depend on how many steps are flushed together (tested),
    so the state is bitwise the same whenever it is read (each read flushes: see
    `TrackingSGD._export_state`).

    Args:
        bundle: the quadratic bundle.
        steps: the number of steps kept (the flush comes when it is full).
    """

    def __init__(self, bundle: _Bundle, steps: int) -> None:
        self.bundle = bundle
        self.steps = steps
        self.fast = _Ring.fused(bundle)
        n = bundle.mat.shape[1]
        if self.fast:
            shapes = {name: p.shape for name, p in zip(bundle.names, bundle.params)}
            self.plan = bundle.reducer.fused_plan(shapes, bundle.names)
            self.sums = np.empty((steps, n))  # float64 [steps, n]
            self.terms = {}
        else:
            self.terms = {  # name -> [steps, *shape], the parameter's dtype
                name: torch.empty(steps, *p.shape, dtype=p.dtype, device=p.device)
                for name, p in zip(bundle.names, bundle.params)
            }
        self.slots = [[t[j] for t in self.terms.values()] for j in range(steps)]
        self.coefs: list[torch.Tensor] = []  # per kept step: float64 [4, 5]

    @staticmethod
    def fused(bundle: _Bundle) -> bool:
        """Whether the bundle's sums are taken by the fused CPU kernels (`Utils.fastsums`)."""
        return (
            bundle.reducer is not None
            and bundle.mat.device.type == "cpu"
            and fastsums.usable(bundle.params)
        )

    @staticmethod
    def capacity(bundle: _Bundle) -> int:
        """Steps a ring of this bundle keeps (0: none, on XLA, for translation or a large
        bundle without the fused kernels)."""
        if bundle.reducer is None or bundle.first.device.type not in ("cpu", "cuda"):
            return 0
        if _Ring.fused(bundle):
            return RING_STEPS
        per_step = sum(p.numel() * p.element_size() for p in bundle.params)
        steps = min(RING_STEPS, RING_BYTES // max(per_step, 1))
        return steps if steps >= RING_MIN_STEPS else 0

    def push(self, term: Sequence[torch.Tensor], coef: torch.Tensor) -> None:
        """Keeps one step: its term (a tensor per bundle parameter) and its step matrix."""
        j = len(self.coefs)
        if self.fast:
            self.plan.squares(term, self.sums[j : j + 1])
        else:
            torch._foreach_copy_(self.slots[j], list(term))
        self.coefs.append(coef)
        if len(self.coefs) == self.steps:
            self.flush()

    def flush(self) -> None:
        """Advances the bundle's state by every kept step, in order."""
        k = len(self.coefs)
        if not k:
            return
        if self.fast:
            rows = torch.from_numpy(self.sums[:k])  # float64 [k, n]
        else:
            kept = {n: t[:k] for n, t in self.terms.items()}  # [k, *shape] each
            rows = self.bundle.reducer.square_sums(kept)  # float64 [k, n]
        mat = self.bundle.mat  # [4, n]
        for j, coef in enumerate(self.coefs):
            mat = coef @ torch.cat([mat, rows[j : j + 1]])  # [4, n]
        self.bundle.mat = mat
        self.coefs.clear()


class TrackingSGD(torch.optim.Optimizer):
    """torch.optim.SGD with the online exact and paper theory of every valid symmetry group.

    The update follows torch.optim.SGD exactly (coupled weight decay, first momentum step
    copies d, dampening, nesterov, per param-group hyperparameters, any LR scheduler). After
    each step, each valid group's state (see the module docstring) describes theta_k.

    Args:
        named_params: ``(name, parameter)`` pairs, or torch-style param-group dicts whose
            ``"params"`` are such pairs.
        lr: learning rate.
        momentum: beta.
        dampening: delta.
        weight_decay: coupled weight decay lam.
        nesterov: nesterov momentum.
        groups: symmetry groups; invalid ones, and those whose parameters are not optimised or
            sit in param groups with different hyperparameters, get no theory and are kept in
            `groups` marked invalid with a reason.
        buffers: names from `BUFFERS` to keep in ``state[p]``.

    Attributes:
        param_names: parameter names in state-dict index order.
        groups: all groups, valid or not.
        buffers: the buffer names recorded.
    """

    def __init__(
        self,
        named_params: Iterable,
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        groups: Sequence[SymmetryGroup] = (),
        buffers: Sequence[str] = (),
    ) -> None:
        _check_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov)
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "dampening": dampening,
            "weight_decay": weight_decay,
            "nesterov": nesterov,
        }
        super().__init__(named_params, defaults)
        for pg in self.param_groups:
            if "param_names" not in pg:
                raise TypeError("TrackingSGD needs (name, parameter) pairs")
            _check_sgd_hyper(
                float(pg["lr"]),
                pg["momentum"],
                pg["dampening"],
                pg["weight_decay"],
                pg["nesterov"],
            )
        self.buffers = tuple(BUFFERS.get(b).name for b in buffers)
        self._index_params()
        self._theory_step = 0
        self._step_matrices: dict[tuple, torch.Tensor] = {}
        self.groups = [self._admit(g) for g in groups]
        keys = [g.key for g in self.groups]
        if len(set(keys)) != len(keys):
            raise ValueError(f"symmetry group keys repeat: {sorted(keys)}")
        state = {g.key: self._initial_state(g) for g in self.groups if g.valid}
        self._bundles = self._build_bundles(state, dict.fromkeys(state, 0.0))

    # ----------------------------------------------------------------- set-up

    def _index_params(self) -> None:
        """Maps parameter names to tensors and param-group indices."""
        self.param_names = [n for pg in self.param_groups for n in pg["param_names"]]
        self._by_name: dict[str, torch.Tensor] = {}
        self._pg_of: dict[str, int] = {}
        for i, pg in enumerate(self.param_groups):
            for name, p in zip(pg["param_names"], pg["params"]):
                self._by_name[name] = p
                self._pg_of[name] = i

    def add_param_group(self, param_group: dict) -> None:
        """torch's add_param_group; later groups must be named too (they get no theory)."""
        super().add_param_group(param_group)
        if hasattr(self, "_by_name"):
            self._index_params()

    def _hyper_of(self, pg_index: int) -> theory.Hyper:
        return theory.Hyper.from_param_group(self.param_groups[pg_index])

    def _admit(self, group: SymmetryGroup) -> SymmetryGroup:
        """The group, or an invalidated copy when the theory cannot apply to it."""
        if not group.valid:
            return group
        if group.kind not in KINDS:
            return group.invalidated(f"unknown kind '{group.kind}'")
        missing = [n for n in group.params if n not in self._by_name]
        if missing:
            return group.invalidated(f"parameter '{missing[0]}' is not optimised")
        if len({self._hyper_of(self._pg_of[n]) for n in group.params}) > 1:
            return group.invalidated(
                "its parameters sit in param groups with different "
                "lr/momentum/dampening/nesterov/weight_decay"
            )
        return group

    def _initial_state(self, group: SymmetryGroup) -> dict[str, torch.Tensor]:
        """Theory state at step 0 from the measured Q_0 or S_0."""
        measured = theory.measure(group, self._by_name)  # [size] float64
        zeros = torch.zeros_like(measured)
        return {
            "exact": measured.clone(),
            "carry": zeros,
            "paper": measured.clone(),
            "paper_rate": zeros.clone(),
            "initial": measured,
        }

    def _build_bundles(
        self, state: Mapping[str, Mapping[str, torch.Tensor]], times: Mapping[str, float]
    ) -> list[_Bundle]:
        """Packs the per-group state of the valid groups into flat per-bundle vectors."""
        members: dict[tuple, list[SymmetryGroup]] = {}
        for g in self.groups:
            if not g.valid:
                continue
            key = (g.spec.family, self._pg_of[g.members[0].param], float(times[g.key]))
            members.setdefault(key, []).append(g)
        self._multi_pg = {}  # groups whose parameters sit in several param groups
        for gs in members.values():
            for g in gs:
                pgs = sorted({self._pg_of[n] for n in g.params})
                if len(pgs) > 1:
                    self._multi_pg[g.key] = pgs
        ndims = {n: p.ndim for n, p in self._by_name.items()}
        bundles = []
        for (kind, pg, time), gs in members.items():
            names = list(dict.fromkeys(n for g in gs for n in g.params))
            flat = {f: torch.cat([state[g.key][f] for g in gs]) for f in THEORY_FIELDS}
            bundles.append(
                _Bundle(
                    kind=kind,
                    pg=pg,
                    time=time,
                    groups=gs,
                    mat=torch.stack([flat[f] for f in STATE_ROWS]),  # [4, sum of sizes]
                    initial=flat["initial"],
                    params=[self._by_name[n] for n in names],
                    names=names,
                    first=self._by_name[gs[0].members[0].param],
                    reducer=Reducer(gs, ndims) if kind == "quadratic" else None,
                )
            )
            steps = _Ring.capacity(bundles[-1])
            if steps:
                bundles[-1].ring = _Ring(bundles[-1], steps)
        return bundles

    def _export_state(
        self, copy: bool = False
    ) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, float]]:
        """Per-group views of the bundles' state, and per-group times.

        Args:
            copy: views of one fresh float64 vector holding every field of every bundle
                (a snapshot: `torch.save` writes it as one storage record instead of one per
                group and field), instead of views of the live state.
        """
        self._flush()
        state: dict[str, dict[str, torch.Tensor]] = {}
        times: dict[str, float] = {}
        packed = None
        if copy and self._bundles:
            packed = torch.cat([b.field(f) for b in self._bundles for f in THEORY_FIELDS])
        start = 0
        for b in self._bundles:
            sizes = [g.size for g in b.groups]
            parts = {}
            for f in THEORY_FIELDS:
                vector = b.field(f)  # [sum of sizes]
                if packed is not None:
                    n = vector.numel()
                    vector, start = packed.narrow(0, start, n), start + n
                parts[f] = torch.split(vector, sizes)
            for i, g in enumerate(b.groups):
                state[g.key] = {f: parts[f][i] for f in THEORY_FIELDS}
                times[g.key] = b.time
        return state, times

    def _flush(self) -> None:
        """Applies every deferred step (the state then describes the current parameters)."""
        for b in self._bundles:
            if b.ring is not None:
                b.ring.flush()

    def _invalidate(self, reasons: Mapping[str, str]) -> None:
        """Drops the theory of some groups during a run (they stay listed, marked invalid)."""
        state, times = self._export_state()
        for key, reason in reasons.items():
            warnings.warn(f"symmetry group {key}: no more theory ({reason})", stacklevel=3)
        self.groups = [
            g.invalidated(reasons[g.key]) if g.key in reasons else g for g in self.groups
        ]
        self._bundles = self._build_bundles(state, times)

    def _check_runtime(self) -> None:
        """Invalidates groups with a parameter without gradient or diverged hyperparameters."""
        reasons: dict[str, str] = {}
        for b in self._bundles:
            if any(p.grad is None for p in b.params):
                for g in b.groups:
                    no_grad = [n for n in g.params if self._by_name[n].grad is None]
                    if no_grad:
                        reasons[g.key] = (
                            f"'{no_grad[0]}' had no gradient at step {self._theory_step}"
                        )
        for key, pgs in self._multi_pg.items():
            if key not in reasons and len({self._hyper_of(i) for i in pgs}) > 1:
                reasons[key] = f"hyperparameters diverged at step {self._theory_step}"
        if reasons:
            self._invalidate(reasons)

    # ------------------------------------------------------------------- step

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one SGD update and advances the theory of every valid group.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_runtime()
        products: dict[tuple[int, int], torch.Tensor] = {}
        terms: dict[int, tuple] = {}  # id(param) -> (v or None, u, stale buffer or None)
        had: dict[int, bool] = {}  # id(param) -> a momentum buffer existed before the step
        hps = [theory.Hyper.from_param_group(pg) for pg in self.param_groups]
        for pg, hp in zip(self.param_groups, hps):
            params = [p for p in pg["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if hp.weight_decay != 0:
                d = torch._foreach_add(grads, params, alpha=hp.weight_decay)
            else:
                d = grads
            bufs: list[torch.Tensor | None] = []
            states = [self.state[p] for p in params]
            for p, st in zip(params, states):
                buf = st.get("momentum_buffer")
                had[id(p)] = buf is not None
                bufs.append(buf)
            if hp.momentum != 0:
                old = [i for i, b in enumerate(bufs) if b is not None]
                if old:
                    old_bufs = [bufs[i] for i in old]
                    torch._foreach_mul_(old_bufs, hp.momentum)
                    torch._foreach_add_(old_bufs, [d[i] for i in old], alpha=1 - hp.dampening)
                for i, st in enumerate(states):
                    if bufs[i] is None:
                        bufs[i] = st["momentum_buffer"] = d[i].detach().clone()
                u = torch._foreach_add(d, bufs, alpha=hp.momentum) if hp.nesterov else bufs
                v = bufs
            else:
                u, v = d, [None] * len(params)
            torch._foreach_add_(params, u, alpha=-hp.lr)
            if self._bundles:
                stale = bufs if hp.momentum == 0 else v
                for p, vi, ui, si in zip(params, v, u, stale):
                    terms[id(p)] = (vi, ui, si)
            if self.buffers:
                self._record_buffers(params, states, grads, d, v, u, hp, products)
        for b in self._bundles:
            self._advance(b, hps[b.pg], terms, had, products)
        self._theory_step += 1
        return loss

    def _record_buffers(self, params, states, grads, d, v, u, hp: theory.Hyper, products) -> None:
        """Writes the requested per-parameter buffers of one param group."""
        if "grad" in self.buffers:
            _store_copies(states, "grad", grads)
        if "update" in self.buffers:
            _store_copies(states, "update", u)
        if "grad_norm" in self.buffers:
            for st, g2 in zip(states, _products(products, grads, grads)):
                st["grad_norm"] = g2
        if "update_norm" in self.buffers:
            for st, u2 in zip(states, _products(products, u, u)):
                st["update_norm"] = u2
        if hp.dt == 0.0:
            return
        if "sgd" in self.buffers:
            sgd = [st.setdefault("sgd", torch.zeros_like(p)) for st, p in zip(states, params)]
            torch._foreach_add_(sgd, _products(products, d, d), alpha=hp.lr * hp.lr)
            torch._foreach_mul_(sgd, math.exp(-2.0 * hp.weight_decay * hp.dt))
        if "mom" in self.buffers:
            force = [x if hp.momentum != 0 else y for x, y in zip(v, d)]
            xs = [st.setdefault("mom", torch.zeros_like(p)) for st, p in zip(states, params)]
            rates = [
                st.setdefault("mom_rate", torch.zeros_like(p)) for st, p in zip(states, params)
            ]
            torch._foreach_add_(rates, _products(products, force, force), alpha=hp.kick)
            gamma, omega2 = hp.oscillator("quadratic")
            h, green, hdot, gdot = theory.oscillator_coefficients(gamma, omega2, hp.dt)
            new_x = torch._foreach_mul(xs, h)
            torch._foreach_add_(new_x, rates, alpha=green)
            torch._foreach_mul_(rates, gdot)
            torch._foreach_add_(rates, xs, alpha=hdot)
            for st, x in zip(states, new_x):
                st["mom"] = x

    def _advance(self, b: _Bundle, hp: theory.Hyper, terms, had, products) -> None:
        """Advances one bundle's exact and paper state by the step just taken.

        The step of all the bundle's groups is one product with `theory.step_matrix`
        (cached per hyperparameters), after the group sums the quadratic kinds observe.
        """
        has_buffer = had[id(b.first)]
        if b.kind == "translation":
            b.mat = self._step_matrix(b, hp, has_buffer, ()) @ b.mat  # [4, n]
        elif b.ring is not None and not hp.nesterov and (hp.momentum != 0 or not has_buffer):
            # one squared term (v with momentum, d without): deferred to the ring's flush
            pattern = (0, 0, 0) if hp.momentum != 0 else (0, None, 0)
            term = [terms[id(p)][0 if hp.momentum != 0 else 1] for p in b.params]
            b.ring.push(term, self._step_matrix(b, hp, has_buffer, pattern))
        else:
            if b.ring is not None:
                b.ring.flush()
            # term indices in `terms`: 0 = v, 1 = u, 2 = stale momentum buffer; squares are
            # reduced without forming the product (one pass over each tensor)
            if hp.momentum != 0:
                forcing = b.reducer.squares(_named(b, terms, 0))  # |v|^2 [n]
                if hp.nesterov:
                    uu = b.reducer.squares(_named(b, terms, 1))  # U [n]
                    uv = b.reducer(_named_products(b, terms, products, 1, 0))  # C [n]
                    inputs, pattern = [uu, uv, forcing], (0, 1, 2)
                else:
                    inputs, pattern = [forcing], (0, 0, 0)  # u = v: U = C = |v|^2
            else:
                uu = b.reducer.squares(_named(b, terms, 1))  # U = |d|^2 = forcing [n]
                if has_buffer:
                    uv = b.reducer(_named_products(b, terms, products, 1, 2))  # C [n]
                    inputs, pattern = [uu, uv], (0, 1, 0)
                else:
                    inputs, pattern = [uu], (0, None, 0)
            rows = inputs[0][None] if len(inputs) == 1 else torch.stack(inputs)  # [k, n]
            coef = self._step_matrix(b, hp, has_buffer, pattern)  # [4, 4 + k]
            b.mat = coef @ torch.cat([b.mat, rows])  # [4, n]
        b.time += hp.dt

    def _step_matrix(self, b: _Bundle, hp: theory.Hyper, has_buffer: bool, pattern: tuple):
        """`theory.step_matrix` for a bundle, cached (it changes only with the hyperparameters)."""
        key = (b.kind, hp, has_buffer, pattern, b.mat.device)
        coef = self._step_matrices.get(key)
        if coef is None:
            if len(self._step_matrices) >= 64:  # e.g. a learning rate changing every step
                self._step_matrices.clear()
            coef = theory.step_matrix(b.kind, hp, has_buffer, pattern, b.mat.device)
            self._step_matrices[key] = coef
        return coef

    # ------------------------------------------------------------- state dict

    def state_dict(self) -> dict:
        """torch's optimizer state dict plus ``"theory"`` (layout in the module docstring)."""
        sd = super().state_dict()
        state, times = self._export_state(copy=True)
        sd["theory"] = {
            "version": THEORY_VERSION,
            "groups": groups_to_json(self.groups),
            "param_names": list(self.param_names),
            "step": self._theory_step,
            "time": times,
            "state": state,
        }
        return sd

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restores torch's state and the theory state exactly (bitwise resumption).

        Raises:
            CorruptFileError: when the theory entry is missing or does not fit this model.
        """
        state_dict = dict(state_dict)
        saved = state_dict.pop("theory", None)
        if not isinstance(saved, Mapping) or saved.get("version") != THEORY_VERSION:
            raise CorruptFileError(
                "optimizer state has no custom_sgd theory (version 1); resume with the "
                "optimizer that wrote it or start a new run"
            )
        super().load_state_dict(state_dict)
        self._index_params()
        groups = groups_from_json(saved["groups"])
        device = next(iter(self._by_name.values())).device
        state: dict[str, dict[str, torch.Tensor]] = {}
        for g in groups:
            if not g.valid:
                continue
            fields = saved["state"].get(g.key, {})
            missing = [n for n in g.params if n not in self._by_name]
            if missing or set(fields) != set(THEORY_FIELDS):
                raise CorruptFileError(
                    f"optimizer theory of {g.key} does not fit this model; resume with the "
                    "model and optimizer that wrote the checkpoint"
                )
            state[g.key] = {f: t.to(device=device, dtype=torch.float64) for f, t in fields.items()}
        self.groups = groups
        self._theory_step = int(saved["step"])
        self._bundles = self._build_bundles(state, saved["time"])

    def theory_snapshot(self) -> dict[str, dict[str, np.ndarray]]:
        """The current predictions for theta_k, per valid group key.

        Returns:
            key -> {"exact", "paper", "paper_rate", "carry", "initial": float64 [size],
            "time": float64 0-d array t_k}.
        """
        state, times = self._export_state()
        return {
            key: {
                **{f: t.detach().cpu().numpy().copy() for f, t in fields.items()},
                "time": np.array(times[key], dtype=np.float64),
            }
            for key, fields in state.items()
        }


def _named(b: _Bundle, terms, index: int) -> dict[str, torch.Tensor]:
    """Per parameter of a bundle, one of its step terms (0 = v, 1 = u, 2 = stale buffer)."""
    return {n: terms[id(p)][index] for n, p in zip(b.names, b.params)}


def _named_products(b: _Bundle, terms, products, a: int, c: int) -> dict[str, torch.Tensor]:
    """Per parameter of a bundle, the elementwise product of its step terms a and c."""
    left = [terms[id(p)][a] for p in b.params]
    right = [terms[id(p)][c] for p in b.params]
    return dict(zip(b.names, _products(products, left, right)))  # name -> [*shape]


def _products(
    cache: dict, a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """Elementwise a[i] * b[i], computed once per step per pair (one foreach call)."""
    keys = [(id(x), id(y)) for x, y in zip(a, b)]
    todo = [i for i, k in enumerate(keys) if k not in cache]
    if todo:
        done = torch._foreach_mul([a[i] for i in todo], [b[i] for i in todo])
        for i, x in zip(todo, done):
            cache[keys[i]] = x
    return [cache[k] for k in keys]


def _store_copies(states: list[dict], key: str, values: list[torch.Tensor]) -> None:
    """Copies tensors into ``state[key]``, reusing existing storage of the same shape."""
    dst, src = [], []
    for st, x in zip(states, values):
        old = st.get(key)
        if old is not None and old.shape == x.shape and old.dtype == x.dtype:
            dst.append(old)
            src.append(x)
        else:
            st[key] = x.detach().clone()
    if dst:
        torch._foreach_copy_(dst, src)


class LAMB(torch.optim.Optimizer):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning").

    Adam moments with bias correction, r = m_hat / (sqrt(v_hat) + eps), decoupled weight decay
    added to the update, and a layer-wise (per-tensor) trust ratio ||w|| / ||r + lam w``||
    (1 when either norm is 0): ``w <- w - lr * trust * (r + lam w)``.

    Args:
        params: parameters or param groups (named or not).
        lr: learning rate.
        betas: (beta1, beta2).
        eps: added to sqrt(v_hat).
        weight_decay: decoupled weight decay lam.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise UsageError(
                f"invalid LAMB hyperparameters lr={lr} betas={betas} eps={eps} "
                f"weight_decay={weight_decay}; use lr, eps, wd >= 0 and betas in [0, 1)"
            )
        super().__init__(
            params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay}
        )

    @torch.no_grad()
    def step(self, closure=None):
        """Performs one LAMB update.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for pg in self.param_groups:
            beta1, beta2 = pg["betas"]
            for p in pg["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if "exp_avg" not in st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"]
                g = p.grad
                m, v = st["exp_avg"], st["exp_avg_sq"]
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                m_hat = m / (1 - beta1**t)
                v_hat = v / (1 - beta2**t)
                r = m_hat / (v_hat.sqrt() + pg["eps"])
                if pg["weight_decay"] != 0:
                    r.add_(p, alpha=pg["weight_decay"])
                w_norm = torch.linalg.vector_norm(p)
                r_norm = torch.linalg.vector_norm(r)
                trust = torch.where(
                    (w_norm > 0) & (r_norm > 0), w_norm / r_norm, torch.ones_like(w_norm)
                )
                p.sub_(r * (trust * pg["lr"]))
        return loss


class _BufferRecorder:
    """Records grad/update buffers of any optimizer with step pre- and post-hooks.

    ``update = (theta_before - theta_after) / lr`` (zero when lr is 0).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, names: Sequence[str]) -> None:
        self.names = set(names)
        self._saved: list[tuple] = []
        optimizer.register_step_pre_hook(self.before)
        optimizer.register_step_post_hook(self.after)

    def before(self, optimizer, args, kwargs) -> None:
        """Keeps g_k, theta_k and lr before the step."""
        want_grad = bool(self.names & {"grad", "grad_norm"})
        want_update = bool(self.names & {"update", "update_norm"})
        self._saved = [
            (
                p,
                float(pg["lr"]),
                p.grad.detach().clone() if want_grad else None,
                p.detach().clone() if want_update else None,
            )
            for pg in optimizer.param_groups
            for p in pg["params"]
            if p.grad is not None
        ]

    def after(self, optimizer, args, kwargs) -> None:
        """Writes the buffers into ``optimizer.state[p]``."""
        with torch.no_grad():
            for p, lr, g, before in self._saved:
                st = optimizer.state[p]
                if "grad" in self.names:
                    st["grad"] = g
                if "grad_norm" in self.names:
                    st["grad_norm"] = g * g
                if before is not None:
                    u = before.sub_(p).div_(lr) if lr != 0 else torch.zeros_like(p)
                    if "update" in self.names:
                        st["update"] = u
                    if "update_norm" in self.names:
                        st["update_norm"] = u * u
        self._saved = []


@OPTIMIZERS.register("custom_sgd", tracking=True)
def _custom_sgd(named_params, *, lr, momentum, dampening, weight_decay, nesterov, groups, buffers):
    return TrackingSGD(
        named_params,
        lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
        groups=groups,
        buffers=buffers,
    )


@OPTIMIZERS.register("sgd", tracking=False)
def _sgd(named_params, *, lr, momentum, dampening, weight_decay, nesterov, **_):
    _check_sgd_hyper(lr, momentum, dampening, weight_decay, nesterov)
    return torch.optim.SGD(
        named_params,
        lr=lr,
        momentum=momentum,
        dampening=dampening,
        weight_decay=weight_decay,
        nesterov=nesterov,
    )


@OPTIMIZERS.register("momentum", tracking=False)
def _momentum(named_params, *, momentum, **kw):
    if momentum <= 0:
        raise UsageError("optimizer 'momentum' needs --momentum > 0 (e.g. --momentum 0.9)")
    return _sgd(named_params, momentum=momentum, **kw)


@OPTIMIZERS.register("adam", tracking=False)
def _adam(named_params, *, lr, weight_decay, **_):
    return torch.optim.Adam(named_params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("adamw", tracking=False)
def _adamw(named_params, *, lr, weight_decay, **_):
    return torch.optim.AdamW(named_params, lr=lr, weight_decay=weight_decay)


@OPTIMIZERS.register("rms", tracking=False)
def _rms(named_params, *, lr, momentum, weight_decay, **_):
    return torch.optim.RMSprop(named_params, lr=lr, momentum=momentum, weight_decay=weight_decay)


@OPTIMIZERS.register("lamb", tracking=False)
def _lamb(named_params, *, lr, weight_decay, **_):
    return LAMB(named_params, lr=lr, weight_decay=weight_decay)


def build_optimizer(
    name: str,
    named_params: Iterable[tuple[str, nn.Parameter]] | Iterable[dict],
    *,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    weight_decay: float = 0.0,
    nesterov: bool = False,
    groups: Sequence[SymmetryGroup] = (),
    buffers: Sequence[str] = (),
) -> torch.optim.Optimizer:
    """Builds a registered optimizer over named parameters.

    Args:
        name: a name in `OPTIMIZERS`.
        named_params: ``(name, parameter)`` pairs (e.g. ``model.named_parameters()``), or
            torch-style param-group dicts whose ``"params"`` are such pairs.
        lr: learning rate.
        momentum: beta (SGD, momentum, rms; custom_sgd).
        dampening: delta (SGD-like optimizers).
        weight_decay: coupled weight decay (decoupled for adamw and lamb).
        nesterov: nesterov momentum (SGD-like optimizers).
        groups: symmetry groups for custom_sgd's theory (ignored by the others).
        buffers: names in `BUFFERS` to keep in ``optimizer.state[p]``.

    Returns:
        The optimizer, with ``param_names`` (state-dict index order).

    Raises:
        UnknownNameError: unknown optimizer or buffer name.
        UsageError: invalid hyperparameters, or sgd/mom buffers without custom_sgd.
    """
    factory = OPTIMIZERS.get(name)
    buffers = tuple(BUFFERS.get(b).name for b in buffers)
    tracking = OPTIMIZERS.meta(name)["tracking"]
    only = [b for b in buffers if BUFFERS.meta(b)["tracking_only"]]
    if only and not tracking:
        raise UsageError(
            f"buffer(s) {','.join(only)} need --optimizer custom_sgd; drop them or switch"
        )
    try:
        opt = factory(
            named_params,
            lr=lr,
            momentum=momentum,
            dampening=dampening,
            weight_decay=weight_decay,
            nesterov=nesterov,
            groups=tuple(groups),
            buffers=buffers,
        )
    except ValueError as err:
        raise UsageError(f"optimizer {name}: {err}") from None
    if not tracking:
        opt.param_names = [n for pg in opt.param_groups for n in pg.get("param_names", [])]
        if buffers:
            opt._buffer_recorder = _BufferRecorder(opt, buffers)
    return opt
