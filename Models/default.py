"""The `default` model class: small networks for Fashion-MNIST, CIFAR and MNIST-1D.

Every model takes ``(C, H, W)`` images (Conv2d, BatchNorm2d, MaxPool2d) or ``(C, L)`` 1-D
signals (Conv1d, BatchNorm1d, MaxPool1d); fully connected models flatten either. A max-pool
(kernel 2) is added after a conv block only while every spatial size is at least 2, so any
input size works. Layers are named (``conv1``, ``bn1``, ``relu1``, ``pool1``, ``fc1``, ...,
``classifier``) so that symmetry groups get readable names.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass

from torch import nn

from Models.registry import register_model

FC_WIDTH = 100
FC_LAYERS = 6
CONV_WIDTHS = (32, 64, 128)
VGG_DEMO_WIDTHS = (16, 32, 32)
VGG_DEMO_HIDDEN = 128


@dataclass(frozen=True)
class _Ops:
    """Layer types and sizes for one input shape."""

    channels: int
    spatial: tuple[int, ...]
    conv: type[nn.Module]
    bn: type[nn.Module]
    pool: type[nn.Module]


def _ops(input_shape: tuple[int, ...]) -> _Ops:
    """Picks 1-D or 2-D layers for an input shape ``(C, L)`` or ``(C, H, W)``."""
    channels, *spatial = input_shape
    if len(spatial) == 1:
        return _Ops(channels, tuple(spatial), nn.Conv1d, nn.BatchNorm1d, nn.MaxPool1d)
    return _Ops(channels, tuple(spatial), nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d)


def _conv_blocks(
    ops: _Ops, widths: tuple[int, ...], bn: tuple[bool, ...]
) -> tuple[list[tuple[str, nn.Module]], int]:
    """Conv(3, pad 1) [+ BN] + ReLU [+ MaxPool(2)] blocks.

    Args:
        ops: layer types and input sizes.
        widths: output channels of each conv.
        bn: whether each conv feeds a BatchNorm.

    Returns:
        The named layers, and the number of features after flattening their output.
    """
    layers: list[tuple[str, nn.Module]] = []
    channels, spatial = ops.channels, ops.spatial
    for i, (width, use_bn) in enumerate(zip(widths, bn), start=1):
        layers.append((f"conv{i}", ops.conv(channels, width, kernel_size=3, padding=1)))
        if use_bn:
            layers.append((f"bn{i}", ops.bn(width)))
        layers.append((f"relu{i}", nn.ReLU()))
        if min(spatial) >= 2:
            layers.append((f"pool{i}", ops.pool(kernel_size=2)))
            spatial = tuple(s // 2 for s in spatial)
        channels = width
    return layers, channels * math.prod(spatial)


def _fc_net(input_shape: tuple[int, ...], num_classes: int, bn: bool) -> nn.Sequential:
    """Flatten + 5 hidden Linear(100) [+ BatchNorm1d] + ReLU + Linear classifier."""
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    features = math.prod(input_shape)
    for i in range(1, FC_LAYERS):
        layers.append((f"fc{i}", nn.Linear(features, FC_WIDTH)))
        if bn:
            layers.append((f"bn{i}", nn.BatchNorm1d(FC_WIDTH)))
        layers.append((f"relu{i}", nn.ReLU()))
        features = FC_WIDTH
    layers.append(("classifier", nn.Linear(features, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def _conv_net(input_shape: tuple[int, ...], num_classes: int, bn: bool) -> nn.Sequential:
    """Three conv blocks (32-64-128 channels) + Flatten + Linear classifier."""
    ops = _ops(input_shape)
    layers, features = _conv_blocks(ops, CONV_WIDTHS, (bn,) * len(CONV_WIDTHS))
    layers += [("flatten", nn.Flatten()), ("classifier", nn.Linear(features, num_classes))]
    return nn.Sequential(OrderedDict(layers))


@register_model("logistic")
def logistic(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Multinomial logistic regression: Flatten + one Linear layer.

    Args:
        input_shape: ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of logits.

    Returns:
        The model, ``[B, *input_shape] -> [B, num_classes]``.
    """
    features = math.prod(input_shape)
    return nn.Sequential(
        OrderedDict([("flatten", nn.Flatten()), ("classifier", nn.Linear(features, num_classes))])
    )


@register_model("fc")
def fc(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Fully connected net: 6 Linear layers of width 100 with ReLU between.

    Args:
        input_shape: ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of logits.

    Returns:
        The model, ``[B, *input_shape] -> [B, num_classes]``.
    """
    return _fc_net(input_shape, num_classes, bn=False)


@register_model("fc-bn")
def fc_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`fc` with BatchNorm1d after each hidden Linear (before its ReLU).

    Args:
        input_shape: ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of logits.

    Returns:
        The model, ``[B, *input_shape] -> [B, num_classes]``.
    """
    return _fc_net(input_shape, num_classes, bn=True)


@register_model("conv")
def conv(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """Conv net: 3 blocks Conv(3x3) + ReLU + MaxPool(2) (32-64-128 channels), Linear classifier.

    Args:
        input_shape: ``(C, H, W)`` (2-D convs) or ``(C, L)`` (1-D convs).
        num_classes: number of logits.

    Returns:
        The model, ``[B, *input_shape] -> [B, num_classes]``.
    """
    return _conv_net(input_shape, num_classes, bn=False)


@register_model("conv-bn")
def conv_bn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`conv` with BatchNorm after each conv (before its ReLU).

    Args:
        input_shape: ``(C, H, W)`` (2-D convs) or ``(C, L)`` (1-D convs).
        num_classes: number of logits.

    Returns:
        The model, ``[B, *input_shape] -> [B, num_classes]``.
    """
    return _conv_net(input_shape, num_classes, bn=True)


@register_model("vgg-demo")
def vgg_demo(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The project's demo model: a small VGG-style net holding all three symmetries.

    Layout (2-D case; 1-D inputs use the 1-D layers)::

        conv1(16) bn1 relu1 pool1       conv1 feeds BatchNorm      -> scale
        conv2(32) bn2 relu2 pool2       conv2 feeds BatchNorm      -> scale
        conv3(32)     relu3 pool3       conv3 -> fc1 via ReLU, max-pool, flatten -> rescale
        flatten fc1(128) relu_fc1       fc1 -> classifier via ReLU -> rescale
        classifier                      Linear into softmax cross-entropy -> translation

    Args:
        input_shape: ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of logits.

    Returns:
        The model, ``[B, *input_shape] -> [B, num_classes]``.
    """
    ops = _ops(input_shape)
    layers, features = _conv_blocks(ops, VGG_DEMO_WIDTHS, (True, True, False))
    layers += [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Linear(features, VGG_DEMO_HIDDEN)),
        ("relu_fc1", nn.ReLU()),
        ("classifier", nn.Linear(VGG_DEMO_HIDDEN, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))
