"""Task ``prepare``: validate a source's images and write a dataset version (Parquet + manifest).

    python -m pipelines prepare --config configs/local.yaml [--set data.strict=true] [--verify]

:func:`prepare` is the task function: ``PipelineConfig -> DatasetVersion``. It

1. lists the source (``data.source``) and fingerprints every input (sha256 of its bytes);
2. derives the version: sha256 over the input fingerprints, the class names and every setting
   that changes the output (:func:`version_settings`) — the same inputs give the same version;
3. if ``<storage.uri>/datasets/<name>/<version>/manifest.json`` exists, stops: a no-op that
   returns the existing version (``reused=True``);
4. otherwise decodes every image inside the guarded step (:mod:`pipelines.data.validate`),
   writes the valid ones to ``<split>/part-NNNNN.parquet`` shards, and records the rejected ones
   with their reasons (with ``data.strict`` the run fails instead, listing them);
5. writes ``manifest.json`` last, atomically. Until then the version does not exist for readers,
   so a run killed half-way leaves nothing visible; the next run overwrites its leftovers (same
   names, same bytes) and publishes. A run that fails (not killed) removes its shards.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone

from . import storage as st
from .config import PipelineConfig, to_dict
from .data.shards import FORMAT, MANIFEST, DatasetVersion, ShardWriter, load_version, verify, version_uri
from .data.sources import SPLITS, Source, SourceItem, open_source
from .data.validate import DecodedImage, DecodeSettings, InvalidImage, decode_image, from_array
from .errors import DataError, StorageError

WRITER_REVISION = 1  # bump when the bytes written for the same inputs+settings change meaning
CHUNK = 1024  # items decoded concurrently before their rows are appended
MAX_LISTED = 50  # invalid files named in the printed summary / a strict error (all are in the manifest)


@dataclass(frozen=True)
class Rejected:
    source_id: str
    reason: str


def version_settings(cfg: PipelineConfig) -> dict:
    """The settings that change what prepare writes (and therefore the version)."""
    d = cfg.data
    return {
        "channels": d.channels,
        "image_size": d.image_size,
        "val_fraction": d.val_fraction,
        "test_fraction": d.test_fraction,
        "split_seed": d.split_seed,
        "shard_rows": d.shard_rows,
        "shard_max_bytes": d.shard_max_bytes,
        "max_image_pixels": d.max_image_pixels,
        "alpha_background": d.alpha_background,
    }


def compute_version(source: Source, settings: dict) -> tuple[str, str]:
    """(version, inputs_sha256): a content hash of the inputs and the output-changing settings."""
    payload = {
        "format": FORMAT, "writer": WRITER_REVISION, "source_kind": source.kind,
        "source_digest": source.digest, "classes": source.classes, "settings": settings,
    }
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return digest[:16], digest


def prepare(cfg: PipelineConfig, progress: Callable[[str], None] | None = None) -> DatasetVersion:
    """Prepare (or find) the dataset version for ``cfg``; see the module doc."""
    say = progress or (lambda _msg: None)
    started = time.monotonic()
    if cfg.data.channels not in (1, 3):
        raise DataError(f"data.channels={cfg.data.channels} must be 1 (grayscale) or 3 (RGB)")
    if cfg.data.image_size is not None and cfg.data.image_size < 1:
        raise DataError(f"data.image_size={cfg.data.image_size} must be a positive number of pixels (or null to keep sizes)")
    st.check_bucket(cfg.storage.uri, cfg.storage)

    say(f"listing {cfg.data.source} ...")
    source = open_source(cfg.data, cfg.storage)
    settings = version_settings(cfg)
    version, inputs_sha256 = compute_version(source, settings)
    vuri = version_uri(cfg.storage.uri, cfg.data.name, version)
    if st.exists(st.join_uri(vuri, MANIFEST), cfg.storage):
        existing = load_version(vuri, cfg.storage)
        return DatasetVersion(existing.uri, existing.manifest, reused=True)
    # one writer per version: a concurrent prepare of the same inputs fails here, cleanly, instead
    # of one of them deleting the other's shards when it fails
    with st.exclusive(f"{vuri}.lock", f"dataset version {cfg.data.name}/{version}", cfg.storage):
        if st.exists(st.join_uri(vuri, MANIFEST), cfg.storage):  # published while we waited for the lock
            existing = load_version(vuri, cfg.storage)
            return DatasetVersion(existing.uri, existing.manifest, reused=True)
        if st.exists(vuri, cfg.storage):
            # Same inputs + settings give the same shard names and bytes, so the leftovers of a killed
            # run are simply overwritten (and strays are never read: readers go by the manifest).
            say(f"completing an earlier, unfinished attempt at {vuri}")
        try:
            manifest = _write_version(cfg, source, settings, version, inputs_sha256, vuri, say)
            manifest["prepare_seconds"] = round(time.monotonic() - started, 2)
            st.write_json(st.join_uri(vuri, MANIFEST), manifest, cfg.storage)  # last: publishes the version
        except BaseException:
            _discard_unpublished(vuri, cfg)
            raise
    return DatasetVersion(str(st.parse_uri(vuri)), manifest)


def _discard_unpublished(vuri: str, cfg: PipelineConfig) -> None:
    """Best-effort removal of a failed run's shards, unless a concurrent run published them."""
    try:
        if not st.exists(st.join_uri(vuri, MANIFEST), cfg.storage):
            st.delete_tree(vuri, cfg.storage)
    except Exception:  # without a manifest the leftovers are invisible anyway
        pass


