"""Tests of the model zoo: every registered model builds, runs, traces; registry and weights."""

from __future__ import annotations

import math

import pytest
import torch
import torchvision
from torch import fx, nn

from Models import MODEL_CLASSES, get_model, list_models, register_model
from Models.imagenet import IMAGENET_MODELS
from Utils.errors import CorruptFileError, DataMissingError, UnknownNameError, UsageError

DEFAULT_SHAPES = [(1, 28, 28), (3, 32, 32), (1, 40)]
TINY_CASES = [((3, 64, 64), 200), ((3, 32, 32), 10)]
SLOW_TINY_PARTS = ("resnet50", "resnet101", "resnet152", "wide-", "vgg16", "vgg19")
WEIGHT_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
PASS_THROUGH = (nn.ReLU, nn.MaxPool1d, nn.MaxPool2d, nn.Flatten)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def _run(
    model: nn.Module, input_shape: tuple[int, ...], num_classes: int, compare: bool = True
) -> torch.Tensor:
    """Traces `model` with torch.fx, runs the trace forward + backward on a batch of 2.

    Checks that the logits have shape [2, num_classes], that every parameter gets a finite
    gradient and (if `compare`) that the traced graph computes what the module computes.
    """
    torch.manual_seed(0)
    x = torch.randn(2, *input_shape)  # [2, *input_shape]
    labels = torch.arange(2) % num_classes  # [2]
    traced = fx.symbolic_trace(model)
    logits = traced(x)  # [2, num_classes]
    assert logits.shape == (2, num_classes)
    if compare:
        with torch.no_grad():
            torch.testing.assert_close(logits, model(x))
    nn.functional.cross_entropy(logits, labels).backward()
    grads = [p.grad for p in model.parameters()]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    return logits


def _module_nodes(model: nn.Module) -> tuple[fx.GraphModule, dict[fx.Node, nn.Module]]:
    """The fx trace of `model` and the module called by each call_module node."""
    traced = fx.symbolic_trace(model)
    nodes = {
        node: traced.get_submodule(node.target)
        for node in traced.graph.nodes
        if node.op == "call_module"
    }
    return traced, nodes


def _tiny_params() -> list:
    """(name, shape, classes) cases for every tinyimagenet model; big ones marked slow."""
    cases = []
    for name in list_models("tinyimagenet"):
        marks = [pytest.mark.slow] if any(p in name for p in SLOW_TINY_PARTS) else []
        for shape, classes in TINY_CASES:
            cases.append(pytest.param(name, shape, classes, marks=marks, id=f"{name}-{shape[1]}"))
    return cases


def test_model_classes_are_listed() -> None:
    assert MODEL_CLASSES == ("default", "tinyimagenet", "imagenet", "torchvision")
    assert list_models("default") == ["logistic", "fc", "fc-bn", "conv", "conv-bn", "vgg-demo"]
    assert len(list_models("tinyimagenet")) == 8 + 2 * 2 * 5
    assert list_models("imagenet") == list(IMAGENET_MODELS)
    assert list_models("torchvision") == torchvision.models.list_models(module=torchvision.models)


@pytest.mark.parametrize("input_shape", DEFAULT_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", list_models("default"))
def test_default_model_runs_and_traces(name: str, input_shape: tuple[int, ...]) -> None:
    model = get_model(name, "default", input_shape, 10)
    _run(model, input_shape, 10)
    conv_types = {type(m) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))}
    if conv_types:
        assert conv_types == {nn.Conv1d if len(input_shape) == 2 else nn.Conv2d}


def test_default_model_layer_counts() -> None:
    def count(name: str, kind: type[nn.Module]) -> int:
        model = get_model(name, "default", (1, 28, 28), 10)
        return sum(isinstance(m, kind) for m in model.modules())

    assert count("logistic", nn.Linear) == 1
    assert count("fc", nn.Linear) == 6 and count("fc", nn.BatchNorm1d) == 0
    assert count("fc-bn", nn.Linear) == 6 and count("fc-bn", nn.BatchNorm1d) == 5
    assert count("conv", nn.BatchNorm2d) == 0 and count("conv", nn.Conv2d) >= 2
    assert count("conv-bn", nn.BatchNorm2d) == count("conv-bn", nn.Conv2d)
    fc_layers = get_model("fc", "default", (1, 40), 3).modules()
    fc_widths = {m.out_features for m in fc_layers if isinstance(m, nn.Linear)}
    assert fc_widths == {100, 3}


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (1, 40)], ids=["image", "signal"])
def test_vgg_demo_has_all_three_symmetries(input_shape: tuple[int, ...]) -> None:
    model = get_model("vgg-demo", "default", input_shape, 10)
    traced, modules = _module_nodes(model)

    def weight_source(node: fx.Node, through: tuple[type[nn.Module], ...]) -> nn.Module | None:
        """The weight layer feeding `node` via modules of the `through` types only."""
        while isinstance(node, fx.Node) and node.op == "call_module":
            module = modules[node]
            if isinstance(module, WEIGHT_LAYERS):
                return module
            if not isinstance(module, through):
                return None
            node = node.args[0]
        return None

    # scale: a BatchNorm directly after a conv
    scale = [
        n
        for n, m in modules.items()
        if isinstance(m, BATCH_NORMS) and isinstance(weight_source(n.args[0], ()), nn.Module)
    ]
    assert len(scale) >= 2
    # rescale: a weight layer fed by another weight layer through ReLU/pool/flatten only
    rescale = [
        (weight_source(n.args[0], PASS_THROUGH), m)
        for n, m in modules.items()
        if isinstance(m, WEIGHT_LAYERS)
    ]
    rescale = [(a, b) for a, b in rescale if a is not None]
    assert len(rescale) >= 2
    assert any(isinstance(a, (nn.Conv1d, nn.Conv2d)) for a, _ in rescale)
    # translation: the output is a Linear layer's
    output = next(n for n in traced.graph.nodes if n.op == "output")
    assert isinstance(modules[output.args[0]], nn.Linear)
    assert modules[output.args[0]].out_features == 10


