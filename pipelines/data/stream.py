"""Streaming a dataset version into training: Ray Data for Ray Train, and a Ray-free iterator.

Driver side: :func:`build_dataset` (read the manifest's shards -> optional decoded cache in the
object store -> per-epoch seeded shuffle -> decode + ``torchvision.transforms.v2`` augmentation
-> normalise) and :func:`train_data_config` for the ``TorchTrainer``. Worker side: one
:func:`iter_epoch` call per epoch over ``get_dataset_shard``. :func:`iter_local_batches` gives
the same batches without Ray (tests, evaluation, torchrun). Determinism, what resume reproduces,
and exactly-once per epoch: docs/data.md, "Streaming into training".
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from .. import storage as st
from ..config import AUTO_AUGMENT, AugmentConfig, PipelineConfig, StorageConfig
from ..errors import ConfigError, DataError
from .augment import batched_applies, crop_flip, erase_, splitmix64, uniforms
from .shards import DatasetVersion, iter_shard_batches, verify_split

if TYPE_CHECKING:
    import ray.data
    import ray.train

log = logging.getLogger(__name__)

READ_COLUMNS = ["image", "label", "row_id"]
MAP_BATCH_SIZE = 512
BLOCK_BYTES = 2 * 2**20  # target encoded bytes per Ray block
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 256, 8192



# --------------------------------------------------------------------------------------------
# Decode + augment (shared by the Ray and the plain paths)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StreamSpec:
    """What the per-batch preprocessing needs; small and picklable (shipped to Ray tasks)."""

    size: tuple[int, int]  # output (H, W)
    channels: int
    train: bool  # augment (train) or only resize/normalise (eval)
    augment: AugmentConfig
    seed: int
    deterministic: bool  # seed augmentation from (seed, row ids); False = fresh entropy

    @property
    def mean(self) -> torch.Tensor:
        return _per_channel(self.augment.mean, self.channels, "data.augment.mean")

    @property
    def std(self) -> torch.Tensor:
        return _per_channel(self.augment.std, self.channels, "data.augment.std")


def _per_channel(values: tuple[float, ...], channels: int, key: str) -> torch.Tensor:
    if len(values) not in (1, channels):
        raise ConfigError(f"{key} has {len(values)} values; give 1 or {channels} (one per channel)")
    t = torch.tensor(values, dtype=torch.float32)
    return t.expand(channels).reshape(channels, 1, 1).clone()


def stream_spec(version: DatasetVersion, cfg: PipelineConfig, train: bool) -> StreamSpec:
    """Resolve the output size/channels and validate the augmentation settings."""
    aug = cfg.data.augment
    if aug.auto_augment not in AUTO_AUGMENT:
        raise ConfigError(
            f"data.augment.auto_augment={aug.auto_augment!r} is not supported; use null, 'trivial' or 'randaugment'"
        )
    size = cfg.model.args.get("img_size") or cfg.data.image_size
    stored = version.image_size
    if size:
        out = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    elif stored is not None:
        out = stored
    else:
        raise ConfigError(
            f"the images of {version.uri} have several sizes; set data.image_size (at prepare) or model.args.img_size"
        )
    spec = StreamSpec(out, version.channels, train, aug, cfg.train.seed, deterministic=cfg.data.shuffle or not train)
    spec.mean, spec.std  # noqa: B018 - validate lengths now, on the driver
    return spec


def build_transform(spec: StreamSpec, stored_hw: tuple[int, int]) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Per-image ops on a uint8 (C, H, W) tensor -> uint8 (C, *spec.size); None if nothing to do.

    torchvision is imported only when there is an op: evaluation and inference at the stored size
    (the common case) do not pay its ~1 s import in every worker."""
    aug, size = spec.augment, list(spec.size)
    resize = tuple(stored_hw) != tuple(spec.size)
    if not spec.train and not resize:
        return None
    from torchvision.transforms import v2

    ops: list[Any] = []
    if spec.train and aug.random_resized_crop:
        ops.append(v2.RandomResizedCrop(size, scale=tuple(aug.crop_scale), antialias=True))
    else:
        if resize:
            ops += [v2.Resize(min(size), antialias=True), v2.CenterCrop(size)]
        if spec.train and aug.random_crop_padding:
            ops.append(v2.RandomCrop(size, padding=aug.random_crop_padding))
    if spec.train and aug.hflip > 0:
        ops.append(v2.RandomHorizontalFlip(aug.hflip))
    if spec.train and aug.auto_augment == "trivial":
        ops.append(v2.TrivialAugmentWide())
    elif spec.train and aug.auto_augment == "randaugment":
        ops.append(v2.RandAugment(magnitude=aug.randaugment_magnitude))
    return v2.Compose(ops) if ops else None


