"""Draw the figures of one or several runs from their cache files (never from checkpoints).

Examples:
    python plot.py --experiment demo --expid run1
    python plot.py --experiment demo --expid run1 --metrics scale,rescale --layer-wise --norm
    python plot.py --experiment grid --expid 'lr*' --metrics translation,scale,rescale

Figures go to ``<run>/figures`` (several runs: ``<save-dir>/<experiment>/figures``). They are
derived from the caches, so plotting again replaces them; each file is written under a
temporary name and renamed, so a figure is never seen half-written. Run
``python plot.py --help`` for every flag.
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("MPLBACKEND", "Agg")

from Utils import figures  # noqa: E402  (after choosing matplotlib's backend)
from Utils.flags import Parser, main_wrapper, run_name  # noqa: E402


def plot_parser() -> argparse.ArgumentParser:
    """The parser of plot.py."""
    p = Parser(
        prog="plot.py",
        description=(
            "Draw figures from the caches written by cache.py: translation, scale and rescale "
            "(measured per-layer sums with the exact and the paper's theory, and their relative "
            "errors), performance, and every other cached metric. Several runs (--expid a,b or "
            "a glob such as 'lr*') are compared in a grid over the hyperparameters that differ."
        ),
    )
    r = p.add_argument_group("runs")
    r.add_argument(
        "--experiment",
        default="example",
        type=run_name("--experiment"),
        help="experiment name (folder)",
    )
    r.add_argument(
        "--expid",
        required=True,
        help="run id, a comma list of ids, or a glob pattern in quotes (e.g. 'lr*')",
    )
    r.add_argument("--save-dir", default="results", help="root folder of all experiments")
    r.add_argument(
        "--suffix", default="", help="cache file suffix (cache/<metric><suffix>.h5) to read"
    )
    f = p.add_argument_group("figures")
    f.add_argument(
        "--metrics",
        default="",
        help="comma list of cached metrics to draw (default: every cache of the run); figures: "
        f"{', '.join(n for n in figures.PLOTTERS.names() if n != figures.GENERIC)}; any other "
        "cache gets the generic figure (every per-step series)",
    )
    f.add_argument(
        "--layer-wise",
        action="store_true",
        help="conservation metrics: one panel per layer showing individual neurons",
    )
    f.add_argument("--norm", action="store_true", help="divide every curve by its initial value")
    f.add_argument(
        "--legend",
        action="store_true",
        help="name every layer in a legend even when there are many (default: a colour bar "
        "keyed by layer depth above 8 layers)",
    )
    f.add_argument("--use-tex", action="store_true", help="typeset with LaTeX when it is installed")
    f.add_argument("--x", default="steps", choices=figures.X_AXES, help="x axis")
    f.add_argument(
        "--format",
        default="png",
        help=f"comma list of file formats: {', '.join(figures.FORMATS)} (png at 150 dpi)",
    )
    f.add_argument(
        "--plot-dir",
        default="",
        help="output folder (default <run>/figures, or <save-dir>/<experiment>/figures for "
        "several runs)",
    )
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="accepted for symmetry with the other scripts: figures are always replaced",
    )
    f.add_argument("-v", "--verbose", action="store_true", help="print the caches read")
    return p


def main(argv: list[str] | None = None) -> int:
    """Parses flags, draws the figures and prints the paths written; returns the exit status."""
    args = plot_parser().parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] or None
    options = figures.Options(
        layer_wise=args.layer_wise,
        norm=args.norm,
        legend=args.legend,
        use_tex=args.use_tex,
        x=args.x,
        formats=figures.parse_formats(args.format),
    )
    paths = figures.make_figures(
        args.save_dir,
        args.experiment,
        args.expid,
        metrics=metrics,
        options=options,
        suffix=args.suffix,
        plot_dir=args.plot_dir,
        verbose=args.verbose,
    )
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main_wrapper(main))
