"""Exceptions raised by the data package.

Both derive from ``ValueError`` so that callers that only know "bad input" can catch one type,
while tests and the CLI can tell a bad data file from a bad tokenizer.
"""

from __future__ import annotations


class DataError(ValueError):
    """A data file (or one record in it) is unusable.

    The message always starts with the location (``file:line`` or ``file:row N``) and says how to
    fix the input, so it can be shown to a user unchanged. ``reason`` is the machine-readable kind
    of problem (one of ``records.BadRecordReason``'s values) when the error concerns one record,
    and ``None`` for file-level problems.
    """

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason


class TokenizerError(ValueError):
    """A tokenizer directory or chat template cannot be loaded or used as this package needs."""
