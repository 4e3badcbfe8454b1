"""One definition per symmetry kind (THEORY.md section 2), read by every part of the project.

A kind is a `KindSpec`: the measured quantity (elementwise term summed per group), the
direction c_A of its gradient constraint <g_A, c_A> = 0, its theory family (which recursions
of THEORY.md sections 3-4 apply), the labels figures use, the reason text a metric gives when
a network has no group of the kind, and the graph structures detection finds it in.

Readers: `Utils.symmetry` (detection and verification), `Utils.theory` (measure, oscillator
frequency, step matrices), `Utils.optimizers.TrackingSGD` (bundles by family), the metrics
(`conservation`, `symmetry_violation`, `gradient`, `phase`, the hints of `Metric.applies`) and
the figures (`title`, `short_title`, `quantity_label`).

Adding a kind: a `KindSpec` in `KINDS` (its family decides the theory: "translation" for a
linear quantity with no forcing, "quadratic" for scale-like and rescale-like quantities), its
detector in `Utils.symmetry`, and tests. The numbers below are torch-free: the same functions
serve numpy arrays (metrics) and torch tensors (detection, theory).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

FAMILIES = ("translation", "quadratic")


@dataclass(frozen=True)
class Structure:
    """One graph structure in which detection finds groups of a kind.

    Attributes:
        name: short name stored in ``group.meta["structure"]``.
        description: one line for the README and ``python -m Utils.symmetry --kinds``.
    """

    name: str
    description: str


@dataclass(frozen=True)
class KindSpec:
    """Everything that defines one symmetry kind.

    Attributes:
        name: the kind, e.g. "scale" (also the first part of a group key).
        family: "translation" (S = sum theta_A, exact and paper theory without forcing) or
            "quadratic" (Q = signed sum of theta_A^2: scale-like, rescale-like).
        constraint: "ones" (c_A = 1) or "theta" (c_A = theta_A, with the members' signs).
        omega_factor: the paper's heavy-ball frequency omega^2 = factor lam / (eta (1-delta)(1+beta)).
        signed: whether groups have members of sign -1 (A2 of a rescale pair).
        symbol: the quantity's letter (S, Q, R).
        quantity: the measured quantity in words.
        quantity_label: the quantity in matplotlib mathtext.
        title: a figure title.
        short_title: a short figure or legend title.
        hint: what a network needs to have groups of this kind (the reason a metric does
            not apply when it has none).
        structures: where detection finds the kind.
    """

    name: str
    family: str
    constraint: str
    omega_factor: float
    signed: bool
    symbol: str
    quantity: str
    quantity_label: str
    title: str
    short_title: str
    hint: str
    structures: tuple[Structure, ...]

    def term(self, x: Any) -> Any:
        """The elementwise term whose group sum is the measured quantity (x or x * x).

        Args:
            x: parameter values, a numpy array or a torch tensor (float64 for accuracy).

        Returns:
            Same type and shape: x (translation family) or x * x (quadratic family).
        """
        return x if self.family == "translation" else x * x

    def magnitude_term(self, x: Any) -> Any:
        """The elementwise term whose unsigned group sum is the quantity's magnitude.

        |x| (translation) or x * x (quadratic): the size of the terms summed, the scale of
        their round-off, used to normalise relative errors.
        """
        return abs(x) if self.family == "translation" else x * x

    def direction(self, theta: Any) -> Any:
        """The constraint direction c_A elementwise: ones (translation) or theta itself."""
        if self.constraint == "theta":
            return theta
        if isinstance(theta, np.ndarray):
            return np.ones_like(theta)
        return theta.new_ones(theta.shape)  # a torch tensor, without importing torch here


KINDS: dict[str, KindSpec] = {}


def register(spec: KindSpec) -> KindSpec:
    """Adds a kind to `KINDS` (the order of registration is the order of reports)."""
    if spec.family not in FAMILIES:
        raise ValueError(f"kind {spec.name}: family must be one of {FAMILIES}")
    if spec.constraint not in ("ones", "theta"):
        raise ValueError(f"kind {spec.name}: constraint must be 'ones' or 'theta'")
    KINDS[spec.name] = spec
    return spec


register(
    KindSpec(
        name="translation",
        family="translation",
        constraint="ones",
        omega_factor=2.0,
        signed=False,
        symbol="S",
        quantity="S = sum of theta_A (column sums of the classifier, plus its bias)",
        quantity_label=r"$S = \sum\,\theta_A$",
        title="translation symmetry (last layer before softmax)",
        short_title="translation (last linear layer)",
        hint="a last linear layer feeding softmax cross-entropy or log_softmax (--loss ce)",
        structures=(
            Structure(
                "softmax",
                "the Linear whose output is the model output, for softmax cross-entropy",
            ),
            Structure(
                "log_softmax",
                "the Linear feeding a final (log_)softmax over classes (any loss, e.g. NLL)",
            ),
        ),
    )
)
register(
    KindSpec(
        name="scale",
        family="quadratic",
        constraint="theta",
        omega_factor=4.0,
        signed=False,
        symbol="Q",
        quantity="Q = |theta_A|^2 (incoming weights and bias of a normalised unit)",
        quantity_label=r"$|\theta_A|^2$",
        title="scale symmetry (layers feeding a normalisation)",
        short_title="scale (channels feeding a norm)",
        hint=(
            "a linear/conv layer feeding BatchNorm, GroupNorm, InstanceNorm or LayerNorm "
            "(e.g. --model fc-bn or conv-bn)"
        ),
        structures=(
            Structure("batchnorm", "each output channel of a Linear/Conv feeding BatchNorm"),
            Structure("instancenorm", "each output channel of a Conv feeding InstanceNorm"),
            Structure(
                "groupnorm",
                "the channels of one GroupNorm group together, of a Conv feeding GroupNorm",
            ),
            Structure(
                "layernorm",
                "the whole output of a Linear/Conv feeding LayerNorm (through permutes and "
                "reshapes): one group per layer",
            ),
        ),
    )
)
register(
    KindSpec(
        name="rescale",
        family="quadratic",
        constraint="theta",
        omega_factor=4.0,
        signed=True,
        symbol="R",
        quantity="R = |theta_A1|^2 - |theta_A2|^2 (incoming minus outgoing weights of a unit)",
        quantity_label=r"$|\theta_{A_1}|^2 - |\theta_{A_2}|^2$",
        title="rescale symmetry (hidden units between homogeneous layers)",
        short_title="rescale (homogeneous hidden units)",
        hint=(
            "ReLU-like hidden units between two layers, or a normalisation's affine "
            "parameters feeding a layer (e.g. --model fc or fc-bn)"
        ),
        structures=(
            Structure(
                "layer",
                "unit i of a Linear/Conv against its consumers' incoming block of unit i, "
                "through ReLU/LeakyReLU/pooling/dropout/flatten (several consumers: their "
                "union; depthwise consumers: their output channels of unit i)",
            ),
            Structure(
                "norm-affine",
                "(gamma_i, beta_i) of a BatchNorm/LayerNorm/GroupNorm/InstanceNorm affine "
                "against the consumers' incoming block of unit i, through the same operations",
            ),
        ),
    )
)

KIND_NAMES: tuple[str, ...] = tuple(KINDS)
QUADRATIC: tuple[str, ...] = tuple(k for k, s in KINDS.items() if s.family == "quadratic")


def spec(kind: str) -> KindSpec:
    """The spec of a kind.

    Raises:
        ValueError: unknown kind.
    """
    try:
        return KINDS[kind]
    except KeyError:
        raise ValueError(
            f"unknown symmetry kind {kind!r}; known: {', '.join(KIND_NAMES)}"
        ) from None


def violation(dot: Any, g_sq: Any, c_sq: Any) -> np.ndarray:
    """The relative violation |<g_A, c_A>| / (|g_A| |c_A|) from per-group sums.

    The one definition used by verification (`Utils.symmetry.verify_groups`) and by the
    `symmetry_violation` metric.

    Args:
        dot: <g_A, c_A> per group (signed for rescale), array-like [..., n].
        g_sq: |g_A|^2 per group (unsigned), same shape.
        c_sq: |c_A|^2 per group (unsigned), same shape.

    Returns:
        float64 array [..., n]; NaN where |g_A| |c_A| = 0 (undefined: no gradient or a zero
        direction) or an input is NaN.
    """
    dot, g_sq, c_sq = (_numpy(x) for x in (dot, g_sq, c_sq))
    denom = np.sqrt(g_sq * c_sq)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, np.abs(dot) / np.where(denom > 0, denom, 1.0), np.nan)


def _numpy(x: Any) -> np.ndarray:
    """A float64 numpy array from a numpy array or a (detached, any-device) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64)


def table() -> list[dict[str, str]]:
    """One row per (kind, structure): the list `python -m Utils.symmetry --kinds` prints."""
    return [
        {
            "kind": s.name,
            "family": s.family,
            "quantity": s.quantity,
            "structure": st.name,
            "description": st.description,
        }
        for s in KINDS.values()
        for st in s.structures
    ]
