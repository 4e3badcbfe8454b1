"""The `tinyimagenet` model class: VGG, ResNet and wide ResNet for small images (any C, H, W).

Written for this project (not copied from torchvision) from the published architectures:

* ``vgg11/13/16/19`` and ``-bn``: 3x3 conv stacks (64-128-256-512-512 channels) with a
  MaxPool(2) after each stage while both spatial sizes are at least 2, then
  AdaptiveAvgPool2d(1), Flatten and a classifier Linear(512, 512) ReLU Linear(512, 512) ReLU
  Linear(512, num_classes) (no dropout, so runs are deterministic). Convs have biases.
* ``resnet18/34`` (basic blocks) and ``resnet50/101/152`` (bottleneck blocks, stride on the
  3x3 conv): images with both sides >= 128 get the ImageNet stem (7x7 stride-2 conv + BN +
  ReLU + 3x3 stride-2 max-pool); smaller images (Tiny ImageNet 64x64, CIFAR 32x32, MNIST
  28x28) get a 3x3 stride-1 conv + BN + ReLU stem without max-pool. Stages of 64-128-256-512
  planes, stride 2 from the second stage on, AdaptiveAvgPool2d(1), Flatten, Linear.
* ``wide-resnetN``: the blocks' inner width doubled (as wide_resnet50_2): the bottleneck's
  1x1 and 3x3 convs have 2x planes channels, its output stays 4x planes; a basic block's first
  conv has 2x planes output channels, its second maps back to planes.
* ``-nobn``: every BatchNorm2d replaced by nn.Identity; convs then get biases, and the last
  conv of each residual branch starts scaled by 1/sqrt(number of blocks) so that the
  forward signal of deep nets stays finite at initialisation.

All forwards are free of data-dependent control flow, residual sums are ``out + identity``
and every ReLU is its own (not in-place) nn.ReLU module, so `torch.fx.symbolic_trace` gives an
explicit graph. Shortcuts without projection are an empty nn.Sequential (no graph node).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from functools import partial

import torch
from torch import nn

from Models.registry import register_model
from Utils.errors import UsageError

VGG_CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}
VGG_HIDDEN = 512

RESNET_CONFIGS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
RESNET_PLANES = (64, 128, 256, 512)
BOTTLENECK_EXPANSION = 4
LARGE_STEM_MIN_SIZE = 128


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    """Checks that the input is an image ``(C, H, W)``."""
    if len(input_shape) != 3:
        raise UsageError(
            f"tinyimagenet model '{name}' needs an image input_shape (C, H, W), got "
            f"{tuple(input_shape)}; use a 'default' model for 1-D signals"
        )
    channels, height, width = input_shape
    return channels, height, width


def _norm(channels: int, bn: bool) -> nn.Module:
    """BatchNorm2d, or nn.Identity for the -nobn variants."""
    return nn.BatchNorm2d(channels) if bn else nn.Identity()


def _init_weights(model: nn.Module, classifier: nn.Linear) -> None:
    """He (fan-in, ReLU) normal init for convs and hidden Linears, zero biases, BN = (1, 0).

    The classifier keeps PyTorch's default init.
    """
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and module is not classifier:
            nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class VGG(nn.Module):
    """VGG for images of any size, channel count and class count.

    Args:
        input_shape: ``(C, H, W)``.
        num_classes: number of logits.
        stages: conv widths of each stage (a max-pool follows each stage while H, W >= 2).
        bn: BatchNorm2d after every conv (before its ReLU).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        stages: tuple[tuple[int, ...], ...],
        bn: bool,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        layers: list[tuple[str, nn.Module]] = []
        index = 0
        for stage, widths in enumerate(stages, start=1):
            for out_channels in widths:
                index += 1
                conv = nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)
                layers.append((f"conv{index}", conv))
                if bn:
                    layers.append((f"bn{index}", nn.BatchNorm2d(out_channels)))
                layers.append((f"relu{index}", nn.ReLU()))
                channels = out_channels
            if min(height, width) >= 2:
                layers.append((f"pool{stage}", nn.MaxPool2d(kernel_size=2)))
                height, width = height // 2, width // 2
        self.features = nn.Sequential(OrderedDict(layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.classifier = nn.Sequential(
            OrderedDict(
                [
                    ("fc1", nn.Linear(channels, VGG_HIDDEN)),
                    ("relu1", nn.ReLU()),
                    ("fc2", nn.Linear(VGG_HIDDEN, VGG_HIDDEN)),
                    ("relu2", nn.ReLU()),
                    ("fc3", nn.Linear(VGG_HIDDEN, num_classes)),
                ]
            )
        )
        _init_weights(self, self.classifier.fc3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        x = self.features(x)  # [B, 512, h, w]
        x = self.flatten(self.avgpool(x))  # [B, 512]
        return self.classifier(x)  # [B, num_classes]


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection: relu(bn2(conv2(relu(bn1(conv1 x)))) + x).

    Args:
        in_channels: input channels.
        planes: output channels.
        stride: stride of the first conv (and of the projection shortcut).
        bn: BatchNorm2d (True) or nn.Identity (False) after each conv.
        widen: factor on the inner width (output channels of conv1).
    """

    def __init__(self, in_channels: int, planes: int, stride: int, bn: bool, widen: int) -> None:
        super().__init__()
        inner = planes * widen
        self.out_channels = planes
        self.conv1 = nn.Conv2d(in_channels, inner, 3, stride=stride, padding=1, bias=not bn)
        self.bn1 = _norm(inner, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, planes, 3, padding=1, bias=not bn)
        self.bn2 = _norm(planes, bn)
        self.shortcut = _shortcut(in_channels, planes, stride, bn)
        self.relu_out = nn.ReLU()

    @property
    def last_conv(self) -> nn.Conv2d:
        """The conv that ends the residual branch."""
        return self.conv2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W] -> [B, planes, H / stride, W / stride]``."""
        identity = self.shortcut(x)  # [B, planes, h, w]
        out = self.relu1(self.bn1(self.conv1(x)))  # [B, inner, h, w]
        out = self.bn2(self.conv2(out))  # [B, planes, h, w]
        return self.relu_out(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided), 1x1 expand convs with a residual connection.

    Args:
        in_channels: input channels.
        planes: base width; the output has ``4 * planes`` channels.
        stride: stride of the 3x3 conv (and of the projection shortcut).
        bn: BatchNorm2d (True) or nn.Identity (False) after each conv.
        widen: factor on the inner width (channels of the 1x1 reduce and the 3x3 conv).
    """

    def __init__(self, in_channels: int, planes: int, stride: int, bn: bool, widen: int) -> None:
        super().__init__()
        inner = planes * widen
        out_channels = planes * BOTTLENECK_EXPANSION
        self.out_channels = out_channels
        self.conv1 = nn.Conv2d(in_channels, inner, 1, bias=not bn)
        self.bn1 = _norm(inner, bn)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(inner, inner, 3, stride=stride, padding=1, bias=not bn)
        self.bn2 = _norm(inner, bn)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(inner, out_channels, 1, bias=not bn)
        self.bn3 = _norm(out_channels, bn)
        self.shortcut = _shortcut(in_channels, out_channels, stride, bn)
        self.relu_out = nn.ReLU()

    @property
    def last_conv(self) -> nn.Conv2d:
        """The conv that ends the residual branch."""
        return self.conv3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, in_channels, H, W] -> [B, 4 * planes, H / stride, W / stride]``."""
        identity = self.shortcut(x)  # [B, 4 * planes, h, w]
        out = self.relu1(self.bn1(self.conv1(x)))  # [B, inner, H, W]
        out = self.relu2(self.bn2(self.conv2(out)))  # [B, inner, h, w]
        out = self.bn3(self.conv3(out))  # [B, 4 * planes, h, w]
        return self.relu_out(out + identity)


def _shortcut(in_channels: int, out_channels: int, stride: int, bn: bool) -> nn.Sequential:
    """1x1 projection (+ norm) when the shape changes, else an empty Sequential (identity)."""
    if stride == 1 and in_channels == out_channels:
        return nn.Sequential()
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not bn)),
                ("bn", _norm(out_channels, bn)),
            ]
        )
    )


