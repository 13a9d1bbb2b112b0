"""One Ray Train run from the driver: build the ``TorchTrainer``, fit, export the best model.

:func:`fit` is what the ``train`` task and every Tune trial run: it opens (or, for a resubmitted
run name, reopens) the run's single MLflow run, builds the trainer over the Ray Data streams,
then exports the best checkpoint as a ``vit_model`` directory (``<storage>/train/<run>/model``)
and logs plots and results. Fault tolerance and resume semantics: docs/training.md.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import console, tracking
from . import storage as st
from .architecture import arch_to_dict, model_arch
from .checkpoint import load_model_weights, resume_position
from .config import PipelineConfig, StorageConfig, flatten, to_dict
from .data.shards import DatasetVersion, verify_split
from .data.stream import EXACT, RAY_DATA, build_dataset, check_seekable, stream_spec, train_data_config, train_order
from .errors import UserError
from .plots import plot_confusion, plot_curves
from .ray_setup import checkpoint_uri, ensure_ray, ray_storage
from .train_worker import CHECKPOINT_SCORE, MID_EPOCH, WorkerSpec, build_model, ray_train_loop

TASK = "train"  # the MLflow task tag of training runs
MODEL_DIR = "model"  # <run dir>/model: the exported vit_model directory (what register packages)


class TrainingStopped(UserError):
    """Training stopped on purpose (non-finite loss); the message names the last good checkpoint."""


@dataclass
class TrainResult:
    run_name: str
    mlflow_run_id: str | None
    run_uri: str  # <storage>/train/<run name>
    model_uri: str  # exported vit_model directory of the best checkpoint
    best_checkpoint_uri: str | None
    latest_checkpoint_uri: str | None
    metrics: dict[str, Any]  # best epoch's metrics
    history: list[dict[str, Any]]
    restarts: int
    dataset_uri: str
    dataset_version: str
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def default_run_name(cfg: PipelineConfig, dataset_version: str) -> str:
    return cfg.train.run_name or f"{cfg.data.name}-{dataset_version[:8]}-{time.strftime('%Y%m%d-%H%M%S')}"


def _scaling_config(cfg: PipelineConfig):
    import ray  # here, not at the top: importing Ray costs seconds
    from ray.train import ScalingConfig

    tc = cfg.train
    use_gpu = tc.use_gpu if tc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": tc.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def epoch_metrics_callbacks(spec: WorkerSpec) -> list:
    """A Ray Train callback (it runs in the Train controller, on the driver's side of a node loss)
    that logs each epoch's metrics to the run's MLflow run when the controller takes the report,
    together with its checkpoint. An epoch that a restarted worker group repeats was never taken,
    so MLflow holds every epoch exactly once."""
    if not (spec.mlflow_run_id and spec.tracking_uri):
        return []
    from ray.train import UserCallback  # here, not at the top: importing Ray costs seconds

    class EpochMetricsToMlflow(UserCallback):
        def __init__(self, tracking_uri: str, run_id: str):
            self.tracking_uri, self.run_id, self._client = tracking_uri, run_id, None

        def __getstate__(self):
            return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "_client": None}

        def after_report(self, run_context, metrics, checkpoint):
            row = metrics[0] if metrics else {}
            if "val_acc" not in row or row.get("stopped") or row.get(MID_EPOCH):  # one row per epoch
                return
            if self._client is None:
                from mlflow.tracking import MlflowClient

                self._client = MlflowClient(tracking_uri=self.tracking_uri)
            tracking.log_metrics(self._client, self.run_id,
                                 {k: v for k, v in row.items() if k not in ("epoch", CHECKPOINT_SCORE)},
                                 step=int(row["epoch"]))

    return [EpochMetricsToMlflow(spec.tracking_uri, spec.mlflow_run_id)]


def tune_report_callback():
    """Ray Tune's ``TuneReportCallback`` for epoch reports only: a mid-epoch checkpoint's report
    (no validation) is not a Tune result, so ASHA's ``training_iteration`` stays the epoch count."""
    from ray.tune.integration.ray_train import TuneReportCallback  # here: only Tune trials need it

    class EpochTuneReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get(MID_EPOCH):
                return
            super().after_report(run_context, metrics, checkpoint)

    return EpochTuneReport()


def build_trainer(cfg: PipelineConfig, spec: WorkerSpec, version, run_name: str, start_epoch: int = 0,
                  callbacks: list | None = None):
    """The TorchTrainer for one training run (used by :func:`train` and the Tune trials)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    storage_path, fs = ray_storage(cfg, "train")
    exact = spec.data_order == EXACT
    mid_epoch = cfg.train.checkpoint_every_steps is not None
    datasets = {}
    if exact:  # the workers hold "train" and "val" themselves (SeekableStream): no Ray Data execution
        for split in ("train", "val"):
            check_seekable(version, split, cfg)
            verify_split(version, split, cfg.storage)
    else:
        datasets["val"] = build_dataset(version, "val", cfg, train=False)
        datasets["train"] = build_dataset(version, "train", cfg, start_epoch=start_epoch)
    resume_at = functools.partial(latest_epoch_plus_one, cfg.storage.uri, run_name, cfg.storage)
    run_config = RunConfig(
        name=run_name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        # mid-epoch checkpoints have no val_acc: they are ranked by CHECKPOINT_SCORE, below every epoch's
        checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints),
                                           checkpoint_score_attribute=CHECKPOINT_SCORE if mid_epoch else "val_acc",
                                           checkpoint_score_order="max"),
        callbacks=[*(callbacks or []), *epoch_metrics_callbacks(spec), *console.train_callbacks(cfg.train.epochs)],
    )
    return TorchTrainer(ray_train_loop, train_loop_config={"spec": dataclasses.asdict(spec)},
                        scaling_config=_scaling_config(cfg), run_config=run_config, datasets=datasets,
                        dataset_config=train_data_config(cfg, resume_epoch=resume_at))


# A run's settings: what it computes. Resuming a run needs all of them unchanged; --continue may
# change the hyperparameters below (the schedule is rebuilt); anything else is a new run.
_NOT_RUN_SETTINGS = ("train.run_name", "train.max_failures", "train.keep_checkpoints", "train.use_gpu",
                     "train.checkpoint_every_steps", "train.record_sample_ids")
CONTINUE_SETTINGS = ("train.epochs", "train.lr", "train.min_lr", "train.weight_decay", "train.warmup_epochs",
                     "train.label_smoothing", "train.mixup_alpha", "train.cutmix_alpha", "train.clip_grad_norm",
                     "train.limit_train_batches", "train.limit_val_batches")


def run_settings(config: dict[str, Any], dataset_version: str | None, data_order: str | None = None) -> dict[str, Any]:
    """The flat settings that define what a training run computes (model, train, augmentation,
    data order, dataset version), from a config dict as checkpoints store it. ``data_order`` is
    the run's resolved :func:`~pipelines.data.stream.train_order`; without it (checkpoints from
    before ``data.stream``) it is derived from ``train.checkpoint_every_steps`` as it was then."""
    flat = flatten(config)
    keep = {k: v for k, v in flat.items()
            if k.startswith(("model.", "train.", "data.augment.")) and k not in _NOT_RUN_SETTINGS
            and v != {}}  # an empty mapping (model.args) is the absence of its keys
    keep.update({"data.shuffle": flat.get("data.shuffle"), "data.equal_shards": flat.get("data.equal_shards")})
    # how the train split reaches the workers (data.stream, resolved) decides the data order; how
    # often a run checkpoints does not change what it computes
    keep["data.order"] = data_order or (EXACT if flat.get("train.checkpoint_every_steps") is not None else RAY_DATA)
    if dataset_version:
        keep["dataset.version"] = dataset_version
    return keep


@dataclass
class ResumePoint:
    epoch: int  # the first epoch to run: 0 for a new run
    changed: dict[str, tuple[Any, Any]]  # setting -> (the run's value, this config's value)
    samples: int = 0  # rows per rank of `epoch` already trained on (a mid-epoch checkpoint)


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of the checkpoints it registered


def latest_checkpoint_state(storage_uri: str, run_name: str, storage: StorageConfig) -> dict[str, Any] | None:
    """``state.json`` of the newest checkpoint of a training run that Ray Train *registered*, or None.

    Ray Train V2 registers a round of reports only when every rank's report arrived, so a worker
    lost in between leaves a checkpoint folder on storage that the restarted group does not resume
    from; its snapshot names the latest registered one. Without a snapshot (a run of another
    layout) the newest folder on storage is taken."""
    base = st.join_uri(storage_uri, "train", run_name)
    try:
        snapshot = st.read_json(st.join_uri(base, SNAPSHOT), storage)
    except st.ObjectNotFound:
        snapshot = None
    if isinstance(snapshot, dict):
        latest = snapshot.get("latest_checkpoint_result") or {}
        name = latest.get("checkpoint_dir_name") if isinstance(latest, dict) else None
        if not name:
            return None
        try:
            return st.read_json(st.join_uri(base, name, "state", "state.json"), storage)
        except st.ObjectNotFound:
            return None
    newest: dict[str, Any] | None = None
    try:
        for d in st.list_dirs(base, storage):
            state_uri = st.join_uri(base, d, "state", "state.json")
            if d.startswith("checkpoint_") and st.exists(state_uri, storage):
                state = st.read_json(state_uri, storage)
                if newest is None or _progress(state) > _progress(newest):
                    newest = state
    except st.ObjectNotFound:
        pass
    return newest


def _progress(state: dict[str, Any]) -> tuple[int, int]:
    """Orders a run's checkpoints: by epoch, then global step (a mid-epoch checkpoint of epoch e
    comes after epoch e-1's and before epoch e's own)."""
    return int(state["epoch"]), int(state.get("step", 0))


def latest_epoch_plus_one(storage_uri: str, run_name: str, storage: StorageConfig) -> int:
    """The epoch a (re)started worker group of the run resumes at: 0 before any checkpoint; the
    checkpoint's own epoch when it was taken mid-epoch."""
    state = latest_checkpoint_state(storage_uri, run_name, storage)
    return 0 if state is None else resume_position(state)[0]


