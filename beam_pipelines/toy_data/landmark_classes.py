"""The landmark classes of a run and their photos: skimage photos, or ``--scenes_dir``'s.

Also which photos distractors and occluders may show: never a class's (only hard distractors
use class photos, on purpose).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from beam_pipelines.toy_data import scenes_dir, skimage_photos


@dataclasses.dataclass(frozen=True)
class LandmarkClasses:
    """The classes in class order (position ``p`` is the ``p``-th landmark id drawn).

    ``names``: class names (skimage image or ``--scenes_dir`` class name); ``sources``: where
    each comes from, as written in toy_data.json; ``photos``: per class, the keys ``load``
    turns into RGB uint8 ``[H, W, 3]`` (one skimage name, or the paths of a class's readable
    photos); ``from_scenes_dir``: whether the classes are ``--scenes_dir``'s;
    ``distractor_photos``: the non-class photos, RGB uint8 ``[H, W, 3]`` each.
    """

    names: tuple[str, ...]
    sources: tuple[str, ...]
    photos: tuple[tuple[str, ...], ...]
    load: Callable[[str], np.ndarray]
    from_scenes_dir: bool
    distractor_photos: tuple[np.ndarray, ...]

    @property
    def count(self) -> int:
        """How many classes."""
        return len(self.names)

    def photo(self, position: int, aux: np.random.Generator) -> np.ndarray:
        """A photo of class ``position``; with several, one drawn from the aux stream (with
        one, nothing is drawn: the standard streams stay as they were)."""
        photos = self.photos[position]
        return self.load(photos[int(aux.integers(0, len(photos)))] if len(photos) > 1
                         else photos[0])


def skimage_classes(num_classes: int) -> LandmarkClasses:
    """The first ``num_classes`` of :data:`~.skimage_photos.CLASS_SOURCES`; distractors use
    the remaining class photos and every other skimage photo."""
    names = skimage_photos.CLASS_SOURCES[:num_classes]
    distractor_photos = tuple(
        skimage_photos.load_source(name)
        for name in skimage_photos.CLASS_SOURCES[num_classes:] + skimage_photos.OTHER_SOURCES)
    pixels = {name: skimage_photos.load_source(name) for name in names}
    return LandmarkClasses(
        names=tuple(names), sources=tuple(f"skimage.data.{name}" for name in names),
        photos=tuple((name,) for name in names), load=pixels.__getitem__,
        from_scenes_dir=False, distractor_photos=distractor_photos)


def scene_dir_classes(usable: Sequence[scenes_dir.SceneClass],
                      load: Callable[[str], np.ndarray]) -> LandmarkClasses:
    """``--scenes_dir``'s ``usable`` classes, their photos read by ``load`` (cache it: a photo
    is read for every view that shows it)."""
    # No user photo is a class's and a distractor's: distractors use every skimage photo.
    distractor_photos = tuple(
        skimage_photos.load_source(name)
        for name in skimage_photos.CLASS_SOURCES + skimage_photos.OTHER_SOURCES)
    return LandmarkClasses(
        names=tuple(scene_class.name for scene_class in usable),
        sources=tuple(scene_class.source for scene_class in usable),
        photos=tuple(scene_class.photos for scene_class in usable), load=load,
        from_scenes_dir=True, distractor_photos=distractor_photos)
