"""What runs on the cluster in a batch-inference job: the loaders, the model actor, and the Ray
Data pipeline that connects them. Imports neither MLflow nor the task module.

work items (shard row ranges of one batch each, or the file listing) -> :class:`BatchPredictor` on
a fixed pool of actors, which builds the pinned model once from the object store, loads each
batch itself (reads the rows and decodes them: the data plane's eval preprocessing for shard rows,
:mod:`pipelines.imaging` for raw files) and returns one :data:`OUTPUT_SCHEMA` row per input; an
unreadable input is a row with ``error`` set. With ``infer.explain`` the actors also write each
input's attention overlay (:func:`vit_model.explain`) to ``<explain folder>/<input id>.png`` and
add its URI as the ``explain_uri`` column.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import numpy as np
import pyarrow as pa

from vit_model import arch_from_dict, build_model, explain, to_preferred_memory_format

from .. import storage as st
from ..config import AugmentConfig, PipelineConfig, StorageConfig
from ..data.stream import StreamSpec, build_transform, decode_chw
from ..engine import with_tta, zero_pixel_fill
from ..errors import ConfigError, DataError, first_line
from ..imaging import InvalidImage, decode
from ..plots import overlay_png
from .inputs import InferInput
from .model import ResolvedModel

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

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
EXPLAIN_FIELD = pa.field("explain_uri", pa.string())  # only with infer.explain: the row's overlay PNG ("" on error)
EXPLAIN_FOLDER = "explain"  # <attempt folder>/explain/<input id>.png


def output_schema(explain: bool) -> pa.Schema:
    """The prediction rows' schema: :data:`OUTPUT_SCHEMA`, plus ``explain_uri`` with ``infer.explain``."""
    return OUTPUT_SCHEMA.append(EXPLAIN_FIELD) if explain else OUTPUT_SCHEMA


def explain_file_uri(folder_uri: str, input_id: str) -> str:
    """Where the overlay of ``input_id`` goes: ``<folder>/<input id>.png``, each path part of the
    id percent-quoted (``test/17`` -> ``test/17.png``, ``a b/c.jpg`` -> ``a%20b/c.jpg.png``)."""
    parts = [quote(p, safe="._-") for p in str(input_id).split("/") if p]
    parts = [p if p not in (".", "..") else p.replace(".", "%2E") for p in parts] or ["_"]
    return st.join_uri(folder_uri, *parts[:-1], parts[-1] + ".png")


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
            errors[i] = f"cannot decode the stored image ({type(exc).__name__}: {first_line(exc)})"
    ids = [f"{split}/{int(r)}" for r in batch["row_id"]]
    return _decoded_batch(ids, [str(s) for s in batch["source_id"]], [int(v) for v in batch["label"]], pixels, errors)


SHARD_COLUMNS = ["image", "label", "row_id", "source_id"]


def shard_slices(inputs: InferInput, rows_per_slice: int) -> list[dict[str, Any]]:
    """The dataset path's work items: ``{"shard", "start", "stop"}`` row ranges of at most
    ``rows_per_slice`` rows (one batch), in shard order, covering every row of every shard once."""
    step = max(1, int(rows_per_slice))
    return [{"shard": uri, "start": start, "stop": min(start + step, rows)}
            for uri, rows in zip(inputs.shard_uris, inputs.shard_rows) for start in range(0, rows, step)]


def read_shard_rows(uri: str, start: int, stop: int, storage: StorageConfig, fs: Any = None) -> pa.Table:
    """Rows ``[start, stop)`` of one Parquet shard: only the row groups that hold them are read."""
    import pyarrow.parquet as pq

    fs_path = st.parse_uri(uri).fs_path
    fs = fs or st.filesystem(uri, storage)

    def read() -> tuple[pa.Table | None, int, int]:
        """(the rows' row groups or None if the range is not in the shard, the shard's rows, first row read)"""
        with fs.open_input_file(fs_path) as f:
            pf = pq.ParquetFile(f)
            total = pf.metadata.num_rows
            if not 0 <= start < stop <= total:
                return None, total, 0
            groups, first, offset = [], 0, 0
            for g in range(pf.metadata.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if offset < stop and offset + n > start:
                    first = offset if not groups else first
                    groups.append(g)
                offset += n
            return pf.read_row_groups(groups, columns=SHARD_COLUMNS), total, first

    table, rows, first = st.with_retries(read, uri, "read", storage)
    if table is None:
        raise DataError(f"shard {uri} has {rows} rows, the job asked for rows {start}-{stop}: it changed after the job "
                        "started; run the job again")
    return table.slice(start - first, stop - start)


def read_decode_shard_rows(batch: Mapping[str, np.ndarray], spec: DecodeSpec, storage: StorageConfig,
                           split: str) -> dict[str, np.ndarray]:
    """Work items of :func:`shard_slices` -> their rows read from the shards and decoded
    (:func:`decode_shard_batch`). :class:`BatchPredictor` calls it in the model actor: no read
    tasks, no copy of the encoded images through the object store."""
    uris = [str(u) for u in batch["shard"]]
    fs = st.filesystem(uris[0], storage) if uris else None
    parts = [read_shard_rows(u, int(a), int(b), storage, fs=fs)
             for u, a, b in zip(uris, batch["start"], batch["stop"])]
    table = pa.concat_tables(parts) if parts else pa.table({c: [] for c in SHARD_COLUMNS})
    columns = {c: table.column(c).to_numpy(zero_copy_only=False) for c in SHARD_COLUMNS}
    return decode_shard_batch(columns, spec, split)


def read_decode_files(batch: Mapping[str, np.ndarray], spec: DecodeSpec,
                      storage: StorageConfig) -> dict[str, np.ndarray]:
    """Raw image files -> pixels through prepare's guarded decoder; unreadable files -> errors."""
    h, w = spec.image_size
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
            arr = decode(data, channels=spec.channels, max_pixels=spec.max_pixels,
                         alpha_background=spec.alpha_background, size=(h, w)).pixels
            pixels[i] = arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)  # (H, W[, C]) -> (C, H, W)
        except InvalidImage as exc:
            errors[i] = str(exc)
        except Exception as exc:  # last line of defence: a decoder bug is a bad file, not a crash
            errors[i] = f"decode failed ({type(exc).__name__}: {first_line(exc)})"
    return _decoded_batch([str(i) for i in batch["input_id"]], uris, [-1] * n, pixels, errors)