def resume_point(cfg: PipelineConfig, run_name: str, version: DatasetVersion) -> ResumePoint:
    """Where a resubmitted run restarts, and which of its settings this config changes, read
    from its newest checkpoint on storage (epoch 0 and no changes for a new run)."""
    latest = latest_checkpoint_state(cfg.storage.uri, run_name, cfg.storage)
    if latest is None:
        return ResumePoint(0, {})
    saved_version = (latest.get("metrics") or {}).get("dataset_version")
    saved_order = (latest.get("metrics") or {}).get("data_order")
    before = run_settings(latest.get("config") or {}, saved_version, saved_order)
    now = run_settings(to_dict(cfg), version.version if saved_version else None,
                       train_order(version, cfg) if saved_order else None)
    changed = {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)}
    epoch, samples = resume_position(latest)
    return ResumePoint(epoch, changed, samples)


def check_resume(run_name: str, point: ResumePoint, extend: bool) -> None:
    """A resume continues the same run exactly; ``extend`` (--continue) may change only
    :data:`CONTINUE_SETTINGS`. Anything else is refused in one line."""
    if not point.changed:
        return
    shown = ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in list(point.changed.items())[:4])
    more = f" and {len(point.changed) - 4} more" if len(point.changed) > 4 else ""
    fixed = [k for k in point.changed if k not in CONTINUE_SETTINGS]
    if extend and not fixed:
        return
    if fixed:
        how = (f"{', '.join(fixed[:3])} cannot change within a run: pick a new train.run_name for a new run, "
               "or resume it with its own settings")
    else:
        how = ("resume it with its own settings, pick a new train.run_name for a new run, or pass --continue to "
               "extend it with these hyperparameters (the schedule is recomputed)")
    where = (f"checkpointed in epoch {point.epoch} after {point.samples} samples per worker" if point.samples
             else f"checkpointed at epoch {point.epoch - 1}")
    raise UserError(f"training run {run_name!r} ({where}) was started with other settings: {shown}{more}; {how}")


