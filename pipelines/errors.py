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


def user_error_behind(exc: BaseException) -> UserError | None:
    """The innermost :class:`UserError` that ``exc`` wraps, if any: a Ray task or actor error
    (``.cause``), Ray Data's ``UserCodeException`` (raised ``from`` the UDF's error) and plain
    exception chains are followed, so a bad input found inside a Ray worker still reaches the
    user as its one line (lines Ray appends to the message on the way are dropped)."""
    found, seen = None, set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, UserError):
            found = current  # keep walking: Ray's task errors subclass their cause's class; the cause is the clean one
        current = getattr(current, "cause", None) or current.__cause__ or current.__context__
    if found is not None and found.args and "\n" in str(found.args[0]):
        found.args = (str(found.args[0]).splitlines()[0], *found.args[1:])  # Ray Data appends retry advice
    return found


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), else its type name."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else type(exc).__name__


def short(exc: BaseException) -> str:
    """``TypeName: first line`` of an exception, for reasons shown next to a file name."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


_SECRET_QUERY_KEYS = ("token", "password", "passwd", "secret", "signature", "sig", "key", "credential", "auth")


def _userinfo_end(text: str) -> int:
    """Index of the '@' that ends a URI's user-info, or -1. Also finds user-info whose secret
    holds a raw '/' (``http://user:se/cret@host``), which a URL parser reads as a path."""
    scheme, sep, rest = text.partition("://")
    if not sep or scheme.lower() == "file":
        return -1
    rest = rest.split("?", 1)[0].split("#", 1)[0]
    first = rest.split("/", 1)[0]
    if "@" in first:
        return len(scheme) + 3 + first.rindex("@")
    user, colon, after = first.partition(":")
    if colon and not after.isdigit() and "@" in rest:  # "user:secret/...@host", not "host:port/a@b"
        return len(scheme) + 3 + rest.rindex("@")
    return -1


def has_credentials(uri: str | None) -> bool:
    """True when ``uri`` embeds a secret: ``user:password@`` / ``token@`` user-info, or a query
    parameter named like a token, password, key or signature."""
    if not uri or "://" not in str(uri):
        return False
    text = str(uri)
    if _userinfo_end(text) >= 0:
        return True
    keys = [k.lower() for k, _ in urllib.parse.parse_qsl(urllib.parse.urlsplit(text).query, keep_blank_values=True)]
    return any(word in k for k in keys for word in _SECRET_QUERY_KEYS)


def redact_uri(uri: str) -> str:
    """A URI safe to print: any user-info dropped, and the query string and fragment too when
    they may hold a secret (see :func:`has_credentials`)."""
    text = str(uri)
    if not has_credentials(text):
        return text
    end = _userinfo_end(text)
    if end >= 0:
        text = text[: text.index("://") + 3] + text[end + 1:]
    return text.split("?", 1)[0].split("#", 1)[0]


def redact_values(obj):
    """``obj`` (nested dicts, lists, strings) with every string passed through :func:`redact_uri`."""
    if isinstance(obj, dict):
        return {k: redact_values(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_values(v) for v in obj)
    return redact_uri(obj) if isinstance(obj, str) else obj
