"""Node loss on a two-node Ray cluster on this one machine: the run resumes and finishes once.

The test re-runs this file as a driver (``python tests/test_multinode.py driver ...``) inside
fresh network, PID and mount namespaces (``unshare --net --pid --fork --mount-proc
--kill-child``, root only):

- the network namespace holds only loopback, so Ray may listen on every interface, which a
  second node on the same machine needs (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1``), and is still
  reachable from 127.0.0.1 only; nothing in it collides with other Ray clusters' ports;
- the PID namespace ends every process the driver started (moto, both nodes, their workers)
  when the driver ends: normally, by an exception, or killed with the test (``--kill-child``,
  and the test's own parent-death signal on ``unshare``). Nothing outlives the test.

The driver starts moto's S3 server, ``ray start --head`` and a second node (``ray start
--address``), 3 logical CPUs each and each with its own ``--temp-dir``, prepares the small
Fashion-MNIST fixture onto S3, and trains a tiny ViT on 2 workers at 2 CPUs each, so one
worker runs on each node. After the first checkpoint is on S3 it SIGKILLs node 2 (its ``ray
start`` process, its raylet and every process under them or naming its temp dir) in the
middle of the next epoch, wipes that temp dir (a rebooted machine) and starts node 2 again.
The test checks: training finished with at least one restart, the history holds every epoch
exactly once, one MLflow run (FINISHED) for the run name, the checkpoints and the exported
model are on S3, and both worker groups spanned both nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 3
RUN_NAME = "multinode"
DRIVER_TIMEOUT_S = 540  # the whole driver; a healthy run takes ~1.5-2.5 min on 2 busy cores
TRAIN = [
    "model.args.embed_dim=32", "model.args.depth=1", "model.args.num_heads=2", "model.args.patch_size=7",
    "train.batch_size=32", "train.num_workers=2", "train.cpus_per_worker=2", "train.max_failures=3",
    f"train.epochs={EPOCHS}", "train.warmup_epochs=0.5", f"train.run_name={RUN_NAME}", "data.shard_rows=60",
]


# --------------------------------------------------------------------------------------------
# The test (outside the namespaces)
# --------------------------------------------------------------------------------------------


def _namespaces_unavailable() -> str | None:
    """Why the driver cannot run in its own namespaces here, or None."""
    if not sys.platform.startswith("linux"):
        return "needs Linux namespaces (unshare)"
    if shutil.which("unshare") is None:
        return "needs util-linux `unshare` on PATH"
    if os.geteuid() != 0:
        return "needs root to create network/PID namespaces with unshare (CI runs as root)"
    probe = subprocess.run(["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child", "true"],
                           capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        return f"`unshare --net --pid --fork --mount-proc` is not permitted here: {probe.stderr.strip()[:300]}"
    return None


def _die_with_parent() -> None:
    """In the ``unshare`` child: SIGKILL it when the test process dies (``unshare`` ignores SIGTERM
    while it waits); ``--kill-child`` then kills the driver, and with it the PID namespace."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@pytest.mark.integration
