"""Test-time views of one image for crop voting (docs/METHOD.md, "Stage 1 at test time").

The recipe's 22 views of an image, for a model input of S x S pixels (S = 299):

* the whole image resized to S x S, and its mirror (2 views);
* for each crop fraction c in (0.05, 0.15): the image resized to R x R with
  R = round((1 + c) * S), then five S x S windows of it (top-left, top-right, bottom-left,
  bottom-right corners and the centre), each followed by its mirror (2 x 5 x 2 = 20 views).

Order of the views (stable, part of the contract): the whole image first (if included), then
for each crop fraction in the given order the positions ``POSITIONS`` in that order; every view
is immediately followed by its mirror when mirroring is on. Default order, indices 0-21::

    0 whole, 1 whole mirrored,
    2 c=0.05 top_left, 3 its mirror, 4 top_right, 5, 6 bottom_left, 7, 8 bottom_right, 9,
    10 centre, 11, 12-21 the same for c=0.15.

Resizing is bilinear with antialiasing and does not keep the aspect ratio, exactly as
``trainer.preprocessing.ImageContract.resize`` (the training side) does; the views are pixels
in [0, 255], to be scaled by ``ImageContract.scale`` before the model.
"""

from __future__ import annotations

import dataclasses

import numpy as np

POSITIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")


@dataclasses.dataclass(frozen=True)
class CropSpec:
    """Which views :func:`make_views` makes.

    Attributes:
      crop_fractions: for each c, the image is resized to ``round((1 + c) * S)`` and five S x S
        windows are cut from it; each c > 0. Empty: no crops.
      mirror: add the horizontal mirror of every view (doubles the count).
      include_whole: add the whole image resized to S x S.
    """

    crop_fractions: tuple[float, ...] = (0.05, 0.15)
    mirror: bool = True
    include_whole: bool = True

    def __post_init__(self):
        fractions = tuple(float(c) for c in self.crop_fractions)
        if any(not 0.0 < c <= 4.0 for c in fractions):
            raise ValueError(f"crop fractions must lie in (0, 4], got {fractions}")
        if len(set(fractions)) != len(fractions):
            raise ValueError(f"crop fractions repeat: {fractions}")
        if not fractions and not self.include_whole:
            raise ValueError("a CropSpec needs the whole image or at least one crop fraction")
        object.__setattr__(self, "crop_fractions", fractions)

    @property
    def num_views(self) -> int:
        """Views per image: ``(whole + 5 * len(crop_fractions)) * (2 if mirror else 1)``."""
        base = int(self.include_whole) + len(POSITIONS) * len(self.crop_fractions)
        return base * (2 if self.mirror else 1)

    @classmethod
    def for_num_views(cls, num_views: int) -> "CropSpec":
        """The named presets: 22 (the recipe), 12 (its earlier c = 0.1 variant), 2, 1."""
        presets = {
            22: cls(),
            12: cls(crop_fractions=(0.1,)),
            2: cls(crop_fractions=()),
            1: cls(crop_fractions=(), mirror=False),
        }
        if num_views not in presets:
            raise ValueError(f"no crop preset with {num_views} views; choose from {sorted(presets)}")
        return presets[num_views]


@dataclasses.dataclass(frozen=True)
class ViewBox:
    """Geometry of one view.

    Attributes:
      name: e.g. ``"whole"``, ``"c0.05/top_left"``; with ``"/mirror"`` appended if mirrored.
      resize_to: the image is first resized to ``resize_to x resize_to`` pixels.
      top, left: the S x S window's top-left corner in the resized image, pixels.
      mirror: whether the window is flipped left-right afterwards.
    """

    name: str
    resize_to: int
    top: int
    left: int
    mirror: bool


def crop_resize_size(image_size: int, crop_fraction: float) -> int:
    """``R = round((1 + c) * S)``: 314 and 344 for S = 299 and c = 0.05, 0.15."""
    return int(round((1.0 + crop_fraction) * image_size))


def view_boxes(image_size: int, spec: CropSpec | None = None) -> tuple[ViewBox, ...]:
    """The views of ``spec`` for an S x S model input, in the documented order.

    Args:
      image_size: S, the side of every view in pixels.
      spec: the views; :class:`CropSpec` defaults (22 views) when None.

    Returns:
      ``spec.num_views`` :class:`ViewBox` es. Corner windows touch their corners of the
      resized image; the centre window starts at ``(R - S) // 2`` on both axes.
    """
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    spec = spec or CropSpec()
    plain: list[ViewBox] = []
    if spec.include_whole:
        plain.append(ViewBox("whole", image_size, 0, 0, False))
    for fraction in spec.crop_fractions:
        resize_to = crop_resize_size(image_size, fraction)
        far = resize_to - image_size  # last valid top/left offset
        offsets = {
            "top_left": (0, 0),
            "top_right": (0, far),
            "bottom_left": (far, 0),
            "bottom_right": (far, far),
            "centre": (far // 2, far // 2),
        }
        for position in POSITIONS:
            top, left = offsets[position]
            plain.append(ViewBox(f"c{fraction:g}/{position}", resize_to, top, left, False))
    boxes: list[ViewBox] = []
    for box in plain:
        boxes.append(box)
        if spec.mirror:
            boxes.append(dataclasses.replace(box, name=box.name + "/mirror", mirror=True))
    return tuple(boxes)


def _resize(image: np.ndarray, size: int) -> np.ndarray:
    """Bilinear antialiased resize to ``size x size``, float32 [0, 255] (as ImageContract)."""
    import tensorflow as tf

    resized = tf.image.resize(
        tf.convert_to_tensor(image, tf.float32),
        (size, size),
        method=tf.image.ResizeMethod.BILINEAR,
        antialias=True,
    )
    return resized.numpy()


def make_views(
    image: np.ndarray, image_size: int, spec: CropSpec | None = None, dtype=np.uint8
) -> np.ndarray:
    """All views of one image, stacked in the order of :func:`view_boxes`.

    Args:
      image: uint8 ``[H, W, 3]`` RGB (any H, W >= 1).
      image_size: S, the side of each view in pixels.
      spec: the views; :class:`CropSpec` defaults (22 views) when None.
      dtype: ``np.uint8`` (rounded) or ``np.float32`` (unrounded, in [0, 255]).

    Returns:
      ``[V, S, S, 3]`` of ``dtype``, V = ``spec.num_views``; pixel values in [0, 255].
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected an [H, W, 3] image, got {image.shape}")
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
        raise ValueError(f"dtype must be uint8 or float32, got {dtype}")
    boxes = view_boxes(image_size, spec)
    resized_by_size: dict[int, np.ndarray] = {}  # each size is resized once, not once per view
    views = np.empty([len(boxes), image_size, image_size, 3], np.float32)
    for index, box in enumerate(boxes):
        if box.resize_to not in resized_by_size:
            resized_by_size[box.resize_to] = _resize(image, box.resize_to)
        window = resized_by_size[box.resize_to][
            box.top : box.top + image_size, box.left : box.left + image_size
        ]
        views[index] = window[:, ::-1] if box.mirror else window
    if dtype == np.uint8:
        return np.clip(np.rint(views), 0, 255).astype(np.uint8)
    return views
