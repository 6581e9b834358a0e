"""The recipe's on-the-fly augmentation, in-graph, one image at a time.

Per image (RECIPE.md, "Augmentation"), with probability ``crop_probability`` (0.5) the **crop
branch**: resize to ``(1 + c) * S`` with ``c = 0.5 * U(0, 1) + 0.01``, take a random ``S x S``
window, then light changes; otherwise the **whole-image branch**: resize the whole image to
``S x S``, then stronger changes. The numbers are fields of :class:`AugmentParams`.

How the recipe's numbers are read (Keras ``ImageDataGenerator`` as of the competition, early
2018: Keras 2.1.3 - 2.1.6):

- ``rotation_range`` 4: angle ``U(-4, 4)`` degrees.
- ``shear_range`` 0.2: shear angle ``U(-0.2, 0.2)`` in **degrees** (Keras changed it from radians
  to degrees in Dec 2017, PR keras-team/keras#8868, released in 2.1.3). So 0.2 is a very light
  shear, which is what the original code did; set ``shear_degrees=11.46`` for the older
  radians reading. Keras' shear matrix is ``[[1, -sin(s), 0], [0, cos(s), 0]]``.
- ``zoom_range`` z: zoom factors ``zx, zy ~ U(1 - z, 1 + z)`` drawn *independently* per axis
  (Keras does so); a factor > 1 samples a larger input area, i.e. zooms out.
- ``width_shift_range``/``height_shift_range`` 0.2: shifts ``U(-0.2, 0.2)`` x width/height pixels.
- ``channel_shift_range`` r: each channel gets its own offset ``U(-r, r)`` in pixel units of
  [0, 255], and the result is clipped to the image's own [min, max] (Keras 2.1's
  ``random_channel_shift``; from Keras 2.2 one offset is shared by the three channels).
- ``horizontal_flip``: mirror with probability 0.5.
- ``fill_mode``: ``nearest`` for both branches (Keras' default; the recipe names it for the
  whole-image branch, and the crop branch's generator did not override it).

Keras composes ``rotation @ shift @ shear @ zoom`` about the image centre and maps output
pixels to input pixels; so does :func:`transform_matrix`, with the flip folded in, so each image
gets ONE projective transform applied by ``ImageProjectiveTransformV3`` in float32 (bilinear by
default; Keras 2.1 sampled nearest-neighbour, ``AugmentParams.interpolation="nearest"``). Keras
works in (row, col) coordinates, we in (x, y); every range is symmetric, so the distributions
agree. By default the image is first resized with the contract's antialiased resize; with
``AugmentParams.antialias=False`` the resize is folded into that one transform too (faster).

Throughput (``bench/bench_input_pipeline.py``, one core, 512 px records -> 299 px): the
warp (~6 ms per image at 299 px on these CPUs) costs more than decoding (~2 ms) and the
antialiased resize (~3 ms); the recipe runs at ~90 images/s per core (~115 folded), far from
the ~535 of decode-and-crop + flip alone. At scale, run the warp on the accelerator.

Randomness is stateless: every draw derives from a per-image seed ``[2] int64`` that
:mod:`trainer.data` attaches, so a seeded pipeline is reproducible.

Crop branch speed: resizing the whole image to ``(1 + c) * S`` and cutting an ``S x S`` window is
the same, up to edge effects of the antialiasing kernel, as cutting the matching window
(``H / (1 + c)`` x ``W / (1 + c)``, same relative offset) from the stored image and resizing it
to ``S x S`` (tested). The latter lets ``tf.image.decode_and_crop_jpeg`` skip decoding the rest
(PITFALLS: ~775 vs ~658 img/s per core) and resizes fewer pixels. The light changes then act on
the ``S x S`` crop with nearest fill at its edges, as Keras did on its cropped array.
"""

from __future__ import annotations

import dataclasses
import math

import tensorflow as tf

from trainer.preprocessing import ImageContract

FILL_MODES = ("nearest", "constant", "reflect", "wrap")


