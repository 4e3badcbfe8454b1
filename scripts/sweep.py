"""Run a learning-rate x weight-decay grid: train, extract and cache every cell, then plot the grid.

Each cell runs ``train.py -> extract.py -> cache.py`` as separate processes with the expid
``lr<lr>_wd<wd>`` (e.g. ``lr0.01_wd0.0005``); flags this script does not know are passed to
train.py unchanged. Cells run one after another, or ``--jobs N`` at a time (each cell's output
then goes to ``<save-dir>/<experiment>/logs/<expid>.log``). When the cells are done, plot.py
draws the grid figures of all of them.

Example:
    python scripts/sweep.py --experiment grid --lrs 0.01,0.1 --wds 0,5e-4 --dry-run -- \
        --dataset synthetic --model vgg-demo --epochs 2 --momentum 0.9 --save-freq 4
"""

from __future__ import annotations

import argparse
import math
import os
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from Utils.errors import UsageError  # noqa: E402
from Utils.flags import Parser, main_wrapper  # noqa: E402

# Flags of train.py that the sweep sets itself for every cell.
_OWNED = ("--experiment", "--expid", "--save-dir", "--lr", "--wd")


def _owned(flag: str) -> bool:
    """Whether a train.py flag (or an abbreviation of one) is one the sweep sets itself."""
    return flag.startswith("--") and len(flag) > 2 and any(o.startswith(flag) for o in _OWNED)


def sweep_parser() -> argparse.ArgumentParser:
    """The parser of scripts/sweep.py."""
    p = Parser(
        prog="sweep.py",
        allow_abbrev=False,
        description=(
            "Train, extract and cache a grid of learning rates x weight decays, then draw the "
            "grid figures with plot.py. Unknown flags (e.g. --model, --epochs, --momentum) are "
            "passed to train.py."
        ),
    )
    p.add_argument("--experiment", default="sweep", help="experiment name (folder)")
    p.add_argument("--save-dir", default="results", help="root folder of all experiments")
    p.add_argument("--lrs", required=True, help="comma list of learning rates, e.g. 0.01,0.1")
    p.add_argument("--wds", default="0", help="comma list of weight decays, e.g. 0,5e-4")
    p.add_argument("--jobs", type=int, default=1, help="cells run at the same time")
    p.add_argument(
        "--cache-flags",
        default="",
        help="extra flags for cache.py, in quotes (e.g. '--subset 100')",
    )
    p.add_argument(
        "--plot-metrics",
        default="",
        help="comma list of metrics of the grid figures (default: every metric the runs share)",
    )
    p.add_argument("--no-plot", action="store_true", help="do not draw the grid figures")
    p.add_argument("--overwrite", action="store_true", help="replace existing runs of the grid")
    p.add_argument("--dry-run", action="store_true", help="print the commands without running")
    return p


def parse_values(text: str, flag: str, positive: bool) -> list[float]:
    """Parses a comma list of numbers.

    Raises:
        UsageError: for a value that is not a number or out of range.
    """
    values: list[float] = []
    for raw in text.split(","):
        if not raw.strip():
            continue
        try:
            value = float(raw)
        except ValueError:
            raise UsageError(f"{flag}: '{raw.strip()}' is not a number") from None
        if not math.isfinite(value) or value < 0 or (positive and value == 0):
            bound = "> 0" if positive else ">= 0"
            raise UsageError(f"{flag}: every value must be {bound} (got {raw.strip()})")
        if value not in values:
            values.append(value)
    if not values:
        raise UsageError(f"{flag} is empty; give a comma list such as 0.01,0.1")
    return values


def expid_of(lr: float, wd: float) -> str:
    """The run id of one cell, e.g. ``lr0.01_wd0.0005``."""
    return f"lr{lr:g}_wd{wd:g}"


