"""Automatic detection and numerical verification of symmetry groups (THEORY.md section 2).

`find_groups` traces a model with `torch.fx.symbolic_trace`, propagates the shapes of an
example input through the graph (`torch.fx.passes.shape_prop.ShapeProp`) and finds, from
module types and graph structure only (no per-model maps, no parameter-name matching):

* translation: the Linear whose output is the model output, for softmax cross-entropy;
* scale: every Linear / Conv1d / Conv2d / Conv3d whose only user is a BatchNorm1d/2d/3d;
* rescale: every Linear / Conv whose output reaches exactly one next Linear / Conv through a
  chain of positively homogeneous per-channel operations (ReLU, LeakyReLU, max / average
  pooling, dropout, identity, flatten), each with a single user and a single tensor input.

`verify_groups` measures, on one batch, the relative violation |<g_A, c_A>| / (|g_A| |c_A|)
of every neuron group and marks a layer invalid when it exceeds the tolerance.

Tolerances. The default is 1e-3 for float32 models, 1e-8 for float64 and 5e-2 for 16-bit
floats. Scale groups are exact only for BatchNorm eps = 0. For eps > 0 the violation is
physics, and it is known exactly: scaling a channel's pre-activation z by alpha changes the
normalised value zhat = (z - mu) / sqrt(var + eps) at rate eps / (var + eps) * zhat, so

    <g_A, theta_A> = eps / (var + eps) * sum over the channel of (dL/dzhat) * zhat.

Verification records this eps term per channel (forward hook on the BatchNorm) and requires
both (i) the residual |<g_A, theta_A> - eps term| / (|g_A| |theta_A|) <= tol: the group is
structurally right, the only deviation is the one eps implies; and (ii) the raw violation
<= max(tol, 1e-2) (`BN_EPS_TOL`): the conservation law holds well enough for the theory to
apply (it fails for channels whose variance is comparable to eps). The raw violation is stored
in `.violation`, the residual in ``meta["eps_residual"]``.

`loss_fn` (the "ce" / "mse" training losses) is `Utils.losses.loss_fn`, re-exported here so
that detection, verification and training share one definition.

Command line: ``python -m Utils.symmetry --model vgg-demo --model-class default --dataset
fashion-mnist [--json]`` prints the groups of a registered model on a batch of a dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import operator
import sys
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from Utils.errors import UsageError, UserError
from Utils.groups import KINDS, Member, SymmetryGroup, group_sum
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
    "verify_groups",
]

BN_EPS_TOL = 1e-2
DEFAULT_TOL = {torch.float64: 1e-8, torch.float32: 1e-3}
LOW_PRECISION_TOL = 5e-2

LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCHNORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

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
    """A Linear / Conv module called once in the graph, with usable parameters."""

    name: str
    module: nn.Module
    node: fx.Node
    weight: str
    bias: str | None

    @property
    def channels(self) -> int:
        """Number of output units (Linear) or channels (Conv)."""
        return int(self.module.weight.shape[0])

    def incoming(self) -> tuple[Member, ...]:
        """Members for this layer's output units: rows of W and entries of b."""
        members = [Member(self.weight, dim=0)]
        if self.bias is not None:
            members.append(Member(self.bias, dim=0))
        return tuple(members)


def _collect_layers(model: nn.Module, gm: fx.GraphModule) -> dict[fx.Node, _Layer]:
    """Finds the Linear / Conv call nodes whose parameters can carry symmetry groups.

    A layer is skipped when its module is called more than once (weight reuse), when one of
    its parameters is shared with another module (tied weights) or does not require gradients.
    """
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    params = dict(model.named_parameters())
    owners = Counter(id(p) for _, p in model.named_parameters(remove_duplicate=False))
    layers: dict[fx.Node, _Layer] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or calls[node.target] != 1:
            continue
        module = model.get_submodule(node.target)
        if not isinstance(module, LAYER_TYPES):
            continue
        names = []
        for attr in ("weight", "bias"):
            tensor = getattr(module, attr, None)
            name = f"{node.target}.{attr}"
            if tensor is None:
                names.append(None)
            elif params.get(name) is tensor and owners[id(tensor)] == 1 and tensor.requires_grad:
                names.append(name)
            else:
                break
        else:
            if names[0] is not None:
                layers[node] = _Layer(node.target, module, node, names[0], names[1])
    return layers


def _module_of(model: nn.Module, node: fx.Node) -> nn.Module | None:
    """The module a call_module node calls, None for other nodes."""
    return model.get_submodule(node.target) if node.op == "call_module" else None


