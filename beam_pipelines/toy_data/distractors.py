"""Plain non-landmarks: what a distractor shows before the camera model photographs it.

Half are crops of real (non-class) photos, so "a photo" alone never means "a landmark"; the
rest are drawn: clouds, shapes, gratings (:mod:`.drawing`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from beam_pipelines.toy_data import drawing

# Half the distractors are real photos, so "photo" alone does not mean "landmark".
DISTRACTOR_KINDS = ("photo_crop", "clouds", "photo_crop", "shapes", "photo_crop", "grating")


def distractor_kind(index: int, hard_fraction: float, offset: int) -> str:
    """The kind of plain distractor ``index`` (0-based among all distractors of its split).

    Kinds take turns, so even a handful of distractors covers several kinds; the turn counts
    plain distractors only (``floor(index * hard_fraction)`` hard ones come before ``index``;
    without hard ones: the index). ``offset`` (seed + stream role) shifts where turns start.
    """
    plain = index - math.floor(index * hard_fraction)
    return DISTRACTOR_KINDS[(plain + offset) % len(DISTRACTOR_KINDS)]


def distractor_scene(kind: str, rng: np.random.Generator,
                     photos: Sequence[np.ndarray]) -> np.ndarray:
    """Content of one non-landmark image, RGB uint8 ``[H, W, 3]``, before the camera model."""
    if kind == "photo_crop" and photos:
        return drawing.photo_crop(rng, photos)
    if kind == "shapes":
        return drawing.shapes(rng)
    if kind == "grating":
        return drawing.grating(rng)
    return drawing.clouds(rng)
