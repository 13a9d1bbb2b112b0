"""infer: batch inference with a registered model over a dataset version or a prefix of raw images.

    python -m pipelines infer --config FILE --input URI [--model models:/NAME@champion] [--job NAME]

:func:`infer` pins the model (:mod:`pipelines.inference.model`), lists the inputs
(:mod:`~pipelines.inference.inputs`), runs decode + model actors on Ray Data
(:mod:`~pipelines.inference.actors`) and publishes the rows exactly once
(:mod:`~pipelines.inference.writer`); one MLflow run per job attempt records it. Output layout,
columns and guarantees: docs/inference.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from . import storage as st
from . import tracking
from .config import PipelineConfig, tta_label
from .errors import ConfigError, InferError, first_line, redact_uri, user_error_behind
from .inference.actors import EXPLAIN_FOLDER, build_dataset, check_resources, output_schema
from .inference.inputs import InferInput, resolve_input
from .inference.model import ResolvedModel, load_model_package, parse_model_uri, resolve_model
from .inference.writer import (
    ATTEMPT_PREFIX,
    FORMAT,
    MANIFEST,
    Verified,
    cleanup_attempts,
    predictions_uri,
    publish_manifest,
    verify_output,
    write_rows,
)
from .ray_setup import ensure_ray

log = logging.getLogger(__name__)

TASK = "infer"
LOCK = "_lock"  # <storage>/predictions/<job>/_lock while a job of that name runs
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class InferResult:
    """What one inference job produced (also the core of its manifest)."""

    job_name: str
    output_uri: str  # the folder holding the Parquet files (the attempt the manifest names)
    manifest_uri: str  # <storage>/predictions/<job>/manifest.json
    input_count: int
    output_count: int
    error_count: int  # rows whose input could not be read or decoded
    model_name: str
    model_version: str
    input_digest: str
    seconds: float  # wall time of the job up to publishing (setup, Ray execution, verification)
    images_per_s: float  # input_count / seconds
    accuracy: float | None = None  # dataset-version input only: top-1 over all labelled rows
    correct: int | None = None  # rows whose top-1 label equals the true label
    input_kind: str = ""  # "dataset" | "images"
    model_uri: str = ""  # models:/NAME/VERSION actually used
    duplicates_removed: int = 0  # rows written twice by retried tasks and dropped before publishing
    timings: dict[str, float] = field(default_factory=dict)  # setup_s, ray_s, verify_s, ray_images_per_s
    mlflow_run_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_job_name(model: ResolvedModel, inputs: InferInput) -> str:
    """``<model>-v<version>-<input digest[:10]>``: the same model on the same input, the same job."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", model.name).strip("-.") or "model"
    return f"{name}-v{model.version}-{inputs.digest[:10]}"


def _check_settings(cfg: PipelineConfig, job_name: str | None) -> None:
    ic = cfg.infer
    if ic.batch_size < 1:
        raise ConfigError(f"infer.batch_size={ic.batch_size} must be at least 1")
    if ic.num_actors < 1:
        raise ConfigError(f"infer.num_actors={ic.num_actors} must be at least 1")
    if ic.cpus_per_actor <= 0:
        raise ConfigError(f"infer.cpus_per_actor={ic.cpus_per_actor} must be positive (e.g. 1)")
    if ic.top_k < 1:
        raise ConfigError(f"infer.top_k={ic.top_k} must be at least 1")
    if job_name is not None and not _JOB_NAME.match(job_name):
        raise ConfigError(f"job name {job_name!r} must be 1-128 letters, digits, '.', '_' or '-', starting with a "
                          "letter or digit (e.g. --job fmnist-test-2024-06)")


