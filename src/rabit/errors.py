"""The line between bad input and bugs.

``InputError`` and the built-in ``ValueError`` / ``FileNotFoundError`` mean input the user can fix (a missing
file, an unsupported model, a bad option, a corrupt checkpoint, a missing optional package): the command line
shows their message in one line and exits with status 2. Every other exception is a bug or a failure of the
environment: it keeps its traceback and the exit status is 1.
"""
from __future__ import annotations


class InputError(Exception):
    """Input the user can fix; its message says what and how."""


class UnavailableError(InputError, RuntimeError):
    """Something the input needs is not available here: an optional package, a dataset, a kernel backend."""


class BackendUnavailable(UnavailableError):
    """A kernel backend was asked for explicitly but cannot run here."""


INPUT_ERRORS = (InputError, ValueError, FileNotFoundError)

__all__ = ["InputError", "UnavailableError", "BackendUnavailable", "INPUT_ERRORS"]
