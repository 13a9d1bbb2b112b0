"""Builders for small synthetic image sources used by the data-plane tests.

:func:`make_zoo` writes an ImageFolder tree (classes ``cat`` and ``dog``) holding one image per
interesting pixel mode, an EXIF-rotated JPEG, an exact duplicate, and the bad-file zoo, and
returns what each file should become. Expectations are computed here with plain PIL/numpy, not
with the code under test.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

BAD_REASONS = {  # relative path -> the start of the reason the manifest must give
    "cat/truncated.png": "truncated or corrupt image data",
    "dog/truncated.jpg": "truncated or corrupt image data",
    "cat/empty.png": "empty file (0 bytes)",
    "dog/text.jpg": "not an image: the content is not a recognised image format",
    "cat/bomb.png": "decompression bomb: 1500x1000 = 1500000 pixels exceeds data.max_image_pixels=1000000",
    "dog/notes.txt": "unsupported file extension '.txt'",
    "dog/disguised.png": "unsupported image format 'PPM'",
    "cat/float.tif": "unsupported pixel mode 'F'",
}
MAX_PIXELS = 1_000_000  # the zoo's bomb is 1.5 MP, so tests set data.max_image_pixels to this


def png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def gradient(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma exactly as PIL computes L from RGB."""
    return np.asarray(Image.fromarray(rgb, "RGB").convert("L"))