def make_spec(cfg: PipelineConfig, version, mlflow_run_id: str | None, extend: bool = False,
              run_name: str = "") -> WorkerSpec:
    pretrained = cfg.model.pretrained
    if pretrained and "://" not in pretrained and not pretrained.startswith("hf-hub:") and not Path(pretrained).exists():
        raise UserError(f"model.pretrained={pretrained!r} does not exist; give a vit_model directory, a weights file, "
                        "an hf-hub:ORG/NAME id, or null to train from scratch")
    arch = model_arch(cfg, version.num_classes, version.channels, version.image_size)
    return WorkerSpec(
        config=to_dict(cfg), model_config=arch_to_dict(arch), class_names=version.classes,
        train_count=version.count("train"), val_count=version.count("val"), mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking.resolve_tracking_uri(cfg) if mlflow_run_id else None,
        pretrained=cfg.model.pretrained, threads=max(1, int(round(cfg.train.cpus_per_worker))),
        dataset_version=version.version, extend=extend, log_epochs=False, dataset_uri=version.uri, run_name=run_name,
        data_order=train_order(version, cfg),
    )


def fit(cfg: PipelineConfig, version: DatasetVersion, *, run_name: str | None = None,
        parent_run_id: str | None = None, callbacks: list | None = None, extend: bool = False) -> TrainResult:
    """Run one training on Ray; returns where its model, checkpoints and MLflow run are.

    A ``run_name`` that already has checkpoints is resumed, provided this config computes the
    same run (:func:`check_resume`); ``extend`` lets it continue with new hyperparameters."""
    t0 = time.time()
    run_name = run_name or default_run_name(cfg, version.version)
    point = resume_point(cfg, run_name, version)
    check_resume(run_name, point, extend)
    client = tracking.client(cfg)
    run_id, resumed = tracking.start_or_resume_run(cfg, run_name, TASK, tags={"dataset.version": version.version},
                                                   parent_run_id=parent_run_id, mlflow_client=client)
    if not resumed:
        tracking.log_config(client, run_id, cfg)
        tracking.log_dataset_input(client, run_id, name=version.name, digest=version.version, source_uri=version.uri,
                                   profile={"counts": {s: version.count(s) for s in version.splits}})
    elif point.changed:  # --continue: params are immutable, so the new values go to tags and a config file
        tag = f"pipeline.continued.epoch_{point.epoch}"
        client.set_tag(run_id, tag, json.dumps({k: b for k, (_, b) in point.changed.items()}, default=str)[:5000])
        tracking.log_text(client, run_id, tracking.config_yaml(cfg), f"config-continued-epoch{point.epoch}.yaml")
    spec = make_spec(cfg, version, run_id, extend=bool(point.changed), run_name=run_name)
    ensure_ray(cfg)
    try:
        trainer = build_trainer(cfg, spec, version, run_name, start_epoch=point.epoch, callbacks=callbacks)
        result = trainer.fit()
    except BaseException:  # also a sweep scheduler stopping this trial: do not overwrite its KILLED
        tracking.fail_run(client, run_id)
        raise
    summary = result.return_value or {}
    if result.error is not None:
        tracking.end_run(client, run_id, "FAILED")
        raise result.error
    if summary.get("user_error"):
        tracking.end_run(client, run_id, "FAILED")
        raise UserError(summary["user_error"])
    run_uri = st.join_uri(cfg.storage.uri, "train", run_name)
    latest = result.checkpoint.path if result.checkpoint else None
    if summary.get("stopped"):
        tracking.end_run(client, run_id, "FAILED")
        where = f"the last good checkpoint is {checkpoint_uri(cfg, latest)}" if latest else "no checkpoint was written"
        raise TrainingStopped(f"training {run_name!r} stopped: {summary['stopped'].split(';')[0]}; {where}")
    epoch_checkpoints = [(c, m) for c, m in result.best_checkpoints if not m.get(MID_EPOCH)]
    if not epoch_checkpoints:
        tracking.end_run(client, run_id, "FAILED")
        raise UserError(f"training {run_name!r} finished without a checkpoint; check train.epochs (>= 1)")
    best_ckpt, best_metrics = max(epoch_checkpoints, key=lambda cm: cm[1].get("val_acc", -1.0))
    model_uri = st.join_uri(run_uri, MODEL_DIR)
    with best_ckpt.as_directory() as d:
        history = export_model(Path(d, "state"), spec, version, model_uri, cfg, use_ema=cfg.train.ema_decay > 0)
    out = TrainResult(
        run_name=run_name, mlflow_run_id=run_id, run_uri=run_uri, model_uri=model_uri,
        best_checkpoint_uri=checkpoint_uri(cfg, best_ckpt.path), latest_checkpoint_uri=checkpoint_uri(cfg, latest),
        metrics={k: v for k, v in best_metrics.items() if isinstance(v, (int, float)) and k != CHECKPOINT_SCORE},
        history=summary.get("history") or history, restarts=int(summary.get("restarts", 0)),
        dataset_uri=version.uri, dataset_version=version.version, seconds=time.time() - t0,
    )
    _log_outputs(client, run_id, out, best_ckpt, version.classes)
    tracking.end_run(client, run_id, "FINISHED")
    return out


