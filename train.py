"""Train a network with dense checkpoints that carry optimizer buffers and theory state.

Example:
    python train.py --experiment demo --expid run1 --dataset fashion-mnist --model vgg-demo \
        --epochs 2 --lr 0.05 --momentum 0.9 --wd 5e-4 --lr-drops 1 --save-freq 10

Run ``python train.py --help`` for every flag.
"""

from __future__ import annotations

import sys

from Utils.flags import given_flags, main_wrapper, parse_train_args
from Utils.training import train


def main(argv: list[str] | None = None) -> int:
    """Parses flags and trains; returns the exit status."""
    config = parse_train_args(argv)
    train(config, given=set(given_flags(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(
        main_wrapper(
            main, interrupted="interrupted; continue the run with the same command and --resume"
        )
    )
