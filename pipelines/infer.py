"""infer: batch inference with a registered model over a dataset version or a prefix of raw images.

    python -m pipelines infer --config FILE --input URI [--model models:/NAME@champion] [--job NAME]
                              [--set infer.num_actors=2 --set infer.batch_size=256 ...]

:func:`infer` is the task function: ``(cfg, input_uri, model_uri) -> InferResult``.

Model
    ``models:/NAME@ALIAS`` is resolved to a concrete version **once**, at job start
    (``MlflowClient.get_model_version_by_alias``); from then on the job uses
    ``models:/NAME/VERSION`` and that version's artifact location only, so moving ``@champion``
    while the job runs cannot mix two versions in one output. The driver downloads that
    version's data files once, through its ``MLmodel`` (``preprocessing.json`` and
    ``class_names.json`` for the job; ``config.json`` and the safetensors weights for the
    model; see :mod:`pipelines.serving`), and puts the two model
    files into the Ray object store. Each actor builds the ViT from those bytes once, when it
    starts (and again if Ray restarts it): actors need no access to the MLflow store or its
    artifact location (a sqlite store and ``file://`` artifacts on the driver work on a multi-node
    cluster too), and they never import MLflow (~3 s per actor here). The code shipped inside
    the model is never executed and nothing is unpickled.

Input
    * a **dataset version** (a folder with a ``vit-pipeline.dataset`` ``manifest.json``): the
      Parquet shards of split ``infer.split`` (default ``test``), images already validated by
      prepare. ``input_id`` is ``<split>/<row_id>``; labels are known, so the result carries
      the accuracy.
    * any **prefix of raw images**, local or S3, listed recursively; files are selected by
      extension (:data:`~pipelines.data.validate.IMAGE_EXTENSIONS`, any case), hidden files and
      folders (``.name``) are skipped. ``input_id`` is the path relative to the prefix. The set
      of inputs is the listing taken at job start.

Pipeline (Ray Data, streaming)
    read (Parquet shards re-cut into blocks of one batch, or the listing in blocks of one batch,
    so every actor gets work) -> ``map_batches`` decode function: the same decoding as
    training (shard rows: ``decode_chw`` + the eval resize of :mod:`pipelines.data.stream`; raw
    files: the guarded :func:`~pipelines.data.validate.decode_image` of prepare, with EXIF,
    mode conversion and the pixel cap) to uint8 pixels at the model's size -> ``map_batches``
    with :class:`BatchPredictor` on a fixed pool of ``infer.num_actors`` actors
    (``ActorPoolStrategy(size=...)``; ``infer.cpus_per_actor`` CPUs each, one GPU each with
    ``infer.use_gpu``), which normalises with the packaged mean/std exactly as evaluation does
    and runs the model -> ``write_parquet``. Ray Data fuses the decode function into the actor
    stage (one process per actor decodes and predicts). A file that cannot be read or decoded
    becomes a row with ``error`` set and empty predictions; it never fails the job.

Output (``<storage.uri>/predictions/<job>/``)::

    manifest.json                       written last, atomically: the job is complete
    _attempt-<time>-<id>/*.parquet      the rows of the attempt the manifest names

    columns: input_id, source, label (top-1 index, -1 on error), label_name, topk_labels
    (list<string>), topk_probs (list<float>), error ("" when ok), model_name, model_version,
    true_label (-1 when unknown)

The job name is ``--job`` / ``infer.job_name``, else ``<model>-v<version>-<input digest>``.
Every run writes into a fresh attempt folder, so a crashed or killed run leaves only a folder
that no manifest names, and a previous complete result stays readable until the new manifest
replaces it. Read through the manifest: :func:`load_predictions`, or any Parquet reader on the
folder its ``data`` entry names (the CLI prints that URI last). After publishing, attempt folders
the manifest does not name are deleted. Run one job of a given name at a time.

Exactly once
    Ray Data restarts a killed actor and retries its in-flight tasks (its defaults for actor
    pools: unlimited restarts and system-failure retries), so a row may in principle be
    written twice and a lost block would be missing. The job therefore checks its own output
    before publishing: it reads back the ``input_id`` column of every written file, rewrites
    files holding rows already seen (keeping the first copy; a retried row is a recomputation
    with the same pinned model), and publishes the manifest only when the output ids equal the
    input ids, each once. Otherwise it fails with :class:`InferError` and publishes nothing.

Tracking: one MLflow run per job attempt (tag ``pipeline.task=infer``) with the model URI and
version, the input, counts, accuracy and images/s, and the manifest as an artifact.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import re
import tempfile
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from . import storage as st
from . import tracking
from .config import PipelineConfig, StorageConfig
from .data.shards import FORMAT as DATASET_FORMAT
from .data.stream import read_shards
from .errors import ConfigError, DataError, UserError

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

TASK = "infer"
MANIFEST = "manifest.json"
FORMAT = "vit-pipeline.predictions/1"
ATTEMPT_PREFIX = "_attempt-"
MIN_ROWS_PER_FILE = 50_000  # Ray Data packs at least this many rows per Parquet file when it can
MODEL_FILES = ("config", "weights", "class_names", "preprocessing")  # python_function artifacts we read
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_MODEL_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>[0-9]+))/?$")

OUTPUT_SCHEMA = pa.schema([
    ("input_id", pa.string()),
    ("source", pa.string()),
    ("label", pa.int64()),
    ("label_name", pa.string()),
    ("topk_labels", pa.list_(pa.string())),
    ("topk_probs", pa.list_(pa.float32())),
    ("error", pa.string()),
    ("model_name", pa.string()),
    ("model_version", pa.string()),
    ("true_label", pa.int64()),
])


class InferError(UserError):
    """The inference job cannot run or did not produce exactly one row per input."""


# --------------------------------------------------------------------------------------------
# Result
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Model: resolve once, fetch the data files
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvedModel:
    """One registered model version, pinned; small and picklable (shipped to the actors)."""

    name: str
    version: str
    requested_uri: str  # what the user asked for, e.g. models:/vit@champion
    download_uri: str  # the version's artifact location (file://, s3://, mlflow-artifacts:/...)
    tracking_uri: str
    class_names: tuple[str, ...]
    channels: int
    image_size: tuple[int, int]  # (H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    max_pixels: int
    alpha_background: int

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def parse_model_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/NAME@ALIAS`` -> (NAME, None, ALIAS); ``models:/NAME/VERSION`` -> (NAME, VERSION, None)."""
    m = _MODEL_URI.match(uri.strip()) if isinstance(uri, str) else None
    if not m:
        raise ConfigError(
            f"model URI {uri!r} is not of the form models:/NAME@ALIAS or models:/NAME/VERSION "
            "(e.g. --model models:/vit-fashion-mnist@champion)"
        )
    return m.group("name"), m.group("version"), m.group("alias")