def decode_chw(data: bytes) -> torch.Tensor:
    """Shard PNG bytes -> uint8 (C, H, W) tensor."""
    with Image.open(io.BytesIO(data), formats=("PNG",)) as img:
        t = torch.from_numpy(np.array(img))  # np.array: a writable copy
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)  # (H, W[, C]) -> (C, H, W)


def batch_seed(seed: int, row_ids: np.ndarray) -> int:
    """A 63-bit seed from the global seed and the batch's row ids (in order)."""
    h = hashlib.sha256(int(seed).to_bytes(8, "little", signed=True))
    h.update(np.ascontiguousarray(row_ids, dtype=np.int64).tobytes())
    return int.from_bytes(h.digest()[:8], "little") & ((1 << 63) - 1)


_MASK64 = (1 << 64) - 1


def sample_seeds(seed: int, epoch: int, row_ids: np.ndarray) -> np.ndarray:
    """One 63-bit augmentation seed per row from ``(seed, epoch, row_id)``: a row's augmentation
    in an epoch does not depend on its batch, its rank or where an interrupted epoch resumed."""
    base = splitmix64(np.array([int(seed) & _MASK64], dtype=np.uint64))
    base = splitmix64(base ^ np.uint64(int(epoch) & _MASK64))
    ids = np.asarray(row_ids, dtype=np.int64).astype(np.uint64)
    return (splitmix64(base ^ ids) >> np.uint64(1)).astype(np.int64)


def preprocess_batch(batch: dict[str, np.ndarray], spec: StreamSpec, limit_threads: bool = True,
                     epoch: int | None = None) -> dict[str, np.ndarray]:
    """Shard rows -> model inputs: ``{"image": float32 (N, C, H, W), "label": int64, "row_id": int64}``.

    Runs inside Ray Data's ``map_batches`` tasks (``limit_threads`` keeps torch to one thread per
    task on small machines), in :func:`iter_local_batches` and :class:`SeekableStream`.

    Training augmentation is seeded per batch from ``(train.seed, row ids)`` when ``epoch`` is
    None (the Ray Data path, which does not know the epoch inside its tasks), and per sample from
    ``(train.seed, epoch, row_id)`` (:func:`sample_seeds`) when ``epoch`` is given.
    """
    if limit_threads and torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    row_ids = np.asarray(batch["row_id"], dtype=np.int64)
    (h, w), c = spec.size, spec.channels
    if "pixels" in batch:  # already decoded (see decode_batch / data.cache_decoded)
        stacked = np.ascontiguousarray(batch["pixels"])  # (N, C, H, W) uint8; may be a read-only object-store view
    else:
        images = [decode_chw(b) for b in batch["image"]]
        same = len({tuple(t.shape) for t in images}) == 1
        stacked = np.stack([t.numpy() for t in images]) if images and same else None
    aug = spec.augment
    seeds = _row_seeds(spec, epoch, row_ids) if spec.train else None
    draws = uniforms(seeds) if seeds is not None else None
    if stacked is not None and stacked.shape[1:] == (c, h, w) and (not spec.train or batched_applies(aug)):
        if spec.train:  # crop/flip for the whole batch at once (pipelines.data.augment)
            stacked = crop_flip(stacked, draws, aug.random_crop_padding, aug.hflip)
        x = torch.from_numpy(stacked.astype(np.float32))  # a copy: the input may be read-only
    else:
        pixels = list(torch.from_numpy(np.array(stacked))) if stacked is not None else images
        x = _transform_each(pixels, spec, row_ids, seeds).to(torch.float32)
    x = x.div_(255.0).sub_(spec.mean).div_(spec.std)  # (N, C, H, W) normalised
    if spec.train and aug.random_erasing > 0:
        erase_(x.numpy(), draws, aug.random_erasing)  # in place, through the shared memory
    return {"image": x.numpy(), "label": np.asarray(batch["label"], dtype=np.int64), "row_id": row_ids}


