"""Compute metrics from a run's features.h5 into ``<run>/cache/<metric><suffix>.h5``.

Example::

    python cache.py --experiment demo --expid a --metrics scale,performance

Without ``--metrics`` every metric that applies to the run is computed and the others are
listed with the reason they were skipped. Existing caches built from the same rows are reused
unless ``--overwrite``. Layouts of the files: docs/METRICS.md.
"""

from __future__ import annotations

import sys

from Utils.flags import Parser, add_run_flags, main_wrapper
from Utils.rundir import RunDir


def build_parser() -> Parser:
    """The parser of cache.py."""
    from Utils.metrics import ALIASES, METRICS  # the metric modules: loaded for the parser only

    p = Parser(
        prog="cache.py",
        description="Compute metrics (conservation laws and their theory, gradients, "
        "performance, weights) from features.h5 into cache/<metric><suffix>.h5.",
    )
    add_run_flags(
        p,
        overwrite_help="recompute caches that are up to date",
        verbose_help="print each cache file's path",
    )
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
    m.add_argument(
        "--source",
        default="auto",
        choices=["auto", "features", "online"],
        help="features: features.h5 (extract.py); online: online.h5 (train.py --track-online); "
        "auto: features.h5 when present, else online.h5",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Caches the run named by the flags; errors become one line and an exit status."""
    return main_wrapper(
        _cache, argv, interrupted="interrupted: finished cache files are kept, rerun to complete"
    )


def _cache(argv: list[str] | None) -> int:
    """Parses flags, caches the run's metrics and prints each metric's status."""
    from Utils.metrics import cache_path, cache_run  # imports h5py/numpy: not for --help

    args = build_parser().parse_args(argv)
    run_dir = RunDir(args.save_dir, args.experiment, args.expid).path
    statuses = cache_run(
        run_dir,
        metrics=args.metrics or None,
        suffix=args.suffix,
        overwrite=args.overwrite,
        subset=args.subset,
        seed=args.seed,
        progress=not args.no_progress and sys.stderr.isatty(),
        source=args.source,
    )
    width = max(len(n) for n in statuses) if statuses else 0
    for name, status in statuses.items():
        line = f"{name:<{width}}  {status}"
        if args.verbose and not status.startswith("skipped"):
            line += f"  ({cache_path(run_dir, name, args.suffix)})"
        print(line)
    from Utils.live import cache_summary

    for line in cache_summary(run_dir, args.suffix):  # per-group errors, then plot.py's command
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
