"""A small SavedModel with DELF's TF-Hub signature, built by the tests (no download).

The real ``google/delf/1`` module exposes ``signatures["default"]`` with inputs ``image``
(float32 ``[H, W, 3]`` in [0, 1]), ``score_threshold`` (float32 scalar), ``image_scales``
(float32 ``[S]``) and ``max_feature_num`` (int32 scalar), and outputs ``locations``
(``[N, 2]``, (y, x) in the input's pixels), ``descriptors`` (``[N, 40]``), ``scales`` and
``attention``. The stand-in has that signature and computes, deterministically from the image:

* ``locations``: the centres of a ``grid x grid`` lattice of cells over the input image,
  row-major, ``((i + 0.5) * H / grid, (j + 0.5) * W / grid)``;
* ``descriptors``: each cell's pixels (average-pooled to 4 x 4 x 3 = 48 values, centred on the
  image mean) times a fixed random ``[48, dim]`` matrix, L2-normalised; so equal cells give
  equal descriptors and different content gives different ones;
* ``attention``: each cell's mean intensity times ``score_threshold`` / 100 (the real module's
  inputs leave a trace in an output, for tests that want to see them);
* ``scales``: ``image_scales[0]`` for every feature.

The first ``min(grid * grid, max_feature_num)`` features are returned.

Failure option (for the tests of failing extractors): with ``fail_when_blue_below=t`` the call
raises ``InvalidArgumentError`` ("delf stand-in failure: ...", a ``tf.debugging`` assertion
inside the SavedModel) whenever the mean of the image's blue channel (in [0, 1]) is below ``t``:
deterministic per image, whatever process calls it. scikit-image's photographs: coffee ~0.20,
chelsea ~0.34, astronaut ~0.38, so ``t = 0.28`` fails on coffee only; ``t = 2`` fails always.
:func:`save_delf_standin` writes it with ``tf.saved_model.save(..., signatures=...)``, so
``tensorflow_hub.load(folder)`` exercises the same loading path as the real module.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

POOLED_CELL = 4  # each cell average-pooled to 4 x 4 pixels: 48 values per descriptor input


class DelfStandin(tf.Module):
    """``tf.Module`` with DELF's ``default`` signature; see the module docstring."""

    def __init__(self, grid: int = 8, dim: int = 40, seed: int = 0,
                 fail_when_blue_below: float | None = None):
        super().__init__()
        self.grid = grid
        self.fail_when_blue_below = fail_when_blue_below
        rng = np.random.default_rng(seed)
        inputs = POOLED_CELL * POOLED_CELL * 3
        self.projection = tf.Variable(
            rng.normal(size=(inputs, dim)).astype(np.float32), trainable=False, name="projection"
        )

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, 3], tf.float32, name="image"),
            tf.TensorSpec([], tf.float32, name="score_threshold"),
            tf.TensorSpec([None], tf.float32, name="image_scales"),
            tf.TensorSpec([], tf.int32, name="max_feature_num"),
        ]
    )
    def default(self, image, score_threshold, image_scales, max_feature_num):
        grid = self.grid
        if self.fail_when_blue_below is not None:  # decided when traced: no op otherwise
            check = tf.debugging.assert_greater_equal(
                tf.reduce_mean(image[..., 2]), tf.constant(self.fail_when_blue_below, tf.float32),
                message="delf stand-in failure: blue mean below the threshold",
            )
            with tf.control_dependencies([check]):
                image = tf.identity(image)
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        side = grid * POOLED_CELL
        pooled = tf.image.resize(image[None], [side, side], antialias=True)[0]  # [g*4, g*4, 3]
        pooled -= tf.reduce_mean(pooled)
        cells = tf.reshape(pooled, [grid, POOLED_CELL, grid, POOLED_CELL, 3])
        cells = tf.transpose(cells, [0, 2, 1, 3, 4])  # [g, g, 4, 4, 3]: cell (i, j) row-major
        cells = tf.reshape(cells, [grid * grid, POOLED_CELL * POOLED_CELL * 3])
        descriptors = tf.math.l2_normalize(cells @ self.projection, axis=1)
        centres = (tf.range(grid, dtype=tf.float32) + 0.5) / grid
        ys, xs = tf.meshgrid(centres * shape[0], centres * shape[1], indexing="ij")
        locations = tf.stack([tf.reshape(ys, [-1]), tf.reshape(xs, [-1])], axis=1)
        cell_means = tf.reshape(
            tf.image.resize(image[None], [grid, grid], antialias=True)[0], [grid * grid, 3]
        )
        attention = tf.reduce_mean(cell_means, axis=1) * score_threshold / 100.0
        count = tf.minimum(grid * grid, max_feature_num)
        return {
            "locations": locations[:count],
            "descriptors": descriptors[:count],
            "attention": attention[:count],
            "scales": tf.fill([count], image_scales[0]),
        }


def save_delf_standin(folder, grid: int = 8, dim: int = 40, seed: int = 0,
                      fail_when_blue_below: float | None = None) -> str:
    """Writes the stand-in SavedModel to ``folder``; returns the folder as a string."""
    module = DelfStandin(grid=grid, dim=dim, seed=seed, fail_when_blue_below=fail_when_blue_below)
    tf.saved_model.save(module, str(folder), signatures={"default": module.default})
    return str(folder)
