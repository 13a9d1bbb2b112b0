"""Figures logged with every training run: learning curves, the confusion matrix and the
attention tiles; and the per-image attention overlay batch inference writes."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def plot_curves(history: Sequence[Mapping[str, float]], path: str | Path) -> Path:
    """Train/val loss and val accuracy per epoch from the per-epoch metric dicts."""
    plt = _pyplot()
    epochs = [h["epoch"] + 1 for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss")):
        ax_loss.plot(epochs, [h.get(key, float("nan")) for h in history], marker="o", label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [h.get("val_acc", float("nan")) for h in history], marker="o", color="tab:green")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("val acc@1")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_confusion(confusion: Sequence[Sequence[int]], class_names: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix (rows: true class, columns: predicted) with counts."""
    plt = _pyplot()
    n = len(confusion)
    totals = [max(1, sum(row)) for row in confusion]
    norm = [[v / totals[i] for v in row] for i, row in enumerate(confusion)]
    size = max(4.0, 0.6 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right")
    ax.set_yticks(range(n), labels=list(class_names))
    for i in range(n):
        for j in range(n):
            ax.text(j, i, str(confusion[i][j]), ha="center", va="center", fontsize=7,
                    color="white" if norm[i][j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


# --------------------------------------------------------------------------------------------
# Attention overlays
# --------------------------------------------------------------------------------------------

OVERLAY_ALPHA = 0.5  # weight of the heatmap's colour over the image
OVERLAY_MIN_SIDE = 112  # per-image PNGs are enlarged (nearest neighbour) to at least this many pixels


def overlay_rgb(image: np.ndarray, heatmap: np.ndarray, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """An image (C, H, W) with values in [0, 1] (C = 1 or 3) blended with a heatmap (H, W) in
    [0, 1] coloured by matplotlib's ``jet``: uint8 (H, W, 3)."""
    from matplotlib import colormaps

    image = np.asarray(image, dtype=np.float32)
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if image.ndim != 3 or image.shape[0] not in (1, 3) or image.shape[1:] != heatmap.shape:
        raise ValueError(f"overlay needs an image (1 or 3, H, W) and a heatmap (H, W); got {image.shape} and {heatmap.shape}")
    base = np.repeat(image, 3, axis=0) if image.shape[0] == 1 else image
    base = np.clip(base.transpose(1, 2, 0), 0.0, 1.0)  # (C, H, W) -> (H, W, 3)
    colour = colormaps["jet"](np.clip(heatmap, 0.0, 1.0))[..., :3]  # (H, W) -> (H, W, 3)
    return np.round(255.0 * ((1.0 - alpha) * base + alpha * colour)).astype(np.uint8)


def overlay_png(image: np.ndarray, heatmap: np.ndarray, min_side: int = OVERLAY_MIN_SIDE) -> bytes:
    """:func:`overlay_rgb` as PNG bytes, enlarged by a whole factor so its short side is at least
    ``min_side`` pixels (a 28×28 image becomes 112×112)."""
    from PIL import Image

    rgb = overlay_rgb(image, heatmap)
    factor = max(1, math.ceil(min_side / min(rgb.shape[:2])))
    if factor > 1:
        rgb = rgb.repeat(factor, axis=0).repeat(factor, axis=1)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@dataclass(frozen=True)
class AttentionTile:
    """One tile of the attention figure."""

    image: np.ndarray  # (C, H, W) in [0, 1]
    heatmap: np.ndarray  # (H, W) in [0, 1]
    pred: str
    confidence: float  # softmax probability of ``pred``
    true: str


def plot_attention(tiles: Sequence[AttentionTile], path: str | Path, title: str = "attention", ncols: int = 4) -> Path:
    """A grid of tiles: the image with its attention heatmap overlaid, captioned
    ``pred (conf%) / true`` in green when the prediction is right, red when it is wrong."""
    if not tiles:
        raise ValueError("plot_attention needs at least one tile")
    plt = _pyplot()
    ncols = max(1, min(ncols, len(tiles)))
    nrows = math.ceil(len(tiles) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(2.2 * ncols, 2.4 * nrows + 0.4), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile in zip(axes.flat, tiles):
        ax.imshow(overlay_rgb(tile.image, tile.heatmap), interpolation="nearest")
        ax.set_title(f"{tile.pred} ({100 * tile.confidence:.0f}%) / {tile.true}", fontsize=8,
                     color="tab:green" if tile.pred == tile.true else "tab:red")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