def _row_seeds(spec: StreamSpec, epoch: int | None, row_ids: np.ndarray) -> np.ndarray:
    """Each training row's augmentation seed: from ``(seed, epoch, row id)`` with an epoch, else
    from the batch (``(seed, row ids)``, or fresh entropy when ``spec.deterministic`` is off)."""
    if epoch is not None:
        return sample_seeds(spec.seed, epoch, row_ids)
    base = batch_seed(spec.seed, row_ids) if spec.deterministic else int.from_bytes(os.urandom(8), "little") >> 1
    return sample_seeds(base, 0, row_ids)


def _transform_each(pixels: list[torch.Tensor], spec: StreamSpec, row_ids: np.ndarray,
                    seeds: np.ndarray | None) -> torch.Tensor:
    """The per-image torchvision path (resizes, RandomResizedCrop, auto-augment policies): uint8
    (N, C, *spec.size). Each row's draws come from its seed; torch's global generator is restored."""
    n, (h, w), c = len(pixels), spec.size, spec.channels
    out = torch.empty((n, c, h, w), dtype=torch.uint8)
    transforms: dict[tuple[int, int], Any] = {}
    with torch.random.fork_rng(devices=[]):
        for i, t in enumerate(pixels):
            if t.shape[0] != c:
                raise DataError(f"row {int(row_ids[i])} has {t.shape[0]} channels, the dataset says {c}; re-run prepare")
            hw = (int(t.shape[1]), int(t.shape[2]))
            if hw not in transforms:
                transforms[hw] = build_transform(spec, hw)
            tf = transforms[hw]
            if seeds is not None and tf is not None:
                torch.default_generator.manual_seed(int(seeds[i]))  # CPU only: torch.manual_seed also queues CUDA seeding
            out[i] = tf(t) if tf is not None else t
    return out


# --------------------------------------------------------------------------------------------
# Ray Data
# --------------------------------------------------------------------------------------------