def resolve_model(cfg: PipelineConfig, model_uri: str, client: Any = None) -> ResolvedModel:
    """Pin ``model_uri`` to one registered version and read its preprocessing and class names."""
    from mlflow.exceptions import MlflowException

    from .register import registry_client, resolve_uris

    name, version, alias = parse_model_uri(model_uri)
    tracking_uri, registry_uri = resolve_uris(cfg)
    client = client or registry_client(cfg)
    try:
        if alias is not None:
            version = str(client.get_model_version_by_alias(name, alias).version)
        else:
            client.get_model_version(name, version)
        download_uri = client.get_model_version_download_uri(name, version)
    except MlflowException as exc:
        what = f"alias @{alias}" if alias else f"version {version}"
        raise InferError(
            f"model {model_uri!r}: the registry at {_shown(registry_uri)} has no {what} of {name!r} "
            f"({_first_line(exc)}); register one with `python -m pipelines register` or fix infer.model_uri / --model"
        ) from None
    with tempfile.TemporaryDirectory(prefix="vit-infer-model-") as tmp:
        try:
            paths = fetch_model_files(download_uri, tracking_uri, Path(tmp), ("class_names", "preprocessing", "config"))
            class_names = tuple(str(c) for c in json.loads(Path(paths["class_names"]).read_text()))
            prep = json.loads(Path(paths["preprocessing"]).read_text())
            arch = json.loads(Path(paths["config"]).read_text())["config"]
        except (OSError, ValueError, KeyError, MlflowException) as exc:
            raise InferError(
                f"model {name} v{version} at {_shown(download_uri)} is not a ViT pyfunc package "
                f"({type(exc).__name__}: {_first_line(exc)}); register it with `python -m pipelines register`"
            ) from None
    size = prep["image_size"]
    hw = (int(size), int(size)) if isinstance(size, (int, float)) else (int(size[0]), int(size[1]))
    if len(class_names) != int(arch.get("num_classes", len(class_names))):
        raise InferError(f"model {name} v{version} lists {len(class_names)} class names for "
                         f"{arch.get('num_classes')} outputs; re-register it")
    return ResolvedModel(
        name=name, version=str(version), requested_uri=model_uri, download_uri=download_uri,
        tracking_uri=tracking_uri, class_names=class_names, channels=int(prep["channels"]), image_size=hw,
        mean=tuple(float(v) for v in prep["mean"]), std=tuple(float(v) for v in prep["std"]),
        max_pixels=int(prep.get("max_pixels", cfg.data.max_image_pixels)),
        alpha_background=int(prep.get("alpha_background", cfg.data.alpha_background)),
    )


