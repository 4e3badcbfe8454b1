"""The words and symbols of the figures: one table per kind of symmetry, axes, hyperparameters.

`KIND_LABELS` is the only table of per-kind texts (quantity symbol, short panel title, figure
title); every figure family reads it through `kind_label`.
"""

from __future__ import annotations

CONSERVATION = ("translation", "scale", "rescale")

KIND_LABELS: dict[str, dict[str, str]] = {
    "translation": {
        "quantity": r"$S = \sum\,\theta_A$",
        "short": "translation (last linear layer)",
        "title": "translation symmetry (last layer before softmax)",
    },
    "scale": {
        "quantity": r"$|\theta_A|^2$",
        "short": "scale (channels feeding BatchNorm)",
        "title": "scale symmetry (channels feeding BatchNorm)",
    },
    "rescale": {
        "quantity": r"$|\theta_{A_1}|^2 - |\theta_{A_2}|^2$",
        "short": "rescale (homogeneous hidden units)",
        "title": "rescale symmetry (hidden units between homogeneous layers)",
    },
}

X_LABEL = {
    "steps": "optimizer step",
    "time": r"time $t_k = \sum_{j<k} \eta_j (1-\delta)$",
    "epoch": "epoch",
}

# Short names of hyperparameters in panel titles.
HP_SHORT = {
    "lr": r"$\eta$",
    "wd": r"$\lambda$",
    "momentum": r"$\beta$",
    "dampening": r"$\delta$",
    "train_batch_size": "B",
}


def kind_label(kind: str, field: str, default: str | None = None) -> str:
    """One text of a symmetry kind.

    Args:
        kind: "translation", "scale" or "rescale".
        field: "quantity", "short" or "title".
        default: returned for an unknown kind (default: the kind's name).
    """
    entry = KIND_LABELS.get(kind)
    if entry is None:
        return kind if default is None else default
    return entry[field]


def conservation_kind(metric: str, stored: str = "") -> str:
    """The symmetry kind of a conservation cache: its ``kind`` attribute, else the kind its
    name starts with (``scale_b`` -> scale)."""
    if stored in CONSERVATION:
        return stored
    if metric in CONSERVATION:
        return metric
    return next((k for k in CONSERVATION if metric.startswith(k)), "scale")