@pytest.mark.parametrize(("name", "input_shape", "num_classes"), _tiny_params())
def test_tinyimagenet_model_runs_and_traces(
    name: str, input_shape: tuple[int, ...], num_classes: int
) -> None:
    model = get_model(name, "tinyimagenet", input_shape, num_classes)
    _run(model, input_shape, num_classes, compare=input_shape[1] < 64)
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert (n_bn == 0) == (name.endswith("-nobn") or (name.startswith("vgg") and "-bn" not in name))


def test_tinyimagenet_residual_graph_is_explicit() -> None:
    model = get_model("resnet18-nobn", "tinyimagenet", (3, 32, 32), 10)
    traced, modules = _module_nodes(model)
    adds = [n for n in traced.graph.nodes if n.op == "call_function" and "add" in str(n.target)]
    assert len(adds) == 8  # one per basic block
    assert sum(isinstance(m, nn.ReLU) for m in modules.values()) == 1 + 2 * 8
    assert not any(isinstance(m, nn.MaxPool2d) for m in modules.values())  # small-image stem
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


@pytest.mark.parametrize(
    ("ours", "reference"),
    [("resnet18", "resnet18"), ("resnet50", "resnet50"), ("wide-resnet50", "wide_resnet50_2")],
)
def test_tinyimagenet_resnets_match_published_sizes(ours: str, reference: str) -> None:
    def count(model: nn.Module) -> int:
        return sum(p.numel() for p in model.parameters())

    mine = get_model(ours, "tinyimagenet", (3, 224, 224), 1000)
    assert any(isinstance(m, nn.MaxPool2d) for m in mine.modules())  # ImageNet stem
    assert count(mine) == count(torchvision.models.get_model(reference, num_classes=1000))


@pytest.mark.parametrize("input_shape", [(1, 28, 28), (3, 8, 8), (2, 1, 1)])
@pytest.mark.parametrize("name", ["vgg11", "resnet18", "resnet50-nobn"])
def test_tinyimagenet_any_size_and_channels(name: str, input_shape: tuple[int, ...]) -> None:
    model = get_model(name, "tinyimagenet", input_shape, 3)
    logits = model.eval()(torch.randn(2, *input_shape))  # [2, 3]
    assert logits.shape == (2, 3) and torch.isfinite(logits).all()


def test_tinyimagenet_rejects_signals() -> None:
    with pytest.raises(UsageError, match="image input_shape"):
        get_model("resnet18", "tinyimagenet", (1, 40), 10)


@pytest.mark.parametrize("name", ["resnet18", "vgg11_bn"])
def test_imagenet_models_honour_num_classes(name: str) -> None:
    model = get_model(name, "imagenet", (3, 64, 64), 7)
    assert isinstance(model, (torchvision.models.ResNet, torchvision.models.VGG))
    logits = model(torch.randn(2, 3, 64, 64))  # [2, 7]
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", ["mobilenet_v2", "densenet121", "efficientnet_b0"])
def test_torchvision_models_honour_num_classes(name: str) -> None:
    model = get_model(name, "torchvision", (3, 64, 64), 5)
    logits = model.eval()(torch.randn(2, 3, 64, 64))  # [2, 5]
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    ("model_class", "name", "input_shape", "match"),
    [
        ("imagenet", "resnet18", (1, 28, 28), "expects RGB"),
        ("torchvision", "mobilenet_v2", (3, 40), "expects RGB"),
        ("torchvision", "inception_v3", (3, 32, 32), "at least 75x75"),
        ("torchvision", "alexnet", (3, 62, 62), "at least 63x63"),
        ("torchvision", "vit_b_16", (3, 40, 40), "patch size"),
    ],
)
def test_torchvision_classes_reject_unusable_inputs(
    model_class: str, name: str, input_shape: tuple[int, ...], match: str
) -> None:
    with pytest.raises(UsageError, match=match) as err:
        get_model(name, model_class, input_shape, 10)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["alexnet", "inception_v3"])
