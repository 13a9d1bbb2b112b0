"""Batched training augmentation: padded random crop, horizontal flip and random erasing for a
whole batch at once, each row's draws a function of that row's 63-bit seed alone.

The per-image ``torchvision.transforms.v2`` path costs ~300 us per 28x28 image on this CPU (most
of it re-seeding torch's generator per row), a fifth of a small model's training step; these
vectorised versions cost a few microseconds per image and sample the same distributions as
``v2.RandomCrop(size, padding=p)`` (zero fill), ``v2.RandomHorizontalFlip(p)`` and
``v2.RandomErasing(p, scale=(0.02, 0.33), ratio=(0.3, 3.3), value=0)``.
``benchmarks/bench_augment.py`` measures both paths.

Draws come from a counter-based hash (SplitMix64 of ``seed`` and a draw index), so a row's
augmentation depends on neither the rows beside it nor the order a resumed epoch replays them in.
"""

from __future__ import annotations

import numpy as np

from ..config import AugmentConfig

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
ERASE_SCALE = (0.02, 0.33)  # torchvision's RandomErasing defaults
ERASE_RATIO = (0.3, 3.3)
ERASE_ATTEMPTS = 10

# draw indices: 0 crop y, 1 crop x, 2 flip, 3 erase?, then 4 per erasing attempt
_CROP_Y, _CROP_X, _FLIP, _ERASE = 0, 1, 2, 3
_ATTEMPT0 = 4
NUM_DRAWS = _ATTEMPT0 + 4 * ERASE_ATTEMPTS


def splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's step on uint64 arrays (wrapping arithmetic): a cheap, well-mixed hash."""
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniforms(seeds: np.ndarray, count: int = NUM_DRAWS) -> np.ndarray:
    """``(N, count)`` float64 draws in [0, 1): draw ``j`` of row ``i`` hashes ``(seeds[i], j)``."""
    s = np.asarray(seeds, dtype=np.int64).astype(np.uint64)[:, None]
    j = np.arange(1, count + 1, dtype=np.uint64)[None, :]
    with np.errstate(over="ignore"):
        bits = splitmix64(splitmix64(s) ^ (j * _GOLDEN))
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def batched_applies(aug: AugmentConfig) -> bool:
    """Whether crop/flip of ``aug`` can run batched (not RandomResizedCrop or an auto-augment policy)."""
    return not aug.random_resized_crop and aug.auto_augment is None


def crop_flip(pixels: np.ndarray, draws: np.ndarray, padding: int, hflip: float) -> np.ndarray:
    """``(N, C, H, W)`` images -> the same shape: a random ``H x W`` window of the zero-padded image
    (offset uniform in ``[0, 2 * padding]`` per axis), mirrored left/right with probability ``hflip``."""
    n, _, h, w = pixels.shape
    out = pixels
    if padding > 0 and n:
        p = int(padding)
        padded = np.zeros((n, pixels.shape[1], h + 2 * p, w + 2 * p), dtype=pixels.dtype)
        padded[:, :, p:p + h, p:p + w] = pixels
        dy = np.minimum((draws[:, _CROP_Y] * (2 * p + 1)).astype(np.int64), 2 * p)
        dx = np.minimum((draws[:, _CROP_X] * (2 * p + 1)).astype(np.int64), 2 * p)
        rows = (dy[:, None] + np.arange(h))[:, :, None]  # (N, H, 1)
        cols = (dx[:, None] + np.arange(w))[:, None, :]  # (N, 1, W)
        out = padded[np.arange(n)[:, None, None], :, rows, cols]  # (N, H, W, C): advanced dims first
        out = np.ascontiguousarray(out.transpose(0, 3, 1, 2))
    if hflip > 0 and n:
        flip = draws[:, _FLIP] < hflip
        if flip.any():
            out = out.copy() if out is pixels else out
            out[flip] = out[flip][..., ::-1]
    return out


def erase_(x: np.ndarray, draws: np.ndarray, p: float) -> np.ndarray:
    """Random erasing in place on normalised ``(N, C, H, W)`` float images: with probability ``p``
    a rectangle of ``scale`` x the area and aspect ratio log-uniform in ``ratio`` is set to 0; the
    first of ten candidate rectangles that fits is used (none fits: the row is left as it is)."""
    n, _, h, w = x.shape
    if p <= 0 or not n:
        return x
    area = float(h * w)
    a = draws[:, _ATTEMPT0:].reshape(n, ERASE_ATTEMPTS, 4)
    lo, hi = np.log(ERASE_RATIO[0]), np.log(ERASE_RATIO[1])
    target = area * (ERASE_SCALE[0] + a[..., 0] * (ERASE_SCALE[1] - ERASE_SCALE[0]))
    aspect = np.exp(lo + a[..., 1] * (hi - lo))
    eh = np.rint(np.sqrt(target * aspect)).astype(np.int64)  # (N, attempts)
    ew = np.rint(np.sqrt(target / aspect)).astype(np.int64)
    fits = (eh < h) & (ew < w)
    first = np.argmax(fits, axis=1)
    chosen = (draws[:, _ERASE] < p) & fits[np.arange(n), first]
    if not chosen.any():
        return x
    idx = np.arange(n)
    eh, ew = eh[idx, first], ew[idx, first]
    top = np.minimum((a[idx, first, 2] * (h - eh + 1)).astype(np.int64), h - eh)
    left = np.minimum((a[idx, first, 3] * (w - ew + 1)).astype(np.int64), w - ew)
    r, c = np.arange(h), np.arange(w)
    in_rows = (r >= top[:, None]) & (r < (top + eh)[:, None])  # (N, H)
    in_cols = (c >= left[:, None]) & (c < (left + ew)[:, None])  # (N, W)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & chosen[:, None, None]  # (N, H, W)
    np.copyto(x, 0.0, where=mask[:, None])  # (N, 1, H, W) broadcasts over the channels
    return x
