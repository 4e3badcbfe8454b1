"""Loss registry: softmax cross-entropy, negative log-likelihood and mean squared error."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from Utils.registry import Registry

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
LOSSES: Registry[LossFn] = Registry("loss")


@LOSSES.register("ce", symmetric_translation=True)
def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy, mean over the batch.

    Args:
        logits: [B, C] model outputs.
        targets: [B] class indices.
    """
    return F.cross_entropy(logits, targets)


@LOSSES.register("nll", symmetric_translation=False)
def negative_log_likelihood(log_probs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood of models that end in log_softmax, mean over the batch.

    Not translation-symmetric by itself: the model's final log_softmax is (symmetry
    detection finds the translation group through it).

    Args:
        log_probs: [B, C] log-probabilities (the output of a final log_softmax).
        targets: [B] class indices.
    """
    return F.nll_loss(log_probs, targets)


@LOSSES.register("mse", symmetric_translation=False)
def mean_squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error against one-hot targets (class indices) or float targets.

    Sum over outputs, mean over the batch, halved: 0.5 * mean_b |f(x_b) - y_b|^2.

    Args:
        outputs: [B, C] model outputs.
        targets: [B] class indices or [B, C] float targets.
    """
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        targets = F.one_hot(targets.long(), outputs.shape[-1]).to(outputs.dtype)  # [B, C]
    return 0.5 * (outputs - targets.to(outputs.dtype)).pow(2).sum(dim=-1).mean()


def loss_fn(name: str) -> LossFn:
    """The loss function registered as `name` (raises UnknownNameError otherwise)."""
    return LOSSES.get(name)
