"""Errors a user can act on.

A :class:`UserError` carries one line that names the offending value and the fix. The CLI prints
it without a traceback and exits with code 2. Never put credentials in the message.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (config, URI, data, endpoint). ``str(err)`` is the one line shown to the user."""

    exit_code = 2


class ConfigError(UserError):
    """The configuration file or a ``--set`` override is invalid."""


class StorageError(UserError):
    """A storage URI cannot be used: missing bucket, unreachable endpoint, bad credentials."""


class DataError(UserError):
    """The data cannot be used: empty source, invalid images under ``strict``, bad manifest."""