def _translation(gm: fx.GraphModule, layers: dict[fx.Node, _Layer]) -> SymmetryGroup | None:
    """The translation group of the Linear whose output is the model output, if any."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    node = output.args[0]
    if not isinstance(node, fx.Node) or node not in layers or len(node.users) != 1:
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
    return SymmetryGroup("translation", layer.name, size, tuple(members))


def _scale(model: nn.Module, layer: _Layer, calls: Counter) -> SymmetryGroup | None:
    """The scale group of a layer whose only user is a BatchNorm over its output channels."""
    users = _value_users(layer.node)
    if len(users) != 1:
        return None
    norm_node = users[0]
    norm = _module_of(model, norm_node)
    if not isinstance(norm, BATCHNORM_TYPES) or calls[norm_node.target] != 1:
        return None
    shape = _shape(layer.node)
    if shape is None or norm.num_features != layer.channels or len(shape) < 2:
        return None
    if isinstance(layer.module, nn.Linear) and len(shape) != 2:
        return None  # BatchNorm1d would normalise dim 1, not the Linear's units
    meta = {"eps": float(norm.eps), "norm": norm_node.target}
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


def _rescale(
    model: nn.Module, layer: _Layer, layers: dict[fx.Node, _Layer]
) -> SymmetryGroup | None:
    """The rescale group between `layer` and the one layer its output reaches homogeneously.

    Follows the single-user chain from the layer's output. State: units along dim 1 of
    ``[B, C, *S]`` ("channels", conv output) or along the last dim ("features", Linear output
    or flattened conv output, where each unit owns `block` consecutive features).
    """
    state = "features" if isinstance(layer.module, nn.Linear) else "channels"
    block = 1
    current = layer.node
    shape = _shape(current)
    if shape is None:
        return None
    while True:
        users = _value_users(current)
        if len(users) != 1:
            return None
        step = users[0]
        inputs = _tensor_args(step)
        if step in layers:
            if inputs != [current]:
                return None
            return _rescale_pair(layer, layers[step], state, block, shape)
        kind = _classify_step(model, step)
        if kind is None or not inputs or inputs[0] is not current:
            return None
        extra = inputs[1:]
        if kind == "reshape":
            if not all(_is_shape_node(a) for a in extra):
                return None
        elif extra:
            return None
        new_shape = _shape(step)
        if new_shape is None:
            return None
        if kind == "pool":
            # per channel only: conv layout kept, batch and channel sizes unchanged
            if state != "channels" or len(new_shape) != len(shape) or new_shape[:2] != shape[:2]:
                return None
        elif kind == "reshape" and new_shape != shape:
            flattened = len(shape) >= 3 and new_shape == (shape[0], math.prod(shape[1:]))
            if state != "channels" or not flattened:
                return None
            state, block = "features", math.prod(shape[2:])
        elif kind == "elementwise" and new_shape != shape:
            return None
        current, shape = step, new_shape


def _rescale_pair(
    layer: _Layer, nxt: _Layer, state: str, block: int, shape: tuple[int, ...]
) -> SymmetryGroup | None:
    """The rescale group of `layer` -> `nxt` given the layout of `nxt`'s input."""
    weight = nxt.module.weight
    if isinstance(nxt.module, nn.Linear):
        if state != "features" or weight.shape[1] != layer.channels * block:
            return None
    else:
        conv_ok = state == "channels" and nxt.module.groups == 1
        if not conv_ok or weight.shape[1] != layer.channels or len(shape) != weight.ndim:
            return None
    outgoing = Member(nxt.weight, dim=1, block=block, sign=-1)
    members = (*layer.incoming(), outgoing)
    name = f"{layer.name}->{nxt.name}"
    return SymmetryGroup("rescale", name, layer.channels, members, meta={"block": block})


