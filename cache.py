"""Compute metrics from a run's features.h5 into ``<run>/cache/<metric><suffix>.h5``.

Example::

    python cache.py --experiment demo --expid a --metrics scale,performance

Without ``--metrics`` every metric that applies to the run is computed and the others are
listed with the reason they were skipped. Existing caches built from the same rows are reused
unless ``--overwrite``. Layouts of the files: docs/METRICS.md.
"""

from __future__ import annotations

import sys

from Utils.errors import UserError
from Utils.flags import Parser


def build_parser() -> Parser:
    """The parser of cache.py."""
    from Utils.metrics import ALIASES, METRICS

    p = Parser(
        prog="cache.py",
        description="Compute metrics (conservation laws and their theory, gradients, "
        "performance, weights) from features.h5 into cache/<metric><suffix>.h5.",
    )
    p.add_argument("--experiment", required=True, help="experiment name (folder)")
    p.add_argument("--expid", required=True, help="run id inside the experiment")
    p.add_argument(
        "--save-dir",
        default="results",
        help="root folder (or fsspec URL) that holds <experiment>/<expid>",
    )
    p.add_argument("--overwrite", action="store_true", help="recompute caches that are up to date")
    p.add_argument("-v", "--verbose", action="store_true", help="print each cache file's path")
    m = p.add_argument_group("metrics")
    m.add_argument(
        "--metrics",
        default="",
        help=f"comma list of metrics (default: all that apply): {', '.join(METRICS.names())}; "
        f"aliases: {', '.join(sorted(ALIASES))}",
    )
    m.add_argument("--suffix", default="", help="appended to each cache file name")
    m.add_argument(
        "--subset",
        type=int,
        default=None,
        help="elements kept per parameter by 'network' and in total by 'weights_grads' "
        "(network default: all; weights_grads default: 1000)",
    )
    m.add_argument("--seed", type=int, default=0, help="seed of the random --subset")
    m.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parses flags and caches the run's metrics; returns the exit status.

    A `UserError` is printed as one line ``error: <message>`` on stderr.
    """
    from Utils import fileio
    from Utils.metrics import cache_path, cache_run

    args = build_parser().parse_args(argv)
    try:
        run_dir = fileio.join(args.save_dir, args.experiment, args.expid)
        statuses = cache_run(
            run_dir,
            metrics=args.metrics or None,
            suffix=args.suffix,
            overwrite=args.overwrite,
            subset=args.subset,
            seed=args.seed,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except OSError as err:
        from Utils.flags import os_error_message

        print(f"error: {os_error_message(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished cache files are kept, rerun to complete", file=sys.stderr)
        return 130
    width = max(len(n) for n in statuses) if statuses else 0
    for name, status in statuses.items():
        line = f"{name:<{width}}  {status}"
        if args.verbose and not status.startswith("skipped"):
            line += f"  ({cache_path(run_dir, name, args.suffix)})"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
