"""The words and symbols of the figures: per symmetry kind, axes, hyperparameters.

`KIND_LABELS` is the only table of per-kind texts (quantity symbol, short panel title, figure
title), taken from the kind specs of `Utils.kinds`; every figure family reads it through
`kind_label`.
"""

from __future__ import annotations

from Utils.kinds import KIND_NAMES, KINDS

# The symmetry kinds, in the order of `Utils.kinds` (their texts are the specs' own).
CONSERVATION = KIND_NAMES

KIND_LABELS: dict[str, dict[str, str]] = {
    name: {"quantity": spec.quantity_label, "short": spec.short_title, "title": spec.title}
    for name, spec in KINDS.items()
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
