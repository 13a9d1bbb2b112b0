"""Prepare's guarded image step: every input file becomes either stored pixels or a reason.

The decoding itself (checks, EXIF, mode conversion, resize) is :mod:`pipelines.imaging`, shared
with the packaged model; this module adds what only prepare needs: the file-extension check, the
settings from ``data.*``, and the lossless PNG that the shards store. The mode-conversion table
is in docs/data.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..imaging import IMAGE_EXTENSIONS, InvalidImage, decode, encode_png, resize_center_crop

__all__ = ["DecodeSettings", "DecodedImage", "InvalidImage", "IMAGE_EXTENSIONS", "decode_image", "from_array"]


@dataclass(frozen=True)
class DecodeSettings:
    channels: int = 1  # 1 (L) or 3 (RGB)
    max_pixels: int = 50_000_000
    image_size: int | None = None
    alpha_background: int = 255

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 0 <= self.alpha_background <= 255:
            raise ValueError(f"alpha_background must be in 0..255, got {self.alpha_background}")


@dataclass(frozen=True)
class DecodedImage:
    pixels: np.ndarray  # uint8, (H, W) for 1 channel or (H, W, 3)
    png: bytes  # the pixels, PNG-encoded
    source_format: str  # "PNG", "JPEG", ... or "raw" for arrays
    source_mode: str  # PIL mode before conversion
    exif_transposed: bool

    @property
    def height(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def width(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def channels(self) -> int:
        return 1 if self.pixels.ndim == 2 else int(self.pixels.shape[2])


def decode_image(data: bytes, name: str, settings: DecodeSettings) -> DecodedImage:
    """Decode, check and convert one encoded image; raise :class:`InvalidImage` with a reason."""
    ext = os.path.splitext(name)[1].lower()
    if ext not in IMAGE_EXTENSIONS:
        shown = ext or "(none)"
        raise InvalidImage(f"unsupported file extension {shown!r} (supported: {', '.join(IMAGE_EXTENSIONS)})")
    out = decode(data, channels=settings.channels, max_pixels=settings.max_pixels,
                 alpha_background=settings.alpha_background, size=settings.image_size or None)
    return DecodedImage(out.pixels, encode_png(out.pixels), out.format, out.source_mode, out.transposed)


def from_array(pixels: np.ndarray, settings: DecodeSettings) -> DecodedImage:
    """Wrap raw uint8 gray pixels (idx sources) the same way :func:`decode_image` wraps files."""
    if pixels.dtype != np.uint8 or pixels.ndim != 2:
        raise InvalidImage(f"expected a 2-D uint8 array, got {pixels.dtype} {pixels.shape}")
    if pixels.size == 0:
        raise InvalidImage(f"image has no pixels ({pixels.shape[1]}x{pixels.shape[0]})")
    out = pixels if settings.channels == 1 else np.repeat(pixels[:, :, None], 3, axis=2)
    if settings.image_size:
        out = resize_center_crop(out, settings.image_size)
    return DecodedImage(np.ascontiguousarray(out), encode_png(out), "raw", "L", False)