def infer(cfg: PipelineConfig, *, input_uri: str, model_uri: str, job_name: str | None = None,
          progress: Callable[[str], None] | None = None) -> InferResult:
    """Run one batch-inference job and publish its predictions (see the module doc)."""
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    if not input_uri:
        raise ConfigError("no input given; pass --input URI (a dataset version folder or a prefix of images) "
                          "or set infer.input")
    if not model_uri:
        raise ConfigError("no model given; pass --model models:/NAME@champion or set infer.model_uri")
    _check_settings(cfg, job_name)
    parse_model_uri(model_uri)
    st.check_bucket(cfg.storage.uri, cfg.storage)
    tracking_uri, _ = tracking.resolve_uris(cfg)
    tracking.check_tracking_server(tracking_uri)
    client = tracking.client(cfg)

    model = resolve_model(cfg, model_uri, client)
    say(f"model {model.requested_uri} -> {model.uri} ({model.num_classes} classes, "
        f"{model.channels}x{model.image_size[0]}x{model.image_size[1]})")
    inputs = resolve_input(cfg, input_uri)
    if inputs.kind == "dataset" and inputs.channels != model.channels:
        raise InferError(f"dataset {inputs.uri} has {inputs.channels}-channel images but {model.uri} takes "
                         f"{model.channels}; prepare the data with data.channels={model.channels} "
                         "or pick another model")
    what = (f"split {inputs.split!r} of dataset {inputs.uri}" if inputs.kind == "dataset"
            else f"images under {inputs.uri}")
    say(f"input: {inputs.count} {what}" + (f" ({inputs.skipped} non-image file(s) skipped)" if inputs.skipped else ""))
    if cfg.infer.top_k > model.num_classes:
        log.warning("infer.top_k=%d exceeds the model's %d classes; using %d", cfg.infer.top_k, model.num_classes,
                    model.num_classes)
    job = job_name or cfg.infer.job_name or default_job_name(model, inputs)
    _check_settings(cfg, job)
    job_uri = predictions_uri(cfg.storage.uri, job)
    attempt = f"{ATTEMPT_PREFIX}{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"
    data_uri = st.join_uri(job_uri, attempt)
    manifest_uri = st.join_uri(job_uri, MANIFEST)
    package = load_model_package(model)  # downloaded once, here; the actors get it from the object store
    local_cluster = not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))
    ensure_ray(cfg)
    check_resources(cfg, strict=local_cluster)
    setup_s = time.monotonic() - started  # model + input resolution, Ray connection

    # one writer per job name: a second concurrent job with this name fails here, cleanly, instead of
    # publishing a manifest that the first one's clean-up could point at a deleted attempt
    with st.exclusive(st.join_uri(job_uri, LOCK), f"inference job {job!r}", cfg.storage):
        run_id = _start_mlflow_run(cfg, client, job, attempt, model, inputs)
        try:
            say(f"job {job}: {cfg.infer.num_actors} actor(s) x {cfg.infer.cpus_per_actor:g} CPU"
                f"{' + 1 GPU' if cfg.infer.use_gpu else ''}, batch {cfg.infer.batch_size}, writing {data_uri}"
                f"{' (+ an attention overlay per input under explain/)' if cfg.infer.explain else ''}")
            ray_started = time.monotonic()
            import ray  # connected by ensure_ray above

            explain_uri = st.join_uri(data_uri, EXPLAIN_FOLDER) if cfg.infer.explain else None
            try:
                write_rows(build_dataset(cfg, inputs, model, ray.put(package), explain_uri), data_uri, cfg.storage)
            except Exception as exc:  # a bad input met inside an actor (e.g. a shard changed): its one line
                user_error = user_error_behind(exc)
                if user_error is None:
                    raise
                raise user_error from None
            ray_s = time.monotonic() - ray_started
            say(f"Ray job done in {ray_s:.1f} s; verifying one row per input")

            verify_started = time.monotonic()
            checked = verify_output(data_uri, inputs.input_ids, cfg.storage)
            verify_s = time.monotonic() - verify_started
            if checked.output_count != inputs.count:  # verify_output guarantees it; never publish otherwise
                raise InferError(f"{checked.output_count} rows for {inputs.count} inputs at {data_uri}; nothing published")
            if checked.duplicates_removed:
                log.warning("job %s: dropped %d row(s) written twice by retried tasks", job, checked.duplicates_removed)
                say(f"dropped {checked.duplicates_removed} row(s) written twice by retried tasks")

            accuracy = correct = None
            if inputs.kind == "dataset":
                if inputs.classes == model.class_names and checked.labelled:
                    correct = checked.correct
                    accuracy = correct / checked.labelled
                else:
                    log.warning("dataset classes %s differ from the model's %s; no accuracy reported",
                                list(inputs.classes or ()), list(model.class_names))
            seconds = time.monotonic() - started
            result = InferResult(
                job_name=job, output_uri=data_uri, manifest_uri=manifest_uri, input_count=inputs.count,
                output_count=checked.output_count, error_count=checked.error_count, model_name=model.name,
                model_version=model.version, input_digest=inputs.digest, seconds=round(seconds, 3),
                images_per_s=round(inputs.count / seconds, 2) if seconds > 0 else 0.0, accuracy=accuracy, correct=correct,
                input_kind=inputs.kind, model_uri=model.uri, duplicates_removed=checked.duplicates_removed,
                timings={"setup_s": round(setup_s, 3), "ray_s": round(ray_s, 3), "verify_s": round(verify_s, 3),
                         "ray_images_per_s": round(inputs.count / ray_s, 2) if ray_s > 0 else 0.0},
                mlflow_run_id=run_id,
            )
            manifest = _manifest(cfg, result, model, inputs, attempt, checked)
            publish_manifest(manifest_uri, manifest, cfg.storage)  # last write: the job is complete
        except BaseException:
            tracking.end_run(client, run_id, "FAILED")
            raise
        cleanup_attempts(job_uri, attempt, cfg.storage)
        _finish_mlflow_run(client, run_id, result, manifest)
        return result