def fetch_model_files(download_uri: str, tracking_uri: str, dest: Path,
                      keys: Iterable[str] = MODEL_FILES) -> dict[str, str]:
    """Download ``MLmodel`` and the python_function artifacts named ``keys`` into ``dest``.

    Returns ``{key: local path}``. Only plain data files are fetched; the model's code is not."""
    import mlflow
    from mlflow.models import Model

    dest.mkdir(parents=True, exist_ok=True)
    base = download_uri.rstrip("/")
    with _no_progress_bars():
        mlmodel = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=str(dest),
                                                      tracking_uri=tracking_uri)
        artifacts = (Model.load(mlmodel).flavors.get("python_function") or {}).get("artifacts") or {}
        out = {}
        for key in keys:
            if key not in artifacts:
                raise KeyError(f"the model's MLmodel names no {key!r} artifact")
            rel = str(artifacts[key]["path"]).strip("/")
            out[key] = mlflow.artifacts.download_artifacts(artifact_uri=f"{base}/{rel}",
                                                           dst_path=str(dest / Path(rel).parent),
                                                           tracking_uri=tracking_uri)
    return out


def load_model_package(model: ResolvedModel) -> dict[str, bytes]:
    """``{"config": bytes, "weights": bytes}`` of the pinned version, for the actors.

    Both files are parsed here (the architecture, and the safetensors header: names and shapes,
    no tensor data), so a damaged package fails in one line before any actor starts; the
    actors' strict ``load_state_dict`` checks that the two fit each other."""
    from safetensors import safe_open

    from vit_model import ViTConfig

    with tempfile.TemporaryDirectory(prefix="vit-infer-model-") as tmp:
        try:
            paths = fetch_model_files(model.download_uri, model.tracking_uri, Path(tmp), ("config", "weights"))
            config = Path(paths["config"]).read_bytes()
            ViTConfig.from_dict(json.loads(config)["config"])
            with safe_open(paths["weights"], "pt") as f:
                if not list(f.keys()):
                    raise ValueError("the safetensors file holds no tensors")
            weights = Path(paths["weights"]).read_bytes()
        except Exception as exc:
            raise InferError(f"cannot read the model files of {model.uri} at {_shown(model.download_uri)} "
                             f"({type(exc).__name__}: {_first_line(exc)}); re-register the model") from None
    return {"config": config, "weights": weights}


@contextlib.contextmanager
def _no_progress_bars() -> Iterator[None]:
    """Silence MLflow's per-file download progress bars for a few small files, then restore."""
    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    old = os.environ.get(key)
    os.environ[key] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


# --------------------------------------------------------------------------------------------
# Input: a dataset version or a prefix of raw images
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class InferInput:
    """The fixed set of inputs of one job, decided on the driver at job start."""

    uri: str
    kind: str  # "dataset" | "images"
    input_ids: tuple[str, ...] = field(repr=False)
    digest: str = ""
    split: str | None = None  # dataset only
    classes: tuple[str, ...] | None = None  # dataset only
    channels: int | None = None  # dataset only
    shard_uris: tuple[str, ...] = ()  # dataset only
    file_uris: tuple[str, ...] = field(default=(), repr=False)  # images only, aligned with input_ids
    skipped: int = 0  # images only: files without an image extension, or hidden

    @property
    def count(self) -> int:
        return len(self.input_ids)


def resolve_input(cfg: PipelineConfig, input_uri: str, split: str | None = None) -> InferInput:
    """Decide what ``input_uri`` is and list its inputs (see the module doc)."""
    storage = cfg.storage
    uri = str(st.parse_uri(input_uri))
    st.check_bucket(uri, storage)
    manifest_uri = st.join_uri(uri, MANIFEST)
    manifest = None
    if st.exists(manifest_uri, storage):
        manifest = st.read_json(manifest_uri, storage)
    if isinstance(manifest, dict) and manifest.get("format") == DATASET_FORMAT:
        return _dataset_input(cfg, uri, split or cfg.infer.split)
    return _images_input(cfg, uri)


