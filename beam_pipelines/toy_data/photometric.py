"""What light, lens and sensor do to a view after the geometry: exposure and colour, blur,
noise. Each step draws from the view's ``rng`` in a fixed order (that order is part of the
same-seed-same-bytes promise)."""

from __future__ import annotations

import cv2
import numpy as np
from PIL import Image, ImageEnhance


def _light_tables(rng: np.random.Generator) -> list[int]:
    """Pillow ``Image.point`` table (3 x 256 entries, R then G then B): per-channel gain in
    [0.85, 1.15], then a shared gamma in [0.7, 1.4], contrast about mid-grey and brightness in
    [0.7, 1.3]: one lookup per channel applies all four to uint8 pixels at once."""
    levels = np.arange(256, dtype=np.float32) / 255.0
    gamma = rng.uniform(0.7, 1.4)
    brightness = rng.uniform(0.7, 1.3)
    contrast = rng.uniform(0.7, 1.3)
    tables = []
    for gain in rng.uniform(0.85, 1.15, size=3):
        curve = np.clip(levels * gain, 0, 1) ** gamma
        curve = (curve - 0.5) * contrast + 0.5
        tables.append(np.clip(curve * brightness * 255.0, 0, 255).round().astype(np.uint8))
    return np.concatenate(tables).tolist()


def _maybe_blur(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Half the time, a Gaussian blur of sigma 0.3-1.6 pixels per 800 pixels of long side
    (defocus or shake looks the same at every output size)."""
    if rng.random() < 0.5:
        sigma = rng.uniform(0.3, 1.6) * max(image.size) / 800.0
        image = Image.fromarray(cv2.GaussianBlur(np.asarray(image), (0, 0), sigma))
    return image


def _maybe_add_noise(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Half the time, Gaussian sensor noise of sigma 1-6 grey levels per pixel and channel."""
    if rng.random() < 0.5:
        sigma = rng.uniform(1.0, 6.0)
        pixels = np.asarray(image, np.float32)
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * sigma
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def develop(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """``image`` (RGB) as a camera records it: light (:func:`_light_tables`), saturation
    (0.6-1.4, or grayscale 8 % of the time), then maybe blur and maybe noise. Same size."""
    image = image.point(_light_tables(rng))
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4) if rng.random() > 0.08 else 0.0)
    image = _maybe_blur(image, rng)
    return _maybe_add_noise(image, rng)
