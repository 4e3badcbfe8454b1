"""Models and datasets of one's own from the command line: ``--model package.module:builder``.

A name with a colon is imported instead of looked up in a registry (the current folder is
searched first, as ``python -m`` does):

* ``--model pkg.mod:fn``: ``fn(input_shape, num_classes) -> nn.Module``, the signature of
  the builders in Models/ (input_shape without the batch axis, e.g. ``(1, 28, 28)``);
* ``--dataset pkg.mod:fn``: ``fn() -> (x_train, y_train, x_test, y_test)`` tensors, inputs
  ``[N, *input_shape]`` float and labels ``[N]`` int64 (classification) or targets ``[N, K]``
  float (regression); it is served by the in-memory path, unnormalised and unaugmented.

Any failure to import, find or call the builder is one `UsageError` line naming the flag,
the problem and what the builder must look like.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from Utils.errors import UsageError

MODEL_SIGNATURE = "fn(input_shape, num_classes) -> torch.nn.Module"
DATASET_SIGNATURE = "fn() -> (x_train, y_train, x_test, y_test) tensors"


def is_import_spec(name: str) -> bool:
    """Whether a --model/--dataset value names ``package.module:attribute``."""
    return ":" in str(name)


def load_object(spec: str, flag: str, signature: str) -> Callable[..., Any]:
    """Imports ``package.module:attribute`` and returns the callable.

    Args:
        spec: ``package.module:attribute`` (the attribute may be dotted: ``mod:Class.build``).
        flag: the flag that named it (for the message), e.g. ``--model``.
        signature: what the callable must look like (for the message).

    Raises:
        UsageError: a malformed spec, a module that cannot be imported, a missing attribute
            or one that is not callable.
    """
    module_name, _, attribute = str(spec).partition(":")
    if not module_name or not attribute:
        raise UsageError(f"{flag} {spec}: write package.module:builder with a {signature}")
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:  # any import-time failure of the user's module
        raise UsageError(
            f"{flag} {spec}: cannot import {module_name} ({type(err).__name__}: "
            f"{_first_line(err)}); run from the folder that holds it or add it to PYTHONPATH"
        ) from None
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise UsageError(
                f"{flag} {spec}: {module_name} has no attribute {attribute}; define a {signature}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise UsageError(f"{flag} {spec}: {attribute} is not callable; define a {signature}")
    return obj


def build_model(spec: str, input_shape: tuple[int, ...], num_classes: int):
    """Calls a user's model builder and checks that it returns a module.

    Raises:
        UsageError: the builder cannot be loaded, raises, or returns something else.
    """
    from torch import nn

    builder = load_object(spec, "--model", MODEL_SIGNATURE)
    try:
        model = builder(tuple(input_shape), int(num_classes))
    except Exception as err:  # the user's code: report it as one line
        raise UsageError(
            f"--model {spec}: {spec}({tuple(input_shape)}, {int(num_classes)}) raised "
            f"{type(err).__name__}: {_first_line(err)}; it must be a {MODEL_SIGNATURE}"
        ) from None
    if not isinstance(model, nn.Module):
        raise UsageError(
            f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module; it must be "
            f"a {MODEL_SIGNATURE}"
        )
    return model


def dataset_tensors(spec: str) -> tuple:
    """Calls a user's dataset builder and checks its tensors.

    Returns:
        (x_train, y_train, x_test, y_test, task, num_classes).

    Raises:
        UsageError: the builder cannot be loaded, raises, or returns tensors of the wrong form.
    """
    import torch

    builder = load_object(spec, "--dataset", DATASET_SIGNATURE)
    try:
        out = builder()
    except Exception as err:  # the user's code: report it as one line
        raise UsageError(
            f"--dataset {spec}: {spec}() raised {type(err).__name__}: {_first_line(err)}; it "
            f"must be a {DATASET_SIGNATURE}"
        ) from None
    ok = isinstance(out, tuple | list) and len(out) == 4
    ok = ok and all(isinstance(t, torch.Tensor) for t in out)
    if ok:
        x_train, y_train, x_test, y_test = out
        ok = (
            x_train.ndim in (3, 4)
            and x_train.shape[1:] == x_test.shape[1:]
            and len(x_train) == len(y_train) > 0
            and len(x_test) == len(y_test) > 0
            and x_train.is_floating_point()
        )
    if not ok:
        raise UsageError(
            f"--dataset {spec} must return (x_train, y_train, x_test, y_test): float inputs "
            "[N, C, H, W] or [N, C, L] and labels [N] int64 (or targets [N, K] float)"
        )
    if y_train.is_floating_point():
        task, classes = "regression", int(y_train.shape[-1])
    else:
        task, classes = "classification", int(max(y_train.max(), y_test.max())) + 1
    return x_train, y_train, x_test, y_test, task, classes


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
