"""The public API: track the symmetry groups of any model in any training loop.

Everything a script of one's own needs, in one import (docs/API.md has a full example)::

    from Utils.api import TrackingSGD, detect_groups, track

    groups = detect_groups(model, x, y)                  # any nn.Module, one batch
    optimizer = torch.optim.AdamW(model.parameters())    # any torch optimizer ...
    # ... or TrackingSGD(model.named_parameters(), lr, momentum=0.9, groups=groups) for the
    #     exact discrete-time theory of SGD
    tracker = track(model, optimizer, groups, run_dir="results/mine/run1", every=1)
    for x, y in batches:                                 # the loop is not changed
        ...; loss.backward(); optimizer.step()
        tracker.measured(); tracker.theory(); tracker.errors()   # in memory, at any step
    tracker.log({"test_loss": 0.3})                      # evaluation metrics of this step
    LiveFeedback(tracker, tensorboard_dir="results/mine/run1/tensorboard")  # lines, TensorBoard
    tracker.close()                                      # then: cache.py, plot.py

train.py records the same way with ``--track-online N`` (Utils/training.py attaches this
tracker), so a run of one's own loop and a train.py run are read by the same code.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from Utils.groups import Member, SymmetryGroup, groups_from_json, groups_to_json
from Utils.kinds import KINDS
from Utils.live import LiveFeedback
from Utils.online import FIELDS, ONLINE_FILE, Tracker, default_config, relative_error, track
from Utils.optimizers import TrackingSGD
from Utils.symmetry import detect, format_table
from Utils.theory import measure


def detect_groups(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: str = "ce",
    tol: float | None = None,
) -> list[SymmetryGroup]:
    """Finds and verifies the symmetry groups of any fx-traceable model on one batch.

    The check runs a forward and backward pass in train mode; the model's state (BatchNorm
    running statistics), its gradients and torch's random state are restored afterwards, so
    detection leaves no trace on training.

    Args:
        model: the network, on the device and in the dtype of `inputs`.
        inputs: a batch ``[B, ...]``.
        targets: its targets (class indices for ``ce``, values for ``mse``).
        loss: "ce" (softmax cross-entropy: translation groups at the last layer) or "mse".
        tol: relative violation above which a group is reported invalid (default: by dtype).

    Returns:
        Every group found (`SymmetryGroup`: kind, layer name, size, members; ``valid`` and
        ``reason`` say whether the theory applies). `format_table` prints them.
    """
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    grads = {n: (None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()}
    rng = torch.get_rng_state()
    was_training = model.training
    try:
        return detect(model, inputs, targets, loss=loss, tol=tol)
    finally:
        model.load_state_dict(saved)
        torch.set_rng_state(rng)
        for n, p in model.named_parameters():
            p.grad = grads[n]
        model.train(was_training)


def measure_groups(model: nn.Module, groups: Sequence[SymmetryGroup]) -> dict[str, Tensor]:
    """The measured quantity of every group for the model's current parameters.

    Args:
        model: the network.
        groups: its groups.

    Returns:
        group key -> float64 [size]: translation S, scale Q, rescale R per neuron
        (`Utils.theory.measure`).
    """
    params = dict(model.named_parameters())
    return {g.key: measure(g, params) for g in groups if all(n in params for n in g.params)}


__all__ = [
    "FIELDS",
    "KINDS",
    "LiveFeedback",
    "ONLINE_FILE",
    "Member",
    "SymmetryGroup",
    "Tracker",
    "TrackingSGD",
    "default_config",
    "detect_groups",
    "format_table",
    "groups_from_json",
    "groups_to_json",
    "measure",
    "measure_groups",
    "relative_error",
    "track",
]
