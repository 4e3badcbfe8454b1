"""The end-to-end demo: train -> extract -> cache -> plot on Fashion-MNIST.

Trains the demo model (a small VGG-style net with BatchNorm, ReLU and a softmax classifier, so
translation, scale and rescale symmetries all appear) with SGD, momentum 0.9, weight decay and
one learning-rate drop, saving a checkpoint every few steps; then extracts, caches every
applicable metric and plots. The same network is then trained the same way with AdamW (run
``<expid>-adamw``), whose symmetry-breaking budget and equilibrium figures sit beside the SGD
ones. Each stage is run through its real command line, printed first.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags of the demo (all optional)."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--save-dir", default="results", help="root folder of the demo run")
    p.add_argument("--experiment", default="demo", help="experiment name")
    p.add_argument("--expid", default="fashion-vgg", help="run id")
    p.add_argument("--dataset", default="fashion-mnist", help="dataset")
    p.add_argument(
        "--epochs", type=int, default=2, help="training epochs (lr drop after the first)"
    )
    p.add_argument("--save-freq", type=int, default=10, help="steps between checkpoints")
    p.add_argument("--extra", default="", help="further train.py flags, quoted")
    p.add_argument(
        "--optimizers",
        default="sgd,adamw",
        help="comma list of the demo runs: sgd (expid), adamw (expid-adamw)",
    )
    return p.parse_args(argv)


def run(cmd: list[str]) -> float:
    """Runs one stage, echoing the command; exits with its status when it fails."""
    print("\n$ " + " ".join(shlex.quote(c) for c in cmd), flush=True)
    t0 = time.perf_counter()
    status = subprocess.call(cmd, cwd=ROOT)
    if status != 0:
        sys.exit(status)
    return time.perf_counter() - t0


# train.py flags of each demo run beyond the shared ones, and its expid suffix
RUNS = {
    "sgd": ("", ["--lr", "0.05", "--momentum", "0.9", "--wd", "5e-4"]),
    "adamw": ("-adamw", ["--optimizer", "adamw", "--lr", "2e-3", "--wd", "0.5"]),
}


def main(argv: list[str] | None = None) -> int:
    """Runs the four stages of every demo run and prints where the figures are."""
    args = parse_args(argv)
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    bad = [n for n in names if n not in RUNS]
    if bad or not names:
        print(
            f"demo.py: unknown --optimizers entry {bad[0] if bad else '(empty)'}; "
            f"use a comma list of {', '.join(RUNS)}",
            file=sys.stderr,
        )
        return 2
    seconds = {}
    for name in names:
        suffix, flags = RUNS[name]
        for stage, value in demo_run(args, args.expid + suffix, flags).items():
            seconds[f"{name} {stage}"] = value
    total = sum(seconds.values())
    print("\n" + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items()) + f"; total {total:.0f} s")
    for name in names:
        run_dir = Path(args.save_dir) / args.experiment / (args.expid + RUNS[name][0])
        print(f"figures ({name}): {run_dir / 'figures'}")
    return 0


def demo_run(args: argparse.Namespace, expid: str, flags: list[str]) -> dict[str, float]:
    """train -> extract -> cache -> plot of one demo run; seconds per stage."""
    py = sys.executable
    where = ["--experiment", args.experiment, "--expid", expid, "--save-dir", args.save_dir]
    seconds = {}
    seconds["train"] = run(
        [
            py,
            "train.py",
            *where,
            "--overwrite",
            "--dataset",
            args.dataset,
            "--model",
            "vgg-demo",
            "--epochs",
            str(args.epochs),
            "--train-batch-size",
            "128",
            *flags,
            "--lr-drops",
            "1",
            "--lr-drop-rate",
            "0.2",
            "--save-freq",
            str(args.save_freq),
            "--save-buffers",
            "grad,update",
            "--eval-freq",
            "200",
            "--deterministic",
            *shlex.split(args.extra),
        ]
    )
    seconds["extract"] = run([py, "extract.py", *where, "--overwrite"])
    seconds["cache"] = run([py, "cache.py", *where, "--overwrite"])
    seconds["plot"] = run([py, "plot.py", *where, "--overwrite"])
    return seconds


if __name__ == "__main__":
    sys.exit(main())
