"""Extract a run's checkpoints into one HDF5 file, <run>/features.h5 (see docs/FORMATS.md).

Example:
    python extract.py --experiment demo --expid run1 --save-dir results

Run it again at any time: only checkpoints not yet extracted are added, and an interrupted
extraction is completed. Run ``python extract.py --help`` for every flag.
"""

from __future__ import annotations

import argparse
import sys

from Utils.flags import Parser, add_run_flags, main_wrapper
from Utils.rundir import RunDir


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of extract.py."""
    p = Parser(
        prog="extract.py",
        description=(
            "Read every checkpoint of a run (ordered by the step stored inside each file) and "
            "write <save-dir>/<experiment>/<expid>/features.h5: parameters, BatchNorm "
            "statistics, optimizer buffers, the custom_sgd theory state, metrics, steps, "
            "epochs and learning rates. Reruns append only new checkpoints."
        ),
    )
    add_run_flags(
        p,
        overwrite_help="rebuild features.h5 from scratch (the old file is replaced only at the end)",
        verbose_help="print details of each stage",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip corrupt or truncated checkpoints with a warning instead of stopping",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (also off when not a tty)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Extracts the run named by the flags; errors become one line and an exit status."""
    return main_wrapper(
        _extract, argv, interrupted="interrupted; run the same command again to finish"
    )


def _extract(argv: list[str] | None) -> int:
    """Parses flags, extracts the run and prints a one-line summary."""
    args = build_parser().parse_args(argv)
    from Utils.extraction import extract_run  # imports torch: not needed for --help

    run_dir = RunDir(args.save_dir, args.experiment, args.expid).path
    report = extract_run(
        run_dir,
        overwrite=args.overwrite,
        skip_bad=args.skip_bad,
        verbose=args.verbose,
        progress=not args.no_progress,
    )
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
