"""The local cluster the pipeline starts: its processes find its own state API even when
another Ray instance runs on the machine (Train V2's placement-group cleaner depends on it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.integration

SCRIPT = textwrap.dedent("""
    import os
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from pipelines.config import load_config
    from pipelines.ray_setup import ensure_ray

    ensure_ray(load_config(None, ["ray.num_cpus=2"]))

    @ray.remote(num_cpus=0.1)
    def probe():
        from ray.util.state import list_actors
        from ray.dashboard.utils import get_address_for_submission_client
        return os.environ.get("RAY_API_SERVER_ADDRESS"), get_address_for_submission_client(None), len(list_actors())

    env_address, resolved, _ = ray.get(probe.remote())
    dashboard = ray._private.worker._global_node.address_info["webui_url"]
    print("RESULT", env_address, resolved, dashboard)
    ray.shutdown()
""")


def test_job_processes_are_pointed_at_this_clusters_state_api(ray_cluster):
    """``ray_cluster`` (this test session's cluster) is the other Ray instance on the machine."""
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    line = next((out for out in proc.stdout.splitlines() if out.startswith("RESULT ")), None)
    assert line is not None, proc.stdout[-2000:] + proc.stderr[-3000:]
    _, env_address, resolved, dashboard = line.split()
    assert env_address == resolved == f"http://{dashboard}"


BUSY_SCRIPT = textwrap.dedent("""
    import os, time
    os.environ.pop("RAY_ADDRESS", None)
    import ray
    from pipelines.config import load_config
    from pipelines.ray_setup import ensure_ray

    ensure_ray(load_config(None, ["ray.num_cpus=4", "ray.include_dashboard=false"]))

    @ray.remote(num_cpus=0)
    class Probe:
        def pid(self):
            return os.getpid()

    actors = [Probe.remote() for _ in range(16)]  # a dozen-odd worker processes, as the main job starts
    print("PIDS", len(set(ray.get([a.pid.remote() for a in actors]))))
    time.sleep(3)  # the raylet's warnings reach the driver asynchronously
    ray.shutdown()
""")


def test_a_busy_local_cluster_keeps_the_raylets_worker_pool_warning_off_the_console():
    """A job starts about a dozen Python workers; on a 2-core machine the raylet's default start-up
    concurrency (2) makes it print "N PYTHON worker processes ... 4x the maximum expected startup
    concurrency" on the driver's console (16 actors here: shown with the default 2, not with the
    cluster's 4 CPUs, which ensure_ray sets)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_worker_maximum_startup_concurrency"}
    proc = subprocess.run([sys.executable, "-c", BUSY_SCRIPT], capture_output=True, text=True, timeout=240,
                          env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert "PIDS 16" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "PYTHON worker processes" not in proc.stdout + proc.stderr
