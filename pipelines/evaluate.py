"""The evaluate task: score a trained model on a split (default ``test``) and log it to MLflow.

The model is a ``vit_model`` directory (what :mod:`pipelines.train` exports to
``<storage>/train/<run>/model``), found from ``--model URI``, ``--run-id`` (the MLflow training
run's ``pipeline.model_uri`` tag), the run the config names (``train.run_name``; it must have
finished, so a named config never scores another config's model) or, when the config names no
run, the newest finished training run. Images are
preprocessed exactly as at validation time, with the mean/std and size stored with the weights.
Results: acc@1, acc@5, loss, per-class accuracy and the confusion matrix, written beside the
model as ``evaluation-<split>.json``, logged as ``<split>_*`` metrics plus a confusion-matrix
figure into the training's MLflow run. ``infer.tta: hflip`` scores the mean probabilities of each
image and its mirror (the metrics record which). Every evaluation also draws the model's attention
on a fixed set of validation images (:mod:`pipelines.attention`) and stores it as ``attention.png``
beside the model and at the root of the training run's artifacts (the registry's model
description embeds it from there: keep the name).
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vit_model import from_pretrained

from . import storage as st
from . import tracking
from .attention import ATTENTION_PNG, attention_png, fixed_sample, sample_split
from .config import PipelineConfig, tta_label
from .data.shards import DatasetVersion, dataset_from_config
from .data.stream import iter_local_batches
from .engine import evaluate as evaluate_batches
from .engine import with_tta, zero_pixel_fill
from .errors import UserError, first_line
from .plots import plot_confusion

TASK = "evaluate"


@dataclass
class EvalResult:
    model_uri: str
    dataset_uri: str
    dataset_version: str
    split: str
    metrics: dict[str, float]  # <split>_acc, <split>_acc5, <split>_loss, <split>_count
    tta: str  # test-time augmentation the metrics were measured with (config.tta_label: none, hflip, hflip+shift2, ...)
    per_class_acc: dict[str, float | None]
    confusion: list[list[int]]
    mlflow_run_id: str | None
    result_uri: str
    attention_uri: str | None = None  # attention.png beside the model; None when it could not be drawn

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def eval_config(cfg: PipelineConfig, meta: dict[str, Any]) -> PipelineConfig:
    """``cfg`` with the preprocessing the weights were trained with (mean, std, size)."""
    augment = cfg.data.augment
    if meta.get("mean") and meta.get("std"):
        augment = dataclasses.replace(augment, mean=tuple(meta["mean"]), std=tuple(meta["std"]))
    model = cfg.model
    size = meta.get("image_size")
    if size:  # the size the weights were trained at (model.args.img_size)
        img_size = int(size[0]) if size[0] == size[1] else [int(size[0]), int(size[1])]
        model = dataclasses.replace(model, args={**model.args, "img_size": img_size})
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=augment), model=model)


def score(model: torch.nn.Module, version, split: str, cfg: PipelineConfig, batch_size: int = 256) -> dict[str, Any]:
    """engine.evaluate over a whole split read without Ray (every row, in order)."""
    batches = iter_local_batches(version, split, cfg, batch_size=batch_size, train=False)
    aug = cfg.data.augment
    net = with_tta(model, cfg.infer.tta, shift=cfg.infer.tta_shift, fill=zero_pixel_fill(aug.mean, aug.std))
    return evaluate_batches(net, batches, device=torch.device("cpu"), num_classes=version.num_classes)


def evaluate(cfg: PipelineConfig, *, model_uri: str | None = None, run_id: str | None = None, split: str = "test",
             version: DatasetVersion | None = None, log: bool = True) -> EvalResult:
    train_run_id = run_id
    if model_uri is None:
        model_uri, train_run_id = tracking.latest_model_uri(cfg, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            folder = st.download_dir(model_uri, tmp, cfg.storage)
        except st.ObjectNotFound:
            raise UserError(f"no model files at {model_uri}; pass the model URI printed by `python -m pipelines train`") from None
        try:
            model, meta = from_pretrained(folder, return_meta=True)
        except (FileNotFoundError, ValueError) as exc:
            raise UserError(f"model {model_uri} cannot be loaded ({first_line(exc)}); pass a folder written by "
                            "`python -m pipelines train` (config.json + model.safetensors)") from None
    model.eval()
    train_run_id = train_run_id or meta.get("mlflow_run_id")
    if version is None:
        ds_meta = meta.get("dataset") or {}
        version = dataset_from_config(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, version=ds_meta.get("uri") or cfg.data.version)))
    if version.num_classes != model.cfg.num_classes:
        raise UserError(f"model {model_uri} has {model.cfg.num_classes} classes but dataset {version.uri} has "
                        f"{version.num_classes}; evaluate on the dataset it was trained for (data.version)")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model_cfg = eval_config(cfg, meta)
    raw = score(model, version, split, model_cfg, batch_size=cfg.infer.batch_size)
    metrics = {f"{split}_acc": raw["acc1"], f"{split}_loss": raw["loss"], f"{split}_count": float(raw["count"])}
    if "acc5" in raw:
        metrics[f"{split}_acc5"] = raw["acc5"]
    result_uri = st.join_uri(model_uri, f"evaluation-{split}.json")
    result = EvalResult(
        model_uri=model_uri, dataset_uri=version.uri, dataset_version=version.version, split=split, metrics=metrics,
        tta=tta_label(cfg.infer.tta, cfg.infer.tta_shift),
        per_class_acc=dict(zip(version.classes, raw["per_class_acc"])), confusion=raw["confusion"],
        mlflow_run_id=train_run_id, result_uri=result_uri,
    )
    picture = _attention_picture(model, version, split, model_cfg)
    if picture is not None:
        result.attention_uri = st.join_uri(model_uri, ATTENTION_PNG)
        st.write_bytes(result.attention_uri, picture, cfg.storage)
    st.write_json(result_uri, result.to_dict(), cfg.storage)
    if log and train_run_id:
        _log(cfg, train_run_id, result, version.classes, picture)
    return result


def _attention_picture(model: torch.nn.Module, version: DatasetVersion, split: str, cfg: PipelineConfig) -> bytes | None:
    """attention.png: the first images of each class of the val split (else of ``split``)."""
    shown = sample_split(version, split)
    sample = fixed_sample(version, shown, cfg)
    return attention_png(model, sample, version.classes,
                         title=f"attention rollout on the first images of each class ({shown} split)")


def _log(cfg: PipelineConfig, run_id: str, result: EvalResult, classes: list[str], picture: bytes | None) -> None:
    client = tracking.client(cfg)
    split = result.split
    per_class = {f"{split}_acc_{name}": v for name, v in result.per_class_acc.items() if v is not None}
    tracking.log_metrics(client, run_id, {**result.metrics, **per_class}, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = plot_confusion(result.confusion, classes, Path(tmp, f"{split}_confusion_matrix.png"), title=f"{split} split")
        client.log_artifact(run_id, str(path))
        if picture is not None:  # at the artifact root, under this exact name (see the module doc)
            Path(tmp, ATTENTION_PNG).write_bytes(picture)
            client.log_artifact(run_id, str(Path(tmp, ATTENTION_PNG)))
    tracking.log_json(client, run_id, result.to_dict(), f"evaluation-{split}.json")


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    result = evaluate(cfg, model_uri=args.model_uri, run_id=args.run_id, split=args.split)
    m = result.metrics
    acc5 = f", acc@5 {m[f'{result.split}_acc5']:.4f}" if f"{result.split}_acc5" in m else ""
    tta = "" if result.tta == "none" else f" (test-time augmentation: {result.tta})"
    print(f"{result.split}{tta}: acc@1 {m[f'{result.split}_acc']:.4f}{acc5}, loss {m[f'{result.split}_loss']:.4f} "
          f"on {int(m[f'{result.split}_count'])} images")
    for name, acc in result.per_class_acc.items():
        print(f"  {name:>20s}: {acc:.4f}" if acc is not None else f"  {name:>20s}: -")
    print(result.result_uri)
    return 0
