"""Guarded image decoding: every input becomes either pixels or a reason.

:func:`decode_image` runs the whole decode inside one guarded step: it rejects empty files, files
whose extension is not an image type, content PIL cannot identify, formats outside
:data:`SUPPORTED_FORMATS`, images over the pixel cap (decompression bombs, checked from the header
before any pixel is decoded) and truncated/corrupt data (the full decode happens here, not lazily
later). What survives is converted deliberately to the configured channel count:

=====================  ==================================================================
source mode            conversion
=====================  ==================================================================
``1``, ``L``           gray levels as they are (``1`` -> 0/255)
``LA``, ``La``, ``PA`` alpha composited over ``alpha_background``
``P``                  palette expanded (with its transparency, if any, composited)
``RGBA``, ``RGBa``     alpha composited over ``alpha_background``
``CMYK``               PIL's CMYK->RGB (no ICC colour management)
``YCbCr``/``LAB``/``HSV`` converted to RGB
``I;16*``, ``I``       16-bit range scaled to 8 bits: round(v * 255 / 65535), clipped
``F`` and others       rejected as unsupported pixel modes
=====================  ==================================================================

then RGB -> L uses ITU-R 601 luma (PIL's ``convert("L")``), L -> RGB replicates the channel.
EXIF orientation is applied before anything else. With ``image_size`` set, the shorter side is
resized to it (bicubic, antialiased) and the centre square is cropped. The result is re-encoded
as PNG (lossless), which is what the shards store.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_TO_RGB_MODES = {"RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
EXIF_ORIENTATION = 0x0112


class InvalidImage(Exception):
    """The input is not a usable image; ``str(exc)`` is the reason recorded in the manifest."""


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
    if len(data) == 0:
        raise InvalidImage("empty file (0 bytes)")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise InvalidImage("not an image: the content is not a recognised image format") from None
    except Image.DecompressionBombError as exc:
        raise InvalidImage(f"decompression bomb: {exc}") from None
    except Exception as exc:  # corrupt headers raise all sorts of things
        raise InvalidImage(f"corrupt image header ({_short(exc)})") from None
    with img:
        fmt = img.format or "unknown"
        if fmt not in SUPPORTED_FORMATS:
            raise InvalidImage(f"unsupported image format {fmt!r} (supported: {', '.join(SUPPORTED_FORMATS)})")
        width, height = img.size
        if width * height > settings.max_pixels:
            raise InvalidImage(
                f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
                f"data.max_image_pixels={settings.max_pixels}"
            )
        if width == 0 or height == 0:
            raise InvalidImage(f"image has no pixels ({width}x{height})")
        try:
            img.load()  # the full decode: truncation and corrupt data surface here
        except Exception as exc:
            raise InvalidImage(f"truncated or corrupt image data ({_short(exc)})") from None
        source_mode = img.mode
        try:
            transposed = img.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9)
            oriented = ImageOps.exif_transpose(img) if transposed else img
        except Exception as exc:
            raise InvalidImage(f"corrupt EXIF orientation data ({_short(exc)})") from None
        try:
            pixels = convert_pixels(oriented, settings.channels, settings.alpha_background)
        except InvalidImage:
            raise
        except Exception as exc:
            raise InvalidImage(f"cannot convert mode {source_mode!r} ({_short(exc)})") from None
    if settings.image_size:
        pixels = resize_center_crop(pixels, settings.image_size)
    return DecodedImage(pixels, encode_png(pixels), fmt, source_mode, transposed)


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


def convert_pixels(img: Image.Image, channels: int, background: int) -> np.ndarray:
    """``img`` (any supported mode) -> uint8 array with ``channels`` channels (table above)."""
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode == "1":
        arr = np.asarray(img.convert("L"))
    elif mode == "L":
        arr = np.asarray(img)
    elif mode in _ALPHA_MODES:
        target = "LA" if mode in ("LA", "La") else "RGBA"
        arr = _composite(np.asarray(img.convert(target)), background)
    elif mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.int64)
        arr = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    elif mode in _TO_RGB_MODES:
        arr = np.asarray(img.convert("RGB"))
    else:
        raise InvalidImage(f"unsupported pixel mode {mode!r} (supported: 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, I;16, I)")
    return _to_channels(arr, channels)


def _composite(arr: np.ndarray, background: int) -> np.ndarray:
    """(H, W, C+1) with straight alpha -> (H, W, C) over a flat ``background`` gray level."""
    color = arr[..., :-1].astype(np.uint32)
    alpha = arr[..., -1:].astype(np.uint32)
    out = (color * alpha + background * (255 - alpha) + 127) // 255
    out = out.astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def _to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    if arr.ndim == 2:
        out = arr if channels == 1 else np.repeat(arr[:, :, None], 3, axis=2)
    elif channels == 3:
        out = arr
    else:
        out = np.asarray(Image.fromarray(arr, "RGB").convert("L"))  # ITU-R 601-2 luma
    return np.ascontiguousarray(out, dtype=np.uint8)


def resize_center_crop(pixels: np.ndarray, size: int) -> np.ndarray:
    """Resize the shorter side to ``size`` (bicubic) and crop the centre ``size`` x ``size``."""
    h, w = pixels.shape[:2]
    if (h, w) == (size, size):
        return pixels
    img = Image.fromarray(pixels)
    scale = size / min(h, w)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return np.ascontiguousarray(np.asarray(img.crop((left, top, left + size, top + size))))


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Shard bytes -> uint8 (H, W) or (H, W, 3), exactly the pixels that were stored."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
