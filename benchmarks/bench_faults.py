"""Fault benchmark: N kills at random times; does every job still finish exactly once?

Each trial injects one fault, chosen from ``--kinds`` (a balanced list shuffled by ``--seed``):

``train_worker``  a training run (``pipelines.train.train``, 2 Ray Train workers, 3 epochs); a
                  random live ``RayTrainWorker`` is SIGKILLed in a random epoch at a random
                  fraction of its expected length.
                  Measured: completion, worker groups started, restarts reported by the run,
                  epochs lost (missing from the final history), epochs duplicated (in the
                  history, and ``val_acc`` steps logged twice to the one MLflow run), MLflow
                  runs for the run name.
``infer_actor``   a batch-inference job (``pipelines.infer.infer``, 2 model actors) over a dataset
                  split; a random live ``BatchPredictor`` actor is SIGKILLed at a random time.
                  Measured: completion, and the *published* predictions read back: rows
                  duplicated, missing, foreign, vs the inputs.
``run_driver``    ``python -m pipelines run`` (prepare, train, evaluate, register, infer) as a
                  process, SIGKILLed in a random step (uniform over the five) at a random
                  fraction of its expected length, then the same command rerun until it exits 0
                  (``--max-reruns``). Measured: completion, attempts, the step it was
                  killed in, every step recorded ``succeeded``, predictions = inputs (read back),
                  epochs lost/duplicated in the training run, registered versions of the model
                  (1 expected), MLflow runs of the workflow left RUNNING.

Kill times: uniform over a window that tracks how long the inference actors lived
(``--window-infer`` is the first guess); a random epoch and a fraction of it (training,
``--epoch-*``); a random step and a fraction of it (``run``, step lengths measured as trials
go). A kill that finds the job already finished is recorded under ``missed`` and the trial is
drawn again (``--max-misses``), so N trials are N landed faults. Train and infer jobs run in
child processes (``--child``) so that a hung job can be killed at ``--timeout``.

Set-up: the dev stack's S3 endpoint (moto) and a single-node Ray head (``cluster/dev_stack.py``:
``ray start --head`` on 127.0.0.1, 4 logical CPUs, token auth, its own temp dir), S3 storage, a
sqlite MLflow store, a Fashion-MNIST subset (``--train-images``/``--test-images``), an untrained
ViT registered as the inference champion. Everything is stopped by pid at the end.

    python benchmarks/bench_faults.py [--n 10] [--kinds train_worker,infer_actor,run_driver] [--seed 0]
                                      [--out benchmarks/results/faults.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

# Read by Ray when it is imported: with the 127.0.0.1 addresses every Ray port stays on loopback
# (without it a driver swaps 127.0.0.1 for the machine's external address and never finds the head).
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "cluster"))

KINDS = ("train_worker", "infer_actor", "run_driver")
BUCKET = "bench-faults"
INFER_MODEL = "bench-faults-infer"
TRAIN_EPOCHS = 3
RUN_EPOCHS = 2
MODEL = ["model.args.embed_dim=32", "model.args.depth=1", "model.args.num_heads=2", "model.args.patch_size=7"]
TRAIN = [*MODEL, "train.batch_size=32", "train.num_workers=2", "train.cpus_per_worker=0.5", "train.warmup_epochs=0.5",
         "train.max_failures=3", "data.shard_rows=200"]
# ~20 ms per image on one thread: a job over a few hundred images lasts long enough to be hit
INFER_ARCH = dict(img_size=28, patch_size=2, in_chans=1, num_classes=10, embed_dim=128, depth=4, num_heads=4)
STEPS = ("prepare", "search", "evaluate", "register", "infer")
STEP_GUESS_S = {"prepare": 3.0, "search": 30.0, "evaluate": 5.0, "register": 10.0, "infer": 10.0}
INFER = ["infer.batch_size=8", "infer.num_actors=2", "infer.split=train", "mlflow.experiment_name=bench-faults"]


def say(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# Child processes: one training run / one inference job, result as JSON
# --------------------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> int:
    """``--child train|infer``: run the job in this process (connected to RAY_ADDRESS) and write
    ``{"ok": bool, ...}`` to ``--result``."""
    import ray

    from pipelines.config import load_config
    from pipelines.data.shards import load_version

    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, configure_logging=False)
    spec = json.loads(args.spec)
    cfg = load_config(None, spec["overrides"])
    out: dict[str, Any] = {"ok": False}
    try:
        if args.child == "train":
            from pipelines.train import train

            res = train(cfg, version=load_version(spec["dataset_uri"], cfg.storage))
            out.update(ok=True, history=res.history, restarts=res.restarts, mlflow_run_id=res.mlflow_run_id,
                       model_uri=res.model_uri, seconds=res.seconds)
        else:
            from pipelines.infer import infer

            res = infer(cfg, input_uri=spec["dataset_uri"], model_uri=f"models:/{INFER_MODEL}@champion",
                        job_name=spec["job"])
            out.update(ok=True, **res.to_dict())
    except BaseException as exc:  # recorded; the orchestrator decides what it means
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:500] if str(exc) else ''}"
    Path(args.result).write_text(json.dumps(out, default=str))
    return 0 if out["ok"] else 1


# --------------------------------------------------------------------------------------------
# The orchestrator
# --------------------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace, work: Path, env: dict[str, str]):
        self.args, self.work, self.env = args, work, env
        self.rng = random.Random(args.seed)
        self.windows = {"infer_actor": args.window_infer}
        self.step_s = dict(STEP_GUESS_S)  # run: expected length of each step, updated from first attempts
        self.epoch_s = {"first": args.epoch_first, "next": args.epoch_next}  # training: expected epoch lengths
        self.storage = f"s3://{BUCKET}/store"
        self.tracking = f"sqlite:///{work / 'mlflow.db'}"
        self.base = [f"storage.uri={self.storage}", f"mlflow.tracking_uri={self.tracking}",
                     f"data.source_dir={work / 'idx'}"]
        self.version = None

    # ------------------------------------------------------------------ set-up

    def setup(self) -> None:
        import torch

        from pipelines.config import load_config
        from pipelines.prepare import prepare
        from pipelines.register import register
        from vit_model import VisionTransformer, ViTConfig

        subset_idx(self.work / "idx", self.args.train_images, self.args.test_images)
        cfg = load_config(None, [*self.base, *TRAIN, *INFER])
        self.version = prepare(cfg)
        torch.manual_seed(0)
        model = VisionTransformer(ViTConfig(**INFER_ARCH))
        with torch.no_grad():
            model.head.weight.mul_(50.0)  # spread the logits: an untrained model predicting several classes
        meta = {"class_names": self.version.classes, "channels": 1, "image_size": [28, 28], "mean": [0.286],
                "std": [0.353], "dataset": {"uri": self.version.uri, "version": self.version.version}}
        model.save_pretrained(self.work / "infer-model", meta=meta)
        register(load_config(None, [*self.base, f"registry.model_name={INFER_MODEL}", "mlflow.experiment_name=bench-faults"]),
                 str(self.work / "infer-model"))

    # ------------------------------------------------------------------ helpers

    def _actors(self, class_part: str) -> dict[str, int]:
        """{actor id: pid} of live actors whose class name contains ``class_part`` (GCS actor table)."""
        import ray

        return {aid: a["Pid"] for aid, a in ray._private.state.actors().items()
                if a["State"] == "ALIVE" and class_part in a["ActorClassName"] and a.get("Pid")}

    def _restarts(self, actor_id: str) -> int:
        import ray

        return int(ray._private.state.actors(actor_id=actor_id).get("NumRestarts", 0))

    def _child_job(self, kind: str, spec: dict, actor_class: str, min_actors: int, trial: int,
                   run_uri: str | None = None) -> dict[str, Any]:
        """Run a child job and SIGKILL one of its ``actor_class`` actors, chosen at random, at a
        random time: for inference uniformly within the kind's window once ``min_actors`` are up;
        for training (``run_uri`` given) in a random epoch at a random fraction of its expected
        length (the epoch starts when the group is up, or when the previous epoch's checkpoint
        appears on storage), so early, middle and late kills are all drawn."""
        from pipelines import storage as st

        result_path = self.work / f"trial-{trial}.json"
        log = self.work / f"trial-{trial}.log"
        before = set(self._actors(actor_class))
        window = self.windows.get(kind, 0.0)
        fault: dict[str, Any] = {"landed": False}
        if run_uri:
            target, frac = self.rng.randrange(TRAIN_EPOCHS), self.rng.random()
            fault.update(target_epoch=target, fraction=round(frac, 3))
        else:
            delay = self.rng.uniform(0.0, window)
            fault.update(delay_s=round(delay, 2), window_s=round(window, 1))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "train" if kind == "train_worker" else "infer",
               "--spec", json.dumps(spec), "--result", str(result_path)]
        t0 = time.monotonic()
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=self.env,
                                    cwd=ROOT, start_new_session=True)
        anchor = last_live = kill_at = None
        boundaries: list[float] = []  # training: when the group came up, then when each checkpoint appeared
        seen: set[str] = set()  # every new actor of the class: a restarted Train worker group has new ones
        deadline = t0 + self.args.timeout
        try:
            while proc.poll() is None and time.monotonic() < deadline:
                now = time.monotonic()
                live = {a: p for a, p in self._actors(actor_class).items() if a not in before}
                seen.update(live)
                if live:
                    last_live = now
                if anchor is None and len(live) >= min_actors:
                    anchor = now
                    boundaries.append(now)
                if anchor is not None and not fault["landed"]:
                    if run_uri:
                        with contextlib.suppress(Exception):
                            n = sum(d.startswith("checkpoint_") for d in st.list_dirs(run_uri))
                            boundaries.extend([now] * max(0, n + 1 - len(boundaries)))
                        if kill_at is None and len(boundaries) > target:
                            est = self.epoch_s["first" if target == 0 else "next"]
                            kill_at = boundaries[target] + frac * est
                            fault["epoch_estimate_s"] = round(est, 1)
                    else:
                        kill_at = anchor + delay
                    if kill_at is not None and now >= kill_at and live:
                        aid = self.rng.choice(sorted(live))
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(live[aid], signal.SIGKILL)
                            fault.update(landed=True, actor_id=aid, at_s=round(now - t0, 2))
                            if run_uri:
                                fault["checkpoint_epoch_at_kill"] = self._latest_epoch(spec)
                time.sleep(0.1)
            timed_out = proc.poll() is None
        finally:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
        end = time.monotonic()
        if run_uri and len(boundaries) >= 2:  # epoch lengths seen before the kill (or in a run it missed)
            self.epoch_s["first"] = boundaries[1] - boundaries[0]
            if len(boundaries) >= 3:
                self.epoch_s["next"] = (boundaries[-1] - boundaries[1]) / (len(boundaries) - 2)
        elif anchor is not None and last_live is not None:  # the next window: how long the actors lived
            self.windows[kind] = max(3.0, 0.7 * (last_live - anchor))
        res = json.loads(result_path.read_text()) if result_path.is_file() else {"ok": False, "error": "no result"}
        if timed_out:
            res = {"ok": False, "error": f"timed out after {self.args.timeout:.0f} s"}
        if fault.get("actor_id"):
            with contextlib.suppress(Exception):
                fault["actor_restarts"] = self._restarts(fault["actor_id"])
        res["_log_tail"] = log.read_text(errors="replace")[-1500:] if not res.get("ok") else ""
        return {"fault": fault, "job": res, "seconds": round(end - t0, 1), "actors_seen": len(seen)}

    def _latest_epoch(self, spec: dict) -> int | None:
        from pipelines.config import load_config
        from pipelines.trainer import latest_checkpoint_state

        cfg = load_config(None, spec["overrides"])
        with contextlib.suppress(Exception):
            state = latest_checkpoint_state(cfg.storage.uri, cfg.train.run_name, cfg.storage)
            return None if state is None else int(state["epoch"])
        return None

    def _mlflow(self, cfg):
        from pipelines import tracking

        client = tracking.client(cfg)
        return client, client.get_experiment_by_name(cfg.mlflow.experiment_name)

    @staticmethod
    def _epoch_counts(epochs: list[int], expected: int) -> tuple[int, int]:
        """(lost, duplicated): expected epochs missing, and extra occurrences of any epoch."""
        counts = Counter(epochs)
        lost = sum(1 for e in range(expected) if counts[e] == 0)
        dup = sum(c - 1 for c in counts.values() if c > 1) + sum(c for e, c in counts.items() if not 0 <= e < expected)
        return lost, dup

    # ------------------------------------------------------------------ trials

    def trial_train_worker(self, i: int) -> dict[str, Any]:
        from pipelines.config import load_config

        run_name = f"bench-train-{i:03d}"
        overrides = [*self.base, *TRAIN, f"train.epochs={TRAIN_EPOCHS}", f"train.run_name={run_name}",
                     "mlflow.experiment_name=bench-faults"]
        spec = {"overrides": overrides, "dataset_uri": self.version.uri}
        out = self._child_job("train_worker", spec, "RayTrainWorker", 2, i,
                              run_uri=f"{self.storage}/train/{run_name}")
        job = out["job"]
        rec = {"kind": "train_worker", **out, "completed": bool(job.get("ok"))}
        epochs = [h["epoch"] for h in job.get("history") or []]
        cfg = load_config(None, overrides)
        client, exp = self._mlflow(cfg)
        runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`pipeline.run_name` = '{run_name}'")
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_acc")] if runs else []
        lost, dup = self._epoch_counts(epochs, TRAIN_EPOCHS)
        m_lost, m_dup = self._epoch_counts(steps, TRAIN_EPOCHS)
        rec.update(epochs=epochs, epochs_lost=lost, epochs_duplicated=dup, restarts=job.get("restarts"),
                   worker_groups=out["actors_seen"] // 2, mlflow_runs=len(runs),
                   mlflow_status=[r.info.status for r in runs], mlflow_val_acc_steps=sorted(steps),
                   mlflow_epochs_lost=m_lost, mlflow_epochs_duplicated=m_dup)
        rec["consistent"] = (rec["completed"] and lost == 0 and dup == 0 and len(runs) == 1
                             and runs[0].info.status == "FINISHED")
        job.pop("history", None)
        return rec

    def trial_infer_actor(self, i: int) -> dict[str, Any]:
        from pipelines import storage as st
        from pipelines.config import load_config
        from pipelines.inference.writer import load_predictions

        job_name = f"bench-infer-{i:03d}"
        overrides = [*self.base, *INFER]
        out = self._child_job("infer_actor", {"overrides": overrides, "dataset_uri": self.version.uri, "job": job_name},
                              "BatchPredictor", 1, i)
        job = out["job"]
        cfg = load_config(None, overrides)
        n = self.version.count(cfg.infer.split)
        expected = {f"{cfg.infer.split}/{k}" for k in range(n)}
        rec = {"kind": "infer_actor", **out, "completed": bool(job.get("ok")), "inputs": n}
        ids: list[str] = []
        with contextlib.suppress(Exception):
            ids = load_predictions(st.join_uri(self.storage, "predictions", job_name), cfg.storage,
                                   columns=["input_id"]).column("input_id").to_pylist()
        counts = Counter(ids)
        rec.update(rows=len(ids), rows_duplicated=sum(c - 1 for c in counts.values() if c > 1),
                   rows_missing=len(expected - set(ids)), rows_foreign=len(set(ids) - expected),
                   duplicates_removed_by_job=job.get("duplicates_removed"), error_rows=job.get("error_count"))
        rec["consistent"] = (rec["completed"] and rec["rows"] == n and rec["rows_duplicated"] == 0
                             and rec["rows_missing"] == 0 and rec["rows_foreign"] == 0)
        for key in ("timings", "manifest_uri", "output_uri", "input_digest", "model_name", "model_uri"):
            job.pop(key, None)
        return rec

    def trial_run_driver(self, i: int) -> dict[str, Any]:
        import yaml

        from pipelines import storage as st
        from pipelines.config import load_config
        from pipelines.inference.writer import load_predictions
        from pipelines.run import load_record
        from pipelines.trainer import latest_checkpoint_state

        name = f"bench-run-{i:03d}"
        config = self.work / f"{name}.yaml"
        config.write_text(yaml.safe_dump({"workflow": {"name": name, "search": "train", "retries": 1,
                                                       "retry_backoff_s": 2}}))
        sets = [*self.base, *TRAIN, f"train.epochs={RUN_EPOCHS}", f"registry.model_name={name}",
                "infer.batch_size=64", "mlflow.experiment_name=bench-faults-run"]
        cmd = [sys.executable, "-m", "pipelines", "run", "--config", str(config),
               *[a for kv in sets for a in ("--set", kv)]]
        # the step to interrupt, drawn uniformly (training dominates the run's time), and how far into it
        target, frac = self.rng.choice(STEPS), self.rng.random()
        fault: dict[str, Any] = {"landed": False, "target_step": target, "fraction": round(frac, 3)}
        attempts: list[dict[str, Any]] = []
        t0 = time.monotonic()
        completed = False
        for attempt in range(1, self.args.max_reruns + 2):
            log = self.work / f"trial-{i}-attempt-{attempt}.log"
            started = time.monotonic()
            with open(log, "wb") as out:
                proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        env=self.env, cwd=ROOT, start_new_session=True)
            seen: dict[tuple[str, str], float] = {}  # (step, running|done|skipped) -> when the line appeared
            kill_at = None
            try:
                while proc.poll() is None and time.monotonic() < started + self.args.timeout:
                    now = time.monotonic()
                    for step, what in re.findall(r"^\[(\w+)\] (running|done|skipped)",
                                                 log.read_text(errors="replace"), flags=re.M):
                        seen.setdefault((step, what), now)
                    if attempt == 1 and not fault["landed"]:
                        if kill_at is None and (target, "running") in seen:
                            kill_at = seen[(target, "running")] + frac * self.step_s[target]
                            fault["step_estimate_s"] = round(self.step_s[target], 1)
                        if kill_at is not None and now >= kill_at:
                            os.kill(proc.pid, signal.SIGKILL)  # the driver process only; Ray ends its job
                            fault.update(landed=True, at_s=round(now - started, 2))
                    time.sleep(0.1)
            finally:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                with contextlib.suppress(ProcessLookupError):  # anything the driver left in its group
                    os.killpg(proc.pid, signal.SIGKILL)
            text = log.read_text(errors="replace")
            steps_seen = re.findall(r"^\[(\w+)\] (running|done|skipped)", text, flags=re.M)
            info = {"attempt": attempt, "rc": proc.returncode, "seconds": round(time.monotonic() - started, 1),
                    "steps": [f"{s}:{what}" for s, what in steps_seen]}
            for step in STEPS:  # step lengths for the next trials' kill times (first runs, not resumes)
                if attempt == 1 and (step, "running") in seen and (step, "done") in seen:
                    self.step_s[step] = seen[(step, "done")] - seen[(step, "running")]
            if attempt == 1 and fault["landed"]:
                running = [s for s, what in steps_seen if what == "running"]
                done = {s for s, what in steps_seen if what in ("done", "skipped")}
                fault["step"] = next((s for s in reversed(running) if s not in done), "startup" if not running else "between")
            if proc.returncode != 0 and not (attempt == 1 and fault["landed"]):
                info["tail"] = text[-1200:]
            attempts.append(info)
            if proc.returncode == 0:
                completed = True
                break
        rec: dict[str, Any] = {"kind": "run_driver", "fault": fault, "attempts": attempts, "completed": completed,
                               "reruns": len(attempts) - 1, "seconds": round(time.monotonic() - t0, 1)}

        cfg = load_config(str(config), sets)
        record = load_record(cfg)
        rec["steps"] = {k: v.status for k, v in record.items()}
        all_ok = rec["steps"] == {s: "succeeded" for s in STEPS}
        n = self.version.count("test")
        expected = {f"test/{k}" for k in range(n)}
        ids: list[str] = []
        if "infer" in record and record["infer"].status == "succeeded":
            with contextlib.suppress(Exception):
                ids = load_predictions(st.join_uri(self.storage, "predictions", f"{name}-infer"), cfg.storage,
                                       columns=["input_id"]).column("input_id").to_pylist()
            rec["infer_counts"] = {k: record["infer"].outputs.get(k) for k in ("input_count", "output_count",
                                                                                "duplicates_removed")}
        counts = Counter(ids)
        rec.update(inputs=n, rows=len(ids), rows_duplicated=sum(c - 1 for c in counts.values() if c > 1),
                   rows_missing=len(expected - set(ids)), rows_foreign=len(set(ids) - expected))
        epochs: list[int] = []
        train_run = (record.get("search").outputs or {}).get("train_run") if record.get("search") else None
        if train_run:
            state = latest_checkpoint_state(cfg.storage.uri, train_run, cfg.storage)
            epochs = [h["epoch"] for h in ((state or {}).get("metrics") or {}).get("history", [])]
        lost, dup = self._epoch_counts(epochs, RUN_EPOCHS)
        client, exp = self._mlflow(cfg)
        runs = client.search_runs([exp.experiment_id]) if exp else []
        mine = [r for r in runs if r.data.tags.get("pipeline.run_name", "").startswith(name)
                or r.data.tags.get("registry.model_name") == name or r.info.run_name == f"{name}-infer"]
        train_runs = [r for r in mine if r.data.tags.get("pipeline.task") == "train"]
        steps = [m.step for m in client.get_metric_history(train_runs[0].info.run_id, "val_acc")] if train_runs else []
        m_lost, m_dup = self._epoch_counts(steps, RUN_EPOCHS)
        versions = []
        with contextlib.suppress(Exception):
            versions = [v.version for v in client.search_model_versions(f"name='{name}'")]
        rec.update(train_run=train_run, epochs=epochs, epochs_lost=lost, epochs_duplicated=dup,
                   mlflow_train_runs=len(train_runs), mlflow_val_acc_steps=sorted(steps),
                   mlflow_epochs_duplicated=m_dup, mlflow_epochs_lost=m_lost,
                   mlflow_running_left=sorted(f"{r.data.tags.get('pipeline.task', '?')}:{r.info.run_name}"
                                              for r in mine if r.info.status == "RUNNING"),
                   registered_versions=sorted(versions, key=int))
        rec["consistent"] = (completed and all_ok and rec["rows"] == n and rec["rows_duplicated"] == 0
                             and rec["rows_missing"] == 0 and lost == 0 and dup == 0 and len(train_runs) == 1
                             and len(versions) == 1)
        return rec


def subset_idx(folder: Path, n_train: int, n_test: int) -> None:
    """The first images of Debian's Fashion-MNIST (random pixels if absent) as a small idx set."""
    import gzip

    import numpy as np

    src = Path("/usr/share/datasets/fashion-mnist")

    def read(name: str, n: int) -> np.ndarray:
        if not (src / f"{name}.gz").exists():
            rng = np.random.default_rng(0)
            return (np.arange(n, dtype=np.uint8) % 10 if "labels" in name
                    else rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        b = gzip.decompress((src / f"{name}.gz").read_bytes())
        nd = b[3]
        dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(nd)]
        return np.frombuffer(b, np.uint8, offset=4 + 4 * nd).reshape(dims)[:n]

    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train-images-idx3-ubyte", n_train), ("train-labels-idx1-ubyte", n_train),
                    ("t10k-images-idx3-ubyte", n_test), ("t10k-labels-idx1-ubyte", n_test)):
        arr = read(name, n)
        header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
        (folder / f"{name}.gz").write_bytes(gzip.compress(header + arr.tobytes(), mtime=0))