def decode_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shard rows -> ``{"pixels": uint8 (N, C, H, W), "label", "row_id"}`` (one image size)."""
    if torch.get_num_threads() != 1:
        torch.set_num_threads(1)
    pixels = np.stack([decode_chw(b).numpy() for b in batch["image"]])
    return {"pixels": pixels, "label": np.asarray(batch["label"], dtype=np.int64),
            "row_id": np.asarray(batch["row_id"], dtype=np.int64)}


def cache_decoded(version: DatasetVersion, split: str, cfg: PipelineConfig) -> bool:
    """Whether :func:`build_dataset` keeps ``split`` decoded in the object store (``data.cache_decoded``)."""
    if not cfg.data.cache_decoded or version.image_size is None:
        return False
    h, w = version.image_size
    return version.count(split) * version.channels * h * w <= cfg.data.cache_max_bytes


def _read_paths(version: DatasetVersion, split: str, storage: StorageConfig | None) -> tuple[list[str], Any]:
    uris = version.shard_uris(split)
    if not uris:
        raise DataError(f"split {split!r} of {version.uri} is empty; prepare it with more data or use another split")
    fs = st.filesystem(uris[0], storage)
    return [st.parse_uri(u).fs_path for u in uris], fs


def build_dataset(version: DatasetVersion, split: str, cfg: PipelineConfig, *, train: bool | None = None,
                  start_epoch: int = 0) -> ray.data.Dataset:
    """A Ray Data dataset of model-ready batches for ``split``.

    ``train`` (default: ``split == "train"``) turns on augmentation and, with ``data.shuffle``,
    the per-epoch seeded shuffle; the first iteration of the returned dataset is epoch
    ``start_epoch`` (pass the epoch a resumed run restarts at).
    """
    from ray.data import RandomSeedConfig

    train = (split == "train") if train is None else train
    spec = stream_spec(version, cfg, train)
    paths, fs = _read_paths(version, split, cfg.storage)
    verify_split(version, split, cfg.storage)  # once per run, before any worker reads a shard
    ds = read_shards(paths, fs)
    # Ray packs small files into few read tasks; blocks of a few MB let decode run in parallel
    # and give the shuffle (whose output has as many blocks as its input) a useful grain.
    ds = ds.repartition(target_num_rows_per_block=rows_per_block(version, split))
    if cache_decoded(version, split, cfg):
        # decoded once, here on the driver's behalf; every epoch then starts from these blocks
        ds = ds.map_batches(decode_batch, batch_size=MAP_BATCH_SIZE, batch_format="numpy").materialize()
    if train and cfg.data.shuffle:
        ds = ds.random_shuffle(seed=RandomSeedConfig(seed=cfg.train.seed, reseed_after_execution=True))
        _start_at_epoch(ds, start_epoch)
    return ds.map_batches(preprocess_batch, fn_kwargs={"spec": spec}, batch_size=MAP_BATCH_SIZE,
                          batch_format="numpy")


def read_shards(paths: list[str], filesystem: Any, columns: list[str] | None = None) -> ray.data.Dataset:
    """``read_parquet`` over explicit shard paths with Ray Data's V1 Parquet reader.

    Ray 2.60's default (V2) reader lists files in a 1-CPU task that then creates footer-reader
    actors needing 1 CPU each; on a small cluster already holding training workers (or two Tune
    trials) those actors never get a CPU and the job hangs at 0 % with no error. The manifest
    already names every shard, so the V1 reader (no listing, no actors) is both enough and safe.
    """
    import ray.data
    from ray.data import DataContext

    ctx = DataContext.get_current()
    previous = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        ds = ray.data.read_parquet(paths, filesystem=filesystem)
    finally:
        ctx.use_datasource_v2 = previous
    return ds.select_columns(columns or READ_COLUMNS)  # (read_parquet's columns= is deprecated)


def rows_per_block(version: DatasetVersion, split: str) -> int:
    """Rows per Ray block for about :data:`BLOCK_BYTES` of encoded images (clamped)."""
    shards = version.shards(split)
    rows = sum(s.rows for s in shards) or 1
    avg = max(1.0, sum(s.bytes for s in shards) / rows)
    return int(min(MAX_BLOCK_ROWS, max(MIN_BLOCK_ROWS, BLOCK_BYTES // avg)))


def _start_at_epoch(ds: ray.data.Dataset, epoch: int) -> None:
    """Make the next execution of ``ds`` use the shuffle seed of ``epoch``.

    Ray seeds a reseeding shuffle with ``(seed, execution index)`` and counts executions in the
    dataset's DataContext (``_execution_idx``, no public setter in Ray 2.60). If that attribute
    ever disappears, resumed runs still shuffle deterministically, just not like the original.
    """
    if hasattr(ds.context, "_execution_idx"):  # set even for 0: materialize() counted as an execution
        ds.context._execution_idx = int(epoch)
    elif epoch:  # pragma: no cover - depends on the Ray version
        log.warning("this Ray version has no execution index; epoch %d will not repeat the original run's order", epoch)


def ingest_options(cfg: PipelineConfig) -> ray.data.ExecutionOptions:
    """Ray Data execution options for training ingest: order preserved (reproducible epochs).

    Built like ``ray.train.DataConfig.default_ingest_options()`` (the DataContext's resource
    limits and progress setting), without its ``exclude_resources=`` argument, which Ray 2.60
    deprecates (a RayDeprecationWarning in every process that builds a trainer)."""
    from ray.data import DataContext, ExecutionOptions

    current = DataContext.get_current().execution_options
    return ExecutionOptions(resource_limits=current.resource_limits, preserve_order=True,
                            verbose_progress=current.verbose_progress)


def train_data_config(cfg: PipelineConfig, resume_epoch: Callable[[], int] | None = None) -> ray.train.DataConfig:
    """The ``dataset_config`` for TorchTrainer: splits "train" (and "val") across workers.

    ``data.equal_shards`` chooses between Train's equal split (default, DDP-safe) and an exact
    once-per-epoch split with uneven per-worker counts (see docs/data.md). ``resume_epoch`` (a
    picklable callable: the epoch the workers will resume at, read from the run's checkpoints)
    is asked every time Ray Train (re)starts the worker group, so a group restarted after a
    failure in epoch e shuffles epoch e exactly as the uninterrupted run did.
    """
    return _epoch_aligned_config_class()(ingest_options(cfg), equal=cfg.data.equal_shards, resume_epoch=resume_epoch)


def _epoch_aligned_config_class():  # defined lazily so importing this module does not import ray
    from ray.train import DataConfig

    class EpochAlignedDataConfig(DataConfig):
        """DataConfig whose "train" shuffle starts at the epoch the worker group resumes at, with
        Train's equal split or ``streaming_split(equal=False)`` (no row dropped)."""

        def __init__(self, options, *, equal: bool, resume_epoch: Callable[[], int] | None):
            super().__init__(execution_options=options)
            self._options, self._equal, self._resume_epoch = options, equal, resume_epoch

        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            if self._resume_epoch is not None and "train" in datasets:
                # each (re)started group gets fresh split coordinators from these datasets; without
                # this they would all count executions from the epoch the trainer was built at
                _start_at_epoch(datasets["train"], int(self._resume_epoch()))
            if self._equal:
                return super().configure(datasets, world_size, worker_handles, worker_node_ids, **kwargs)
            output: list[dict] = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                if ds.name is None:
                    ds.set_name(name)
                ds = ds.copy(ds)
                ds.context.execution_options = copy.deepcopy(self._options)
                for rank, it in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)):
                    output[rank][name] = it
            return output

    return EpochAlignedDataConfig


