"""The one exception type the CLI turns into a short message and a non-zero exit.

Anything a user can fix (a bad config value, a missing file, a malformed data row) raises
:class:`UserError`; everything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input: printed as one message, without a traceback."""


class ConfigError(UserError):
    """A run config value that is unknown, of the wrong type, or out of range."""


class DataError(UserError):
    """A data file that is missing, unreadable, or has a row the chosen format cannot use."""


class PeerExit(UserError):
    """This rank stops because another one failed and said why: the CLI exits 2 without a second message."""
