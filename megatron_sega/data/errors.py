"""Exceptions raised by the data package (defined with the other user errors in
:mod:`megatron_sega.errors`): ``DataError`` for a bad data file or record, ``TokenizerError`` for
a tokenizer that cannot be used. Both are ``ValueError`` and :class:`~megatron_sega.errors.UserError`."""

from __future__ import annotations

from megatron_sega.errors import DataError, TokenizerError

__all__ = ["DataError", "TokenizerError"]
