"""Where a view looks: the region of the source photo it shows, as a quadrilateral.

Coordinates are source pixels, ``(x, y)`` with the origin at the top-left corner; a region's
corners come in the order top-left, top-right, bottom-right, bottom-left of the view. Pure
numpy: the warp itself is :func:`beam_pipelines.toy_data.camera.render_view`'s.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import numpy as np

# A partial view shows this share of the source's area (uniform); recorded in toy_data.json.
PARTIAL_AREA = (0.25, 0.50)


@dataclasses.dataclass(frozen=True)
class ViewParams:
    """How far a view may stray from the frontal, full photo.

    ``min_scale``/``max_scale``: side of the viewed region as a fraction of the source's
    (above 1 = zoomed out, the surroundings show); ``max_rotation``: degrees;
    ``max_tilt``: corner jitter as a fraction of the region's side (perspective).
    """

    min_scale: float
    max_scale: float
    max_rotation: float
    max_tilt: float


TRAIN_VIEW = ViewParams(min_scale=0.55, max_scale=1.1, max_rotation=8.0, max_tilt=0.06)
TEST_VIEW = ViewParams(min_scale=0.4, max_scale=1.2, max_rotation=15.0, max_tilt=0.12)


def homography(source_points: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """The 3x3 projective map sending 4 ``source_points`` ``[4, 2]`` (x, y) to ``target_points``."""
    # Kept hand-written rather than cv2.getPerspectiveTransform: the same seed must keep giving
    # byte-identical files, and OpenCV's (float32 points only) differs from this float64 solve
    # by up to 2.4e-5 relative (1000 random views), which changed 132 of the default run's 148
    # JPEGs when tried.
    rows, rhs = [], []
    for (x, y), (u, v) in zip(source_points, target_points):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs.extend([u, v])
    coefficients = np.linalg.solve(np.asarray(rows, np.float64), np.asarray(rhs, np.float64))
    return np.append(coefficients, 1.0).reshape(3, 3)


def output_size(source_shape: Sequence[int], rng: np.random.Generator, min_size: int,
                max_size: int) -> tuple[int, int]:
    """(width, height) of a view: long side log-uniform in [min_size, max_size], aspect near
    the source's."""
    height, width = source_shape[:2]
    long_side = int(round(math.exp(rng.uniform(math.log(min_size), math.log(max_size)))))
    aspect = float(np.clip(width / height * rng.uniform(0.8, 1.25), 0.5, 2.0))  # width / height
    if aspect >= 1:
        return long_side, max(16, int(round(long_side / aspect)))
    return max(16, int(round(long_side * aspect))), long_side


def partial_region_size(source_size: tuple[int, int], out_size: tuple[int, int],
                        area_fraction: float) -> tuple[float, float]:
    """(width, height) in source pixels of a partial view's region: the view's aspect, covering
    ``area_fraction`` of the source's area, shrunk (keeping the aspect) until it fits inside.

    Args:
      source_size: the source's (width, height), pixels.
      out_size: the view's (width, height), pixels (only its aspect matters).
      area_fraction: share of the source's area, in (0, 1].
    """
    width, height = source_size
    aspect = out_size[0] / out_size[1]
    region_w = math.sqrt(area_fraction * width * height * aspect)
    region_h = region_w / aspect
    shrink = min(1.0, width / region_w, height / region_h)
    return region_w * shrink, region_h * shrink


def _scaled_region_size(source_size: tuple[int, int], out_size: tuple[int, int],
                        params: ViewParams, rng: np.random.Generator) -> tuple[float, float]:
    """(width, height) in source pixels of a normal view's region: its side a uniform draw in
    ``params``' scale range times the source's, the view's aspect."""
    width, height = source_size
    out_w, out_h = out_size
    scale = rng.uniform(params.min_scale, params.max_scale)
    region_w = scale * width
    region_h = region_w * out_h / out_w
    if region_h > scale * height * 1.15:  # keep the region's height in proportion too
        region_h = scale * height * 1.15
        region_w = region_h * out_w / out_h
    return region_w, region_h


