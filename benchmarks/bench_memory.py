"""Peak memory of the main job, summed over all its processes (driver, Ray's GCS/raylet/dashboard,
Ray Train workers, Ray Data tasks, inference actors, the object store's shared memory).

Runs ``python -m pipelines run --config configs/local.yaml`` (or ``--config``) in an empty
working directory and samples, every ``--interval`` seconds, the proportional set size (PSS) of
the driver and every process descended from it (a local Ray cluster started by the driver is its
descendant). PSS splits shared pages between the processes that map them, so the sum counts the
object store's shared memory and shared libraries once. Reports the peak of the sum, when it
happened (which workflow step was running), and the processes that made it up, grouped by kind.

    python benchmarks/bench_memory.py [--config configs/local.yaml] [--set k=v ...] [--out benchmarks/results/memory.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30


def kind(proc: psutil.Process) -> str:
    """A readable kind for a process: the Ray actor/task name when Ray set one, else the program."""
    try:
        cmd = proc.cmdline()
        name = proc.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "gone"
    title = " ".join(cmd)
    if title.startswith("ray::"):
        label = title.split()[0].removeprefix("ray::")
        return "ray::" + re.sub(r"\W.*", "", label) if label else "ray::worker"
    if "pipelines" in title and " run " in f" {title} ":
        return "driver (pipelines run)"
    for key in ("gcs_server", "raylet", "dashboard", "log_monitor", "monitor.py", "runtime_env", "dashboard_agent"):
        if key in title:
            return f"ray {key}"
    return name


def sample(root: psutil.Process) -> tuple[int, dict[str, int]]:
    procs = [root]
    try:
        procs += root.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, {}
    by_kind: dict[str, int] = collections.Counter()
    for p in procs:
        try:
            pss = p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        by_kind[kind(p)] += pss
    return sum(by_kind.values()), dict(by_kind)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "memory.json"))
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    cmd = [sys.executable, "-m", "pipelines", "run", "--config", str(Path(args.config).resolve())]
    for item in args.overrides:
        cmd += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(work / "run.log", "w")
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT)
    root = psutil.Process(proc.pid)
    peak, peak_kinds, peak_at, peak_line, samples = 0, {}, 0.0, "", []
    while proc.poll() is None:
        total, kinds = sample(root)
        now = time.monotonic() - t0
        samples.append((round(now, 1), total))
        if total > peak:
            console = [line for line in (work / "run.log").read_text(errors="replace").splitlines() if line.strip()]
            peak, peak_kinds, peak_at, peak_line = total, kinds, now, console[-1] if console else ""
        time.sleep(args.interval)
    log.close()
    wall = time.monotonic() - t0
    lines = (work / "run.log").read_text(errors="replace").splitlines()
    doc = {
        "benchmark": "peak memory of the main job, PSS summed over the driver and its descendants",
        "command": " ".join(cmd), "exit_code": proc.returncode, "wall_seconds": round(wall, 1),
        "peak_gib": round(peak / GiB, 3), "peak_at_seconds": round(peak_at, 1),
        "peak_by_kind_gib": {k: round(v / GiB, 3) for k, v in sorted(peak_kinds.items(), key=lambda kv: -kv[1])},
        "console_at_peak": peak_line, "goal_gib": 6.0, "samples": samples, "console_tail": lines[-15:],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"main job: exit {proc.returncode}, {wall:.0f} s; peak {peak / GiB:.2f} GiB (PSS, all processes) at "
          f"{peak_at:.0f} s (goal <= 6 GiB: ratio {peak / GiB / 6.0:.2f}); console then: {peak_line.strip()[:100]}")
    for k, v in sorted(peak_kinds.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {k:40s} {v / GiB:6.2f} GiB")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
