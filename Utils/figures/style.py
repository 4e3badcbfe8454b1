"""How every figure looks: options, matplotlib settings, colours, LaTeX escaping, titles."""

from __future__ import annotations

import re
import shutil
import sys
from dataclasses import dataclass, replace
from typing import Any

import matplotlib
from matplotlib import colors as mcolors
from matplotlib.figure import Figure
from matplotlib.text import Text

from Utils.errors import UsageError
from Utils.figures.labels import HP_SHORT

FORMATS = ("png", "pdf", "svg")
X_AXES = ("steps", "time", "epoch")
DPI = 150
# Above this many layers the colours are keyed by a colour bar instead of a legend.
MAX_LEGEND_LAYERS = 8
# At most this many neurons are drawn per layer panel of a layer-wise figure.
MAX_NEURONS = 48


@dataclass(frozen=True)
class Options:
    """How figures are drawn.

    Attributes:
        layer_wise: one panel per layer showing individual neurons (conservation metrics).
        norm: divide every curve by its initial value.
        legend: name every layer in a legend, even when there are many (a colour bar keys
            the layers by depth above `MAX_LEGEND_LAYERS` otherwise).
        use_tex: typeset text with LaTeX (only when ``latex`` is on the PATH).
        x: horizontal axis: "steps", "time" or "epoch".
        formats: file formats written by `save_figure`.
        dpi: resolution of raster formats.
    """

    layer_wise: bool = False
    norm: bool = False
    legend: bool = False
    use_tex: bool = False
    x: str = "steps"
    formats: tuple[str, ...] = ("png",)
    dpi: int = DPI


def warn(message: str) -> None:
    """Prints a one-line warning on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def tex_available() -> bool:
    """Whether a ``latex`` executable is on the PATH (needed by ``--use-tex``)."""
    return shutil.which("latex") is not None


def resolve_options(options: Options) -> Options:
    """Turns `use_tex` off (with a warning) when LaTeX is not installed."""
    if options.use_tex and not tex_available():
        warn("--use-tex: no latex executable found; using matplotlib's own math text")
        return replace(options, use_tex=False)
    return options


def parse_formats(text: str) -> tuple[str, ...]:
    """Splits ``png,pdf`` into formats.

    Raises:
        UsageError: for an unknown format, listing the valid ones.
    """
    out: list[str] = []
    for raw in text.split(","):
        name = raw.strip().lower().lstrip(".")
        if not name:
            continue
        if name not in FORMATS:
            raise UsageError(
                f"unknown figure format '{raw.strip()}'; choose from: {', '.join(FORMATS)}"
            )
        if name not in out:
            out.append(name)
    if not out:
        raise UsageError(f"--format is empty; choose from: {', '.join(FORMATS)}")
    return tuple(out)


def tex_escape(text: str) -> str:
    """Escapes what LaTeX treats specially in plain text (outside ``$...$``)."""
    parts = re.split(r"(\$[^$]*\$)", text)
    for i in range(0, len(parts), 2):
        plain = re.sub(r"([_%&#{}])", r"\\\1", parts[i])
        plain = plain.replace("->", r"$\to$").replace("<", r"$<$").replace(">", r"$>$")
        parts[i] = plain.replace("§", r"\S{}").replace("|", r"$|$")
    return "".join(parts)


def texify(fig: Figure, options: Options) -> Figure:
    """With ``use_tex``, escapes every text of a finished figure for LaTeX."""
    if options.use_tex:
        for artist in fig.findobj(Text):
            text = artist.get_text()
            if text:
                artist.set_text(tex_escape(text))
    return fig


def rc(options: Options) -> dict[str, Any]:
    """Matplotlib settings of every figure."""
    return {
        "text.usetex": options.use_tex,
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "lines.linewidth": 1.5,
        "axes.formatter.useoffset": False,
    }


def new_figure(width: float, height: float, options: Options) -> Figure:
    """A figure (without pyplot, so nothing is kept alive) with constrained layout."""
    with matplotlib.rc_context(rc(options)):
        return Figure(figsize=(width, height), layout="constrained")


def layer_colors(n: int) -> list[tuple[float, float, float, float]]:
    """Colours of `n` layers: distinct hues up to `MAX_LEGEND_LAYERS`, else by depth."""
    if n <= MAX_LEGEND_LAYERS:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i % 10) for i in range(n)]
    cmap = matplotlib.colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def distinct_colors(n: int) -> list[tuple[float, float, float, float]]:
    """`n` colours that are all different (tab10, tab20, then evenly spaced hues)."""
    if n <= 10:
        cmap = matplotlib.colormaps["tab10"]
        return [cmap(i) for i in range(n)]
    if n <= 20:
        cmap = matplotlib.colormaps["tab20"]
        order = [*range(0, 20, 2), *range(1, 20, 2)]  # the ten dark hues first
        return [cmap(order[i]) for i in range(n)]
    cmap = matplotlib.colormaps["hsv"]
    return [cmap(i / n) for i in range(n)]


def darker(color: Any, amount: float = 0.45) -> tuple[float, float, float]:
    """`color` darkened by `amount` (0: unchanged, 1: black)."""
    r, g, b = mcolors.to_rgb(color)
    return (r * (1 - amount), g * (1 - amount), b * (1 - amount))


def short(name: str, width: int = 28) -> str:
    """`name` cut to `width` characters from the left (layer names end in what matters)."""
    return name if len(name) <= width else "..." + name[-(width - 3) :]


def fmt(value: Any) -> str:
    """A hyperparameter value for a title."""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def hp_text(
    hp: dict[str, Any], keys: tuple[str, ...] | list[str] = ("lr", "wd", "momentum")
) -> str:
    """``eta=0.05, lambda=0.0005, ...`` for the given keys of a run's hyperparameters."""
    parts = []
    for key in keys:
        if key in hp and hp[key] is not None:
            parts.append(f"{HP_SHORT.get(key, key)}={fmt(hp[key])}")
    return ", ".join(parts)
