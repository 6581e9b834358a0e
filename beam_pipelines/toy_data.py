"""`landmarks-toy-data`: a small, realistic landmark dataset that needs no network.

Every landmark class is one real photograph shipped with scikit-image (``skimage.data``), seen
from many viewpoints: a random perspective view of part of the photo (crop, scale, rotation,
tilt, sometimes zoomed out so the scene's surroundings show), then lighting and colour changes,
blur, sensor noise, and JPEG compression at a random quality, at a random size up to
``--max_size`` pixels on the long side. Test views are harder (stronger warps, smaller crops).
Distractors (non-landmarks) go through exactly the same camera model, but their scenes are other
content: procedural textures, shapes, gratings, and crops of ``skimage.data`` images that are not
classes (grayscale ones often tinted, so colour alone does not separate them from landmarks).

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
``(seed, role, index)``.

Example (the defaults take ~8 s on one core)::

    landmarks-toy-data --output_dir /tmp/toy --seed 0
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import sys
import time
from typing import Callable, Optional, Sequence

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

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


@dataclasses.dataclass(frozen=True)
class ToyDataConfig:
    """What to generate. Sizes are pixels on an image's long side."""

    output_dir: str
    num_classes: int = 6
    train_per_class: int = 16
    test_per_class: int = 4
    num_train_distractors: int = 16
    num_test_distractors: int = 12
    min_size: int = 300
    max_size: int = 1600
    seed: int = 0
    overwrite: bool = False

    def __post_init__(self):
        if not self.output_dir:
            raise InputError("output_dir is required")
        if not 1 <= self.num_classes <= len(CLASS_SOURCES):
            raise InputError(f"num_classes must be in [1, {len(CLASS_SOURCES)}] (one skimage "
                             f"photo per class), got {self.num_classes}")
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


def view_corners(source_shape: Sequence[int], out_size: tuple[int, int], params: ViewParams,
                 rng: np.random.Generator) -> np.ndarray:
    """Corners ``[4, 2]`` (x, y; TL, TR, BR, BL) in the source of the region a view shows."""
    height, width = source_shape[:2]
    out_w, out_h = out_size
    scale = rng.uniform(params.min_scale, params.max_scale)
    region_w = scale * width
    region_h = region_w * out_h / out_w
    if region_h > scale * height * 1.15:  # keep the region's height in proportion too
        region_h = scale * height * 1.15
        region_w = region_h * out_w / out_h
    # Centre such that the region mostly overlaps the photo (a zoomed-out view is centred).
    centre_x = width / 2 + rng.uniform(-1, 1) * max(0.0, (width - region_w) / 2)
    centre_y = height / 2 + rng.uniform(-1, 1) * max(0.0, (height - region_h) / 2)
    half = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], np.float64) * [region_w / 2, region_h / 2]
    angle = math.radians(rng.uniform(-params.max_rotation, params.max_rotation))
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    corners = half @ rotation.T + [centre_x, centre_y]
    tilt = rng.uniform(-params.max_tilt, params.max_tilt, size=(4, 2)) * [region_w, region_h]
    return corners + tilt


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


# ----------------------------------------------------------------------------- camera model

def render_view(scene: np.ndarray, rng: np.random.Generator, params: ViewParams, min_size: int,
                max_size: int) -> Image.Image:
    """A photograph of ``scene`` (RGB uint8 ``[H, W, 3]``) from a random viewpoint.

    Geometry (perspective warp of a random region, surroundings filled with a background
    scene), then light (per-channel gain, gamma, brightness, contrast as one lookup table),
    saturation, blur and sensor noise. Returns an RGB image whose long side is in
    ``[min_size, max_size]``.
    """
    out_w, out_h = output_size(scene.shape, rng, min_size, max_size)
    corners = view_corners(scene.shape, (out_w, out_h), params, rng)
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


