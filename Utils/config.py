"""The training config: every train.py flag with its type, default, help and validation.

`TrainConfig` is the single source of the flags: ``Utils.flags`` builds train.py's parser
from its fields, `train` fills missing keys from its defaults, and `validate` checks the
values argparse cannot. Each field's metadata says

* ``group``: the --help section;
* ``machine``: the key describes the machine or the run's location, not the experiment
  (`MACHINE_KEYS`): ``--resume`` takes it from the command line, extraction ignores it when
  deciding whether two checkpoints belong to one run, figures ignore it when comparing runs;
* ``resumable``: the key may change on ``--resume`` (`RESUMABLE_KEYS`, e.g. ``--epochs`` to
  extend a run); the change is recorded in ``hyperparameters.json``;
* ``choices``: a fixed list, or the name of a registry (`choices`).

The config travels as a plain dict (``asdict``) with these keys, which is also the format of
``hyperparameters.json`` and of a checkpoint's ``config``.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from typing import Any

from Utils.errors import UsageError
from Utils.registry import parse_name_list
from Utils.rundir import check_name

_REGISTRIES = ("datasets", "model_classes", "losses", "optimizers", "buffers")


def _flag(
    default: Any,
    help: str,
    group: str,
    *,
    machine: bool = False,
    resumable: bool = False,
    choices: tuple[str, ...] | str = (),
    short: str = "",
) -> Any:
    """A config field with its command-line metadata (see the module docstring)."""
    meta = {
        "help": help,
        "group": group,
        "machine": machine,
        "resumable": resumable,
        "choices": choices,
        "short": short,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


LOCATION, DATA, MODEL, OPTIM, CKPT, HARDWARE = (
    "run location",
    "data",
    "model",
    "optimisation",
    "checkpoints",
    "hardware and reproducibility",
)


@dataclass
class TrainConfig:
    """Every train.py flag (field names are the flags with underscores)."""

    experiment: str = _flag("example", "experiment name (folder)", LOCATION, machine=True)
    expid: str = _flag(
        "",
        "run id inside the experiment; empty trains without saving anything",
        LOCATION,
        machine=True,
    )
    save_dir: str = _flag(
        "results",
        "root folder (or fsspec URL such as gs://bucket/results) of all experiments",
        LOCATION,
        machine=True,
    )
    overwrite: bool = _flag(False, "replace existing outputs of this run", LOCATION, machine=True)
    verbose: bool = _flag(False, "print more detail", LOCATION, machine=True, short="-v")

    data_dir: str = _flag("Data", "folder holding the datasets", DATA, machine=True)
    dataset: str = _flag(
        "fashion-mnist",
        "dataset: {datasets}, or package.module:builder (your own: builder() -> (x_train, "
        "y_train, x_test, y_test) tensors)",
        DATA,
        choices="datasets",
    )
    train_batch_size: int = _flag(128, "global training batch", DATA)
    test_batch_size: int = _flag(256, "evaluation batch", DATA)
    workers: int = _flag(
        0,
        "data-loader processes (folder datasets); with --device xla/--tpu: XLA processes "
        "(0 or 1: one device in this process; N > 1: one process per TPU core)",
        DATA,
        machine=True,
    )
    no_augment: bool = _flag(False, "switch data augmentation off", DATA)

    model: str = _flag(
        "vgg-demo",
        "architecture (see --model-class), or package.module:builder (your own: "
        "builder(input_shape, num_classes) -> nn.Module)",
        MODEL,
    )
    model_class: str = _flag(
        "default",
        "model family: default (small nets), tinyimagenet (VGG/ResNet written here), "
        "imagenet (torchvision VGG/ResNet), torchvision (any torchvision classifier)",
        MODEL,
        choices="model_classes",
    )
    pretrained: bool = _flag(False, "load weights from <model-dir>/<model-class>/<model>.pt", MODEL)
    model_dir: str = _flag("Models/pretrained", "folder of pretrained weights", MODEL, machine=True)
    restore_path: str = _flag("", "initialise the weights from this checkpoint file", MODEL)
    dtype: str = _flag(
        "float32",
        "parameter dtype (float64 for round-off-level theory checks)",
        MODEL,
        choices=("float32", "float64"),
    )

    loss: str = _flag("ce", "training loss", OPTIM, choices="losses")
    optimizer: str = _flag(
        "custom_sgd",
        "custom_sgd tracks the theory state; the others are plain torch optimizers",
        OPTIM,
        choices="optimizers",
    )
    epochs: int = _flag(
        10, "training epochs (may grow on --resume to extend a run)", OPTIM, resumable=True
    )
    lr: float = _flag(0.1, "learning rate", OPTIM)
    lr_drops: list = _flag([], "epochs at which the lr is multiplied", OPTIM)
    lr_drop_rate: float = _flag(0.1, "factor applied at each drop", OPTIM)
    wd: float = _flag(0.0, "coupled weight decay (L2)", OPTIM)
    momentum: float = _flag(0.0, "momentum beta in [0, 1)", OPTIM)
    dampening: float = _flag(0.0, "momentum dampening in [0, 1)", OPTIM)
    nesterov: bool = _flag(False, "Nesterov momentum", OPTIM)
    allow_nan: bool = _flag(False, "keep training when the loss is NaN or Inf", OPTIM)

    save_buffers: str = _flag(
        "", "comma list of per-parameter tensors kept in checkpoints: {buffers}", CKPT
    )
    save_freq: int = _flag(100, "steps between checkpoints (linear schedule)", CKPT)
    save_schedule: str = _flag(
        "linear",
        "linear: every --save-freq steps; log: --num-checkpoints spaced evenly in log(step)",
        CKPT,
        choices=("linear", "log"),
    )
    num_checkpoints: int = _flag(100, "checkpoints of the log schedule", CKPT)
    eval_freq: int = _flag(
        0, "steps between evaluations (0: once per epoch); evaluated steps are also saved", CKPT
    )
    sync_save: bool = _flag(False, "write checkpoints in the training thread", CKPT, machine=True)
    track_online: int = _flag(
        0,
        "every N steps, record each symmetry group's measured quantities (S/Q/R, |g|^2, |u|^2, "
        "violation, angular update) and theory into <run>/online.h5, a few floats per neuron "
        "instead of a checkpoint; cache.py reads it like features.h5 (0: off)",
        CKPT,
        machine=True,
    )
    resume: bool = _flag(False, "continue from the last checkpoint", CKPT, machine=True)

    device: str = _flag(
        "auto", "device", HARDWARE, machine=True, choices=("auto", "cpu", "cuda", "xla")
    )
    gpu: int = _flag(0, "CUDA device index", HARDWARE, machine=True)
    tpu: str = _flag("", "TPU name (implies --device xla)", HARDWARE, machine=True)
    sync_bn: bool = _flag(
        False, "under torchrun on GPUs: SyncBatchNorm (statistics over the global batch)", HARDWARE
    )
    seed: int = _flag(1, "random seed", HARDWARE)
    deterministic: bool = _flag(False, "deterministic kernels (bitwise resume)", HARDWARE)
    no_progress: bool = _flag(
        False, "no progress bars (also off when not a tty)", HARDWARE, machine=True
    )
    tensorboard: bool = _flag(
        False,
        "write TensorBoard scalars to <run>/tensorboard at each evaluation: losses, accuracy, "
        "lr, per-layer exact and paper theory errors, violation, angular update",
        HARDWARE,
        machine=True,
    )

    def to_dict(self) -> dict[str, Any]:
        """The config as the plain dict stored in hyperparameters.json and checkpoints."""
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """A config from a (partial) dict; missing keys take their defaults.

        Raises:
            UsageError: an unknown key or a value of the wrong type, named.
        """
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise UsageError(f"unknown config key '{unknown[0]}'; valid keys: {', '.join(known)}")
        for name, value in values.items():
            want = type(default_of(known[name]))
            ok = isinstance(value, want) and not (want is int and isinstance(value, bool))
            if want is float and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            if want is list:
                ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            if not ok:
                raise UsageError(f"{name}={value!r} has the wrong type (want {want.__name__})")
        return cls(**values)


def default_of(f: Field) -> Any:
    """A field's default value."""
    return f.default_factory() if f.default is MISSING else f.default


