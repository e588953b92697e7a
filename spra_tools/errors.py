"""The one exception type users meet: every expected failure says which file and what is wrong."""

from __future__ import annotations

import os


class SpraError(Exception):
    """An expected failure (bad input, wrong base, unwritable output); the CLI prints it as one line."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class FormatError(SpraError):
    """A file is not a valid container or adapter (truncated, corrupt, hostile, unknown version)."""


class MismatchError(SpraError):
    """An adapter does not belong to the weights it is applied to."""