class BatchPredictor:
    """Ray Data callable class: builds the pinned model once per actor, scores decoded batches.

    ``package`` is the object-store reference (:func:`ray.put`) to the version's ``config.json``
    and ``model.safetensors`` bytes, downloaded once by the driver: actors need no access to
    the MLflow store or its artifact location, and a restarted actor rebuilds from the same
    bytes. ``__call__`` takes the decode function's columns and returns an Arrow table in
    :data:`OUTPUT_SCHEMA`, one row per input row; rows with an ``error`` pass through with
    empty predictions.

    ``explain_uri`` (a folder) turns on the attention overlays: the model then runs once per batch
    through :func:`vit_model.explain` (eager attention: slower), each scored row's overlay is
    written atomically to :func:`explain_file_uri` (a retried task rewrites the same bytes) and
    its URI fills the ``explain_uri`` column.
    """

    def __init__(self, model: ResolvedModel, package: Any, top_k: int, use_gpu: bool = False, threads: int = 1,
                 explain_uri: str | None = None, storage: StorageConfig | None = None, tta: str = "none", tta_shift: int = 2,
                 loader: Callable[..., dict[str, np.ndarray]] | None = None, loader_kwargs: Mapping[str, Any] | None = None):
        import ray  # here: the actor's process pays for these imports, not the driver's CLI
        import torch
        from safetensors.torch import load as load_safetensors

        if not use_gpu:
            torch.set_num_threads(max(1, int(threads)))
        files = ray.get(package) if isinstance(package, ray.ObjectRef) else package
        net = build_model(arch_from_dict(json.loads(files["config"])))
        net.load_state_dict(load_safetensors(files["weights"]), strict=True)  # tensors only, nothing unpickled
        self.model_ref = model
        self.top_k = max(1, min(int(top_k), model.num_classes))
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.net = to_preferred_memory_format(net.eval().to(self.device))
        self.class_names = list(model.class_names)
        c = model.channels
        # (C, 1, 1), built like pipelines.data.stream's normalisation so the floats are identical
        self.mean = torch.tensor(model.mean, dtype=torch.float32).expand(c).reshape(c, 1, 1).to(self.device)
        self.std = torch.tensor(model.std, dtype=torch.float32).expand(c).reshape(c, 1, 1).to(self.device)
        # the model, or its mean probabilities over views (mirror, translations padded with black)
        self.scorer = with_tta(self.net, tta, shift=tta_shift, fill=zero_pixel_fill(model.mean, model.std))
        self.tta = tta
        self.explain_uri = explain_uri
        self.storage = storage
        self.schema = output_schema(explain_uri is not None)
        self.loader, self.loader_kwargs = loader, dict(loader_kwargs or {})

    def __call__(self, batch: Mapping[str, np.ndarray]) -> pa.Table:
        import torch

        if self.loader is not None:  # work items (shard row ranges, file URIs) -> decoded pixels
            batch = self.loader(batch, **self.loader_kwargs)
        errors = [str(e) for e in batch["error"]]
        n = len(errors)
        labels = [-1] * n
        names = [""] * n
        topk_names: list[list[str]] = [[] for _ in range(n)]
        topk_probs: list[list[float]] = [[] for _ in range(n)]
        ok = np.flatnonzero(np.asarray([e == "" for e in errors], dtype=bool))
        if ok.size:
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(batch["pixels"])[ok])).to(self.device)
            heat = None
            with torch.inference_mode():
                x = x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)  # (N, C, H, W) normalised
                if self.explain_uri is None:
                    logits = self.scorer(x).float()  # (N, num_classes): logits, or log-probabilities with TTA
                else:
                    logits, heat = explain(self.net, x)  # + (N, H, W) attention heatmaps in [0, 1]
                    logits = logits.float() if self.tta == "none" else self.scorer(x).float()
                probs = logits.softmax(dim=-1)
                top = logits.topk(self.top_k, dim=-1)  # (N, k), sorted by logit
                top_p = probs.gather(1, top.indices)
            idx, p = top.indices.cpu().numpy(), top_p.cpu().numpy()
            for j, row in enumerate(ok):
                labels[row] = int(idx[j, 0])
                names[row] = self.class_names[labels[row]]
                topk_names[row] = [self.class_names[k] for k in idx[j]]
                topk_probs[row] = [float(v) for v in p[j]]
        columns: dict[str, list] = {}
        if self.explain_uri is not None:
            columns["explain_uri"] = self._write_overlays(batch, ok, heat)
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
            **columns,
        }, schema=self.schema)

    def _write_overlays(self, batch: Mapping[str, np.ndarray], ok: np.ndarray, heat: Any) -> list[str]:
        """One overlay PNG per scored row (the decoded pixels under its heatmap); their URIs."""
        uris = [""] * len(batch["input_id"])
        if heat is None:
            return uris
        heat = heat.cpu().numpy()
        pixels = np.asarray(batch["pixels"])
        for j, row in enumerate(ok):
            uri = explain_file_uri(self.explain_uri, str(batch["input_id"][row]))
            st.write_bytes(uri, overlay_png(pixels[row].astype(np.float32) / 255.0, heat[j]), self.storage)
            uris[row] = uri
        return uris