CONFIG_FIELDS: tuple[Field, ...] = fields(TrainConfig)
MACHINE_KEYS = frozenset(f.name for f in CONFIG_FIELDS if f.metadata["machine"])
RESUMABLE_KEYS = frozenset(f.name for f in CONFIG_FIELDS if f.metadata["resumable"])
# keys that may differ between the checkpoints of one run (machine keys, extended epochs)
RUN_VARIABLE_KEYS = MACHINE_KEYS | RESUMABLE_KEYS


def defaults() -> dict[str, Any]:
    """Every train.py flag with its default value (keys use underscores)."""
    return TrainConfig().to_dict()


def flag_name(key: str) -> str:
    """The command-line spelling of a config key (``lr_drops`` -> ``--lr-drops``)."""
    return "--" + key.replace("_", "-")


def choices(name: str) -> list[str]:
    """The valid names of a registry-backed field ("datasets", "losses", "buffers", ...)."""
    registries = _registries()
    if name not in registries:
        raise KeyError(f"no registry {name!r}; one of {_REGISTRIES}")
    return registries[name]


def _registries() -> dict[str, list[str]]:
    # the registries import torch: loaded on use, so cache.py/plot.py read this module fast
    from Models import MODEL_CLASSES
    from Utils.data import DATASETS
    from Utils.losses import LOSSES
    from Utils.optimizers import BUFFERS, OPTIMIZERS

    return {
        "datasets": DATASETS.names(),
        "model_classes": list(MODEL_CLASSES),
        "losses": LOSSES.names(),
        "optimizers": OPTIMIZERS.names(),
        "buffers": BUFFERS.names(),
    }