def device_info() -> dict[str, Any]:
    import mlflow
    import ray
    import torch

    mem = None
    with contextlib.suppress(OSError):
        mem = next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal")) + " kB"
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(), "memory": mem,
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "ray": ray.__version__, "mlflow": mlflow.__version__, "load_avg_start": os.getloadavg()}


def summarize(trials: list[dict[str, Any]]) -> dict[str, Any]:
    def total(key: str, kinds: tuple[str, ...] = KINDS) -> int:
        return sum(int(t.get(key) or 0) for t in trials if t["kind"] in kinds)

    per_kind = {}
    for kind in KINDS:
        ts = [t for t in trials if t["kind"] == kind]
        if ts:
            per_kind[kind] = {"trials": len(ts), "completed": sum(t["completed"] for t in ts),
                              "consistent": sum(bool(t.get("consistent")) for t in ts),
                              "faults_landed": sum(bool(t["fault"]["landed"]) for t in ts)}
    return {
        "trials": len(trials),
        "completed": sum(t["completed"] for t in trials),
        "consistent": sum(bool(t.get("consistent")) for t in trials),
        "faults_landed": sum(bool(t["fault"]["landed"]) for t in trials),
        "epochs_lost": total("epochs_lost", ("train_worker", "run_driver")),
        "epochs_duplicated": total("epochs_duplicated", ("train_worker", "run_driver")),
        "mlflow_epoch_steps_duplicated": total("mlflow_epochs_duplicated", ("train_worker", "run_driver")),
        "rows_duplicated": total("rows_duplicated", ("infer_actor", "run_driver")),
        "rows_missing": total("rows_missing", ("infer_actor", "run_driver")),
        "rows_foreign": total("rows_foreign", ("infer_actor", "run_driver")),
        "run_driver_reruns": total("reruns", ("run_driver",)),
        "run_driver_extra_registered_versions": sum(max(0, len(t.get("registered_versions") or []) - 1)
                                                     for t in trials if t["kind"] == "run_driver"),
        "run_driver_mlflow_runs_left_running": sum(len(t.get("mlflow_running_left") or [])
                                                   for t in trials if t["kind"] == "run_driver"),
        "per_kind": per_kind,
    }


