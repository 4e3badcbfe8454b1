"""Sorts Tiny ImageNet's validation images into one folder per class, idempotently.

Tiny ImageNet ships its 10,000 validation images flat in ``val/images/`` with their classes
listed in ``val/val_annotations.txt``. torchvision's ImageFolder needs ``val/<wnid>/``, so this
script moves ``val/images/<file>`` to ``val/<wnid>/<file>`` and removes the emptied
``val/images/``. Running it again does nothing; an interrupted run is completed.

Usage:
    python scripts/tiny_imagenet_setup.py --data-dir Data
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

FOLDER = "tiny-imagenet-200"


class SetupError(Exception):
    """A problem the user fixes (message printed as one line, exit status 1)."""


def read_annotations(path: Path) -> list[tuple[str, str]]:
    """Reads (file name, wnid) pairs from ``val_annotations.txt`` (tab-separated lines).

    Args:
        path: the annotations file.

    Returns:
        One pair per annotated image, in file order.

    Raises:
        SetupError: when a line has fewer than two fields.
    """
    pairs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t") if "\t" in line else line.split()
        if len(fields) < 2:
            raise SetupError(f"{path}:{number}: expected '<file>\\t<wnid>\\t...', got {line!r}")
        pairs.append((fields[0].strip(), fields[1].strip()))
    return pairs


def reorganise(base: Path) -> tuple[int, int]:
    """Moves the validation images of a Tiny ImageNet folder into class folders.

    Args:
        base: the ``tiny-imagenet-200`` folder.

    Returns:
        (images moved now, images already in place).

    Raises:
        SetupError: when the folder or its annotations are missing, or an annotated image is
            in neither place.
    """
    val = base / "val"
    annotations = val / "val_annotations.txt"
    if not annotations.is_file():
        raise SetupError(
            f"{annotations} not found: unzip tiny-imagenet-200.zip into the data folder "
            f"(http://cs231n.stanford.edu/tiny-imagenet-200.zip)"
        )
    flat = val / "images"
    moved = in_place = 0
    lost = []
    for name, wnid in read_annotations(annotations):
        source, target = flat / name, val / wnid / name
        if source.is_file():
            target.parent.mkdir(exist_ok=True)
            os.replace(source, target)
            moved += 1
        elif target.is_file():
            in_place += 1
        else:
            lost.append(name)
    if lost:
        raise SetupError(
            f"{len(lost)} annotated images (e.g. {lost[0]}) are in neither {flat} nor their "
            f"class folder: unzip tiny-imagenet-200.zip again"
        )
    if flat.is_dir() and not any(flat.iterdir()):
        flat.rmdir()
    return moved, in_place


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-dir",
        default="Data",
        help=f"folder that holds {FOLDER}/ (default: Data)",
    )
    args = parser.parse_args(argv)
    base = Path(args.data_dir) / FOLDER
    try:
        moved, in_place = reorganise(base)
    except (SetupError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if moved:
        print(f"moved {moved} validation images into class folders under {base / 'val'}")
    else:
        print(f"{base / 'val'} is already sorted into class folders ({in_place} images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
