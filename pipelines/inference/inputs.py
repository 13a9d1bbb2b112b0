"""What a batch-inference job reads: a dataset version's split, or any prefix of raw images.

The set of inputs is fixed on the driver at job start (:class:`InferInput`): shard row ids for a
dataset version (``<split>/<row_id>``, labels known), or the recursive listing of image files
under a prefix (ids relative to it; hidden files and non-image extensions skipped). Its digest
names the default job, so the same model on the same input is the same job.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .. import storage as st
from ..config import PipelineConfig
from ..data.shards import FORMAT as DATASET_FORMAT
from ..data.shards import MANIFEST as DATASET_MANIFEST
from ..data.shards import load_version, verify_split
from ..errors import ConfigError, DataError
from ..imaging import IMAGE_EXTENSIONS


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
    shard_rows: tuple[int, ...] = ()  # dataset only, aligned with shard_uris
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
    manifest_uri = st.join_uri(uri, DATASET_MANIFEST)
    manifest = None
    if st.exists(manifest_uri, storage):
        manifest = st.read_json(manifest_uri, storage)
    if isinstance(manifest, dict) and manifest.get("format") == DATASET_FORMAT:
        return _dataset_input(cfg, uri, split or cfg.infer.split)
    return _images_input(cfg, uri)


def _dataset_input(cfg: PipelineConfig, uri: str, split: str) -> InferInput:
    version = load_version(uri, cfg.storage)
    if split not in version.manifest["splits"]:
        raise ConfigError(f"dataset {uri} has no split {split!r}; set infer.split to one of "
                          f"{', '.join(version.manifest['splits'])}")
    shards = version.shards(split)
    shard_uris = version.shard_uris(split)
    if version.count(split) == 0 or not shard_uris:
        raise DataError(f"split {split!r} of {uri} is empty; pick another split with --set infer.split=...")
    verify_split(version, split, cfg.storage)  # the shards are the ones prepare wrote
    row_ids: list[int] = []
    shard_rows: list[int] = []
    for shard_uri in shard_uris:  # one int column per shard
        fs, path = st.resolve(shard_uri, cfg.storage)
        table = st.with_retries(lambda path=path, fs=fs: pq.read_table(path, filesystem=fs, columns=["row_id"]), shard_uri, "read",
                                cfg.storage)
        row_ids.extend(table.column("row_id").to_pylist())
        shard_rows.append(table.num_rows)
    ids = tuple(f"{split}/{r}" for r in row_ids)
    if len(set(ids)) != len(ids):
        raise DataError(f"dataset {uri} split {split!r} repeats row ids; re-run prepare into a clean storage.uri")
    h = hashlib.sha256(json.dumps({"dataset": version.version, "split": split,
                                   "shards": [s.sha256 for s in shards]}, sort_keys=True).encode())
    return InferInput(uri=uri, kind="dataset", input_ids=ids, digest=h.hexdigest(), split=split,
                      classes=tuple(version.classes), channels=version.channels, shard_uris=tuple(shard_uris),
                      shard_rows=tuple(shard_rows))


def _images_input(cfg: PipelineConfig, uri: str) -> InferInput:
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
