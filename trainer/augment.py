"""The recipe's on-the-fly augmentation, in-graph, one image at a time.

Per image (docs/METHOD.md, "Augmentation"; per image rather than per batch, see its
"Deviations"), with probability ``crop_probability`` (0.5) the **crop branch**: resize to
``(1 + c) * S`` with ``c = 0.5 * U(0, 1) + 0.01``, take a random ``S x S`` window, then light
changes; otherwise the **whole-image branch**: resize the whole image to ``S x S``, then
stronger changes. The numbers are fields of :class:`AugmentParams`.

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
the ~535 of decode-and-crop + flip alone. At scale, run the warp on the accelerator: split mode.

Randomness is stateless: every draw derives from a per-image seed ``[2] int64`` that
:mod:`trainer.data` attaches, so a seeded pipeline is reproducible. Each image's seed splits
into (branch, crop window, changes); the changes' seed draws ``NOISE_SIZE`` uniforms
(:func:`draw_noise`), which :func:`branch_parameters` maps to the branch's parameters
(``low + u * (high - low)`` per parameter). Both modes below use these same functions.

Split mode (``trainer.data.make_dataset(..., augment_on_device=True)``, the default)
----------------------------------------------------------------------------------------
The host does only what must happen per image before batching: decode (the crop branch's
window only, via ``decode_and_crop_jpeg``), resize to ``S x S``, scale to [-1, 1]
(:func:`prepare_jpeg_for_device`). The warp (rotation, shear, zoom, shifts, flip: all one
matrix) and the channel shift run on the accelerator, batched, as the first step of the
training computation: :class:`DeviceAugmentation`, one ``ImageProjectiveTransformV3`` call with
per-image transforms ``[B, 8]`` (:func:`augment_batch_from_noise`). The flip is folded into
that matrix (free there), so the host does not flip.

What crosses from host to device, and why (the dataset yields ``(inputs, labels)``)::

    inputs = {"resized_images": float32 [B, S, S, 3] in [-1, 1]   # IMAGES
              "crop_branch":    float32 [B], 1 = crop, 0 = whole   # CROP_BRANCH
              "augment_noise":  float32 [B, NOISE_SIZE] in [0, 1)} # NOISE

- The branch is chosen on the host, because the crop window is cut while decoding; the flag
  tells the device which branch's ranges to apply (crop: light changes; whole: strong).
- The randomness travels with each image (10 floats, drawn from the image's seed), so the
  device layer holds no random state: under ``MirroredStrategy`` (or TPU) each replica
  augments its own images with their own noise, nothing needs syncing or per-replica seeding,
  the result does not depend on the number of replicas, and a seeded run is reproducible.
  For the same seed and ``antialias=True``, split mode gives the same images as host mode
  (tested). :func:`augment_batch` draws the noise from one seed ``[2]`` instead, for custom
  training steps.
- A dict (not a packed tensor) keeps each field's meaning visible; the training model is the
  classifier behind :class:`DeviceAugmentation` (:func:`with_device_augmentation`); the
  exported ``model.keras`` is the classifier alone (images -> probabilities), unchanged.

Host resize in split mode: ``AugmentParams.antialias=True`` uses the contract's antialiased
resize (~3 ms per image, the host then reaches ~200 images/s per core); ``False`` uses plain
bilinear (~0.5-0.9 ms), ~475 images/s per core, which is decode-bound (decoding alone ~560/s:
half the images are whole 512 px records). Quality cost of ``False`` at 512 -> 299 px
(downscale 1.3-1.7x): mean |difference| ~1.1 of 255 against the antialiased resize, PSNR
~44 dB (``bench/bench_input_pipeline.py``). Recommended for split mode: ``antialias=False``.

Crop branch speed: resizing the whole image to ``(1 + c) * S`` and cutting an ``S x S`` window is
the same, up to edge effects of the antialiasing kernel, as cutting the matching window
(``H / (1 + c)`` x ``W / (1 + c)``, same relative offset) from the stored image and resizing it
to ``S x S`` (tested). The latter lets ``tf.image.decode_and_crop_jpeg`` skip decoding the rest
(measured from 384 px records: ~775 img/s per core, vs ~658 for decode-then-crop) and resizes
fewer pixels. The light changes then act on the ``S x S`` crop with nearest fill at its edges,
as Keras did on its cropped array.
"""

