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

from vit_model import to_preferred_memory_format

from . import storage as st
from . import tracking
from .architecture import arch_from_dict, pretrained_model
from .architecture import build_model as new_model
from .checkpoint import load_training_state, resume_position, save_training_state
from .config import PipelineConfig, from_dict
from .data.shards import load_version
from .data.stream import EXACT, RAY_DATA, SeekableStream, iter_epoch
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
    resolve_precision,
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
    dataset_uri: str = ""  # the version's folder: the exact order (data.stream=memory) reads it itself
    data_order: str = RAY_DATA  # data.stream resolved for the version (pipelines.data.stream.train_order)
    run_name: str = ""  # <storage>/train/<run_name>: where train.record_sample_ids writes

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
    """Batches for the loop: ``train(epoch)`` and ``val()`` each return a fresh iterable.

    ``train_from(epoch, k)`` returns the rest of ``epoch`` from this rank's k-th sample on (the
    same batches an uninterrupted epoch yields after its first k samples); a run restored from a
    mid-epoch checkpoint needs it (:class:`~pipelines.data.stream.SeekableStream` provides it)."""

    train: Callable[[int], Iterable]
    val: Callable[[], Iterable]
    train_from: Callable[[int, int], Iterable] | None = None


@dataclass
class LocalSession:
    """Single process, no Ray: checkpoints go to ``checkpoint_root/epoch-NNN`` (mid-epoch ones to
    ``checkpoint_root/step-SSSSSSSSS``) when given."""

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
            name = f"step-{metrics['global_step']:09d}" if metrics.get(MID_EPOCH) else f"epoch-{metrics['epoch']:03d}"
            dst = Path(self.checkpoint_root, name)
            shutil.copytree(checkpoint_dir, dst, dirs_exist_ok=True)


def epoch_seed(seed: int, epoch: int) -> int:
    """Per-epoch seed: dropout/mixup randomness of epoch e is the same in a resumed run."""
    return seed * 1_000_003 + epoch


def step_seed(seed: int, step: int) -> int:
    """Per-step seed (big_vision style): the dropout, drop-path and mixup draws of global step s
    are a function of ``(train.seed, s, rank)``, so a run resumed at any step draws the same."""
    return (seed * 1_000_003 + step) ^ 0x5DEECE66D


# Ray Train orders checkpoints by this metric when mid-epoch checkpoints are on: val_acc for an
# epoch's checkpoint, MID_EPOCH_SCORE (below any accuracy) for a mid-epoch one, which has no
# validation; so a mid-epoch checkpoint never evicts one of the N best, and Ray Train keeps the
# latest checkpoint whatever its score.
CHECKPOINT_SCORE = "checkpoint_score"
MID_EPOCH = "mid_epoch"  # set (1.0) in the report of a mid-epoch checkpoint
MID_EPOCH_SCORE = -1.0


class SampleRecorder:
    """Debug hook (``train.record_sample_ids``): the row ids this rank trained on, written as one
    JSON object per checkpoint to ``<storage>/train/<run>/sample_ids/rank-RRR/step-SSSSSSSSS.json``
    (the rows of the steps since the previous checkpoint). Only steps whose checkpoint was
    written are recorded, so after a failure the files hold what the resumed weights saw; a
    resumed run rewrites the files of the steps it repeats with the same content."""

    def __init__(self, base_uri: str, rank: int, storage):
        self.base_uri, self.rank, self.storage = base_uri, rank, storage
        self.pending: list[int] = []
        self.trained: list[int] = []

    def wrap(self, batches: Iterable) -> Iterable:
        """``(images, labels)`` batches from dict or ``(images, labels, row_ids)`` batches."""
        for batch in batches:
            if isinstance(batch, dict):
                images, labels, ids = batch["image"], batch["label"], batch["row_id"]
            else:
                images, labels, ids = batch
            self.pending = [int(i) for i in torch.as_tensor(ids).tolist()]
            yield images, labels

    def step_done(self) -> None:
        self.trained += self.pending
        self.pending = []

    def flush(self, epoch: int, global_step: int) -> None:
        uri = st.join_uri(self.base_uri, f"rank-{self.rank:03d}", f"step-{global_step:09d}.json")
        st.write_json(uri, {"epoch": epoch, "rank": self.rank, "global_step": global_step, "row_ids": self.trained},
                      self.storage)
        self.trained = []


