"""Automatic detection and numerical verification of symmetry groups (THEORY.md section 2).

`find_groups` traces a model with `torch.fx.symbolic_trace`, propagates the shapes of an
example input through the graph (`torch.fx.passes.shape_prop.ShapeProp`) and finds, from
module types and graph structure only (no per-model maps, no parameter-name matching), the
groups of every kind of `Utils.kinds.KINDS`, in the structures each kind lists:

* translation: the Linear whose output is the model output, for softmax cross-entropy; or
  the Linear feeding a final (log_)softmax, for any loss (e.g. nll);
* scale: every Linear / Conv whose only user is a BatchNorm or InstanceNorm (per channel) or
  a GroupNorm (per GroupNorm group); every Linear / Conv reaching a LayerNorm through
  homogeneous operations, pooling, reshapes and permutes (the whole layer, one group);
* rescale: every Linear / Conv, and every normalisation's affine (gamma_i, beta_i), whose
  output reaches only Linear / Conv consumers through positively homogeneous per-unit
  operations (ReLU, LeakyReLU, max / average pooling, dropout, identity, flatten): the
  outgoing side is the union of the consumers' incoming blocks of unit i (a depthwise
  consumer's block is its output channels reading unit i).

Groups may overlap; a module called more than once or with tied or frozen parameters is
skipped (`skipped_layers` gives the reason).

`verify_groups` measures, on one batch, the relative violation |<g_A, c_A>| / (|g_A| |c_A|)
of every neuron group and names why each group holds (exact, eps, round-off) or not.

Normalisation eps. Scale groups are exact only for eps = 0. For eps > 0 the violation is
physics, and it is known exactly: scaling the normalised input z by alpha changes
zhat = (z - mu) / sqrt(var + eps) at rate eps / (var + eps) * zhat (per set of elements that
share statistics), so

    <g_A, theta_A> = sum over the group's elements of eps / (var + eps) * (dL/dzhat) * zhat.

Verification records this eps term (forward hook on the normalisation) and requires both
(i) the residual |<g_A, theta_A> - eps term| / (|g_A| |theta_A|) <= tol: the group is
structurally right; and (ii) the raw violation <= max(tol, 1e-2) (`BN_EPS_TOL`): the
conservation law holds well enough for the theory to apply (it fails for channels whose
variance is comparable to eps). Where (i) fails in float32 only, a float64 copy of the model
decides between float32 round-off and a broken group.

`loss_fn` (the training losses) is `Utils.losses.loss_fn`, re-exported here so that
detection, verification and training share one definition.

Command line: ``python -m Utils.symmetry --model vgg-demo --model-class default --dataset
fashion-mnist [--json]`` prints the groups of a registered model on a batch of a dataset;
``python -m Utils.symmetry --kinds`` lists every kind and structure.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import operator
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from Utils import kinds
from Utils.errors import UsageError, UserError
from Utils.groups import Member, SymmetryGroup, group_sum
from Utils.kinds import KIND_NAMES
from Utils.losses import LOSSES, loss_fn

__all__ = [
    "BN_EPS_TOL",
    "default_tol",
    "detect",
    "find_groups",
    "format_table",
    "loss_fn",
    "main",
    "run",
    "skipped_layers",
    "verify_groups",
]

BN_EPS_TOL = 1e-2
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}
LOW_PRECISION_TOL = 5e-2

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
INSTANCENORM_TYPES = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
NORM_TYPES = (*BATCHNORM_TYPES, *INSTANCENORM_TYPES, nn.GroupNorm, nn.LayerNorm)

# Positively homogeneous, elementwise (f(alpha x) = alpha f(x) for alpha > 0, per element).
_ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu_,
    torch.relu,
    torch.relu_,
    F.leaky_relu,
    F.leaky_relu_,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    torch.dropout,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "contiguous"}
# Per-channel pooling: positively homogeneous, mixes positions only within a channel.
_POOL_MODULES = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
)
_POOL_FUNCTIONS = {
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    torch.max_pool1d,
    torch.max_pool2d,
    torch.max_pool3d,
    torch.avg_pool1d,
    torch.adaptive_avg_pool1d,
}
# Reshapes: accepted only when they keep the shape or flatten [B, C, *S] into [B, C * prod(S)].
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "squeeze"}
_PERMUTE_FUNCTIONS = {torch.permute, torch.transpose}
_PERMUTE_METHODS = {"permute", "transpose"}
_SOFTMAX_MODULES = (nn.LogSoftmax, nn.Softmax)
_SOFTMAX_FUNCTIONS = {F.log_softmax, F.softmax, torch.log_softmax, torch.softmax}
_SOFTMAX_METHODS = {"log_softmax", "softmax"}
# Users that read only metadata of a tensor, not its values.
_METADATA_METHODS = {"size", "dim"}
_METADATA_ATTRS = {"shape", "dtype", "device", "ndim"}


# --------------------------------------------------------------------------- graph analysis


def _first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _trace(model: nn.Module) -> fx.GraphModule:
    """Traces `model` with torch.fx, turning any failure into a one-line `UserError`."""
    try:
        return fx.symbolic_trace(model)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, ...)
        raise UserError(
            f"cannot trace model {type(model).__name__} with torch.fx "
            f"({type(exc).__name__}: {_first_line(exc)}); symmetry detection needs a forward "
            "without data-dependent control flow (wrap such code with torch.fx.wrap)"
        ) from None


@contextmanager
def _preserved_state(model: nn.Module, train: bool) -> Iterator[None]:
    """Runs a block with `model` in train or eval mode, restoring modes, buffers and RNG."""
    modes = {m: m.training for m in model.modules()}
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    try:
        with torch.random.fork_rng(devices=devices):
            model.train(train)
            yield
    finally:
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for name, b in model.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name])


def _propagate_shapes(gm: fx.GraphModule, model: nn.Module, example_input: Tensor) -> None:
    """Stores every node's output shape in ``node.meta["tensor_meta"]`` (eval mode, no grad).

    The model itself runs the input first, so that an input it rejects gives the model's own
    error message in one line.
    """
    try:
        with _preserved_state(model, train=False), torch.no_grad():
            model(example_input)
            ShapeProp(gm).propagate(example_input)
    except Exception as exc:  # the user's model rejected the example input
        raise UserError(
            f"model {type(model).__name__} cannot run the example input of shape "
            f"{tuple(example_input.shape)} ({type(exc).__name__}: {_first_line(exc)}); pass an "
            "input batch the model accepts"
        ) from None


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    """The traced output shape of a node, or None if it is not a single tensor."""
    meta = node.meta.get("tensor_meta")
    if isinstance(meta, TensorMetadata):
        return tuple(int(d) for d in meta.shape)
    return None


def _is_metadata_user(node: fx.Node) -> bool:
    """True for nodes that read only a tensor's metadata (``x.size(0)``, ``x.shape``)."""
    if node.op == "call_method" and node.target in _METADATA_METHODS:
        return True
    return (
        node.op == "call_function"
        and node.target is getattr
        and len(node.args) > 1
        and node.args[1] in _METADATA_ATTRS
    )