def export_model(state_dir: Path, spec: WorkerSpec, version, model_uri: str, cfg: PipelineConfig,
                 use_ema: bool) -> list[dict[str, Any]]:
    """Write the checkpoint's weights (EMA when used for validation) as a vit_model directory
    with its preprocessing and class names, then upload it; returns the checkpoint's history."""
    model = build_model(dataclasses.replace(spec, pretrained=None))
    state = load_model_weights(state_dir, model, ema=use_ema)
    eval_spec = stream_spec(version, cfg, train=False)
    meta = {
        "class_names": version.classes, "channels": version.channels,
        "image_size": list(eval_spec.size),
        "mean": eval_spec.mean.flatten().tolist(), "std": eval_spec.std.flatten().tolist(),
        "dataset": {"name": version.name, "version": version.version, "uri": version.uri},
        "epoch": state.get("epoch"), "metrics": ((state.get("metrics") or {}).get("history") or [{}])[-1],
        "mlflow_run_id": spec.mlflow_run_id,
    }
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, meta=meta)
        st.upload_dir(tmp, model_uri, cfg.storage, last="config.json")  # config.json marks it complete
    return list((state.get("metrics") or {}).get("history", []))


def _log_outputs(client, run_id: str, result: TrainResult, best_ckpt, class_names: list[str]) -> None:
    """curves.png, confusion_matrix.png (best epoch, validation), train_result.json, tags."""
    with tempfile.TemporaryDirectory() as tmp:
        if result.history:
            client.log_artifact(run_id, str(plot_curves(result.history, Path(tmp, "curves.png"))))
        with best_ckpt.as_directory() as d:
            state = json.loads(Path(d, "state", "state.json").read_text())
        confusion = (state.get("metrics") or {}).get("confusion")
        if confusion:
            path = plot_confusion(confusion, class_names, Path(tmp, "confusion_matrix.png"),
                                  title=f"validation, epoch {state.get('epoch')}")
            client.log_artifact(run_id, str(path))
    tracking.log_json(client, run_id, result.to_dict(), "train_result.json")
    for key, value in (("model_uri", result.model_uri), ("best_checkpoint_uri", result.best_checkpoint_uri),
                       ("restarts", str(result.restarts))):
        if value is not None:
            client.set_tag(run_id, f"pipeline.{key}", value)
    tracking.log_metrics(client, run_id, {f"best_{k}": v for k, v in result.metrics.items() if k.startswith("val_")},
                         step=int(result.metrics.get("epoch", 0)))