def read_sample_ids(run_uri: str, rank: int, storage=None) -> list[dict[str, Any]]:
    """What :class:`SampleRecorder` wrote for ``rank`` of the run at ``run_uri``, in step order."""
    base = st.join_uri(run_uri, "sample_ids", f"rank-{rank:03d}")
    names = sorted(e.uri.rsplit("/", 1)[-1] for e in st.list_files(base, storage))
    return [st.read_json(st.join_uri(base, n), storage) for n in names if n.startswith("step-")]


def train_worker(spec: WorkerSpec, data: EpochData, session: Session) -> dict[str, Any]:
    """Train ``spec`` on ``data`` for ``train.epochs`` epochs; returns the run summary.

    Every rank calls ``session.report`` once per epoch (rank 0 with the checkpoint) and, with
    ``train.checkpoint_every_steps``, once per mid-epoch checkpoint. Metrics are global
    (all-reduced). Rank 0 also logs them to the MLflow run in ``spec``.
    """
    cfg = spec.cfg
    tc = cfg.train
    torch.set_num_threads(max(1, spec.threads))
    seed_everything(tc.seed, session.rank)
    device = session.device
    model = to_preferred_memory_format(build_model(spec))  # channels-last for conv stems (before DDP/EMA copy it)
    model = session.prepare_model(model)
    optimizer = build_optimizer(model, tc)
    per_worker_batch = max(1, tc.batch_size // session.world_size)
    every = tc.checkpoint_every_steps
    if spec.data_order == EXACT:  # every rank gets train_count // world_size rows (rank_order)
        steps_per_epoch = max(1, math.ceil((spec.train_count // session.world_size) / per_worker_batch))
    else:
        steps_per_epoch = max(1, math.ceil(spec.train_count / session.world_size / per_worker_batch))
    if tc.limit_train_batches:
        steps_per_epoch = min(steps_per_epoch, tc.limit_train_batches)
    scheduler = build_scheduler(optimizer, tc, steps_per_epoch)
    mixup = build_mixup(tc, len(spec.class_names))
    ema = ModelEma(model, tc.ema_decay) if tc.ema_decay > 0 else None
    scaler = build_grad_scaler(tc.precision, device)

    start_epoch, start_sample, carried, history, restarts = 0, 0, _no_partial(), [], 0
    with session.restored_checkpoint() as ckpt_dir:
        if ckpt_dir:
            state = load_training_state(ckpt_dir, model=model, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                        scaler=scaler, restore_rng=False)
            if spec.extend:  # the driver checked that only continuable hyperparameters changed
                scheduler = continue_schedule(model, optimizer, tc, steps_per_epoch, int(state["step"]))
            start_epoch, start_sample = resume_position(state)
            if start_sample:
                _check_mid_epoch_resume(state, session.world_size, per_worker_batch, data)
                carried = dict(state["position"]["partial"])
            history = list(state["metrics"].get("history", []))
            restarts = int(state["metrics"].get("restarts", 0)) + 1

    logger = _Rank0Logger(spec) if session.rank == 0 else None
    if logger:  # what train.precision resolved to on this hardware (``auto``, or bf16 without support)
        logger.tag("pipeline.precision", resolve_precision(tc.precision, device))
    recorder = None
    if tc.record_sample_ids and spec.run_name:
        recorder = SampleRecorder(st.join_uri(cfg.storage.uri, "train", spec.run_name, "sample_ids"), session.rank,
                                  cfg.storage)
    summary: dict[str, Any] = {"restarts": restarts, "resumed_from_epoch": start_epoch - 1 if restarts else None,
                               "resumed_at": {"epoch": start_epoch, "samples": start_sample} if restarts else None,
                               "stopped": None, "epochs_run": 0}

    def checkpoint_files(tmp: str, epoch: int, metrics: dict[str, Any], position: dict[str, Any] | None) -> str | None:
        if session.rank != 0:
            return None
        return str(save_training_state(
            Path(tmp, "state"), model=model, optimizer=optimizer, scheduler=scheduler, ema=ema, scaler=scaler,
            epoch=epoch, step=scheduler.last_epoch, metrics=metrics, config_dict=spec.config, position=position))

    try:
        for epoch in range(start_epoch, tc.epochs):
            seed_everything(epoch_seed(tc.seed, epoch), session.rank)
            skip = start_sample if epoch == start_epoch else 0
            partial = carried if skip else _no_partial()
            done_steps = skip // per_worker_batch  # optimizer steps of this epoch already in the weights
            limit = tc.limit_train_batches - done_steps if tc.limit_train_batches else None
            epoch_steps = steps_per_epoch
            batches = data.train_from(epoch, skip) if skip else data.train(epoch)
            if recorder is not None:
                batches = recorder.wrap(batches)
            local = {"loss_sum": 0.0, "images": 0, "steps": 0, "t0": time.perf_counter()}

            def on_step(info: dict[str, Any], epoch: int = epoch, skip: int = skip, partial: dict = partial,
                        local: dict = local, done_steps: int = done_steps, epoch_steps: int = epoch_steps) -> None:
                local["loss_sum"] += info["loss"] * info["images"]
                local["images"] += info["images"]
                local["steps"] += 1
                if recorder is not None:
                    recorder.step_done()
                step_in_epoch = done_steps + local["steps"]
                if every is None or info["global_step"] % every or step_in_epoch >= epoch_steps:
                    return  # the epoch's last step is followed by the epoch's own checkpoint
                so_far = _running_sums(partial, reduce_metrics(
                    {"train_loss": local["loss_sum"] / max(1, local["images"]), "images": local["images"],
                     "steps": local["steps"], "seconds": time.perf_counter() - local["t0"]}))
                position = {"samples": skip + local["images"], "world_size": session.world_size,
                            "per_worker_batch": per_worker_batch, "partial": so_far}
                metrics = {"history": history, "restarts": restarts, "dataset_version": spec.dataset_version,
                           "data_order": spec.data_order}
                if recorder is not None:
                    recorder.flush(epoch, info["global_step"])
                with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
                    ckpt = checkpoint_files(tmp, epoch, metrics, position)
                    session.report({"epoch": epoch, "global_step": info["global_step"], "samples": position["samples"],
                                    "restarts": restarts, MID_EPOCH: 1.0, CHECKPOINT_SCORE: MID_EPOCH_SCORE}, ckpt)

            t0 = time.perf_counter()
            try:
                tr = train_one_epoch(model, batches, optimizer, scheduler, tc, device=device, epoch=epoch,
                                     mixup=mixup, ema=ema, scaler=scaler, limit_batches=limit, on_step=on_step,
                                     before_step=lambda step: seed_everything(step_seed(tc.seed, step), session.rank))
            except NonFiniteLossError as exc:
                summary["stopped"] = str(exc)
                if logger:  # first: in a sweep the scheduler may end the trial at the report below
                    logger.stopped(str(exc))
                # the worst value of every metric a sweep may rank by, so a Tune trial that diverged
                # ends alone (ASHA and Tune's metric check see a complete result) and the sweep goes on
                session.report({"epoch": epoch, "stopped": 1.0, "restarts": restarts, "val_acc": 0.0,
                                "val_loss": float("inf"), "train_loss": float("inf")}, None)
                break
            tr = _with_partial(reduce_metrics(tr), partial)
            eval_model = ema.module if ema is not None else model
            val = reduce_metrics(evaluate(eval_model, data.val(), device=device, num_classes=len(spec.class_names),
                                          precision=tc.precision, limit_batches=tc.limit_val_batches))
            row = {
                "epoch": epoch, "train_loss": tr["train_loss"], "val_loss": val["loss"], "val_acc": val["acc1"],
                "lr": tr["lr"], "images_per_s": tr["images"] / max(tr["seconds"], 1e-9),
                # the share of the epoch's train time spent waiting for batches (input-bound if high)
                "data_wait_fraction": tr.get("data_wait_seconds", 0.0) / max(tr["seconds"], 1e-9),
                "epoch_seconds": time.perf_counter() - t0, "train_images": tr["images"], "val_images": val["count"],
                "restarts": restarts,
            }
            if "acc5" in val:
                row["val_acc5"] = val["acc5"]
            history.append(row)
            if recorder is not None:
                recorder.flush(epoch, scheduler.last_epoch)
            with tempfile.TemporaryDirectory(prefix="ckpt-") as tmp:
                ckpt = checkpoint_files(tmp, epoch, {"history": history, "confusion": val["confusion"],
                                                     "restarts": restarts, "dataset_version": spec.dataset_version,
                                                     "data_order": spec.data_order}, None)
                if logger and spec.log_epochs:
                    logger.epoch(row)
                session.report({**row, CHECKPOINT_SCORE: row["val_acc"]} if every is not None else row, ckpt)
            summary["epochs_run"] += 1
    finally:
        if logger:
            logger.close()
    summary["history"] = history
    return summary


def _no_partial() -> dict[str, float]:
    return {"loss_sum": 0.0, "images": 0, "steps": 0, "seconds": 0.0}


def _running_sums(partial: dict[str, float], tr: dict[str, Any]) -> dict[str, float]:
    """The epoch's global running sums: those restored from a mid-epoch checkpoint (``partial``)
    plus the all-reduced train metrics ``tr`` of the steps run since."""
    return {"loss_sum": float(partial["loss_sum"]) + (tr["train_loss"] * tr["images"] if tr["images"] else 0.0),
            "images": int(partial["images"]) + int(tr["images"]), "steps": int(partial["steps"]) + int(tr["steps"]),
            "seconds": float(partial["seconds"]) + float(tr["seconds"])}


def _with_partial(tr: dict[str, Any], partial: dict[str, float]) -> dict[str, Any]:
    """An epoch's train metrics over all its steps, also those before the mid-epoch checkpoint it
    resumed from (equal to the uninterrupted epoch's up to float summation order)."""
    if not partial["steps"]:
        return tr
    sums = _running_sums(partial, tr)
    return {**tr, "train_loss": sums["loss_sum"] / sums["images"] if sums["images"] else float("nan"),
            "images": sums["images"], "steps": sums["steps"], "seconds": sums["seconds"]}


def _check_mid_epoch_resume(state: dict[str, Any], world_size: int, per_worker_batch: int, data: EpochData) -> None:
    """A mid-epoch position means the same rows only for the same ranks and batch size."""
    pos = state["position"]
    if int(pos["world_size"]) != world_size or int(pos["per_worker_batch"]) != per_worker_batch:
        raise UserError(f"the checkpoint was taken in epoch {state['epoch']} after {pos['samples']} samples per rank on "
                        f"{pos['world_size']} workers with batches of {pos['per_worker_batch']}; this run has "
                        f"{world_size} workers with batches of {per_worker_batch}, which would change the samples "
                        f"trained on: resume with train.num_workers={pos['world_size']} and the run's batch size")
    if data.train_from is None:
        raise UserError(f"the checkpoint was taken in the middle of epoch {state['epoch']}, and this data cannot start "
                        "an epoch at a sample (EpochData.train_from); use the run's train.checkpoint_every_steps")


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

            # CPU/memory sampled every 10 s, logged as the mean of 3 samples: a tracking-store write
            # every 30 s, not every 5 s (py-spy: the 5 s writes took ~3 % of a CPU worker's samples)
            self.monitor = SystemMetricsMonitor(self.run_id, sampling_interval=10, samples_before_logging=3,
                                                tracking_uri=spec.tracking_uri)
            self.monitor.start()
        except Exception:  # system metrics are best effort (psutil missing, unsupported platform)
            self.monitor = None

    def epoch(self, row: dict[str, Any]) -> None:
        if self.client:
            tracking.log_metrics(self.client, self.run_id, {k: v for k, v in row.items() if k != "epoch"}, step=row["epoch"])

    def tag(self, key: str, value: str) -> None:
        if self.client:
            self.client.set_tag(self.run_id, key, value[:5000])

    def stopped(self, message: str) -> None:
        self.tag("pipeline.stopped", message)

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
    cfg = spec.cfg
    per_worker = max(1, cfg.train.batch_size // session.world_size)
    with_ids = cfg.train.record_sample_ids and bool(spec.run_name)
    try:
        if spec.data_order == EXACT:
            # both splits in this worker's memory: a deterministic, seekable per-rank train order, and
            # every val row on one rank; no per-epoch Ray Data execution at all (data.stream)
            version = load_version(spec.dataset_uri, cfg.storage)
            stream = SeekableStream(version, "train", cfg, batch_size=per_worker, rank=session.rank,
                                    world_size=session.world_size)
            val = SeekableStream(version, "val", cfg, batch_size=per_worker, rank=session.rank,
                                 world_size=session.world_size, train=False)
            data = EpochData(train=stream.epoch, train_from=stream.epoch, val=lambda: val.epoch(0))
        else:
            val_shard = ray.train.get_dataset_shard("val")
            train_shard = ray.train.get_dataset_shard("train")
            data = EpochData(
                train=lambda epoch: iter_epoch(train_shard, per_worker, device=session.device, with_ids=with_ids),
                val=lambda: iter_epoch(val_shard, per_worker, device=session.device),
            )
        return train_worker(spec, data, session)
    except UserError as exc:  # bad input fails the same way on every retry: hand it back, don't raise
        return {"user_error": str(exc)}
