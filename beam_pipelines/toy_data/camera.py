"""The camera model: a scene (RGB array) -> a photograph of it from a random viewpoint -> JPEG.

Landmarks and distractors go through the same camera, so nothing but content separates them;
test views use a harder :class:`~.view_geometry.ViewParams` and may add :class:`ViewExtras`.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Optional, Sequence

import cv2
import numpy as np
from PIL import Image

from beam_pipelines.toy_data import drawing, occluders, photometric, view_geometry


@dataclasses.dataclass(frozen=True)
class ViewExtras:
    """What the hard settings add to one test view: ``area_fraction`` of the source shown by
    a partial view (None: a normal view), and an ``occluder`` (None: none)."""

    area_fraction: Optional[float] = None
    occluder: Optional[occluders.Occluder] = None


def draw_view_extras(rng: np.random.Generator, partial_fraction: float, occluder_fraction: float,
                     occluder_photos: Sequence[np.ndarray]) -> ViewExtras:
    """Decides, from a view's own auxiliary stream ``rng``, whether it is partial (probability
    ``partial_fraction``, area uniform in :data:`~.view_geometry.PARTIAL_AREA`) and occluded
    (probability ``occluder_fraction``, see :func:`~.occluders.draw_occluder`). The same draws
    are made whatever the fractions, so raising a fraction only adds partial/occluded views."""
    partial = rng.random() < partial_fraction
    area = rng.uniform(*view_geometry.PARTIAL_AREA)
    occluded = rng.random() < occluder_fraction
    occluder = occluders.draw_occluder(rng, occluder_photos)
    return ViewExtras(area_fraction=area if partial else None,
                      occluder=occluder if occluded else None)


def _warp_scene(scene: np.ndarray, rng: np.random.Generator, params: view_geometry.ViewParams,
                min_size: int, max_size: int, area_fraction: Optional[float]) -> np.ndarray:
    """The geometry of a view: RGB uint8 ``[out_h, out_w, 3]`` showing a random region of
    ``scene`` in perspective, with a drawn background wherever the region leaves the scene."""
    out_w, out_h = view_geometry.output_size(scene.shape, rng, min_size, max_size)
    corners = view_geometry.view_corners(scene.shape, (out_w, out_h), params, rng,
                                         area_fraction=area_fraction)
    target = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], np.float64)
    output_to_source = view_geometry.homography(target, corners)
    # The surroundings are drawn small and upsampled: they are smooth anyway, and that is fast.
    small_h, small_w = max(8, out_h // 4), max(8, out_w // 4)
    pixels = cv2.resize(drawing.background_scene(rng, small_h, small_w), (out_w, out_h),
                        interpolation=cv2.INTER_LINEAR)
    # OpenCV warps ~10x faster than Pillow's bicubic PERSPECTIVE; BORDER_TRANSPARENT leaves the
    # background wherever the view falls outside the scene.
    cv2.warpPerspective(np.ascontiguousarray(scene), output_to_source, (out_w, out_h), dst=pixels,
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_TRANSPARENT)
    return pixels


def render_view(scene: np.ndarray, rng: np.random.Generator, params: view_geometry.ViewParams,
                min_size: int, max_size: int, extras: ViewExtras = ViewExtras()) -> Image.Image:
    """A photograph of ``scene`` (RGB uint8 ``[H, W, 3]``) from a random viewpoint.

    Geometry (perspective warp of a random region, surroundings filled with a background
    scene; a partial view's region per ``extras.area_fraction``), then the occluder if any,
    then light (per-channel gain, gamma, brightness, contrast as one lookup table),
    saturation, blur and sensor noise. Returns an RGB image whose long side is in
    ``[min_size, max_size]``. With default ``extras`` the draws from ``rng`` are exactly the
    standard generator's.
    """
    pixels = _warp_scene(scene, rng, params, min_size, max_size, extras.area_fraction)
    if extras.occluder is not None:  # in front of the scene, lit by the same light
        pixels = occluders.apply_occluder(pixels, extras.occluder)
    return photometric.develop(Image.fromarray(pixels), rng)


def encode_jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    """JPEG bytes at a random quality in [60, 95] (Pillow's encoder is deterministic)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
    return buffer.getvalue()
