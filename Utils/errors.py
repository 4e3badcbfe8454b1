"""Errors a user can fix: the scripts print them as one line and exit non-zero."""


class UserError(Exception):
    """A problem with the user's input or files, answered by one line naming the fix.

    Attributes:
        exit_code: process exit status the scripts use for this error.
    """

    exit_code = 1


class UsageError(UserError):
    """A flag or argument value is invalid (exit status 2, as argparse uses)."""

    exit_code = 2


class UnknownNameError(UsageError, KeyError):
    """A name that is not in a registry."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DataMissingError(UserError):
    """Dataset files are not where they should be."""


class CorruptFileError(UserError):
    """A checkpoint, HDF5 or JSON file cannot be read."""
