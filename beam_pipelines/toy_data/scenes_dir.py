"""``--scenes_dir``: your own photos as landmark classes, found and read from a local folder.

Every photo file directly in the folder is one class named by its stem; every sub-folder with
photo files directly in it is one class named by the folder (deeper folders are ignored). A
photo that cannot be read is skipped with a warning; a class left without photos is dropped.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps

from tfrecords_schema import InputError

logger = logging.getLogger(__name__)

# Which files are photos, and the working size they are read at.
SCENE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
SCENE_MAX_SIDE = 2048  # pixels on the long side; larger photos are shrunk before rendering
SCENE_MIN_SIDE = 32  # pixels on the short side; smaller files are skipped as unusable


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


def _scan_classes(scenes_dir: str) -> list[SceneClass]:
    """Every candidate class of ``scenes_dir`` in directory-entry name order (may clash)."""
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
    return classes


def _check_unique_names(scenes_dir: str, classes: list[SceneClass]) -> None:
    """Raises InputError naming the first (by name) class name that two sources share."""
    by_name: dict[str, list[str]] = {}
    for scene_class in classes:
        by_name.setdefault(scene_class.name, []).append(scene_class.source)
    clashes = {name: sources for name, sources in by_name.items() if len(sources) > 1}
    if clashes:
        name, sources = sorted(clashes.items())[0]
        raise InputError(f"scenes_dir {scenes_dir}: {len(sources)} classes named {name!r} "
                         f"({', '.join(sources)}); rename all but one")


def find_scene_classes(scenes_dir: str) -> list[SceneClass]:
    """The candidate classes of ``scenes_dir``, sorted by name (no photo is opened here).

    Raises:
      InputError: the folder is missing, holds no photo (directly or one level down), or two
        classes share a name (``a.jpg`` and ``a/``, or ``a.jpg`` and ``a.png``).
    """
    if not os.path.isdir(scenes_dir):
        raise InputError(f"scenes_dir {scenes_dir}: no such folder")
    classes = _scan_classes(scenes_dir)
    if not classes:
        raise InputError(f"scenes_dir {scenes_dir}: no photos ({' '.join(SCENE_EXTENSIONS)}) "
                         f"in it or in its sub-folders")
    _check_unique_names(scenes_dir, classes)
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


def _readable_photos(scene_class: SceneClass, scenes_dir: str, load: Callable[[str], np.ndarray],
                     skipped: list[dict]) -> list[str]:
    """The photos of ``scene_class`` that ``load`` reads; each failure is logged and appended
    to ``skipped`` as ``{"source": <path relative to scenes_dir>, "error": <message>}``."""
    readable = []
    for photo in scene_class.photos:
        try:
            load(photo)
        except InputError as error:
            logger.warning("skipping a photo of class %r: %s", scene_class.name, error)
            skipped.append({"source": os.path.relpath(photo, scenes_dir), "error": str(error)})
            continue
        readable.append(photo)
    return readable


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
        readable = _readable_photos(scene_class, scenes_dir, load, skipped)
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
