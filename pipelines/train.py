"""The train task: a Ray Train V2 ``TorchTrainer`` whose workers run a plain PyTorch loop.

Layers, outermost first:

* :func:`train` (driver): resolves the dataset version, opens (or, for a resubmitted run name,
  reopens) the run's single MLflow run, builds the ``TorchTrainer`` with the Ray Data streams,
  then exports the best checkpoint as a ``vit_model`` directory and logs plots and results.
* :func:`ray_train_loop` (each Ray worker): adapts Ray (``get_dataset_shard``, ``prepare_model``,
  ``get_checkpoint``, ``report``) to a :class:`Session`, and calls ...
* :func:`train_worker` (plain PyTorch): model, optimizer, schedule, mixup, EMA, AMP; one
  ``train_one_epoch`` + ``evaluate`` per epoch; a checkpoint per epoch through the session.
  A test or ``torchrun`` can call it with :class:`LocalSession` and plain batch iterators.

Fault tolerance: every epoch ends in a checkpoint (pickle-free, :mod:`pipelines.checkpoint`) on
``<storage>/train/<run name>/``. ``train.max_failures`` lets Ray restart a lost worker group from
the latest checkpoint; resubmitting a run with the same ``train.run_name`` resumes it from there
(Ray Train restores its checkpoint manager from storage). The epoch restarts from its beginning
with the same shuffle and the same per-epoch RNG seeds, so a resumed run repeats the
uninterrupted run's epochs where the data order allows it (see docs/data.md).

A non-finite loss stops the run (no retry: it would repeat), keeps the last good checkpoint and
raises :class:`TrainingStopped` naming it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch

from vit_model import VisionTransformer, config_from_name, from_pretrained

from . import storage as st
from . import tracking
from .checkpoint import load_model_weights, load_training_state, save_training_state
from .config import PipelineConfig, from_dict, to_dict
from .engine import (
    NonFiniteLossError,
    ModelEma,
    build_grad_scaler,
    build_mixup,
    build_optimizer,
    build_scheduler,
    evaluate,
    reduce_metrics,
    seed_everything,
    train_one_epoch,
)
from .errors import UserError

TASK = "train"
MODEL_DIR = "model"  # <run dir>/model: the exported vit_model directory (what register packages)


class TrainingStopped(UserError):
    """Training stopped on purpose (non-finite loss); the message names the last good checkpoint."""


# --------------------------------------------------------------------------------------------
# What a worker needs (plain data, sent to Ray workers)
# --------------------------------------------------------------------------------------------


@dataclass
class WorkerSpec:
    config: dict[str, Any]  # to_dict(PipelineConfig)
    model_config: dict[str, Any]  # ViTConfig.to_dict()
    class_names: list[str]
    train_count: int
    val_count: int
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    pretrained: str | None = None
    threads: int = 1

    @property
    def cfg(self) -> PipelineConfig:
        return from_dict(PipelineConfig, self.config)


def model_config_for(cfg: PipelineConfig, num_classes: int, channels: int, image_hw: tuple[int, int] | None):
    """The ViTConfig for ``model.*`` on a dataset (its classes, channels and image size)."""
    m = cfg.model
    img_size = m.img_size or (image_hw if image_hw and image_hw[0] != image_hw[1] else (image_hw[0] if image_hw else None))
    overrides = dict(
        img_size=img_size, patch_size=m.patch_size, embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio, global_pool=m.global_pool, in_chans=channels, num_classes=num_classes,
        drop_rate=m.drop_rate, attn_drop_rate=m.attn_drop_rate, drop_path_rate=m.drop_path_rate,
    )
    try:
        return config_from_name(m.name, **overrides)
    except ValueError as exc:
        raise UserError(f"model settings are invalid: {exc}") from None


def build_model(spec: WorkerSpec) -> VisionTransformer:
    from vit_model import ViTConfig

    vit_cfg = ViTConfig.from_dict(spec.model_config)
    if spec.pretrained:
        return from_pretrained(spec.pretrained, num_classes=vit_cfg.num_classes, img_size=vit_cfg.img_size,
                               in_chans=vit_cfg.in_chans, drop_path_rate=vit_cfg.drop_path_rate)
    return VisionTransformer(vit_cfg)


# --------------------------------------------------------------------------------------------
# The worker loop (plain PyTorch) and its sessions
# --------------------------------------------------------------------------------------------


class Session(Protocol):
    """What the loop needs from its launcher (Ray Train, or nothing)."""

    rank: int
    world_size: int
    device: torch.device

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module: ...
    def restored_checkpoint(self) -> contextlib.AbstractContextManager[str | None]: ...
    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None: ...


@dataclass
class EpochData:
    """Batches for the loop: ``train(epoch)`` and ``val()`` each return a fresh iterable."""

    train: Callable[[int], Iterable]
    val: Callable[[], Iterable]


@dataclass
class LocalSession:
    """Single process, no Ray: checkpoints go to ``checkpoint_root/epoch-NNN`` when given."""

    checkpoint_root: str | None = None
    resume_from: str | None = None
    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    reports: list[dict[str, Any]] = field(default_factory=list)

    def prepare_model(self, model):
        return model.to(self.device)

    @contextlib.contextmanager
    def restored_checkpoint(self):
        yield self.resume_from

    def report(self, metrics, checkpoint_dir):
        self.reports.append(dict(metrics))
        if checkpoint_dir and self.checkpoint_root:
            import shutil

            dst = Path(self.checkpoint_root, f"epoch-{metrics['epoch']:03d}")
            shutil.copytree(checkpoint_dir, dst, dirs_exist_ok=True)


def epoch_seed(seed: int, epoch: int) -> int:
    """Per-epoch seed: dropout/mixup randomness of epoch e is the same in a resumed run."""
    return seed * 1_000_003 + epoch


def train_worker(spec: WorkerSpec, data: EpochData, session: Session) -> dict[str, Any]:
    """Train ``spec`` on ``data`` for ``train.epochs`` epochs; returns the run summary.

    Every rank calls ``session.report`` once per epoch (rank 0 with the checkpoint). Metrics are
    global (all-reduced). Rank 0 also logs them to the MLflow run in ``spec``.
    """
    cfg = spec.cfg
    tc = cfg.train
    torch.set_num_threads(max(1, spec.threads))
    seed_everything(tc.seed, session.rank)
    device = session.device
    model = build_model(spec)
    model = session.prepare_model(model)
    optimizer = build_optimizer(model, tc)
    per_worker_batch = max(1, tc.batch_size // session.world_size)
    steps_per_epoch = max(1, math.ceil(spec.train_count / session.world_size / per_worker_batch))
    if tc.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, tc.limit_train_batches)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    mixup = build_mixup(tc, len(spec.class_names))
    ema = ModelEma(model, tc.ema_decay) if tc.ema_decay > 0 else None
    scaler = build_grad_scaler(tc.precision, device)

    start_epoch, history, restarts = 0, [], 0
    with session.restored_checkpoint() as ckpt_dir:
        if ckpt_dir:
            state = load_training_state(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                        scaler=scaler, restore_rng=False)
            start_epoch = int(state["epoch"]) + 1
            history = list(state["metrics"].get("history", []))
            restarts = int(state["metrics"].get("restarts", 0)) + 1

    logger = _Rank0Logger(spec) if session.rank == 0 else None
    summary: dict[str, Any] = {"restarts": restarts, "resumed_from_epoch": start_epoch - 1 if restarts else None,
                               "stopped": None, "epochs_run": 0}
    try:
        for epoch in range(start_epoch, tc.epochs):
            seed_everything(epoch_seed(tc.seed, epoch), session.rank)
            t0 = time.perf_counter()
            try:
                tr = train_one_epoch(model, data.train(epoch), optimizer, scheduler, tc, device=device, epoch=epoch,
                                     mixup=mixup, ema=ema, scaler=scaler, limit_batches=tc.limit_train_batches)
            except NonFiniteLossError as exc:
                summary["stopped"] = str(exc)
                session.report({"epoch": epoch, "stopped": 1.0, "restarts": restarts}, None)
                if logger:
                    logger.stopped(str(exc))
                break
            tr = reduce_metrics(tr)
            eval_model = ema.module if ema is not None else model
            val = reduce_metrics(evaluate(eval_model, data.val(), device=device, num_classes=len(spec.class_names),
                                          precision=tc.precision, limit_batches=tc.limit_val_batches))
            row = {
                "epoch": epoch, "train_loss": tr["train_loss"], "val_loss": val["loss"], "val_acc": val["acc1"],
                "lr": tr["lr"], "images_per_s": tr["images"] / max(tr["seconds"], 1e-9),
                "epoch_seconds": time.perf_counter() - t0, "train_images": tr["images"], "val_images": val["count"],
                "restarts": restarts,
            }
            if "acc5" in val:
                row["val_acc5"] = val["acc5"]
            history.append(row)
            with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
                ckpt = None
                if session.rank == 0:
                    ckpt = str(save_training_state(
                        Path(tmp, "state"), model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                        scaler=scaler, epoch=epoch, step=scheduler.last_epoch,
                        metrics={"history": history, "confusion": val["confusion"], "restarts": restarts},
                        config_dict=spec.config))
                    if logger:
                        logger.epoch(row)
                session.report(row, ckpt)
            summary["epochs_run"] += 1
    finally:
        if logger:
            logger.close()
    summary["history"] = history
    return summary


class _Rank0Logger:
    """Per-epoch metrics and system metrics into the run's MLflow run (rank 0 only)."""

    def __init__(self, spec: WorkerSpec):
        self.client = self.monitor = None
        if not (spec.mlflow_run_id and spec.tracking_uri):
            return
        from mlflow.tracking import MlflowClient

        self.run_id = spec.mlflow_run_id
        self.client = MlflowClient(tracking_uri=spec.tracking_uri)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            os.environ.setdefault("MLFLOW_TRACKING_URI", spec.tracking_uri)
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, samples_before_logging=1)
            self.monitor.start()
        except Exception:  # system metrics are best effort (psutil missing, unsupported platform)
            self.monitor = None

    def epoch(self, row: dict[str, Any]) -> None:
        if self.client:
            tracking.log_metrics(self.client, self.run_id, {k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def stopped(self, message: str) -> None:
        if self.client:
            self.client.set_tag(self.run_id, "pipeline.stopped", message[:5000])

    def close(self) -> None:
        if self.monitor is not None:
            with contextlib.suppress(Exception):
                self.monitor.finish()


# --------------------------------------------------------------------------------------------
# Ray Train edge
# --------------------------------------------------------------------------------------------


class RaySession:
    def __init__(self):
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world_size = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()

    def prepare_model(self, model):
        import ray.train.torch

        return ray.train.torch.prepare_model(model)

    @contextlib.contextmanager
    def restored_checkpoint(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield str(Path(d, "state")) if Path(d, "state").is_dir() else d

    def report(self, metrics, checkpoint_dir):
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(str(Path(checkpoint_dir).parent)) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)


def ray_train_loop(config: dict[str, Any]) -> dict[str, Any]:
    """``train_loop_per_worker`` for TorchTrainer."""
    import ray.train

    from .data.stream import iter_epoch

    spec = WorkerSpec(**config["spec"])
    session = RaySession()
    per_worker = max(1, spec.cfg.train.batch_size // session.world_size)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    data = EpochData(
        train=lambda epoch: iter_epoch(train_shard, per_worker, device=session.device),
        val=lambda: iter_epoch(val_shard, per_worker, device=session.device),
    )
    return train_worker(spec, data, session)


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


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


def ensure_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` / RAY_ADDRESS, or start a local cluster (loopback only)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # read when ray is first imported
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    ray.init(num_cpus=cfg.ray.num_cpus or max(4, os.cpu_count() or 1), include_dashboard=cfg.ray.include_dashboard,
             dashboard_host="127.0.0.1", _node_ip_address="127.0.0.1", configure_logging=False)


def ray_storage(cfg: PipelineConfig, subdir: str) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for a Train/Tune RunConfig at ``<storage.uri>/<subdir>``."""
    uri = st.join_uri(cfg.storage.uri, subdir)
    local = st.local_path(uri)
    if local is not None:
        os.makedirs(local, exist_ok=True)
        return local, None
    fs, path = st.resolve(uri, cfg.storage)
    return path, fs


def _scaling_config(cfg: PipelineConfig):
    import ray
    from ray.train import ScalingConfig

    tc = cfg.train
    use_gpu = tc.use_gpu if tc.use_gpu is not None else ray.cluster_resources().get("GPU", 0) > 0
    resources = {"CPU": tc.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return ScalingConfig(num_workers=tc.num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def build_trainer(cfg: PipelineConfig, spec: WorkerSpec, version, run_name: str, start_epoch: int = 0,
                  callbacks: list | None = None):
    """The TorchTrainer for one training run (used by :func:`train` and the Tune trials)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from .data.stream import build_dataset, train_data_config

    storage_path, fs = ray_storage(cfg, "train")
    datasets = {"train": build_dataset(version, "train", cfg, start_epoch=start_epoch),
                "val": build_dataset(version, "val", cfg, train=False)}
    run_config = RunConfig(
        name=run_name, storage_path=storage_path, storage_filesystem=fs,
        failure_config=FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=CheckpointConfig(num_to_keep=max(1, cfg.train.keep_checkpoints),
                                           checkpoint_score_attribute="val_acc", checkpoint_score_order="max"),
        callbacks=callbacks or None,
    )
    return TorchTrainer(ray_train_loop, train_loop_config={"spec": dataclasses.asdict(spec)},
                        scaling_config=_scaling_config(cfg), run_config=run_config, datasets=datasets,
                        dataset_config=train_data_config(cfg))


def _resume_epoch(cfg: PipelineConfig, run_name: str) -> int:
    """The epoch a resubmitted run restarts at (0 for a new run), read from its checkpoints."""
    base = st.join_uri(cfg.storage.uri, "train", run_name)
    latest = -1
    try:
        for d in st.list_dirs(base, cfg.storage):
            if d.startswith("checkpoint_"):
                state_uri = st.join_uri(base, d, "state", "state.json")
                if st.exists(state_uri, cfg.storage):
                    latest = max(latest, int(st.read_json(state_uri, cfg.storage)["epoch"]))
    except st.ObjectNotFound:
        return 0
    return latest + 1


def make_spec(cfg: PipelineConfig, version, mlflow_run_id: str | None) -> WorkerSpec:
    vit_cfg = model_config_for(cfg, version.num_classes, version.channels, version.image_size)
    return WorkerSpec(
        config=to_dict(cfg), model_config=vit_cfg.to_dict(), class_names=version.classes,
        train_count=version.count("train"), val_count=version.count("val"), mlflow_run_id=mlflow_run_id,
        tracking_uri=tracking.resolve_tracking_uri(cfg) if mlflow_run_id else None,
        pretrained=cfg.model.pretrained, threads=max(1, int(round(cfg.train.cpus_per_worker))),
    )


def train(cfg: PipelineConfig, *, version=None, run_name: str | None = None, parent_run_id: str | None = None,
          callbacks: list | None = None) -> TrainResult:
    """Run one training on Ray; returns where its model, checkpoints and MLflow run are."""
    from .data.shards import dataset_from_config

    t0 = time.time()
    version = version or dataset_from_config(cfg)
    run_name = run_name or default_run_name(cfg, version.version)
    client = tracking.client(cfg)
    run_id, resumed = tracking.start_or_resume_run(cfg, run_name, TASK, tags={"dataset.version": version.version},
                                                   parent_run_id=parent_run_id, mlflow_client=client)
    if not resumed:
        tracking.log_config(client, run_id, cfg)
        tracking.log_dataset_input(client, run_id, name=version.name, digest=version.version, source_uri=version.uri,
                                   profile={"counts": {s: version.count(s) for s in version.splits}})
    spec = make_spec(cfg, version, run_id)
    ensure_ray(cfg)
    try:
        trainer = build_trainer(cfg, spec, version, run_name, start_epoch=_resume_epoch(cfg, run_name),
                                callbacks=callbacks)
        result = trainer.fit()
    except BaseException:
        tracking.end_run(client, run_id, "FAILED")
        raise
    summary = result.return_value or {}
    if result.error is not None:
        tracking.end_run(client, run_id, "FAILED")
        raise result.error
    run_uri = st.join_uri(cfg.storage.uri, "train", run_name)
    latest = result.checkpoint.path if result.checkpoint else None
    if summary.get("stopped"):
        tracking.end_run(client, run_id, "FAILED")
        where = f"the last good checkpoint is {checkpoint_uri(cfg, latest)}" if latest else "no checkpoint was written"
        raise TrainingStopped(f"training {run_name!r} stopped: {summary['stopped'].split(';')[0]}; {where}")
    if not result.best_checkpoints:
        tracking.end_run(client, run_id, "FAILED")
        raise UserError(f"training {run_name!r} finished without a checkpoint; check train.epochs (>= 1)")
    best_ckpt, best_metrics = max(result.best_checkpoints, key=lambda cm: cm[1].get("val_acc", -1.0))
    model_uri = st.join_uri(run_uri, MODEL_DIR)
    with best_ckpt.as_directory() as d:
        history = export_model(Path(d, "state"), spec, version, model_uri, cfg, use_ema=cfg.train.ema_decay > 0)
    out = TrainResult(
        run_name=run_name, mlflow_run_id=run_id, run_uri=run_uri, model_uri=model_uri,
        best_checkpoint_uri=checkpoint_uri(cfg, best_ckpt.path), latest_checkpoint_uri=checkpoint_uri(cfg, latest),
        metrics={k: v for k, v in best_metrics.items() if isinstance(v, (int, float))},
        history=summary.get("history") or history, restarts=int(summary.get("restarts", 0)),
        dataset_uri=version.uri, dataset_version=version.version, seconds=time.time() - t0,
    )
    _log_outputs(client, run_id, out, best_ckpt, version.classes)
    tracking.end_run(client, run_id, "FINISHED")
    return out


def checkpoint_uri(cfg: PipelineConfig, ray_path: str | None) -> str | None:
    """A checkpoint path as Ray reports it (a filesystem path) as a storage URI."""
    if ray_path is None:
        return None
    if st.is_s3(cfg.storage.uri):
        return f"s3://{ray_path.lstrip('/')}" if "://" not in ray_path else ray_path
    return Path(ray_path).as_uri() if "://" not in ray_path else ray_path


def export_model(state_dir: Path, spec: WorkerSpec, version, model_uri: str, cfg: PipelineConfig,
                 use_ema: bool) -> list[dict[str, Any]]:
    """Write the checkpoint's weights (EMA when used for validation) as a vit_model directory
    with its preprocessing and class names, then upload it; returns the checkpoint's history."""
    from .data.stream import stream_spec

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
        upload_dir(tmp, model_uri, cfg)
    return list((state.get("metrics") or {}).get("history", []))


def upload_dir(local_dir: str, uri: str, cfg: PipelineConfig, last: str = "config.json") -> None:
    """Copy a flat local directory to ``uri``; ``last`` is written last (the completeness marker)."""
    names = sorted(os.listdir(local_dir), key=lambda n: (n == last, n))
    for name in names:
        st.write_bytes(st.join_uri(uri, name), Path(local_dir, name).read_bytes(), cfg.storage)


def _log_outputs(client, run_id: str, result: TrainResult, best_ckpt, class_names: list[str]) -> None:
    """curves.png, confusion_matrix.png (best epoch, validation), train_result.json, tags."""
    from .plots import plot_confusion, plot_curves

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


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    result = train(cfg)
    m = result.metrics
    print(f"run {result.run_name}: best val_acc {m.get('val_acc', float('nan')):.4f} at epoch {m.get('epoch')}, "
          f"{len(result.history)} epochs, {result.restarts} restart(s), {result.seconds:.0f} s")
    print(f"mlflow run: {result.mlflow_run_id}")
    print(f"best checkpoint: {result.best_checkpoint_uri}")
    print(f"model: {result.model_uri}")
    return 0