def _write_version(cfg: PipelineConfig, source: Source, settings: dict, version: str, inputs_sha256: str,
                   vuri: str, say: Callable[[str], None]) -> dict:
    decode_settings = DecodeSettings(cfg.data.channels, cfg.data.max_image_pixels, cfg.data.image_size,
                                     cfg.data.alpha_background)

    def guarded(item: SourceItem) -> tuple[SourceItem, DecodedImage | None, str | None]:
        try:
            if item.pixels is not None:
                return item, from_array(item.pixels, decode_settings), None
            return item, decode_image(source.read(item), item.source_id, decode_settings), None
        except InvalidImage as exc:
            return item, None, str(exc)
        except (StorageError, MemoryError):
            raise  # not the image's fault
        except Exception as exc:  # last line of defence: a decoder bug is a bad file, not a crash
            return item, None, f"decode failed ({type(exc).__name__}: {exc})"

    rejected: list[Rejected] = []
    splits: dict[str, dict] = {}
    sizes, modes, formats, conversions = Counter(), Counter(), Counter(), Counter()
    exif_transposed = 0
    by_content: dict[str, list[tuple[str, str]]] = defaultdict(list)  # sha -> [(split, id)]
    out_mode = "L" if cfg.data.channels == 1 else "RGB"

    with ThreadPoolExecutor(max(1, cfg.data.read_threads)) as pool:
        for split in SPLITS:
            items = source.split_items(split)
            writer = ShardWriter(vuri, split, cfg.data.shard_rows, cfg.data.shard_max_bytes, cfg.storage)
            labels = Counter()
            for start in range(0, len(items), CHUNK):
                for item, img, reason in pool.map(guarded, items[start:start + CHUNK]):
                    if img is None:
                        rejected.append(Rejected(item.source_id, reason))
                        continue
                    writer.add(img.png, item.label, item.source_id, img.height, img.width, img.channels)
                    labels[item.label] += 1
                    sizes[f"{img.width}x{img.height}"] += 1
                    modes[img.source_mode] += 1
                    formats[img.source_format] += 1
                    if img.source_mode != out_mode:
                        conversions[f"{img.source_mode}->{out_mode}"] += 1
                    exif_transposed += img.exif_transposed
                    by_content[source.content_sha256[item.source_id]].append((split, item.source_id))
                done = min(start + CHUNK, len(items))
                if done == len(items) or (start // CHUNK) % 10 == 9:
                    say(f"{split}: {done}/{len(items)} images")
            shards = writer.close()
            splits[split] = {
                "count": writer.rows_written,
                "label_counts": {source.classes[k]: labels.get(k, 0) for k in range(len(source.classes))},
                "shards": [s.to_dict() for s in shards],
            }

    if rejected and cfg.data.strict:
        raise DataError(
            f"{len(rejected)} invalid image(s) in {source.uri} with data.strict=true: {_listing(rejected)}; "
            "fix or remove them, or set data.strict=false to skip them"
        )
    total = sum(s["count"] for s in splits.values())
    if total == 0:
        raise DataError(
            f"no valid images in {source.uri}: all {len(rejected)} input(s) were rejected ({_listing(rejected, 3)}); "
            "point data.source at real images"
        )
    if splits["train"]["count"] == 0:
        raise DataError(f"the train split of {source.uri} has no valid images; add training images or lower data.val_fraction/test_fraction")

    groups = [ids for ids in by_content.values() if len(ids) > 1]
    return {
        "format": FORMAT,
        "name": cfg.data.name,
        "version": version,
        "inputs_sha256": inputs_sha256,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "source": {"kind": source.kind, "uri": source.uri, "digest": source.digest, "inputs": len(source.items)},
        "settings": settings,
        "classes": source.classes,
        "splits": splits,
        "label_histogram": {c: sum(splits[s]["label_counts"][c] for s in SPLITS) for c in source.classes},
        "images": {
            "channels": cfg.data.channels,
            "mode": out_mode,
            "encoding": "PNG",
            "sizes": dict(sizes.most_common()),
            "source_modes": dict(modes.most_common()),
            "source_formats": dict(formats.most_common()),
            "conversions": dict(conversions.most_common()),
            "exif_transposed": exif_transposed,
        },
        "duplicates": {
            "groups": len(groups),
            "extra_copies": sum(len(g) - 1 for g in groups),
            "cross_split_groups": sum(1 for g in groups if len({s for s, _ in g}) > 1),
            "examples": [[sid for _, sid in g] for g in groups[:20]],
        },
        "invalid": [{"source_id": r.source_id, "reason": r.reason} for r in rejected],
        "ignored": [{"path": p, "reason": why} for p, why in source.ignored],
        "config": {"data": to_dict(cfg.data)},
    }


def _listing(rejected: list[Rejected], limit: int = MAX_LISTED) -> str:
    shown = "; ".join(f"{r.source_id} ({r.reason})" for r in rejected[:limit])
    return shown + (f"; and {len(rejected) - limit} more" if len(rejected) > limit else "")


def summary_lines(ds: DatasetVersion) -> list[str]:
    """The human summary ``run_cli`` prints (the last line, the URI, is printed separately)."""
    m = ds.manifest
    head = "already complete, nothing to do" if ds.reused else f"written in {m.get('prepare_seconds', '?')}s"
    lines = [f"dataset {m['name']} version {m['version']}: {head}"]
    lines.append(f"  source: {m['source']['kind']} {m['source']['uri']} ({m['source']['inputs']} inputs)")
    lines.append(f"  classes ({len(m['classes'])}): {', '.join(m['classes'])}")
    for split, info in m["splits"].items():
        nbytes = sum(s["bytes"] for s in info["shards"])
        lines.append(f"  {split}: {info['count']} images in {len(info['shards'])} shard(s), {nbytes / 1e6:.1f} MB")
    img = m["images"]
    lines.append(f"  images: {', '.join(f'{k} x{v}' for k, v in list(img['sizes'].items())[:5])} as {img['mode']}; "
                 f"source modes {img['source_modes']}; converted {img['conversions'] or 'none'}; "
                 f"EXIF-rotated {img['exif_transposed']}")
    lines.append(f"  label histogram: {m['label_histogram']}")
    dup = m["duplicates"]
    lines.append(f"  exact duplicates: {dup['groups']} group(s), {dup['extra_copies']} extra copies, "
                 f"{dup['cross_split_groups']} across splits")
    if m["ignored"]:
        lines.append(f"  ignored (not images in class folders): {len(m['ignored'])}")
    lines.append(f"  invalid (skipped): {len(m['invalid'])}")
    for bad in m["invalid"][:MAX_LISTED]:
        lines.append(f"    {bad['source_id']}: {bad['reason']}")
    if len(m["invalid"]) > MAX_LISTED:
        lines.append(f"    ... and {len(m['invalid']) - MAX_LISTED} more (all listed in {MANIFEST})")
    return lines


def run_cli(cfg: PipelineConfig, args: argparse.Namespace) -> int:
    ds = prepare(cfg, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    for line in summary_lines(ds):
        print(line)
    if getattr(args, "verify", False):
        problems = verify(ds, cfg.storage)
        if problems:
            raise DataError(f"{len(problems)} shard problem(s) in {ds.uri}: {'; '.join(problems[:10])}; delete the version folder and prepare again")
        print(f"  verified: {sum(len(ds.shards(s)) for s in ds.manifest['splits'])} shard(s), sha256 and row counts match")
    print(ds.uri)
    return 0
