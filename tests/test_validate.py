"""The guarded decode: every mode converted on purpose, every bad file turned into its reason."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from data_zoo import BAD_REASONS, MAX_PIXELS, gradient, make_zoo, over_background, png_bytes
from PIL import Image

from pipelines.data.validate import DecodeSettings, InvalidImage, decode_image, from_array
from pipelines.imaging import decode_png

GRAY = DecodeSettings(channels=1, max_pixels=MAX_PIXELS)
RGB = DecodeSettings(channels=3, max_pixels=MAX_PIXELS)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return make_zoo(tmp_path_factory.mktemp("zoo"))


def test_every_mode_becomes_the_expected_gray_pixels(zoo):
    for rel, expected in zoo.good.items():
        out = decode_image((zoo.root / rel).read_bytes(), rel, GRAY)
        assert out.source_mode == zoo.modes[rel], rel
        np.testing.assert_array_equal(out.pixels, expected, err_msg=rel)
        np.testing.assert_array_equal(decode_png(out.png), expected, err_msg=rel)  # PNG is lossless


def test_exif_orientation_is_applied(zoo):
    out = decode_image((zoo.root / "cat/rotated.jpg").read_bytes(), "cat/rotated.jpg", GRAY)
    assert out.exif_transposed
    assert (out.width, out.height) == (10, 20)  # stored 20x10 landscape, displayed portrait
    plain = decode_image((zoo.root / "cat/gray.png").read_bytes(), "cat/gray.png", GRAY)
    assert not plain.exif_transposed


@pytest.mark.parametrize("rel", sorted(BAD_REASONS))
def test_bad_files_give_their_reason(zoo, rel):
    with pytest.raises(InvalidImage) as err:
        decode_image((zoo.root / rel).read_bytes(), rel, GRAY)
    assert str(err.value).startswith(zoo.bad[rel])


def test_three_channel_output():
    g = gradient(4, 5, 0)
    out = decode_image(png_bytes(Image.fromarray(g, "L")), "g.png", RGB)
    assert out.pixels.shape == (4, 5, 3)
    for c in range(3):
        np.testing.assert_array_equal(out.pixels[..., c], g)  # gray replicated
    rgba = np.dstack([gradient(3, 3, s) for s in (1, 2, 3, 4)])
    out = decode_image(png_bytes(Image.fromarray(rgba, "RGBA")), "a.png", RGB)
    np.testing.assert_array_equal(out.pixels, over_background(rgba[..., :3], rgba[..., 3:]))


def test_alpha_background_is_configurable():
    la = np.dstack([np.full((2, 2), 200, np.uint8), np.array([[0, 255], [128, 64]], np.uint8)])
    data = png_bytes(Image.fromarray(la, "LA"))
    black = decode_image(data, "x.png", DecodeSettings(channels=1, alpha_background=0)).pixels
    white = decode_image(data, "x.png", DecodeSettings(channels=1, alpha_background=255)).pixels
    np.testing.assert_array_equal(black, over_background(la[..., 0], la[..., 1], 0))
    np.testing.assert_array_equal(white, over_background(la[..., 0], la[..., 1], 255))
    assert black[0, 0] == 0 and white[0, 0] == 255 and black[0, 1] == white[0, 1] == 200


def test_palette_with_transparency_is_composited():
    pal = Image.new("P", (2, 1))
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.info["transparency"] = 0  # palette index 0 fully transparent
    out = decode_image(png_bytes(pal, transparency=0), "p.png", RGB)
    np.testing.assert_array_equal(out.pixels[0, 0], [255, 255, 255])
    np.testing.assert_array_equal(out.pixels[0, 1], [200, 100, 50])


def test_resize_to_image_size_keeps_the_centre():
    img = np.zeros((20, 40), np.uint8)
    img[:, 10:30] = 255  # the centre 20x20 is white, the sides black
    out = decode_image(png_bytes(Image.fromarray(img, "L")), "w.png", DecodeSettings(channels=1, image_size=10))
    assert out.pixels.shape == (10, 10)
    assert out.pixels[:, 1:-1].min() == 255  # squashing instead of cropping would show black sides
    assert out.pixels.min() > 200  # only bicubic ringing at the crop border


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose IHDR claims ``width`` x ``height`` (its pixel data cannot fill that)."""
    data = bytearray(png_bytes(Image.new("L", (1, 1))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
    data[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(data[ihdr:ihdr + 17])).to_bytes(4, "big")
    return bytes(data)


def test_bomb_is_refused_from_the_header_before_decoding():
    # Decoding would fail as truncated; the reason shows the header check came first.
    data = _png_claiming(9000, 9000)
    with pytest.raises(InvalidImage) as err:
        decode_image(data, "huge.png", DecodeSettings(max_pixels=50_000_000))
    assert str(err.value) == "decompression bomb: 9000x9000 = 81000000 pixels exceeds data.max_image_pixels=50000000"
    with pytest.raises(InvalidImage, match="truncated or corrupt image data"):
        decode_image(data, "huge.png", DecodeSettings(max_pixels=90_000_000))


def test_raw_arrays_and_channels_check():
    g = gradient(28, 28, 3)
    out = from_array(g, GRAY)
    np.testing.assert_array_equal(decode_png(out.png), g)
    assert from_array(g, RGB).pixels.shape == (28, 28, 3)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        DecodeSettings(channels=2)
