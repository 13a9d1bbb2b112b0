"""Errors a user can act on, and the helpers that keep their messages to one safe line.

A :class:`UserError` carries one line that names the offending value and the fix. The CLI prints
it without a traceback and exits with code 2. Never put credentials in the message: pass URIs
through :func:`redact_uri` and exception texts through :func:`first_line`.
"""

from __future__ import annotations

import urllib.parse


class UserError(Exception):
    """Bad input (config, URI, data, endpoint). ``str(err)`` is the one line shown to the user."""

    exit_code = 2


class ConfigError(UserError):
    """The configuration file or a ``--set`` override is invalid."""


class StorageError(UserError):
    """A storage URI cannot be used: missing bucket, unreachable endpoint, bad credentials."""


class DataError(UserError):
    """The data cannot be used: empty source, invalid images under ``strict``, bad manifest."""


class TrackingError(UserError):
    """The MLflow tracking server or model registry cannot be used (unreachable, refused)."""


class InferError(UserError):
    """The inference job cannot run or did not produce exactly one row per input."""


class RegisterError(UserError):
    """The model cannot be registered (bad model directory, no test data for the gate, ...)."""


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), else its type name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def short(exc: BaseException) -> str:
    """``TypeName: first line`` of an exception, for reasons shown next to a file name."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def redact_uri(uri: str) -> str:
    """A URI safe to print: any ``user:password@`` part, query string and fragment removed."""
    parts = urllib.parse.urlsplit(str(uri))
    if parts.username or parts.password:
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    return str(uri)
