"""The classes and distractor photos that ship offline: images of ``skimage.data``."""

from __future__ import annotations

import numpy as np

# Photos used as landmark classes, in order of preference: distinctive, textured, colour first.
CLASS_SOURCES = (
    "astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera",
    "immunohistochemistry", "coins", "clock", "hubble_deep_field", "retina", "moon",
)
# Every other offline photo/texture of skimage.data; those not used as classes feed distractors.
OTHER_SOURCES = ("brick", "gravel", "grass", "page", "text", "cell", "colorwheel", "logo")


def load_source(name: str) -> np.ndarray:
    """One ``skimage.data`` image as RGB uint8 ``[H, W, 3]`` (all of these ship offline)."""
    import skimage.data  # Imported here: only this generator needs it.

    if name == "motorcycle":
        image = skimage.data.stereo_motorcycle()[0]
    else:
        image = getattr(skimage.data, name)()
    image = np.asarray(image)
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)