class ResNet(nn.Module):
    """ResNet / wide ResNet for images of any size, channel count and class count.

    Args:
        input_shape: ``(C, H, W)``; both sides >= 128 select the ImageNet stem.
        num_classes: number of logits.
        block: "basic" or "bottleneck".
        depths: number of blocks in each of the four stages.
        bn: BatchNorm2d after every conv, or nn.Identity (the -nobn variants).
        widen: factor on the blocks' inner width (2 for wide ResNets).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        block: str,
        depths: tuple[int, int, int, int],
        bn: bool,
        widen: int = 1,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        stem_channels = RESNET_PLANES[0]
        if min(height, width) >= LARGE_STEM_MIN_SIZE:
            stem = [
                ("conv", nn.Conv2d(channels, stem_channels, 7, stride=2, padding=3, bias=not bn)),
                ("bn", _norm(stem_channels, bn)),
                ("relu", nn.ReLU()),
                ("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        else:
            stem = [
                ("conv", nn.Conv2d(channels, stem_channels, 3, padding=1, bias=not bn)),
                ("bn", _norm(stem_channels, bn)),
                ("relu", nn.ReLU()),
            ]
        self.stem = nn.Sequential(OrderedDict(stem))
        block_class = BasicBlock if block == "basic" else Bottleneck
        in_channels = stem_channels
        stages = []
        for stage, (planes, depth) in enumerate(zip(RESNET_PLANES, depths)):
            blocks = []
            for i in range(depth):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(block_class(in_channels, planes, stride, bn, widen))
                in_channels = blocks[-1].out_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(in_channels, num_classes)
        _init_weights(self, self.fc)
        if not bn:
            scale = 1.0 / math.sqrt(sum(depths))
            with torch.no_grad():
                for module in self.modules():
                    if isinstance(module, (BasicBlock, Bottleneck)):
                        module.last_conv.weight.mul_(scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of images ``[B, C, H, W]``."""
        x = self.stem(x)  # [B, 64, H', W']
        x = self.layer1(x)  # [B, 64 or 256, H', W']
        x = self.layer2(x)  # [B, 128 or 512, H' / 2, W' / 2]
        x = self.layer3(x)  # [B, 256 or 1024, H' / 4, W' / 4]
        x = self.layer4(x)  # [B, 512 or 2048, H' / 8, W' / 8]
        x = self.flatten(self.avgpool(x))  # [B, 512 or 2048]
        return self.fc(x)  # [B, num_classes]