from __future__ import annotations

import dataclasses
import math

import keras
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
    """The recipe's augmentation (defaults = docs/METHOD.md, "Augmentation").

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


def _f32(value) -> tf.Tensor:
    return tf.cast(value, tf.float32)


def transform_matrix(*, height, width, rotation=0.0, shear=0.0, zoom_x=1.0, zoom_y=1.0,
                     shift_x=0.0, shift_y=0.0, flip=False) -> tf.Tensor:
    """Keras' composed transform, as float32 ``[..., 3, 3]`` mapping output (x, y, 1) to input.

    ``M = C @ rotation @ shift @ shear @ zoom @ C^-1 @ F`` where ``C`` moves the origin to the
    image centre ``((W - 1) / 2, (H - 1) / 2)`` and ``F`` mirrors x (``x -> W - 1 - x``) when
    ``flip``. Angles in radians, shifts in pixels, zooms as factors (> 1 zooms out).

    Parameters are scalars (one ``[3, 3]`` matrix) or tensors of one common shape ``[...]``,
    e.g. ``[B]`` for a batch (``[B, 3, 3]``); ``height``/``width`` are scalars.
    """
    rotation, shear, zoom_x, zoom_y, shift_x, shift_y = (
        _f32(v) for v in (rotation, shear, zoom_x, zoom_y, shift_x, shift_y))
    flip = tf.cast(flip, tf.bool)
    # Common leading shape of all parameters ([] for scalars, [B] for a batch).
    shape = tf.shape(rotation + shear + zoom_x + zoom_y + shift_x + shift_y
                     + tf.cast(flip, tf.float32))
    zero, one = tf.zeros(shape), tf.ones(shape)

    def matrix(rows):
        return tf.stack([tf.stack([v + zero for v in row], axis=-1) for row in rows], axis=-2)

    centre_x, centre_y = (_f32(width) - 1.0) / 2.0, (_f32(height) - 1.0) / 2.0
    cos, sin = tf.cos(rotation), tf.sin(rotation)
    rotate = matrix([[cos, -sin, zero], [sin, cos, zero], [zero, zero, one]])
    shift = matrix([[one, zero, shift_x], [zero, one, shift_y], [zero, zero, one]])
    shear_m = matrix([[one, -tf.sin(shear), zero], [zero, tf.cos(shear), zero], [zero, zero, one]])
    zoom = matrix([[zoom_x, zero, zero], [zero, zoom_y, zero], [zero, zero, one]])
    to_centre = matrix([[one, zero, centre_x], [zero, one, centre_y], [zero, zero, one]])
    from_centre = matrix([[one, zero, -centre_x], [zero, one, -centre_y], [zero, zero, one]])
    mirror = tf.where(
        (flip | tf.zeros(shape, tf.bool))[..., tf.newaxis, tf.newaxis],
        matrix([[-one, zero, _f32(width) - 1.0], [zero, one, zero], [zero, zero, one]]),
        matrix([[one, zero, zero], [zero, one, zero], [zero, zero, one]]),
    )
    return to_centre @ rotate @ shift @ shear_m @ zoom @ from_centre @ mirror


def apply_transforms(images: tf.Tensor, matrices: tf.Tensor, fill_mode: str = "nearest",
                     output_size=None, interpolation: str = "bilinear") -> tf.Tensor:
    """Samples each image ``[B, H, W, C]`` at its ``matrices[b] @ (x, y, 1)``: one op per batch.

    One ``ImageProjectiveTransformV3`` call in float32 with per-image transforms ``[B, 8]``.
    ``output_size``: ``(height, width)`` of the output, default the input's. Returns float32
    ``[B, out_h, out_w, C]``.
    """
    matrices = matrices / matrices[:, 2:3, 2:3]
    flat = tf.reshape(matrices, [-1, 9])[:, :8]
    shape = tf.shape(images)[1:3] if output_size is None else tf.constant(output_size, tf.int32)
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(images, tf.float32),
        transforms=flat,
        output_shape=shape,
        fill_value=tf.constant(0.0),
        interpolation=interpolation.upper(),
        fill_mode=fill_mode.upper(),
    )


def apply_transform(image: tf.Tensor, matrix: tf.Tensor, fill_mode: str = "nearest",
                    output_size=None, interpolation: str = "bilinear") -> tf.Tensor:
    """Samples ``image`` ``[H, W, C]`` at ``matrix @ (x, y, 1)`` for each output pixel (x, y).

    :func:`apply_transforms` on a batch of one. Returns float32 ``[out_h, out_w, C]``.
    """
    return apply_transforms(image[tf.newaxis], matrix[tf.newaxis], fill_mode, output_size,
                            interpolation)[0]


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


# ---------------------------------------------------------------------------------------------
# Random parameters: uniform noise in [0, 1) -> one branch's parameters. Host and device paths
# map the same noise with the same function, so they agree for the same noise.

NOISE_SIZE = 10
"""Uniforms per image: rotation, shear, zoom x, zoom y, shift x, shift y, flip, 3 channel shifts."""


def draw_noise(seed, batch_size=None) -> tf.Tensor:
    """Stateless uniforms in [0, 1): float32 ``[NOISE_SIZE]``, or ``[batch_size, NOISE_SIZE]``.

    Args:
      seed: int32/int64 ``[2]``.
      batch_size: None (one image) or a scalar (int or tensor).
    """
    shape = [NOISE_SIZE] if batch_size is None else tf.stack([batch_size, NOISE_SIZE])
    return tf.random.stateless_uniform(shape, seed=seed, dtype=tf.float32)


def branch_parameters(noise, branch: BranchParams, height, width) -> dict[str, tf.Tensor]:
    """Maps noise ``[..., NOISE_SIZE]`` to ``branch``'s parameters for ``height x width`` images.

    Returns a dict of float32 tensors of shape ``[...]``: the keyword arguments of
    :func:`transform_matrix` (``rotation``, ``shear`` in radians; ``zoom_x``, ``zoom_y``;
    ``shift_x``, ``shift_y`` in pixels; ``flip`` bool) plus ``channel_offsets`` ``[..., 3]`` in
    pixel units of [0, 255]. Each is ``U(low, high)`` as ``low + u * (high - low)``.
    """
    noise = _f32(noise)

    def between(index, low, high):
        return low + noise[..., index] * (high - low)

    degrees = math.pi / 180.0
    zoom_low, zoom_high = 1.0 - branch.zoom_range, 1.0 + branch.zoom_range
    return dict(
        rotation=between(0, -branch.rotation_degrees, branch.rotation_degrees) * degrees,
        shear=between(1, -branch.shear_degrees, branch.shear_degrees) * degrees,
        zoom_x=between(2, zoom_low, zoom_high),
        zoom_y=between(3, zoom_low, zoom_high),
        shift_x=between(4, -branch.width_shift, branch.width_shift) * _f32(width),
        shift_y=between(5, -branch.height_shift, branch.height_shift) * _f32(height),
        flip=tf.logical_and(branch.horizontal_flip, noise[..., 6] < 0.5),
        channel_offsets=between(slice(7, 10), -branch.channel_shift, branch.channel_shift),
    )


def _geometry(parameters: dict) -> dict:
    return {key: value for key, value in parameters.items() if key != "channel_offsets"}


def shift_channels(images: tf.Tensor, offsets: tf.Tensor) -> tf.Tensor:
    """Adds ``offsets`` ``[..., 3]`` to images ``[..., H, W, 3]``, clipped to each image's own
    [min, max] (Keras 2.1's ``random_channel_shift``; any units, as long as both agree)."""
    low = tf.reduce_min(images, axis=[-3, -2, -1], keepdims=True)
    high = tf.reduce_max(images, axis=[-3, -2, -1], keepdims=True)
    return tf.clip_by_value(images + offsets[..., tf.newaxis, tf.newaxis, :], low, high)


def channel_shift(image: tf.Tensor, seed, intensity: float) -> tf.Tensor:
    """Adds ``U(-intensity, intensity)`` per channel, clipped to the image's own [min, max]."""
    if intensity <= 0:
        return image
    return shift_channels(image, _uniform(seed, -intensity, intensity, shape=[3]))


def _moves_pixels(branch: BranchParams) -> bool:
    return any((branch.rotation_degrees, branch.shear_degrees, branch.zoom_range,
                branch.width_shift, branch.height_shift))


def host_resize(image: tf.Tensor, size: int, contract: ImageContract,
                antialias: bool = True) -> tf.Tensor:
    """``size x size`` float32 [0, 255]: the contract's antialiased resize, or plain bilinear."""
    if antialias:
        return contract.resize(image, size)
    # Straight from uint8: ResizeBilinear reads any real dtype and writes float32, so a cast
    # first would only add a pass over the larger decoded image.
    return tf.image.resize(image, (size, size), antialias=False)


def apply_branch(image: tf.Tensor, seed, branch: BranchParams, *, size: int,
                 contract: ImageContract, antialias: bool = True,
                 interpolation: str = "bilinear") -> tf.Tensor:
    """Resize to ``size x size``, geometric changes (one transform), then channel shift.

    Draws ``NOISE_SIZE`` uniforms from ``seed`` (:func:`draw_noise`) and calls
    :func:`apply_branch_parameters` with ``branch``'s parameters for them.
    """
    parameters = branch_parameters(draw_noise(seed), branch, size, size)
    return apply_branch_parameters(image, parameters, branch, size=size, contract=contract,
                                   antialias=antialias, interpolation=interpolation)


def apply_branch_parameters(image: tf.Tensor, parameters: dict, branch: BranchParams, *,
                            size: int, contract: ImageContract, antialias: bool = True,
                            interpolation: str = "bilinear") -> tf.Tensor:
    """The per-image reference: resize, one transform, channel shift, for given parameters.

    Args:
      image: decoded ``[H, W, 3]`` (uint8 or float, [0, 255]).
      parameters: one image's :func:`branch_parameters` (scalars, offsets ``[3]``).
      branch: only its fill mode and which changes are switched on are read here.
      antialias: True: ``contract.resize`` first, then the transform on the ``S x S`` image
        (the contract's exact resize). False: the resize is folded into the same transform,
        which then samples the decoded image directly (one pass, no antialiasing: faster,
        slightly aliased when shrinking; the original Keras code resized with nearest).

    Returns float32 ``[size, size, 3]`` in [0, 255].
    """
    offsets = parameters["channel_offsets"]
    geometry = _geometry(parameters)
    if not _moves_pixels(branch):
        # Flips at most: no resampling needed beyond the resize.
        image = host_resize(image, size, contract, antialias)
        image = tf.cond(tf.cast(geometry["flip"], tf.bool),
                        lambda: tf.reverse(image, axis=[1]), lambda: image)
    else:
        matrix = transform_matrix(height=size, width=size, **geometry)
        if antialias:
            image = contract.resize(image, size)
        else:
            shape = tf.shape(image)
            matrix = resize_matrix(shape[0], shape[1], size) @ matrix
        image = apply_transform(image, matrix, branch.fill_mode, output_size=(size, size),
                                interpolation=interpolation)
    return shift_channels(image, offsets) if branch.channel_shift > 0 else image


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


# ---------------------------------------------------------------------------------------------
# Split mode: the host decodes, crops and resizes; the accelerator warps a whole batch.

IMAGES = "resized_images"
CROP_BRANCH = "crop_branch"
NOISE = "augment_noise"
"""Keys of the training inputs in split mode (``make_dataset(..., augment_on_device=True)``).

Not ``"images"`` on purpose: the classifier's input is named ``"images"``, and Keras would
quietly pick that key out of the dict (a warning only) and train without augmentation if the
wrapper were forgotten; with another name ``fit`` fails at once ("Missing data for input
"images"")."""

_SCALED_PER_PIXEL = 1.0 / 127.5  # ImageContract.scale: one [0, 255] pixel unit in [-1, 1] units


def prepare_jpeg_for_device(jpeg_bytes: tf.Tensor, seed, params: AugmentParams,
                            contract: ImageContract) -> dict[str, tf.Tensor]:
    """The host's share of :func:`augment_jpeg`: decode (+ crop window), resize, draw noise.

    Same seed derivation as :func:`augment_jpeg`, so :func:`augment_batch_from_noise` on the
    result reproduces ``augment_jpeg`` for the same seed (up to float rounding) when
    ``params.antialias`` is True. With ``antialias=False`` the host resizes with plain bilinear
    (no antialiasing: ~2x cheaper on the host) and the device warps that.

    Returns ``{IMAGES: float32 [S, S, 3] in [0, 255] (not yet scaled), CROP_BRANCH: float32 []
    (1.0 = crop branch, 0.0 = whole-image branch), NOISE: float32 [NOISE_SIZE]}``. The flag is a
    float, not a bool: Keras' ``fit`` under a tf.distribute strategy averages the first batch
    across replicas to build the model, which fails on bool tensors.
    """
    branch_seed, crop_seed, change_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, num=3))
    size = contract.image_size
    crop = takes_crop_branch(branch_seed, params)

    def crop_image():
        shape = tf.io.extract_jpeg_shape(jpeg_bytes)
        window = crop_window(crop_seed, shape[0], shape[1], params)
        image = tf.io.decode_and_crop_jpeg(jpeg_bytes, window, channels=3)
        return host_resize(image, size, contract, params.antialias)

    def whole_image():
        return host_resize(tf.io.decode_jpeg(jpeg_bytes, channels=3), size, contract,
                           params.antialias)

    image = tf.cond(crop, crop_image, whole_image)
    return {IMAGES: tf.ensure_shape(image, [size, size, 3]),
            CROP_BRANCH: tf.cast(crop, tf.float32), NOISE: draw_noise(change_seed)}


