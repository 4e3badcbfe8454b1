"""Extract a run's checkpoints into one HDF5 file, <run>/features.h5 (see docs/FORMATS.md).

Example:
    python extract.py --experiment demo --expid run1 --save-dir results

Run it again at any time: only checkpoints not yet extracted are added, and an interrupted
extraction is completed. Run ``python extract.py --help`` for every flag.
"""

from __future__ import annotations

import argparse
import sys

from Utils.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    """The command-line parser of extract.py."""
    from Utils.flags import Parser

    p = Parser(
        prog="extract.py",
        description=(
            "Read every checkpoint of a run (ordered by the step stored inside each file) and "
            "write <save-dir>/<experiment>/<expid>/features.h5: parameters, BatchNorm "
            "statistics, optimizer buffers, the custom_sgd theory state, metrics, steps, "
            "epochs and learning rates. Reruns append only new checkpoints."
        ),
    )
    p.add_argument(
        "--experiment", required=True, default=argparse.SUPPRESS, help="experiment name (folder)"
    )
    p.add_argument(
        "--expid", required=True, default=argparse.SUPPRESS, help="run id inside the experiment"
    )
    p.add_argument(
        "--save-dir",
        default="results",
        help="root folder (or fsspec URL) that holds <experiment>/<expid>",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="rebuild features.h5 from scratch (the old file is replaced only at the end)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip corrupt or truncated checkpoints with a warning instead of stopping",
    )
    p.add_argument(
        "--no-progress", action="store_true", help="no progress bars (also off when not a tty)"
    )
    p.add_argument("-v", "--verbose", action="store_true", help="print details of each stage")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parses flags, extracts the run and prints a one-line summary; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        from Utils import fileio
        from Utils.extraction import extract_run

        run_dir = fileio.join(args.save_dir, args.experiment, args.expid)
        report = extract_run(
            run_dir,
            overwrite=args.overwrite,
            skip_bad=args.skip_bad,
            verbose=args.verbose,
            progress=not args.no_progress,
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        from Utils.flags import os_error_message

        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to finish the extraction", file=sys.stderr)
        return 130
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