@dataclasses.dataclass(frozen=True)
class BranchParams:
    """Random changes of one branch (ranges in Keras ``ImageDataGenerator`` units, see module doc).

    Attributes:
      rotation_degrees: rotation angle ~ U(-r, r), degrees.
      shear_degrees: shear angle ~ U(-s, s), degrees.
      zoom_range: zoom factors per axis ~ U(1 - z, 1 + z); must be in [0, 1).
      width_shift: horizontal shift ~ U(-w, w) x image width.
      height_shift: vertical shift ~ U(-h, h) x image height.
      channel_shift: per-channel offset ~ U(-c, c), pixel units of [0, 255].
      horizontal_flip: mirror left-right with probability 0.5.
      fill_mode: how pixels from outside the input are filled: one of :data:`FILL_MODES`.
    """

    rotation_degrees: float = 0.0
    shear_degrees: float = 0.0
    zoom_range: float = 0.0
    width_shift: float = 0.0
    height_shift: float = 0.0
    channel_shift: float = 0.0
    horizontal_flip: bool = False
    fill_mode: str = "nearest"

    def __post_init__(self):
        for name in ("rotation_degrees", "shear_degrees", "width_shift", "height_shift",
                     "channel_shift"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.zoom_range < 1:
            raise ValueError(f"zoom_range must be in [0, 1), got {self.zoom_range}")
        if self.fill_mode not in FILL_MODES:
            raise ValueError(f"fill_mode must be one of {FILL_MODES}, got {self.fill_mode!r}")


def _recipe_crop_branch() -> BranchParams:
    return BranchParams(rotation_degrees=4.0, shear_degrees=0.2, zoom_range=0.1,
                        channel_shift=20.0, horizontal_flip=True, fill_mode="nearest")


def _recipe_whole_branch() -> BranchParams:
    return BranchParams(rotation_degrees=4.0, shear_degrees=0.2, zoom_range=0.5, width_shift=0.2,
                        height_shift=0.2, channel_shift=25.0, horizontal_flip=True,
                        fill_mode="nearest")


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """The recipe's augmentation (defaults = RECIPE.md).

    Attributes:
      crop_probability: probability of the crop branch per image (0.5).
      crop_extra_offset, crop_extra_span: ``c = crop_extra_span * U(0, 1) + crop_extra_offset``;
        the crop branch resizes to ``(1 + c) * S`` and keeps an ``S x S`` window (0.01, 0.5).
      crop_branch: light changes after the crop.
      whole_branch: stronger changes of the whole image resized to ``S x S``.
      antialias: True: resize with the contract's antialiased resize, then transform. False:
        fold the resize into the one transform (faster, see ``bench/bench_input_pipeline.py``).
      interpolation: ``"bilinear"`` or ``"nearest"`` (Keras 2.1's order-0 sampling; faster).
    """

    crop_probability: float = 0.5
    crop_extra_offset: float = 0.01
    crop_extra_span: float = 0.5
    crop_branch: BranchParams = dataclasses.field(default_factory=_recipe_crop_branch)
    whole_branch: BranchParams = dataclasses.field(default_factory=_recipe_whole_branch)
    antialias: bool = True
    interpolation: str = "bilinear"

    def __post_init__(self):
        if not 0 <= self.crop_probability <= 1:
            raise ValueError(f"crop_probability must be in [0, 1], got {self.crop_probability}")
        if self.crop_extra_offset < 0 or self.crop_extra_span < 0:
            raise ValueError("crop_extra_offset and crop_extra_span must be >= 0")
        if self.interpolation not in ("bilinear", "nearest"):
            raise ValueError(f"interpolation must be bilinear or nearest, got {self.interpolation!r}")
        for name in ("crop_branch", "whole_branch"):
            if not isinstance(getattr(self, name), BranchParams):
                raise ValueError(f"{name} must be a BranchParams")


# ---------------------------------------------------------------------------------------------
# Geometry: one 3x3 matrix per image, output pixel (x, y, 1) -> input pixel.


def transform_matrix(*, height, width, rotation=0.0, shear=0.0, zoom_x=1.0, zoom_y=1.0,
                     shift_x=0.0, shift_y=0.0, flip=False) -> tf.Tensor:
    """Keras' composed transform, as a float32 ``[3, 3]`` mapping output (x, y, 1) to input.

    ``M = C @ rotation @ shift @ shear @ zoom @ C^-1 @ F`` where ``C`` moves the origin to the
    image centre ``((W - 1) / 2, (H - 1) / 2)`` and ``F`` mirrors x (``x -> W - 1 - x``) when
    ``flip``. Angles in radians, shifts in pixels, zooms as factors (> 1 zooms out).
    """
    f32 = lambda value: tf.cast(value, tf.float32)  # noqa: E731  (scalars or tensors)
    rotation, shear = f32(rotation), f32(shear)
    zero, one = tf.constant(0.0), tf.constant(1.0)

    def matrix(rows):
        return tf.stack([tf.stack([f32(v) for v in row]) for row in rows])

    centre_x, centre_y = (f32(width) - 1.0) / 2.0, (f32(height) - 1.0) / 2.0
    cos, sin = tf.cos(rotation), tf.sin(rotation)
    rotate = matrix([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])
    shift = matrix([[one, zero, shift_x], [zero, one, shift_y], [zero, zero, one]])
    shear_m = matrix([[one, -tf.sin(shear), zero], [zero, tf.cos(shear), zero], [zero, zero, one]])
    zoom = matrix([[zoom_x, zero, zero], [zero, zoom_y, zero], [zero, zero, one]])
    to_centre = matrix([[one, zero, centre_x], [zero, one, centre_y], [zero, zero, one]])
    from_centre = matrix([[one, zero, -centre_x], [zero, one, -centre_y], [zero, zero, one]])
    flip = tf.cast(flip, tf.bool)
    mirror = tf.where(
        flip,
        matrix([[-one, zero, f32(width) - 1.0], [zero, one, zero], [zero, zero, one]]),
        tf.eye(3),
    )
    return to_centre @ rotate @ shift @ shear_m @ zoom @ from_centre @ mirror


def apply_transform(image: tf.Tensor, matrix: tf.Tensor, fill_mode: str = "nearest",
                    output_size=None, interpolation: str = "bilinear") -> tf.Tensor:
    """Samples ``image`` ``[H, W, C]`` at ``matrix @ (x, y, 1)`` for each output pixel (x, y).

    One ``ImageProjectiveTransformV3`` call in float32. ``output_size``: ``(height, width)``
    of the output, default the input's. Returns float32 ``[out_h, out_w, C]``.
    """
    matrix = matrix / matrix[2, 2]
    flat = tf.reshape(matrix, [9])[:8]
    shape = tf.shape(image)[:2] if output_size is None else tf.constant(output_size, tf.int32)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[tf.newaxis],
        transforms=flat[tf.newaxis],
        output_shape=shape,
        fill_value=tf.constant(0.0),
        interpolation=interpolation.upper(),
        fill_mode=fill_mode.upper(),
    )
    return out[0]