def _as_flags(crop_branch) -> tf.Tensor:
    """Crop-branch flags as bool: accepts bool, or numbers with 1 = crop branch, 0 = whole."""
    crop_branch = tf.convert_to_tensor(crop_branch)
    return crop_branch if crop_branch.dtype == tf.bool else tf.cast(crop_branch, tf.float32) > 0.5


def batch_parameters(noise, crop_branch, params: AugmentParams, height, width) -> dict:
    """Per-image parameters of a batch: each image gets its branch's mapping of its noise.

    Args:
      noise: float32 ``[B, NOISE_SIZE]`` uniforms in [0, 1).
      crop_branch: ``[B]``, True/1 = crop branch (light changes), False/0 = whole-image branch
        (bool or float32, as the dataset yields it).

    Returns :func:`branch_parameters`' dict with ``[B]`` tensors (``channel_offsets`` ``[B, 3]``).
    """
    crop_branch = _as_flags(crop_branch)
    crop = branch_parameters(noise, params.crop_branch, height, width)
    whole = branch_parameters(noise, params.whole_branch, height, width)
    return {key: tf.where(crop_branch if key != "channel_offsets" else crop_branch[:, tf.newaxis],
                          crop[key], whole[key])
            for key in crop}


def apply_batch_parameters(images: tf.Tensor, parameters: dict, crop_branch,
                           params: AugmentParams) -> tf.Tensor:
    """Warp + channel shift of a batch of scaled images with given per-image parameters.

    Args:
      images: float ``[B, H, W, 3]`` in [-1, 1] (``ImageContract.scale``d), already resized.
      parameters: :func:`batch_parameters` (channel offsets in [0, 255] pixel units).
      crop_branch: ``[B]`` (bool or 1/0); only needed when the branches' fill modes differ.

    Returns float32 ``[B, H, W, 3]`` in [-1, 1]: one ``ImageProjectiveTransformV3`` call for
    the batch (two if the branches' fill modes differ), then one clip.
    """
    images = tf.cast(images, tf.float32)
    shape = tf.shape(images)
    matrices = transform_matrix(height=shape[1], width=shape[2], **_geometry(parameters))
    crop_fill, whole_fill = params.crop_branch.fill_mode, params.whole_branch.fill_mode
    warped = apply_transforms(images, matrices, crop_fill, interpolation=params.interpolation)
    if whole_fill != crop_fill:
        other = apply_transforms(images, matrices, whole_fill, interpolation=params.interpolation)
        chosen = _as_flags(crop_branch)[:, tf.newaxis, tf.newaxis, tf.newaxis]
        warped = tf.where(chosen, warped, other)
    if max(params.crop_branch.channel_shift, params.whole_branch.channel_shift) <= 0:
        return warped
    return shift_channels(warped, parameters["channel_offsets"] * _SCALED_PER_PIXEL)


