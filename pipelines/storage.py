"""One way to address data: ``file://`` and ``s3://`` URIs mapped to pyarrow filesystems.

    fs, path = resolve("s3://bucket/datasets/fmnist", cfg.storage)
    write_json("file://./artifacts/x/manifest.json", {...})     # atomic

S3 endpoint, region and addressing come from :class:`~pipelines.config.StorageConfig` or the
standard AWS environment; credentials only from the AWS SDK's default chain, never from a URI,
and never logged. Transient errors are retried with backoff; the rest become one-line
:class:`~pipelines.errors.StorageError` naming the URI and the fix. Local writes are atomic
(temp name + rename); multi-object results are published by a marker written last. See
docs/data.md, "Storage".
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.fs as pafs

from .config import StorageConfig
from .errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMES = ("file", "s3")


class ObjectNotFound(StorageError):
    """The URI names a file or object that does not exist (its bucket does)."""


# --------------------------------------------------------------------------------------------
# URIs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class URI:
    """A parsed storage URI. ``path`` is absolute for ``file``; the object key for ``s3``."""

    scheme: str  # "file" | "s3"
    bucket: str  # "" for file
    path: str

    def __str__(self) -> str:
        if self.scheme == "file":
            return "file://" + self.path
        return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"

    @property
    def fs_path(self) -> str:
        """The path as the pyarrow filesystem wants it (``bucket/key`` for S3)."""
        if self.scheme == "file":
            return self.path
        return f"{self.bucket}/{self.path}".rstrip("/") if self.path else self.bucket

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> URI:
        path = self.path.rstrip("/")
        for part in parts:
            part = str(part).strip("/")
            if part:
                path = f"{path}/{part}" if path else part
        return URI(self.scheme, self.bucket, path)


def parse_uri(uri: str | URI) -> URI:
    """Parse ``file://…``, a plain local path or ``s3://bucket/prefix`` (see the module doc)."""
    if isinstance(uri, URI):
        return uri
    if isinstance(uri, Path):
        uri = str(uri)
    if not isinstance(uri, str) or not uri.strip():
        raise StorageError(f"storage URI {uri!r} is empty; use file://PATH or s3://bucket/prefix")
    text = uri.strip()
    if "://" not in text:
        return URI("file", "", _abs_local(text))
    scheme, rest = text.split("://", 1)
    scheme = scheme.lower()
    if scheme == "file":
        return URI("file", "", _abs_local(rest or "."))
    if scheme in ("s3", "s3a"):
        if "?" in rest or "#" in rest:
            raise StorageError(
                f"storage URI s3://{rest.split('?')[0].split('#')[0]} must not carry a query string or fragment; "
                "put endpoint settings in storage.s3_* and credentials in the environment (AWS_* or AWS_PROFILE)"
            )
        bucket, _, key = rest.partition("/")
        if "@" in bucket or ":" in bucket:
            # user-info (key:secret@bucket; a secret holding '/' leaves 'key:secret' where the
            # bucket goes): never valid in a bucket name, and never echoed
            where = bucket.rsplit("@", 1)[1] if "@" in bucket else "…"
            raise StorageError(
                f"storage URI s3://…@{where}/… must not embed credentials; "
                "use AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE instead"
            )
        if not bucket:
            raise StorageError(f"storage URI {text!r} has no bucket; use s3://bucket/prefix")
        key = "/".join(p for p in key.split("/") if p)  # normalise doubled and trailing slashes
        return URI("s3", bucket, key)
    raise StorageError(
        f"storage URI {text!r} has the unsupported scheme {scheme!r}; use file://PATH, a local path or s3://bucket/prefix"
    )


