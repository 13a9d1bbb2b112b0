"""The run task: the whole workflow as a cached, resumable DAG of Ray tasks.

    prepare -> tune (or train) -> evaluate -> register -> infer

Each step runs as a Ray task on the cluster and returns typed outputs (URIs, run ids, model
versions). The run record ``<storage>/runs/<workflow.name>/record.json`` keeps, per step, the
hash of its inputs (its config sections, the outputs it consumes and the code), its status,
outputs, attempts and error. A step whose input hash matches a recorded success, and whose outputs
still exist, is skipped; ``prepare`` always runs (it is content-addressed: unchanged sources give the
same dataset version in seconds), so new data invalidates everything downstream. A changed input
trains a new sweep (its name carries the input hash); a rerun after a failure resumes the same
sweep; ``--from STEP`` forces that step and everything after it to run again, afresh. Failed steps are retried
with exponential backoff (``workflow.retries``), except for errors in the user's input
(:class:`~pipelines.errors.UserError`), which would fail the same way again. A parent MLflow run
(task ``run``) carries every step's outputs as tags.

(Ray Workflows was removed from Ray; this is the small part of it the pipeline needs.)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import console, tracking
from . import storage as st
from .architecture import check_model_settings
from .config import WORKFLOW_STEPS, PipelineConfig, config_from_dict, to_dict
from .data.shards import load_version
from .errors import ConfigError, UserError, first_line, redact_uri
from .evaluate import evaluate
from .infer import infer
from .prepare import prepare
from .ray_setup import ensure_ray, pinned_paths
from .register import register_from_workflow
from .train import train
from .tune import tune

TASK = "run"
STEPS = WORKFLOW_STEPS
# config sections each step depends on (besides its upstream outputs)
SECTIONS = {
    "prepare": ("data", "storage"),
    "search": ("model", "train", "tune", "storage", "mlflow"),
    "evaluate": ("storage", "mlflow"),
    "register": ("registry", "storage", "mlflow"),
    "infer": ("infer", "storage", "mlflow"),
}
# prepare's output does not depend on these data fields (they shape streaming, not the shards)
STREAM_ONLY_DATA_KEYS = ("augment", "version", "equal_shards", "shuffle")


class StepFailed(UserError):
    """A workflow step failed; the message names it and how to resume."""


@dataclass
class StepRecord:
    key: str
    status: str  # succeeded | failed | running
    outputs: dict[str, Any] = field(default_factory=dict)
    attempts: int = 0
    started: str | None = None
    finished: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class StepContext:
    key: str  # hash of the step's inputs (step_key)
    fresh: bool  # forced by --from: start new work instead of resuming the work recorded for this key


@dataclass
class RunResult:
    name: str
    record_uri: str
    mlflow_run_id: str
    executed: list[str]
    skipped: list[str]
    outputs: dict[str, dict[str, Any]]
    seconds: float


# --------------------------------------------------------------------------------------------
# Step functions: (cfg, upstream outputs) -> outputs. Each runs inside a Ray task.
# --------------------------------------------------------------------------------------------


def step_prepare(cfg: PipelineConfig, up: dict[str, dict], ctx: StepContext) -> dict[str, Any]:
    version = prepare(cfg, progress=print)
    return {"dataset_uri": version.uri, "dataset_version": version.version, "classes": version.classes,
            "counts": {s: version.count(s) for s in version.splits}}


def step_search(cfg: PipelineConfig, up: dict[str, dict], ctx: StepContext) -> dict[str, Any]:
    """One sweep (or training run) per input key: a changed config or dataset version trains
    anew, a rerun after a failure resumes the same sweep, ``--from search`` starts a fresh one."""
    version = load_version(up["prepare"]["dataset_uri"], cfg.storage)
    suffix = ctx.key[:10] + (f"-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}" if ctx.fresh else "")
    if cfg.workflow.search == "tune":
        name = f"{cfg.tune.name or cfg.workflow.name + '-sweep'}-{suffix}"
        res = tune(cfg, version=version, name=name, resume=_sweep_exists(cfg, name))
        return {"model_uri": res.model_uri, "train_run_id": res.best_run_id, "tune_parent_run_id": res.parent_run_id,
                "best_config": res.best_config, "val_acc": res.best_metrics.get("val_acc"),
                "checkpoint_uri": res.best_checkpoint_uri, "sweep": name}
    run_name = f"{cfg.train.run_name or cfg.workflow.name + '-train'}-{suffix}"
    res = train(cfg, version=version, run_name=run_name)
    return {"model_uri": res.model_uri, "train_run_id": res.mlflow_run_id, "val_acc": res.metrics.get("val_acc"),
            "checkpoint_uri": res.best_checkpoint_uri, "train_run": run_name}


def _sweep_exists(cfg: PipelineConfig, name: str) -> bool:
    return st.exists(st.join_uri(cfg.storage.uri, "tune", name, "tuner.pkl"), cfg.storage)


def step_evaluate(cfg: PipelineConfig, up: dict[str, dict], ctx: StepContext) -> dict[str, Any]:
    version = load_version(up["prepare"]["dataset_uri"], cfg.storage)
    res = evaluate(cfg, model_uri=up["search"]["model_uri"], run_id=up["search"].get("train_run_id"), version=version)
    return {"metrics": res.metrics, "result_uri": res.result_uri}


def step_register(cfg: PipelineConfig, up: dict[str, dict], ctx: StepContext) -> dict[str, Any]:
    return register_from_workflow(cfg, model_uri=up["search"]["model_uri"], run_id=up["search"].get("train_run_id"),
                                  dataset_uri=up["prepare"]["dataset_uri"], metrics=up["evaluate"]["metrics"])


def step_infer(cfg: PipelineConfig, up: dict[str, dict], ctx: StepContext) -> dict[str, Any]:
    model_uri = cfg.infer.model_uri or f"models:/{cfg.registry.model_name}@champion"
    source = cfg.infer.input or up["prepare"]["dataset_uri"]
    res = infer(cfg, input_uri=source, model_uri=model_uri, job_name=cfg.infer.job_name or f"{cfg.workflow.name}-infer")
    return dataclasses.asdict(res) if dataclasses.is_dataclass(res) else dict(res)


STEP_FUNCTIONS: dict[str, Callable[[PipelineConfig, dict, StepContext], dict]] = {
    "prepare": step_prepare, "search": step_search, "evaluate": step_evaluate,
    "register": step_register, "infer": step_infer,
}
UPSTREAM = {"prepare": (), "search": ("prepare",), "evaluate": ("prepare", "search"),
            "register": ("prepare", "search", "evaluate"), "infer": ("prepare", "register")}


# --------------------------------------------------------------------------------------------
# Keys, record, execution
# --------------------------------------------------------------------------------------------


def step_key(step: str, cfg: PipelineConfig, upstream: dict[str, dict]) -> str:
    """Hash of what a step's result depends on: its config sections and its inputs."""
    d = to_dict(cfg)
    sections = {s: d[s] for s in SECTIONS[step]}
    if step == "prepare":
        sections["data"] = {k: v for k, v in sections["data"].items() if k not in STREAM_ONLY_DATA_KEYS}
    if step == "search":
        sections["data"] = {"augment": d["data"]["augment"], "equal_shards": d["data"]["equal_shards"],
                            "shuffle": d["data"]["shuffle"]}
        sections["search"] = d["workflow"]["search"]
    if step == "evaluate":  # the metrics depend on the test-time augmentation
        sections["tta"] = [d["infer"]["tta"], d["infer"]["tta_shift"]]
    doc = {"step": step, "config": sections, "inputs": {u: upstream[u] for u in UPSTREAM[step]},
           "code": code_digest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


@functools.cache
def code_digest() -> str:
    """sha256 of the pipeline's and the model's source files: other code, other results."""
    h = hashlib.sha256()
    root = Path(__file__).resolve().parent.parent
    for package in ("pipelines", "vit_model"):
        for path in sorted((root / package).rglob("*.py")):
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()


def outputs_exist(step: str, outputs: dict[str, Any], cfg: PipelineConfig) -> bool:
    """Whether a recorded step's outputs are still there (a skipped step must not point at
    something deleted since)."""
    if step == "search":
        return st.exists(st.join_uri(outputs["model_uri"], "config.json"), cfg.storage)
    if step == "evaluate":
        return st.exists(outputs["result_uri"], cfg.storage)
    if step == "infer":
        return st.exists(outputs["manifest_uri"], cfg.storage)
    if step == "register":
        from mlflow.exceptions import MlflowException  # here, not at the top: importing MLflow costs seconds

        try:
            tracking.client(cfg).get_model_version(outputs["model_name"], str(outputs["version"]))
        except MlflowException:
            return False
        return True
    return False  # prepare always runs: it is content-addressed and returns an unchanged version at once


def record_uri(cfg: PipelineConfig) -> str:
    return st.join_uri(cfg.storage.uri, "runs", cfg.workflow.name, "record.json")


def load_record(cfg: PipelineConfig) -> dict[str, StepRecord]:
    uri = record_uri(cfg)
    if not st.exists(uri, cfg.storage):
        return {}
    raw = st.read_json(uri, cfg.storage)
    return {k: StepRecord(**v) for k, v in raw.get("steps", {}).items()}


def save_record(cfg: PipelineConfig, steps: dict[str, StepRecord], mlflow_run_id: str | None) -> None:
    doc = {"workflow": cfg.workflow.name, "mlflow_run_id": mlflow_run_id, "updated": _now(),
           "steps": {k: dataclasses.asdict(v) for k, v in steps.items()}}
    st.write_json(record_uri(cfg), doc, cfg.storage)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _run_remote(step: str, cfg_dict: dict, upstream: dict, ctx: StepContext) -> dict:
    cfg = config_from_dict(cfg_dict)
    return STEP_FUNCTIONS[step](cfg, upstream, ctx)


def execute_step(step: str, cfg: PipelineConfig, upstream: dict[str, dict], ctx: StepContext) -> dict[str, Any]:
    """Run one step as a Ray task (a small CPU share: the step starts its own workers)."""
    import ray  # here, not at the top: importing Ray costs seconds

    ensure_ray(cfg)
    remote = ray.remote(num_cpus=0.05, max_retries=0)(_run_remote)
    try:
        return ray.get(remote.remote(step, to_dict(cfg), upstream, ctx))
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause if getattr(exc, "cause", None) is not None else exc
        raise cause from None
    finally:
        console.flush()  # the step's epoch/trial lines before its "done" line


def run(cfg: PipelineConfig, *, from_step: str | None = None, only: list[str] | None = None,
        sleep: Callable[[float], None] = time.sleep) -> RunResult:
    if from_step is not None and from_step not in STEPS:
        raise ConfigError(f"--from {from_step!r} is not a step; steps: {', '.join(STEPS)}")
    steps = [s for s in STEPS if s in (only or cfg.workflow.steps)]
    if "search" in steps:
        check_model_settings(cfg)  # before any step runs: a model no run could build fails now
    cfg = pinned_paths(cfg)  # steps run in Ray workers, whose working directory is not ours
    # one run of a workflow at a time: a second one fails here instead of racing on record.json
    with st.exclusive(st.join_uri(cfg.storage.uri, "runs", cfg.workflow.name, "_lock"),
                      f"workflow {cfg.workflow.name!r}", cfg.storage):
        return _run(cfg, from_step, steps, sleep)


def _run(cfg: PipelineConfig, from_step: str | None, steps: list[str], sleep: Callable[[float], None]) -> RunResult:
    t0 = time.time()
    record = load_record(cfg)
    client = tracking.client(cfg)
    parent_id, _ = tracking.start_or_resume_run(cfg, cfg.workflow.name, TASK, mlflow_client=client)
    outputs: dict[str, dict] = {k: v.outputs for k, v in record.items() if v.status == "succeeded"}
    executed, skipped = [], []
    force = False
    for step in steps:
        force = force or step == from_step
        missing = [u for u in UPSTREAM[step] if u not in outputs]
        if missing:
            raise StepFailed(f"step {step!r} needs the outputs of {', '.join(missing)}, which have not run; "
                             f"add them to workflow.steps")
        key = step_key(step, cfg, outputs)
        prev = record.get(step)
        if not force and prev is not None and prev.status == "succeeded" and prev.key == key \
                and outputs_exist(step, prev.outputs, cfg):
            print(f"[{step}] skipped: inputs unchanged since {prev.finished}", flush=True)
            skipped.append(step)
            continue
        # (downstream steps re-run when this one's outputs change: their keys include them)
        rec = StepRecord(key=key, status="running", attempts=0, started=_now())
        record[step] = rec
        for attempt in range(1, cfg.workflow.retries + 2):
            rec.attempts = attempt
            save_record(cfg, record, parent_id)
            print(f"[{step}] running (attempt {attempt})", flush=True)
            try:
                fresh = from_step is not None and STEPS.index(step) >= STEPS.index(from_step)
                out = execute_step(step, cfg, outputs, StepContext(key, fresh=fresh))
            except UserError as exc:
                _fail(cfg, record, rec, parent_id, client, step, exc, retryable=False)
            except Exception as exc:
                if attempt <= cfg.workflow.retries:
                    delay = cfg.workflow.retry_backoff_s * 2 ** (attempt - 1)
                    print(f"[{step}] failed ({type(exc).__name__}: {first_line(exc)}); "
                          f"retrying in {delay:.0f} s", flush=True)
                    sleep(delay)
                    continue
                _fail(cfg, record, rec, parent_id, client, step, exc, retryable=True)
            else:
                rec.status, rec.outputs, rec.finished, rec.error = "succeeded", out, _now(), None
                outputs[step] = out
                save_record(cfg, record, parent_id)
                for k, v in out.items():
                    if isinstance(v, (str, int, float)) and not isinstance(v, bool):
                        client.set_tag(parent_id, f"{step}.{k}", str(v)[:5000])
                executed.append(step)
                print(f"[{step}] done", flush=True)
                break
    tracking.end_run(client, parent_id, "FINISHED")
    return RunResult(name=cfg.workflow.name, record_uri=record_uri(cfg), mlflow_run_id=parent_id, executed=executed,
                     skipped=skipped, outputs=outputs, seconds=time.time() - t0)


def _fail(cfg, record, rec, parent_id, client, step, exc, retryable: bool):
    first = first_line(exc, limit=1000)
    rec.status, rec.finished, rec.error = "failed", _now(), f"{type(exc).__name__}: {first}"
    save_record(cfg, record, parent_id)
    client.set_tag(parent_id, "pipeline.failed_step", step)
    tracking.end_run(client, parent_id, "FAILED")
    raise StepFailed(f"step {step!r} failed: {first}. Completed steps are kept: fix the cause and rerun the same "
                     f"command (they are skipped), or force a step with --from {step}") from exc


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    result = run(cfg, from_step=args.from_step)
    print(f"workflow {result.name}: ran {', '.join(result.executed) or 'nothing'}; "
          f"skipped {', '.join(result.skipped) or 'nothing'} ({result.seconds:.0f} s)")
    out = result.outputs
    if "evaluate" in out:
        m = out["evaluate"]["metrics"]
        print(f"test accuracy: {m.get('test_acc', float('nan')):.4f}")
    if "register" in out:
        r = out["register"]
        print(f"registry: {r.get('model_name')} version {r.get('version')}; champion is version "
              f"{r.get('champion_version')} ({r.get('decision')})")
    if "infer" in out:
        print(f"predictions: {out['infer'].get('output_uri')}")
    print(f"run record: {result.record_uri}")
    print(f"MLflow UI: mlflow ui --backend-store-uri {redact_uri(tracking.resolve_tracking_uri(cfg))} --host 127.0.0.1 --port 5000")
    return 0
