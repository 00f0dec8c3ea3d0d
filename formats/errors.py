"""The one exception family every layer derives from.

A user-facing error carries a single line that names the file (or field) and what is wrong with it.
The CLI prints it as ``error: <message>`` and exits 2; library callers can catch ``InteropError``.
"""
from __future__ import annotations

import os


class InteropError(Exception):
    """Base of all user-facing errors of megatron-interop (formats, interop, trainer)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        message = " ".join(str(message).split())  # always one line
        if path is not None:
            message = f"{os.fspath(path)}: {message}"
        super().__init__(message)
        self.path = None if path is None else os.fspath(path)


class FormatError(InteropError):
    """A file on disk is missing, truncated, foreign or inconsistent."""


class OutputExistsError(InteropError):
    """The destination exists and ``--force`` was not given."""
