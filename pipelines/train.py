"""train: one training run of the ViT on Ray Train (DDP workers), tracked in one MLflow run.

    python -m pipelines train --config FILE [--set train.epochs=10 ...]

The driver side is :mod:`pipelines.trainer`, the worker loop :mod:`pipelines.train_worker`;
resume and fault-tolerance semantics are in docs/training.md.
"""

from __future__ import annotations

import argparse

from .architecture import check_model_settings
from .config import PipelineConfig
from .data.shards import DatasetVersion, dataset_from_config
from .trainer import TrainResult, fit


def train(cfg: PipelineConfig, *, version: DatasetVersion | None = None, run_name: str | None = None,
          extend: bool = False) -> TrainResult:
    """Train on ``version`` (default: the dataset version the config names, else the newest).

    Resubmitting ``train.run_name`` resumes that run when its settings are unchanged; with
    ``extend`` (``--continue``) it continues under new hyperparameters (``train.epochs``, ``lr``,
    ...), the learning-rate schedule recomputed for them."""
    check_model_settings(cfg)
    return fit(cfg, version or dataset_from_config(cfg), run_name=run_name, extend=extend)


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    result = train(cfg, extend=args.extend)
    m = result.metrics
    print(f"run {result.run_name}: best val_acc {m.get('val_acc', float('nan')):.4f} at epoch {m.get('epoch')}, "
          f"{len(result.history)} epochs, {result.restarts} restart(s), {result.seconds:.0f} s")
    print(f"mlflow run: {result.mlflow_run_id}")
    print(f"best checkpoint: {result.best_checkpoint_uri}")
    print(f"model: {result.model_uri}")
    return 0