def cell_commands(
    args: argparse.Namespace, lr: float, wd: float, train_flags: list[str]
) -> list[list[str]]:
    """The train, extract and cache commands of one cell."""
    where = ["--experiment", args.experiment, "--expid", expid_of(lr, wd)]
    where += ["--save-dir", args.save_dir]
    py = sys.executable
    over = ["--overwrite"] if args.overwrite else []
    return [
        [py, str(ROOT / "train.py"), *where, "--lr", f"{lr:g}", "--wd", f"{wd:g}", *over]
        + train_flags,
        [py, str(ROOT / "extract.py"), *where, *over],
        [py, str(ROOT / "cache.py"), *where, *over, *shlex.split(args.cache_flags)],
    ]


def plot_command(args: argparse.Namespace, expids: list[str]) -> list[str]:
    """The plot.py command that draws the grid figures."""
    cmd = [sys.executable, str(ROOT / "plot.py"), "--experiment", args.experiment]
    cmd += ["--expid", ",".join(expids), "--save-dir", args.save_dir]
    if args.plot_metrics:
        cmd += ["--metrics", args.plot_metrics]
    return cmd


def run_cell(commands: list[list[str]], log: str | None) -> int:
    """Runs a cell's commands in order; stops at the first failure.

    Args:
        commands: the commands.
        log: file receiving the output (None: the terminal).

    Returns:
        0, or the exit status of the command that failed.
    """
    handle = open(log, "w") if log else None
    try:
        for cmd in commands:
            if handle:
                handle.write(f"$ {shlex.join(cmd)}\n")
                handle.flush()
            else:
                print(f"$ {shlex.join(cmd)}", flush=True)
            rc = subprocess.call(cmd, stdout=handle, stderr=subprocess.STDOUT if handle else None)
            if rc != 0:
                return rc
        return 0
    finally:
        if handle:
            handle.close()


def main(argv: list[str] | None = None) -> int:
    """Runs (or prints) the sweep; returns the exit status."""
    parser = sweep_parser()
    args, train_flags = parser.parse_known_args(argv)
    train_flags = [f for f in train_flags if f != "--"]
    try:
        lrs = parse_values(args.lrs, "--lrs", positive=True)
        wds = parse_values(args.wds, "--wds", positive=False)
        if args.jobs < 1:
            raise UsageError(f"--jobs must be >= 1 (got {args.jobs})")
        # a prefix counts too: train.py would read --expi as --expid
        owned = [f for f in train_flags if _owned(f.split("=")[0])]
        if owned:
            raise UsageError(f"{owned[0]} is set by the sweep itself; remove it")
    except UsageError as err:
        parser.error(str(err))
    cells = [(lr, wd) for lr in lrs for wd in wds]
    expids = [expid_of(lr, wd) for lr, wd in cells]
    commands = {expid_of(lr, wd): cell_commands(args, lr, wd, train_flags) for lr, wd in cells}
    if args.dry_run:
        for expid in expids:
            for cmd in commands[expid]:
                print(shlex.join(cmd))
        if not args.no_plot:
            print(shlex.join(plot_command(args, expids)))
        return 0
    log_dir = os.path.join(args.save_dir, args.experiment, "logs")
    if args.jobs > 1:
        os.makedirs(log_dir, exist_ok=True)
    logs = {e: os.path.join(log_dir, f"{e}.log") if args.jobs > 1 else None for e in expids}
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        status = dict(zip(expids, pool.map(lambda e: run_cell(commands[e], logs[e]), expids)))
    failed = [e for e in expids if status[e] != 0]
    for e in failed:
        where = f"; see {logs[e]}" if logs[e] else ""
        print(f"cell {e} failed with exit status {status[e]}{where}", file=sys.stderr)
    done = [e for e in expids if status[e] == 0]
    if done and not args.no_plot:
        cmd = plot_command(args, done)
        print(f"$ {shlex.join(cmd)}", flush=True)
        if subprocess.call(cmd) != 0:
            return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main_wrapper(main))
