"""`landmarks-toy-data`: a small, realistic landmark dataset that needs no network.

Every landmark class is one real photograph shipped with scikit-image (``skimage.data``), seen
from many viewpoints: a random perspective view of part of the photo (crop, scale, rotation,
tilt, sometimes zoomed out so the scene's surroundings show), then lighting and colour changes,
blur, sensor noise, and JPEG compression at a random quality, at a random size up to
``--max_size`` pixels on the long side. Test views are harder (stronger warps, smaller crops).
Distractors (non-landmarks) go through exactly the same camera model, but their scenes are other
content: procedural textures, shapes, gratings, and crops of ``skimage.data`` images that are not
classes (grayscale ones often tinted, so colour alone does not separate them from landmarks).

Your own photos (``--scenes_dir DIR``, a local folder) replace the skimage classes: every image
file directly in DIR (.jpg .jpeg .png .webp .bmp .tif .tiff, any case) is one class named by its
file stem; every sub-folder with image files directly in it is one class named by the folder,
whose photos are all those images (each view shows one of them, chosen at random; deeper folders
are ignored). Photos are read with Pillow, turned upright by their EXIF orientation, converted to
RGB and shrunk to at most 2048 pixels on the long side. Classes are taken in name order;
``--num_classes`` caps them (default: all). A photo that cannot be read (or is under 32 pixels on
a side) is skipped with a logged warning and listed under ``skipped_photos`` in toy_data.json; a
class left without photos is dropped. Exit code 2 when the folder is missing, holds no usable
photo, or gives fewer than 2 classes, or when two classes share a name. Distractors never show
your photos (only the hard kinds below are made from them, on purpose).

``--difficulty standard|hard`` picks a preset for the settings below; each has its own flag, and
a flag given explicitly wins over the preset. ``standard`` is this generator as it always was:
the same seed and options still write byte-identical files.

    flag                        standard  hard      what it does
    --train_per_class           16        4         training views per class
    --perspective               0.12      0.25      test views: corner jitter (tilt), fraction
                                                    of the viewed region's side
    --rotation                  15        30        test views: in-plane rotation, degrees
    --scale_range               0.4,1.2   0.25,2.0  test views: side of the viewed region over
                                                    the source's (> 1: zoomed out, uniform)
    --partial_fraction          0         0.35      share of test views that show only 25-50 %
                                                    of the source's area (inside it)
    --occluder_fraction         0         0.4       share of test views with an opaque
                                                    rectangle/ellipse (flat colour or a patch of
                                                    a non-class photo) over 10-40 % of the view
    --hard_distractor_fraction  0         0.5       share of training and of test distractors
                                                    that are hard: "tile_shuffle" (a class photo
                                                    cut into 8-14 tiles along its long side,
                                                    shuffled: its colours and texture, none of
                                                    its geometry) or "recolour" (a non-class
                                                    photo crop or noise mapped to a class
                                                    photo's per-channel colour histogram)

Test distractors go through the same test camera as test landmarks (partial views, occluders),
so neither is a shortcut. Partial and occluded views are drawn per view with these
probabilities; hard distractors are every 1/fraction-th distractor (exact count
floor(n * fraction)), alternating the two kinds. toy_data.json records every resolved setting
(``config``), the counts of partial and occluded test views (``hard_views``) and of each
distractor kind (``distractor_kinds``); a run with standard settings and skimage classes keeps
the old toy_data.json and README.txt (no new keys), so its files stay byte-identical.

Output layout under ``--output_dir``::

    images/train/<id>.jpg   landmark training views (rows of train.csv)
    images/test/<id>.jpg    test views: landmarks and distractors (rows of test.csv)
    distractors/<id>.jpg    training non-landmarks (pass this folder as the ingest's
                            --distractor_dir)
    train.csv               id,url,landmark_id
    test.csv                id,url
    test_solution.csv       id,landmarks,Usage (GLDv2 form; empty landmarks = non-landmark)
    toy_data.json           config, counts and the class table (landmark id -> source photo)
    README.txt              this layout, in short
    _SUCCESS                written last

URLs are paths relative to the CSV's folder. Ids are 16 hex characters from the seeded RNG;
landmark ids are non-contiguous integers (as in GLD), so the label map matters. The same
``--seed`` and options give byte-identical files; each image has its own RNG stream derived from
``(seed, role, index)``, and what only the new settings draw (which photo of a class, partial
views, occluders, hard distractors' class photo) comes from a second stream derived from
``(seed, role, index, 101)``, so the standard streams never shift.

Example (the defaults take ~8 s on one core)::

    landmarks-toy-data --output_dir /tmp/toy --seed 0
    landmarks-toy-data --output_dir /tmp/toy_hard --seed 0 --difficulty hard
    landmarks-toy-data --output_dir /tmp/mine --scenes_dir ~/photos/landmarks --difficulty hard
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import io
import logging
import math
import os
import sys
import time
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageOps

from beam_pipelines import cli
from beam_pipelines import io_utils
from tfrecords_schema import InputError

logger = logging.getLogger(__name__)

# Photos used as landmark classes, in order of preference: distinctive, textured, colour first.
CLASS_SOURCES = (
    "astronaut", "coffee", "chelsea", "rocket", "motorcycle", "camera",
    "immunohistochemistry", "coins", "clock", "hubble_deep_field", "retina", "moon",
)
# Every other offline photo/texture of skimage.data; those not used as classes feed distractors.
OTHER_SOURCES = ("brick", "gravel", "grass", "page", "text", "cell", "colorwheel", "logo")
# Half the distractors are real photos, so "photo" alone does not mean "landmark".
DISTRACTOR_KINDS = ("photo_crop", "clouds", "photo_crop", "shapes", "photo_crop", "grating")

# RNG stream roles (part of each image's seed, so one count never shifts another's images).
_ROLE_TRAIN, _ROLE_TEST, _ROLE_TRAIN_DISTRACTOR, _ROLE_TEST_DISTRACTOR = 1, 2, 3, 4
# Appended to (seed, role, index) for what only the new settings draw: a stream of its own, so
# the standard streams (and files) never shift. Not 0: SeedSequence([s, r, i, 0]) equals [s, r, i].
_AUX_STREAM = 101

DEFAULT_NUM_CLASSES = 6
# Your own photos (--scenes_dir): which files are photos, and the working size they are read at.
SCENE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SCENE_MAX_SIDE = 2048  # pixels on the long side; larger photos are shrunk before rendering
SCENE_MIN_SIDE = 32  # pixels on the short side; smaller files are skipped as unusable
# Hard settings that have no flag of their own (recorded in toy_data.json when in use).
PARTIAL_AREA = (0.25, 0.50)  # a partial view shows this share of the source's area (uniform)
OCCLUDER_AREA = (0.10, 0.40)  # an occluder covers this share of the view's area (uniform)
OCCLUDER_SHAPES = ("rectangle", "ellipse")
TILES_PER_SIDE = (8, 14)  # tile_shuffle: tiles along the class photo's long side (inclusive)
HARD_DISTRACTOR_KINDS = ("tile_shuffle", "recolour")


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


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """One ``--difficulty`` preset: the value of every setting its flag does not override.

    ``perspective``/``rotation``/``scale_range`` are the test views' ``max_tilt``,
    ``max_rotation`` (degrees) and (``min_scale``, ``max_scale``) (see :class:`ViewParams`);
    the fractions are shares in [0, 1] (see the module docstring).
    """

    train_per_class: int
    perspective: float
    rotation: float
    scale_range: tuple[float, float]
    partial_fraction: float
    occluder_fraction: float
    hard_distractor_fraction: float


DIFFICULTIES = {
    # Exactly the generator as it was: TEST_VIEW, no partial views, occluders or hard distractors.
    "standard": Difficulty(
        train_per_class=16, perspective=TEST_VIEW.max_tilt, rotation=TEST_VIEW.max_rotation,
        scale_range=(TEST_VIEW.min_scale, TEST_VIEW.max_scale), partial_fraction=0.0,
        occluder_fraction=0.0, hard_distractor_fraction=0.0),
    "hard": Difficulty(
        train_per_class=4, perspective=0.25, rotation=30.0, scale_range=(0.25, 2.0),
        partial_fraction=0.35, occluder_fraction=0.4, hard_distractor_fraction=0.5),
}
_PRESET_FIELDS = tuple(field.name for field in dataclasses.fields(Difficulty))


@dataclasses.dataclass(frozen=True)
class ToyDataConfig:
    """What to generate. Sizes are pixels on an image's long side.

    A setting left ``None`` takes its ``difficulty`` preset's value (:data:`DIFFICULTIES`), and
    ``num_classes`` left ``None`` is 6 with the skimage classes; both are resolved on
    construction, so an instance holds the values used. Only with ``scenes_dir`` may
    ``num_classes`` stay ``None``: all the folder's classes.
    """

    output_dir: str
    num_classes: Optional[int] = None
    train_per_class: Optional[int] = None
    test_per_class: int = 4
    num_train_distractors: int = 16
    num_test_distractors: int = 12
    min_size: int = 300
    max_size: int = 1600
    seed: int = 0
    overwrite: bool = False
    scenes_dir: Optional[str] = None
    difficulty: str = "standard"
    perspective: Optional[float] = None
    rotation: Optional[float] = None
    scale_range: Optional[tuple[float, float]] = None
    partial_fraction: Optional[float] = None
    occluder_fraction: Optional[float] = None
    hard_distractor_fraction: Optional[float] = None

    def __post_init__(self):
        if not self.output_dir:
            raise InputError("output_dir is required")
        if self.difficulty not in DIFFICULTIES:
            raise InputError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got "
                             f"{self.difficulty!r}")
        preset = DIFFICULTIES[self.difficulty]
        for name in _PRESET_FIELDS:  # frozen: resolved once, here
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(preset, name))
        for name in ("perspective", "rotation", "partial_fraction", "occluder_fraction",
                     "hard_distractor_fraction"):
            object.__setattr__(self, name, float(getattr(self, name)))
        if len(tuple(self.scale_range)) != 2:
            raise InputError(f"scale_range must be two numbers MIN,MAX, got {self.scale_range}")
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))
        if self.scenes_dir is not None and not self.scenes_dir:
            raise InputError("scenes_dir must not be empty")
        if self.num_classes is None and self.scenes_dir is None:
            object.__setattr__(self, "num_classes", DEFAULT_NUM_CLASSES)
        self._validate()

    def _validate(self) -> None:
        if self.scenes_dir is None and not 1 <= self.num_classes <= len(CLASS_SOURCES):
            raise InputError(f"num_classes must be in [1, {len(CLASS_SOURCES)}] (one skimage "
                             f"photo per class), got {self.num_classes}")
        if self.scenes_dir is not None:
            if "://" in self.scenes_dir:
                raise InputError(f"scenes_dir must be a local folder, got {self.scenes_dir}")
            if self.num_classes is not None and self.num_classes < 2:
                raise InputError(f"num_classes must be >= 2 with scenes_dir (at most that many "
                                 f"of the folder's classes), got {self.num_classes}")
        for name in ("train_per_class", "test_per_class", "num_train_distractors",
                     "num_test_distractors"):
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.train_per_class < 1:
            raise InputError("train_per_class must be >= 1")
        if not 32 <= self.min_size <= self.max_size <= 4096:
            raise InputError(f"need 32 <= min_size <= max_size <= 4096, got min_size="
                             f"{self.min_size}, max_size={self.max_size}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        if not 0.0 <= self.perspective <= 0.4:
            raise InputError(f"perspective must be in [0, 0.4] (corner jitter, fraction of the "
                             f"region's side), got {self.perspective}")
        if not 0.0 <= self.rotation <= 90.0:
            raise InputError(f"rotation must be in [0, 90] degrees, got {self.rotation}")
        low, high = self.scale_range
        if not 0.05 <= low <= high <= 4.0:
            raise InputError(f"scale_range must satisfy 0.05 <= MIN <= MAX <= 4, got "
                             f"{low},{high}")
        for name in ("partial_fraction", "occluder_fraction", "hard_distractor_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def test_view(self) -> ViewParams:
        """The camera of test views (landmarks and distractors) under these settings."""
        return ViewParams(min_scale=self.scale_range[0], max_scale=self.scale_range[1],
                          max_rotation=self.rotation, max_tilt=self.perspective)

    @property
    def legacy_output(self) -> bool:
        """True when the output is the standard generator's: skimage classes, standard
        difficulty and every setting at its standard value. toy_data.json and README.txt then
        keep their old form (no new keys), so the files stay byte-identical to older versions'."""
        standard = DIFFICULTIES["standard"]
        return (self.scenes_dir is None and self.difficulty == "standard"
                and all(getattr(self, name) == getattr(standard, name)
                        for name in _PRESET_FIELDS if name != "train_per_class"))