def test_second_node_killed_mid_epoch_then_restarted(fmnist_idx, tmp_path):
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    work = tmp_path / "work"
    work.mkdir()
    for stale in Path("/tmp").glob("rmn-*"):  # left by a test process killed before its clean-up
        if stale.name[4:].isdigit() and not Path(f"/proc/{stale.name[4:]}").exists():
            shutil.rmtree(stale, ignore_errors=True)
    temp_root = Path(f"/tmp/rmn-{os.getpid()}")  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child",
           sys.executable, str(Path(__file__).resolve()), "driver", "--work", str(work),
           "--temp-root", str(temp_root), "--source-dir", str(fmnist_idx.folder)]
    log_path = work / "driver.log"
    t0 = time.monotonic()
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    cwd=ROOT, preexec_fn=_die_with_parent)
            try:
                proc.wait(timeout=DRIVER_TIMEOUT_S)
            finally:
                if proc.poll() is None:  # unshare's death kills the namespace's init, and so all of it
                    proc.kill()
                    proc.wait(timeout=30)
    finally:
        shutil.rmtree(temp_root, ignore_errors=True)
    seconds = time.monotonic() - t0
    tail = log_path.read_text(errors="replace")[-6000:]
    result_path = work / "result.json"
    assert proc.returncode == 0 and result_path.is_file(), (
        f"driver exited with {proc.returncode} after {seconds:.0f} s; log tail:\n{tail}")
    r = json.loads(result_path.read_text())
    print(f"multinode driver: {seconds:.0f} s; {json.dumps(r['timings'])}")

    # the cluster had two nodes and each worker group used both
    assert r["nodes_before_kill"] == 2 and r["nodes_after_restart"] == 2
    assert len(r["groups"]) >= 2, r["groups"]
    first, last = r["groups"][0], r["groups"][-1]
    assert sorted(first["nodes"]) == sorted([r["head_node"], r["node2_first"]]), first
    assert sorted(last["nodes"]) == sorted([r["head_node"], r["node2_second"]]), last
    assert r["node2_first"] != r["node2_second"]  # a new raylet, not the old one come back
    # node 2 was killed mid-run, after the first checkpoint, with a Train worker on it
    kill = r["kill"]
    assert kill["latest_checkpoint_epoch"] is not None and kill["latest_checkpoint_epoch"] < EPOCHS - 1, kill
    assert kill["train_workers_killed"] >= 1 and kill["raylet_killed"], kill

    # the run resumed from a checkpoint and finished: every epoch once, in one MLflow run
    res = r["result"]
    assert res["restarts"] >= 1
    assert [h["epoch"] for h in res["history"]] == list(range(EPOCHS))
    restarts = [h["restarts"] for h in res["history"]]
    assert restarts[0] == 0 and restarts[-1] >= 1 and restarts == sorted(restarts), restarts
    assert r["mlflow_runs"] == [{"status": "FINISHED", "run_id": res["mlflow_run_id"]}]
    assert r["mlflow_val_acc_steps"] == list(range(EPOCHS))  # one val_acc per epoch, none twice
    assert res["best_checkpoint_uri"].startswith("s3://") and res["model_uri"].startswith("s3://")
    assert r["s3_checkpoint_epochs"] and max(r["s3_checkpoint_epochs"]) == EPOCHS - 1
    assert r["model_on_s3"]


# --------------------------------------------------------------------------------------------
# The driver (inside the namespaces)
# --------------------------------------------------------------------------------------------