def _dataset_input(cfg: PipelineConfig, uri: str, split: str) -> InferInput:
    from .data.shards import load_version

    version = load_version(uri, cfg.storage)
    if split not in version.manifest["splits"]:
        raise ConfigError(f"dataset {uri} has no split {split!r}; set infer.split to one of "
                          f"{', '.join(version.manifest['splits'])}")
    shards = version.shards(split)
    shard_uris = version.shard_uris(split)
    if version.count(split) == 0 or not shard_uris:
        raise DataError(f"split {split!r} of {uri} is empty; pick another split with --set infer.split=...")
    row_ids: list[int] = []
    for shard_uri in shard_uris:  # one int column per shard: cheap, and catches a damaged version
        fs, path = st.resolve(shard_uri, cfg.storage)
        table = st.with_retries(lambda: pq.read_table(path, filesystem=fs, columns=["row_id"]), shard_uri, "read",
                                cfg.storage)
        row_ids.extend(table.column("row_id").to_pylist())
    ids = tuple(f"{split}/{r}" for r in row_ids)
    if len(set(ids)) != len(ids):
        raise DataError(f"dataset {uri} split {split!r} repeats row ids; re-run prepare into a clean storage.uri")
    h = hashlib.sha256(json.dumps({"dataset": version.version, "split": split,
                                   "shards": [s.sha256 for s in shards]}, sort_keys=True).encode())
    return InferInput(uri=uri, kind="dataset", input_ids=ids, digest=h.hexdigest(), split=split,
                      classes=tuple(version.classes), channels=version.channels, shard_uris=tuple(shard_uris))


def _images_input(cfg: PipelineConfig, uri: str) -> InferInput:
    from .data.validate import IMAGE_EXTENSIONS

    parsed = st.parse_uri(uri)
    fs = st.filesystem(parsed, cfg.storage)
    base = parsed.fs_path.rstrip("/")
    selector = pafs.FileSelector(base, recursive=True, allow_not_found=True)
    infos = st.with_retries(lambda: fs.get_file_info(selector), parsed, "list", cfg.storage)
    entries, skipped = [], 0
    for info in infos:
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(base):].lstrip("/")
        hidden = any(part.startswith(".") for part in rel.split("/"))
        if hidden or os.path.splitext(rel)[1].lower() not in IMAGE_EXTENSIONS:
            skipped += 1
            continue
        mtime = info.mtime_ns if info.mtime_ns is not None else 0
        entries.append((rel, int(info.size or 0), int(mtime)))
    if not entries:
        raise DataError(
            f"no images under {uri} (looked recursively for {', '.join(IMAGE_EXTENSIONS)}; {skipped} other file(s)); "
            "pass a dataset version folder or a prefix that holds images to --input / infer.input"
        )
    entries.sort()
    digest = hashlib.sha256(json.dumps(entries).encode()).hexdigest()  # listing: path, size, mtime
    return InferInput(uri=uri, kind="images", input_ids=tuple(e[0] for e in entries), digest=digest,
                      file_uris=tuple(str(parsed.join(e[0])) for e in entries), skipped=skipped)


# --------------------------------------------------------------------------------------------
# Decode tasks (stateless, Ray tasks): rows -> uint8 pixels at the model's size, or an error
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeSpec:
    """What the decode tasks need from the model's packaged preprocessing."""

    channels: int
    image_size: tuple[int, int]
    max_pixels: int
    alpha_background: int

    @classmethod
    def of(cls, model: ResolvedModel) -> DecodeSpec:
        return cls(model.channels, model.image_size, model.max_pixels, model.alpha_background)


def _decoded_batch(ids: list[str], sources: list[str], true_labels: list[int], pixels: np.ndarray,
                   errors: list[str]) -> dict[str, np.ndarray]:
    return {
        "input_id": np.asarray(ids, dtype=object),
        "source": np.asarray(sources, dtype=object),
        "true_label": np.asarray(true_labels, dtype=np.int64),
        "pixels": pixels,  # (N, C, H, W) uint8; zeros where error != ""
        "error": np.asarray(errors, dtype=object),
    }


def decode_shard_batch(batch: Mapping[str, np.ndarray], spec: DecodeSpec, split: str) -> dict[str, np.ndarray]:
    """Dataset shard rows -> pixels, as evaluation preprocesses them (:mod:`pipelines.data.stream`).

    Runs fused into the model actors, so it leaves torch's thread count alone (the actor's)."""
    from .config import AugmentConfig
    from .data.stream import StreamSpec, build_transform, decode_chw

    h, w = spec.image_size
    n = len(batch["row_id"])
    stream = StreamSpec(size=(h, w), channels=spec.channels, train=False, augment=AugmentConfig(), seed=0,
                        deterministic=True)
    pixels = np.zeros((n, spec.channels, h, w), dtype=np.uint8)
    errors = [""] * n
    transforms: dict[tuple[int, int], Any] = {}
    for i, data in enumerate(batch["image"]):
        try:
            t = decode_chw(bytes(data))
            if t.shape[0] != spec.channels:
                raise ValueError(f"{t.shape[0]} channels, the model takes {spec.channels}")
            hw = (int(t.shape[1]), int(t.shape[2]))
            if hw not in transforms:
                transforms[hw] = build_transform(stream, hw)
            tf = transforms[hw]
            pixels[i] = (tf(t) if tf is not None else t).numpy()
        except Exception as exc:  # a damaged shard row is one error row, not a failed job
            errors[i] = f"cannot decode the stored image ({type(exc).__name__}: {_first_line(exc)})"
    ids = [f"{split}/{int(r)}" for r in batch["row_id"]]
    return _decoded_batch(ids, [str(s) for s in batch["source_id"]], [int(v) for v in batch["label"]], pixels, errors)


