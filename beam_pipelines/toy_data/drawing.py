"""Pictures drawn from a random stream: noise, gradients, shapes, gratings, photo crops.

The raw material of backgrounds (what surrounds a zoomed-out scene), distractors and occluder
patches. Every function returns RGB uint8 ``[H, W, 3]`` (sizes in pixels) and draws only from
the ``rng`` it is given, in a fixed order, so a seed always gives the same picture.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter


def value_noise(rng: np.random.Generator, height: int, width: int, octaves: int = 5) -> np.ndarray:
    """Smooth fractal noise in [0, 1], ``[height, width]`` float32 (sum of upsampled grids)."""
    total = np.zeros((height, width), np.float32)
    weight_sum = 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 2)
        grid = rng.random((cells, cells), dtype=np.float32)
        layer = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC))
        weight = 0.55 ** octave
        total += weight * layer
        weight_sum += weight
    total /= weight_sum
    low, high = float(total.min()), float(total.max())
    return (total - low) / max(high - low, 1e-6)


def palette_map(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Maps ``[H, W]`` values in [0, 1] through a random 3-colour gradient to RGB uint8."""
    colours = rng.integers(0, 256, size=(3, 3)).astype(np.float32)
    stops = np.array([0.0, rng.uniform(0.3, 0.7), 1.0], np.float32)
    channels = [np.interp(values, stops, colours[:, c]) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear two-colour gradient in a random direction, RGB uint8 ``[H, W, 3]``."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs / width * math.cos(angle) + ys / height * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    first, second = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    return (first + ramp[..., None] * (second - first)).astype(np.uint8)


def background_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """What surrounds a photographed scene in a zoomed-out view: a gradient with soft noise."""
    base = gradient(rng, height, width).astype(np.float32)
    base = 0.4 * base + 0.6 * base.mean(axis=-1, keepdims=True)  # muted, like walls or sky
    noise = value_noise(rng, height, width, octaves=4)[..., None]
    return np.clip(base * (0.75 + 0.5 * noise), 0, 255).astype(np.uint8)


def _random_canvas_size(rng: np.random.Generator) -> tuple[int, int]:
    """(height, width) of a drawn distractor: 320-519 by 320-619 pixels."""
    return int(rng.integers(320, 520)), int(rng.integers(320, 620))


def clouds(rng: np.random.Generator) -> np.ndarray:
    """Fractal noise through a random palette, RGB uint8 ``[H, W, 3]``."""
    height, width = _random_canvas_size(rng)
    return palette_map(value_noise(rng, height, width), rng)


def _draw_random_shape(draw: ImageDraw.ImageDraw, rng: np.random.Generator, height: int,
                       width: int) -> None:
    """One ellipse, rectangle, triangle or thick line in a random colour, reaching up to a
    quarter of the canvas beyond its edges."""
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, size=2).tolist())
    y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, size=2).tolist())
    kind = int(rng.integers(0, 4))
    if kind == 0:
        draw.ellipse([x0, y0, x1 + 1, y1 + 1], fill=colour)
    elif kind == 1:
        draw.rectangle([x0, y0, x1 + 1, y1 + 1], fill=colour)
    elif kind == 2:
        points = [tuple(p) for p in rng.integers(0, max(width, height), size=(3, 2)).tolist()]
        draw.polygon(points, fill=colour)
    else:
        draw.line([x0, y0, x1, y1], fill=colour, width=int(rng.integers(2, 12)))


def shapes(rng: np.random.Generator) -> np.ndarray:
    """8-39 random shapes over a gradient, slightly blurred, RGB uint8 ``[H, W, 3]``."""
    height, width = _random_canvas_size(rng)
    image = Image.fromarray(gradient(rng, height, width))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 40))):
        _draw_random_shape(draw, rng, height, width)
    return np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.5))))


def grating(rng: np.random.Generator) -> np.ndarray:
    """1-3 overlaid sine gratings (periods 6-60 pixels) plus noise through a random palette,
    RGB uint8 ``[H, W, 3]``."""
    height, width = _random_canvas_size(rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    values = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 60)
        phase = rng.uniform(0, 2 * math.pi)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        values += np.sin(along * 2 * math.pi / period + phase)
    values = (values - values.min()) / max(float(np.ptp(values)), 1e-6)
    values = 0.7 * values + 0.3 * value_noise(rng, height, width, octaves=3)
    return palette_map(values, rng)


def photo_crop(rng: np.random.Generator, photos: Sequence[np.ndarray]) -> np.ndarray:
    """A crop of 45-95 % of each side of one of ``photos`` (RGB uint8 ``[H, W, 3]``); a
    grayscale crop is tinted through a random palette 70 % of the time."""
    photo = photos[int(rng.integers(0, len(photos)))]
    height, width = photo.shape[:2]
    crop_h = int(height * rng.uniform(0.45, 0.95))
    crop_w = int(width * rng.uniform(0.45, 0.95))
    top = int(rng.integers(0, height - crop_h + 1))
    left = int(rng.integers(0, width - crop_w + 1))
    crop = photo[top:top + crop_h, left:left + crop_w]
    is_gray = bool(np.all(crop[..., 0] == crop[..., 1]) and np.all(crop[..., 1] == crop[..., 2]))
    if is_gray and rng.random() < 0.7:
        # Tint grayscale content, so that "grayscale" is no shortcut for "distractor".
        crop = palette_map(crop[..., 0].astype(np.float32) / 255.0, rng)
    return crop