def _loopback_up() -> None:
    """``ip link set lo up`` without iproute2: a new network namespace starts with lo down."""
    import fcntl
    import struct

    siocgifflags, siocsifflags, iff_up = 0x8913, 0x8914, 0x1
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        flags = struct.unpack("16sh", fcntl.ioctl(s, siocgifflags, struct.pack("16sh", b"lo", 0)))[1]
        fcntl.ioctl(s, siocsifflags, struct.pack("16sh", b"lo", flags | iff_up))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(f"[driver {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Node:
    """One ``ray start --block`` process (head or worker node) with its own temp dir."""

    def __init__(self, name: str, temp_dir: Path, args: list[str], env: dict[str, str], log: Path):
        self.name, self.temp_dir, self.args, self.env, self.log = name, temp_dir, args, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> Node:
        ray_cli = str(Path(sys.executable).parent / "ray")
        ports = [f"--node-manager-port={_free_port()}", f"--object-manager-port={_free_port()}",
                 f"--dashboard-agent-listen-port={_free_port()}", f"--dashboard-agent-grpc-port={_free_port()}",
                 f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}",
                 "--min-worker-port=0", "--max-worker-port=0"]
        cmd = [ray_cli, "start", "--block", "--node-ip-address=127.0.0.1", "--num-gpus=0", "--disable-usage-stats",
               f"--temp-dir={self.temp_dir}", *ports, *self.args]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        return self

    def join(self, ray, timeout: float, interval: float = 0.5) -> list[str]:
        """Start this (non-head) node and wait until the cluster has two alive nodes.

        ``ray start`` gives its raylet a fixed 30 s to register with the GCS and then exits; on two
        busy cores that can lapse (one GCS call can itself wait out its 30 s deadline), so a
        ``ray start`` that exits before the node is up is started again, within ``timeout``."""
        deadline = time.monotonic() + timeout
        self.start()
        while time.monotonic() < deadline:
            if nodes := _two_nodes(ray):
                return nodes
            if self.proc is not None and self.proc.poll() is not None:
                _say(f"{self.name}: `ray start` exited with {self.proc.returncode} before joining; starting it again")
                self.kill()  # whatever it left running (a raylet that might register late)
                self.start()
            time.sleep(interval)
        raise TimeoutError(f"{self.name} not joined within {timeout:.0f} s")

    def pids(self) -> tuple[list[int], int | None]:
        """Every process of this node: ``ray start``, its descendants (raylet, GCS, agents, the
        workers under the raylet) and any process naming the temp dir; and the raylet's pid."""
        import psutil

        found: dict[int, psutil.Process] = {}
        raylet = None
        if self.proc is not None:
            with contextlib.suppress(psutil.Error):
                top = psutil.Process(self.proc.pid)
                found[top.pid] = top
                for child in top.children(recursive=True):
                    found[child.pid] = child
        for p in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if str(self.temp_dir) in " ".join(p.info["cmdline"] or []):
                    found[p.pid] = p
                    for child in p.children(recursive=True):
                        found[child.pid] = child
        for pid, p in found.items():
            with contextlib.suppress(psutil.Error):
                if p.name() == "raylet" or "raylet" in " ".join(p.cmdline()[:1]):
                    raylet = pid
        found.pop(os.getpid(), None)
        return sorted(found), raylet

    def kill(self) -> dict:
        """SIGKILL every process of the node at once (a machine losing power), then wait."""
        import psutil

        pids, raylet = self.pids()
        names = {}
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                names[pid] = psutil.Process(pid).name()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(timeout=30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(_running(pid) for pid in pids):
            time.sleep(0.1)
        return {"pids": len(pids), "raylet_killed": raylet is not None,
                "train_workers_killed": sum("RayTrainWorker" in n for n in names.values())}



def _running(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _alive_nodes(ray) -> list[str]:
    return [n["NodeID"] for n in ray.nodes() if n["Alive"]]


def _two_nodes(ray) -> list[str] | None:
    nodes = _alive_nodes(ray)
    return nodes if len(nodes) == 2 else None


def _wait_for(what: str, predicate, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not within {timeout:.0f} s")


def _train_workers(ray) -> dict[str, dict]:
    """{actor id: {node, pid}} of live Ray Train workers, from the GCS actor table."""
    table = ray._private.state.actors()
    return {aid: {"node": a["Address"]["NodeID"], "pid": a.get("Pid")} for aid, a in table.items()
            if a["State"] == "ALIVE" and "RayTrainWorker" in a["ActorClassName"]}


def driver(args: argparse.Namespace) -> int:
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    work, temp_root = Path(args.work), Path(args.temp_root)
    _loopback_up()
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "cluster"))
    from dev_stack import ensure_token_file
    from s3_server import LocalS3Server

    # Only loopback exists in this namespace: Ray may bind every interface (needed for 2 nodes).
    os.environ.update({
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
        "RAY_USAGE_STATS_ENABLED": "0", "RAY_TRAIN_V2_ENABLED": "1",
        "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(ensure_token_file(work / "ray-token")),
        # a dead node is declared dead after ~3 s instead of ~15 s (GCS health checks)
        "RAY_health_check_period_ms": "1000", "RAY_health_check_failure_threshold": "3",
        "RAY_health_check_timeout_ms": "1000",
    })
    os.environ.pop("RAY_ADDRESS", None)
    s3 = LocalS3Server(bucket="multinode", die_with_parent=True).start()
    os.environ.update(s3.env())
    env = dict(os.environ)
    gcs_port = _free_port()
    head = Node("head", temp_root / "h", [
        "--head", f"--port={gcs_port}", "--num-cpus=3", "--dashboard-host=127.0.0.1",
        f"--dashboard-port={_free_port()}", f"--ray-client-server-port={_free_port()}"], env, work / "head.log")
    node2 = Node("node2", temp_root / "n2", [f"--address=127.0.0.1:{gcs_port}", "--num-cpus=3"], env,
                 work / "node2.log")
    stop = threading.Event()
    try:
        import ray

        head.start()
        _wait_for("the head's GCS port", lambda: _port_open(gcs_port), 90)
        # connect first: ray.init returns once the head's GCS serves, so node 2's start-up
        # does not race the head's own
        ray.init(address=f"127.0.0.1:{gcs_port}", log_to_driver=False, configure_logging=False)
        head_node = ray.get_runtime_context().get_node_id()
        nodes = node2.join(ray, 150)
        node2_first = next(n for n in nodes if n != head_node)
        timings["cluster_s"] = round(time.monotonic() - t_start, 1)
        _say(f"cluster up: head {head_node[:8]}, node 2 {node2_first[:8]}")

        from pipelines import storage as st
        from pipelines import tracking
        from pipelines.config import load_config
        from pipelines.prepare import prepare
        from pipelines.train import train
        from pipelines.trainer import latest_checkpoint_state

        root = "s3://multinode/store"
        cfg = load_config(None, [f"storage.uri={root}", f"data.source_dir={args.source_dir}",
                                 f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db", *TRAIN])
        version = prepare(cfg)
        timings["prepare_s"] = round(time.monotonic() - t_start, 1)
        run_uri = st.join_uri(root, "train", RUN_NAME)
        snapshot = st.join_uri(run_uri, "checkpoint_manager_snapshot.json")

        groups: list[dict] = []  # each worker group seen: its actors' nodes
        seen: set[str] = set()
        out: dict = {"kill": {}}
        errors: list[str] = []

        def watch() -> None:
            """Record each worker group; after the first checkpoint, kill node 2 mid-epoch and restart it."""
            killed = False
            try:
                while not stop.is_set():
                    workers = _train_workers(ray)
                    if len(workers) == 2 and not set(workers) <= seen:
                        seen.update(workers)
                        groups.append({"nodes": sorted(w["node"] for w in workers.values()),
                                       "at_s": round(time.monotonic() - t_start, 1)})
                    if not killed and st.exists(snapshot, cfg.storage):
                        time.sleep(0.3)  # into the next epoch
                        state = latest_checkpoint_state(root, RUN_NAME, cfg.storage)
                        out["nodes_before_kill"] = len(_alive_nodes(ray))
                        kill_at = time.monotonic()
                        out["kill"] = {**node2.kill(), "latest_checkpoint_epoch": state and state["epoch"],
                                       "at_s": round(kill_at - t_start, 1)}
                        killed = True
                        _say(f"killed node 2: {out['kill']}")
                        _wait_for("node 2 declared dead", lambda: node2_first not in _alive_nodes(ray), 60, 0.2)
                        out["node_dead_s"] = round(time.monotonic() - kill_at, 1)
                        shutil.rmtree(node2.temp_dir, ignore_errors=True)  # a rebooted machine: clean /tmp
                        alive = node2.join(ray, 150, 0.2)
                        out["node2_second"] = next(n for n in alive if n != head_node)
                        out["nodes_after_restart"] = len(alive)
                        out["node_back_s"] = round(time.monotonic() - kill_at, 1)
                        _say(f"node 2 back as {out['node2_second'][:8]} after {out['node_back_s']} s")
                    time.sleep(0.2)
            except Exception as exc:  # reported in result.json; the test fails on it
                errors.append(f"{type(exc).__name__}: {exc}")

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        t_train = time.monotonic()
        result = train(cfg, version=version)
        timings["train_s"] = round(time.monotonic() - t_train, 1)
        stop.set()
        watcher.join(timeout=30)
        _say(f"training done: {result.restarts} restart(s), epochs {[h['epoch'] for h in result.history]}")

        client = tracking.client(cfg)
        exp = client.get_experiment_by_name(cfg.mlflow.experiment_name)
        runs = client.search_runs([exp.experiment_id],
                                  filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{RUN_NAME}'")
        ckpt_epochs = sorted(int(st.read_json(st.join_uri(run_uri, d, "state", "state.json"), cfg.storage)["epoch"])
                             for d in st.list_dirs(run_uri, cfg.storage) if d.startswith("checkpoint_"))
        out.update({
            "head_node": head_node, "node2_first": node2_first, "groups": groups, "watch_errors": errors,
            "result": {k: v for k, v in result.to_dict().items() if k != "metrics"},
            "mlflow_runs": [{"status": x.info.status, "run_id": x.info.run_id} for x in runs],
            "mlflow_val_acc_steps": sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "val_acc")),
            "s3_checkpoint_epochs": ckpt_epochs,
            "model_on_s3": st.exists(st.join_uri(result.model_uri, "config.json"), cfg.storage),
        })
        timings["total_s"] = round(time.monotonic() - t_start, 1)
        out["timings"] = timings
        (work / "result.json").write_text(json.dumps(out, indent=2, default=str))
        if errors:
            _say(f"watcher failed: {errors}")
            return 1
        return 0
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            import ray

            ray.shutdown()
        # nothing on the cluster is worth a graceful stop: SIGKILL both nodes (the PID namespace
        # would end them with this process anyway), then the S3 server
        for node in (node2, head):
            with contextlib.suppress(Exception):
                node.kill()
        s3.stop()
        shutil.rmtree(temp_root, ignore_errors=True)
        _say(f"cleaned up after {time.monotonic() - t_start:.0f} s")


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the multi-node fault driver (run by the test inside unshare)")
    p.add_argument("mode", choices=["driver"])
    p.add_argument("--work", required=True)
    p.add_argument("--temp-root", required=True)
    p.add_argument("--source-dir", required=True)
    return driver(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