# ----------------------------------------------------------------------------- source images

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


@dataclasses.dataclass(frozen=True)
class SceneClass:
    """One class of ``--scenes_dir``: a photo file directly in the folder, or a sub-folder.

    ``name``: the file's stem or the folder's name; ``source``: path relative to the folder
    (``"bridge.jpg"`` or ``"tower/"``); ``photos``: full paths of its photos, sorted.
    """

    name: str
    source: str
    photos: tuple[str, ...]


def is_scene_photo(file_name: str) -> bool:
    """Whether ``file_name`` is a photo for ``--scenes_dir``: a known extension (any case),
    not hidden."""
    return (not file_name.startswith(".")
            and os.path.splitext(file_name)[1].lower() in SCENE_EXTENSIONS)


def find_scene_classes(scenes_dir: str) -> list[SceneClass]:
    """The candidate classes of ``scenes_dir``, sorted by name (no photo is opened here).

    Raises:
      InputError: the folder is missing, holds no photo (directly or one level down), or two
        classes share a name (``a.jpg`` and ``a/``, or ``a.jpg`` and ``a.png``).
    """
    if not os.path.isdir(scenes_dir):
        raise InputError(f"scenes_dir {scenes_dir}: no such folder")
    classes = []
    with os.scandir(scenes_dir) as entries:
        for entry in sorted(entries, key=lambda e: e.name):
            if entry.is_file() and is_scene_photo(entry.name):
                classes.append(SceneClass(os.path.splitext(entry.name)[0], entry.name,
                                          (entry.path,)))
            elif entry.is_dir() and not entry.name.startswith("."):
                with os.scandir(entry.path) as inner:
                    photos = sorted(e.path for e in inner if e.is_file() and is_scene_photo(e.name))
                if photos:
                    classes.append(SceneClass(entry.name, entry.name + "/", tuple(photos)))
    if not classes:
        raise InputError(f"scenes_dir {scenes_dir}: no photos ({' '.join(SCENE_EXTENSIONS)}) "
                         f"in it or in its sub-folders")
    by_name: dict[str, list[str]] = {}
    for scene_class in classes:
        by_name.setdefault(scene_class.name, []).append(scene_class.source)
    clashes = {name: sources for name, sources in by_name.items() if len(sources) > 1}
    if clashes:
        name, sources = sorted(clashes.items())[0]
        raise InputError(f"scenes_dir {scenes_dir}: {len(sources)} classes named {name!r} "
                         f"({', '.join(sources)}); rename all but one")
    return sorted(classes, key=lambda c: c.name)


