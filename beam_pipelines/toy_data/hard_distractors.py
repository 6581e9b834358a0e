"""Hard non-landmarks: a class photo's colours and texture without its geometry, or other
content wearing a class photo's colours. Made from class photos on purpose, so only geometry
(not colour statistics) separates them from the landmark."""

from __future__ import annotations

import math
from typing import Sequence

import cv2
import numpy as np

from beam_pipelines.toy_data import distractors

TILES_PER_SIDE = (8, 14)  # tile_shuffle: tiles along the class photo's long side (inclusive)
HARD_DISTRACTOR_KINDS = ("tile_shuffle", "recolour")


def is_hard_distractor(index: int, fraction: float) -> bool:
    """Whether distractor ``index`` (0-based) is hard: every 1/``fraction``-th one, so that
    exactly ``floor(n * fraction)`` of the first ``n`` are, evenly spread."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


def hard_distractor_kind(index: int, fraction: float, offset: int) -> str:
    """The kind of hard distractor ``index`` (one for which :func:`is_hard_distractor` holds):
    the kinds alternate along the hard ones, starting where ``offset`` (the stream role) says."""
    ordinal = math.floor(index * fraction)
    return HARD_DISTRACTOR_KINDS[(ordinal + offset) % len(HARD_DISTRACTOR_KINDS)]


def shuffled_tiles(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hard non-landmark: ``photo`` (RGB uint8 ``[H, W, 3]``) cut into square tiles, 8-14
    along its long side (:data:`TILES_PER_SIDE`), put back in random order.

    It keeps the photo's colours and texture (its pixels, up to the border trimmed to whole
    tiles) but none of its geometry: each tile is at most 1/64 of the photo's area, so
    geometric verification finds no large consistent match. Returns RGB uint8
    ``[rows * t, cols * t, 3]``, ``t`` the tile side in pixels.
    """
    height, width = photo.shape[:2]
    per_side = int(rng.integers(TILES_PER_SIDE[0], TILES_PER_SIDE[1] + 1))
    tile = max(1, min(max(height, width) // per_side, height, width))
    rows, cols = height // tile, width // tile
    top = int(rng.integers(0, height - rows * tile + 1))
    left = int(rng.integers(0, width - cols * tile + 1))
    grid = photo[top:top + rows * tile, left:left + cols * tile, :3]
    tiles = grid.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(-1, tile, tile, 3)
    tiles = tiles[rng.permutation(len(tiles))]
    return np.ascontiguousarray(
        tiles.reshape(rows, cols, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(
            rows * tile, cols * tile, 3))


def match_colours(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` (RGB uint8 ``[H, W, 3]``) with each channel's histogram replaced by
    ``reference``'s (RGB uint8 ``[h, w, 3]``): same layout, the reference's colour statistics.

    Exact matching by rank: a channel's pixels, ordered by value (ties by a blurred copy, so a
    flat area becomes a smooth ramp rather than noise), take the reference's sorted values at
    the same quantiles. Returns RGB uint8 ``[H, W, 3]``.
    """
    height, width = image.shape[:2]
    count = height * width
    # At most ~512 rows and columns of the reference: its histogram, not its detail, matters.
    reference = reference[::max(1, reference.shape[0] // 512), ::max(1, reference.shape[1] // 512)]
    matched = np.empty((height, width, 3), np.uint8)
    for channel in range(3):
        values = np.ascontiguousarray(image[..., channel], np.float32)
        smooth = cv2.GaussianBlur(values, (0, 0), 3.0)
        order = np.lexsort((smooth.ravel(), values.ravel()))
        target = np.sort(reference[..., channel].ravel())
        picks = ((np.arange(count) + 0.5) * (len(target) / count)).astype(np.int64)
        flat = np.empty(count, np.uint8)
        flat[order] = target[picks]
        matched[..., channel] = flat.reshape(height, width)
    return matched


def hard_distractor_scene(kind: str, rng: np.random.Generator, landmark_photo: np.ndarray,
                          photos: Sequence[np.ndarray]) -> np.ndarray:
    """Content of one hard non-landmark, RGB uint8 ``[H, W, 3]``, before the camera model.

    ``tile_shuffle``: :func:`shuffled_tiles` of ``landmark_photo`` (a class photo).
    ``recolour``: a crop of one of ``photos`` (never class photos) or cloud noise, through
    :func:`match_colours` onto ``landmark_photo``'s colour histogram.
    """
    if kind == "tile_shuffle":
        return shuffled_tiles(landmark_photo, rng)
    if kind != "recolour":
        raise ValueError(f"unknown hard distractor kind {kind!r}")
    base_kind = "photo_crop" if rng.random() < 0.5 else "clouds"
    return match_colours(distractors.distractor_scene(base_kind, rng, photos), landmark_photo)
