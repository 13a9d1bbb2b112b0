"""The training worker: a plain PyTorch loop, and the thin Ray Train edge that calls it.

:func:`train_worker` takes a :class:`WorkerSpec` (plain data), an :class:`EpochData` (batches per
epoch) and a :class:`Session` (rank, device, checkpoint restore, report): model, optimizer,
schedule, mixup, EMA and AMP from :mod:`pipelines.engine`, one epoch + validation + checkpoint per
loop. A test or ``torchrun`` calls it with :class:`LocalSession`; Ray Train calls
:func:`ray_train_loop`, which adapts ``get_dataset_shard``/``prepare_model``/``report``. This module
runs on Ray workers: it imports neither MLflow (rank 0 imports it when it logs) nor the driver.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn as nn

from . import tracking
from .architecture import arch_from_dict, pretrained_model
from .architecture import build_model as new_model
from .checkpoint import load_training_state, save_training_state
from .config import PipelineConfig, from_dict
from .data.stream import iter_epoch
from .engine import (
    ModelEma,
    NonFiniteLossError,
    build_grad_scaler,
    build_mixup,
    build_optimizer,
    build_scheduler,
    continue_schedule,
    evaluate,
    reduce_metrics,
    seed_everything,
    train_one_epoch,
)
from .errors import UserError


@dataclass
class WorkerSpec:
    config: dict[str, Any]  # to_dict(PipelineConfig)
    model_config: dict[str, Any]  # vit_model.arch_to_dict(architecture): {"family", "config"}
    class_names: list[str]
    train_count: int
    val_count: int
    mlflow_run_id: str | None = None
    tracking_uri: str | None = None
    pretrained: str | None = None
    threads: int = 1
    dataset_version: str = ""  # recorded in every checkpoint: a resume must train on the same data
    # rank 0 logs each epoch's metrics to MLflow itself (LocalSession, torchrun); under Ray Train the
    # driver side logs them once the report (and its checkpoint) is registered, so a re-run epoch
    # after a lost node is never logged twice
    log_epochs: bool = True
    extend: bool = False  # --continue: restored optimizer/schedule take this config's hyperparameters

    @property
    def cfg(self) -> PipelineConfig:
        return from_dict(PipelineConfig, self.config)


def build_model(spec: WorkerSpec) -> nn.Module:
    arch = arch_from_dict(spec.model_config)
    if spec.pretrained:
        return pretrained_model(spec.pretrained, arch)
    return new_model(arch)


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
            if spec.extend:  # the driver checked that only continuable hyperparameters changed
                scheduler = continue_schedule(model, optimizer, tc, steps_per_epoch, int(state["step"]))
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
                if logger:  # first: in a sweep the scheduler may end the trial at the report below
                    logger.stopped(str(exc))
                # the worst value of every metric a sweep may rank by, so a Tune trial that diverged
                # ends alone (ASHA and Tune's metric check see a complete result) and the sweep goes on
                session.report({"epoch": epoch, "stopped": 1.0, "restarts": restarts, "val_acc": 0.0,
                                "val_loss": float("inf"), "train_loss": float("inf")}, None)
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
                        metrics={"history": history, "confusion": val["confusion"], "restarts": restarts,
                                 "dataset_version": spec.dataset_version},
                        config_dict=spec.config))
                    if logger and spec.log_epochs:
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
        from mlflow.tracking import MlflowClient  # rank 0 only, when it logs

        self.run_id = spec.mlflow_run_id
        self.client = MlflowClient(tracking_uri=spec.tracking_uri)
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, samples_before_logging=1,
                                                tracking_uri=spec.tracking_uri)
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

    spec = WorkerSpec(**config["spec"])
    session = RaySession()
    per_worker = max(1, spec.cfg.train.batch_size // session.world_size)
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    data = EpochData(
        train=lambda epoch: iter_epoch(train_shard, per_worker, device=session.device),
        val=lambda: iter_epoch(val_shard, per_worker, device=session.device),
    )
    try:
        return train_worker(spec, data, session)
    except UserError as exc:  # bad input fails the same way on every retry: hand it back, don't raise
        return {"user_error": str(exc)}
