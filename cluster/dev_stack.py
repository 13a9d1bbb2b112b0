"""Local development stack: an S3 endpoint, an MLflow server and a Ray head, all on 127.0.0.1.

    python cluster/dev_stack.py start [--services s3,mlflow,ray] [--state-dir .dev-stack]
    eval "$(python cluster/dev_stack.py env)"      # or: source .dev-stack/env.sh
    python cluster/dev_stack.py status
    python cluster/dev_stack.py stop

What runs (each in its own process session, recorded by pid in ``<state-dir>/stack.json``):

``s3``      moto's S3 server (``cluster/s3_server.py``), bucket ``--bucket`` (default ``vit-data``).
``mlflow``  ``mlflow server`` with a sqlite backend (``<state-dir>/mlflow.db``) and artifacts in
            ``s3://<bucket>/mlflow`` served through the server (``--artifacts-destination``), so
            clients need no S3 credentials; ``MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false``.
``ray``     ``ray start --head --block`` with its own ``--temp-dir``, ``--num-cpus=4`` (more logical
            CPUs than cores, see RUNNING-HERE.md), every port on 127.0.0.1, and Ray token
            authentication (``RAY_AUTH_MODE=token``) with a token of its own: a random 256-bit
            token in ``<state-dir>/ray-auth-token`` (mode 0600, created once, kept across restarts;
            delete it while the stack is stopped to rotate it), passed to the head as
            ``RAY_AUTH_TOKEN_PATH``. The head and every client must agree on it; without it the
            jobs API answers 401, with another token 403.

``stop`` ends exactly these processes by pid (their process groups, then any process still
running from this stack's Ray temp dir); it never runs ``ray stop``, which kills every Ray
process on the machine. ``env`` prints the ``export`` lines clients need (also written to
``<state-dir>/env.sh``): ``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS``, ``RAY_API_SERVER_ADDRESS``,
``AWS_ENDPOINT_URL_S3``, ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` (the token file's
path, never the token; ``env.sh`` also unsets ``RAY_AUTH_TOKEN``, which would take precedence
over the file). The only credentials it writes are moto's placeholder ``testing`` keys (only
when this stack started the S3 endpoint; with a real S3 endpoint the AWS SDK finds credentials
in the environment or an instance role) and the Ray token file, which only this user can read.

From Python (the tests)::

    stack = DevStack("/tmp/x/state").start(["s3", "mlflow"])
    os.environ.update(stack.env())
    ...
    stack.stop()
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from s3_server import LocalS3Server, create_bucket, free_port

SERVICES = ("s3", "mlflow", "ray")
STATE_FILE = "stack.json"
ENV_FILE = "env.sh"
TOKEN_FILE = "ray-auth-token"  # the stack's Ray auth token (mode 0600), read through RAY_AUTH_TOKEN_PATH
BIN = Path(sys.executable).parent  # the venv's bin/: mlflow and ray console scripts


class StackError(RuntimeError):
    """A service could not start; the message names it and where its log is."""


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _wait_http(url: str, timeout: float, proc: subprocess.Popen, what: str, log: Path) -> None:
    """Until ``url`` answers HTTP (any status) or ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{what} exited with code {proc.returncode} while starting; see {log}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.25)
    terminate([proc.pid], grace=5, group=True)
    raise StackError(f"{what} did not answer at {url} within {timeout:.0f}s; see {log}")