def augment_batch_from_noise(images, crop_branch, noise, params: AugmentParams) -> tf.Tensor:
    """:func:`batch_parameters` then :func:`apply_batch_parameters`: float32 ``[B, H, W, 3]``."""
    shape = tf.shape(images)
    parameters = batch_parameters(noise, crop_branch, params, shape[1], shape[2])
    return apply_batch_parameters(images, parameters, crop_branch, params)


def augment_batch(images, crop_branch, seed, params: AugmentParams) -> tf.Tensor:
    """Seeded batch augmentation for a custom training step: noise from ``seed`` ``[2]``.

    Stateless: the same ``seed`` gives the same result; usable inside a ``tf.function``.
    Images ``[B, H, W, 3]`` in [-1, 1], ``crop_branch`` ``[B]`` (bool or 1/0).
    """
    noise = draw_noise(seed, tf.shape(images)[0])
    return augment_batch_from_noise(images, crop_branch, noise, params)


def augment_params_to_dict(params: AugmentParams) -> dict:
    """JSON-friendly nested dict of ``params`` (for ``get_config``)."""
    return dataclasses.asdict(params)


def augment_params_from_dict(config: dict) -> AugmentParams:
    """Inverse of :func:`augment_params_to_dict` (validated by the dataclasses)."""
    config = dict(config)
    for name in ("crop_branch", "whole_branch"):
        if isinstance(config.get(name), dict):
            config[name] = BranchParams(**config[name])
    return AugmentParams(**config)


