"""Typed pipeline configuration: dataclasses loaded from YAML, ``--set a.b=c`` overrides.

One :class:`PipelineConfig` holds a section per concern (storage, data, model, train, tune,
mlflow, registry, infer, ray). Loading is strict: an unknown key is rejected with its dotted
path, a value of the wrong type is rejected with the expected type, and both errors say how to
fix them. Every task receives the whole resolved config; it is saved beside outputs and logged
to MLflow as YAML (:func:`to_yaml`).

Secrets never live here: S3 credentials come from the standard AWS environment / profiles.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, has_credentials

# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class StorageConfig:
    """Where datasets, checkpoints, predictions and run records live.

    ``uri`` is ``file://PATH`` (relative paths resolve against the working directory),
    a plain local path, or ``s3://bucket/prefix``. For S3-compatible endpoints set
    ``s3_endpoint_url`` here or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` in the environment.
    """

    uri: str = "file://./artifacts"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_force_path_style: bool = True
    retries: int = 5  # attempts for transient storage errors (exponential backoff)
    retry_backoff_s: float = 0.25  # first backoff; doubles per attempt, with jitter


@dataclass
class AugmentConfig:
    """Training-time augmentation (torchvision.transforms.v2); eval uses only resize+normalize."""

    random_crop_padding: int = 0  # pad then random-crop back to the image size (0 = off)
    random_resized_crop: bool = False  # RandomResizedCrop(scale=crop_scale) instead of padded crop
    crop_scale: tuple[float, float] = (0.35, 1.0)
    hflip: float = 0.0  # probability of a horizontal flip
    auto_augment: str | None = None  # None | "trivial" | "randaugment"
    randaugment_magnitude: int = 9
    random_erasing: float = 0.0
    mean: tuple[float, ...] = (0.2860,)
    std: tuple[float, ...] = (0.3530,)


@dataclass
class DataConfig:
    """The dataset version to prepare and stream."""

    name: str = "fashion-mnist"  # dataset name under <storage>/datasets/<name>/
    source: str = "fashion-mnist"  # "fashion-mnist" or the URI of an ImageFolder root
    source_dir: str | None = None  # folder with the Fashion-MNIST idx files (auto-detected if None)
    strict: bool = False  # fail (listing them) instead of skipping invalid images
    channels: int = 1  # 1 (L) or 3 (RGB): every image is converted deliberately to this
    image_size: int | None = None  # resize to this square size at prepare time (None = keep)
    val_fraction: float = 0.1  # carved from train when the source has no val split
    test_fraction: float = 0.1  # carved from train when the source has no test split
    split_seed: int = 0
    shard_rows: int = 10000  # maximum rows per Parquet shard
    shard_max_bytes: int = 64 * 2**20  # ... and at most about this many encoded bytes per shard
    max_image_pixels: int = 50_000_000  # decompression-bomb guard
    alpha_background: int = 255  # gray level that transparent pixels are composited onto
    version: str | None = None  # dataset version to stream/evaluate (None = newest complete one)
    equal_shards: bool = True  # every train worker gets the same row count per epoch (DDP-safe);
    # drops at most world_size-1 rows per epoch. False = every row exactly once, uneven counts.
    shuffle: bool = True  # full random shuffle of the train split each epoch, seeded by (seed, epoch)
    read_threads: int = 8  # parallel reads/decodes while preparing (S3 latency)
    # Decode each image once per training run and keep the uint8 pixels in Ray's object store, so
    # an epoch only shuffles, augments and normalises (splits with one image size that fit this
    # many decoded bytes; larger ones are decoded from the shards every epoch).
    cache_decoded: bool = True
    cache_max_bytes: int = 1 * 2**30
    # How the train split reaches the workers. "ray": Ray Data streams it every epoch (a global
    # shuffle, then streaming_split across the workers): any dataset size. "memory": every worker
    # keeps the split in memory (decoded pixels when it qualifies for cache_decoded, else the PNG
    # bytes) and takes its rows of a seeded global permutation per epoch: no per-epoch Ray Data
    # work, and the order train.checkpoint_every_steps needs. "auto": "memory" when the decoded
    # split fits data.cache_max_bytes (and data.equal_shards), "ray" otherwise. docs/data.md.
    stream: str = "auto"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    """Which model to build: a vit_model name (any family) and that family's arguments.

    ``args`` takes any argument of the family's config (``depth``, ``drop_path_rate``,
    ``reg_tokens``, ``window_size``, ...); the dataset supplies ``in_chans`` and ``num_classes``
    and, unless ``args.img_size`` is given, ``img_size``. See pipelines/architecture.py.
    """

    name: str = "vit_tiny_patch4"
    args: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None  # directory/file for vit_model.from_pretrained


@dataclass
class TrainConfig:
    epochs: int = 5
    batch_size: int = 128  # global batch size, split across workers
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    min_lr: float = 1e-5
    label_smoothing: float = 0.1
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    ema_decay: float = 0.0  # 0 = off
    clip_grad_norm: float | None = 1.0
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 on GPU only) | auto (bf16 where the hardware has it, else fp32)
    seed: int = 0
    num_workers: int = 2
    use_gpu: bool | None = None  # None = use GPUs when the cluster has them
    cpus_per_worker: float = 1.0
    keep_checkpoints: int = 2  # N best by val accuracy, plus the latest
    max_failures: int = 2
    run_name: str | None = None  # resubmitting with the same name resumes the run
    limit_train_batches: int | None = None  # for smoke tests
    limit_val_batches: int | None = None
    # a mid-epoch checkpoint every N optimizer steps (None = at epoch ends only); a run resumed from
    # one continues at the same sample of the same epoch order (docs/training.md, "Exact mid-epoch resume")
    checkpoint_every_steps: int | None = None
    # debug: every rank writes the row ids it trained on to <storage>/train/<run>/sample_ids/ (off)
    record_sample_ids: bool = False


@dataclass
class TuneConfig:
    num_samples: int = 4
    search: str = "random"  # random | optuna
    metric: str = "val_acc"
    mode: str = "max"
    grace_period: int = 1
    reduction_factor: int = 2
    max_concurrent_trials: int | None = None  # None = derived from cluster resources
    space: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


@dataclass
class MLflowConfig:
    tracking_uri: str | None = None  # None = sqlite file under the storage folder
    experiment_name: str = "vit"
    registry_uri: str | None = None


@dataclass
class RegistryConfig:
    model_name: str = "vit-fashion-mnist"
    metric: str = "test_acc"  # gate metric, scored on the test split: test_acc | test_loss
    margin: float = 0.0  # candidate must beat the champion by more than this
    mode: str = "max"  # max: higher metric wins (test_acc); min: lower wins (test_loss)
    log_tag_entries: int = 20  # recent decisions kept in the registered-model tag promotion.log


@dataclass
class InferConfig:
    input: str | None = None  # dataset version URI or a prefix of raw images
    model_uri: str | None = None  # models:/NAME@alias or models:/NAME/VERSION
    batch_size: int = 256
    num_actors: int = 1
    use_gpu: bool = False
    top_k: int = 3
    job_name: str | None = None
    split: str = "test"  # which split of a dataset-version input to score
    cpus_per_actor: float = 1.0  # CPUs reserved per model actor; torch threads = max(1, int(this)) on CPU
    tta: str = "none"  # test-time augmentation for evaluate and batch inference: the mean class probabilities
    # over views of each image: none | hflip (image + mirror: 2x the compute) | shift (every translation by
    # up to tta_shift px, zero-padded as the training's random crop: (2 * tta_shift + 1)^2 x) | hflip+shift (both)
    tta_shift: int = 2  # largest translation of the shift modes, in pixels (data.augment.random_crop_padding)
    explain: bool = False  # also write an attention overlay per input: <attempt>/explain/<input id>.png + explain_uri


@dataclass
class RayConfig:
    address: str | None = None  # None = RAY_ADDRESS or a local cluster
    num_cpus: int | None = None  # only for a local cluster started by the pipeline
    # Local cluster only: the dashboard on 127.0.0.1 (port 8265 or the next free one). Ray Train V2's placement-group cleaner
    # polls the state API it serves; without it that actor logs a warning every second or two.
    include_dashboard: bool = True


WORKFLOW_STEPS = ("prepare", "search", "evaluate", "register", "infer")  # the order `run` executes them in


@dataclass
class WorkflowConfig:
    """``python -m pipelines run``: which steps, and how failures are retried."""

    name: str = "local"  # run record at <storage>/runs/<name>/record.json
    steps: list[str] = field(default_factory=lambda: list(WORKFLOW_STEPS))
    search: str = "tune"  # tune (ASHA sweep) | train (one run with the train section)
    retries: int = 1  # extra attempts for a failed step (not for input errors)
    retry_backoff_s: float = 5.0  # first retry delay; doubles each attempt


@dataclass
class PipelineConfig:
    storage: StorageConfig = field(default_factory=StorageConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    mlflow: MLflowConfig = field(default_factory=MLflowConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    workflow: WorkflowConfig = field(default_factory=WorkflowConfig)


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load ``path`` (YAML) onto the defaults, then apply ``key=value`` overrides in order."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file to --config")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ConfigError(f"config file {str(path)!r} is not valid YAML ({first}); fix the syntax") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    return config_from_dict(raw, overrides)


def config_from_dict(raw: dict[str, Any], overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """A config from a plain (YAML-like) dict plus ``key=value`` overrides; ``raw`` is not modified."""


    data = copy.deepcopy(raw)
    for item in overrides:
        _apply_override(data, item)
    _refuse_moved_model_keys(data)
    cfg = from_dict(PipelineConfig, data)
    _refuse_credentials(cfg)
    _check_names(cfg)
    _check_values(cfg)
    return cfg


# model.* keys of the fixed ViT-only schema; every family argument now lives under model.args
MOVED_MODEL_KEYS = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "drop_rate",
                    "attn_drop_rate", "drop_path_rate", "global_pool")


def _refuse_moved_model_keys(data: dict[str, Any]) -> None:
    model = data.get("model")
    if isinstance(model, dict):
        for key in model:
            if key in MOVED_MODEL_KEYS:
                raise ConfigError(f"model.{key} moved to model.args.{key} (model.args takes any argument of the "
                                  f"model's family); rename the key")


PRECISIONS = ("fp32", "bf16", "fp16", "auto")
AUTO_AUGMENT = (None, "trivial", "randaugment")
TTA_MODES = ("none", "hflip", "shift", "hflip+shift")
STREAM_MODES = ("auto", "ray", "memory")  # data.stream


def tta_label(tta: str, shift: int) -> str:
    """How results name an ``infer.tta`` setting: ``none``, ``hflip``, ``shift2``, ``hflip+shift2``."""
    return f"{tta}{shift}" if tta.endswith("shift") else tta


def _at_least(n: float):
    return (lambda v: v >= n), f"must be at least {n}"


def _optional(check):
    test, text = check
    return (lambda v: v is None or test(v)), text


def _one_of(*choices):
    names = ["null" if c is None else repr(c) for c in choices]
    shown = " or ".join([", ".join(names[:-1]), names[-1]]) if len(names) > 1 else names[0]
    return (lambda v: v in choices), f"is not supported; use {shown}"


_POSITIVE = ((lambda v: v > 0), "must be positive")
_FRACTION = ((lambda v: 0 <= v < 1), "must be in [0, 1)")
_PROBABILITY = ((lambda v: 0 <= v <= 1), "must be in [0, 1]")

# value checks for every numeric or enumerated setting: (key, (predicate, what it must be))
VALUE_CHECKS = [
    ("storage.retries", _at_least(1)), ("storage.retry_backoff_s", _at_least(0)),
    ("data.channels", _one_of(1, 3)), ("data.image_size", _optional(_at_least(1))),
    ("data.val_fraction", _FRACTION), ("data.test_fraction", _FRACTION), ("data.shard_rows", _at_least(1)),
    ("data.shard_max_bytes", _at_least(1)), ("data.max_image_pixels", _at_least(1)),
    ("data.alpha_background", ((lambda v: 0 <= v <= 255), "must be in 0..255")), ("data.read_threads", _at_least(1)),
    ("data.cache_max_bytes", _at_least(0)), ("data.stream", _one_of(*STREAM_MODES)),
    ("data.augment.random_crop_padding", _at_least(0)), ("data.augment.hflip", _PROBABILITY),
    ("data.augment.auto_augment", _one_of(*AUTO_AUGMENT)), ("data.augment.randaugment_magnitude", _at_least(0)),
    ("data.augment.random_erasing", _PROBABILITY),
    ("data.augment.crop_scale", ((lambda v: len(v) == 2 and 0 < v[0] <= v[1] <= 1), "must be [low, high] with 0 < low <= high <= 1")),
    ("data.augment.std", ((lambda v: len(v) > 0 and all(x > 0 for x in v)), "must be positive values")),
    ("train.epochs", _at_least(1)), ("train.batch_size", _at_least(1)), ("train.lr", _POSITIVE),
    ("train.weight_decay", _at_least(0)), ("train.warmup_epochs", _at_least(0)), ("train.min_lr", _at_least(0)),
    ("train.label_smoothing", _FRACTION), ("train.mixup_alpha", _at_least(0)), ("train.cutmix_alpha", _at_least(0)),
    ("train.ema_decay", _FRACTION), ("train.clip_grad_norm", _optional(_POSITIVE)),
    ("train.precision", _one_of(*PRECISIONS)), ("train.num_workers", _at_least(1)),
    ("train.cpus_per_worker", _POSITIVE), ("train.keep_checkpoints", _at_least(1)), ("train.max_failures", _at_least(0)),
    ("train.limit_train_batches", _optional(_at_least(1))), ("train.limit_val_batches", _optional(_at_least(1))),
    ("train.checkpoint_every_steps", _optional(_at_least(1))),
    ("tune.num_samples", _at_least(1)), ("tune.search", _one_of("random", "optuna")), ("tune.mode", _one_of("max", "min")),
    ("tune.grace_period", _at_least(1)), ("tune.reduction_factor", _at_least(2)),
    ("tune.max_concurrent_trials", _optional(_at_least(1))),
    ("registry.metric", _one_of("test_acc", "test_loss")), ("registry.mode", _one_of("max", "min")),
    ("registry.margin", _at_least(0)), ("registry.log_tag_entries", _at_least(1)),
    ("infer.batch_size", _at_least(1)), ("infer.num_actors", _at_least(1)), ("infer.top_k", _at_least(1)),
    ("infer.cpus_per_actor", _POSITIVE), ("infer.tta", _one_of(*TTA_MODES)), ("infer.tta_shift", _at_least(1)),
    ("ray.num_cpus", _optional(_at_least(1))),
    ("workflow.search", _one_of("tune", "train")), ("workflow.retries", _at_least(0)),
    ("workflow.retry_backoff_s", _at_least(0)),
    ("workflow.steps", ((lambda v: set(v) <= set(WORKFLOW_STEPS)), f"must list steps from {', '.join(WORKFLOW_STEPS)}")),
]


def _get(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check_values(cfg: PipelineConfig) -> None:
    """Every value no run could use is refused here, before any worker starts, naming the key."""
    for key, (ok, must) in VALUE_CHECKS:
        value = _get(cfg, key)
        if not ok(value):
            shown = list(value) if isinstance(value, tuple) else value
            raise ConfigError(f"{key}={shown!r} {must}")
    if cfg.data.val_fraction + cfg.data.test_fraction >= 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction} + data.test_fraction={cfg.data.test_fraction} "
                          "must leave some training data (sum below 1)")
    if cfg.train.checkpoint_every_steps is not None and cfg.data.stream == "ray":
        raise ConfigError(f"train.checkpoint_every_steps={cfg.train.checkpoint_every_steps} needs the seekable per-worker "
                          "order of data.stream=memory (Ray Data's streaming split cannot resume at a sample); set "
                          "data.stream=memory (or auto), or train.checkpoint_every_steps=null")
    if cfg.data.stream == "memory" and not cfg.data.equal_shards:
        raise ConfigError("data.stream=memory gives every worker the same number of rows per epoch; "
                          "data.equal_shards=false (every row exactly once, uneven counts) needs data.stream=ray")
    if cfg.train.checkpoint_every_steps is not None and not cfg.data.equal_shards:
        raise ConfigError(f"train.checkpoint_every_steps={cfg.train.checkpoint_every_steps} needs data.equal_shards=true "
                          "(a mid-epoch position is the same step on every rank); set data.equal_shards=true or "
                          "train.checkpoint_every_steps=null")


# user-chosen names that become folders under storage.uri (or MLflow run names beside them)
NAME_SETTINGS = ("data.name", "data.version", "train.run_name", "tune.name", "workflow.name", "infer.job_name")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def number_or_text(value: Any) -> Any:
    """``"1e-3"`` (YAML 1.1 reads exponent notation without a dot as text) -> 0.001; else ``value``."""
    return float(value) if isinstance(value, str) and _NUMBER.match(value.strip()) else value


def _check_names(cfg: PipelineConfig) -> None:
    """Names joined into storage paths must stay one folder: no '/', no '..', nothing hidden.
    Registry names end up in ``models:/NAME@alias`` URIs and MLflow filter strings."""
    name = cfg.registry.model_name
    if not name or any(c in name for c in "'\"\\/@:"):
        raise ConfigError(f"registry.model_name={name!r} must be a non-empty name without quotes, '/', '@' or ':' "
                          "(it is used in models:/NAME@ALIAS URIs), e.g. vit-fashion-mnist")
    for key in NAME_SETTINGS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None or (key == "data.version" and "://" in value):  # data.version may be a version's URI
            continue
        if not _NAME.match(value):
            raise ConfigError(f"{key}={value!r} is not a valid name: use 1-128 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit (it names a folder under storage.uri)")


# settings that hold URIs, and where their credentials belong instead
URI_SETTINGS = {
    "storage.uri": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
    "storage.s3_endpoint_url": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
    "data.source": "the environment of the source's client (AWS_* for s3://)",
    "data.source_dir": "the environment of the source's client (AWS_* for s3://)",
    "mlflow.tracking_uri": "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
    "mlflow.registry_uri": "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
    "model.pretrained": "HF_TOKEN (hf-hub:) or AWS_* (s3://)",
    "infer.input": "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE",
    "infer.model_uri": "MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN",
    "ray.address": "RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (Ray token authentication)",
}


def _refuse_credentials(cfg: PipelineConfig) -> None:
    """A URI setting that embeds a secret is refused, naming the setting but never the value:
    config values are logged to MLflow, saved beside outputs and printed."""
    for key, where in URI_SETTINGS.items():
        section, name = key.split(".")
        if has_credentials(getattr(getattr(cfg, section), name)):
            raise ConfigError(f"{key} embeds credentials (user-info or a secret query parameter); remove them from "
                              f"the URI and put them in {where}")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. --set train.epochs=3)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key; use a dotted key such as train.lr=3e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and wrong types."""
    where = prefix or "the config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown config key {key!r}; valid keys here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if tp is Any:
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"config key {key!r} must have {len(args)} items, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key {key!r} must be a list, got {value!r}")
        return [_coerce(args[0], v, key) for v in value] if args else list(value)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} must be a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key {key!r} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML 1.1 reads "1e-3" as a string
            return float(value)
        raise ConfigError(f"config key {key!r} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r} must be a string, got {value!r}")
    raise ConfigError(f"config key {key!r} has an unsupported type {tp!r}")  # pragma: no cover


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain, YAML-safe dict of a config or of a dict (tuples become lists)."""

    def plain(v: Any) -> Any:
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
