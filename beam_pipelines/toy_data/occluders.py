"""Occluders: an opaque rectangle or ellipse in front of a test view (a flat colour or a patch
of a non-class photo), as a passer-by, a sign or a tree hides part of a landmark."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw

from beam_pipelines.toy_data import drawing

OCCLUDER_AREA = (0.10, 0.40)  # an occluder covers this share of the view's area (uniform)
OCCLUDER_SHAPES = ("rectangle", "ellipse")


@dataclasses.dataclass(frozen=True)
class Occluder:
    """An opaque shape in front of a view, in coordinates relative to the view.

    ``box``: (left, top, right, bottom) as fractions of the view's width and height;
    ``shape``: ``"rectangle"`` or ``"ellipse"`` (inscribed in the box); ``colour``: RGB fill
    when ``patch`` is None; ``patch``: RGB uint8 ``[h, w, 3]`` photo stretched over the box.
    """

    box: tuple[float, float, float, float]
    shape: str
    colour: tuple[int, int, int]
    patch: Optional[np.ndarray] = dataclasses.field(default=None, compare=False)

    @property
    def area(self) -> float:
        """Share of the view's area the shape covers (before rasterisation)."""
        left, top, right, bottom = self.box
        box_area = (right - left) * (bottom - top)
        return box_area * (math.pi / 4 if self.shape == "ellipse" else 1.0)


def draw_occluder(rng: np.random.Generator, photos: Sequence[np.ndarray]) -> Occluder:
    """A random occluder covering a share of the view in :data:`OCCLUDER_AREA` (uniform): a
    rectangle or ellipse (box aspect log-uniform in [0.5, 2]) filled with a flat colour or, half
    the time, a crop of one of ``photos`` (pass non-class photos only)."""
    area = rng.uniform(*OCCLUDER_AREA)
    shape = OCCLUDER_SHAPES[int(rng.integers(0, len(OCCLUDER_SHAPES)))]
    box_area = area * (4 / math.pi if shape == "ellipse" else 1.0)  # the ellipse fills pi/4
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    box_w = min(0.95, math.sqrt(box_area * aspect))
    box_h = min(0.95, box_area / box_w)
    box_w = min(0.95, box_area / box_h)
    left = rng.uniform(0.0, 1.0 - box_w)
    top = rng.uniform(0.0, 1.0 - box_h)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    patch = drawing.photo_crop(rng, photos) if photos and rng.random() < 0.5 else None
    return Occluder(box=(left, top, left + box_w, top + box_h), shape=shape, colour=colour,
                    patch=patch)


def _box_pixels(occluder: Occluder, out_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The occluder's box in a view of ``out_size`` (width, height): pixel (x0, y0, x1, y1),
    end-exclusive, at least one pixel wide and high, inside the view."""
    out_w, out_h = out_size
    left, top, right, bottom = occluder.box
    x0, y0 = int(round(left * out_w)), int(round(top * out_h))
    x1, y1 = max(x0 + 1, int(round(right * out_w))), max(y0 + 1, int(round(bottom * out_h)))
    return x0, y0, min(x1, out_w), min(y1, out_h)


def occluder_mask(occluder: Occluder, out_size: tuple[int, int]) -> np.ndarray:
    """Where ``occluder`` hides a view of ``out_size`` (width, height): bool ``[height, width]``."""
    x0, y0, x1, y1 = _box_pixels(occluder, out_size)
    mask = Image.new("L", out_size, 0)
    draw = ImageDraw.Draw(mask)
    if occluder.shape == "ellipse":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    return np.asarray(mask) > 0


def apply_occluder(pixels: np.ndarray, occluder: Occluder) -> np.ndarray:
    """``pixels`` (RGB uint8 ``[H, W, 3]``) with ``occluder`` painted over; a new array."""
    out_h, out_w = pixels.shape[:2]
    mask = occluder_mask(occluder, (out_w, out_h))
    x0, y0, x1, y1 = _box_pixels(occluder, (out_w, out_h))
    fill = np.empty_like(pixels)
    fill[...] = np.asarray(occluder.colour, np.uint8)
    if occluder.patch is not None:
        fill[y0:y1, x0:x1] = cv2.resize(np.ascontiguousarray(occluder.patch), (x1 - x0, y1 - y0),
                                        interpolation=cv2.INTER_AREA)
    return np.where(mask[..., None], fill, pixels)
