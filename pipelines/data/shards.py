"""Dataset versions on storage: Parquet shards, the manifest, and reading them back.

Layout (``<root>`` is ``storage.uri``)::

    <root>/datasets/<name>/<version>/manifest.json           written last: the version exists
    <root>/datasets/<name>/<version>/<split>/part-00000.parquet   once this file does

Shard schema (one row per image): ``image`` (PNG bytes), ``label`` (int64), ``row_id`` (int64,
0..n-1 within the split, stable), ``source_id`` (string), ``height``/``width``/``channels``
(int32). The manifest lists every shard with its row count, byte size and sha256; readers take
shard URIs from the manifest only, so partial or stray files in a version folder are never read.
See docs/data.md for the full manifest schema.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage as st
from ..config import StorageConfig
from ..errors import DataError
from ..imaging import decode_png

MANIFEST = "manifest.json"
FORMAT = "vit-pipeline.dataset/1"
SHARD_SCHEMA = pa.schema([
    ("image", pa.binary()),
    ("label", pa.int64()),
    ("row_id", pa.int64()),
    ("source_id", pa.string()),
    ("height", pa.int32()),
    ("width", pa.int32()),
    ("channels", pa.int32()),
])


def datasets_uri(storage_uri: str) -> str:
    return st.join_uri(storage_uri, "datasets")


def version_uri(storage_uri: str, name: str, version: str) -> str:
    return st.join_uri(storage_uri, "datasets", name, version)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardInfo:
    path: str  # relative to the version folder: "train/part-00000.parquet"
    rows: int
    bytes: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "bytes": self.bytes, "sha256": self.sha256}


class ShardWriter:
    """Buffers rows of one split and writes ``part-NNNNN.parquet`` files as they fill.

    A shard is cut when it reaches ``max_rows`` rows or ``max_bytes`` bytes of encoded images,
    whichever comes first. Each file is serialised in memory, hashed, then written atomically.
    """

    def __init__(self, version_uri: str, split: str, max_rows: int, max_bytes: int,
                 storage: StorageConfig | None = None):
        if max_rows < 1 or max_bytes < 1:
            raise DataError(f"data.shard_rows={max_rows} and data.shard_max_bytes={max_bytes} must be positive")
        self.version_uri, self.split = version_uri, split
        self.max_rows, self.max_bytes, self.storage = max_rows, max_bytes, storage
        self.shards: list[ShardInfo] = []
        self.rows_written = 0
        self._rows: dict[str, list] = {name: [] for name in SHARD_SCHEMA.names}
        self._bytes = 0

    def add(self, image: bytes, label: int, source_id: str, height: int, width: int, channels: int) -> int:
        """Append one image; returns its ``row_id``."""
        row_id = self.rows_written + len(self._rows["image"])
        for key, value in (("image", image), ("label", label), ("row_id", row_id), ("source_id", source_id),
                           ("height", height), ("width", width), ("channels", channels)):
            self._rows[key].append(value)
        self._bytes += len(image)
        if len(self._rows["image"]) >= self.max_rows or self._bytes >= self.max_bytes:
            self.flush()
        return row_id

    def flush(self) -> None:
        n = len(self._rows["image"])
        if n == 0:
            return
        table = pa.Table.from_pydict(self._rows, schema=SHARD_SCHEMA)
        buf = io.BytesIO()
        # PNG bytes do not compress further; keep row groups small enough to stream.
        pq.write_table(table, buf, compression="none", row_group_size=2048)
        data = buf.getvalue()
        rel = f"{self.split}/part-{len(self.shards):05d}.parquet"
        st.write_bytes(st.join_uri(self.version_uri, rel), data, self.storage)
        self.shards.append(ShardInfo(rel, n, len(data), hashlib.sha256(data).hexdigest()))
        self.rows_written += n
        self._rows = {name: [] for name in SHARD_SCHEMA.names}
        self._bytes = 0

    def close(self) -> list[ShardInfo]:
        self.flush()
        return self.shards


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetVersion:
    """A complete dataset version (its manifest exists). What prepare returns, train consumes."""

    uri: str  # <root>/datasets/<name>/<version>
    manifest: dict[str, Any] = field(repr=False)
    reused: bool = False  # True when prepare found this version already complete (a no-op)

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def num_classes(self) -> int:
        return len(self.manifest["classes"])

    @property
    def splits(self) -> list[str]:
        return [s for s, info in self.manifest["splits"].items() if info["count"] > 0]

    @property
    def channels(self) -> int:
        return int(self.manifest["images"]["channels"])

    @property
    def image_size(self) -> tuple[int, int] | None:
        """(height, width) when every image has the same size, else None."""
        sizes = self.manifest["images"]["sizes"]
        if len(sizes) != 1:
            return None
        w, h = (int(v) for v in next(iter(sizes)).split("x"))
        return h, w

    def count(self, split: str) -> int:
        self._check_split(split)
        return int(self.manifest["splits"][split]["count"])

    def shards(self, split: str) -> list[ShardInfo]:
        self._check_split(split)
        return [ShardInfo(**s) for s in self.manifest["splits"][split]["shards"]]

    def shard_uris(self, split: str) -> list[str]:
        return [st.join_uri(self.uri, s.path) for s in self.shards(split)]

    def _check_split(self, split: str) -> None:
        if split not in self.manifest["splits"]:
            raise DataError(f"dataset {self.uri} has no split {split!r}; it has {', '.join(self.manifest['splits'])}")


def load_version(uri: str, storage: StorageConfig | None = None) -> DatasetVersion:
    """The complete version at ``uri`` (its folder); DataError if it has no manifest."""
    manifest_uri = st.join_uri(uri, MANIFEST)
    try:
        manifest = st.read_json(manifest_uri, storage)
    except st.ObjectNotFound:
        raise DataError(
            f"no complete dataset version at {st.parse_uri(uri)} (no {MANIFEST}); run `python -m pipelines prepare` "
            "or pick a version listed under <storage.uri>/datasets/<name>/"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{manifest_uri} is not a {FORMAT} manifest; re-run prepare into a clean storage.uri")
    return DatasetVersion(str(st.parse_uri(uri)), manifest)


def list_versions(storage_uri: str, name: str, storage: StorageConfig | None = None) -> list[DatasetVersion]:
    """Complete versions of dataset ``name``, oldest first (folders without a manifest skipped)."""
    base = st.join_uri(storage_uri, "datasets", name)
    out = []
    for folder in st.list_dirs(base, storage):
        if not st.exists(st.join_uri(base, folder, MANIFEST), storage):
            continue
        out.append(load_version(st.join_uri(base, folder), storage))
    return sorted(out, key=lambda v: (v.manifest.get("created_at", ""), v.version))


def find_version(storage_uri: str, name: str, version: str | None = None,
                 storage: StorageConfig | None = None) -> DatasetVersion:
    """Version ``version`` of dataset ``name`` under ``storage_uri``, or the newest complete one.

    ``version`` may also be the full URI of a version folder.
    """
    if version and "://" in version:
        return load_version(version, storage)
    if version:
        return load_version(version_uri(storage_uri, name, version), storage)
    versions = list_versions(storage_uri, name, storage)
    if not versions:
        raise DataError(
            f"no complete version of dataset {name!r} under {st.join_uri(storage_uri, 'datasets', name)}; "
            "run `python -m pipelines prepare` first (or fix storage.uri / data.name)"
        )
    return versions[-1]


def dataset_from_config(cfg: Any) -> DatasetVersion:
    """The version a task should use: ``data.version`` (or the newest) of ``data.name``."""
    return find_version(cfg.storage.uri, cfg.data.name, cfg.data.version, cfg.storage)


def read_shard_table(uri: str, storage: StorageConfig | None = None, columns: list[str] | None = None,
                     sha256: str | None = None) -> pa.Table:
    """One shard as an Arrow table; with ``sha256`` its bytes are checked against it first."""
    data = st.read_bytes(uri, storage)
    if sha256 is not None:
        _check_shard(uri, data, sha256)
    return pq.read_table(io.BytesIO(data), columns=columns)


def _check_shard(uri: str, data: bytes, sha256: str) -> None:
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha256:
        raise DataError(f"shard {uri} does not match its dataset manifest (sha256 {actual[:12]}…, manifest "
                        f"{sha256[:12]}…, {len(data)} bytes): it was replaced or truncated after prepare; run "
                        "`python -m pipelines prepare` into a clean storage.uri")


_VERIFIED: set[tuple[str, str]] = set()  # (version uri, split) checked in this process


def verify_split(version: DatasetVersion, split: str, storage: StorageConfig | None = None, threads: int = 8) -> None:
    """Check every shard of ``split`` against the sha256 in the manifest, once per process (the
    first time a run reads the split); :class:`DataError` naming the first shard that differs.
    Reads each shard once, ``threads`` at a time (object-store latency, not CPU, is the cost)."""
    key = (version.uri, split)
    if key in _VERIFIED:
        return
    shards = version.shards(split)

    def check(shard: ShardInfo) -> None:
        uri = st.join_uri(version.uri, shard.path)
        try:
            data = st.read_bytes(uri, storage)
        except st.ObjectNotFound:
            raise DataError(f"shard {uri} listed in the dataset manifest is missing; run `python -m pipelines "
                            "prepare` into a clean storage.uri") from None
        _check_shard(uri, data, shard.sha256)

    with ThreadPoolExecutor(max(1, min(threads, len(shards)))) as pool:
        list(pool.map(check, shards))
    _VERIFIED.add(key)


def read_split(version: DatasetVersion, split: str, storage: StorageConfig | None = None,
               decode: bool = True) -> dict[str, np.ndarray]:
    """A whole split in memory (tests, evaluation of small sets): images decoded to uint8.

    Returns ``{"image": (N, H, W[, 3]) uint8 (object array of bytes if not decode or sizes
    differ), "label": (N,), "row_id": (N,), "source_id": (N,) object}``, ordered by row_id.
    """
    tables = list(iter_shard_batches(version, split, storage))
    table = pa.concat_tables(tables) if tables else SHARD_SCHEMA.empty_table()
    out = {
        "label": table.column("label").to_numpy(),
        "row_id": table.column("row_id").to_numpy(),
        "source_id": np.array(table.column("source_id").to_pylist(), dtype=object),
    }
    raw = table.column("image").to_pylist()
    if decode:
        images = [decode_png(b) for b in raw]
        if images and len({im.shape for im in images}) == 1:
            out["image"] = np.stack(images)
        else:
            arr = np.empty(len(images), dtype=object)
            arr[:] = images
            out["image"] = arr
    else:
        arr = np.empty(len(raw), dtype=object)
        arr[:] = raw
        out["image"] = arr
    order = np.argsort(out["row_id"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def iter_shard_batches(version: DatasetVersion, split: str, storage: StorageConfig | None = None,
                       columns: list[str] | None = None) -> Iterator[pa.Table]:
    """Each shard of a split as an Arrow table, in manifest order (a Ray-free reader), each
    checked against its manifest sha256."""
    for shard in version.shards(split):
        yield read_shard_table(st.join_uri(version.uri, shard.path), storage, columns, sha256=shard.sha256)


def verify(version: DatasetVersion, storage: StorageConfig | None = None) -> list[str]:
    """Problems found re-reading every shard (sha256, row count, row ids); [] when intact."""
    problems = []
    for split in version.manifest["splits"]:
        expected_rows = 0
        for shard in version.shards(split):
            expected_rows += shard.rows
            uri = st.join_uri(version.uri, shard.path)
            try:
                data = st.read_bytes(uri, storage)
            except st.ObjectNotFound:
                problems.append(f"{uri}: missing")
                continue
            if hashlib.sha256(data).hexdigest() != shard.sha256:
                problems.append(f"{uri}: sha256 mismatch")
                continue
            rows = pq.read_metadata(io.BytesIO(data)).num_rows
            if rows != shard.rows:
                problems.append(f"{uri}: {rows} rows, manifest says {shard.rows}")
        if expected_rows != version.manifest["splits"][split]["count"]:
            problems.append(f"{split}: shards hold {expected_rows} rows, manifest count is {version.manifest['splits'][split]['count']}")
    return problems
