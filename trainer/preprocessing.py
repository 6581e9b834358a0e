"""The resize/scale contract shared by training and inference.

One frozen object, :class:`ImageContract`, says how a decoded RGB image becomes the model's
input: resize to ``image_size x image_size`` (bilinear, antialiased, aspect ratio not kept, as
the recipe's ``resize to 299x299``) and scale pixels from [0, 255] to [-1, 1] the way Xception
was trained (``x / 127.5 - 1``). The training pipeline (:mod:`trainer.data`), its
augmentation (:mod:`trainer.augment`) and the predict job (crop views from
``rescoring.crops``, then :meth:`ImageContract.scale`) all call this one object, so the two
sides cannot drift apart; ``tests/test_preprocessing.py`` holds the parity test.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

_INVERSE_HALF_RANGE = np.float32(1.0 / 127.5)

MIN_IMAGE_SIZE = 32
"""Smallest accepted side; Xception itself needs >= 71, smaller sizes only serve tests."""


@dataclasses.dataclass(frozen=True)
class ImageContract:
    """How pixels become model inputs, for training and for inference alike.

    Attributes:
      image_size: side S of the square model input, in pixels (the recipe: 299).
    """

    image_size: int = 299

    def __post_init__(self):
        if not isinstance(self.image_size, int) or isinstance(self.image_size, bool):
            raise ValueError(f"image_size must be an int, got {self.image_size!r}")
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"image_size must be >= {MIN_IMAGE_SIZE}, got {self.image_size}")

    def scale(self, images):
        """Maps RGB pixels in [0, 255] to float32 in [-1, 1]: ``x / 127.5 - 1``.

        Args:
          images: uint8 or float array/tensor of any shape (``[H, W, 3]``, ``[B, H, W, 3]``),
            values in [0, 255].

        Returns:
          float32 of the same shape and the same kind as the input (numpy in, numpy out;
          tensor in, tensor out). Both paths compute in float32, so they agree bit for bit.
        """
        # A multiply by the float32 reciprocal, not a divide: TF's graph optimiser rewrites
        # divisions by constants into this anyway, and then eager, graph and numpy agree.
        if tf.is_tensor(images):
            return tf.cast(images, tf.float32) * _INVERSE_HALF_RANGE - np.float32(1.0)
        return np.asarray(images, dtype=np.float32) * _INVERSE_HALF_RANGE - np.float32(1.0)

    def resize(self, image, size=None):
        """Resizes to a square (or ``(height, width)``), bilinear with antialiasing.

        Args:
          image: ``[H, W, C]`` or ``[B, H, W, C]`` uint8/float array or tensor, pixels in [0, 255].
          size: int side, ``(height, width)``, or None for ``image_size``. A size above the
            input's side upsamples (the crop branch resizes to ``(1 + c) * S``).

        Returns:
          float32 pixels in [0, 255] (bilinear with a triangle kernel never overshoots), numpy
          if the input was numpy, else a tensor.
        """
        if size is None:
            size = self.image_size
        if isinstance(size, (int, np.integer)):
            size = (int(size), int(size))
        was_numpy = not tf.is_tensor(image)
        resized = tf.image.resize(
            tf.cast(image, tf.float32), size, method=tf.image.ResizeMethod.BILINEAR, antialias=True
        )
        return resized.numpy() if was_numpy else resized
