"""The exactly-once output of a batch-inference job.

Rows go to a fresh attempt folder ``<storage>/predictions/<job>/_attempt-<time>-<id>/``. Ray Data
may retry a task after an actor dies, so before publishing, :func:`verify_output` reads back the
``input_id`` of every written row, rewrites files holding rows already seen (first copy kept) and
fails unless the output ids equal the input ids, each once. Only then is ``manifest.json`` written
(atomically, last): a job is complete exactly when its manifest exists. See docs/inference.md.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .. import storage as st
from ..config import StorageConfig
from ..errors import InferError
from .actors import OUTPUT_SCHEMA

if TYPE_CHECKING:
    import ray.data

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = "vit-pipeline.predictions/1"
ATTEMPT_PREFIX = "_attempt-"
MIN_ROWS_PER_FILE = 50_000  # Ray Data packs at least this many rows per Parquet file when it can


def write_rows(ds: ray.data.Dataset, data_uri: str, storage: StorageConfig) -> None:
    """Run the lazy pipeline ``ds``, writing its rows as Parquet files under ``data_uri``."""
    fs, path = st.resolve(data_uri, storage)
    ds.write_parquet(path, filesystem=fs, min_rows_per_file=MIN_ROWS_PER_FILE)


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
        table = st.with_retries(lambda path=path: pq.read_table(path, filesystem=fs, columns=columns), entry.uri, "read", storage)
        ids = table.column("input_id").to_pylist()
        keep = np.ones(len(ids), dtype=bool)
        for i, v in enumerate(ids):
            if v in seen:
                keep[i] = False
            else:
                seen.add(v)
        if not keep.all():
            dupes += int((~keep).sum())
            full = st.with_retries(lambda path=path: pq.read_table(path, filesystem=fs), entry.uri, "read", storage)
            full, table = full.filter(pa.array(keep)), table.filter(pa.array(keep))
            if full.num_rows == 0:
                st.with_retries(lambda path=path: fs.delete_file(path), entry.uri, "delete", storage)
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
        tables.append(st.with_retries(lambda path=path, fs=fs: pq.read_table(path, filesystem=fs, columns=columns), uri, "read",
                                      storage))
    if not tables:
        return OUTPUT_SCHEMA.empty_table() if columns is None else OUTPUT_SCHEMA.empty_table().select(columns)
    return pa.concat_tables(tables)


def cleanup_attempts(job_uri: str, keep: str, storage: StorageConfig) -> None:
    """Delete attempt folders other than ``keep`` (failed runs, replaced results). Best effort."""
    for folder in st.list_dirs(job_uri, storage):
        if folder.startswith(ATTEMPT_PREFIX) and folder != keep:
            try:
                st.delete_tree(st.join_uri(job_uri, folder), storage)
            except st.StorageError as exc:
                log.warning("could not delete the old attempt %s: %s", folder, exc)
