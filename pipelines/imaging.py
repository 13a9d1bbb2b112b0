"""Image decoding shared by the data plane and the packaged model: bytes -> checked uint8 pixels.

One guarded step per image (see docs/data.md, "Decoding"): empty or unidentifiable content,
formats outside :data:`SUPPORTED_FORMATS`, images over the pixel cap (checked from the header,
before any pixel is decoded) and truncated data all raise :class:`InvalidImage` with the reason;
what survives has its EXIF orientation applied and its mode converted deliberately to 1 or 3
channels, then is optionally resized (shorter side, bicubic) and centre-cropped.

This module imports numpy and PIL only — nothing from ``pipelines`` — because it ships inside
every registered model (``code/imaging.py``) next to ``serving.py``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

SUPPORTED_FORMATS = ("BMP", "GIF", "JPEG", "PNG", "TIFF", "WEBP")
IMAGE_EXTENSIONS = (".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}
_TO_RGB_MODES = {"RGB", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


class InvalidImage(ValueError):
    """The input is not a usable image; ``str(exc)`` is the reason recorded for it."""


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 (H, W) for 1 channel, (H, W, 3) for 3
    format: str  # PIL's format name, e.g. "PNG"
    source_mode: str  # PIL mode before conversion, e.g. "RGBA"
    transposed: bool  # an EXIF orientation other than "normal" was applied


def decode(data: bytes, *, channels: int, max_pixels: int, alpha_background: int = 255,
           size: int | tuple[int, int] | None = None) -> Decoded:
    """Decode, check and convert one encoded image; raise :class:`InvalidImage` with a reason."""
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
        if width * height > max_pixels:
            raise InvalidImage(f"decompression bomb: {width}x{height} = {width * height} pixels exceeds "
                               f"data.max_image_pixels={max_pixels}")
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
            pixels = convert_pixels(oriented, channels, alpha_background)
        except InvalidImage:
            raise
        except Exception as exc:
            raise InvalidImage(f"cannot convert mode {source_mode!r} ({_short(exc)})") from None
    if size is not None:
        pixels = resize_center_crop(pixels, size)
    return Decoded(pixels, fmt, source_mode, transposed)


def convert_pixels(img: Image.Image, channels: int, background: int = 255) -> np.ndarray:
    """Any supported PIL mode -> uint8 array with ``channels`` channels.

    ``1``/``L`` as is; alpha modes composited over ``background``; palettes expanded (with their
    transparency); 16-bit scaled to 8 bits (round(v * 255 / 65535)); CMYK/YCbCr/LAB/HSV through
    RGB; RGB -> L by ITU-R 601 luma, L -> RGB by replication. Other modes raise :class:`InvalidImage`.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode == "1":
        arr = np.asarray(img.convert("L"))
    elif mode == "L":
        arr = np.asarray(img)
    elif mode in _ALPHA_MODES:
        arr = _composite(np.asarray(img.convert("LA" if mode in ("LA", "La") else "RGBA")), background)
    elif mode in _SIXTEEN_BIT_MODES:
        wide = np.asarray(img).astype(np.int64)
        arr = ((np.clip(wide, 0, 65535) * 255 + 32767) // 65535).astype(np.uint8)
    elif mode in _TO_RGB_MODES:
        arr = np.asarray(img.convert("RGB"))
    else:
        raise InvalidImage(f"unsupported pixel mode {mode!r} (supported: 1, L, LA, P, PA, RGB, RGBA, CMYK, YCbCr, "
                           "I;16, I)")
    return to_channels(arr, channels)


def to_channels(arr: np.ndarray, channels: int) -> np.ndarray:
    """uint8 (H, W) or (H, W, 3) -> ``channels`` channels (luma for RGB -> L, replication for L -> RGB)."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        out = arr if channels == 1 else np.repeat(arr[:, :, None], 3, axis=2)
    elif channels == 3:
        out = arr
    else:
        out = np.asarray(Image.fromarray(arr, "RGB").convert("L"))  # ITU-R 601-2 luma
    return np.ascontiguousarray(out, dtype=np.uint8)


def _composite(arr: np.ndarray, background: int) -> np.ndarray:
    """(H, W, C+1) with straight alpha -> (H, W, C) over a flat ``background`` gray level."""
    color = arr[..., :-1].astype(np.uint32)
    alpha = arr[..., -1:].astype(np.uint32)
    out = ((color * alpha + background * (255 - alpha) + 127) // 255).astype(np.uint8)
    return out[..., 0] if out.shape[-1] == 1 else out


def resize_center_crop(pixels: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize the shorter side to fit ``size`` ((H, W), or one int for a square; bicubic) and
    crop the centre; a no-op when the image already has that size."""
    th, tw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    h, w = pixels.shape[:2]
    if (h, w) == (th, tw):
        return pixels
    scale = max(th / h, tw / w)
    nw, nh = max(tw, round(w * scale)), max(th, round(h * scale))
    img = Image.fromarray(pixels).resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - tw) // 2, (nh - th) // 2
    return np.ascontiguousarray(np.asarray(img.crop((left, top, left + tw, top + th))))


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of uint8 pixels (what the dataset shards store)."""
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Stored shard bytes -> uint8 (H, W) or (H, W, 3), exactly the pixels that were stored."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img)


def _short(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