def test_min_sizes_are_the_smallest_that_run(name: str) -> None:
    """MIN_SIZES is the smallest side that runs (alexnet: 63 px, issue 13)."""
    from Models.imagenet import MIN_SIZES

    side = MIN_SIZES[name]
    model = get_model(name, "torchvision", (3, side, side), 4).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, side, side)).shape == (1, 4)
        with pytest.raises(RuntimeError):
            model(torch.randn(1, 3, side - 1, side - 1))


def test_unknown_names_list_the_valid_ones() -> None:
    with pytest.raises(UnknownNameError) as err:
        get_model("vgg-nope", "default", (1, 28, 28), 10)
    assert all(name in str(err.value) for name in list_models("default"))
    with pytest.raises(UnknownNameError) as err:
        get_model("resnet18", "cifar", (3, 32, 32), 10)
    assert all(cls in str(err.value) for cls in MODEL_CLASSES)
    with pytest.raises(UnknownNameError, match="tinyimagenet"):
        list_models("nope")
    with pytest.raises(UnknownNameError, match="wide_resnet50_2"):
        get_model("wide-resnet50", "imagenet", (3, 64, 64), 10)


def test_register_model_checks_class_and_duplicates() -> None:
    with pytest.raises(UnknownNameError, match="default"):
        register_model("mine", "cifar")
    with pytest.raises(ValueError, match="twice"):
        register_model("fc", "default")(lambda input_shape, num_classes: nn.Identity())
    assert list_models("default").count("fc") == 1


@pytest.mark.parametrize(
    ("input_shape", "num_classes"),
    [((28, 28, 1, 1), 10), ((1, 0, 28), 10), ((1, 28.5), 10), ((1, 28, 28), 0), ("abc", 10)],
)
def test_bad_shapes_and_class_counts(input_shape: tuple, num_classes: int) -> None:
    with pytest.raises(UsageError):
        get_model("fc", "default", input_shape, num_classes)


def test_pretrained_weights_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    source = get_model("vgg-demo", "default", (1, 28, 28), 10)
    (tmp_path / "default").mkdir()
    torch.save(source.state_dict(), tmp_path / "default" / "vgg-demo.pt")
    torch.manual_seed(2)
    loaded = get_model("vgg-demo", "default", (1, 28, 28), 10, True, str(tmp_path))
    fresh = get_model("vgg-demo", "default", (1, 28, 28), 10)
    for key, value in source.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)
    assert not torch.equal(fresh.classifier.weight, loaded.classifier.weight)


def test_pretrained_missing_file_names_the_path(tmp_path) -> None:
    with pytest.raises(DataMissingError) as err:
        get_model("fc", "default", (1, 40), 10, pretrained=True, model_dir=str(tmp_path))
    assert str(tmp_path / "default" / "fc.pt") in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(DataMissingError) as err:
        get_model("resnet18", "imagenet", (3, 64, 64), 10, pretrained=True, model_dir=tmp_path)
    assert str(tmp_path / "imagenet" / "resnet18.pt") in str(err.value)
    assert "downloaded elsewhere" in str(err.value) and "torch.save" in str(err.value)


def test_pretrained_bad_files_are_corrupt(tmp_path) -> None:
    folder = tmp_path / "default"
    folder.mkdir()
    torch.save(get_model("fc", "default", (1, 40), 10).state_dict(), folder / "fc.pt")
    with pytest.raises(CorruptFileError, match="classifier.weight") as err:
        get_model("fc", "default", (1, 40), 5, pretrained=True, model_dir=str(tmp_path))
    assert "\n" not in str(err.value)
    (folder / "logistic.pt").write_bytes(b"not a torch file")
    with pytest.raises(CorruptFileError, match="cannot read"):
        get_model("logistic", "default", (1, 40), 10, pretrained=True, model_dir=str(tmp_path))
    torch.save(torch.zeros(3), folder / "conv.pt")
    with pytest.raises(CorruptFileError, match="state dict"):
        get_model("conv", "default", (1, 40), 10, pretrained=True, model_dir=str(tmp_path))
    state = get_model("conv-bn", "default", (1, 40), 10).state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["conv1.weight"]
    torch.save(state, folder / "conv-bn.pt")
    with pytest.raises(CorruptFileError, match="missing keys conv1.weight.*unexpected keys"):
        get_model("conv-bn", "default", (1, 40), 10, pretrained=True, model_dir=str(tmp_path))


def test_vgg_demo_is_small() -> None:
    model = get_model("vgg-demo", "default", (1, 28, 28), 10)
    assert sum(p.numel() for p in model.parameters()) < 100_000
    assert math.prod(model(torch.randn(3, 1, 28, 28)).shape) == 30
