"""Errors raised by the data pipeline.

One exception type so the CLI can catch data problems and print a clean message (no traceback):
the message always says *where* (file, line or row) and *what* went wrong.
"""

from __future__ import annotations

from loongforge.errors import LoongForgeError


class DataError(LoongForgeError, ValueError):
    """A problem with user-supplied data: missing/malformed files, empty datasets, bad vocab sizes."""