def load_scene_photo(path: str, max_side: int = SCENE_MAX_SIDE) -> np.ndarray:
    """A photo of ``--scenes_dir`` as RGB uint8 ``[H, W, 3]``: upright by its EXIF orientation,
    shrunk to at most ``max_side`` pixels on the long side. Read-only (it may be cached).

    Raises:
      InputError: naming the photo, when Pillow cannot decode it or it is smaller than
        ``SCENE_MIN_SIDE`` pixels on a side.
    """
    try:
        with Image.open(path) as opened:
            opened.draft("RGB", (max_side, max_side))  # JPEG: decode huge photos at 1/2, 1/4...
            image = ImageOps.exif_transpose(opened).convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise InputError(f"cannot read photo {path}: {type(error).__name__}: {error}") from error
    if min(image.size) < SCENE_MIN_SIDE:
        raise InputError(f"photo {path} is {image.size[0]}x{image.size[1]} pixels, under "
                         f"{SCENE_MIN_SIDE} on a side")
    if max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.LANCZOS)
    pixels = np.array(image, np.uint8)
    pixels.setflags(write=False)
    return pixels


def usable_scene_classes(scenes_dir: str, num_classes: Optional[int],
                         load: Callable[[str], np.ndarray]) -> tuple[list[SceneClass], list[dict]]:
    """The classes to use: the first ``num_classes`` (all if ``None``) in name order whose
    photos ``load`` can read, each keeping only its readable photos.

    A photo that fails to load is skipped (a logged warning; returned as ``{"source": <path
    relative to scenes_dir>, "error": <message>}``); a class left with none is dropped.

    Raises:
      InputError: see :func:`find_scene_classes`; or no photo could be read; or fewer than 2
        classes remain.
    """
    candidates = find_scene_classes(scenes_dir)
    usable, skipped = [], []
    for scene_class in candidates:
        if num_classes is not None and len(usable) >= num_classes:
            break
        readable = []
        for photo in scene_class.photos:
            try:
                load(photo)
            except InputError as error:
                logger.warning("skipping a photo of class %r: %s", scene_class.name, error)
                skipped.append({"source": os.path.relpath(photo, scenes_dir), "error": str(error)})
                continue
            readable.append(photo)
        if readable:
            usable.append(dataclasses.replace(scene_class, photos=tuple(readable)))
        else:
            logger.warning("class %r (%s) has no readable photo: dropped", scene_class.name,
                           scene_class.source)
    if not usable:
        raise InputError(f"scenes_dir {scenes_dir}: no usable photos, none of "
                         f"{len(skipped)} could be read (first: {skipped[0]['error']})")
    if len(usable) < 2:
        raise InputError(f"scenes_dir {scenes_dir}: {len(usable)} class ({usable[0].source}), "
                         f"need at least 2: one photo file or one sub-folder of photos per "
                         f"landmark")
    return usable, skipped


# ----------------------------------------------------------------------------- geometry

def homography(source_points: np.ndarray, target_points: np.ndarray) -> np.ndarray:
    """The 3x3 projective map sending 4 ``source_points`` ``[4, 2]`` (x, y) to ``target_points``."""
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


def view_corners(source_shape: Sequence[int], out_size: tuple[int, int], params: ViewParams,
                 rng: np.random.Generator, area_fraction: Optional[float] = None) -> np.ndarray:
    """Corners ``[4, 2]`` (x, y; TL, TR, BR, BL) in the source of the region a view shows.

    With ``area_fraction`` (a partial view) the region's size comes from
    :func:`partial_region_size` instead of ``params``' scale (no scale is drawn); rotation and
    tilt still apply, then :func:`fit_partial_quad` restores the area and keeps the region
    inside the source. Without it the draws and corners are exactly the standard generator's.
    """
    height, width = source_shape[:2]
    out_w, out_h = out_size
    if area_fraction is None:
        scale = rng.uniform(params.min_scale, params.max_scale)
        region_w = scale * width
        region_h = region_w * out_h / out_w
        if region_h > scale * height * 1.15:  # keep the region's height in proportion too
            region_h = scale * height * 1.15
            region_w = region_h * out_w / out_h
    else:
        region_w, region_h = partial_region_size((width, height), (out_w, out_h), area_fraction)
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


def _polygon_area(points: np.ndarray) -> float:
    """Shoelace area of polygon ``points`` ``[N, 2]``."""
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
    area = _polygon_area(corners)
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
    return min(1.0, _polygon_area(polygon) / (width * height))


# ----------------------------------------------------------------------------- scenes

def _value_noise(rng: np.random.Generator, height: int, width: int, octaves: int = 5) -> np.ndarray:
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