def resize_matrix(height, width, size) -> tf.Tensor:
    """``[3, 3]`` mapping pixels of a ``size x size`` resize to pixels of the ``height x width``
    image, with ``tf.image.resize``'s half-pixel centres: ``x_in = (x + 0.5) * W / S - 0.5``."""
    scale_x = tf.cast(width, tf.float32) / float(size)
    scale_y = tf.cast(height, tf.float32) / float(size)
    zero, one = tf.constant(0.0), tf.constant(1.0)
    return tf.stack([
        tf.stack([scale_x, zero, 0.5 * scale_x - 0.5]),
        tf.stack([zero, scale_y, 0.5 * scale_y - 0.5]),
        tf.stack([zero, zero, one]),
    ])


def _uniform(seed, low, high, shape=()):
    return tf.random.stateless_uniform(shape, seed=seed, minval=low, maxval=high, dtype=tf.float32)


def random_matrix(seed, branch: BranchParams, height, width) -> tf.Tensor:
    """Draws one composed ``[3, 3]`` transform for an image of ``height x width`` from ``branch``."""
    seeds = tf.random.experimental.stateless_split(seed, num=7)
    degrees = math.pi / 180.0
    zoom_low, zoom_high = 1.0 - branch.zoom_range, 1.0 + branch.zoom_range
    return transform_matrix(
        height=height,
        width=width,
        rotation=_uniform(seeds[0], -branch.rotation_degrees, branch.rotation_degrees) * degrees,
        shear=_uniform(seeds[1], -branch.shear_degrees, branch.shear_degrees) * degrees,
        zoom_x=_uniform(seeds[2], zoom_low, zoom_high),
        zoom_y=_uniform(seeds[3], zoom_low, zoom_high),
        shift_x=_uniform(seeds[4], -branch.width_shift, branch.width_shift) * tf.cast(width, tf.float32),
        shift_y=_uniform(seeds[5], -branch.height_shift, branch.height_shift) * tf.cast(height, tf.float32),
        flip=tf.logical_and(branch.horizontal_flip, _uniform(seeds[6], 0.0, 1.0) < 0.5),
    )


def channel_shift(image: tf.Tensor, seed, intensity: float) -> tf.Tensor:
    """Adds ``U(-intensity, intensity)`` per channel, clipped to the image's own [min, max]."""
    if intensity <= 0:
        return image
    offsets = _uniform(seed, -intensity, intensity, shape=[3])
    low, high = tf.reduce_min(image), tf.reduce_max(image)
    return tf.clip_by_value(image + offsets, low, high)


def _moves_pixels(branch: BranchParams) -> bool:
    return any((branch.rotation_degrees, branch.shear_degrees, branch.zoom_range,
                branch.width_shift, branch.height_shift))