def iter_epoch(shard: ray.data.DataIterator, batch_size: int, *, device: Any = "auto", drop_last: bool = False,
               prefetch_batches: int = 2, with_ids: bool = False) -> Iterator[tuple[torch.Tensor, ...]]:
    """One epoch of ``(images, labels)`` (or ``(images, labels, row_ids)``) from a worker's shard.

    ``images`` is float32 (B, C, H, W), normalised; ``labels`` int64 (B,). Each call starts a new
    epoch (a new execution of the dataset, with the next epoch's shuffle).
    """
    for batch in shard.iter_torch_batches(batch_size=batch_size, device=device, drop_last=drop_last,
                                          prefetch_batches=prefetch_batches):
        if with_ids:
            yield batch["image"], batch["label"], batch["row_id"]
        else:
            yield batch["image"], batch["label"]


# --------------------------------------------------------------------------------------------
# Without Ray
# --------------------------------------------------------------------------------------------


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The Ray-free path's order of rows for ``(seed, epoch)``."""
    return np.random.default_rng([int(seed), int(epoch)]).permutation(n)


def iter_local_batches(version: DatasetVersion, split: str, cfg: PipelineConfig, *, batch_size: int,
                       epoch: int = 0, rank: int = 0, world_size: int = 1, train: bool | None = None,
                       drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
    """Model-ready batches without Ray: for tests, notebooks and torchrun.

    Reads the split's shards (whole split in memory as PNG bytes), orders the rows by
    :func:`epoch_permutation` when training with ``data.shuffle``, gives rank ``r`` the rows at
    positions ``r, r + world_size, ...`` (each row to exactly one rank), and decodes/augments
    with the same :func:`preprocess_batch` as the Ray path. Yields
    ``{"image", "label", "row_id"}`` tensors.
    """
    import pyarrow as pa

    train = (split == "train") if train is None else train
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    spec = stream_spec(version, cfg, train)
    tables = list(iter_shard_batches(version, split, cfg.storage, READ_COLUMNS))
    if not tables:
        return
    table = pa.concat_tables(tables)
    order = np.arange(table.num_rows)
    if train and cfg.data.shuffle:
        order = order[epoch_permutation(table.num_rows, cfg.train.seed, epoch)]
    order = order[rank::world_size]
    images = table.column("image").to_numpy(zero_copy_only=False)
    labels = table.column("label").to_numpy()
    row_ids = table.column("row_id").to_numpy()
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        out = preprocess_batch({"image": images[idx], "label": labels[idx], "row_id": row_ids[idx]}, spec,
                               limit_threads=False)
        yield {k: torch.from_numpy(v) for k, v in out.items()}


# --------------------------------------------------------------------------------------------
# A deterministic, seekable per-rank stream (exact mid-epoch resume)
# --------------------------------------------------------------------------------------------


def rank_order(n: int, seed: int, epoch: int, rank: int, world_size: int, shuffle: bool = True) -> np.ndarray:
    """Positions (into the split ordered by row id) that ``rank`` trains on in ``epoch``, in order.

    The epoch's global order is :func:`epoch_permutation` (or 0..n-1 without ``shuffle``); it is
    cut to ``world_size * (n // world_size)`` rows (the at most ``world_size - 1`` rows left over
    differ per epoch) and rank r takes positions r, r + world_size, ...: every rank gets the same
    number of rows (DDP), each row of the cut order goes to exactly one rank, and the whole thing
    is a function of its arguments only."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, {world_size})")
    order = epoch_permutation(n, seed, epoch) if shuffle else np.arange(n)
    per_rank = n // world_size
    return order[rank:per_rank * world_size:world_size]


def seekable_bytes(version: DatasetVersion, split: str, cfg: PipelineConfig) -> int:
    """Bytes that :class:`SeekableStream` keeps in each worker's memory for ``split``."""
    if cache_decoded(version, split, cfg):
        h, w = version.image_size
        return version.count(split) * version.channels * h * w
    return sum(s.bytes for s in version.shards(split))


def check_seekable(version: DatasetVersion, split: str, cfg: PipelineConfig) -> None:
    """Refuse (one line) a split too large for :class:`SeekableStream`'s in-memory copy."""
    need = seekable_bytes(version, split, cfg)
    if need > cfg.data.cache_max_bytes:
        why = ("train.checkpoint_every_steps" if cfg.train.checkpoint_every_steps is not None
               else f"data.stream={cfg.data.stream}")
        fix = ("set train.checkpoint_every_steps=null (epoch checkpoints, Ray Data streaming)"
               if cfg.train.checkpoint_every_steps is not None else "set data.stream=ray (Ray Data streaming)")
        raise ConfigError(
            f"{why} keeps the {split!r} split in every worker's memory ({need / 2**20:.0f} MiB > "
            f"data.cache_max_bytes={cfg.data.cache_max_bytes}); raise data.cache_max_bytes if the workers have the "
            f"memory, or {fix}")


EXACT, RAY_DATA = "exact", "ray-data"  # the train split's order: SeekableStream, or Ray Data's streaming split


def train_order(version: DatasetVersion, cfg: PipelineConfig) -> str:
    """How the train split reaches the workers (``data.stream`` resolved for ``version``):
    :data:`EXACT` (every worker holds the split, :class:`SeekableStream`) or :data:`RAY_DATA`
    (Ray Data streams it every epoch, :func:`build_dataset` + :func:`train_data_config`).

    ``auto`` keeps the split in memory when mid-epoch checkpoints need the seekable order, or when
    the split qualifies for the decoded cache (``data.cache_decoded``, at most
    ``data.cache_max_bytes`` decoded) and the shards are equal: then an epoch costs no Ray Data
    execution (a global shuffle, augment tasks, a split coordinator), which on a small machine
    takes CPU from the workers (``benchmarks/bench_train.py``: 1.19x the plain loop's epoch time
    streamed vs 1.00x from memory)."""
    mode = cfg.data.stream
    if mode == "memory" or cfg.train.checkpoint_every_steps is not None:
        return EXACT
    if mode == "ray":
        return RAY_DATA
    return EXACT if cfg.data.equal_shards and cache_decoded(version, "train", cfg) else RAY_DATA


class SeekableStream:
    """One rank's training batches in an order that is a function of ``(train.seed, epoch, rank,
    world_size)`` only, and that can start at any sample of an epoch.

    Ray Data's ``streaming_split`` hands blocks to whichever worker asks first, so a worker's
    sequence of rows is not reproducible and cannot be resumed at a position; this stream is the
    path for ``train.checkpoint_every_steps``. It reads the split's shards once (checked against
    the manifest) and keeps them in memory — decoded uint8 pixels when the split qualifies for
    ``data.cache_decoded``, else the PNG bytes — ordered by row id. :meth:`epoch` with ``start=k``
    skips the first k rows of the rank's epoch order by slicing an index array: the skipped rows
    are never decoded or augmented. Augmentation is seeded per sample from ``(seed, epoch,
    row_id)`` (:func:`sample_seeds`), so the rows after ``start`` come out bit-identical to the
    uninterrupted epoch's. Decoding and augmentation run in the caller's thread (torchvision draws
    from torch's global generator, which a prefetch thread would share with dropout).
    """

    def __init__(self, version: DatasetVersion, split: str, cfg: PipelineConfig, *, batch_size: int, rank: int = 0,
                 world_size: int = 1, train: bool = True) -> None:
        import pyarrow as pa

        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.batch_size, self.rank, self.world_size = int(batch_size), int(rank), int(world_size)
        self.seed, self.shuffle, self.train = cfg.train.seed, cfg.data.shuffle, train
        self.spec = stream_spec(version, cfg, train=train)
        tables = list(iter_shard_batches(version, split, cfg.storage, READ_COLUMNS))
        if not tables:
            raise DataError(f"split {split!r} of {version.uri} is empty; prepare it with more data or use another split")
        table = pa.concat_tables(tables)
        by_id = np.argsort(table.column("row_id").to_numpy(), kind="stable")
        self.row_ids = table.column("row_id").to_numpy()[by_id]
        self.labels = table.column("label").to_numpy()[by_id]
        encoded = table.column("image").to_numpy(zero_copy_only=False)[by_id]
        if cache_decoded(version, split, cfg):
            self.images, self.decoded = decode_batch({"image": encoded, "label": self.labels,
                                                      "row_id": self.row_ids})["pixels"], True
        else:
            self.images, self.decoded = encoded, False

    def __len__(self) -> int:
        """Rows per rank and epoch (evaluation: the first ``n % world_size`` ranks get one more)."""
        n = len(self.row_ids)
        return len(range(self.rank, n, self.world_size)) if not self.train else n // self.world_size

    def order(self, epoch: int) -> np.ndarray:
        """Positions (into the row-id order) of this rank's rows in ``epoch``: :func:`rank_order`
        for training; for evaluation (``train=False``) rows rank, rank + world_size, ... in row-id
        order, every row on exactly one rank (the counts may differ by one)."""
        if not self.train:
            return np.arange(self.rank, len(self.row_ids), self.world_size)
        return rank_order(len(self.row_ids), self.seed, epoch, self.rank, self.world_size, self.shuffle)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """``{"image", "label", "row_id"}`` batches of ``epoch`` from the rank's ``start``-th row on."""
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        positions = self.order(epoch)[start:]
        for first in range(0, len(positions), self.batch_size):
            idx = positions[first:first + self.batch_size]
            rows = {"label": self.labels[idx], "row_id": self.row_ids[idx],
                    ("pixels" if self.decoded else "image"): self.images[idx]}
            out = preprocess_batch(rows, self.spec, limit_threads=False, epoch=epoch)
            yield {k: torch.from_numpy(v) for k, v in out.items()}
