"""Pure per-image normalisation: any accepted image file -> upright RGB JPEG, longer side <= N.

:func:`normalise_image` is the whole per-image algorithm of ``landmarks-ingest``; the Beam DoFn
around it only counts and routes. It never touches the file system or the network.

Steps, in order (each failure raises :class:`ImageRejected` with a reason from :data:`REASONS`):

1. size guards on the raw bytes (``empty``, ``too_large``);
2. open with Pillow restricted to :data:`ACCEPTED_FORMATS`; unidentified bytes are sniffed to
   tell HTML/text (``not_an_image``) from real but unsupported formats (``unsupported_format``);
3. ``width * height`` checked against the pixel limit *before* any pixel is decoded
   (``pixel_limit``; Pillow's own decompression-bomb warning is turned into the same reason);
4. JPEG only: reduced-scale decoding (``Image.draft``, libjpeg's 1/2, 1/4, 1/8 IDCT), keeping at
   least ``draft_margin`` x the target size so the final antialiased resize still has detail;
5. decode (``truncated`` / ``decode_error``), first frame of animations;
6. convert to RGB: transparency composited on white, 16-bit grey scaled to 8 bits (not clipped);
7. EXIF orientation applied (the stored image is upright);
8. shrink (bicubic) so the longer side is at most ``max_side`` (never enlarge), encode as JPEG.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP")
"""Pillow format names accepted as input; anything else is rejected as ``unsupported_format``."""

REASONS = frozenset(
    {"empty", "too_large", "not_an_image", "unsupported_format", "pixel_limit", "truncated",
     "decode_error"}
)
"""Every reason :class:`ImageRejected` may carry."""


class ImageRejected(Exception):
    """The bytes cannot become a training image; ``reason`` is one of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in REASONS:
            raise ValueError(f"unknown rejection reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class NormaliseParams:
    """How images are normalised.

    Attributes:
      max_side: longer side of the stored JPEG in pixels (smaller images are kept as they are).
      max_pixels: largest accepted ``width * height`` of the input (default 50 MP, well below
        Pillow's own bomb limit of ~179 MP; a 50 MP RGB image decodes to 150 MB).
      max_bytes: largest accepted input file in bytes.
      jpeg_quality: quality of the re-encoded JPEG (1-95).
      draft_margin: JPEG reduced-scale decoding keeps at least ``draft_margin * max_side`` pixels
        on the longer side; 1.5 keeps the final resize from aliasing. ``0`` disables it.
    """

    max_side: int = 512
    max_pixels: int = 50_000_000
    max_bytes: int = 50 * 1024 * 1024
    jpeg_quality: int = 90
    draft_margin: float = 1.5

    def __post_init__(self):
        if self.max_side < 1:
            raise ValueError(f"max_side must be >= 1, got {self.max_side}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be >= 1, got {self.max_pixels}")
        if self.max_bytes < 1:
            raise ValueError(f"max_bytes must be >= 1, got {self.max_bytes}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"jpeg_quality must be in [1, 95], got {self.jpeg_quality}")
        if self.draft_margin != 0 and self.draft_margin < 1:
            raise ValueError(f"draft_margin must be 0 (off) or >= 1, got {self.draft_margin}")


@dataclasses.dataclass(frozen=True)
class NormalisedImage:
    """The result: an upright RGB JPEG and its size in pixels."""

    jpeg_bytes: bytes
    height: int
    width: int
    source_format: str


# (magic prefix, offset, human name) of formats Pillow is not asked to read.
_UNSUPPORTED_MAGIC = (
    (b"II*\x00", 0, "TIFF"),
    (b"MM\x00*", 0, "TIFF"),
    (b"%PDF", 0, "PDF"),
    (b"8BPS", 0, "PSD"),
    (b"\x00\x00\x01\x00", 0, "ICO"),
    (b"\x00\x00\x02\x00", 0, "CUR"),
    (b"\x00\x00\x00\x0cjP  ", 0, "JPEG 2000"),
    (b"\xff\x4f\xff\x51", 0, "JPEG 2000 codestream"),
    (b"ftypheic", 4, "HEIC"),
    (b"ftypheix", 4, "HEIC"),
    (b"ftypmif1", 4, "HEIF"),
    (b"ftypavif", 4, "AVIF"),
    (b"ftypavis", 4, "AVIF"),
    (b"P1", 0, "PBM"), (b"P2", 0, "PGM"), (b"P3", 0, "PPM"),
    (b"P4", 0, "PBM"), (b"P5", 0, "PGM"), (b"P6", 0, "PPM"),
    (b"\x76\x2f\x31\x01", 0, "OpenEXR"),
    (b"#?RADIANCE", 0, "HDR"),
)
_ACCEPTED_MAGIC = (
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
)


def sniff_unidentified(data: bytes) -> ImageRejected:
    """Explains bytes that Pillow (restricted to :data:`ACCEPTED_FORMATS`) could not identify.

    Returns (does not raise) an :class:`ImageRejected`: ``decode_error`` for a broken file of an
    accepted format, ``unsupported_format`` for a known image/document format outside the
    whitelist (SVG included), ``not_an_image`` for HTML, text and unknown bytes.
    """
    head = data[:1024]
    for magic, name in _ACCEPTED_MAGIC:
        if head.startswith(magic):
            return ImageRejected("decode_error", f"{name} header could not be parsed")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return ImageRejected("decode_error", "WEBP header could not be parsed")
    for magic, offset, name in _UNSUPPORTED_MAGIC:
        if head[offset:offset + len(magic)] == magic:
            return ImageRejected("unsupported_format", name)
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<"):
        if b"<svg" in head.lower():
            return ImageRejected("unsupported_format", "SVG")
        return ImageRejected("not_an_image", "HTML/XML markup")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return ImageRejected("not_an_image", f"unrecognised bytes {head[:8].hex()}")
    return ImageRejected("not_an_image", "text")


def _open(data: bytes, params: NormaliseParams) -> Image.Image:
    """Opens (header only) with the format whitelist; bomb warnings become ``pixel_limit``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected("pixel_limit", str(error)) from error
    except UnidentifiedImageError as error:
        raise sniff_unidentified(data) from error
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Header parsers raise these for damaged headers.
        raise ImageRejected("decode_error", f"header: {error}") from error
    width, height = image.size
    if width < 1 or height < 1:
        raise ImageRejected("decode_error", f"bad size {width}x{height}")
    if width * height > params.max_pixels:
        raise ImageRejected(
            "pixel_limit", f"{width}x{height} = {width * height} pixels > {params.max_pixels}"
        )
    return image


def _scaled_size(width: int, height: int, max_side: int) -> tuple[int, int]:
    """(width, height) with the longer side shrunk to ``max_side``; never enlarges."""
    longer = max(width, height)
    if longer <= max_side:
        return width, height
    scale = max_side / longer
    return max(1, round(width * scale)), max(1, round(height * scale))


def _request_reduced_decode(image: Image.Image, params: NormaliseParams) -> None:
    """JPEG: ask libjpeg for the smallest 1/2^k scale still >= ``draft_margin`` x target."""
    if image.format != "JPEG" or params.draft_margin == 0:
        return
    width, height = image.size
    keep = int(np.ceil(params.max_side * params.draft_margin))
    if max(width, height) <= keep:
        return
    # draft() picks the largest s in {1, 2, 4, 8} with size // s >= the requested size.
    image.draft(image.mode, _scaled_size(width, height, keep))


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded mode -> 8-bit RGB; transparency on white, 16-bit scaled to 8-bit."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG opens as I;16 or I): map 0..65535 -> 0..255 (divide by 257).
        # convert("L") would clip everything above 255 to white.
        values = np.asarray(image, dtype=np.float64)
        top = 65535.0 if mode.startswith("I;16") or values.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(values * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        grey = np.clip(np.rint(np.asarray(image, dtype=np.float64)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        mode in ("P", "L", "RGB") and "transparency" in image.info
    )
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def normalise_image(data: bytes, params: NormaliseParams = NormaliseParams()) -> NormalisedImage:
    """Turns the bytes of one image file into an upright RGB JPEG with longer side <= max_side.

    Args:
      data: the file contents (JPEG, PNG, GIF, WEBP or BMP).
      params: limits and output settings.

    Returns:
      The JPEG bytes with their height and width in pixels, and the input format name.

    Raises:
      ImageRejected: with a reason from :data:`REASONS` and a human-readable detail.
    """
    if not data:
        raise ImageRejected("empty", "0 bytes")
    if len(data) > params.max_bytes:
        raise ImageRejected("too_large", f"{len(data)} bytes > {params.max_bytes}")
    image = _open(data, params)
    source_format = image.format or "unknown"
    _request_reduced_decode(image, params)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image.seek(0)  # first frame of an animation
            image.load()
            ImageOps.exif_transpose(image, in_place=True)  # no copy when already upright
            rgb = _to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected("pixel_limit", str(error)) from error
    except OSError as error:
        reason = "truncated" if "truncated" in str(error).lower() else "decode_error"
        raise ImageRejected(reason, str(error)) from error
    except (SyntaxError, ValueError, EOFError, IndexError, TypeError, KeyError) as error:
        # Pillow's plugins signal damaged streams (and broken EXIF) with these.
        raise ImageRejected("decode_error", f"{type(error).__name__}: {error}") from error
    size = _scaled_size(rgb.width, rgb.height, params.max_side)
    if size != rgb.size:
        # Bicubic (antialiased when shrinking) costs half of Lanczos, and after the >= 1.5x
        # reduced decode its output is within ~0.6 grey levels of a full-resolution Lanczos
        # resize (bench/bench_normalise.py). reducing_gap=3 box-reduces very large non-JPEG
        # inputs first (e.g. a 6000 px PNG), with no visible difference.
        rgb = rgb.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
    output = io.BytesIO()
    rgb.save(output, format="JPEG", quality=params.jpeg_quality)
    return NormalisedImage(
        jpeg_bytes=output.getvalue(), height=rgb.height, width=rgb.width,
        source_format=source_format,
    )
