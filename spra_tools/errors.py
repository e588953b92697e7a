"""The one exception type users meet: every expected failure says which file and what is wrong."""

from __future__ import annotations

import os
import re


class SpraError(Exception):
    """An expected failure (bad input, wrong base, unwritable output); the CLI prints it as one line."""

    def __init__(self, message: str, path: str | os.PathLike | None = None):
        self.path = None if path is None else os.fspath(path)
        self.message = message
        super().__init__(f"{shown(self.path)}: {message}" if self.path else message)


class FormatError(SpraError):
    """A file is not a valid container or adapter (truncated, corrupt, hostile, unknown version)."""


class MismatchError(SpraError):
    """An adapter does not belong to the weights it is applied to."""


_UNSHOWN = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def shown(text: str | os.PathLike) -> str:
    """`text` (a file or tensor name) safe to print: control characters (newlines, terminal escape
    sequences) and lone surrogates become Python escapes, so one message stays one line and the
    terminal shows what the name holds."""
    text = os.fspath(text)
    return _UNSHOWN.sub(lambda m: repr(m.group())[1:-1], text)