def over_background(color: np.ndarray, alpha: np.ndarray, bg: int = 255) -> np.ndarray:
    c, a = color.astype(np.uint32), alpha.astype(np.uint32)
    return ((c * a + bg * (255 - a) + 127) // 255).astype(np.uint8)


@dataclass
class Zoo:
    root: Path
    good: dict[str, np.ndarray] = field(default_factory=dict)  # relpath -> expected L pixels (channels=1)
    modes: dict[str, str] = field(default_factory=dict)  # relpath -> source mode
    bad: dict[str, str] = field(default_factory=lambda: dict(BAD_REASONS))
    duplicates: list[tuple[str, str]] = field(default_factory=list)


def make_zoo(root: Path) -> Zoo:
    zoo = Zoo(root)
    for cls in ("cat", "dog"):
        (root / cls).mkdir(parents=True, exist_ok=True)

    def good(rel: str, data: bytes, expected: np.ndarray, mode: str) -> None:
        (root / rel).write_bytes(data)
        zoo.good[rel] = expected
        zoo.modes[rel] = mode

    # --- one image per source mode -------------------------------------------------------
    g = gradient(12, 10, 1)
    good("cat/gray.png", png_bytes(Image.fromarray(g, "L")), g, "L")

    bits = gradient(8, 8, 2) > 127
    good("cat/bits.png", png_bytes(Image.fromarray(bits)), np.where(bits, 255, 0).astype(np.uint8), "1")

    la_l, la_a = gradient(9, 7, 3), gradient(9, 7, 4)
    good("cat/la.png", png_bytes(Image.fromarray(np.dstack([la_l, la_a]), "LA")), over_background(la_l, la_a), "LA")

    pal = Image.fromarray(gradient(10, 10, 5) % 16, "P")
    pal.putpalette([v for i in range(256) for v in (i * 16 % 256, i * 7 % 256, 255 - i % 256)])
    good("cat/palette.png", png_bytes(pal), luma(np.asarray(pal.convert("RGB"))), "P")

    rgba = np.dstack([gradient(6, 8, 6), gradient(6, 8, 7), gradient(6, 8, 8), gradient(6, 8, 9)])
    good("dog/rgba.png", png_bytes(Image.fromarray(rgba, "RGBA")), luma(over_background(rgba[..., :3], rgba[..., 3:])), "RGBA")

    cmyk = Image.fromarray(np.dstack([gradient(16, 16, s) for s in (10, 11, 12, 13)]), "CMYK")
    cmyk_jpeg = jpeg_bytes(cmyk)
    with Image.open(io.BytesIO(cmyk_jpeg)) as im:  # JPEG is lossy: expect what the file decodes to
        good("dog/cmyk.jpg", cmyk_jpeg, luma(np.asarray(im.convert("RGB"))), "CMYK")

    wide = (gradient(5, 9, 14).astype(np.uint16) * 257 + np.uint16(100)).astype(np.uint16)
    i16 = Image.fromarray(wide)  # uint16 -> mode I;16
    expected16 = ((wide.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    good("dog/deep.png", png_bytes(i16), expected16, "I;16")

    rgb = np.dstack([gradient(7, 5, 15), gradient(7, 5, 16), gradient(7, 5, 17)])
    rgb_png = png_bytes(Image.fromarray(rgb, "RGB"))
    good("dog/rgb.png", rgb_png, luma(rgb), "RGB")
    good("dog/rgb_copy.png", rgb_png, luma(rgb), "RGB")  # exact duplicate
    zoo.duplicates.append(("dog/rgb.png", "dog/rgb_copy.png"))

    # EXIF orientation 6 (rotate 90 CW to display): a 20x10 (WxH) landscape shows as 10x20.
    wide_img = Image.fromarray(np.tile(np.linspace(0, 255, 20, dtype=np.uint8), (10, 1)), "L")
    exif = Image.Exif()
    exif[0x0112] = 6
    exif_jpeg = jpeg_bytes(wide_img, exif=exif.tobytes())
    with Image.open(io.BytesIO(exif_jpeg)) as im:
        decoded = np.asarray(im.convert("L"))
    good("cat/rotated.jpg", exif_jpeg, np.ascontiguousarray(np.rot90(decoded, k=-1)), "L")

    # --- the bad-file zoo ---------------------------------------------------------------
    big_png = png_bytes(Image.fromarray(gradient(64, 64, 18), "L"))
    (root / "cat/truncated.png").write_bytes(big_png[: len(big_png) // 2])
    big_jpeg = jpeg_bytes(Image.fromarray(np.dstack([gradient(64, 64, s) for s in (19, 20, 21)]), "RGB"))
    (root / "dog/truncated.jpg").write_bytes(big_jpeg[: len(big_jpeg) // 2])
    (root / "cat/empty.png").write_bytes(b"")
    (root / "dog/text.jpg").write_text("this is not a JPEG, just text pretending to be one\n")
    (root / "cat/bomb.png").write_bytes(png_bytes(Image.new("L", (1500, 1000)), optimize=True))
    (root / "dog/notes.txt").write_text("labels are folder names\n")
    ppm = io.BytesIO()
    Image.fromarray(g, "L").save(ppm, format="PPM")
    (root / "dog/disguised.png").write_bytes(ppm.getvalue())
    tif = io.BytesIO()
    Image.fromarray(np.ones((4, 4), dtype=np.float32), "F").save(tif, format="TIFF")
    (root / "cat/float.tif").write_bytes(tif.getvalue())

    # not images at all: ignored, not reported as invalid
    (root / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "cat/.hidden.png").write_bytes(png_bytes(Image.fromarray(g, "L")))
    (root / "README.txt").write_text("a stray file at the root\n")
    return zoo


def make_split_tree(root: Path, classes=("ants", "bees", "wasps"), per_class=(6, 2, 2), size=(8, 8),
                    splits=("train", "val", "test")) -> dict[str, np.ndarray]:
    """``root/<split>/<class>/<i>.png`` gray images; returns relpath -> pixels."""
    out = {}
    seed = 100
    for split, n in zip(splits, per_class):
        for cls in classes:
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                seed += 1
                px = gradient(*size, seed)
                rel = "/".join(p for p in (split, cls, f"{i:03d}.png") if p)  # split "" = no split folders
                (root / rel).write_bytes(png_bytes(Image.fromarray(px, "L")))
                out[rel] = px
    return out