def find_groups(model: nn.Module, example_input: Tensor, loss: str = "ce") -> list[SymmetryGroup]:
    """Finds the translation, scale and rescale groups of a model from its traced graph.

    Detection dispatches on module types (``isinstance``) and graph structure only; the
    parameter names in the groups are those of ``model.named_parameters()``.

    Args:
        model: the network; its forward must be traceable by `torch.fx.symbolic_trace`.
        example_input: an input batch ``[B, ...]`` the model accepts (used for shapes only;
            the model's buffers, modes and the RNG are left unchanged).
        loss: a name of `Utils.losses.LOSSES`; translation groups exist only for losses
            registered with ``symmetric_translation=True`` ("ce": softmax cross-entropy),
            not for "mse".

    Returns:
        The groups, ordered by kind (translation, scale, rescale) then by graph order. They
        are not yet verified (violation NaN): see `verify_groups`.

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
    if translation_symmetric:
        translation = _translation(gm, layers)
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
    return sorted(found, key=lambda g: KINDS.index(g.kind))


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


class _NormProbe:
    """Forward hook on a BatchNorm that records what its eps term needs.

    Stores, per channel, ``eps / (var + eps)`` and ``sum over batch and positions of
    (dL/dzhat) * zhat`` (float64), where zhat is the normalised input and
    dL/dzhat = gamma * dL/dy.
    """

    def __init__(self, norm: nn.Module) -> None:
        self.norm = norm
        self.ratio: Tensor | None = None
        self.zhat: Tensor | None = None
        self.moment: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        x = inputs[0].detach().double()  # [B, C, *S]
        dims = [0, *range(2, x.ndim)]
        mean = x.mean(dim=dims, keepdim=True)  # [1, C, 1...]
        var = x.var(dim=dims, unbiased=False, keepdim=True)  # [1, C, 1...]
        eps = float(module.eps)
        self.ratio = (eps / (var + eps)).flatten()  # [C]
        self.zhat = (x - mean) / torch.sqrt(var + eps)  # [B, C, *S]
        output.register_hook(self._backward)
        return output.clone()  # later in-place ops act on the clone, not on the hooked tensor

    def _backward(self, grad: Tensor) -> None:
        g = grad.detach().double()  # [B, C, *S]
        if self.norm.weight is not None:
            shape = [1, -1] + [1] * (g.ndim - 2)
            g = g * self.norm.weight.detach().double().reshape(shape)
        dims = [0, *range(2, g.ndim)]
        self.moment = (g * self.zhat).sum(dim=dims)  # [C]

    def eps_term(self) -> Tensor:
        """Per-channel predicted <g_A, theta_A> from eps, shape [C]."""
        if self.ratio is None or self.moment is None:
            raise RuntimeError("BatchNorm probe did not see a forward and backward pass")
        return self.ratio * self.moment


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


def _relative(dot: Tensor, g_sq: Tensor, c_sq: Tensor) -> Tensor:
    """|dot| / (|g| |c|) per group, 0 where |g| or |c| is exactly zero."""
    denom = torch.sqrt(g_sq * c_sq)  # [n]
    safe = torch.where(denom > 0, denom, torch.ones_like(denom))
    return torch.where(denom > 0, dot.abs() / safe, torch.zeros_like(denom))


def _group_violation(
    group: SymmetryGroup,
    grads: Mapping[str, Tensor],
    thetas: Mapping[str, Tensor],
    probe: _NormProbe | None,
) -> tuple[Tensor, Tensor | None]:
    """Per-group relative violation [size] and, for scale groups with eps > 0, the residual.

    Sums run in float64; each elementwise product is one fresh float64 tensor per parameter
    (built in place, so a large layer costs one float64 copy at a time).
    """
    names = group.params
    unsigned = replace(group, members=tuple(replace(m, sign=1) for m in group.members))

    def product(a: Mapping[str, Tensor], b: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        """name -> a * b (a * a when b is None) in a new float64 tensor."""
        out = {}
        for n in names:
            x = a[n].detach().to(torch.float64, copy=True)  # [*param_shape]
            out[n] = x.square_() if b is None else x.mul_(b[n].detach())
        return out

    g_sq = group_sum(product(grads, None), unsigned)  # [n]
    if group.kind == "translation":
        g = {n: grads[n].detach().to(torch.float64) for n in names}
        dot = group_sum(g, group)  # [n]
        ones = {n: torch.ones_like(v) for n, v in g.items()}
        c_sq = group_sum(ones, unsigned)  # [n]
    else:
        dot = group_sum(product(grads, thetas), group)  # [n]
        c_sq = group_sum(product(thetas, None), unsigned)  # [n]
    violation = _relative(dot, g_sq, c_sq)
    residual = None
    if probe is not None:
        residual = _relative(dot - probe.eps_term(), g_sq, c_sq)
    return violation, residual


def verify_groups(
    model: nn.Module,
    groups: Sequence[SymmetryGroup],
    inputs: Tensor,
    targets: Tensor,
    loss: str = "ce",
    tol: float | None = None,
) -> list[SymmetryGroup]:
    """Measures each group's gradient constraint on a batch and marks violated layers invalid.

    Per neuron group A, the relative violation is |<g_A, c_A>| / (|g_A| |c_A|) with c_A = 1
    (translation), theta_A (scale) or (theta_A1, -theta_A2) (rescale), computed in float64
    from the batch gradient (train mode, mean loss); a group with zero gradient counts 0.
    A layer's `.violation` is the maximum over its groups.

    Args:
        model: the network the groups belong to (its modes, buffers and the RNG are kept).
        groups: groups from `find_groups` (or from JSON).
        inputs: input batch ``[B, ...]``.
        targets: targets ``[B]`` (class indices) or ``[B, C]`` floats for "mse".
        loss: "ce" or "mse".
        tol: violation tolerance; default from `default_tol` (1e-3 float32, 1e-8 float64).
            Scale groups whose BatchNorm has eps > 0 must have their residual after the exact
            eps term within `tol` and their raw violation within max(tol, `BN_EPS_TOL`).

    Returns:
        New groups with `violation` set; those above tolerance are invalidated with a reason.

    Raises:
        UnknownNameError: unknown loss.
        UserError: a group names a parameter the model does not have.
    """
    criterion = loss_fn(loss)
    groups = list(groups)
    if not groups:
        return []
    params = dict(model.named_parameters())
    names: list[str] = []
    for group in groups:
        for name in group.params:
            if name not in params:
                raise UserError(
                    f"symmetry group '{group.key}' names parameter '{name}' that the model "
                    f"{type(model).__name__} does not have; detect the groups of this model again"
                )
            if name not in names:
                names.append(name)
    tol = default_tol(model) if tol is None else float(tol)
    probes: dict[str, _NormProbe] = {}
    for group in groups:
        norm = group.meta.get("norm")
        if group.kind == "scale" and norm and float(group.meta.get("eps", 0.0)) > 0:
            probes.setdefault(norm, _NormProbe(model.get_submodule(norm)))
    grads = _batch_gradient(model, criterion, inputs, targets, names, probes)
    checked = []
    for group in groups:
        probe = probes.get(group.meta.get("norm", "")) if group.kind == "scale" else None
        violation, residual = _group_violation(group, grads, params, probe)
        worst = float(violation.max())
        out = replace(group, violation=worst, valid=True, reason="", meta=dict(group.meta))
        if residual is None:
            if worst > tol:
                out = out.invalidated(
                    f"gradient constraint violated: max relative violation {worst:.2e} > "
                    f"tol {tol:.1e}"
                )
        else:
            worst_residual = float(residual.max())
            out.meta["eps_residual"] = worst_residual
            loose = max(tol, BN_EPS_TOL)
            if worst_residual > tol:
                out = out.invalidated(
                    f"scale constraint violated beyond the BatchNorm eps term: residual "
                    f"{worst_residual:.2e} > tol {tol:.1e}"
                )
            elif worst > loose:
                out = out.invalidated(
                    f"BatchNorm eps={group.meta['eps']:.1e} breaks scale invariance: max "
                    f"relative violation {worst:.2e} > {loose:.1e} (channel variance near eps)"
                )
        checked.append(out)
    return checked


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
            "layer": g.name,
            "params": g.params,
            "groups": g.size,
            "max_violation": None if math.isnan(g.violation) else g.violation,
            "valid": g.valid,
            "reason": g.reason,
        }
        for g in groups
    ]


def format_table(groups: Sequence[SymmetryGroup]) -> str:
    """A plain-text table of verified groups.

    Args:
        groups: verified groups.

    Returns:
        One header line and one line per group (kind, layer, groups, max violation, valid).
    """
    rows = _rows(groups)
    width = max([len("layer or layer pair")] + [len(r["layer"]) for r in rows])
    lines = [
        f"{'kind':<12} {'layer or layer pair':<{width}} {'groups':>7} {'max_violation':>14}  valid"
    ]
    for r in rows:
        v = "nan" if r["max_violation"] is None else f"{r['max_violation']:.3e}"
        valid = "yes" if r["valid"] else f"no ({r['reason']})"
        lines.append(f"{r['kind']:<12} {r['layer']:<{width}} {r['groups']:>7} {v:>14}  {valid}")
    if not rows:
        lines.append("(no symmetry groups found)")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="python -m Utils.symmetry",
        description="Detect and verify the symmetry groups of a registered model on a data batch.",
    )
    parser.add_argument("--model", required=True, help="model name, e.g. vgg-demo")
    parser.add_argument("--model-class", default="default", help="model class (default: default)")
    parser.add_argument("--dataset", required=True, help="dataset name, e.g. fashion-mnist")
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
    return detect(model, x, y, loss, args.tol), note


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit status: 0, or the `UserError`'s exit code after one line on stderr.
    """
    args = _parser().parse_args(argv)
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