# --------------------------------------------------------------------------------------------
# The Ray Data pipeline
# --------------------------------------------------------------------------------------------


def build_dataset(cfg: PipelineConfig, inputs: InferInput, model: ResolvedModel, package: Any,
                  explain_uri: str | None = None) -> ray.data.Dataset:
    """The lazy Ray Data pipeline: read -> decode -> model actors (nothing runs yet).

    ``package`` is what :class:`BatchPredictor` builds the model from: the object-store
    reference of :func:`load_model_package`'s dict (or the dict itself). ``explain_uri``: the
    folder for the attention overlays (``infer.explain``), None for none."""
    import ray.data

    ic = cfg.infer
    spec = DecodeSpec.of(model)
    if inputs.kind == "dataset":
        # One work item per batch of shard rows; the actors read them from the shards themselves
        items: list[dict[str, Any]] = shard_slices(inputs, ic.batch_size)
        loader, loader_kwargs, items_per_call = read_decode_shard_rows, {"storage": cfg.storage, "split": inputs.split}, 1
    else:
        items = [{"input_id": i, "source": u} for i, u in zip(inputs.input_ids, inputs.file_uris)]
        loader, loader_kwargs, items_per_call = read_decode_files, {"storage": cfg.storage}, ic.batch_size
    # One block per call: Ray Data would otherwise merge the small item blocks (bytes, not compute,
    # decide its block size) and leave all but one actor idle.
    ds = ray.data.from_items(items, override_num_blocks=max(1, math.ceil(len(items) / items_per_call)))
    threads = max(1, int(ic.cpus_per_actor))
    ds = ds.map_batches(
        BatchPredictor,
        fn_constructor_kwargs={"model": model, "package": package, "top_k": ic.top_k, "use_gpu": ic.use_gpu,
                               "threads": threads, "explain_uri": explain_uri, "storage": cfg.storage,
                               "tta": ic.tta, "tta_shift": ic.tta_shift, "loader": loader, "loader_kwargs": {"spec": spec, **loader_kwargs}},
        compute=ray.data.ActorPoolStrategy(size=ic.num_actors),
        batch_size=items_per_call, batch_format="numpy", num_cpus=ic.cpus_per_actor,
        num_gpus=1 if ic.use_gpu else None, udf_modifying_row_count=True,
    )
    # An error the actors raise (e.g. a shard that changed since job start) reaches the driver as
    # itself, not as Ray Data's UserCodeException, whose pickled form drops its cause: infer()
    # then shows the error's one line. The setting is this dataset's (Ray Data copies the context).
    ds.context.raise_original_map_exception = True
    return ds


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
    need = ic.num_actors * ic.cpus_per_actor + 1  # + one CPU for the tasks that write the rows
    if need > cpus:
        problems.append(
            f"infer.num_actors={ic.num_actors} x infer.cpus_per_actor={ic.cpus_per_actor:g} plus 1 CPU for writing "
            f"needs {need:g} CPUs; the Ray cluster has {cpus:g}. Lower them or add CPUs (ray.num_cpus)"
        )
    if problems and strict:
        raise ConfigError(problems[0])
    for problem in problems:
        log.warning("%s (waiting for the autoscaler, if the cluster has one)", problem)