def _palette_map(values: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Maps ``[H, W]`` values in [0, 1] through a random 3-colour gradient to RGB uint8."""
    colours = rng.integers(0, 256, size=(3, 3)).astype(np.float32)
    stops = np.array([0.0, rng.uniform(0.3, 0.7), 1.0], np.float32)
    channels = [np.interp(values, stops, colours[:, c]) for c in range(3)]
    return np.clip(np.stack(channels, axis=-1), 0, 255).astype(np.uint8)


def _gradient(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A linear two-colour gradient in a random direction, RGB uint8 ``[H, W, 3]``."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = xs / width * math.cos(angle) + ys / height * math.sin(angle)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    first, second = rng.integers(0, 256, size=(2, 3)).astype(np.float32)
    return (first + ramp[..., None] * (second - first)).astype(np.uint8)


def background_scene(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """What surrounds a photographed scene in a zoomed-out view: a gradient with soft noise."""
    base = _gradient(rng, height, width).astype(np.float32)
    base = 0.4 * base + 0.6 * base.mean(axis=-1, keepdims=True)  # muted, like walls or sky
    noise = _value_noise(rng, height, width, octaves=4)[..., None]
    return np.clip(base * (0.75 + 0.5 * noise), 0, 255).astype(np.uint8)


def _clouds(rng: np.random.Generator) -> np.ndarray:
    height, width = int(rng.integers(320, 520)), int(rng.integers(320, 620))
    return _palette_map(_value_noise(rng, height, width), rng)


def _shapes(rng: np.random.Generator) -> np.ndarray:
    height, width = int(rng.integers(320, 520)), int(rng.integers(320, 620))
    image = Image.fromarray(_gradient(rng, height, width))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(8, 40))):
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
    return np.asarray(image.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 1.5))))


def _grating(rng: np.random.Generator) -> np.ndarray:
    height, width = int(rng.integers(320, 520)), int(rng.integers(320, 620))
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    values = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(1, 4))):
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(6, 60)
        phase = rng.uniform(0, 2 * math.pi)
        along = xs * math.cos(angle) + ys * math.sin(angle)
        values += np.sin(along * 2 * math.pi / period + phase)
    values = (values - values.min()) / max(float(np.ptp(values)), 1e-6)
    values = 0.7 * values + 0.3 * _value_noise(rng, height, width, octaves=3)
    return _palette_map(values, rng)


def _photo_crop(rng: np.random.Generator, photos: Sequence[np.ndarray]) -> np.ndarray:
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
        crop = _palette_map(crop[..., 0].astype(np.float32) / 255.0, rng)
    return crop


def distractor_scene(kind: str, rng: np.random.Generator,
                     photos: Sequence[np.ndarray]) -> np.ndarray:
    """Content of one non-landmark image, RGB uint8 ``[H, W, 3]``, before the camera model."""
    if kind == "photo_crop" and photos:
        return _photo_crop(rng, photos)
    if kind == "shapes":
        return _shapes(rng)
    if kind == "grating":
        return _grating(rng)
    return _clouds(rng)


def shuffled_tiles(photo: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A hard non-landmark: ``photo`` (RGB uint8 ``[H, W, 3]``) cut into square tiles, 8-14
    along its long side (:data:`TILES_PER_SIDE`), put back in random order.

    It keeps the photo's colours and texture (its pixels, up to the border trimmed to whole
    tiles) but none of its geometry: each tile is at most 1/64 of the photo's area, so
    geometric verification finds no large consistent match. Returns RGB uint8
    ``[rows * t, cols * t, 3]``, ``t`` the tile side in pixels.
    """
    height, width = photo.shape[:2]
    per_side = int(rng.integers(TILES_PER_SIDE[0], TILES_PER_SIDE[1] + 1))
    tile = max(1, min(max(height, width) // per_side, height, width))
    rows, cols = height // tile, width // tile
    top = int(rng.integers(0, height - rows * tile + 1))
    left = int(rng.integers(0, width - cols * tile + 1))
    grid = photo[top:top + rows * tile, left:left + cols * tile, :3]
    tiles = grid.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(-1, tile, tile, 3)
    tiles = tiles[rng.permutation(len(tiles))]
    return np.ascontiguousarray(
        tiles.reshape(rows, cols, tile, tile, 3).transpose(0, 2, 1, 3, 4).reshape(
            rows * tile, cols * tile, 3))


def match_colours(image: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``image`` (RGB uint8 ``[H, W, 3]``) with each channel's histogram replaced by
    ``reference``'s (RGB uint8 ``[h, w, 3]``): same layout, the reference's colour statistics.

    Exact matching by rank: a channel's pixels, ordered by value (ties by a blurred copy, so a
    flat area becomes a smooth ramp rather than noise), take the reference's sorted values at
    the same quantiles. Returns RGB uint8 ``[H, W, 3]``.
    """
    height, width = image.shape[:2]
    count = height * width
    reference = reference[::max(1, reference.shape[0] // 512), ::max(1, reference.shape[1] // 512)]
    matched = np.empty((height, width, 3), np.uint8)
    for channel in range(3):
        values = np.ascontiguousarray(image[..., channel], np.float32)
        smooth = cv2.GaussianBlur(values, (0, 0), 3.0)
        order = np.lexsort((smooth.ravel(), values.ravel()))
        target = np.sort(reference[..., channel].ravel())
        picks = ((np.arange(count) + 0.5) * (len(target) / count)).astype(np.int64)
        flat = np.empty(count, np.uint8)
        flat[order] = target[picks]
        matched[..., channel] = flat.reshape(height, width)
    return matched


def hard_distractor_scene(kind: str, rng: np.random.Generator, landmark_photo: np.ndarray,
                          photos: Sequence[np.ndarray]) -> np.ndarray:
    """Content of one hard non-landmark, RGB uint8 ``[H, W, 3]``, before the camera model.

    ``tile_shuffle``: :func:`shuffled_tiles` of ``landmark_photo`` (a class photo).
    ``recolour``: a crop of one of ``photos`` (never class photos) or cloud noise, through
    :func:`match_colours` onto ``landmark_photo``'s colour histogram.
    """
    if kind == "tile_shuffle":
        return shuffled_tiles(landmark_photo, rng)
    if kind != "recolour":
        raise ValueError(f"unknown hard distractor kind {kind!r}")
    base_kind = "photo_crop" if rng.random() < 0.5 else "clouds"
    return match_colours(distractor_scene(base_kind, rng, photos), landmark_photo)


def is_hard_distractor(index: int, fraction: float) -> bool:
    """Whether distractor ``index`` (0-based) is hard: every 1/``fraction``-th one, so that
    exactly ``floor(n * fraction)`` of the first ``n`` are, evenly spread."""
    return math.floor((index + 1) * fraction) > math.floor(index * fraction)


# ----------------------------------------------------------------------------- camera model

@dataclasses.dataclass(frozen=True)
class Occluder:
    """An opaque shape in front of a view, in coordinates relative to the view.

    ``box``: (left, top, right, bottom) as fractions of the view's width and height;
    ``shape``: ``"rectangle"`` or ``"ellipse"`` (inscribed in the box); ``colour``: RGB fill
    when ``patch`` is None; ``patch``: RGB uint8 ``[h, w, 3]`` photo stretched over the box.
    """

    box: tuple[float, float, float, float]
    shape: str
    colour: tuple[int, int, int]
    patch: Optional[np.ndarray] = dataclasses.field(default=None, compare=False)

    @property
    def area(self) -> float:
        """Share of the view's area the shape covers (before rasterisation)."""
        left, top, right, bottom = self.box
        box_area = (right - left) * (bottom - top)
        return box_area * (math.pi / 4 if self.shape == "ellipse" else 1.0)


def draw_occluder(rng: np.random.Generator, photos: Sequence[np.ndarray]) -> Occluder:
    """A random occluder covering a share of the view in :data:`OCCLUDER_AREA` (uniform): a
    rectangle or ellipse (box aspect log-uniform in [0.5, 2]) filled with a flat colour or, half
    the time, a crop of one of ``photos`` (pass non-class photos only)."""
    area = rng.uniform(*OCCLUDER_AREA)
    shape = OCCLUDER_SHAPES[int(rng.integers(0, len(OCCLUDER_SHAPES)))]
    box_area = area * (4 / math.pi if shape == "ellipse" else 1.0)
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
    box_w = min(0.95, math.sqrt(box_area * aspect))
    box_h = min(0.95, box_area / box_w)
    box_w = min(0.95, box_area / box_h)
    left = rng.uniform(0.0, 1.0 - box_w)
    top = rng.uniform(0.0, 1.0 - box_h)
    colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
    patch = _photo_crop(rng, photos) if photos and rng.random() < 0.5 else None
    return Occluder(box=(left, top, left + box_w, top + box_h), shape=shape, colour=colour,
                    patch=patch)


def _box_pixels(occluder: Occluder, out_size: tuple[int, int]) -> tuple[int, int, int, int]:
    out_w, out_h = out_size
    left, top, right, bottom = occluder.box
    x0, y0 = int(round(left * out_w)), int(round(top * out_h))
    x1, y1 = max(x0 + 1, int(round(right * out_w))), max(y0 + 1, int(round(bottom * out_h)))
    return x0, y0, min(x1, out_w), min(y1, out_h)


def occluder_mask(occluder: Occluder, out_size: tuple[int, int]) -> np.ndarray:
    """Where ``occluder`` hides a view of ``out_size`` (width, height): bool ``[height, width]``."""
    x0, y0, x1, y1 = _box_pixels(occluder, out_size)
    mask = Image.new("L", out_size, 0)
    draw = ImageDraw.Draw(mask)
    if occluder.shape == "ellipse":
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=255)
    else:
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=255)
    return np.asarray(mask) > 0


def apply_occluder(pixels: np.ndarray, occluder: Occluder) -> np.ndarray:
    """``pixels`` (RGB uint8 ``[H, W, 3]``) with ``occluder`` painted over; a new array."""
    out_h, out_w = pixels.shape[:2]
    mask = occluder_mask(occluder, (out_w, out_h))
    x0, y0, x1, y1 = _box_pixels(occluder, (out_w, out_h))
    fill = np.empty_like(pixels)
    fill[...] = np.asarray(occluder.colour, np.uint8)
    if occluder.patch is not None:
        fill[y0:y1, x0:x1] = cv2.resize(np.ascontiguousarray(occluder.patch), (x1 - x0, y1 - y0),
                                        interpolation=cv2.INTER_AREA)
    return np.where(mask[..., None], fill, pixels)


@dataclasses.dataclass(frozen=True)
class ViewExtras:
    """What the hard settings add to one test view: ``area_fraction`` of the source shown by
    a partial view (None: a normal view), and an ``occluder`` (None: none)."""

    area_fraction: Optional[float] = None
    occluder: Optional[Occluder] = None


def draw_view_extras(rng: np.random.Generator, partial_fraction: float, occluder_fraction: float,
                     occluder_photos: Sequence[np.ndarray]) -> ViewExtras:
    """Decides, from a view's own auxiliary stream ``rng``, whether it is partial (probability
    ``partial_fraction``, area uniform in :data:`PARTIAL_AREA`) and occluded (probability
    ``occluder_fraction``, see :func:`draw_occluder`). The same draws are made whatever the
    fractions, so raising a fraction only adds partial/occluded views."""
    partial = rng.random() < partial_fraction
    area = rng.uniform(*PARTIAL_AREA)
    occluded = rng.random() < occluder_fraction
    occluder = draw_occluder(rng, occluder_photos)
    return ViewExtras(area_fraction=area if partial else None,
                      occluder=occluder if occluded else None)


def render_view(scene: np.ndarray, rng: np.random.Generator, params: ViewParams, min_size: int,
                max_size: int, extras: ViewExtras = ViewExtras()) -> Image.Image:
    """A photograph of ``scene`` (RGB uint8 ``[H, W, 3]``) from a random viewpoint.

    Geometry (perspective warp of a random region, surroundings filled with a background
    scene; a partial view's region per ``extras.area_fraction``), then the occluder if any,
    then light (per-channel gain, gamma, brightness, contrast as one lookup table),
    saturation, blur and sensor noise. Returns an RGB image whose long side is in
    ``[min_size, max_size]``. With default ``extras`` the draws from ``rng`` are exactly the
    standard generator's.
    """
    out_w, out_h = output_size(scene.shape, rng, min_size, max_size)
    corners = view_corners(scene.shape, (out_w, out_h), params, rng,
                           area_fraction=extras.area_fraction)
    target = np.array([[0, 0], [out_w, 0], [out_w, out_h], [0, out_h]], np.float64)
    output_to_source = homography(target, corners)
    # The surroundings are drawn small and upsampled: they are smooth anyway, and that is fast.
    small_h, small_w = max(8, out_h // 4), max(8, out_w // 4)
    pixels = cv2.resize(background_scene(rng, small_h, small_w), (out_w, out_h),
                        interpolation=cv2.INTER_LINEAR)
    # OpenCV warps ~10x faster than Pillow's bicubic PERSPECTIVE; BORDER_TRANSPARENT leaves the
    # background wherever the view falls outside the scene.
    cv2.warpPerspective(np.ascontiguousarray(scene), output_to_source, (out_w, out_h), dst=pixels,
                        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                        borderMode=cv2.BORDER_TRANSPARENT)
    if extras.occluder is not None:  # in front of the scene, lit by the same light
        pixels = apply_occluder(pixels, extras.occluder)
    image = Image.fromarray(pixels)

    # Light: one 256-entry table per channel (gain, gamma, brightness, contrast about mid-grey).
    levels = np.arange(256, dtype=np.float32) / 255.0
    gamma = rng.uniform(0.7, 1.4)
    brightness = rng.uniform(0.7, 1.3)
    contrast = rng.uniform(0.7, 1.3)
    tables = []
    for gain in rng.uniform(0.85, 1.15, size=3):
        curve = np.clip(levels * gain, 0, 1) ** gamma
        curve = (curve - 0.5) * contrast + 0.5
        tables.append(np.clip(curve * brightness * 255.0, 0, 255).round().astype(np.uint8))
    image = image.point(np.concatenate(tables).tolist())
    image = ImageEnhance.Color(image).enhance(rng.uniform(0.6, 1.4) if rng.random() > 0.08 else 0.0)
    if rng.random() < 0.5:
        sigma = rng.uniform(0.3, 1.6) * max(out_w, out_h) / 800.0
        image = Image.fromarray(cv2.GaussianBlur(np.asarray(image), (0, 0), sigma))
    if rng.random() < 0.5:
        sigma = rng.uniform(1.0, 6.0)
        pixels = np.asarray(image, np.float32)
        pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * sigma
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def encode_jpeg(image: Image.Image, rng: np.random.Generator) -> bytes:
    """JPEG bytes at a random quality in [60, 95] (Pillow's encoder is deterministic)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(rng.integers(60, 96)))
    return buffer.getvalue()


# ----------------------------------------------------------------------------- dataset

def _image_rng(seed: int, role: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, role, index]))


def _aux_rng(seed: int, role: int, index: int) -> np.random.Generator:
    """The image's second stream: what only the new settings draw (see the module docstring)."""
    return np.random.default_rng(np.random.SeedSequence([seed, role, index, _AUX_STREAM]))


def _unique_hex_ids(rng: np.random.Generator, count: int) -> list[str]:
    ids: list[str] = []
    seen = set()
    while len(ids) < count:
        candidate = f"{int(rng.integers(0, 2 ** 63)):016x}"
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def _csv(header: str, rows: Sequence[Sequence[object]]) -> str:
    return "\n".join([header] + [",".join(str(field) for field in row) for row in rows]) + "\n"


README = """Toy landmark dataset written by landmarks-toy-data (see toy_data.json for the options).

images/train/   landmark training views, listed in train.csv (id,url,landmark_id)
images/test/    test views (landmarks and non-landmarks), listed in test.csv (id,url)
distractors/    training non-landmarks: pass this folder to landmarks-ingest --distractor_dir
test_solution.csv  id,landmarks,Usage (empty landmarks = no landmark); for landmarks-evaluate
URLs are relative to this folder. Each class is one scikit-image photograph.
"""


def readme_text(config: ToyDataConfig) -> str:
    """README.txt for ``config``: :data:`README` for a standard run (byte-identical to older
    versions'), otherwise with where the classes come from and what the settings did."""
    if config.legacy_output:
        return README
    text = README
    if config.scenes_dir is not None:
        text = text.replace(
            "Each class is one scikit-image photograph.",
            "Each class is one photo file, or one sub-folder\nof photos, of --scenes_dir "
            "(\"classes\" in toy_data.json; unreadable photos are listed\nunder "
            "\"skipped_photos\").")
    low, high = config.scale_range
    return text + (
        f"\nDifficulty {config.difficulty}: {config.train_per_class} training views per class. "
        f"Test views (landmarks and\nnon-landmarks alike): tilt up to {config.perspective:g} of "
        f"the region's side, rotation up to\n{config.rotation:g} degrees, region side "
        f"{low:g}-{high:g} x the source's; a share of {config.partial_fraction:g} show\n"
        f"only {PARTIAL_AREA[0]:g}-{PARTIAL_AREA[1]:g} of the source's area, "
        f"{config.occluder_fraction:g} have an occluder over "
        f"{OCCLUDER_AREA[0]:g}-{OCCLUDER_AREA[1]:g} of the view\n(counted under \"hard_views\" "
        f"in toy_data.json). A share of {config.hard_distractor_fraction:g} of the "
        f"distractors\nare hard: tile_shuffle (a class photo's tiles, shuffled) or recolour "
        f"(other content\nwith a class photo's colour histogram), counted under "
        f"\"distractor_kinds\".\n")


def _config_record(config: ToyDataConfig, num_classes: int) -> dict:
    """toy_data.json's ``config``: every resolved setting (a standard run: the old keys only)."""
    record = {name: getattr(config, name) for name in (
        "num_classes", "train_per_class", "test_per_class", "num_train_distractors",
        "num_test_distractors", "min_size", "max_size", "seed")}
    record["num_classes"] = num_classes
    if config.legacy_output:
        return record
    record.update(
        difficulty=config.difficulty, perspective=config.perspective, rotation=config.rotation,
        scale_range=list(config.scale_range), partial_fraction=config.partial_fraction,
        partial_area=list(PARTIAL_AREA), occluder_fraction=config.occluder_fraction,
        occluder_area=list(OCCLUDER_AREA), occluder_shapes=list(OCCLUDER_SHAPES),
        hard_distractor_fraction=config.hard_distractor_fraction,
        hard_distractor_kinds=list(HARD_DISTRACTOR_KINDS), tiles_per_side=list(TILES_PER_SIDE),
        scenes_dir=None if config.scenes_dir is None else os.path.abspath(config.scenes_dir))
    if config.scenes_dir is not None:
        record.update(num_classes_requested=config.num_classes, scene_max_side=SCENE_MAX_SIDE,
                      scene_extensions=list(SCENE_EXTENSIONS))
    return record


def generate(config: ToyDataConfig, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Writes the dataset described by ``config``; returns the summary written to toy_data.json.

    Args:
      config: what to write and where.
      progress: called as ``progress(done, total)`` after each image (for logging).

    Returns:
      ``{"config": ..., "counts": ..., "classes": [...], "distractor_kinds": ...,
      "seconds": ...}`` (plus ``"hard_views"`` and, with ``scenes_dir``, ``"skipped_photos"``
      unless the run is standard); ``seconds`` is not written to the file (it would break
      byte-identity).

    Raises:
      InputError: a bad ``scenes_dir`` (see :func:`usable_scene_classes`), checked before the
        output folder is touched; or a non-empty output folder without ``overwrite``.
    """
    start = time.monotonic()
    legacy = config.legacy_output
    load_photo = functools.lru_cache(maxsize=16)(load_scene_photo)
    scene_classes: list[SceneClass] = []
    skipped: list[dict] = []
    if config.scenes_dir is not None:
        scene_classes, skipped = usable_scene_classes(config.scenes_dir, config.num_classes,
                                                      load_photo)
    io_utils.prepare_output_dir(config.output_dir, overwrite=config.overwrite)
    master = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))

    if scene_classes:
        num_classes = len(scene_classes)
        class_names = [scene_class.name for scene_class in scene_classes]
        class_sources = [scene_class.source for scene_class in scene_classes]
        # No user photo is a class's and a distractor's: distractors use every skimage photo.
        distractor_photos = [load_source(name) for name in CLASS_SOURCES + OTHER_SOURCES]
    else:
        num_classes = config.num_classes
        class_names = list(CLASS_SOURCES[:num_classes])
        class_sources = [f"skimage.data.{name}" for name in class_names]
        distractor_photos = [load_source(name)
                             for name in CLASS_SOURCES[num_classes:] + OTHER_SOURCES]
    landmark_ids = [int(i) for i in master.choice(np.arange(1, 20000), size=num_classes,
                                                  replace=False)]
    sources = {} if scene_classes else {name: load_source(name) for name in class_names}

    def class_photo(position: int, aux: np.random.Generator) -> np.ndarray:
        """A photo of class ``position``; with several, one drawn from the aux stream."""
        if not scene_classes:
            return sources[class_names[position]]
        photos = scene_classes[position].photos
        return load_photo(photos[int(aux.integers(0, len(photos)))] if len(photos) > 1
                          else photos[0])

    test_view = config.test_view
    with_extras = config.partial_fraction > 0 or config.occluder_fraction > 0
    hard_views = {split: {"partial": 0, "occluded": 0} for split in ("landmarks", "distractors")}

    def test_extras(aux: np.random.Generator, split: str) -> ViewExtras:
        if not with_extras:
            return ViewExtras()
        extras = draw_view_extras(aux, config.partial_fraction, config.occluder_fraction,
                                  distractor_photos)
        hard_views[split]["partial"] += extras.area_fraction is not None
        hard_views[split]["occluded"] += extras.occluder is not None
        return extras

    num_train = num_classes * config.train_per_class
    num_test_landmarks = num_classes * config.test_per_class
    train_ids = _unique_hex_ids(master, num_train + num_test_landmarks
                                + config.num_train_distractors + config.num_test_distractors)
    test_ids = train_ids[num_train:num_train + num_test_landmarks]
    distractor_ids = train_ids[num_train + num_test_landmarks:][:config.num_train_distractors]
    test_distractor_ids = train_ids[num_train + num_test_landmarks + config.num_train_distractors:]
    train_ids = train_ids[:num_train]
    total = len(train_ids) + len(test_ids) + len(distractor_ids) + len(test_distractor_ids)
    done = 0

    def write(path: str, image: Image.Image, rng: np.random.Generator) -> None:
        nonlocal done
        io_utils.write_bytes(io_utils.join(config.output_dir, path), encode_jpeg(image, rng))
        done += 1
        if progress is not None:
            progress(done, total)

    train_rows, solution_rows = [], []
    for class_position in range(num_classes):
        landmark_id = landmark_ids[class_position]
        for view in range(config.train_per_class):
            index = class_position * config.train_per_class + view
            rng = _image_rng(config.seed, _ROLE_TRAIN, index)
            scene = class_photo(class_position, _aux_rng(config.seed, _ROLE_TRAIN, index))
            url = f"images/train/{train_ids[index]}.jpg"
            view_image = render_view(scene, rng, TRAIN_VIEW, config.min_size, config.max_size)
            write(url, view_image, rng)
            train_rows.append((train_ids[index], url, landmark_id))
        for view in range(config.test_per_class):
            index = class_position * config.test_per_class + view
            rng = _image_rng(config.seed, _ROLE_TEST, index)
            aux = _aux_rng(config.seed, _ROLE_TEST, index)
            scene = class_photo(class_position, aux)  # first: independent of the fractions
            url = f"images/test/{test_ids[index]}.jpg"
            view_image = render_view(scene, rng, test_view, config.min_size, config.max_size,
                                     test_extras(aux, "landmarks"))
            write(url, view_image, rng)
            solution_rows.append((test_ids[index], url, str(landmark_id)))

    kind_counts: dict[str, dict[str, int]] = {
        split: {} if legacy else {kind: 0 for kind in HARD_DISTRACTOR_KINDS}
        for split in ("train", "test")}
    for split, role, ids, folder, params in (
            ("train", _ROLE_TRAIN_DISTRACTOR, distractor_ids, "distractors", TRAIN_VIEW),
            ("test", _ROLE_TEST_DISTRACTOR, test_distractor_ids, "images/test", test_view)):
        for index, image_id in enumerate(ids):
            rng = _image_rng(config.seed, role, index)
            aux = _aux_rng(config.seed, role, index)
            extras = test_extras(aux, "distractors") if split == "test" else ViewExtras()
            if is_hard_distractor(index, config.hard_distractor_fraction):
                ordinal = math.floor(index * config.hard_distractor_fraction)
                kind = HARD_DISTRACTOR_KINDS[(ordinal + role) % len(HARD_DISTRACTOR_KINDS)]
                landmark_photo = class_photo(int(aux.integers(0, num_classes)), aux)
                scene = hard_distractor_scene(kind, rng, landmark_photo, distractor_photos)
            else:
                # Kinds take turns, so even a handful of distractors covers several kinds; the
                # turn counts plain distractors only (without hard ones: the index).
                plain = index - math.floor(index * config.hard_distractor_fraction)
                kind = DISTRACTOR_KINDS[(plain + config.seed + role) % len(DISTRACTOR_KINDS)]
                scene = distractor_scene(kind, rng, distractor_photos)
            url = f"{folder}/{image_id}.jpg"
            write(url, render_view(scene, rng, params, config.min_size, config.max_size, extras),
                  rng)
            kind_counts[split][kind] = kind_counts[split].get(kind, 0) + 1
            if split == "test":
                solution_rows.append((image_id, url, ""))

    train_rows.sort()
    solution_rows.sort()
    io_utils.write_text(io_utils.join(config.output_dir, "train.csv"),
                        _csv("id,url,landmark_id", train_rows))
    io_utils.write_text(io_utils.join(config.output_dir, "test.csv"),
                        _csv("id,url", [(image_id, url) for image_id, url, _ in solution_rows]))
    io_utils.write_text(
        io_utils.join(config.output_dir, "test_solution.csv"),
        _csv("id,landmarks,Usage", [(image_id, landmarks, "Public" if i % 2 == 0 else "Private")
                                    for i, (image_id, _, landmarks) in enumerate(solution_rows)]))
    class_table = []
    for landmark_id, position in sorted(zip(landmark_ids, range(num_classes))):
        entry = {"landmark_id": landmark_id, "source": class_sources[position],
                 "train_images": config.train_per_class, "test_images": config.test_per_class}
        if scene_classes:
            entry.update(name=class_names[position], photos=len(scene_classes[position].photos))
        class_table.append(entry)
    summary = {
        "config": _config_record(config, num_classes),
        "counts": {
            "classes": num_classes,
            "train_images": len(train_rows),
            "train_distractors": len(distractor_ids),
            "test_images": len(solution_rows),
            "test_landmark_images": len(test_ids),
            "test_distractors": len(test_distractor_ids),
        },
        "classes": class_table,
        "distractor_kinds": kind_counts,
    }
    if not legacy:
        summary["hard_views"] = hard_views
    if config.scenes_dir is not None:
        summary["counts"]["skipped_photos"] = len(skipped)
        summary["skipped_photos"] = skipped
    io_utils.write_json(io_utils.join(config.output_dir, "toy_data.json"), summary)
    io_utils.write_text(io_utils.join(config.output_dir, "README.txt"), readme_text(config))
    io_utils.write_success_marker(config.output_dir)
    return {**summary, "seconds": round(time.monotonic() - start, 3)}


def parse_scale_range(text: str) -> tuple[float, float]:
    """``"MIN,MAX"`` -> ``(MIN, MAX)`` for ``--scale_range`` (argparse type)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers MIN,MAX such as 0.25,2.0, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``landmarks-toy-data`` argument parser; defaults come from :class:`ToyDataConfig`
    and :data:`DIFFICULTIES` (a preset's setting left ``None`` here is resolved by the config)."""
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-toy-data", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples (the defaults take ~8 s on one core):\n"
               "  landmarks-toy-data --output_dir /tmp/toy --seed 0\n"
               "  landmarks-toy-data --output_dir /tmp/toy_hard --seed 0 --difficulty hard\n"
               "  landmarks-toy-data --output_dir /tmp/mine --scenes_dir ~/photos/landmarks\n"
               "then ingest /tmp/toy/train.csv with --distractor_dir /tmp/toy/distractors.\n"
               "--difficulty hard = --train_per_class 4 --perspective 0.25 --rotation 30\n"
               "  --scale_range 0.25,2.0 --partial_fraction 0.35 --occluder_fraction 0.4\n"
               "  --hard_distractor_fraction 0.5 (a flag given explicitly wins).")
    defaults = ToyDataConfig(output_dir="unused")
    standard, hard = DIFFICULTIES["standard"], DIFFICULTIES["hard"]
    parser.add_argument("--output_dir", required=True,
                        help="folder to write, local or gs:// (required)")
    parser.add_argument(
        "--num_classes", type=int, default=None,
        help=f"landmark classes: skimage photos (at most {len(CLASS_SOURCES)}), or with "
             f"--scenes_dir the first N of the folder's classes by name (default: "
             f"{DEFAULT_NUM_CLASSES}; with --scenes_dir: all)")
    parser.add_argument(
        "--train_per_class", type=int, default=None,
        help=f"training views per class (images/train, train.csv) (default: "
             f"{standard.train_per_class}; hard: {hard.train_per_class})")
    helps = {
        "test_per_class": "test views per class (images/test)",
        "num_train_distractors": "training non-landmark images (distractors/)",
        "num_test_distractors": "test non-landmark images (images/test, empty landmarks)",
        "min_size": "smallest long side of an image, pixels",
        "max_size": "largest long side of an image, pixels",
        "seed": "random seed; the same seed and options give byte-identical files",
    }
    for name, text in helps.items():
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the output folder's contents first (default: off, a "
                             "non-empty folder is refused)")
    parser.add_argument(
        "--scenes_dir", default=None,
        help="local folder of your own photos: each photo file directly in it, and each "
             "sub-folder of photos, is one landmark class (.jpg .jpeg .png .webp .bmp .tif "
             ".tiff, any case; EXIF orientation applied; unreadable photos skipped with a "
             "warning and listed in toy_data.json) (default: none, skimage photos)")
    parser.add_argument(
        "--difficulty", choices=sorted(DIFFICULTIES), default="standard",
        help="preset of the settings below: standard = the classic set (unchanged output); "
             "hard = strong perspective, partial and occluded test views, wider zoom, few "
             "training views, hard distractors. A flag given explicitly wins "
             "(default: %(default)s)")
    presets = {
        "perspective": ("test views: largest corner jitter (tilt) as a fraction of the viewed "
                        "region's side, in [0, 0.4]"),
        "rotation": "test views: largest in-plane rotation, degrees",
        "partial_fraction": (f"share of test views showing only {PARTIAL_AREA[0]:g}-"
                             f"{PARTIAL_AREA[1]:g} of the source's area"),
        "occluder_fraction": (f"share of test views with an opaque shape or photo patch over "
                              f"{OCCLUDER_AREA[0]:g}-{OCCLUDER_AREA[1]:g} of the view"),
        "hard_distractor_fraction": ("share of training and of test distractors that are hard: "
                                     "shuffled tiles of a class photo, or other content "
                                     "recoloured to a class photo's colour histogram"),
    }
    for name, text in presets.items():
        parser.add_argument(f"--{name}", type=float, default=None,
                            help=f"{text} (default: {getattr(standard, name):g}; hard: "
                                 f"{getattr(hard, name):g})")
    parser.add_argument(
        "--scale_range", type=parse_scale_range, default=None, metavar="MIN,MAX",
        help=f"test views: side of the viewed region over the source's, uniform; above 1 the "
             f"view is zoomed out (default: {standard.scale_range[0]:g},"
             f"{standard.scale_range[1]:g}; hard: {hard.scale_range[0]:g},"
             f"{hard.scale_range[1]:g})")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> ToyDataConfig:
    """Command line -> :class:`ToyDataConfig` (``InputError`` for bad or unknown flags, values)."""
    args = build_parser().parse_args(argv)
    return ToyDataConfig(**vars(args))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: writes the dataset and prints a one-line summary.

    Returns 0; 2 for bad flags or values (one ``landmarks-toy-data: error:`` line on stderr);
    1 for an internal error (a bug: traceback logged), see :func:`beam_pipelines.cli.run_command`.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return cli.run_command("landmarks-toy-data", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    """Generates the dataset and prints its summary line; returns 0."""
    config = parse_args(argv)
    summary = generate(config, progress=lambda done, total: logger.info(
        "%d/%d images", done, total) if done % 25 == 0 or done == total else None)
    counts = summary["counts"]
    print(f"wrote {counts['train_images']} training views of {counts['classes']} landmarks, "
          f"{counts['train_distractors']} training distractors, "
          f"{counts['test_images']} test images "
          f"({counts['test_landmark_images']} landmarks) to {config.output_dir} in "
          f"{summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
