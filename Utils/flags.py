"""Command-line side of the scripts: parsers (train.py's built from `TrainConfig`), one-line errors.

Every choice list comes from a registry, so an unknown name is rejected by argparse with the
valid names listed. Errors are one line (``<prog>: error: <problem>; <fix>``) and exit 2.
Library code never imports this module; it uses `Utils.config`.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any, NoReturn

from Utils import config, interrupt
from Utils.errors import UsageError, UserError
from Utils.rundir import check_name


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line (no usage dump) and exit with status 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Prints one line naming the problem and how to see the valid values, then exits 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def run_name(flag: str, allow_empty: bool = False):
    """An argparse ``type`` that checks a run name (`Utils.rundir.check_name`)."""

    def parse(value: str) -> str:
        if allow_empty and value == "":
            return value
        try:
            return check_name(value, flag)
        except UsageError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    return parse


def add_run_flags(
    parser: argparse.ArgumentParser,
    *,
    expid_help: str = "run id inside the experiment",
    overwrite_help: str = "replace existing outputs of this run",
    verbose_help: str = "print more detail",
) -> None:
    """Flags that locate an existing run: --experiment, --expid, --save-dir, --overwrite, -v.

    Args:
        parser: the parser to extend (extract.py, cache.py).
        expid_help, overwrite_help, verbose_help: the script's own wording.
    """
    group = parser.add_argument_group("run location")
    group.add_argument(
        "--experiment",
        required=True,
        type=run_name("--experiment"),
        help="experiment name (folder)",
    )
    group.add_argument("--expid", required=True, type=run_name("--expid"), help=expid_help)
    save_dir = next(f for f in config.CONFIG_FIELDS if f.name == "save_dir")
    group.add_argument("--save-dir", default="results", help=save_dir.metadata["help"])
    group.add_argument("--overwrite", action="store_true", help=overwrite_help)
    group.add_argument("-v", "--verbose", action="store_true", help=verbose_help)


def train_parser(suppress_defaults: bool = False) -> Parser:
    """The parser of train.py, one flag per `TrainConfig` field (in its order and groups).

    Args:
        suppress_defaults: leave flags that are not given out of the result (to tell which
            flags a command line sets, see `given_flags`).
    """
    p = Parser(
        prog="train.py",
        description=(
            "Train a network and save dense checkpoints that carry optimizer buffers and the "
            "per-neuron theory state of every symmetry group (translation, scale, rescale). "
            "Then run extract.py, cache.py and plot.py on the run."
        ),
        argument_default=argparse.SUPPRESS if suppress_defaults else None,
    )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in config.CONFIG_FIELDS:
        meta = f.metadata
        group = groups.setdefault(meta["group"], p.add_argument_group(meta["group"]))
        names = (
            [meta["short"], config.flag_name(f.name)]
            if meta["short"]
            else [config.flag_name(f.name)]
        )
        default = config.default_of(f)
        kwargs: dict[str, Any] = {"help": meta["help"], "dest": f.name}
        if not suppress_defaults:
            kwargs["default"] = default
        choices = meta["choices"]
        if isinstance(choices, str):
            names_of = config.choices(choices)
            if "{" + choices + "}" in meta["help"]:
                kwargs["help"] = meta["help"].format(**{choices: ", ".join(names_of)})
            else:
                kwargs["choices"] = names_of
        elif choices:
            kwargs["choices"] = list(choices)
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        elif isinstance(default, list):
            kwargs.update(type=int, nargs="*")
        elif f.name in ("experiment", "expid"):
            kwargs["type"] = run_name(names[-1], allow_empty=f.name == "expid")
        else:
            kwargs["type"] = type(default)
        if f.name == "dataset":  # api: a registered name or package.module:builder
            kwargs["type"] = _dataset_name
        group.add_argument(*names, **kwargs)
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


def given_flags(argv: list[str] | None = None) -> dict[str, Any]:
    """The train.py flags a command line sets explicitly (config keys -> values)."""
    return vars(train_parser(suppress_defaults=True).parse_args(argv))


def parse_train_args(argv: list[str] | None = None) -> dict[str, Any]:
    """Parses and validates train.py flags; exits 2 with one line on any bad value.

    With ``--resume`` only the flags themselves are checked here: the combination is
    validated once the stored config is merged in (`Utils.training.train`).

    Returns:
        The complete config dict.
    """
    parser = train_parser()
    cfg = vars(parser.parse_args(argv))
    try:
        if not cfg["resume"]:
            config.validate(cfg)
    except UsageError as err:
        parser.error(str(err))
    return cfg


class Terminated(KeyboardInterrupt):
    """SIGTERM (preemption, kill): handled exactly as Ctrl-C, with exit status 143."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main_wrapper(main, argv: list[str] | None = None, interrupted: str = "interrupted") -> int:
    """Runs a script's main, printing a `UserError` as one line and returning its exit code.

    SIGTERM is turned into an interrupt, so a preempted job cleans up as after Ctrl-C
    (the lock released, temporary files removed) and exits 143 (Ctrl-C: 130).

    Args:
        main: the script's ``main(argv) -> int``.
        argv: command-line arguments (None: sys.argv).
        interrupted: the line printed on Ctrl-C (say how to finish the job).
    """
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        with interrupt.guard():
            code = int(main(argv) or 0)
            interrupt.check()  # an interrupt that a finalizer swallowed still counts
            return code
    except KeyboardInterrupt as err:
        print(interrupted, file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    except Exception as err:
        if interrupt.pending():  # an interrupt turned into another error (e.g. the ImportError
            print(interrupted, file=sys.stderr)  # of a module whose import it broke)
            return 130
        if isinstance(err, UserError):
            print(f"error: {err}", file=sys.stderr)
            return err.exit_code
        if isinstance(err, OSError):
            print(f"error: {os_error_message(err)}", file=sys.stderr)
            return 1
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


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