def generate(config: ToyDataConfig, progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Writes the dataset described by ``config``; returns the summary written to toy_data.json.

    Args:
      config: what to write and where.
      progress: called as ``progress(done, total)`` after each image (for logging).

    Returns:
      ``{"config": ..., "counts": ..., "classes": [...], "distractor_kinds": ...,
      "seconds": ...}``; ``seconds`` is not written to the file (it would break byte-identity).
    """
    start = time.monotonic()
    io_utils.prepare_output_dir(config.output_dir, overwrite=config.overwrite)
    master = np.random.default_rng(np.random.SeedSequence([config.seed, 0]))

    class_names = CLASS_SOURCES[:config.num_classes]
    landmark_ids = [int(i) for i in master.choice(np.arange(1, 20000), size=config.num_classes,
                                                  replace=False)]
    sources = {name: load_source(name) for name in class_names}
    distractor_photos = [load_source(name)
                         for name in CLASS_SOURCES[config.num_classes:] + OTHER_SOURCES]

    num_train = config.num_classes * config.train_per_class
    num_test_landmarks = config.num_classes * config.test_per_class
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
    for class_position, name in enumerate(class_names):
        landmark_id = landmark_ids[class_position]
        for view in range(config.train_per_class):
            index = class_position * config.train_per_class + view
            rng = _image_rng(config.seed, _ROLE_TRAIN, index)
            url = f"images/train/{train_ids[index]}.jpg"
            view_image = render_view(sources[name], rng, TRAIN_VIEW, config.min_size, config.max_size)
            write(url, view_image, rng)
            train_rows.append((train_ids[index], url, landmark_id))
        for view in range(config.test_per_class):
            index = class_position * config.test_per_class + view
            rng = _image_rng(config.seed, _ROLE_TEST, index)
            url = f"images/test/{test_ids[index]}.jpg"
            view_image = render_view(sources[name], rng, TEST_VIEW, config.min_size, config.max_size)
            write(url, view_image, rng)
            solution_rows.append((test_ids[index], url, str(landmark_id)))

    kind_counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for split, role, ids, folder, params in (
            ("train", _ROLE_TRAIN_DISTRACTOR, distractor_ids, "distractors", TRAIN_VIEW),
            ("test", _ROLE_TEST_DISTRACTOR, test_distractor_ids, "images/test", TEST_VIEW)):
        for index, image_id in enumerate(ids):
            rng = _image_rng(config.seed, role, index)
            # Kinds take turns, so even a handful of distractors covers several kinds.
            kind = DISTRACTOR_KINDS[(index + config.seed + role) % len(DISTRACTOR_KINDS)]
            scene = distractor_scene(kind, rng, distractor_photos)
            url = f"{folder}/{image_id}.jpg"
            write(url, render_view(scene, rng, params, config.min_size, config.max_size), rng)
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
    summary = {
        "config": {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in ("output_dir", "overwrite")},
        "counts": {
            "classes": config.num_classes,
            "train_images": len(train_rows),
            "train_distractors": len(distractor_ids),
            "test_images": len(solution_rows),
            "test_landmark_images": len(test_ids),
            "test_distractors": len(test_distractor_ids),
        },
        "classes": [
            {"landmark_id": landmark_id, "source": f"skimage.data.{name}",
             "train_images": config.train_per_class, "test_images": config.test_per_class}
            for landmark_id, name in sorted(zip(landmark_ids, class_names))
        ],
        "distractor_kinds": kind_counts,
    }
    io_utils.write_json(io_utils.join(config.output_dir, "toy_data.json"), summary)
    io_utils.write_text(io_utils.join(config.output_dir, "README.txt"), README)
    io_utils.write_success_marker(config.output_dir)
    return {**summary, "seconds": round(time.monotonic() - start, 3)}


def build_parser() -> argparse.ArgumentParser:
    """The ``landmarks-toy-data`` argument parser; defaults come from :class:`ToyDataConfig`."""
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-toy-data", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example (the defaults take ~8 s on one core):\n"
               "  landmarks-toy-data --output_dir /tmp/toy --seed 0\n"
               "then ingest /tmp/toy/train.csv with --distractor_dir /tmp/toy/distractors.")
    defaults = ToyDataConfig(output_dir="unused")
    parser.add_argument("--output_dir", required=True,
                        help="folder to write, local or gs:// (required)")
    helps = {
        "num_classes": f"landmark classes, one skimage photo each (at most {len(CLASS_SOURCES)})",
        "train_per_class": "training views per class (images/train, train.csv)",
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