@keras.saving.register_keras_serializable(package="landmarks")
class DeviceAugmentation(keras.layers.Layer):
    """The accelerator's share of the recipe's augmentation, batched, in front of the model.

    Input: the dict the split-mode dataset yields, ``{IMAGES: float32 [B, S, S, 3] in [-1, 1],
    CROP_BRANCH: float32 [B] (1 = crop branch, 0 = whole; bool also accepted), NOISE: float32
    [B, NOISE_SIZE]}``. Output: images ``[B, S, S, 3]``
    float32: warped and channel-shifted when ``training=True``; the images unchanged when
    ``training`` is False or None. TensorFlow backend only (``ImageProjectiveTransformV3``).

    Holds no random state: the randomness arrives with each image (``NOISE``, drawn by the
    host from the image's stateless seed), so under ``MirroredStrategy`` every replica augments
    its own images with their own noise, nothing needs syncing, and a seeded run is
    reproducible whatever the number of replicas. Computes in float32 whatever the global
    dtype policy (pixel coordinates need it); the model casts afterwards.

    For training only: never part of the exported model (:func:`with_device_augmentation`).
    """

    def __init__(self, params: AugmentParams | dict | None = None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if params is None:
            params = AugmentParams()
        if isinstance(params, dict):
            params = augment_params_from_dict(params)
        if not isinstance(params, AugmentParams):
            raise ValueError(f"params must be an AugmentParams or its dict, got {params!r}")
        self.params = params

    def call(self, inputs, training=None):
        images = tf.cast(inputs[IMAGES], tf.float32)
        if training is None or training is False:
            return images

        def augmented():
            return augment_batch_from_noise(images, inputs[CROP_BRANCH], inputs[NOISE],
                                            self.params)

        if training is True:
            return augmented()
        return tf.cond(tf.cast(training, tf.bool), augmented, lambda: images)

    def compute_output_shape(self, input_shape):
        return input_shape[IMAGES]

    def get_config(self):
        return {**super().get_config(), "params": augment_params_to_dict(self.params)}


def with_device_augmentation(model: keras.Model, params: AugmentParams,
                             name: str | None = None) -> keras.Model:
    """The training model: split-mode inputs dict -> :class:`DeviceAugmentation` -> ``model``.

    Shares ``model``'s layers and weights (training it trains ``model``); export ``model``
    itself, not this wrapper. ``model`` maps images ``[B, H, W, 3]`` to its outputs.
    """
    height, width, channels = model.input_shape[1:]
    inputs = {
        IMAGES: keras.Input((height, width, channels), name=IMAGES),
        CROP_BRANCH: keras.Input((), name=CROP_BRANCH),
        NOISE: keras.Input((NOISE_SIZE,), name=NOISE),
    }
    images = DeviceAugmentation(params, name="device_augmentation")(inputs)
    return keras.Model(inputs, model(images), name=name or f"{model.name}_device_augmented")
