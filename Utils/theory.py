"""Online theory for the conserved quantities of THEORY.md: pure maths on float64 tensors.

Every function advances per-group state vectors (tensors ``[n]``, one entry per neuron group,
float64) by one optimizer step, given that step's hyperparameters (`Hyper`, Python floats
read from a torch param group) and the per-group reductions observed in that step. Nothing
here owns a torch module or touches files; `Utils.optimizers.TrackingSGD` calls these
functions and keeps the state.

Quantities (per group; "signed" means the rescale difference A1 minus A2, which
`Utils.groups.group_sum` produces with the members' signs):

* scale and rescale ("quadratic"): ``Q = group_sum(theta * theta)``;
  translation: ``S = group_sum(theta)``.
* exact theory (THEORY.md section 3): ``exact`` is Q_k (or S_k), ``carry`` is
  ``<theta_k, v_{k-1}>`` (or ``<v_{k-1}, 1>``), i.e. ``P_{k-1} - eta_{k-1} C_{k-1}``
  (``M_{k-1}``), where ``v_{k-1}`` is the momentum buffer that step k will read.
* paper theory (THEORY.md section 4): ``paper`` is the prediction X(t_k) and ``paper_rate``
  its time derivative X'(t_k) (unused, left at 0, for plain SGD).

Both theories are linear maps of the state and of the step's observations; `step_matrix`
writes one step of either kind as one matrix (built from the step functions themselves), which
`TrackingSGD` applies to all the groups of a bundle at once.

Momentum in the paper theory: heavy ball follows the modified gradient flow
``(eta (1-delta)(1+beta)/2) theta'' + (1-beta) theta' = -(g + lam theta)``; nesterov uses the
same heavy-ball flow as an approximation (the paper derives no separate nesterov flow).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from Utils.groups import SymmetryGroup, group_sum, group_sum_np
from Utils.kinds import FAMILIES, spec

# |z| = |gamma^2 - omega^2| dt^2 below which the near-critical series is used; its first
# omitted term is z^5 / 3628800, far below float64 round-off at this threshold.
_SERIES_LIMIT = 1e-4


@dataclass(frozen=True)
class Hyper:
    """Hyperparameters of one torch.optim.SGD step (THEORY.md section 1).

    Attributes:
        lr: learning rate eta_k of this step (after any scheduler).
        momentum: beta.
        dampening: delta (ignored when beta = 0, as torch does).
        weight_decay: coupled weight decay lam.
        nesterov: whether the update is d + beta v.
    """

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False

    @classmethod
    def from_param_group(cls, group: Mapping) -> Hyper:
        """Reads the hyperparameters of a torch optimizer param group."""
        return cls(
            lr=float(group["lr"]),
            momentum=float(group.get("momentum", 0.0)),
            dampening=float(group.get("dampening", 0.0)),
            weight_decay=float(group.get("weight_decay", 0.0)),
            nesterov=bool(group.get("nesterov", False)),
        )

    @property
    def delta(self) -> float:
        """The dampening that acts: delta when beta != 0, else 0."""
        return self.dampening if self.momentum != 0 else 0.0

    @property
    def dt(self) -> float:
        """Time step of the continuous theory, t_{k+1} - t_k = eta_k (1 - delta)."""
        return self.lr * (1.0 - self.delta)

    @property
    def kick(self) -> float:
        """Factor of one step's kick to X' in the momentum oscillator, 2 eta_k / (1 - delta).

        The modified flow has theta' = -v / (1 - delta) (a step moves eta v in time
        eta (1 - delta)), so the forcing 2 |theta'|^2 = 2 |v|^2 / (1 - delta)^2 held over dt
        kicks X' by 2 eta |v|^2 / (1 - delta) (THEORY.md section 4). Only used when dt > 0.
        """
        return 2.0 * self.lr / (1.0 - self.delta)

    def oscillator(self, kind: str) -> tuple[float, float]:
        """Damping gamma and squared frequency omega^2 of the heavy-ball modified flow.

        Args:
            kind: a kind of `Utils.kinds.KINDS`, or "quadratic"; its ``omega_factor`` gives
                omega^2 = factor lam / (eta (1-delta)(1+beta)) (translation 2, scale/rescale 4).

        Returns:
            (gamma, omega2) with gamma = (1 - beta) / (eta (1-delta)(1+beta)).
        """
        denom = self.dt * (1.0 + self.momentum)
        gamma = (1.0 - self.momentum) / denom
        factor = 4.0 if kind == "quadratic" else spec(kind).omega_factor
        return gamma, factor * self.weight_decay / denom


def oscillator_coefficients(
    gamma: float, omega2: float, dt: float
) -> tuple[float, float, float, float]:
    """Exact propagator of X'' + 2 gamma X' + omega^2 X = 0 over a time dt.

    ``X(dt) = h X + G X'`` and ``X'(dt) = hdot X + Gdot X'`` with h the homogeneous solution
    (X=1, X'=0), G the Green's function (X=0, X'=1), ``hdot = -omega^2 G`` and
    ``Gdot = h - 2 gamma G``. Only decaying exponentials are evaluated. Near the critical
    regime (|gamma^2 - omega^2| dt^2 < 1e-4) a series in z = (gamma^2 - omega^2) dt^2 is used,
    which is smooth across the regimes; the over-damped branch uses expm1 for small q dt.

    Args:
        gamma: damping rate, >= 0.
        omega2: squared natural frequency, >= 0.
        dt: time step, >= 0.

    Returns:
        (h, G, hdot, Gdot) as Python floats.
    """
    if dt == 0.0:
        return 1.0, 0.0, 0.0, 1.0
    disc = gamma * gamma - omega2
    z = disc * dt * dt
    if abs(z) < _SERIES_LIMIT:
        decay = math.exp(-gamma * dt)
        c = 1.0 + z * (1 / 2 + z * (1 / 24 + z * (1 / 720 + z / 40320)))
        s = 1.0 + z * (1 / 6 + z * (1 / 120 + z * (1 / 5040 + z / 362880)))
        green = decay * dt * s
        h = decay * c + gamma * green
    elif z > 0:
        q = math.sqrt(disc)
        a_minus = -(gamma + q)
        a_plus = -omega2 / (gamma + q)  # = -gamma + q without cancellation
        e_minus = math.exp(a_minus * dt)
        e_plus = math.exp(a_plus * dt)
        if 2.0 * q * dt < 1.0:
            green = e_minus * math.expm1(2.0 * q * dt) / (2.0 * q)
        else:
            green = (e_plus - e_minus) / (2.0 * q)
        h = 0.5 * (e_plus + e_minus) + gamma * green
    else:
        w = math.sqrt(-disc)
        decay = math.exp(-gamma * dt)
        green = decay * math.sin(w * dt) / w
        h = decay * math.cos(w * dt) + gamma * green
    return h, green, -omega2 * green, h - 2.0 * gamma * green


def propagate_oscillator(
    x: torch.Tensor, xdot: torch.Tensor, gamma: float, omega2: float, dt: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Advances X'' + 2 gamma X' + omega^2 X = 0 exactly over dt (all damping regimes).

    Args:
        x: X at the start, any shape (elementwise).
        xdot: X' at the start, same shape.
        gamma: damping rate.
        omega2: squared frequency (0 allowed).
        dt: time step.

    Returns:
        (X(dt), X'(dt)), new tensors.
    """
    h, green, hdot, gdot = oscillator_coefficients(gamma, omega2, dt)
    return torch.add(x * h, xdot, alpha=green), torch.add(x * hdot, xdot, alpha=gdot)


def exact_quadratic_step(
    q: torch.Tensor,
    carry: torch.Tensor,
    uu: torch.Tensor,
    uv: torch.Tensor | None,
    hp: Hyper,
    has_buffer: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the exact recursion for Q (scale) or the signed Q (rescale).

    THEORY.md section 3: ``P_k = lam Q_k`` on the first momentum step, else
    ``beta carry_k + (1 - delta) lam Q_k``; ``<theta, u> = P_k`` (heavy ball),
    ``lam Q_k + beta P_k`` (nesterov) or ``lam Q_k`` (beta = 0);
    ``Q_{k+1} = Q_k - 2 eta <theta, u> + eta^2 U_k`` and ``carry_{k+1} = P_k - eta C_k``.

    Args:
        q: Q_k [n].
        carry: <theta_k, v_{k-1}> [n] (ignored when there is no momentum buffer).
        uu: U_k = group_sum(u_k^2) [n].
        uv: C_k = group_sum(u_k v) [n], with v the buffer after this step; for beta = 0, the
            stale buffer if one exists (else None).
        hp: this step's hyperparameters.
        has_buffer: whether a momentum buffer existed before this step.

    Returns:
        (Q_{k+1}, carry_{k+1}).
    """
    lr, beta, lam = hp.lr, hp.momentum, hp.weight_decay
    if beta != 0:
        if has_buffer:
            p = torch.add(carry * beta, q, alpha=(1.0 - hp.delta) * lam)
        else:
            p = q * lam
        theta_u = torch.add(p * beta, q, alpha=lam) if hp.nesterov else p
        q_next = torch.add(q, theta_u, alpha=-2.0 * lr).add_(uu, alpha=lr * lr)
        return q_next, torch.add(p, uv, alpha=-lr)
    q_next = torch.add(q, q, alpha=-2.0 * lr * lam).add_(uu, alpha=lr * lr)
    if has_buffer and uv is not None:
        return q_next, torch.add(carry, uv, alpha=-lr)
    return q_next, carry


def exact_translation_step(
    s: torch.Tensor, carry: torch.Tensor, hp: Hyper, has_buffer: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the exact recursion for S = <theta, 1> (translation; no observations).

    ``M_k = lam S_k`` (first momentum step) or ``beta M_{k-1} + (1 - delta) lam S_k``;
    ``<u, 1> = M_k``, ``lam S_k + beta M_k`` (nesterov) or ``lam S_k`` (beta = 0);
    ``S_{k+1} = S_k - eta <u, 1>``.

    Args:
        s: S_k [n].
        carry: M_{k-1} = <v_{k-1}, 1> [n].
        hp: this step's hyperparameters.
        has_buffer: whether a momentum buffer existed before this step.

    Returns:
        (S_{k+1}, carry_{k+1} = M_k).
    """
    lr, beta, lam = hp.lr, hp.momentum, hp.weight_decay
    if beta != 0:
        m = torch.add(carry * beta, s, alpha=(1.0 - hp.delta) * lam) if has_buffer else s * lam
        sum_u = torch.add(m * beta, s, alpha=lam) if hp.nesterov else m
        return torch.add(s, sum_u, alpha=-lr), m
    return torch.add(s, s, alpha=-lr * lam), carry


def paper_quadratic_step(
    x: torch.Tensor, xdot: torch.Tensor, forcing: torch.Tensor, hp: Hyper
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the paper's continuous-time prediction for Q (scale, rescale).

    Plain SGD: ``X_{k+1} = exp(-2 lam dt)(X_k + eta^2 |d_k|^2)`` with dt = eta
    (= exp(-2 lam t) Q_0 + J_k). Momentum (heavy-ball flow, also used for nesterov): kick
    ``X' += 2 eta |v_k|^2 / (1 - delta)`` (`Hyper.kick`) then propagate the damped oscillator over
    dt = eta (1 - delta) with omega^2 = 4 lam / (eta (1-delta)(1+beta)).

    Args:
        x: X(t_k) [n].
        xdot: X'(t_k) [n] (left unchanged for plain SGD).
        forcing: |d_k|^2 (beta = 0) or |v_k|^2 (momentum), signed group sums [n].
        hp: this step's hyperparameters.

    Returns:
        (X(t_{k+1}), X'(t_{k+1})).
    """
    if hp.dt == 0.0:
        return x, xdot
    if hp.momentum == 0:
        decay = math.exp(-2.0 * hp.weight_decay * hp.dt)
        return torch.add(x, forcing, alpha=hp.lr * hp.lr).mul_(decay), xdot
    gamma, omega2 = hp.oscillator("quadratic")
    kicked = torch.add(xdot, forcing, alpha=hp.kick)
    return propagate_oscillator(x, kicked, gamma, omega2, hp.dt)


def paper_translation_step(
    x: torch.Tensor, xdot: torch.Tensor, hp: Hyper
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step of the paper's prediction for S (translation; no forcing).

    Plain SGD: ``S_{k+1} = exp(-lam dt) S_k``; momentum: the damped oscillator with
    omega^2 = 2 lam / (eta (1-delta)(1+beta)) propagated over dt = eta (1 - delta).

    Args:
        x: S(t_k) [n].
        xdot: S'(t_k) [n].
        hp: this step's hyperparameters.

    Returns:
        (S(t_{k+1}), S'(t_{k+1})).
    """
    if hp.dt == 0.0:
        return x, xdot
    if hp.momentum == 0:
        return x * math.exp(-hp.weight_decay * hp.dt), xdot
    gamma, omega2 = hp.oscillator("translation")
    return propagate_oscillator(x, xdot, gamma, omega2, hp.dt)


def step_matrix(
    kind: str,
    hp: Hyper,
    has_buffer: bool,
    inputs: Sequence[int | None] = (0, 1, 2),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One step of the exact and the paper theory of one kind as a single linear map.

    Both recursions are linear in the state (exact, carry, paper, paper_rate) and in the
    step's observed group sums (U, C and the forcing of `exact_quadratic_step` and
    `paper_quadratic_step`), so a step of a whole bundle of groups is one matrix product
    ``new_state [4, n] = M @ [state [4, n]; inputs [k, n]]``. M is obtained by applying the
    step functions to unit vectors: the same arithmetic as the functions, no second derivation.

    Args:
        kind: a kind of `Utils.kinds.KINDS` or a family ("translation", "quadratic"); the
            kind's family decides the recursion (translation: no inputs).
        hp: this step's hyperparameters.
        has_buffer: whether a momentum buffer existed before this step.
        inputs: quadratic kinds: the input row feeding U, C and the forcing, in that order;
            equal indices share a row (heavy ball: ``(0, 0, 0)``, one row |v|^2), None marks
            an absent C (no momentum and no stale buffer). Ignored for translation.
        device: where M is made (no host-device copy).

    Returns:
        float64 [4, 4 + k] with k the number of distinct inputs (0 for translation); rows and
        the first four columns in the order exact, carry, paper, paper_rate.
    """
    family = kind if kind in FAMILIES else spec(kind).family
    if family == "translation":
        unit = torch.eye(4, dtype=torch.float64, device=device)  # unit[i][j]: component i of e_j
        s, m = exact_translation_step(unit[0], unit[1], hp, has_buffer)
        x, xdot = paper_translation_step(unit[2], unit[3], hp)
        return torch.stack([s, m, x, xdot])  # [4, 4]
    k = 1 + max(i for i in inputs if i is not None)
    unit = torch.eye(4 + k, dtype=torch.float64, device=device)
    uu, uv, forcing = (None if i is None else unit[4 + i] for i in inputs)
    q, carry = exact_quadratic_step(unit[0], unit[1], uu, uv, hp, has_buffer)
    x, xdot = paper_quadratic_step(unit[2], unit[3], forcing, hp)
    return torch.stack([q, carry, x, xdot])  # [4, 4 + k]


def measure(group: SymmetryGroup, values: Mapping[str, Any], lead: int = 0) -> Any:
    """The measured quantity a group's predictions are compared with, in float64.

    The quantity is the kind's (`Utils.kinds.KindSpec.term`): translation ``group_sum(theta)``;
    scale ``group_sum(theta^2)`` (sum over each group); rescale ``group_sum(theta^2)`` with the
    signs, i.e. |theta_A1|^2 - |theta_A2|^2. Compare it with a checkpoint's
    ``ckpt["optimizer"]["theory"]["state"][group.key]["exact"]`` (or ``"paper"``), or with the
    ``theory`` rows of features.h5.

    Args:
        group: the groups.
        values: parameter name -> parameter, torch tensors (any float dtype, any device) or
            numpy arrays [*lead_shape, *param_shape] (e.g. stored parameters with a step axis).
        lead: number of leading axes to keep (numpy arrays only).

    Returns:
        float64 [*lead_shape, group.size]: a torch tensor for torch inputs, else a numpy array.
    """
    term = group.spec.term
    first = values[group.members[0].param]
    if hasattr(first, "detach"):  # torch tensors
        if lead:
            raise ValueError("measure keeps leading axes for numpy arrays only")
        wide = {n: values[n].detach().to(dtype=torch.float64) for n in group.params}
        return group_sum({n: term(t) for n, t in wide.items()}, group)
    arrays = {n: np.asarray(values[n], dtype=np.float64) for n in group.params}
    return group_sum_np({n: term(a) for n, a in arrays.items()}, group, lead=lead)