def _abs_local(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def join_uri(base: str | URI, *parts: str) -> str:
    """``join_uri("s3://b/x", "a", "b.json") == "s3://b/x/a/b.json"``."""
    return str(parse_uri(base).join(*parts))


def is_s3(uri: str | URI) -> bool:
    return parse_uri(uri).scheme == "s3"


# --------------------------------------------------------------------------------------------
# Filesystems
# --------------------------------------------------------------------------------------------


def endpoint_url(storage: StorageConfig | None = None) -> str | None:
    """The S3 endpoint override in effect (config first, then the standard environment)."""
    storage = storage or StorageConfig()
    return storage.s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _endpoint_desc(storage: StorageConfig | None) -> str:
    url = endpoint_url(storage)
    if not url:
        return "AWS S3 (no endpoint override)"
    if "@" in url:  # never echo userinfo an endpoint URL might carry
        scheme, _, rest = url.partition("://")
        url = f"{scheme}://{rest.rsplit('@', 1)[1]}"
    return f"the endpoint {url}"


def filesystem(uri: str | URI, storage: StorageConfig | None = None) -> pafs.FileSystem:
    """A pyarrow filesystem able to reach ``uri`` (picklable, so Ray tasks can carry it)."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        return pafs.LocalFileSystem()
    storage = storage or StorageConfig()
    region = storage.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    url = endpoint_url(storage)
    kwargs: dict[str, Any] = {
        # Retries live in with_retries() for our own calls; Ray Data retries its reads itself.
        # A couple of SDK-level attempts still smooth over single dropped connections.
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=2),
        "connect_timeout": 5,
        "request_timeout": 60,
    }
    if url:
        kwargs["endpoint_override"] = url
        kwargs["region"] = region or "us-east-1"
        kwargs["force_virtual_addressing"] = not storage.s3_force_path_style
    elif region:
        kwargs["region"] = region
    try:
        return pafs.S3FileSystem(**kwargs)
    except Exception as exc:  # e.g. a profile named in AWS_PROFILE that does not exist
        raise StorageError(
            f"cannot configure S3 access for {parsed} ({type(exc).__name__}); check AWS_PROFILE/AWS_* and storage.s3_*"
        ) from None


def resolve(uri: str | URI, storage: StorageConfig | None = None) -> tuple[pafs.FileSystem, str]:
    """``uri`` -> (pyarrow filesystem, path within it). The pair Ray Data's readers accept."""
    parsed = parse_uri(uri)
    return filesystem(parsed, storage), parsed.fs_path


# --------------------------------------------------------------------------------------------
# Retries and error translation
# --------------------------------------------------------------------------------------------

_TRANSIENT_MARKERS = (
    "NETWORK_CONNECTION", "SLOW_DOWN", "SlowDown", "THROTTL", "INTERNAL_FAILURE", "SERVICE_UNAVAILABLE",
    "REQUEST_TIMEOUT", "RequestTimeout", "HTTP status 500", "HTTP status 502", "HTTP status 503",
    "HTTP status 504", "Connection reset", "connection reset", "timed out", "Timeout was reached",
)
_DENIED_MARKERS = (
    "ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId", "SIGNATURE_DOES_NOT_MATCH",
    "SignatureDoesNotMatch", "HTTP status 403", "EXPIRED_TOKEN", "ExpiredToken", "InvalidToken",
    "UNRECOGNIZED_CLIENT", "MISSING_AUTHENTICATION_TOKEN",
)
_NO_BUCKET_MARKERS = ("NO_SUCH_BUCKET", "NoSuchBucket", "specified bucket does not exist")


_BOTOCORE_TRANSIENT = ("EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError")
_S3_TRANSIENT_CODES = ("InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "500", "502", "503", "504")


def _client_error_code(exc: BaseException) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _aws_code(exc: BaseException) -> str:
    """The AWS error code inside a pyarrow message (``AWS Error ACCESS_DENIED`` -> that) or a
    botocore error (``ClientError`` -> its code; connection errors -> their class name)."""
    if type(exc).__name__ == "ClientError" and _client_error_code(exc):
        return "AWS " + _client_error_code(exc)
    if type(exc).__name__ in _BOTOCORE_TRANSIENT:
        return "AWS NETWORK_CONNECTION"
    text = str(exc)
    if "AWS Error " in text:
        return "AWS " + text.split("AWS Error ", 1)[1].split(" during", 1)[0].strip()
    return type(exc).__name__


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: throttling, server errors, dropped or refused connections, timeouts."""
    if isinstance(exc, (StorageError, FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)) or type(exc).__name__ in _BOTOCORE_TRANSIENT:
        return True
    text = str(exc)
    if type(exc).__name__ == "ClientError" and _client_error_code(exc) in _S3_TRANSIENT_CODES:
        return True
    if any(m in text for m in _DENIED_MARKERS + _NO_BUCKET_MARKERS):
        return False
    return isinstance(exc, OSError) and any(m in text for m in _TRANSIENT_MARKERS)


def translate_error(exc: BaseException, uri: str | URI, what: str, storage: StorageConfig | None = None,
                    attempts: int = 1) -> StorageError:
    """One actionable line for an exception raised while doing ``what`` on ``uri``."""
    if isinstance(exc, StorageError):
        return exc
    parsed = parse_uri(uri)
    text = str(exc)
    if parsed.scheme == "s3":
        where = _endpoint_desc(storage)
        if any(m in text for m in _NO_BUCKET_MARKERS):
            return _missing_bucket(parsed, storage)
        if any(m in text for m in _DENIED_MARKERS):
            return StorageError(
                f"{where} denied access to {parsed} ({_aws_code(exc)}); check the credentials "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE) and their permissions on the bucket"
            )
        if "NETWORK_CONNECTION" in text or "curlCode" in text or isinstance(exc, ConnectionError) \
                or type(exc).__name__ in _BOTOCORE_TRANSIENT:
            return StorageError(
                f"cannot reach {where} for {parsed} after {attempts} attempt(s) ({_aws_code(exc)}); "
                "start the endpoint or fix storage.s3_endpoint_url / AWS_ENDPOINT_URL_S3"
            )
    if isinstance(exc, FileNotFoundError):
        return ObjectNotFound(f"{parsed} does not exist; check the URI")
    if isinstance(exc, PermissionError):
        return StorageError(f"permission denied while trying to {what} {parsed}; fix the folder's permissions or choose another storage.uri")
    first = text.splitlines()[0] if text else type(exc).__name__
    if "(Request ID" in first:
        first = first.split("(Request ID", 1)[0].strip()
    suffix = f" after {attempts} attempts" if attempts > 1 else ""
    return StorageError(f"could not {what} {parsed}{suffix}: {first}")


def _missing_bucket(parsed: URI, storage: StorageConfig | None) -> StorageError:
    return StorageError(
        f"bucket {parsed.bucket!r} does not exist at {_endpoint_desc(storage)} (URI {parsed}); create it "
        f"(aws s3 mb s3://{parsed.bucket}, or python cluster/s3_server.py start --bucket {parsed.bucket}) or fix the URI"
    )


def with_retries(fn: Callable[[], T], uri: str | URI, what: str, storage: StorageConfig | None = None) -> T:
    """Call ``fn``; retry transient errors with exponential backoff + jitter; translate the rest.

    ``storage.retries`` is the total number of attempts (at least 1).
    """
    storage = storage or StorageConfig()
    attempts = max(1, int(storage.retries))
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt < attempts and is_transient(exc):
                delay = storage.retry_backoff_s * (2 ** (attempt - 1)) * (1 + random.random())
                log.warning("transient storage error while trying to %s %s (%s); retry %d/%d in %.2fs",
                            what, parse_uri(uri), _aws_code(exc), attempt, attempts - 1, delay)
                time.sleep(delay)
                continue
            raise translate_error(exc, uri, what, storage, attempt) from None
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------------------------


def check_bucket(uri: str | URI, storage: StorageConfig | None = None) -> None:
    """For ``s3://`` URIs: fail with one line if the bucket is missing, denied or unreachable."""
    parsed = parse_uri(uri)
    if parsed.scheme != "s3":
        return
    fs = filesystem(parsed, storage)
    info = with_retries(lambda: fs.get_file_info(parsed.bucket), parsed, "reach the bucket of", storage)
    if info.type == pafs.FileType.NotFound:
        raise _missing_bucket(parsed, storage)


def read_bytes(uri: str | URI, storage: StorageConfig | None = None, fs: pafs.FileSystem | None = None) -> bytes:
    """The whole file/object. Pass ``fs`` (from :func:`filesystem`) to reuse one across many reads."""
    parsed = parse_uri(uri)
    fs = fs or filesystem(parsed, storage)

    def read() -> bytes:
        with fs.open_input_stream(parsed.fs_path) as f:
            return f.read()

    try:
        return with_retries(read, parsed, "read", storage)
    except ObjectNotFound:
        check_bucket(parsed, storage)  # a missing bucket deserves its own message
        raise


def write_bytes(uri: str | URI, data: bytes, storage: StorageConfig | None = None) -> None:
    """Write ``data`` to ``uri`` atomically (see the module doc), creating parent folders."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        with_retries(lambda: _atomic_local_write(parsed.path, data), parsed, "write", storage)
        return
    client = s3_client(storage)

    def put() -> None:
        # One PUT (atomic per object) rather than pyarrow's output stream: when a multipart
        # stream fails, closing it completes the upload with the parts sent so far, leaving a
        # truncated object under the final name. Above 5 GiB boto3's managed upload aborts the
        # multipart upload on failure instead.
        if len(data) <= _SINGLE_PUT_MAX:
            client.put_object(Bucket=parsed.bucket, Key=parsed.path, Body=data)
        else:
            client.upload_fileobj(io.BytesIO(data), parsed.bucket, parsed.path)

    with_retries(put, parsed, "write", storage)


_SINGLE_PUT_MAX = 5 * 2**30  # S3's limit for one PUT


def s3_client(storage: StorageConfig | None = None) -> Any:
    """A boto3 S3 client with the same endpoint, region and addressing as :func:`filesystem`
    (credentials from the AWS SDK's default chain)."""
    import boto3  # here, not at the top: only S3 writes need it
    from botocore.config import Config

    storage = storage or StorageConfig()
    region = storage.s3_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    config = Config(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=60,
                    s3={"addressing_style": "path" if storage.s3_force_path_style else "virtual"})
    return boto3.client("s3", endpoint_url=endpoint_url(storage), region_name=region, config=config)


def create_exclusive(uri: str | URI, data: bytes, storage: StorageConfig | None = None) -> bool:
    """Create ``uri`` holding ``data`` only if nothing is there yet: True if this call created it,
    False if it already existed. Atomic on local disks (``O_CREAT|O_EXCL``) and on S3
    (``If-None-Match: *``), so of two concurrent writers exactly one wins."""
    parsed = parse_uri(uri)
    if parsed.scheme == "file":
        os.makedirs(os.path.dirname(parsed.path), exist_ok=True)
        try:
            fd = os.open(parsed.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    client = s3_client(storage)

    def put() -> bool:
        try:
            client.put_object(Bucket=parsed.bucket, Key=parsed.path, Body=data, IfNoneMatch="*")
            return True
        except client.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict") \
                    or exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 412:
                return False
            raise

    return with_retries(put, parsed, "create", storage)


def _atomic_local_write(path: str, data: bytes) -> None:
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_json(uri: str | URI, storage: StorageConfig | None = None) -> Any:
    data = read_bytes(uri, storage)
    try:
        return json.loads(data)
    except ValueError as exc:
        raise StorageError(f"{parse_uri(uri)} is not valid JSON ({exc}); delete or rewrite it") from None


def write_json(uri: str | URI, obj: Any, storage: StorageConfig | None = None) -> None:
    write_bytes(uri, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode(), storage)


def exists(uri: str | URI, storage: StorageConfig | None = None) -> bool:
    """True if ``uri`` is an existing file/object or folder/prefix."""
    parsed = parse_uri(uri)
    fs = filesystem(parsed, storage)
    info = with_retries(lambda: fs.get_file_info(parsed.fs_path), parsed, "look up", storage)
    return info.type != pafs.FileType.NotFound


@dataclass(frozen=True)
class FileEntry:
    uri: str
    relpath: str  # relative to the listed folder, "/"-separated
    size: int


def list_files(uri: str | URI, storage: StorageConfig | None = None, recursive: bool = True) -> list[FileEntry]:
    """Files under the folder/prefix ``uri``, sorted by relative path; [] if it does not exist."""
    parsed = parse_uri(uri)
    fs = filesystem(parsed, storage)
    base = parsed.fs_path.rstrip("/")
    if parsed.scheme == "s3":
        check_bucket(parsed, storage)
    selector = pafs.FileSelector(base, recursive=recursive, allow_not_found=True)
    infos = with_retries(lambda: fs.get_file_info(selector), parsed, "list", storage)
    out = []
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):].lstrip("/")
        out.append(FileEntry(str(parsed.join(rel)), rel, int(info.size or 0)))
    return sorted(out, key=lambda e: e.relpath)


def list_dirs(uri: str | URI, storage: StorageConfig | None = None) -> list[str]:
    """Names of the immediate sub-folders (prefixes) of ``uri``; [] if it does not exist."""
    parsed = parse_uri(uri)
    fs = filesystem(parsed, storage)
    base = parsed.fs_path.rstrip("/")
    selector = pafs.FileSelector(base, recursive=False, allow_not_found=True)
    infos = with_retries(lambda: fs.get_file_info(selector), parsed, "list", storage)
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def delete_tree(uri: str | URI, storage: StorageConfig | None = None) -> None:
    """Delete the folder/prefix ``uri`` and everything under it (missing is fine)."""
    parsed = parse_uri(uri)
    fs = filesystem(parsed, storage)

    def delete() -> None:
        info = fs.get_file_info(parsed.fs_path)
        if info.type == pafs.FileType.Directory:
            fs.delete_dir(parsed.fs_path)
        elif info.type == pafs.FileType.File:
            fs.delete_file(parsed.fs_path)

    with_retries(delete, parsed, "delete", storage)


def local_path(uri: str | URI) -> str | None:
    """The local filesystem path of a ``file://`` URI, else None."""
    parsed = parse_uri(uri)
    return parsed.path if parsed.scheme == "file" else None


def upload_dir(local_dir: str | os.PathLike[str], uri: str | URI, storage: StorageConfig | None = None,
               last: str | None = None) -> None:
    """Copy the files of a flat local folder to ``uri``; ``last`` (e.g. ``config.json``, the
    folder's completeness marker) is written after all the others."""
    names = sorted(os.listdir(local_dir), key=lambda n: (n == last, n))
    for name in names:
        write_bytes(join_uri(uri, name), Path(local_dir, name).read_bytes(), storage)


def download_dir(uri: str | URI, local_dir: str | os.PathLike[str], storage: StorageConfig | None = None) -> Path:
    """The files of a flat storage folder as a local folder: the folder itself when ``uri`` is
    local, else a copy in ``local_dir``. :class:`ObjectNotFound` if it holds no files."""
    local = local_path(uri)
    if local is not None and Path(local).is_dir():
        return Path(local)
    out = Path(local_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = list_files(uri, storage, recursive=False)
    if not files:
        raise ObjectNotFound(f"no files at {uri}; pass the URI of a folder that holds them")
    for entry in files:
        name = entry.uri.rstrip("/").rsplit("/", 1)[-1]
        (out / name).write_bytes(read_bytes(entry.uri, storage))
    return out


# --------------------------------------------------------------------------------------------
# Locks: one writer at a time for a job, a dataset version, a workflow
# --------------------------------------------------------------------------------------------


class Locked(StorageError):
    """Another run holds the lock (the message names it and how to proceed)."""


@contextlib.contextmanager
def exclusive(uri: str | URI, what: str, storage: StorageConfig | None = None,
              ttl_s: float = 24 * 3600) -> Iterator[None]:
    """Hold the lock object ``uri`` while the block runs, so a second writer of ``what`` fails
    cleanly (:class:`Locked`) instead of racing. Created with :func:`create_exclusive`; it records
    the holder (host, pid, time). A lock is taken over when it is stale: its holder was on this
    host and is gone, or it is older than ``ttl_s`` (a holder on another host that died)."""
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "created": time.time()}
    payload = json.dumps(mine).encode()
    for _ in range(2):
        if create_exclusive(uri, payload, storage):
            break
        try:
            held = read_json(uri, storage)
        except ObjectNotFound:
            continue  # released meanwhile: try again
        if not _stale(held, ttl_s):
            raise Locked(f"{what} is in use by another run (host {held.get('host')}, pid {held.get('pid')}, since "
                         f"{held.get('since')}); wait for it to finish, or delete {parse_uri(uri)} if that run is gone")
        log.warning("taking over the stale lock %s (held by host %s, pid %s since %s)", parse_uri(uri),
                    held.get("host"), held.get("pid"), held.get("since"))
        _delete_if(uri, held, storage)
    else:
        raise Locked(f"{what} is in use by another run that took its lock at the same moment; try again")
    try:
        yield
    finally:
        _delete_if(uri, mine, storage)


def _stale(held: Any, ttl_s: float) -> bool:
    if not isinstance(held, dict):
        return True
    if time.time() - float(held.get("created", 0)) > ttl_s:
        return True
    if held.get("host") == socket.gethostname():
        try:
            os.kill(int(held.get("pid", 0)), 0)
        except ProcessLookupError:
            return True  # its process is gone
        except (PermissionError, ValueError, OSError):
            return False
    return False


def _delete_if(uri: str | URI, held: dict, storage: StorageConfig | None) -> None:
    """Delete the lock if it still holds ``held`` (its token), not a newer holder's."""
    try:
        current = read_json(uri, storage)
    except (ObjectNotFound, StorageError):
        return
    if isinstance(current, dict) and current.get("token") == held.get("token"):
        parsed = parse_uri(uri)
        fs = filesystem(parsed, storage)
        with contextlib.suppress(Exception):
            fs.delete_file(parsed.fs_path)