def _build_vgg(
    input_shape: tuple[int, ...], num_classes: int, *, name: str, depth: int, bn: bool
) -> nn.Module:
    """Builder for the registered VGG variants."""
    return VGG(_image_shape(name, input_shape), num_classes, VGG_CONFIGS[depth], bn)


def _build_resnet(
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    name: str,
    depth: int,
    bn: bool,
    widen: int,
) -> nn.Module:
    """Builder for the registered ResNet variants."""
    block, depths = RESNET_CONFIGS[depth]
    return ResNet(_image_shape(name, input_shape), num_classes, block, depths, bn, widen)


def _register_all() -> None:
    """Registers vgg*, vgg*-bn, resnet*, wide-resnet* and their -nobn variants."""
    for bn in (False, True):
        for depth in VGG_CONFIGS:
            name = f"vgg{depth}" + ("-bn" if bn else "")
            register_model(name, "tinyimagenet")(partial(_build_vgg, name=name, depth=depth, bn=bn))
    for prefix, widen in (("resnet", 1), ("wide-resnet", 2)):
        for bn in (True, False):
            for depth in RESNET_CONFIGS:
                name = f"{prefix}{depth}" + ("" if bn else "-nobn")
                builder = partial(_build_resnet, name=name, depth=depth, bn=bn, widen=widen)
                register_model(name, "tinyimagenet")(builder)


_register_all()
