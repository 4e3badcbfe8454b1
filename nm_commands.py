"""Console entry points installed by ``pip install`` (``nm-train``, ``nm-extract``, ...).

Each runs the matching top-level script's ``main`` exactly as ``python <script>.py`` does:
same flags, one-line errors and exit statuses.
"""

from __future__ import annotations

import sys


def train() -> int:
    """``nm-train``: train.py."""
    import train as script
    from Utils.flags import main_wrapper

    return main_wrapper(script.main, sys.argv[1:])


def extract() -> int:
    """``nm-extract``: extract.py."""
    import extract as script

    return script.main(sys.argv[1:])


def cache() -> int:
    """``nm-cache``: cache.py."""
    import cache as script

    return script.main(sys.argv[1:])


def plot() -> int:
    """``nm-plot``: plot.py."""
    import plot as script
    from Utils.flags import main_wrapper

    return main_wrapper(script.main, sys.argv[1:])