def _value_users(node: fx.Node) -> list[fx.Node]:
    """The users of a node that consume its values (metadata reads excluded)."""
    return [u for u in node.users if not _is_metadata_user(u)]


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    """The Node arguments of a node that are not metadata (shape) computations."""
    found: list[fx.Node] = []

    def visit(arg: object) -> None:
        if isinstance(arg, fx.Node):
            found.append(arg)

    fx.node.map_arg((node.args, node.kwargs), visit)
    return found


def _is_shape_node(node: fx.Node) -> bool:
    """True for nodes that compute integers from tensor metadata (``x.size(0)``, ``x.shape[0]``)."""
    if _is_metadata_user(node):
        return True
    if node.op == "call_function" and node.target in (operator.getitem, operator.mul):
        return all(_is_shape_node(a) for a in _tensor_args(node))
    return False


@dataclass
class _Layer:
    """A module called once in the graph whose parameters can start a group.

    Either a Linear / Conv ("layer": units are its output units or channels, incoming members
    are the rows of W and the entries of b) or a normalisation with a per-unit affine ("norm":
    incoming members are gamma and beta).
    """

    name: str
    module: nn.Module
    node: fx.Node
    weight: str
    bias: str | None
    role: str = "layer"

    @property
    def channels(self) -> int:
        """Number of output units (Linear, LayerNorm) or channels (Conv, other norms)."""
        return int(self.module.weight.shape[0])

    @property
    def unit_state(self) -> str | None:
        """Layout of the units in the output: "features" (last axis) or "channels" (axis 1)."""
        if isinstance(self.module, nn.Linear | nn.LayerNorm):
            return "features"
        shape = _shape(self.node)
        if shape is None or len(shape) < 2:
            return None
        return "features" if len(shape) == 2 else "channels"

    def incoming(self) -> tuple[Member, ...]:
        """Members for this layer's output units: rows of W (or gamma) and entries of b."""
        members = [Member(self.weight, dim=0)]
        if self.bias is not None:
            members.append(Member(self.bias, dim=0))
        return tuple(members)


def _owned_params(
    target: str, module: nn.Module, params: dict, owners: Counter
) -> tuple[str | None, str | None] | str:
    """(weight name, bias name or None) of a module whose parameters are its own.

    Returns:
        The names, or the reason the module cannot carry groups: a parameter shared with
        another module (tied weights) or not requiring gradients.
    """
    names: list[str | None] = []
    for attr in ("weight", "bias"):
        tensor = getattr(module, attr, None)
        name = f"{target}.{attr}"
        if tensor is None:
            names.append(None)
        elif params.get(name) is not tensor or owners[id(tensor)] > 1:
            return f"its {attr} is tied to another module's parameter"
        elif not tensor.requires_grad:
            return f"its {attr} does not require gradients"
        else:
            names.append(name)
    return (names[0], names[1])