def apply_branch(image: tf.Tensor, seed, branch: BranchParams, *, size: int,
                 contract: ImageContract, antialias: bool = True,
                 interpolation: str = "bilinear") -> tf.Tensor:
    """Resize to ``size x size``, geometric changes (one transform), then channel shift.

    Args:
      image: decoded ``[H, W, 3]`` (uint8 or float, [0, 255]).
      antialias: True: ``contract.resize`` first, then the transform on the ``S x S`` image
        (the contract's exact resize). False: the resize is folded into the same transform,
        which then samples the decoded image directly (one pass, no antialiasing: faster,
        slightly aliased when shrinking; the original Keras code resized with nearest).

    Returns float32 ``[size, size, 3]`` in [0, 255].
    """
    geometry_seed, colour_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if not _moves_pixels(branch):
        # Flips at most: no resampling needed beyond the resize (same flip draw as random_matrix).
        image = (contract.resize(image, size) if antialias
                 else tf.image.resize(tf.cast(image, tf.float32), (size, size)))
        flip_seed = tf.random.experimental.stateless_split(geometry_seed, num=7)[6]
        flip = tf.logical_and(branch.horizontal_flip, _uniform(flip_seed, 0.0, 1.0) < 0.5)
        image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
        return channel_shift(image, colour_seed, branch.channel_shift)
    matrix = random_matrix(geometry_seed, branch, size, size)
    if antialias:
        image = contract.resize(image, size)
    else:
        shape = tf.shape(image)
        matrix = resize_matrix(shape[0], shape[1], size) @ matrix
    image = apply_transform(image, matrix, branch.fill_mode, output_size=(size, size),
                            interpolation=interpolation)
    return channel_shift(image, colour_seed, branch.channel_shift)


def takes_crop_branch(seed, params: AugmentParams) -> tf.Tensor:
    """Boolean scalar: does the image with this seed go through the crop branch?"""
    return _uniform(seed, 0.0, 1.0) < params.crop_probability


def crop_window(seed, height, width, params: AugmentParams) -> tf.Tensor:
    """The crop branch's window in stored-image pixels: int32 ``[y, x, h, w]``.

    Resizing ``H x W`` to ``(1 + c) S`` squared and cutting an ``S x S`` window at a uniform
    offset equals cutting ``H / (1 + c) x W / (1 + c)`` at the same relative offset.
    """
    extra_seed, y_seed, x_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
    c = params.crop_extra_span * _uniform(extra_seed, 0.0, 1.0) + params.crop_extra_offset
    height_f, width_f = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    crop_h = tf.clip_by_value(tf.cast(tf.round(height_f / (1.0 + c)), tf.int32), 1, height)
    crop_w = tf.clip_by_value(tf.cast(tf.round(width_f / (1.0 + c)), tf.int32), 1, width)
    # Uniform offsets over [0, H - h] inclusive (stateless_uniform's maxval is exclusive).
    y = tf.random.stateless_uniform([], y_seed, minval=0, maxval=height - crop_h + 1, dtype=tf.int32)
    x = tf.random.stateless_uniform([], x_seed, minval=0, maxval=width - crop_w + 1, dtype=tf.int32)
    return tf.stack([y, x, crop_h, crop_w])


def augment_jpeg(jpeg_bytes: tf.Tensor, seed, params: AugmentParams,
                 contract: ImageContract) -> tf.Tensor:
    """Decodes and augments one stored JPEG: float32 ``[S, S, 3]`` pixels in [0, 255].

    Not yet scaled to [-1, 1]: :mod:`trainer.data` applies ``contract.scale`` after this.

    Args:
      jpeg_bytes: scalar string tensor, the record's ``image/encoded``.
      seed: int32/int64 ``[2]``, this image's stateless seed.
    """
    branch_seed, crop_seed, change_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=3))
    size = contract.image_size
    common = dict(size=size, contract=contract, antialias=params.antialias,
                  interpolation=params.interpolation)

    def crop_branch():
        shape = tf.io.extract_jpeg_shape(jpeg_bytes)
        window = crop_window(crop_seed, shape[0], shape[1], params)
        image = tf.io.decode_and_crop_jpeg(jpeg_bytes, window, channels=3)
        return apply_branch(image, change_seed, params.crop_branch, **common)

    def whole_branch():
        image = tf.io.decode_jpeg(jpeg_bytes, channels=3)
        return apply_branch(image, change_seed, params.whole_branch, **common)

    image = tf.cond(takes_crop_branch(branch_seed, params), crop_branch, whole_branch)
    return tf.ensure_shape(image, [size, size, 3])
