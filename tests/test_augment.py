"""Batched augmentation (pipelines.data.augment) against torchvision's functional ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

from pipelines.config import AugmentConfig
from pipelines.data.augment import (
    ERASE_SCALE,
    NUM_DRAWS,
    batched_applies,
    crop_flip,
    erase_,
    uniforms,
)
from pipelines.data.stream import StreamSpec, preprocess_batch, sample_seeds


def _images(n, c=1, h=28, w=28, seed=0):
    return np.random.default_rng(seed).integers(1, 256, (n, c, h, w), dtype=np.uint8)  # no zeros: erasing shows


def test_draws_are_uniform_per_row_and_independent_of_neighbours():
    seeds = sample_seeds(0, 3, np.arange(4000))
    u = uniforms(seeds)
    assert u.shape == (4000, NUM_DRAWS) and u.min() >= 0 and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.005
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05  # draws of one row are not correlated
    np.testing.assert_array_equal(uniforms(seeds[7:8])[0], u[7])  # a row's draws need only its seed


@pytest.mark.parametrize("channels", [1, 3])
def test_crop_flip_matches_torchvision_pad_crop_and_flip(channels):
    p, n = 2, 600
    x = _images(n, channels, 28, 20)
    draws = uniforms(sample_seeds(1, 0, np.arange(n)))
    out = crop_flip(x, draws, padding=p, hflip=0.5)
    seen, flips = set(), 0
    for i in range(n):
        # the offset and flip that make torchvision's pad -> crop (-> hflip) give this row
        matches = []
        padded = F.pad(torch.from_numpy(x[i]), [p, p, p, p], fill=0)
        for dy in range(2 * p + 1):
            for dx in range(2 * p + 1):
                crop = F.crop(padded, dy, dx, 28, 20)
                for flip in (False, True):
                    ref = F.horizontal_flip(crop) if flip else crop
                    if np.array_equal(ref.numpy(), out[i]):
                        matches.append((dy, dx, flip))
        assert matches, f"row {i} is not a padded crop of its input"
        seen.add(matches[0][:2])
        flips += matches[0][2]
    assert len(seen) == (2 * p + 1) ** 2  # every offset of RandomCrop(padding=2) occurs
    assert 0.43 < flips / n < 0.57
    np.testing.assert_array_equal(crop_flip(x, draws, padding=0, hflip=0.0), x)  # off: the input


def test_erasing_zeroes_one_rectangle_of_the_documented_size():
    n, h, w = 2000, 28, 28
    x = np.ones((n, 2, h, w), dtype=np.float32)
    erase_(x, uniforms(sample_seeds(2, 0, np.arange(n))), p=0.5)
    erased = 0
    for i in range(n):
        zero = x[i, 0] == 0
        np.testing.assert_array_equal(zero, x[i, 1] == 0)  # every channel
        if not zero.any():
            continue
        erased += 1
        rows, cols = np.flatnonzero(zero.any(1)), np.flatnonzero(zero.any(0))
        eh, ew = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
        assert zero.sum() == eh * ew  # a filled rectangle
        assert eh < h and ew < w
        # RandomErasing: rounded sides of an area in scale * H * W with aspect ratio in [0.3, 3.3]
        assert (np.sqrt(ERASE_SCALE[0] * h * w) - 1) ** 2 <= eh * ew <= (np.sqrt(ERASE_SCALE[1] * h * w * 3.3) + 1) ** 2
        assert 0.3 / 2 <= eh / ew <= 3.3 * 2
    assert 0.45 < erased / n < 0.55
    x = np.ones((4, 1, h, w), dtype=np.float32)
    erase_(x, uniforms(sample_seeds(2, 0, np.arange(4))), p=0.0)
    assert (x == 1).all()


def test_preprocess_takes_the_batched_path_only_where_it_is_exact():
    assert batched_applies(AugmentConfig(random_crop_padding=2, hflip=0.5))
    assert not batched_applies(AugmentConfig(auto_augment="trivial"))
    assert not batched_applies(AugmentConfig(random_resized_crop=True))
    aug = AugmentConfig(random_crop_padding=2, hflip=0.5, random_erasing=0.25)
    spec = StreamSpec((28, 28), 1, True, aug, seed=0, deterministic=True)
    pixels = _images(64)
    batch = {"pixels": pixels, "label": np.zeros(64, np.int64), "row_id": np.arange(64) * 3}
    got = preprocess_batch(batch, spec, limit_threads=False, epoch=4)["image"]
    draws = uniforms(sample_seeds(0, 4, batch["row_id"]))
    want = (crop_flip(pixels, draws, 2, 0.5).astype(np.float32) / 255.0 - 0.2860) / 0.3530
    np.testing.assert_allclose(got, erase_(want.astype(np.float32), draws, 0.25), rtol=0, atol=1e-6)
    # read-only input (a zero-copy object-store view) is left untouched
    ro = pixels.copy()
    ro.flags.writeable = False
    preprocess_batch({**batch, "pixels": ro}, spec, limit_threads=False, epoch=4)
    np.testing.assert_array_equal(ro, pixels)
