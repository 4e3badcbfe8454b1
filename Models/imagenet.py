"""The `imagenet` and `torchvision` model classes: torchvision's classification builders.

* `imagenet`: VGG 11/13/16/19 (with ``_bn``), ResNet 18/34/50/101/152 and wide_resnet50_2 /
  wide_resnet101_2, named as torchvision spells them (``resnet18``, ``vgg11_bn``, ...).
* `torchvision`: every classification builder of ``torchvision.models`` (mobilenet_v2,
  densenet121, efficientnet_b0, vit_b_16, ...).

Models are always built with ``weights=None`` and the requested ``num_classes``; pretrained
weights come from ``<model_dir>/<class>/<name>.pt`` via `get_model(..., pretrained=True)`.

These architectures expect RGB images: an input_shape that is not ``(3, H, W)`` raises
`UsageError` (rather than silently replacing the first conv, which would also make
torchvision's pretrained weights unusable). Builders that need the image size get it:
ViTs (``image_size``, square images only) and MaxViT (``input_size``). GoogLeNet and
Inception v3 are built without auxiliary heads so that they return plain logits.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torchvision
from torch import nn

from Models.registry import register_model
from Utils.errors import UsageError

IMAGENET_MODELS = (
    *(f"vgg{d}" for d in (11, 13, 16, 19)),
    *(f"vgg{d}_bn" for d in (11, 13, 16, 19)),
    *(f"resnet{d}" for d in (18, 34, 50, 101, 152)),
    "wide_resnet50_2",
    "wide_resnet101_2",
)

# Smallest image side some architectures accept (their stems shrink the input below 1 pixel).
MIN_SIZES = {"alexnet": 63, "inception_v3": 75}


def _size_kwargs(name: str, height: int, width: int) -> dict[str, Any]:
    """Extra builder arguments some torchvision architectures need."""
    if name.startswith("vit_"):
        if height != width:
            raise UsageError(
                f"torchvision model '{name}' needs square images, got {height}x{width}; "
                "resize the data or choose another model"
            )
        return {"image_size": height}
    if name.startswith("maxvit_"):
        return {"input_size": (height, width)}
    if name in ("googlenet", "inception_v3"):
        return {"aux_logits": False, "init_weights": True}
    return {}


def _build_torchvision(
    input_shape: tuple[int, ...], num_classes: int, *, name: str, model_class: str
) -> nn.Module:
    """Builds torchvision's `name` with ``weights=None`` for RGB images ``(3, H, W)``."""
    if len(input_shape) != 3 or input_shape[0] != 3:
        raise UsageError(
            f"{model_class} model '{name}' expects RGB images (3, H, W), got input_shape "
            f"{tuple(input_shape)}; use a 'tinyimagenet' or 'default' model for other inputs"
        )
    _, height, width = input_shape
    minimum = MIN_SIZES.get(name, 1)
    if min(height, width) < minimum:
        raise UsageError(
            f"{model_class} model '{name}' needs images of at least {minimum}x{minimum}, got "
            f"{height}x{width}; resize the data or choose another model"
        )
    kwargs = _size_kwargs(name, height, width)
    try:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    except (ValueError, AssertionError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UsageError(
            f"torchvision cannot build '{name}' for input_shape {tuple(input_shape)}: {reason}"
        ) from None


def _register_all() -> None:
    """Registers the `imagenet` list and every torchvision classification builder."""
    for name in IMAGENET_MODELS:
        builder = partial(_build_torchvision, name=name, model_class="imagenet")
        register_model(name, "imagenet")(builder)
    for name in torchvision.models.list_models(module=torchvision.models):
        builder = partial(_build_torchvision, name=name, model_class="torchvision")
        register_model(name, "torchvision")(builder)


_register_all()