def read_decode_files(batch: Mapping[str, np.ndarray], spec: DecodeSpec,
                      storage: StorageConfig) -> dict[str, np.ndarray]:
    """Raw image files -> pixels through prepare's guarded decoder; unreadable files -> errors."""
    from .data.validate import DecodeSettings, InvalidImage, decode_image

    h, w = spec.image_size
    square = h == w
    settings = DecodeSettings(channels=spec.channels, max_pixels=spec.max_pixels, image_size=h if square else None,
                              alpha_background=spec.alpha_background)
    uris = [str(u) for u in batch["source"]]
    n = len(uris)
    pixels = np.zeros((n, spec.channels, h, w), dtype=np.uint8)
    errors = [""] * n
    fs = st.filesystem(uris[0], storage) if n else None
    for i, uri in enumerate(uris):
        try:
            data = st.read_bytes(uri, storage, fs=fs)
        except st.StorageError as exc:
            errors[i] = f"cannot read the file: {exc}"
            continue
        try:
            arr = decode_image(data, uri, settings).pixels
            if not square:  # prepare only crops squares; the packaged model's own resize handles (H, W)
                from .serving import resize_center_crop

                arr = resize_center_crop(arr, (h, w))
            pixels[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
        except InvalidImage as exc:
            errors[i] = str(exc)
        except Exception as exc:  # last line of defence: a decoder bug is a bad file, not a crash
            errors[i] = f"decode failed ({type(exc).__name__}: {_first_line(exc)})"
    return _decoded_batch([str(i) for i in batch["input_id"]], uris, [-1] * n, pixels, errors)


# --------------------------------------------------------------------------------------------
# The model actor
# --------------------------------------------------------------------------------------------


class BatchPredictor:
    """Ray Data callable class: builds the pinned model once per actor, scores decoded batches.

    ``package`` is the object-store reference (:func:`ray.put`) to the version's ``config.json``
    and ``model.safetensors`` bytes, downloaded once by the driver: actors need no access to
    the MLflow store or its artifact location, and a restarted actor rebuilds from the same
    bytes. ``__call__`` takes the decode function's columns and returns an Arrow table in
    :data:`OUTPUT_SCHEMA`, one row per input row; rows with an ``error`` pass through with
    empty predictions.
    """

    def __init__(self, model: ResolvedModel, package: Any, top_k: int, use_gpu: bool = False, threads: int = 1):
        import ray
        import torch
        from safetensors.torch import load as load_safetensors

        from vit_model import VisionTransformer, ViTConfig

        if not use_gpu:
            torch.set_num_threads(max(1, int(threads)))
        files = ray.get(package) if isinstance(package, ray.ObjectRef) else package
        net = VisionTransformer(ViTConfig.from_dict(json.loads(files["config"])["config"]))
        net.load_state_dict(load_safetensors(files["weights"]), strict=True)  # tensors only, nothing unpickled
        self.model_ref = model
        self.top_k = max(1, min(int(top_k), model.num_classes))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.net = net.eval().to(self.device)
        self.class_names = list(model.class_names)
        c = model.channels
        # (C, 1, 1), built like pipelines.data.stream's normalisation so the floats are identical
        self.mean = torch.tensor(model.mean, dtype=torch.float32).expand(c).reshape(c, 1, 1).to(self.device)
        self.std = torch.tensor(model.std, dtype=torch.float32).expand(c).reshape(c, 1, 1).to(self.device)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        import torch

        errors = [str(e) for e in batch["error"]]
        n = len(errors)
        labels = [-1] * n
        names = [""] * n
        topk_names: list[list[str]] = [[] for _ in range(n)]
        topk_probs: list[list[float]] = [[] for _ in range(n)]
        ok = np.flatnonzero(np.asarray([e == "" for e in errors], dtype=bool))
        if ok.size:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["pixels"])[ok])).to(self.device)
            with torch.inference_mode():
                x = x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)  # (N, C, H, W) normalised
                logits = self.net(x).float()  # (N, num_classes)
                probs = logits.softmax(dim=-1)
                top = logits.topk(self.top_k, dim=-1)  # (N, k), sorted by logit
                top_p = probs.gather(1, top.indices)
            idx, p = top.indices.cpu().numpy(), top_p.cpu().numpy()
            for j, row in enumerate(ok):
                labels[row] = int(idx[j, 0])
                names[row] = self.class_names[labels[row]]
                topk_names[row] = [self.class_names[k] for k in idx[j]]
                topk_probs[row] = [float(v) for v in p[j]]
        return pa.Table.from_pydict({
            "input_id": [str(v) for v in batch["input_id"]],
            "source": [str(v) for v in batch["source"]],
            "label": labels,
            "label_name": names,
            "topk_labels": topk_names,
            "topk_probs": topk_probs,
            "error": errors,
            "model_name": [self.model_ref.name] * n,
            "model_version": [self.model_ref.version] * n,
            "true_label": [int(v) for v in batch["true_label"]],
        }, schema=OUTPUT_SCHEMA)


