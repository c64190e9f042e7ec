"""Errors that reach a user as one clear line.

A :class:`UserInputError` means the user gave something the library cannot use (a missing file, a 2D image,
an MR scan where CT is expected, ...). Front ends print its message alone and exit with status 2, without a
traceback; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["UserInputError", "USER_ERROR_EXIT_CODE"]

USER_ERROR_EXIT_CODE = 2


class UserInputError(ValueError):
    """Bad input from the user: the message says what was wrong and what was expected."""
