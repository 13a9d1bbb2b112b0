"""The attention picture of a trained model: a fixed set of validation images, the model's
attention heatmap (:func:`vit_model.explain`) and prediction on each, drawn as one PNG.

The images are the first ``per_class`` rows of each class in the split's stored order (the
manifest's shard order, rows in file order), so every evaluation of every model trained on a
dataset version shows the same images, and reading stops as soon as each class has its rows
(usually within the first shard). They are preprocessed exactly as at validation time.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vit_model import explain

from .config import PipelineConfig
from .data.shards import DatasetVersion, iter_shard_batches
from .data.stream import preprocess_batch, stream_spec
from .plots import AttentionTile, plot_attention

log = logging.getLogger(__name__)

ATTENTION_PNG = "attention.png"  # the artifact name the registry's model description embeds: keep it
PER_CLASS = 2


@dataclass(frozen=True)
class AttentionSample:
    """The fixed images of one split, ready for the model and for display."""

    split: str
    inputs: torch.Tensor  # (K, C, H, W) float32, normalised as at validation time
    pixels: np.ndarray  # (K, C, H, W) float32 in [0, 1], the same images before normalisation
    labels: np.ndarray  # (K,) int64
    row_ids: np.ndarray  # (K,) int64


def sample_split(version: DatasetVersion, fallback: str) -> str:
    """``val`` when the version has one (and it is not empty), else ``fallback``."""
    return "val" if "val" in version.splits and version.count("val") > 0 else fallback


def fixed_sample(version: DatasetVersion, split: str, cfg: PipelineConfig, per_class: int = PER_CLASS) -> AttentionSample:
    """The first ``per_class`` rows of each class of ``split`` (see the module doc), ordered by
    class, then by stored order. ``cfg`` gives the preprocessing (the model's mean/std/size)."""
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    wanted = {c: per_class for c in range(version.num_classes)}
    picked: dict[int, list[tuple[bytes, int]]] = {c: [] for c in wanted}
    for table in iter_shard_batches(version, split, cfg.storage, ["image", "label", "row_id"]):
        labels, row_ids = table.column("label").to_pylist(), table.column("row_id").to_pylist()
        images = table.column("image")
        for i, (label, row_id) in enumerate(zip(labels, row_ids)):
            if wanted.get(label, 0) > 0:
                picked[label].append((images[i].as_py(), row_id))
                wanted[label] -= 1
        if not any(wanted.values()):
            break
    rows = [(data, label, row_id) for label in sorted(picked) for data, row_id in picked[label]]
    if not rows:
        raise ValueError(f"split {split!r} of {version.uri} has no rows to draw")
    spec = stream_spec(version, cfg, train=False)
    batch = {"image": np.array([r[0] for r in rows], dtype=object), "label": np.array([r[1] for r in rows]),
             "row_id": np.array([r[2] for r in rows], dtype=np.int64)}
    out = preprocess_batch(batch, spec, limit_threads=False)
    inputs = torch.from_numpy(out["image"])
    pixels = (inputs * spec.std + spec.mean).clamp_(0.0, 1.0).numpy()  # undo the normalisation for display
    return AttentionSample(split, inputs, pixels, out["label"], out["row_id"])


def attention_tiles(model: torch.nn.Module, sample: AttentionSample, class_names: list[str]) -> list[AttentionTile]:
    """The model's heatmap, top-1 class and its probability on each image of ``sample``."""
    out = explain(model, sample.inputs)
    probs = out.logits.float().softmax(dim=-1)
    conf, pred = probs.max(dim=-1)
    heat = out.heatmap.numpy()
    return [AttentionTile(image=sample.pixels[i], heatmap=heat[i], pred=class_names[int(pred[i])],
                          confidence=float(conf[i]), true=class_names[int(sample.labels[i])])
            for i in range(len(sample.labels))]


def attention_png(model: torch.nn.Module, sample: AttentionSample, class_names: list[str], title: str) -> bytes | None:
    """The attention figure as PNG bytes. The model runs unguarded (a bug raises); only drawing
    problems of the plotting stack (matplotlib missing, a backend or font error) are logged as
    one warning line and give None."""
    tiles = attention_tiles(model, sample, class_names)
    per_class = int(np.bincount(sample.labels).max())
    with tempfile.TemporaryDirectory(prefix="vit-attention-") as tmp:
        path = Path(tmp, ATTENTION_PNG)
        try:
            plot_attention(tiles, path, title=title, ncols=2 * per_class)  # two classes per row
        except (ImportError, OSError, RuntimeError) as exc:
            log.warning("attention picture not drawn (%s: %s); evaluation goes on without it", type(exc).__name__, exc)
            return None
        return path.read_bytes()
