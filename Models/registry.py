"""Model registries (one per model class), input-shape checks and pretrained-weight loading.

A model builder has the signature ``fn(input_shape, num_classes) -> nn.Module`` where
``input_shape`` excludes the batch dimension: ``(C, H, W)`` for images, ``(C, L)`` for 1-D
signals. Builders are registered with `register_model` and built with `get_model`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from Utils.errors import CorruptFileError, DataMissingError, UsageError
from Utils.registry import Registry

MODEL_CLASSES = ("default", "tinyimagenet", "imagenet", "torchvision")

Builder = Callable[[tuple[int, ...], int], nn.Module]

_CLASSES: Registry[Registry[Builder]] = Registry("model class")
for _cls in MODEL_CLASSES:
    _CLASSES.add(_cls, Registry(f"{_cls} model"))

# Classes whose weights usually come from torchvision (downloaded elsewhere).
_TORCHVISION_CLASSES = ("imagenet", "torchvision")


def register_model(name: str, model_class: str = "default") -> Callable[[Builder], Builder]:
    """Decorator that registers a model builder under `name` in `model_class`.

    Args:
        name: the model's name, e.g. "vgg-demo".
        model_class: one of `MODEL_CLASSES`.

    Returns:
        A decorator that registers the builder and returns it unchanged.

    Raises:
        UnknownNameError: if `model_class` is not one of `MODEL_CLASSES`.
    """
    return _CLASSES.get(model_class).register(name)


def list_models(model_class: str) -> list[str]:
    """Names of the models of one class, in registration order.

    Args:
        model_class: one of `MODEL_CLASSES`.

    Returns:
        The registered model names.

    Raises:
        UnknownNameError: if `model_class` is unknown, listing the valid classes.
    """
    return _CLASSES.get(model_class).names()


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """Validates an input shape without batch dimension and returns it as a tuple of ints.

    Args:
        input_shape: ``(C, H, W)`` or ``(C, L)`` with positive entries.

    Returns:
        The shape as a tuple of Python ints.

    Raises:
        UsageError: if the shape does not have 2 or 3 positive integer entries.
    """
    try:
        shape = tuple(int(d) for d in input_shape)
        exact = all(int(d) == d for d in input_shape)
    except (TypeError, ValueError):
        raise UsageError(
            f"input_shape {input_shape!r} is not a sequence of integers; give (C, H, W) or (C, L)"
        ) from None
    if not exact or len(shape) not in (2, 3) or min(shape) < 1:
        raise UsageError(
            f"input_shape {tuple(input_shape)} is invalid; give (C, H, W) for images or (C, L) "
            "for 1-D signals, with positive sizes and no batch dimension"
        )
    return shape


def pretrained_path(name: str, model_class: str, model_dir: str | Path) -> Path:
    """Where `get_model(..., pretrained=True)` looks for a model's state dict.

    Args:
        name: model name.
        model_class: model class.
        model_dir: root folder of pretrained weights.

    Returns:
        ``<model_dir>/<model_class>/<name>.pt``.
    """
    return Path(model_dir) / model_class / f"{name}.pt"


def get_model(
    name: str,
    model_class: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    pretrained: bool = False,
    model_dir: str = "Models/pretrained",
) -> nn.Module:
    """Builds a registered model, optionally loading its weights.

    Args:
        name: model name, see `list_models(model_class)`, or ``package.module:builder``
            (a user's builder, imported; see Utils/plugins.py).
        model_class: one of `MODEL_CLASSES`.
        input_shape: input shape without batch dimension, ``(C, H, W)`` or ``(C, L)``.
        num_classes: number of output logits.
        pretrained: load the state dict saved at ``<model_dir>/<model_class>/<name>.pt``.
        model_dir: root folder of pretrained weights.

    Returns:
        The model (in train mode) mapping ``[B, *input_shape]`` to logits ``[B, num_classes]``.

    Raises:
        UnknownNameError: unknown model class or name, listing the valid ones.
        UsageError: invalid input shape or class count, or an input the model cannot take.
        DataMissingError: `pretrained` and the weight file is absent.
        CorruptFileError: `pretrained` and the file cannot be read or does not fit the model.
    """
    from Utils import plugins

    if plugins.is_import_spec(name):  # --model package.module:builder (Utils/plugins.py)
        builder = lambda s, n: plugins.build_model(name, s, n)  # noqa: E731
    else:
        builder = _CLASSES.get(model_class).get(name)
    shape = check_input_shape(input_shape)
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise UsageError(f"num_classes must be a positive integer, got {num_classes!r}")
    model = builder(shape, int(num_classes))
    if pretrained:
        load_pretrained(model, name, model_class, model_dir)
    return model


def load_pretrained(model: nn.Module, name: str, model_class: str, model_dir: str | Path) -> None:
    """Loads ``<model_dir>/<model_class>/<name>.pt`` into `model` (strict keys and shapes).

    Args:
        model: the freshly built model.
        name: model name.
        model_class: model class.
        model_dir: root folder of pretrained weights.

    Raises:
        DataMissingError: the file is absent (the message names the exact path).
        CorruptFileError: the file is not a readable state dict or does not match the model.
    """
    path = pretrained_path(name, model_class, model_dir)
    if not path.is_file():
        hint = f"save a state dict there with torch.save(model.state_dict(), '{path}')"
        if model_class in _TORCHVISION_CLASSES:
            hint = (
                "torchvision weights must be downloaded elsewhere (e.g. "
                f"torchvision.models.get_model('{name}', weights='DEFAULT') on a machine with "
                f"internet) and saved there with torch.save(model.state_dict(), '{path}')"
            )
        raise DataMissingError(f"pretrained weights not found at {path}; {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure means a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CorruptFileError(
            f"cannot read pretrained weights {path} ({first}); re-save them with "
            "torch.save(model.state_dict(), path)"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise CorruptFileError(
            f"{path} does not hold a state dict (name -> tensor); re-save it with "
            "torch.save(model.state_dict(), path)"
        )
    problems = _state_dict_mismatch(model.state_dict(), state)
    if problems:
        raise CorruptFileError(
            f"pretrained weights {path} do not fit model '{name}' ({model_class}): "
            f"{problems}; were they saved for another architecture, input_shape or num_classes?"
        )
    model.load_state_dict(state, strict=True)


def _state_dict_mismatch(
    expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor], shown: int = 3
) -> str:
    """Describes key and shape differences between two state dicts in one line ('' if none)."""

    def listed(names: list[str]) -> str:
        more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
        return ", ".join(names[:shown]) + more

    missing = [k for k in expected if k not in found]
    unexpected = [k for k in found if k not in expected]
    reshaped = [
        f"{k} {tuple(found[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in found and found[k].shape != v.shape
    ]
    parts = []
    if missing:
        parts.append(f"missing keys {listed(missing)}")
    if unexpected:
        parts.append(f"unexpected keys {listed(unexpected)}")
    if reshaped:
        parts.append(f"shape mismatch {listed(reshaped)}")
    return "; ".join(parts)