# --------------------------------------------------------------------------------------------
# The Ray Data pipeline
# --------------------------------------------------------------------------------------------


def build_dataset(cfg: PipelineConfig, inputs: InferInput, model: ResolvedModel, package: Any) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: read -> decode -> model actors (nothing runs yet).

    ``package`` is what :class:`BatchPredictor` builds the model from: the object-store
    reference of :func:`load_model_package`'s dict (or the dict itself)."""
    import ray.data

    ic = cfg.infer
    spec = DecodeSpec.of(model)
    if inputs.kind == "dataset":
        fs, _ = st.resolve(inputs.shard_uris[0], cfg.storage)
        paths = [st.parse_uri(u).fs_path for u in inputs.shard_uris]
        # V1 reader, as for training: the default one deadlocks when the cluster's CPUs are held
        # (here: by the model actors, or a sweep's last placement group still being released)
        ds = read_shards(paths, fs, ["image", "label", "row_id", "source_id"])
        # Blocks of at most one batch: Ray Data merges small shards into one block (bytes, not compute,
        # decide its block size), which would leave all but one actor idle.
        ds = ds.repartition(target_num_rows_per_block=ic.batch_size)
        ds = ds.map_batches(decode_shard_batch, fn_kwargs={"spec": spec, "split": inputs.split},
                            batch_size=ic.batch_size, batch_format="numpy", udf_modifying_row_count=False)
    else:
        items = [{"input_id": i, "source": u} for i, u in zip(inputs.input_ids, inputs.file_uris)]
        blocks = max(1, math.ceil(len(items) / ic.batch_size))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(read_decode_files, fn_kwargs={"spec": spec, "storage": cfg.storage},
                            batch_size=ic.batch_size, batch_format="numpy", udf_modifying_row_count=False)
    threads = max(1, int(ic.cpus_per_actor))
    return ds.map_batches(
        BatchPredictor,
        fn_constructor_kwargs={"model": model, "package": package, "top_k": ic.top_k, "use_gpu": ic.use_gpu,
                               "threads": threads},
        compute=ray.data.ActorPoolStrategy(size=ic.num_actors),
        batch_size=ic.batch_size, batch_format="numpy", num_cpus=ic.cpus_per_actor,
        num_gpus=1 if ic.use_gpu else None, udf_modifying_row_count=False,
    )


def check_resources(cfg: PipelineConfig, *, strict: bool = True) -> None:
    """Refuse settings the cluster can never schedule: Ray would wait forever, without an error.

    ``strict=False`` (a cluster we connected to, which may have an autoscaler adding nodes)
    only warns."""
    import ray

    ic = cfg.infer
    res = ray.cluster_resources()
    cpus, gpus = float(res.get("CPU", 0)), float(res.get("GPU", 0))
    problems = []
    if ic.use_gpu and gpus < ic.num_actors:
        problems.append(
            f"infer.use_gpu=true with infer.num_actors={ic.num_actors} needs {ic.num_actors} GPU(s); the Ray cluster "
            f"has {gpus:g}. Set infer.use_gpu=false or lower infer.num_actors"
        )
    need = ic.num_actors * ic.cpus_per_actor + 1  # + one CPU for the read/decode/write tasks
    if need > cpus:
        problems.append(
            f"infer.num_actors={ic.num_actors} x infer.cpus_per_actor={ic.cpus_per_actor:g} plus 1 CPU for reading "
            f"needs {need:g} CPUs; the Ray cluster has {cpus:g}. Lower them or add CPUs (ray.num_cpus)"
        )
    if problems and strict:
        raise ConfigError(problems[0])
    for problem in problems:
        log.warning("%s (waiting for the autoscaler, if the cluster has one)", problem)


