"""The one rule for run names (``--experiment``, ``--expid``), shared by the scripts.

A name is a single folder name: 1 to `MAX_LENGTH` characters, letters, digits, ``.``, ``_`` and
``-``, starting with a letter or digit (so never ``.``, ``..``, a hidden name, an option-like
``-x``, a path or anything a shell would interpret). scripts/lib.sh checks the same regular
expression (`NAME_PATTERN`; tests/test_security.py keeps the two equal).
"""

from __future__ import annotations

import re

from Utils.errors import UsageError

MAX_LENGTH = 100
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
_NAME = re.compile(NAME_PATTERN)


def is_valid_run_name(name: str) -> bool:
    """Whether `name` follows the run-name rule (see the module docstring)."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def validate_run_name(name: str, flag: str = "--expid") -> str:
    """Returns `name` when it is a valid run name, else raises one line naming the rule.

    Args:
        name: the value given.
        flag: the flag it came from, named in the message.

    Raises:
        UsageError: the name is empty, too long, or holds other characters.
    """
    if is_valid_run_name(name):
        return name
    if not name:
        why = "is empty"
    elif len(name) > MAX_LENGTH:
        why = f"is {len(name)} characters long (at most {MAX_LENGTH})"
    else:
        why = f"is {name!r}"
    raise UsageError(
        f"{flag} {why}; use 1-{MAX_LENGTH} letters, digits, '.', '_' or '-', starting with a "
        "letter or digit"
    )
