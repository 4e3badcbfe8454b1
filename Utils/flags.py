"""Command-line flags shared by the scripts: parsers built from the registries, and validation.

Every choice list comes from a registry, so an unknown name is rejected by argparse with the
valid names listed. Errors are one line (``<prog>: error: <problem>; <fix>``) and exit 2.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any, NoReturn

from Utils.errors import UsageError


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump) and exit with status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Prints one line naming the problem and how to see the valid values, then exits 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_run_flags(
    parser: argparse.ArgumentParser,
    *,
    required: bool = True,
    expid_help: str = "run id inside the experiment",
    overwrite_help: str = "replace existing outputs of this run",
    verbose_help: str = "print more detail",
) -> None:
    """Flags that locate a run: --experiment, --expid, --save-dir, --overwrite, -v.

    Args:
        parser: the parser to extend.
        required: whether --experiment and --expid must be given (extract/cache) or have
            defaults (train.py).
        expid_help, overwrite_help, verbose_help: the script's own wording.
    """
    group = parser.add_argument_group("run location")
    if required:
        group.add_argument("--experiment", required=True, help="experiment name (folder)")
        group.add_argument("--expid", required=True, help=expid_help)
    else:
        group.add_argument("--experiment", default="example", help="experiment name (folder)")
        group.add_argument("--expid", default="", help=expid_help)
    group.add_argument(
        "--save-dir",
        default="results",
        help="root folder (or fsspec URL such as gs://bucket/results) of all experiments",
    )
    group.add_argument("--overwrite", action="store_true", help=overwrite_help)
    group.add_argument("-v", "--verbose", action="store_true", help=verbose_help)


def train_parser() -> Parser:
    """The parser of train.py (choices from the model, dataset, optimizer and loss registries)."""
    from Models import MODEL_CLASSES
    from Utils.data import DATASETS
    from Utils.losses import LOSSES
    from Utils.optimizers import BUFFERS, OPTIMIZERS

    p = Parser(
        prog="train.py",
        description=(
            "Train a network and save dense checkpoints that carry optimizer buffers and the "
            "per-neuron theory state of every symmetry group (translation, scale, rescale). "
            "Then run extract.py, cache.py and plot.py on the run."
        ),
    )
    add_run_flags(
        p,
        required=False,
        expid_help="run id inside the experiment; empty trains without saving anything",
    )
    d = p.add_argument_group("data")
    d.add_argument("--data-dir", default="Data", help="folder holding the datasets")
    d.add_argument(
        "--dataset",
        default="fashion-mnist",
        type=_dataset_name,
        help=f"dataset: {', '.join(DATASETS.names())}, or package.module:builder (your own: "
        "builder() -> (x_train, y_train, x_test, y_test) tensors)",
    )
    d.add_argument("--train-batch-size", type=int, default=128, help="global training batch")
    d.add_argument("--test-batch-size", type=int, default=256, help="evaluation batch")
    d.add_argument(
        "--workers",
        type=int,
        default=0,
        help="data-loader processes (folder datasets); with --device xla/--tpu: XLA processes "
        "(0 or 1: one device in this process; N > 1: one process per TPU core)",
    )
    d.add_argument("--no-augment", action="store_true", help="switch data augmentation off")

    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        default="vgg-demo",
        help="architecture (see --model-class), or package.module:builder (your own: "
        "builder(input_shape, num_classes) -> nn.Module)",
    )
    m.add_argument(
        "--model-class",
        default="default",
        choices=list(MODEL_CLASSES),
        help="model family: default (small nets), tinyimagenet (VGG/ResNet written here), "
        "imagenet (torchvision VGG/ResNet), torchvision (any torchvision classifier)",
    )
    m.add_argument(
        "--pretrained",
        action="store_true",
        help="load weights from <model-dir>/<model-class>/<model>.pt",
    )
    m.add_argument("--model-dir", default="Models/pretrained", help="folder of pretrained weights")
    m.add_argument(
        "--restore-path", default="", help="initialise the weights from this checkpoint file"
    )
    m.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float64"],
        help="parameter dtype (float64 for round-off-level theory checks)",
    )

    o = p.add_argument_group("optimisation")
    o.add_argument("--loss", default="ce", choices=LOSSES.names(), help="training loss")
    o.add_argument(
        "--optimizer",
        default="custom_sgd",
        choices=OPTIMIZERS.names(),
        help="custom_sgd tracks the theory state; the others are plain torch optimizers",
    )
    o.add_argument("--epochs", type=int, default=10, help="training epochs")
    o.add_argument("--lr", type=float, default=0.1, help="learning rate")
    o.add_argument(
        "--lr-drops", type=int, nargs="*", default=[], help="epochs at which the lr is multiplied"
    )
    o.add_argument("--lr-drop-rate", type=float, default=0.1, help="factor applied at each drop")
    o.add_argument("--wd", type=float, default=0.0, help="coupled weight decay (L2)")
    o.add_argument("--momentum", type=float, default=0.0, help="momentum beta in [0, 1)")
    o.add_argument("--dampening", type=float, default=0.0, help="momentum dampening in [0, 1)")
    o.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    o.add_argument(
        "--allow-nan", action="store_true", help="keep training when the loss is NaN or Inf"
    )

    s = p.add_argument_group("checkpoints")
    s.add_argument(
        "--save-buffers",
        default="",
        help=f"comma list of per-parameter tensors kept in checkpoints: {', '.join(BUFFERS.names())}",
    )
    s.add_argument(
        "--save-freq", type=int, default=100, help="steps between checkpoints (linear schedule)"
    )
    s.add_argument(
        "--save-schedule",
        default="linear",
        choices=["linear", "log"],
        help="linear: every --save-freq steps; log: --num-checkpoints spaced evenly in log(step)",
    )
    s.add_argument(
        "--num-checkpoints", type=int, default=100, help="checkpoints of the log schedule"
    )
    s.add_argument(
        "--eval-freq",
        type=int,
        default=0,
        help="steps between evaluations (0: once per epoch); evaluated steps are also saved",
    )
    s.add_argument(
        "--sync-save", action="store_true", help="write checkpoints in the training thread"
    )
    s.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    s.add_argument(
        "--track-online",
        type=int,
        default=0,
        metavar="N",
        help="every N steps, record each symmetry group's measured quantities (S/Q/R, |g|^2, "
        "|u|^2, violation, angular update) and theory into <run>/online.h5, a few floats per "
        "neuron instead of a checkpoint; cache.py reads it like features.h5 (0: off)",
    )

    h = p.add_argument_group("hardware and reproducibility")
    h.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda", "xla"], help="device"
    )
    h.add_argument("--gpu", type=int, default=0, help="CUDA device index")
    h.add_argument("--tpu", default="", help="TPU name (implies --device xla)")
    h.add_argument(
        "--sync-bn",
        action="store_true",
        help="under torchrun on GPUs: SyncBatchNorm (statistics over the global batch)",
    )
    h.add_argument("--seed", type=int, default=1, help="random seed")
    h.add_argument(
        "--deterministic", action="store_true", help="deterministic kernels (bitwise resume)"
    )
    h.add_argument(
        "--no-progress", action="store_true", help="no progress bars (also off when not a tty)"
    )
    h.add_argument(
        "--tensorboard",
        action="store_true",
        help="write TensorBoard scalars to <run>/tensorboard at each evaluation: losses, "
        "accuracy, lr, per-layer exact and paper theory errors, violation, angular update",
    )
    return p


def _dataset_name(name: str) -> str:
    """argparse type of --dataset: a registered name or an importable builder (one line)."""
    from Utils.data import resolve_dataset
    from Utils.errors import UserError

    try:
        resolve_dataset(name)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return name


def default_config() -> dict[str, Any]:
    """Every train.py flag with its default value (keys use underscores)."""
    return vars(train_parser().parse_args([]))


def validate_train_config(cfg: dict[str, Any]) -> None:
    """Checks train.py values that argparse cannot.

    Raises:
        UsageError: one line naming the bad value and the fix.
    """
    from Utils.optimizers import BUFFERS, OPTIMIZERS
    from Utils.registry import parse_name_list

    def need(ok: bool, message: str) -> None:
        if not ok:
            raise UsageError(message)

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
    from Models import list_models
    from Utils import plugins

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


def parse_train_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses and validates train.py flags; exits 2 with one line on any bad value."""
    parser = train_parser()
    args = parser.parse_args(argv)
    cfg = vars(args)
    try:
        validate_train_config(cfg)
    except UsageError as err:
        parser.error(str(err))
    return cfg


def main_wrapper(main, argv: list[str] | None = None, interrupted: str = "interrupted") -> int:
    """Runs a script's main, printing a `UserError` as one line and returning its exit code.

    Args:
        main: the script's ``main(argv) -> int``.
        argv: command-line arguments (None: sys.argv).
        interrupted: the line printed on Ctrl-C (say how to finish the job).
    """
    from Utils import interrupt
    from Utils.errors import UserError

    try:
        with interrupt.guard():
            code = int(main(argv) or 0)
            interrupt.check()  # an interrupt that a finalizer swallowed still counts
            return code
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130


def os_error_message(err: OSError) -> str:
    """One line for an operating-system error (disk full, permission denied, ...) with the fix.

    Args:
        err: the error raised by a file operation.

    Returns:
        The problem as the OS names it, the file, and what to do.
    """
    what = err.strerror or str(err) or type(err).__name__
    where = f": {err.filename}" if err.filename else ""
    return (
        f"{what}{where}; free disk space or fix the folder's permissions (or write "
        "elsewhere), then rerun (train.py: add --resume)"
    )