def _collect_layers(
    model: nn.Module, gm: fx.GraphModule, skipped: dict[str, str] | None = None
) -> dict[fx.Node, _Layer]:
    """Finds the Linear / Conv and affine-normalisation call nodes that can carry groups.

    A module is skipped when it is called more than once (weight reuse), when one of its
    parameters is shared with another module (tied weights) or does not require gradients;
    `skipped` (if given) receives module name -> reason. A LayerNorm qualifies as a norm
    only with a one-dimensional normalized_shape.
    """
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    params = dict(model.named_parameters())
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    layers: dict[fx.Node, _Layer] = {}
    skipped = {} if skipped is None else skipped
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = model.get_submodule(node.target)
        if isinstance(module, LAYER_TYPES):
            role = "layer"
        elif isinstance(module, NORM_TYPES) and getattr(module, "weight", None) is not None:
            if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) != 1:
                continue
            role = "norm"
        else:
            continue
        if calls[node.target] != 1:
            skipped[node.target] = f"called {calls[node.target]} times (weights reused)"
            continue
        owned = _owned_params(node.target, module, params, owners)
        if isinstance(owned, str):
            skipped[node.target] = owned
        else:
            layers[node] = _Layer(node.target, module, node, owned[0], owned[1], role)
    return layers


def skipped_layers(model: nn.Module, example_input: Tensor) -> dict[str, str]:
    """The Linear / Conv / affine-norm modules detection cannot use, with the reason.

    Args:
        model: the network (fx-traceable).
        example_input: an input batch the model accepts.

    Returns:
        module name -> reason (weights reused by several calls, tied to another module's
        parameter, or frozen), in graph order.
    """
    gm = _trace(model)
    first = next(model.parameters(), None)
    example = example_input[:2] if first is None else example_input[:2].to(first.device)
    _propagate_shapes(gm, model, example)
    skipped: dict[str, str] = {}
    _collect_layers(model, gm, skipped)
    return skipped


def _module_of(model: nn.Module, node: fx.Node) -> nn.Module | None:
    """The module a call_module node calls, None for other nodes."""
    return model.get_submodule(node.target) if node.op == "call_module" else None


def _is_softmax(model: nn.Module, node: fx.Node) -> bool:
    """True for a (log_)softmax over the class axis of a [B, C] tensor."""
    module = _module_of(model, node)
    if module is not None:
        dim = getattr(module, "dim", None) if isinstance(module, _SOFTMAX_MODULES) else "no"
    elif node.op == "call_function" and node.target in _SOFTMAX_FUNCTIONS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    elif node.op == "call_method" and node.target in _SOFTMAX_METHODS:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    else:
        return False
    return dim in (1, -1)


def _translation(
    model: nn.Module, gm: fx.GraphModule, layers: dict[fx.Node, _Layer], symmetric_loss: bool
) -> SymmetryGroup | None:
    """The translation group of the last Linear, if the model output is invariant to it.

    Either the Linear's output is the model output and the loss is softmax cross-entropy
    (structure "softmax"), or the model output is a (log_)softmax of the Linear's output, for
    any loss (structure "log_softmax": softmax(z + c) = softmax(z)).
    """
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    if not isinstance(node, fx.Node):
        return None
    structure = "softmax"
    if node not in layers and _is_softmax(model, node):
        inputs = _tensor_args(node)
        if len(inputs) != 1 or len(_value_users(inputs[0])) != 1:
            return None
        node, structure = inputs[0], "log_softmax"
    elif not symmetric_loss:
        return None
    if node not in layers or len(_value_users(node)) != 1:
        return None
    layer = layers[node]
    shape = _shape(node)
    if not isinstance(layer.module, nn.Linear) or shape is None or len(shape) != 2:
        return None
    features = int(layer.module.weight.shape[1])
    members = [Member(layer.weight, dim=1)]
    if layer.bias is not None:
        members.append(Member(layer.bias, dim=None, offset=features))
    size = features + (layer.bias is not None)
    meta = {"structure": structure}
    return SymmetryGroup("translation", layer.name, size, tuple(members), meta=meta)


def _follow_to_norm(model: nn.Module, layer: _Layer) -> tuple[fx.Node, nn.Module, bool] | None:
    """The normalisation the layer's output reaches through a single-user chain, if any.

    Returns (norm node, norm module, direct) where direct says the layer's only user is the
    norm. The chain may hold positively homogeneous elementwise operations, pooling and
    reshapes / permutes: scaling the whole output by alpha > 0 commutes with all of them.
    """
    current = layer.node
    direct = True
    while True:
        users = _value_users(current)
        if len(users) != 1:
            return None
        step = users[0]
        inputs = _tensor_args(step)
        if not inputs or inputs[0] is not current:
            return None
        module = _module_of(model, step)
        if isinstance(module, NORM_TYPES):
            return (step, module, direct) if inputs == [current] else None
        kind = _classify_step(model, step)
        permute = (step.op == "call_method" and step.target in _PERMUTE_METHODS) or (
            step.op == "call_function" and step.target in _PERMUTE_FUNCTIONS
        )
        if kind is None and not permute:
            return None
        if not all(_is_shape_node(a) for a in inputs[1:]):
            return None
        current, direct = step, False


