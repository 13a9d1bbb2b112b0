"""MLflow tracking: where runs go, one run per training, and what each run records.

Everything goes through an explicit ``MlflowClient`` and run id (no fluent global run state), so
the driver can create the run, the rank-0 worker can log epochs into it, and a restarted worker
group or a resubmitted run keeps logging into the same run instead of opening a duplicate.

Tracking URI, in order: ``mlflow.tracking_uri`` in the config, ``MLFLOW_TRACKING_URI``, else a
sqlite file beside the local storage folder (``<storage>/mlflow.db``; for ``s3://`` storage,
``./artifacts/mlflow.db``). On a multi-node cluster use an ``mlflow server`` URL: a sqlite file
on the driver is not visible to workers on other nodes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .config import PipelineConfig, flatten, to_dict, to_yaml
from .errors import ConfigError, TrackingError, UserError, has_credentials, redact_uri, redact_values
from .storage import join_uri, local_path

RUN_NAME_TAG = "pipeline.run_name"
TASK_TAG = "pipeline.task"
PARENT_TAG = "mlflow.parentRunId"
MAX_PARAM_LEN = 6000  # MLflow's limit for a param value


def resolve_tracking_uri(cfg: PipelineConfig) -> str:
    """The tracking URI for this config (see module docstring)."""
    if cfg.mlflow.tracking_uri:
        return cfg.mlflow.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        uri = os.environ["MLFLOW_TRACKING_URI"]
        if has_credentials(uri):  # MLflow prints run URLs built from it; never let a secret through
            raise ConfigError("MLFLOW_TRACKING_URI embeds credentials (user-info or a secret query parameter); "
                              "remove them and set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or "
                              "MLFLOW_TRACKING_TOKEN instead")
        return uri
    root = local_path(cfg.storage.uri) or os.path.abspath("artifacts")
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def artifact_location(cfg: PipelineConfig) -> str | None:
    """Artifact root for experiments this pipeline creates: ``<storage>/mlflow-artifacts``.

    Only used with a sqlite/file store (a tracking server decides its own artifact root)."""
    uri = resolve_tracking_uri(cfg)
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    local = local_path(cfg.storage.uri)
    if local is not None:
        return Path(local, "mlflow-artifacts").as_uri()
    return join_uri(cfg.storage.uri, "mlflow-artifacts")


def resolve_uris(cfg: PipelineConfig) -> tuple[str, str]:
    """(tracking URI, registry URI): the registry defaults to the tracking store. (Leaving it
    None would make MLflow fall back to ``sqlite:///mlflow.db`` in the working directory.)"""
    tracking_uri = resolve_tracking_uri(cfg)
    return tracking_uri, cfg.mlflow.registry_uri or tracking_uri


def client(cfg: PipelineConfig):
    """An ``MlflowClient`` for the configured tracking store and model registry."""
    from mlflow.tracking import MlflowClient  # here: importing MLflow costs seconds

    tracking_uri, registry_uri = resolve_uris(cfg)
    for uri in {tracking_uri, registry_uri}:
        if uri not in _REACHABLE:  # once per process: an unreachable server is one line, not minutes of retries
            check_tracking_server(uri)
            _REACHABLE.add(uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)


_REACHABLE: set[str] = set()


def check_tracking_server(uri: str, timeout: float = 5.0) -> None:
    """For http(s) tracking URIs: one quick ``/health`` probe, so an unreachable server is one
    clear line instead of minutes of client retries."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout):
            return
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise TrackingError(
                f"MLflow server {redact_uri(uri)} refused the request (HTTP {exc.code}); set MLFLOW_TRACKING_USERNAME/"
                "MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN, or start it with --allowed-hosts for this host"
            ) from None
        return  # it answers HTTP: up
    except OSError:
        raise TrackingError(
            f"MLflow tracking server {redact_uri(uri)} is unreachable; start it (python cluster/dev_stack.py start) "
            "or fix mlflow.tracking_uri / MLFLOW_TRACKING_URI"
        ) from None


@contextlib.contextmanager
def fluent_tracking(tracking_uri: str, registry_uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (``log_model``, ``models:/`` downloads) at our URIs, restoring them after."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    # set_tracking_uri/set_registry_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI;
    # restoring them through the same setters would pin MLflow's *default* (a sqlite file in the
    # working directory) for the rest of the process. Restore the exact previous state instead.
    env_keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved_env = {k: os.environ.get(k) for k in env_keys}
    saved = (getattr(tracking_utils, "_tracking_uri", None), getattr(registry_utils, "_registry_uri", None))
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri)
    try:
        yield
    finally:
        tracking_utils._tracking_uri, registry_utils._registry_uri = saved
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def experiment_id(cfg: PipelineConfig, mlflow_client=None) -> str:
    """Id of ``mlflow.experiment_name``, created (with our artifact location) if missing."""
    c = mlflow_client or client(cfg)
    exp = c.get_experiment_by_name(cfg.mlflow.experiment_name)
    if exp is not None:
        return exp.experiment_id
    try:
        return c.create_experiment(cfg.mlflow.experiment_name, artifact_location=artifact_location(cfg))
    except Exception:  # created concurrently by another process
        exp = c.get_experiment_by_name(cfg.mlflow.experiment_name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(cfg: PipelineConfig, run_name: str, task: str, parent_run_id: str | None = None, mlflow_client=None):
    """The existing run with this pipeline run name and task, or None."""
    c = mlflow_client or client(cfg)
    filt = f"tags.`{RUN_NAME_TAG}` = '{run_name}' and tags.`{TASK_TAG}` = '{task}'"
    if parent_run_id:
        filt += f" and tags.`{PARENT_TAG}` = '{parent_run_id}'"
    runs = c.search_runs([experiment_id(cfg, c)], filter_string=filt, max_results=1, order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def start_or_resume_run(
    cfg: PipelineConfig, run_name: str, task: str, tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None, mlflow_client=None,
) -> tuple[str, bool]:
    """(run id, resumed): reuses the run of an earlier attempt with the same name, else creates one.

    Resubmitting a run with the same name therefore never duplicates its MLflow run."""
    c = mlflow_client or client(cfg)
    existing = find_run(cfg, run_name, task, parent_run_id, c)
    if existing is not None:
        run_id = existing.info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id, True
    all_tags = {RUN_NAME_TAG: run_name, TASK_TAG: task, "mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags[PARENT_TAG] = parent_run_id
    run = c.create_run(experiment_id(cfg, c), tags=all_tags, run_name=run_name)
    return run.info.run_id, False


def log_config(mlflow_client, run_id: str, cfg: PipelineConfig, sections: Iterable[str] | None = None) -> None:
    """The resolved config as params (dotted keys) and as ``config.yaml``. Params already logged
    by an earlier attempt of the same run are skipped (MLflow params are immutable)."""
    from mlflow.entities import Param

    existing = mlflow_client.get_run(run_id).data.params
    flat = flatten(redact_values(to_dict(cfg)))
    if sections is not None:
        keep = tuple(f"{s}." for s in sections)
        flat = {k: v for k, v in flat.items() if k.startswith(keep)}
    params = [Param(k, str(v)[:MAX_PARAM_LEN]) for k, v in sorted(flat.items()) if k not in existing]
    for i in range(0, len(params), 100):
        mlflow_client.log_batch(run_id, params=params[i:i + 100])
    log_text(mlflow_client, run_id, config_yaml(cfg), "config.yaml")


def config_yaml(cfg: PipelineConfig) -> str:
    """The resolved config as YAML with every URI redacted (what gets logged or saved)."""
    return to_yaml(redact_values(to_dict(cfg)))


def log_text(mlflow_client, run_id: str, text: str, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp, Path(artifact_file).name)
        path.write_text(text)
        mlflow_client.log_artifact(run_id, str(path), artifact_path=str(Path(artifact_file).parent) if "/" in artifact_file else None)


def log_json(mlflow_client, run_id: str, obj: Any, artifact_file: str) -> None:
    log_text(mlflow_client, run_id, json.dumps(obj, indent=2, sort_keys=True, default=str), artifact_file)


def metric_key(name: str) -> str:
    """``name`` with the characters MLflow refuses in metric, param and tag keys replaced by ``_``
    (class names such as ``"T-shirt/top"`` pass; ``"cat (wild)"`` becomes ``"cat _wild_"``)."""
    return re.sub(r"[^\w\-. /]", "_", str(name))


def log_metrics(mlflow_client, run_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Numeric entries of ``metrics`` at ``step`` (one batch call); keys made MLflow-safe."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if batch:
        mlflow_client.log_batch(run_id, metrics=batch)


def log_dataset_input(mlflow_client, run_id: str, *, name: str, digest: str, source_uri: str,
                      context: str = "training", profile: Mapping[str, Any] | None = None) -> None:
    """The dataset version as an MLflow dataset input (name, manifest digest, storage URI)."""
    from mlflow.data.http_dataset_source import HTTPDatasetSource
    from mlflow.entities import Dataset, DatasetInput, InputTag

    try:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "can be interpreted in multiple ways": same class twice
            source = resolve_dataset_source(source_uri)
    except Exception:  # no registered source for this scheme: keep the URI as an opaque source
        source = HTTPDatasetSource(url=source_uri)
    entity = Dataset(name=name, digest=digest[:36], source_type=source._get_source_type(), source=source.to_json(),
                     profile=json.dumps(dict(profile)) if profile else None)
    tag = InputTag("mlflow.data.context", context)
    mlflow_client.log_inputs(run_id, datasets=[DatasetInput(dataset=entity, tags=[tag])])


def end_run(mlflow_client, run_id: str, status: str = "FINISHED") -> None:
    mlflow_client.set_terminated(run_id, status=status)


def fail_run(mlflow_client, run_id: str) -> None:
    """Mark a run FAILED unless something already ended it.

    A sweep's driver closes a trial that its scheduler stopped as KILLED; the trial's own
    clean-up can arrive after that and must not turn it into FAILED."""
    if mlflow_client.get_run(run_id).info.status == "RUNNING":
        mlflow_client.set_terminated(run_id, status="FAILED")


def latest_model_uri(cfg: PipelineConfig, run_id: str | None = None) -> tuple[str, str | None]:
    """(model URI, training run id) of the training run to score or register: the run ``run_id``;
    else the run the config names (``train.run_name``), which must have finished; else the newest
    finished training run. A config that names its run never picks up another config's model."""
    from mlflow.exceptions import MlflowException

    c = client(cfg)
    name = cfg.train.run_name
    if run_id:
        try:
            run = c.get_run(run_id)
        except MlflowException:
            raise UserError(f"MLflow run {run_id!r} does not exist in {redact_uri(resolve_tracking_uri(cfg))}; pass "
                            "the id of a training run (shown by `python -m pipelines train`) or --model URI") from None
    elif name:
        run = find_run(cfg, name, "train", mlflow_client=c)
        if run is None or run.info.status != "FINISHED":
            state = "does not exist" if run is None else f"has not finished (status {run.info.status})"
            raise UserError(f"training run {name!r} (train.run_name) {state} in MLflow experiment "
                            f"{cfg.mlflow.experiment_name!r}; train it with `python -m pipelines train` and the same "
                            "config, or pass --run-id / --model URI")
    else:
        runs = c.search_runs([experiment_id(cfg, c)],
                             filter_string=f"tags.`{TASK_TAG}` = 'train' and attributes.status = 'FINISHED'",
                             order_by=["attributes.end_time DESC"], max_results=1)
        if not runs:
            raise UserError(f"no finished training run in MLflow experiment {cfg.mlflow.experiment_name!r}; "
                            "run `python -m pipelines train` first or pass --model URI")
        run = runs[0]
    uri = run.data.tags.get("pipeline.model_uri")
    if not uri:
        raise UserError(f"MLflow run {run.info.run_id} has no pipeline.model_uri tag; pass --model URI")
    return uri, run.info.run_id