def validate(cfg: dict[str, Any]) -> None:
    """Checks the values argparse cannot (ranges, combinations, names, run names).

    Args:
        cfg: a complete config dict.

    Raises:
        UsageError: one line naming the bad value and the fix.
    """

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

    check_name(cfg["experiment"], "--experiment")
    if cfg["expid"]:
        check_name(cfg["expid"], "--expid")
    need(
        cfg["lr"] > 0 and math.isfinite(cfg["lr"]),
        f"--lr must be a finite number > 0 (got {cfg['lr']})",
    )
    need(0 <= cfg["momentum"] < 1, f"--momentum must be in [0, 1) (got {cfg['momentum']})")
    need(0 <= cfg["dampening"] < 1, f"--dampening must be in [0, 1) (got {cfg['dampening']})")
    need(
        cfg["wd"] >= 0 and math.isfinite(cfg["wd"]),
        f"--wd must be a finite number >= 0 (got {cfg['wd']})",
    )
    need(
        not cfg["nesterov"] or (cfg["momentum"] > 0 and cfg["dampening"] == 0),
        "--nesterov needs --momentum > 0 and --dampening 0",
    )
    need(
        cfg["optimizer"] != "momentum" or cfg["momentum"] > 0,
        "--optimizer momentum needs --momentum > 0 (e.g. --momentum 0.9)",
    )
    need(cfg["train_batch_size"] >= 1, "--train-batch-size must be >= 1")
    need(cfg["test_batch_size"] >= 1, "--test-batch-size must be >= 1")
    need(cfg["epochs"] >= 0, f"--epochs must be >= 0 (got {cfg['epochs']})")
    need(cfg["workers"] >= 0, "--workers must be >= 0")
    need(cfg["save_freq"] >= 0, "--save-freq must be >= 0 (0: first and last step only)")
    need(cfg["eval_freq"] >= 0, "--eval-freq must be >= 0 (0: once per epoch)")
    need(cfg["num_checkpoints"] >= 2, "--num-checkpoints must be >= 2")
    need(
        not cfg.get("tensorboard") or bool(cfg["expid"]),
        "--tensorboard writes into the run folder: give --expid",
    )
    need(cfg.get("track_online", 0) >= 0, "--track-online must be >= 0 (0: off, 1: every step)")
    need(
        not cfg.get("track_online") or (cfg["device"] != "xla" and not cfg.get("tpu")),
        "--track-online is not supported on XLA devices; drop it or use --device cpu/cuda",
    )
    need(0 < cfg["lr_drop_rate"] <= 1, "--lr-drop-rate must be in (0, 1]")
    bad = [e for e in cfg["lr_drops"] if not 0 < e <= max(cfg["epochs"], 0)]
    need(
        not bad,
        f"--lr-drops {bad} lie outside (0, --epochs={cfg['epochs']}]; "
        "give epochs inside the run",
    )
    twice = sorted({e for e in cfg["lr_drops"] if cfg["lr_drops"].count(e) > 1})
    need(
        not twice,
        f"--lr-drops lists epoch {twice[0] if twice else ''} twice (the drops would compound); "
        "give each epoch once, and --lr-drop-rate for a larger drop",
    )
    _validate_names(cfg, need)


def _validate_names(cfg: dict[str, Any], need) -> None:
    """Checks the registry names: model for its class, buffers, optimizer."""
    from Models import list_models  # imports torch: see _registries
    from Utils import plugins
    from Utils.optimizers import BUFFERS, OPTIMIZERS

    models = list_models(cfg["model_class"])
    if plugins.is_import_spec(cfg["model"]):  # a user's builder: importable and callable
        plugins.load_object(cfg["model"], "--model", plugins.MODEL_SIGNATURE)
    need(
        cfg["model"] in models or plugins.is_import_spec(cfg["model"]),
        f"unknown --model '{cfg['model']}' for --model-class {cfg['model_class']}; choose one of: "
        f"{', '.join(models)}",
    )
    buffers = parse_name_list(cfg["save_buffers"], BUFFERS, "buffer")
    OPTIMIZERS.get(cfg["optimizer"])
    need(
        cfg["optimizer"] == "custom_sgd" or not {"sgd", "mom"} & set(buffers),
        "--save-buffers sgd/mom need --optimizer custom_sgd",
    )
    need(
        cfg["model_class"] != "default" or not cfg["pretrained"] or bool(cfg["model_dir"]),
        "--pretrained needs --model-dir",
    )


def complete(config: dict[str, Any] | TrainConfig) -> dict[str, Any]:
    """A validated, complete config dict from a partial dict (or a `TrainConfig`).

    Raises:
        UsageError: unknown key, wrong type or invalid value.
    """
    if isinstance(config, TrainConfig):
        cfg = config.to_dict()
    else:
        cfg = TrainConfig.from_dict(dict(config)).to_dict()
    validate(cfg)
    return cfg