def _scale(model: nn.Module, layer: _Layer, calls: Counter) -> SymmetryGroup | None:
    """The scale group of a Linear / Conv whose output feeds a normalisation.

    BatchNorm and InstanceNorm (direct user): one group per channel; GroupNorm (direct
    user): the channels of one GroupNorm group together; LayerNorm (through elementwise
    homogeneous operations, reshapes and permutes): the whole layer as one group.
    """
    if layer.role != "layer":
        return None
    found = _follow_to_norm(model, layer)
    if found is None:
        return None
    norm_node, norm, direct = found
    if calls[norm_node.target] != 1:
        return None
    shape = _shape(layer.node)
    if shape is None or len(shape) < 2:
        return None
    meta = {"eps": float(norm.eps), "norm": norm_node.target, "norm_type": type(norm).__name__}
    if isinstance(norm, nn.LayerNorm):
        members = [Member(m.param, dim=None) for m in layer.incoming()]
        meta["structure"] = "layernorm"
        return SymmetryGroup("scale", layer.name, 1, tuple(members), meta=meta)
    if not direct:
        return None
    if isinstance(layer.module, nn.Linear) and len(shape) != 2:
        return None  # a norm over dim 1 would not normalise the Linear's units
    if isinstance(norm, nn.GroupNorm):
        if norm.num_channels != layer.channels:
            return None
        block = layer.channels // norm.num_groups
        members = tuple(replace(m, block=block) for m in layer.incoming())
        meta["structure"] = "groupnorm"
        return SymmetryGroup("scale", layer.name, norm.num_groups, members, meta=meta)
    if norm.num_features != layer.channels:
        return None
    if isinstance(norm, INSTANCENORM_TYPES):
        if len(shape) < 3:
            return None
        meta["structure"] = "instancenorm"
    else:
        meta["structure"] = "batchnorm"
    return SymmetryGroup("scale", layer.name, layer.channels, layer.incoming(), meta=meta)


