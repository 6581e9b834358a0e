"""Per-image normalisation: every kind of input image, every rejection reason.

The ``make_*`` builders here are also used by the pipeline tests (``test_ingest_pipeline.py``).
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from beam_pipelines.ingest.normalise import (
    ImageRejected,
    NormaliseParams,
    normalise_image,
    sniff_unidentified,
)

RED, BLUE = (255, 0, 0), (0, 0, 255)


# ---------------------------------------------------------------------------------------------
# Builders (small images made by the tests themselves)
# ---------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **save_args) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save_args)
    return buffer.getvalue()


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth gradients plus mild noise: compresses like a photo, not like flat colour."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = [
        128 + 100 * np.sin(x / (7 + 3 * c) + y / (11 + 2 * c) + c) for c in range(3)
    ]
    pixels = np.stack(channels, axis=-1) + rng.normal(0, 6, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def marked(width: int, height: int) -> Image.Image:
    """Blue image with a red block in the top-left corner (checks orientation)."""
    image = Image.new("RGB", (width, height), BLUE)
    image.paste(RED, (0, 0, width // 4, height // 4))
    return image


# exif_transpose applies these to stored pixels; storing the inverse gives an upright result.
_INVERSE_OF_EXIF_OP = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # exif op is ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # exif op is ROTATE_90
}


def exif_rotated_jpeg(upright: Image.Image, orientation: int) -> bytes:
    """JPEG whose stored pixels are turned, with the EXIF tag that turns them upright again."""
    stored = upright.transpose(_INVERSE_OF_EXIF_OP[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=95, exif=exif.tobytes())


def png_with_size(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` but holds one tiny row: a pixel bomb."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    ihdr_start = 8 + 8  # signature, then length + "IHDR"
    data[ihdr_start:ihdr_start + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12:ihdr_start + 13]))
    data[ihdr_start + 13:ihdr_start + 17] = struct.pack(">I", crc)
    return bytes(data)


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 30), (0, 255, 255, 0)), "JPEG")  # red in CMYK


def grayscale_png() -> bytes:
    return encode(Image.new("L", (40, 30), 77), "PNG")


def palette_png() -> bytes:
    return encode(marked(40, 30).convert("P", palette=Image.Palette.ADAPTIVE, colors=4), "PNG")


def rgba_png() -> bytes:
    """Left half opaque red, right half fully transparent (must become white)."""
    image = Image.new("RGBA", (40, 30), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (0, 0, 20, 30))
    return encode(image, "PNG")


def gray16_png(value: int = 32896) -> bytes:
    """16-bit grey PNG of constant ``value`` (32896 = 128 * 257)."""
    return encode(Image.fromarray(np.full((30, 40), value, np.uint16)), "PNG")


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), RED), Image.new("RGB", (40, 30), BLUE)]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)


def tiff_bytes() -> bytes:
    return encode(Image.new("RGB", (20, 10), RED), "TIFF")


def truncated_jpeg() -> bytes:
    full = encode(photo_like(200, 150), "JPEG", quality=90)
    return full[: len(full) // 2]


def decode(jpeg: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(jpeg))
    assert image.format == "JPEG" and image.mode == "RGB"
    return np.asarray(image).astype(np.int32)


def assert_close(pixel, expected, tolerance=12):
    assert np.all(np.abs(np.asarray(pixel, np.int32) - np.asarray(expected)) <= tolerance), (
        pixel, expected)


# ---------------------------------------------------------------------------------------------
# Accepted kinds
# ---------------------------------------------------------------------------------------------


def test_small_rgb_jpeg_is_kept_at_its_size_never_enlarged():
    source = photo_like(60, 40)
    result = normalise_image(encode(source, "JPEG", quality=95), NormaliseParams(max_side=512))
    assert (result.height, result.width, result.source_format) == (40, 60, "JPEG")
    # Re-encoding a JPEG at quality 90 keeps pixels close to the source.
    assert np.abs(decode(result.jpeg_bytes) - np.asarray(source, np.int32)).mean() < 6


def test_longer_side_is_shrunk_to_max_side_keeping_aspect():
    result = normalise_image(encode(photo_like(1000, 300), "PNG"), NormaliseParams(max_side=512))
    assert (result.width, result.height) == (512, 154)  # 300 * 512 / 1000 = 153.6
    tall = normalise_image(encode(photo_like(90, 300), "PNG"), NormaliseParams(max_side=100))
    assert (tall.width, tall.height) == (30, 100)


def test_reduced_scale_jpeg_decode_matches_full_decode_resize():
    """The draft path (libjpeg 1/2 scale for 1600 -> 512) is close to a full decode + resize."""
    source = photo_like(1600, 1200, seed=3)
    data = encode(source, "JPEG", quality=92)
    result = normalise_image(data, NormaliseParams(max_side=512))
    assert (result.width, result.height) == (512, 384)
    reference = Image.open(io.BytesIO(data)).convert("RGB").resize((512, 384),
                                                                  Image.Resampling.LANCZOS)
    reference_pixels = np.asarray(reference, np.int32)
    error = np.abs(decode(result.jpeg_bytes) - reference_pixels).mean()
    # The JPEG re-encoding alone costs this much; the reduced decode may add at most ~1 level.
    encode_only = np.abs(decode(encode(reference, "JPEG", quality=90)) - reference_pixels).mean()
    assert error <= encode_only + 1.0


def test_cmyk_jpeg_becomes_rgb():
    result = normalise_image(cmyk_jpeg())
    assert_close(decode(result.jpeg_bytes)[15, 20], RED, tolerance=20)


def test_grayscale_png_becomes_grey_rgb():
    pixel = decode(normalise_image(grayscale_png()).jpeg_bytes)[15, 20]
    assert_close(pixel, (77, 77, 77), tolerance=3)


def test_palette_png_keeps_its_colours():
    pixels = decode(normalise_image(palette_png()).jpeg_bytes)
    assert_close(pixels[2, 2], RED, tolerance=25)
    assert_close(pixels[25, 35], BLUE, tolerance=25)


def test_rgba_png_is_composited_on_white():
    pixels = decode(normalise_image(rgba_png()).jpeg_bytes)
    assert_close(pixels[15, 5], RED, tolerance=20)
    assert_close(pixels[15, 35], (255, 255, 255), tolerance=5)


def test_palette_png_with_transparency_is_composited_on_white():
    image = Image.new("P", (40, 30), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    image.paste(1, (0, 0, 20, 30))
    data = encode(image, "PNG", transparency=0)
    pixels = decode(normalise_image(data).jpeg_bytes)
    assert_close(pixels[15, 5], (0, 255, 0), tolerance=25)
    assert_close(pixels[15, 35], (255, 255, 255), tolerance=5)


def test_16_bit_png_is_scaled_not_clipped():
    pixel = decode(normalise_image(gray16_png(32896)).jpeg_bytes)[15, 20]
    assert_close(pixel, (128, 128, 128), tolerance=2)  # clipping would give 255
    dark = decode(normalise_image(gray16_png(2570)).jpeg_bytes)[15, 20]
    assert_close(dark, (10, 10, 10), tolerance=2)


def test_animated_gif_keeps_the_first_frame():
    result = normalise_image(animated_gif())
    assert result.source_format == "GIF"
    assert_close(decode(result.jpeg_bytes)[15, 20], RED, tolerance=25)


@pytest.mark.parametrize("orientation", [2, 3, 4, 5, 6, 7, 8])
def test_exif_rotated_photo_is_stored_upright(orientation):
    result = normalise_image(exif_rotated_jpeg(marked(60, 40), orientation))
    assert (result.width, result.height) == (60, 40)
    pixels = decode(result.jpeg_bytes)
    assert_close(pixels[2, 2], RED, tolerance=30)  # marker top-left, as in the upright image
    assert_close(pixels[37, 57], BLUE, tolerance=30)
    assert_close(pixels[2, 57], BLUE, tolerance=30)


def test_exif_rotation_is_applied_with_reduced_decoding_too():
    upright = marked(1600, 1200)
    result = normalise_image(exif_rotated_jpeg(upright, 6), NormaliseParams(max_side=200))
    assert (result.width, result.height) == (200, 150)
    pixels = decode(result.jpeg_bytes)
    assert_close(pixels[5, 5], RED, tolerance=30)
    assert_close(pixels[140, 190], BLUE, tolerance=30)


@pytest.mark.parametrize("fmt", ["WEBP", "BMP"])
def test_other_whitelisted_formats(fmt):
    result = normalise_image(encode(marked(40, 30), fmt))
    assert result.source_format == fmt
    assert_close(decode(result.jpeg_bytes)[2, 2], RED, tolerance=30)


# ---------------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>Not found</body></html>", "not_an_image"),
        (b"just some text, not an image\n", "not_an_image"),
        (b"\x00\x01\x02\x03binary junk\xfe\xff" * 4, "not_an_image"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>',
         "unsupported_format"),
        (b"%PDF-1.4 fake", "unsupported_format"),
        (b"\xff\xd8\xff\xe0 then nothing useful", "decode_error"),
    ],
)
def test_rejected_bytes(data, reason):
    with pytest.raises(ImageRejected) as caught:
        normalise_image(data)
    assert caught.value.reason == reason


def test_tiff_is_an_unsupported_format():
    with pytest.raises(ImageRejected) as caught:
        normalise_image(tiff_bytes())
    assert (caught.value.reason, caught.value.detail) == ("unsupported_format", "TIFF")


def test_truncated_jpeg_is_rejected():
    with pytest.raises(ImageRejected) as caught:
        normalise_image(truncated_jpeg())
    assert caught.value.reason == "truncated"


def test_truncated_png_is_rejected():
    data = encode(photo_like(100, 80), "PNG")
    with pytest.raises(ImageRejected) as caught:
        normalise_image(data[: len(data) // 2])
    assert caught.value.reason in ("truncated", "decode_error")


def test_pixel_limit_is_checked_before_decoding():
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageRejected) as caught:
        normalise_image(data, NormaliseParams(max_pixels=300 * 200 - 1))
    assert caught.value.reason == "pixel_limit"
    normalise_image(data, NormaliseParams(max_pixels=300 * 200))  # exactly at the limit is fine


@pytest.mark.parametrize("side", [9000, 20000])  # 81 MP (over our limit) and 400 MP (Pillow's)
def test_pixel_bomb_headers_are_rejected_without_decoding(side):
    with pytest.raises(ImageRejected) as caught:
        normalise_image(png_with_size(side, side))
    assert caught.value.reason == "pixel_limit"


def test_file_over_the_byte_cap_is_too_large():
    data = encode(photo_like(50, 50), "PNG")
    with pytest.raises(ImageRejected) as caught:
        normalise_image(data, NormaliseParams(max_bytes=len(data) - 1))
    assert caught.value.reason == "too_large"


def test_sniffing_names_the_format():
    assert sniff_unidentified(b"II*\x00rest").detail == "TIFF"
    assert sniff_unidentified(b"8BPS....").detail == "PSD"
    assert sniff_unidentified(b"\x00\x00\x00\x18ftypheic....").detail == "HEIC"


def test_params_are_validated():
    with pytest.raises(ValueError):
        NormaliseParams(max_side=0)
    with pytest.raises(ValueError):
        NormaliseParams(jpeg_quality=100)
    with pytest.raises(ValueError):
        NormaliseParams(draft_margin=0.5)


def test_reduced_decode_keeps_at_least_margin_times_the_target():
    from beam_pipelines.ingest.normalise import _request_reduced_decode

    data = encode(photo_like(1600, 1200), "JPEG")
    cases = [(512, 1.5, (800, 600)),  # 1/2: 800 >= 768 = 1.5 * 512; 1/4 would be 400
             (256, 1.5, (400, 300)),  # 1/4: 400 >= 384
             (100, 1.5, (200, 150)),  # 1/8 is the smallest libjpeg scale
             (512, 0, (1600, 1200))]  # draft off
    for max_side, margin, size in cases:
        image = Image.open(io.BytesIO(data))
        _request_reduced_decode(image, NormaliseParams(max_side=max_side, draft_margin=margin))
        image.load()
        assert image.size == size, (max_side, margin)
    png = Image.open(io.BytesIO(encode(photo_like(1600, 1200), "PNG")))
    _request_reduced_decode(png, NormaliseParams(max_side=100))
    assert png.size == (1600, 1200)  # only JPEG has a reduced-scale decoder