# --------------------------------------------------------------------------------------------
# Output: verify exactly-once, publish
# --------------------------------------------------------------------------------------------


def predictions_uri(storage_uri: str, job_name: str) -> str:
    return st.join_uri(storage_uri, "predictions", job_name)


@dataclass(frozen=True)
class Verified:
    files: list[dict[str, Any]]  # [{"path": relative to the data folder, "rows": n}]
    output_count: int
    error_count: int
    duplicates_removed: int
    labelled: int  # rows with a known true label
    correct: int


def verify_output(data_uri: str, expected_ids: Iterable[str], storage: StorageConfig) -> Verified:
    """Check the written rows against the inputs; drop rows written twice; fail on a gap.

    Reads the ``input_id`` (and label) columns of every Parquet file in ``data_uri``. A file that
    repeats an id already seen is rewritten without it (atomically). Raises :class:`InferError`
    when an input has no row or a row belongs to no input."""
    parsed = st.parse_uri(data_uri)
    fs = st.filesystem(parsed, storage)
    files = [f for f in st.list_files(data_uri, storage)
             if f.relpath.endswith(".parquet") and not f.relpath.rsplit("/", 1)[-1].startswith((".", "_"))]
    expected = set(expected_ids)
    seen: set[str] = set()
    out_files: list[dict[str, Any]] = []
    output = errors = dupes = labelled = correct = 0
    columns = ["input_id", "label", "true_label", "error"]
    for entry in files:
        path = st.parse_uri(entry.uri).fs_path
        table = st.with_retries(lambda: pq.read_table(path, filesystem=fs, columns=columns), entry.uri, "read", storage)
        ids = table.column("input_id").to_pylist()
        keep = np.ones(len(ids), dtype=bool)
        for i, v in enumerate(ids):
            if v in seen:
                keep[i] = False
            else:
                seen.add(v)
        if not keep.all():
            dupes += int((~keep).sum())
            full = st.with_retries(lambda: pq.read_table(path, filesystem=fs), entry.uri, "read", storage)
            full, table = full.filter(pa.array(keep)), table.filter(pa.array(keep))
            if full.num_rows == 0:
                st.with_retries(lambda: fs.delete_file(path), entry.uri, "delete", storage)
                continue
            buf = io.BytesIO()
            pq.write_table(full, buf)
            st.write_bytes(entry.uri, buf.getvalue(), storage)
        n = table.num_rows
        err = np.asarray([e != "" for e in table.column("error").to_pylist()], dtype=bool)
        label = table.column("label").to_numpy()
        true = table.column("true_label").to_numpy()
        output += n
        errors += int(err.sum())
        labelled += int((true >= 0).sum())
        correct += int(((label == true) & (true >= 0) & ~err).sum())
        out_files.append({"path": entry.relpath, "rows": n})
    missing, unknown = expected - seen, seen - expected
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"{len(missing)} input(s) have no prediction row (e.g. {sorted(missing)[:3]})")
        if unknown:
            parts.append(f"{len(unknown)} row(s) match no input (e.g. {sorted(unknown)[:3]})")
        raise InferError(
            f"inference output at {data_uri} is incomplete: {'; '.join(parts)}; nothing was published — rerun the job"
        )
    return Verified(out_files, output, errors, dupes, labelled, correct)


def publish_manifest(manifest_uri: str, manifest: Mapping[str, Any], storage: StorageConfig) -> None:
    """Write the manifest (atomic; the job's last write): from now on the job is complete."""
    st.write_json(manifest_uri, dict(manifest), storage)


def load_manifest(job_uri: str, storage: StorageConfig | None = None) -> dict[str, Any]:
    """The manifest of a complete job; :class:`InferError` if the job has none (never completed)."""
    try:
        manifest = st.read_json(st.join_uri(job_uri, MANIFEST), storage)
    except st.ObjectNotFound:
        raise InferError(f"no complete inference job at {job_uri} (no {MANIFEST}); run `python -m pipelines infer` "
                         "or pick a job listed under <storage.uri>/predictions/") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InferError(f"{st.join_uri(job_uri, MANIFEST)} is not a {FORMAT} manifest")
    return manifest