def _classify_step(model: nn.Module, node: fx.Node) -> str | None:
    """Kind of a single-input graph node on a rescale path: elementwise, pool, reshape or None."""
    module = _module_of(model, node)
    if module is not None:
        if isinstance(module, _ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(module, _POOL_MODULES):
            return None if getattr(module, "return_indices", False) else "pool"
        if isinstance(module, nn.Flatten):
            return "reshape"
        return None
    if node.op == "call_function":
        if node.target in _ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if node.target in _POOL_FUNCTIONS:
            return None if node.kwargs.get("return_indices", False) else "pool"
        if node.target in _RESHAPE_FUNCTIONS:
            return "reshape"
    if node.op == "call_method":
        if node.target in _ELEMENTWISE_METHODS:
            return "elementwise"
        if node.target in _RESHAPE_METHODS:
            return "reshape"
    return None


def _consumers(
    model: nn.Module,
    layers: dict[fx.Node, _Layer],
    current: fx.Node,
    state: str,
    block: int,
    shape: tuple[int, ...],
    found: list[tuple[_Layer, str, int, tuple[int, ...]]],
) -> bool:
    """Collects the layers that `current`'s units reach through homogeneous per-unit steps.

    Every value user of `current` must be a Linear / Conv reading only it, or a positively
    homogeneous per-unit step (elementwise, per-channel pooling, flatten) whose own users
    satisfy the same, recursively. State: units along dim 1 of ``[B, C, *S]`` ("channels")
    or along the last dim ("features", each unit owning `block` consecutive features).

    Returns:
        False as soon as one path does not end in a layer (no group then); `found` gets
        (consumer, state, block, input shape) for each consumer.
    """
    users = _value_users(current)
    if not users:
        return False
    for step in users:
        inputs = _tensor_args(step)
        if step in layers and layers[step].role == "layer":
            if inputs != [current]:
                return False
            found.append((layers[step], state, block, shape))
            continue
        kind = _classify_step(model, step)
        if kind is None or not inputs or inputs[0] is not current:
            return False
        extra = inputs[1:]
        if kind == "reshape":
            if not all(_is_shape_node(a) for a in extra):
                return False
        elif extra:
            return False
        new_shape = _shape(step)
        if new_shape is None:
            return False
        new_state, new_block = state, block
        if kind == "pool":
            # per channel only: conv layout kept, batch and channel sizes unchanged
            if state != "channels" or len(new_shape) != len(shape) or new_shape[:2] != shape[:2]:
                return False
        elif kind == "reshape" and new_shape != shape:
            flattened = len(shape) >= 3 and new_shape == (shape[0], math.prod(shape[1:]))
            if state != "channels" or not flattened:
                return False
            new_state, new_block = "features", math.prod(shape[2:])
        elif kind == "elementwise" and new_shape != shape:
            return False
        if not _consumers(model, layers, step, new_state, new_block, new_shape, found):
            return False
    return True


def _outgoing(
    layer: _Layer, nxt: _Layer, state: str, block: int, shape: tuple[int, ...]
) -> Member | None:
    """The outgoing member (sign -1) of `layer`'s units in consumer `nxt`, if it fits."""
    weight = nxt.module.weight
    if isinstance(nxt.module, nn.Linear):
        if state != "features" or weight.shape[1] != layer.channels * block:
            return None
        return Member(nxt.weight, dim=1, block=block, sign=-1)
    if state != "channels" or len(shape) != weight.ndim or nxt.module.in_channels != layer.channels:
        return None
    if nxt.module.groups == 1:
        return Member(nxt.weight, dim=1, block=block, sign=-1)
    if nxt.module.groups == layer.channels and weight.shape[1] == 1:
        # depthwise: output channels [i m, (i + 1) m) read input channel i only
        multiplier = weight.shape[0] // layer.channels
        return Member(nxt.weight, dim=0, block=multiplier, sign=-1)
    return None  # a grouped conv mixes units within a group: not one block per unit


def _rescale(
    model: nn.Module, layer: _Layer, layers: dict[fx.Node, _Layer]
) -> SymmetryGroup | None:
    """The rescale group of a layer's (or an affine norm's) units and all their consumers.

    The outgoing side is the union of every consumer's incoming block of unit i (several
    consumers, e.g. squeezenet's Fire modules; depthwise convs: their output channels of unit
    i). Any path that does not end in a Linear / Conv (a residual add, a concatenation, a
    non-homogeneous activation, the model output) means no group.
    """
    state = layer.unit_state
    shape = _shape(layer.node)
    if state is None or shape is None:
        return None
    found: list[tuple[_Layer, str, int, tuple[int, ...]]] = []
    if not _consumers(model, layers, layer.node, state, 1, shape, found):
        return None
    outgoing = []
    for nxt, nxt_state, block, nxt_shape in found:
        member = _outgoing(layer, nxt, nxt_state, block, nxt_shape)
        if member is None:
            return None
        outgoing.append(member)
    name = f"{layer.name}->{'+'.join(n.name for n, *_ in found)}"
    meta = {
        "block": found[0][2],
        "structure": "layer" if layer.role == "layer" else "norm-affine",
    }
    members = (*layer.incoming(), *outgoing)
    return SymmetryGroup("rescale", name, layer.channels, members, meta=meta)


def find_groups(model: nn.Module, example_input: Tensor, loss: str = "ce") -> list[SymmetryGroup]:
    """Finds the translation, scale and rescale groups of a model from its traced graph.

    Detection dispatches on module types (``isinstance``) and graph structure only; the
    parameter names in the groups are those of ``model.named_parameters()``. Groups may
    overlap (a conv channel in a scale group while its BatchNorm's affine is in a rescale
    group): each group has its own theory. ``group.meta["structure"]`` names the structure
    (`Utils.kinds.KindSpec.structures`) the group was found in.

    Args:
        model: the network; its forward must be traceable by `torch.fx.symbolic_trace`.
        example_input: an input batch ``[B, ...]`` the model accepts (used for shapes only;
            the model's buffers, modes and the RNG are left unchanged).
        loss: a name of `Utils.losses.LOSSES`; translation groups at a Linear output exist
            only for losses registered with ``symmetric_translation=True`` ("ce"); a final
            (log_)softmax gives them for any loss.

    Returns:
        The groups, ordered by kind (`Utils.kinds.KINDS`) then by graph order. They are not
        yet verified (violation NaN): see `verify_groups`.

    Raises:
        UnknownNameError: unknown loss.
        UserError: the model cannot be traced or cannot run `example_input`.
    """
    translation_symmetric = LOSSES.meta(loss).get("symmetric_translation", False)
    gm = _trace(model)
    first = next(model.parameters(), None)
    example = example_input[:2] if first is None else example_input[:2].to(first.device)
    _propagate_shapes(gm, model, example)
    layers = _collect_layers(model, gm)
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    found: list[SymmetryGroup] = []
    translation = _translation(model, gm, layers, translation_symmetric)
    if translation is not None:
        found.append(translation)
    for layer in layers.values():
        group = _scale(model, layer, calls)
        if group is not None:
            found.append(group)
    for layer in layers.values():
        group = _rescale(model, layer, layers)
        if group is not None:
            found.append(group)
    return sorted(found, key=lambda g: KIND_NAMES.index(g.kind))


# --------------------------------------------------------------------------- verification


def default_tol(model: nn.Module) -> float:
    """The default violation tolerance for a model's floating-point precision.

    Args:
        model: the network.

    Returns:
        1e-8 for float64, 1e-3 for float32, 5e-2 for 16-bit parameters.
    """
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return DEFAULT_TOL.get(dtype, LOW_PRECISION_TOL)


def _norm_stats(norm: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """zhat and eps / (var + eps) of a normalisation in train mode, both shaped like x.

    BatchNorm: statistics over the batch and positions of each channel; InstanceNorm: over
    the positions of each sample and channel; GroupNorm: over each sample's group of
    channels and positions; LayerNorm: over the normalized (last) dims of each sample.
    """
    eps = float(norm.eps)
    if isinstance(norm, nn.GroupNorm):
        grouped = x.reshape(x.shape[0], norm.num_groups, -1)  # [B, G, C/G * S]
        zhat, ratio = _standardise(grouped, [2], eps)
        return zhat.reshape(x.shape), ratio.expand_as(grouped).reshape(x.shape)
    if isinstance(norm, nn.LayerNorm):
        dims = list(range(x.ndim - len(norm.normalized_shape), x.ndim))
    elif isinstance(norm, INSTANCENORM_TYPES):
        dims = list(range(2, x.ndim))
    else:
        dims = [0, *range(2, x.ndim)]
    zhat, ratio = _standardise(x, dims, eps)
    return zhat, ratio.expand_as(x)


def _standardise(x: Tensor, dims: list[int], eps: float) -> tuple[Tensor, Tensor]:
    """(x - mean) / sqrt(var + eps) and eps / (var + eps) (kept dims) over `dims`."""
    mean = x.mean(dim=dims, keepdim=True)
    var = x.var(dim=dims, unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps), eps / (var + eps)


class _NormProbe:
    """Forward hook on a normalisation that records what its eps term needs.

    Scaling the norm's input x by alpha changes zhat at rate eps / (var + eps) * zhat (for
    each set of elements sharing statistics), so <g_A, theta_A> of a scale group equals the
    sum over the group's elements of (dL/dzhat) * zhat * eps / (var + eps), where
    dL/dzhat = gamma * dL/dy. The probe keeps that elementwise term (float64).
    """

    def __init__(self, norm: nn.Module) -> None:
        self.norm = norm
        self.weighted: Tensor | None = None
        self.term: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        zhat, ratio = _norm_stats(module, inputs[0].detach().double())  # [B, C, *S] each
        self.weighted = zhat * ratio
        output.register_hook(self._backward)
        return output.clone()  # later in-place ops act on the clone, not on the hooked tensor

    def _backward(self, grad: Tensor) -> None:
        g = grad.detach().double()  # [B, C, *S]
        if self.norm.weight is not None:
            gamma = self.norm.weight.detach().double()
            if isinstance(self.norm, nn.LayerNorm):
                g = g * gamma  # broadcast over the last dims
            else:
                g = g * gamma.reshape([1, -1] + [1] * (g.ndim - 2))
        self.term = g * self.weighted

    def eps_term(self, group: SymmetryGroup) -> Tensor:
        """Predicted <g_A, theta_A> from eps per group of a scale group [size] (float64)."""
        if self.term is None:
            raise RuntimeError("normalisation probe did not see a forward and backward pass")
        if group.size == 1:
            return self.term.sum().reshape(1)
        per_channel = self.term.sum(dim=[0, *range(2, self.term.ndim)])  # [C]
        return per_channel.reshape(group.size, -1).sum(dim=1)  # [size]


def _batch_gradient(
    model: nn.Module,
    criterion: Callable[[Tensor, Tensor], Tensor],
    inputs: Tensor,
    targets: Tensor,
    names: Sequence[str],
    probes: Mapping[str, _NormProbe],
) -> dict[str, Tensor]:
    """Gradient of the mean batch loss in train mode for the named parameters.

    The model's modes, buffers (BatchNorm running statistics) and the RNG are restored.
    Parameters the loss does not reach get a zero gradient.
    """
    params = dict(model.named_parameters())
    device = next(model.parameters()).device
    handles = [model.get_submodule(n).register_forward_hook(p) for n, p in probes.items()]
    try:
        with _preserved_state(model, train=True):
            output = model(inputs.to(device))
            value = criterion(output, targets.to(device))
            tensors = [params[n] for n in names]
            grads = torch.autograd.grad(value, tensors, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    return {
        n: torch.zeros_like(params[n]) if g is None else g.detach() for n, g in zip(names, grads)
    }


def _group_violation(
    group: SymmetryGroup,
    grads: Mapping[str, Tensor],
    thetas: Mapping[str, Tensor],
    probe: _NormProbe | None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Per-group relative violation [size] and, for groups with a norm probe, the eps residual.

    The violation is `Utils.kinds.violation` (NaN where |g_A| |c_A| = 0) of float64 group sums,
    with the kind's constraint direction c_A. Each elementwise product is one fresh float64
    tensor per parameter (a large layer costs one float64 copy at a time).
    """
    spec = group.spec
    names = group.params
    unsigned = group.unsigned()
    wide_g = {n: grads[n].detach().to(torch.float64) for n in names}  # [*param_shape]
    c = {n: spec.direction(thetas[n].detach().to(torch.float64)) for n in names}
    g_sq = group_sum({n: g * g for n, g in wide_g.items()}, unsigned)  # [n]
    dot = group_sum({n: wide_g[n] * c[n] for n in names}, group)  # [n]
    c_sq = group_sum({n: x * x for n, x in c.items()}, unsigned)  # [n]
    violation = kinds.violation(dot, g_sq, c_sq)
    residual = None
    if probe is not None:
        residual = kinds.violation(dot - probe.eps_term(group), g_sq, c_sq)
    return violation, residual


def _worst(values: np.ndarray) -> float:
    """The largest finite entry (a group without gradient counts 0)."""
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else 0.0


def verify_groups(
    model: nn.Module,
    groups: Sequence[SymmetryGroup],
    inputs: Tensor,
    targets: Tensor,
    loss: str = "ce",
    tol: float | None = None,
) -> list[SymmetryGroup]:
    """Measures each group's gradient constraint on a batch and names why it holds or not.

    Per neuron group A, the relative violation is |<g_A, c_A>| / (|g_A| |c_A|)
    (`Utils.kinds.violation`, with the kind's direction c_A: 1, theta_A, or
    (theta_A1, -theta_A2)), computed in float64 from the batch gradient (train mode, mean
    loss); a group with zero gradient counts 0. A layer's `.violation` is the maximum over
    its groups. Each verified group says why it holds in ``meta["cause"]``:

    * "exact": violation <= tol;
    * "eps": a scale group whose normalisation has eps > 0; the exact eps term is subtracted
      and what it leaves, ``meta["eps_residual"]``, is <= tol; the raw violation must also be
      <= max(tol, `BN_EPS_TOL`), else the group is invalid (variance near eps);
    * "round-off": the violation (or eps residual) is above tol in the model's precision but
      within float64's tol when a float64 copy of the model is run on the same batch
      (``meta["float64_violation"]`` / ``meta["float64_eps_residual"]``, ``meta["note"]``).

    Groups that fail in float64 too are invalid, with a reason giving both figures.

    Args:
        model: the network the groups belong to (its modes, buffers and the RNG are kept).
        groups: groups from `find_groups` (or from JSON).
        inputs: input batch ``[B, ...]``.
        targets: targets ``[B]`` (class indices) or ``[B, C]`` floats for "mse".
        loss: a name of `Utils.losses.LOSSES`.
        tol: violation tolerance; default from `default_tol` (1e-3 float32, 1e-8 float64).

    Returns:
        New groups with `violation` and the cause set; the others invalidated with a reason.

    Raises:
        UnknownNameError: unknown loss.
        UserError: a group names a parameter the model does not have.
    """
    criterion = loss_fn(loss)
    groups = list(groups)
    if not groups:
        return []
    params = dict(model.named_parameters())
    for group in groups:
        for name in group.params:
            if name not in params:
                raise UserError(
                    f"symmetry group '{group.key}' names parameter '{name}' that the model "
                    f"{type(model).__name__} does not have; detect the groups of this model again"
                )
    tol = default_tol(model) if tol is None else float(tol)
    measured = _measure(model, groups, inputs, targets, criterion)
    structural = {}  # key -> the float32 figure that needs a float64 check
    for group in groups:
        violation, residual = measured[group.key]
        figure = _worst(violation if residual is None else residual)
        if figure > tol:
            structural[group.key] = figure
    wide: dict[str, tuple[np.ndarray, np.ndarray | None]] = {}
    dtype = next((p.dtype for p in params.values() if p.is_floating_point()), torch.float32)
    if structural and dtype != torch.float64:
        double = copy.deepcopy(model).double()
        x = inputs.double() if inputs.is_floating_point() else inputs
        y = targets.double() if targets.is_floating_point() else targets
        again = [g for g in groups if g.key in structural]
        wide = _measure(double, again, x, y, criterion)
    tol64 = DEFAULT_TOL[torch.float64]
    return [_judge(g, measured[g.key], wide.get(g.key), tol, tol64) for g in groups]


def _measure(
    model: nn.Module,
    groups: Sequence[SymmetryGroup],
    inputs: Tensor,
    targets: Tensor,
    criterion: Callable[[Tensor, Tensor], Tensor],
) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """Per group key: the violation per group and, for scale groups with eps > 0, the residual."""
    params = dict(model.named_parameters())
    names = list(dict.fromkeys(n for g in groups for n in g.params))
    probes: dict[str, _NormProbe] = {}
    for group in groups:
        norm = group.meta.get("norm")
        if group.kind == "scale" and norm and float(group.meta.get("eps", 0.0)) > 0:
            probes.setdefault(norm, _NormProbe(model.get_submodule(norm)))
    grads = _batch_gradient(model, criterion, inputs, targets, names, probes)
    out = {}
    for group in groups:
        probe = probes.get(group.meta.get("norm", "")) if group.kind == "scale" else None
        out[group.key] = _group_violation(group, grads, params, probe)
    return out


def _judge(
    group: SymmetryGroup,
    measured: tuple[np.ndarray, np.ndarray | None],
    wide: tuple[np.ndarray, np.ndarray | None] | None,
    tol: float,
    tol64: float,
) -> SymmetryGroup:
    """The verified group: valid with its cause in ``meta["cause"]``, or invalid with a reason.

    Causes: "exact" (violation within tol), "eps" (a normalisation's eps explains the
    violation: ``meta["eps_residual"]`` is what it leaves), "round-off" (above tol in the
    model's precision but within float64's tol in a float64 copy: ``meta["float64_violation"]``
    or ``meta["float64_eps_residual"]``).
    """
    violation, residual = measured
    worst = _worst(violation)
    out = replace(group, violation=worst, valid=True, reason="", meta=dict(group.meta))
    norm = type_name = ""
    if residual is not None:
        norm = out.meta.get("norm", "")
        type_name = out.meta.get("norm_type", "normalisation")
        out.meta["eps_residual"] = _worst(residual)
    figure = worst if residual is None else out.meta["eps_residual"]
    cause = "exact" if residual is None else "eps"
    if figure > tol:
        label = (
            "max relative violation"
            if residual is None
            else f"residual after the {type_name} eps term"
        )
        if wide is None:
            what = (
                "gradient constraint violated"
                if residual is None
                else (f"scale constraint violated beyond the {type_name} eps term")
            )
            return out.invalidated(f"{what}: {label} {figure:.2e} > tol {tol:.1e}")
        figure64 = _worst(wide[0] if residual is None else wide[1])
        field = "float64_violation" if residual is None else "float64_eps_residual"
        out.meta[field] = figure64
        if figure64 > tol64:
            return out.invalidated(
                f"gradient constraint violated: {label} {figure:.2e} > tol {tol:.1e}, and "
                f"{figure64:.2e} in float64"
            )
        cause = "round-off"
        out.meta["note"] = (
            f"float32 round-off: {label} {figure:.2e} > tol {tol:.1e}, but {figure64:.2e} in "
            "float64"
        )
    out.meta["cause"] = cause
    loose = max(tol, BN_EPS_TOL)
    if residual is not None and worst > loose:
        return out.invalidated(
            f"{type_name} {norm} eps={out.meta['eps']:.1e} breaks scale invariance: max "
            f"relative violation {worst:.2e} > {loose:.1e} (variance near eps)"
        )
    return out


def detect(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    loss: str = "ce",
    tol: float | None = None,
) -> list[SymmetryGroup]:
    """Finds and verifies a model's symmetry groups on one batch.

    Args:
        model: the network (fx-traceable).
        inputs: input batch ``[B, ...]``.
        targets: targets for `loss`.
        loss: "ce" or "mse".
        tol: violation tolerance (see `verify_groups`).

    Returns:
        The verified groups (`find_groups` order).
    """
    groups = find_groups(model, inputs, loss)
    return verify_groups(model, groups, inputs, targets, loss, tol)


# --------------------------------------------------------------------------- command line


def _rows(groups: Sequence[SymmetryGroup]) -> list[dict]:
    """The JSON / table rows of verified groups."""
    return [
        {
            "kind": g.kind,
            "structure": g.meta.get("structure", ""),
            "layer": g.name,
            "params": g.params,
            "groups": g.size,
            "max_violation": None if math.isnan(g.violation) else g.violation,
            "valid": g.valid,
            "cause": g.meta.get("cause", ""),
            "reason": g.reason or g.meta.get("note", ""),
        }
        for g in groups
    ]


def format_table(groups: Sequence[SymmetryGroup]) -> str:
    """A plain-text table of verified groups.

    Args:
        groups: verified groups.

    Returns:
        One header line and one line per group (kind, structure, layer, groups, max
        violation, valid with its cause: exact, eps or round-off, or the reason it is not).
    """
    rows = _rows(groups)
    width = max([len("layer or layer pair")] + [len(r["layer"]) for r in rows])
    lines = [
        f"{'kind':<12} {'structure':<12} {'layer or layer pair':<{width}} {'groups':>7} "
        f"{'max_violation':>14}  valid"
    ]
    for r in rows:
        v = "nan" if r["max_violation"] is None else f"{r['max_violation']:.3e}"
        if r["valid"]:
            valid = f"yes ({r['cause']})" if r["cause"] else "yes"
        else:
            valid = f"no ({r['reason']})"
        lines.append(
            f"{r['kind']:<12} {r['structure']:<12} {r['layer']:<{width}} {r['groups']:>7} "
            f"{v:>14}  {valid}"
        )
    if not rows:
        lines.append("(no symmetry groups found)")
    return "\n".join(lines)


def format_kinds() -> str:
    """The kinds and structures detection knows (`Utils.kinds.table`), one line each."""
    lines = []
    for row in kinds.table():
        lines.append(f"{row['kind']:<12} {row['structure']:<12} {row['description']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m Utils.symmetry",
        description="Detect and verify the symmetry groups of a registered model on a data batch.",
    )
    parser.add_argument("--model", help="model name, e.g. vgg-demo (required unless --kinds)")
    parser.add_argument("--model-class", default="default", help="model class (default: default)")
    parser.add_argument(
        "--dataset", help="dataset name, e.g. fashion-mnist (required unless --kinds)"
    )
    parser.add_argument(
        "--kinds", action="store_true", help="list every symmetry kind and structure, then exit"
    )
    parser.add_argument("--data-dir", default="Data", help="dataset root folder (default: Data)")
    parser.add_argument(
        "--loss", default=None, help="ce or mse (default: mse for regression datasets, else ce)"
    )
    parser.add_argument("--batch-size", type=int, default=32, help="batch size (default: 32)")
    parser.add_argument("--seed", type=int, default=0, help="seed for init and batch (default: 0)")
    parser.add_argument("--tol", type=float, default=None, help="violation tolerance")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    return parser


def run(args: argparse.Namespace) -> tuple[list[SymmetryGroup], str]:
    """Builds the model and batch named by the arguments and detects its groups.

    Args:
        args: parsed command-line arguments.

    Returns:
        The verified groups, and a line describing the batch they were verified on.

    Raises:
        UserError: unknown model, dataset or loss, missing data, bad values.
    """
    from Models import get_model
    from Utils.data import dataset_info, sample_batch

    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    info = dataset_info(args.dataset)
    loss = args.loss or ("mse" if info.task == "regression" else "ce")
    loss_fn(loss)
    torch.manual_seed(args.seed)
    model = get_model(args.model, args.model_class, tuple(info.input_shape), info.num_classes)
    x, y, is_real = sample_batch(args.dataset, args.data_dir, args.batch_size, args.seed)
    source = "real" if is_real else f"random stand-in (no {args.dataset} files in {args.data_dir})"
    note = f"verified on one {source} batch of {len(x)} samples, {loss} loss"
    for name, reason in skipped_layers(model, x).items():
        note += f"\nskipped {name}: {reason}"
    return detect(model, x, y, loss, args.tol), note


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or the `UserError`'s exit code after one line on stderr.
    """
    parser = _parser()
    args = parser.parse_args(argv)
    if args.kinds:
        print(format_kinds())
        return 0
    if not args.model or not args.dataset:
        parser.error("--model and --dataset are required (or pass --kinds)")
    try:
        groups, note = run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(_rows(groups), indent=1))
    else:
        print(format_table(groups))
        print(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