def line(i: int, n: int, t: dict[str, Any]) -> str:
    f = t["fault"]
    where = ""
    if f["landed"]:
        where = f" at {f.get('at_s')}s" + (f" in {f['step']}" if f.get("step") else "") + (
            f" in epoch {f['target_epoch']} at {f['fraction']:.0%} (newest checkpoint on storage: epoch "
            f"{f['checkpoint_epoch_at_kill']})" if "target_epoch" in f else "")
    head = f"[{i + 1}/{n}] {t['kind']:<12} fault landed: {'yes' + where if f['landed'] else 'no'}; " \
           f"completed: {'yes' if t['completed'] else 'NO'}; consistent: {'yes' if t.get('consistent') else 'NO'}; "
    if t["kind"] == "train_worker":
        body = (f"epochs {t['epochs']} lost {t['epochs_lost']} dup {t['epochs_duplicated']}, worker groups "
                f"{t['worker_groups']}, restarts reported {t['restarts']}, "
                f"mlflow runs {t['mlflow_runs']} {t['mlflow_status']}, val_acc steps {t['mlflow_val_acc_steps']}")
    elif t["kind"] == "infer_actor":
        body = (f"rows {t['rows']}/{t['inputs']} dup {t['rows_duplicated']} missing {t['rows_missing']}, "
                f"job dropped {t['duplicates_removed_by_job']} dup(s), actor restarts "
                f"{f.get('actor_restarts', '-')}")
    else:
        body = (f"reruns {t['reruns']}, steps {sorted(set(t['steps'].values())) or '-'}, rows {t['rows']}/{t['inputs']} "
                f"dup {t['rows_duplicated']} missing {t['rows_missing']}, epochs {t['epochs']}, "
                f"versions {t['registered_versions']}, left RUNNING {t['mlflow_running_left']}")
    err = t.get("job", {}).get("error") if t["kind"] != "run_driver" else None
    return head + body + f" ({t['seconds']:.0f} s)" + (f" error: {err}" if err else "")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10, help="number of trials (one landed fault each)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset of " + ",".join(KINDS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-images", type=int, default=1200, help="Fashion-MNIST train images (val carved from them)")
    p.add_argument("--test-images", type=int, default=200)
    p.add_argument("--timeout", type=float, default=600, help="seconds per job attempt before it counts as hung")
    p.add_argument("--max-reruns", type=int, default=3, help="run_driver: reruns after the killed attempt")
    p.add_argument("--max-misses", type=int, default=2,
                   help="a trial whose kill found the job already finished is tried again, this many times")
    p.add_argument("--epoch-first", type=float, default=15.0,
                   help="first guess (s) of a training run's first epoch (group up to first checkpoint)")
    p.add_argument("--epoch-next", type=float, default=3.0, help="first guess (s) of its later epochs")
    p.add_argument("--window-infer", type=float, default=12.0, help="first guess (s) of an inference job's length")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "faults.json"))
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs, sqlite store)")
    p.add_argument("--child", choices=["train", "infer"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or set(kinds) - set(KINDS) or args.n < 1:
        p.error(f"--kinds must name some of {', '.join(KINDS)}; --n >= 1")
    if args.worker:
        return worker(args, kinds)
    return supervise(args)


def supervise(args: argparse.Namespace) -> int:
    """Own the services: start the stack, run the benchmark proper (``--worker``) in a child with
    the stack's environment, and stop everything by pid however that child ends. This process
    never imports Ray, so its SIGTERM/SIGINT handling is its own (a Ray driver's is not)."""
    from dev_stack import DevStack, _pids_using, terminate

    work = Path(tempfile.mkdtemp(prefix="bench-faults-"))
    stack = DevStack(work / "stack", bucket=BUCKET)

    def stop(signum, _frame) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    proc = None
    try:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI")}
        # Ray workers import this checkout's code (not whatever `pipelines` the venv has installed)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
        env.update({"RAY_DATA_DISABLE_PROGRESS_BARS": "1", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_TRAIN_V2_ENABLED": "1", "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"})
        os.environ.clear()
        os.environ.update(env)  # the stack's services inherit it
        t0 = time.monotonic()
        stack.start(["s3", "ray"], num_cpus=4)
        env.update(stack.env())
        env["BENCH_FAULTS_STACK_S"] = f"{time.monotonic() - t0:.1f}"
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", "--work", str(work),
                                 *sys.argv[1:]], env=env, cwd=ROOT)
        return proc.wait()
    finally:
        if proc is not None and proc.poll() is None:
            terminate([proc.pid], grace=10)
        # jobs the worker started (train/infer children, `run` drivers) name the work folder
        terminate(_pids_using(str(work)), grace=5)
        ray_temp = stack.state.get("services", {}).get("ray", {}).get("temp_dir")
        stack.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
            if ray_temp:  # the stack keeps Ray's logs after stop; a benchmark need not
                shutil.rmtree(ray_temp, ignore_errors=True)
        else:
            say(f"kept {work}")


def worker(args: argparse.Namespace, kinds: list[str]) -> int:
    """The benchmark proper, connected to the supervisor's stack (RAY_ADDRESS etc. set)."""
    import ray

    t_start = time.monotonic() - float(os.environ.get("BENCH_FAULTS_STACK_S", 0))
    work = Path(args.work)
    info = device_info()
    ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False, configure_logging=False)
    bench = Bench(args, work, dict(os.environ))
    bench.setup()
    setup_s = time.monotonic() - t_start
    say(f"set-up {setup_s:.0f} s: Ray head {os.environ['RAY_ADDRESS']}, S3 {os.environ['AWS_ENDPOINT_URL_S3']}, "
        f"{bench.version.count('train')} train / {bench.version.count('test')} test images; work {work}")
    plan = [kinds[i % len(kinds)] for i in range(args.n)]
    random.Random(args.seed).shuffle(plan)
    trials: list[dict[str, Any]] = []
    missed: list[dict[str, Any]] = []
    seq = 0  # names of jobs, MLflow runs and models: one per try
    for i, kind in enumerate(plan):
        for _ in range(args.max_misses + 1):
            try:
                rec = getattr(bench, f"trial_{kind}")(seq)
            except Exception as exc:  # a broken trial is a failed trial, not a broken benchmark
                rec = {"kind": kind, "fault": {"landed": False}, "completed": False, "consistent": False,
                       "seconds": 0.0, "error": f"{type(exc).__name__}: {exc}"}
            rec.update(trial=i, name_index=seq)
            seq += 1
            if rec["fault"]["landed"] or "error" in rec:
                break
            missed.append(rec)
            say(f"[{i + 1}/{args.n}] {kind}: the kill came after the job had finished ({rec['seconds']:.0f} s, "
                f"completed: {'yes' if rec['completed'] else 'NO'}, consistent: "
                f"{'yes' if rec.get('consistent') else 'NO'}); drawing the kill again")
        trials.append(rec)
        say(line(i, args.n, rec) if "error" not in rec else f"[{i + 1}/{args.n}] {kind}: {rec['error']}")
        _write(args.out, info, args, trials, missed, setup_s, t_start)
    summary = _write(args.out, info, args, trials, missed, setup_s, t_start)
    with contextlib.suppress(Exception):
        ray.shutdown()
    by_kind = ", ".join(f"{k} {v['completed']}/{v['trials']}" for k, v in summary["per_kind"].items())
    say(f"summary: completions {summary['completed']}/{summary['trials']} ({by_kind}); "
        f"consistent {summary['consistent']}/{summary['trials']}; faults landed {summary['faults_landed']} "
        f"(+{len(missed)} kill(s) that came after the job had finished); "
        f"epochs lost {summary['epochs_lost']}, duplicated {summary['epochs_duplicated']} "
        f"(MLflow val_acc steps logged twice: {summary['mlflow_epoch_steps_duplicated']}); "
        f"prediction rows duplicated {summary['rows_duplicated']}, missing {summary['rows_missing']}; "
        f"run reruns {summary['run_driver_reruns']}, extra registered versions "
        f"{summary['run_driver_extra_registered_versions']}, MLflow runs left RUNNING "
        f"{summary['run_driver_mlflow_runs_left_running']}; {time.monotonic() - t_start:.0f} s")
    say(f"wrote {args.out}")
    return 0


def _write(out: str, info: dict, args: argparse.Namespace, trials: list[dict], missed: list[dict], setup_s: float,
           t_start: float) -> dict:
    summary = summarize(trials)
    summary["missed_kills"] = len(missed)
    internal = ("child", "spec", "result", "worker", "work")
    command = ["python benchmarks/bench_faults.py"]
    argv = sys.argv[1:]
    while argv:
        a = argv.pop(0)
        if a == "--worker":
            continue
        if a == "--work":
            argv.pop(0)
            continue
        command.append(a)
    doc = {"benchmark": "fault injection: kills at random times", "command": " ".join(command),
           "device": {**info, "load_avg_end": os.getloadavg()},
           "settings": {k: v for k, v in vars(args).items() if k not in internal},
           "sizes": {"train": TRAIN, "train_epochs": TRAIN_EPOCHS, "run_epochs": RUN_EPOCHS, "infer": INFER,
                     "infer_arch": INFER_ARCH},
           "setup_seconds": round(setup_s, 1), "seconds": round(time.monotonic() - t_start, 1),
           "summary": summary, "trials": trials, "missed": missed}
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(main())