def load_predictions(job_uri: str, storage: StorageConfig | None = None,
                     columns: list[str] | None = None) -> pa.Table:
    """All prediction rows of a complete job, read from the files its manifest lists."""
    manifest = load_manifest(job_uri, storage)
    tables = []
    for f in manifest["files"]:
        uri = st.join_uri(job_uri, f["path"])
        fs, path = st.resolve(uri, storage)
        tables.append(st.with_retries(lambda: pq.read_table(path, filesystem=fs, columns=columns), uri, "read",
                                      storage))
    if not tables:
        return OUTPUT_SCHEMA.empty_table() if columns is None else OUTPUT_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)


def _cleanup_attempts(job_uri: str, keep: str, storage: StorageConfig) -> None:
    """Delete attempt folders other than ``keep`` (failed runs, replaced results). Best effort."""
    for folder in st.list_dirs(job_uri, storage):
        if folder.startswith(ATTEMPT_PREFIX) and folder != keep:
            try:
                st.delete_tree(st.join_uri(job_uri, folder), storage)
            except st.StorageError as exc:
                log.warning("could not delete the old attempt %s: %s", folder, exc)


# --------------------------------------------------------------------------------------------
# The task
# --------------------------------------------------------------------------------------------


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
    from .register import check_tracking_server, registry_client, resolve_uris
    from .train import ensure_ray

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
    tracking_uri, _ = resolve_uris(cfg)
    check_tracking_server(tracking_uri)
    client = registry_client(cfg)

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

    run_id = _start_mlflow_run(cfg, client, job, attempt, model, inputs)
    try:
        say(f"job {job}: {cfg.infer.num_actors} actor(s) x {cfg.infer.cpus_per_actor:g} CPU"
            f"{' + 1 GPU' if cfg.infer.use_gpu else ''}, batch {cfg.infer.batch_size}, writing {data_uri}")
        ray_started = time.monotonic()
        import ray

        ds = build_dataset(cfg, inputs, model, ray.put(package))
        fs, path = st.resolve(data_uri, cfg.storage)
        ds.write_parquet(path, filesystem=fs, min_rows_per_file=MIN_ROWS_PER_FILE)
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
    _cleanup_attempts(job_uri, attempt, cfg.storage)
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
        "schema": [f.name for f in OUTPUT_SCHEMA],
        "input": {"uri": inputs.uri, "kind": inputs.kind, "split": inputs.split, "digest": inputs.digest,
                  "skipped_files": inputs.skipped},
        "input_count": result.input_count,
        "output_count": result.output_count,
        "error_count": result.error_count,
        "duplicates_removed": result.duplicates_removed,
        "model": {"requested_uri": model.requested_uri, "uri": model.uri, "name": model.name,
                  "version": model.version, "artifact_uri": _shown(model.download_uri),
                  "class_names": list(model.class_names)},
        "model_version": model.version,
        "input_digest": result.input_digest,
        "accuracy": result.accuracy,
        "correct": result.correct,
        "top_k": min(cfg.infer.top_k, model.num_classes),
        "settings": {"batch_size": cfg.infer.batch_size, "num_actors": cfg.infer.num_actors,
                     "cpus_per_actor": cfg.infer.cpus_per_actor, "use_gpu": cfg.infer.use_gpu},
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
                    _first_line(exc))


def _log_results(client: Any, run_id: str, result: InferResult, manifest: Mapping[str, Any]) -> None:
    metrics = {"input_count": result.input_count, "output_count": result.output_count,
               "error_count": result.error_count, "images_per_s": result.images_per_s, "seconds": result.seconds,
               "duplicates_removed": result.duplicates_removed, **result.timings}
    if result.accuracy is not None:
        metrics["accuracy"] = result.accuracy
    tracking.log_metrics(client, run_id, metrics, step=0)
    tracking.log_json(client, run_id, dict(manifest), "predictions_manifest.json")
    tracking.end_run(client, run_id, "FINISHED")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _shown(uri: str) -> str:
    """A URI safe to print: any user:password@ part removed."""
    parts = urllib.parse.urlsplit(str(uri))
    if parts.username or parts.password:
        host = (parts.hostname or "") + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit((parts.scheme, host, parts.path, "", ""))
    return str(uri)


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input", dest="input_uri", default=None, metavar="URI",
                        help="dataset version folder or a prefix of raw images, local or s3:// (default: infer.input)")
    parser.add_argument("--model", dest="model_uri", default=None, metavar="URI",
                        help="models:/NAME@ALIAS or models:/NAME/VERSION (default: infer.model_uri, else "
                             "models:/<registry.model_name>@champion)")
    parser.add_argument("--job", dest="job_name", default=None, metavar="NAME",
                        help="job name: output under <storage.uri>/predictions/NAME/ (default: infer.job_name, else "
                             "<model>-v<version>-<input digest>)")


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