def view_corners(source_shape: Sequence[int], out_size: tuple[int, int], params: ViewParams,
                 rng: np.random.Generator, area_fraction: Optional[float] = None) -> np.ndarray:
    """Corners ``[4, 2]`` (x, y; TL, TR, BR, BL) in the source of the region a view shows.

    With ``area_fraction`` (a partial view) the region's size comes from
    :func:`partial_region_size` instead of ``params``' scale (no scale is drawn); rotation and
    tilt still apply, then :func:`fit_partial_quad` restores the area and keeps the region
    inside the source. Without it the draws and corners are exactly the standard generator's.
    """
    height, width = source_shape[:2]
    if area_fraction is None:
        region_w, region_h = _scaled_region_size((width, height), out_size, params, rng)
    else:
        region_w, region_h = partial_region_size((width, height), out_size, area_fraction)
    # Centre such that the region mostly overlaps the photo (a zoomed-out view is centred).
    centre_x = width / 2 + rng.uniform(-1, 1) * max(0.0, (width - region_w) / 2)
    centre_y = height / 2 + rng.uniform(-1, 1) * max(0.0, (height - region_h) / 2)
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * [region_w / 2, region_h / 2]
    angle = math.radians(rng.uniform(-params.max_rotation, params.max_rotation))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = half @ rotation.T + [centre_x, centre_y]
    tilt = rng.uniform(-params.max_tilt, params.max_tilt, size=(4, 2)) * [region_w, region_h]
    if area_fraction is None:
        return corners + tilt
    return fit_partial_quad(corners + tilt, (width, height), area_fraction)


def polygon_area(points: np.ndarray) -> float:
    """Shoelace area of polygon ``points`` ``[N, 2]``, square pixels."""
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def fit_partial_quad(corners: np.ndarray, source_size: tuple[int, int],
                     area_fraction: float) -> np.ndarray:
    """A partial view's tilted region ``corners`` ``[4, 2]`` scaled about its centre to exactly
    ``area_fraction`` of the source's (width, height) area (tilt can grow or shrink a quad),
    then shifted as far as needed to lie inside the source (where it fits), so the view shows
    at most, and mostly exactly, that share of the source."""
    width, height = source_size
    centre = corners.mean(axis=0)
    area = polygon_area(corners)
    if area > 0:
        corners = centre + (corners - centre) * math.sqrt(area_fraction * width * height / area)
    low, high = corners.min(axis=0), corners.max(axis=0)
    shift = np.zeros(2)
    for axis, size in ((0, width), (1, height)):
        if high[axis] - low[axis] <= size:
            shift[axis] = max(0.0, -low[axis]) - max(0.0, high[axis] - size)
    return corners + shift


def _clip_polygon(points: np.ndarray, axis: int, limit: float, keep_below: bool) -> np.ndarray:
    """Sutherland-Hodgman: the part of polygon ``points`` ``[N, 2]`` on one side of the line
    ``coordinate[axis] = limit``."""
    if len(points) == 0:
        return points
    inside = points[:, axis] <= limit if keep_below else points[:, axis] >= limit
    clipped = []
    for i in range(len(points)):
        current, following = points[i], points[(i + 1) % len(points)]
        if inside[i]:
            clipped.append(current)
        if inside[i] != inside[(i + 1) % len(points)]:
            t = (limit - current[axis]) / (following[axis] - current[axis])
            clipped.append(current + t * (following - current))
    return np.asarray(clipped, np.float64).reshape(-1, 2)


def visible_source_fraction(corners: np.ndarray, source_shape: Sequence[int]) -> float:
    """Share of the source's area that a view with region ``corners`` ``[4, 2]`` (x, y, as from
    :func:`view_corners`) shows: area of the region clipped to the source over the source's
    area, in [0, 1]. (A zoomed-out view shows all of it: 1.)"""
    height, width = source_shape[:2]
    polygon = np.asarray(corners, np.float64)
    for axis, limit, keep_below in ((0, 0.0, False), (0, float(width), True),
                                    (1, 0.0, False), (1, float(height), True)):
        polygon = _clip_polygon(polygon, axis, limit, keep_below)
    if len(polygon) < 3:
        return 0.0
    return min(1.0, polygon_area(polygon) / (width * height))