def _spawn(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - someone else's pid reused
        return False
    try:  # a zombie child of this process still answers kill(pid, 0)
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)  # every service runs in its own session: pgid == its pid
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_dead(pids: list[int], timeout: float) -> list[int]:
    """Wait until ``pids`` have exited (reaping our own children); returns those still alive."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if _alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.1)
        alive = [p for p in alive if _alive(p)]
    return alive


def terminate(pids: list[int], grace: float, group: bool = False) -> None:
    """SIGTERM ``pids`` (their process groups if ``group``), SIGKILL what outlives ``grace``
    seconds, and return only once they are gone."""
    for pid in pids:
        _signal(pid, signal.SIGTERM, group)
    for pid in _wait_dead(pids, grace):
        _signal(pid, signal.SIGKILL, group)
    _wait_dead(pids, 10)


def shell_lines(env: dict[str, str]) -> list[str]:
    """``export`` lines for ``env``; with a token file, also unset ``RAY_AUTH_TOKEN``, which Ray
    would otherwise prefer to ``RAY_AUTH_TOKEN_PATH``."""
    lines = [f"export {k}={v}" for k, v in env.items()]
    if "RAY_AUTH_TOKEN_PATH" in env:
        lines.append("unset RAY_AUTH_TOKEN")
    return lines


def ensure_token_file(path: Path) -> Path:
    """A random Ray auth token (256 bits, as ``ray get-auth-token --generate`` makes) in ``path``,
    readable by this user only; an existing non-empty file is kept."""
    if path.is_file() and path.read_text().strip():
        path.chmod(0o600)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))
    os.replace(tmp, path)
    return path


def _pids_using(marker: str) -> list[int]:
    """Pids of processes whose command line mentions ``marker`` (this stack's Ray temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmdline:
            pids.append(int(entry.name))
    return pids


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


class DevStack:
    """The services of one state folder. ``start`` is idempotent per service."""

    def __init__(self, state_dir: str | os.PathLike = ".dev-stack", bucket: str = "vit-data"):
        self.state_dir = Path(state_dir).resolve()
        self.bucket = bucket
        self.state: dict = {}
        if (self.state_dir / STATE_FILE).is_file():
            self.state = json.loads((self.state_dir / STATE_FILE).read_text())
            self.bucket = self.state.get("bucket", bucket)

    # ------------------------------------------------------------------ state

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state["bucket"] = self.bucket
        tmp = self.state_dir / f".{STATE_FILE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=2))
        os.replace(tmp, self.state_dir / STATE_FILE)
        (self.state_dir / ENV_FILE).write_text("\n".join(shell_lines(self.env())) + "\n")

    def running(self) -> dict[str, dict]:
        """Services whose recorded process is still alive."""
        return {name: info for name, info in self.state.get("services", {}).items() if _alive(info["pid"])}

    def env(self) -> dict[str, str]:
        """What a client of the running services needs in its environment (no real secrets)."""
        services = self.state.get("services", {})
        env: dict[str, str] = {}
        if "s3" in services:
            env.update(LocalS3Server(services["s3"]["port"]).env())  # moto's placeholder keys only
        if "mlflow" in services:
            env["MLFLOW_TRACKING_URI"] = services["mlflow"]["url"]
        if "ray" in services:
            env.update({
                "RAY_ADDRESS": services["ray"]["address"],
                "RAY_API_SERVER_ADDRESS": services["ray"]["dashboard"],
                "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": services["ray"].get("token_path", str(self.state_dir / TOKEN_FILE)),
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
            })
        return env

    # ------------------------------------------------------------------ start

    def start(self, services: list[str] | tuple[str, ...] = SERVICES, *, mlflow_port: int | None = None,
              ray_port: int | None = None, dashboard_port: int | None = None, num_cpus: int = 4) -> DevStack:
        unknown = sorted(set(services) - set(SERVICES))
        if unknown:
            raise StackError(f"unknown service(s) {unknown}; choose from {', '.join(SERVICES)}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state.setdefault("services", {})
        for stale in set(self.state["services"]) - set(self.running()):
            del self.state["services"][stale]
        try:
            if "s3" in services or "mlflow" in services:
                self._start_s3()
            if "mlflow" in services:
                self._start_mlflow(mlflow_port)
            if "ray" in services:
                self._start_ray(ray_port, dashboard_port, num_cpus)
        finally:
            self._save()
        return self

    def _start_s3(self) -> None:
        if "s3" in self.running():
            return
        server = LocalS3Server(bucket=self.bucket, log_path=self.state_dir / "s3.log").start()
        self.state["services"]["s3"] = {"pid": server.proc.pid, "port": server.port, "url": server.url}

    def _start_mlflow(self, port: int | None) -> None:
        if "mlflow" in self.running():
            return
        s3 = self.state["services"]["s3"]
        create_bucket(s3["url"], self.bucket)
        port = port or free_port()
        log = self.state_dir / "mlflow.log"
        env = {**os.environ, **LocalS3Server(s3["port"]).env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", f"sqlite:///{self.state_dir / 'mlflow.db'}",
               "--artifacts-destination", f"s3://{self.bucket}/mlflow"]
        proc = _spawn(cmd, env, log)
        url = f"http://127.0.0.1:{port}"
        _wait_http(url + "/health", 90, proc, "mlflow server", log)
        self.state["services"]["mlflow"] = {"pid": proc.pid, "port": port, "url": url,
                                            "artifacts": f"s3://{self.bucket}/mlflow"}

    def _start_ray(self, port: int | None, dashboard_port: int | None, num_cpus: int) -> None:
        if "ray" in self.running():
            return
        port, dashboard_port = port or free_port(), dashboard_port or free_port()
        # Short (unix socket paths are limited to ~107 bytes) and unique to this state folder.
        digest = hashlib.sha256(str(self.state_dir).encode()).hexdigest()[:8]
        temp_dir = Path(tempfile.gettempdir()) / f"ray-dev-{os.getuid()}-{digest}"
        log = self.state_dir / "ray.log"
        token_path = ensure_token_file(self.state_dir / TOKEN_FILE)
        # Token auth with the stack's own token: the head, its dashboard/jobs API, and every driver
        # and worker it starts (they inherit this environment) read the token from the file.
        env = {**os.environ, **{k: v for k, v in self.env().items() if k.startswith("AWS_") or k.startswith("MLFLOW_")},
               "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": str(token_path), "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # `python` in job entrypoints = this venv's
        env.pop("RAY_ADDRESS", None)
        env.pop("RAY_AUTH_TOKEN", None)  # it would take precedence over RAY_AUTH_TOKEN_PATH
        # Every port Ray would otherwise take from a fixed default (client server 10001, agent 52365,
        # workers 10002-19999) is chosen free here, so this head coexists with other Ray clusters
        # on the same machine (another user's agent on 52365 leaves jobs with "No available agent").
        cmd = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}",
               f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--ray-client-server-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0",
               f"--num-cpus={num_cpus}", "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
        proc = _spawn(cmd, env, log)
        dashboard = f"http://127.0.0.1:{dashboard_port}"
        _wait_http(dashboard + "/api/version", 120, proc, "ray head", log)
        self.state["services"]["ray"] = {"pid": proc.pid, "address": f"127.0.0.1:{port}", "dashboard": dashboard,
                                         "temp_dir": str(temp_dir), "token_path": str(token_path)}

    # ------------------------------------------------------------------ stop

    def stop(self, services: list[str] | tuple[str, ...] = SERVICES) -> list[str]:
        """Stop the given services (Ray first, S3 last); returns the names stopped."""
        stopped = []
        for name in ("ray", "mlflow", "s3"):
            info = self.state.get("services", {}).get(name)
            if name not in services or info is None:
                continue
            terminate([info["pid"]], grace=15 if name == "ray" else 5, group=True)
            if name == "ray":  # daemons that left the process group still carry the temp dir
                terminate(_pids_using(info["temp_dir"]), grace=5)
            del self.state["services"][name]
            stopped.append(name)
        self._save()
        return stopped


# --------------------------------------------------------------------------------------------
# Script
# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="local dev stack on 127.0.0.1: S3 endpoint, MLflow server, Ray head")
    parser.add_argument("action", choices=["start", "stop", "status", "env"])
    parser.add_argument("--services", default=",".join(SERVICES), help="comma-separated subset of s3,mlflow,ray")
    parser.add_argument("--state-dir", default=".dev-stack", help="pids, logs, sqlite db and env.sh live here")
    parser.add_argument("--bucket", default="vit-data")
    parser.add_argument("--mlflow-port", type=int, default=None, help="default: a free port")
    parser.add_argument("--ray-port", type=int, default=None, help="Ray GCS port (default: a free port)")
    parser.add_argument("--dashboard-port", type=int, default=None, help="Ray dashboard/jobs API port")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the Ray head (default 4)")
    args = parser.parse_args(argv)
    services = [s.strip() for s in args.services.split(",") if s.strip()]
    stack = DevStack(args.state_dir, bucket=args.bucket)

    if args.action == "start":
        try:
            stack.start(services, mlflow_port=args.mlflow_port, ray_port=args.ray_port,
                        dashboard_port=args.dashboard_port, num_cpus=args.num_cpus)
        except StackError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        for name, info in stack.running().items():
            where = info.get("url") or info.get("dashboard")
            print(f"# {name}: {where} (pid {info['pid']})", file=sys.stderr)
        print(f"# environment: source {stack.state_dir / ENV_FILE}", file=sys.stderr)
        for line in shell_lines(stack.env()):
            print(line)
        return 0
    if args.action == "env":
        for line in shell_lines(stack.env()):
            print(line)
        return 0
    if args.action == "status":
        recorded = stack.state.get("services", {})
        if not recorded:
            print("no services recorded in", stack.state_dir)
        running = stack.running()
        for name, info in recorded.items():
            state = "running" if name in running else "dead"
            print(f"{name}: {state} pid {info['pid']} {info.get('url') or info.get('dashboard')}")
        return 0 if recorded and len(running) == len(recorded) else 1
    stopped = stack.stop(services)
    print(f"# stopped: {', '.join(stopped) or 'nothing was running'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