def _manifest(cfg: PipelineConfig, result: InferResult, model: ResolvedModel, inputs: InferInput, attempt: str,
              checked: Verified) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "job": result.job_name,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "data": attempt,  # folder (relative to the job folder) holding exactly the files below
        "files": [{"path": f"{attempt}/{f['path']}", "rows": f["rows"]} for f in checked.files],
        "schema": [f.name for f in output_schema(cfg.infer.explain)],
        "explain": f"{attempt}/{EXPLAIN_FOLDER}" if cfg.infer.explain else None,  # one <input id>.png per scored row
        "input": {"uri": inputs.uri, "kind": inputs.kind, "split": inputs.split, "digest": inputs.digest,
                  "skipped_files": inputs.skipped},
        "input_count": result.input_count,
        "output_count": result.output_count,
        "error_count": result.error_count,
        "duplicates_removed": result.duplicates_removed,
        "model": {"requested_uri": model.requested_uri, "uri": model.uri, "name": model.name,
                  "version": model.version, "artifact_uri": redact_uri(model.download_uri),
                  "class_names": list(model.class_names)},
        "model_version": model.version,
        "input_digest": result.input_digest,
        "accuracy": result.accuracy,
        "correct": result.correct,
        "top_k": min(cfg.infer.top_k, model.num_classes),
        "settings": {"batch_size": cfg.infer.batch_size, "num_actors": cfg.infer.num_actors,
                     "cpus_per_actor": cfg.infer.cpus_per_actor, "use_gpu": cfg.infer.use_gpu,
                     "explain": cfg.infer.explain,
                     "tta": tta_label(cfg.infer.tta, cfg.infer.tta_shift)},
        "seconds": result.seconds,
        "images_per_s": result.images_per_s,
        "timings": result.timings,
        "mlflow_run_id": result.mlflow_run_id,
    }


def _start_mlflow_run(cfg: PipelineConfig, client: Any, job: str, attempt: str, model: ResolvedModel,
                      inputs: InferInput) -> str:
    from mlflow.entities import Param

    tags = {tracking.TASK_TAG: TASK, tracking.RUN_NAME_TAG: job, "mlflow.runName": job, "infer.attempt": attempt,
            "model_name": model.name, "model_version": model.version}
    run = client.create_run(tracking.experiment_id(cfg, client), run_name=job, tags=tags)
    run_id = run.info.run_id
    params = {"model_uri_requested": model.requested_uri, "model_uri": model.uri, "model_version": model.version,
              "input": inputs.uri, "input_kind": inputs.kind, "input_split": inputs.split or "",
              "input_digest": inputs.digest, "input_count": inputs.count}
    client.log_batch(run_id, params=[Param(k, str(v)[:tracking.MAX_PARAM_LEN]) for k, v in params.items()])
    tracking.log_config(client, run_id, cfg, sections=["infer"])
    return run_id


def _finish_mlflow_run(client: Any, run_id: str, result: InferResult, manifest: Mapping[str, Any]) -> None:
    """Counts, throughput and the manifest into the job's run. The predictions are already
    published, so a tracking failure here is a warning, not a failed job."""
    try:
        _log_results(client, run_id, result, manifest)
    except Exception as exc:
        log.warning("job %s is complete but logging it to MLflow run %s failed: %s", result.job_name, run_id,
                    first_line(exc))


def _log_results(client: Any, run_id: str, result: InferResult, manifest: Mapping[str, Any]) -> None:
    metrics = {"input_count": result.input_count, "output_count": result.output_count,
               "error_count": result.error_count, "images_per_s": result.images_per_s, "seconds": result.seconds,
               "duplicates_removed": result.duplicates_removed, **result.timings}
    if result.accuracy is not None:
        metrics["accuracy"] = result.accuracy
    tracking.log_metrics(client, run_id, metrics, step=0)
    tracking.log_json(client, run_id, dict(manifest), "predictions_manifest.json")
    tracking.end_run(client, run_id, "FINISHED")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    input_uri = getattr(args, "input_uri", None) or cfg.infer.input
    model_uri = getattr(args, "model_uri", None) or cfg.infer.model_uri or f"models:/{cfg.registry.model_name}@champion"

    def say(msg: str) -> None:
        print(msg, flush=True)

    r = infer(cfg, input_uri=input_uri, model_uri=model_uri, job_name=getattr(args, "job_name", None), progress=say)
    acc = f", accuracy {r.accuracy:.4f} ({r.correct}/{r.input_count})" if r.accuracy is not None else ""
    print(f"{r.job_name}: {r.output_count}/{r.input_count} rows, {r.error_count} error(s), {r.model_uri}{acc}, "
          f"{r.images_per_s:.0f} images/s overall ({r.timings.get('ray_images_per_s', 0):.0f} in the Ray job), "
          f"{r.seconds:.1f} s")
    print(f"manifest: {r.manifest_uri}")
    print(r.output_uri)
    return 0
