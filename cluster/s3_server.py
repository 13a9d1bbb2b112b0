"""A local S3-compatible endpoint for development and tests: moto's server on 127.0.0.1.

The same HTTP server Ray's and s3fs's own test suites use. It speaks the S3 REST API, keeps
objects in memory, and listens on loopback only. Use it as a script::

    python cluster/s3_server.py start [--port 9000] [--bucket vit-data] [--state-dir .s3-local]
    eval "$(python cluster/s3_server.py env)"     # export AWS_ENDPOINT_URL_S3 and test credentials
    python cluster/s3_server.py stop  [--state-dir .s3-local]

``start`` prints the ``export`` lines for the endpoint and the (fake) credentials; the process
id and port are kept in ``--state-dir`` so ``stop`` ends exactly that process. From Python::

    with LocalS3Server(bucket="vit-data") as s3:
        os.environ.update(s3.env())

The credentials are moto's conventional ``testing`` values; they mean nothing outside this
server and are the only credentials this project ever writes down.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
TEST_REGION = "us-east-1"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalS3Server:
    """moto's S3 server in a child process on ``127.0.0.1:port``.

    The server outlives this process until :meth:`stop` (what ``start`` and the dev stack need);
    ``die_with_parent=True`` ends it with this process too, so a killed test run leaves no orphan.
    ``enforce_auth=True`` makes the server check request signatures against its own IAM
    (``INITIAL_NO_AUTH_ACTION_COUNT=0``), so unknown access keys are rejected the way real S3
    rejects them; tests use that to exercise the bad-credentials path.
    """

    def __init__(self, port: int | None = None, bucket: str | None = None, *,
                 enforce_auth: bool = False, log_path: str | Path | None = None, die_with_parent: bool = False):
        self.port = port or free_port()
        self.bucket = bucket
        self.enforce_auth = enforce_auth
        self.log_path = Path(log_path) if log_path else None
        self.die_with_parent = die_with_parent  # True: end with this process (tests, benchmarks)
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """Environment that points boto3, pyarrow, Ray Data and MLflow at this endpoint."""
        return {
            "AWS_ENDPOINT_URL_S3": self.url,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_DEFAULT_REGION": TEST_REGION,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
        }

    def start(self, timeout: float = 20.0) -> LocalS3Server:
        env = dict(os.environ)
        if self.enforce_auth:
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "0"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        finally:
            if out is not subprocess.DEVNULL:
                out.close()
        try:
            wait_until_up(self.url, timeout, self.proc)
            if self.bucket:
                create_bucket(self.url, self.bucket)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop_pid(self.proc.pid)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover - stop_pid already SIGKILLed
                pass
            self.proc = None

    def __enter__(self) -> LocalS3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGTERM us when the parent dies (a killed test run leaves no
    orphan server). Elsewhere a no-op; ``stop()`` still ends the server normally."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def wait_until_up(url: str, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the S3 server at {url} exited with code {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=1):
                return
        except urllib.error.HTTPError:
            return  # it answers HTTP: up
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the S3 server at {url} did not answer within {timeout:.0f}s")


def create_bucket(url: str, bucket: str) -> None:
    """Create ``bucket`` on the endpoint (idempotent), with the test credentials."""
    import boto3

    client = boto3.client(
        "s3", endpoint_url=url, region_name=TEST_REGION,
        aws_access_key_id=TEST_ACCESS_KEY, aws_secret_access_key=TEST_SECRET_KEY,
    )
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)


def stop_pid(pid: int, timeout: float = 5.0) -> None:
    """SIGTERM the process ``pid`` (and its session), then SIGKILL if it lingers."""
    try:
        os.killpg(pid, signal.SIGTERM)  # the server runs in its own session (start_new_session)
    except ProcessLookupError:
        return
    except PermissionError:  # pragma: no cover
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        # reap it if it is our child (zombies still answer kill(pid, 0))
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                return
        except ChildProcessError:
            pass
        time.sleep(0.05)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------


def _state_file(state_dir: str) -> Path:
    return Path(state_dir) / "s3_server.json"


def _print_env(env: dict[str, str]) -> None:
    for key, value in env.items():
        print(f"export {key}={value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="local S3 endpoint (moto) on 127.0.0.1")
    parser.add_argument("action", choices=["start", "stop", "env"])
    parser.add_argument("--port", type=int, default=None, help="default: a free port")
    parser.add_argument("--bucket", default="vit-data", help="bucket to create on start")
    parser.add_argument("--state-dir", default=".s3-local", help="where the pid/port file lives")
    args = parser.parse_args(argv)
    state = _state_file(args.state_dir)

    if args.action == "start":
        if state.exists():
            info = json.loads(state.read_text())
            try:
                os.kill(info["pid"], 0)
                print(f"error: an S3 server is already running (pid {info['pid']}, {info['url']}); "
                      f"run `python cluster/s3_server.py stop --state-dir {args.state_dir}` first", file=sys.stderr)
                return 2
            except ProcessLookupError:
                state.unlink()
        state.parent.mkdir(parents=True, exist_ok=True)
        server = LocalS3Server(args.port, args.bucket, log_path=state.parent / "s3_server.log").start()
        state.write_text(json.dumps({"pid": server.proc.pid, "port": server.port, "url": server.url,
                                     "bucket": args.bucket}))
        print(f"# S3 endpoint {server.url} (pid {server.proc.pid}), bucket s3://{args.bucket}", file=sys.stderr)
        _print_env(server.env())
        return 0

    if not state.exists():
        print(f"error: no S3 server state in {args.state_dir}; start one with "
              f"`python cluster/s3_server.py start --state-dir {args.state_dir}`", file=sys.stderr)
        return 2
    info = json.loads(state.read_text())
    if args.action == "env":
        _print_env(LocalS3Server(info["port"]).env())
        return 0
    stop_pid(info["pid"])
    state.unlink()
    print(f"# stopped the S3 endpoint {info['url']} (pid {info['pid']})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
