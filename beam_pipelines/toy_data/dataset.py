"""Writes a whole toy dataset: classes and ids, every image through the camera, the manifests.

:func:`generate` reads top-down: check the input, claim the output folder, pick the classes,
draw the ids, write the landmark views class by class, then the distractors, then the CSVs
and toy_data.json. Each image draws from its own streams (:mod:`.streams`), so the order in
which images are written changes no byte.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, Optional, Sequence

import numpy as np
from PIL import Image

from beam_pipelines import io_utils
from beam_pipelines.toy_data import (camera, config as config_lib, distractors, hard_distractors,
                                     landmark_classes, manifests, scenes_dir, streams,
                                     view_geometry)

Progress = Callable[[int, int], None]
_SPLITS = ("landmarks", "distractors")  # of test views, as counted under "hard_views"


class _ImageWriter:
    """Encodes each view as JPEG under ``output_dir`` and reports ``progress(done, total)``."""

    def __init__(self, output_dir: str, total: int, progress: Optional[Progress]):
        self._output_dir = output_dir
        self._total = total
        self._progress = progress
        self._done = 0

    def write(self, path: str, image: Image.Image, rng: np.random.Generator) -> None:
        """Writes ``image`` to ``path`` (relative to the output folder); the JPEG quality is
        the view's last draw from its stream ``rng``."""
        io_utils.write_bytes(io_utils.join(self._output_dir, path),
                             camera.encode_jpeg(image, rng))
        self._done += 1
        if self._progress is not None:
            self._progress(self._done, self._total)


class _TestViewExtras:
    """Draws each test view's extras (partial view, occluder) and counts them per split
    (``counts``: toy_data.json's ``hard_views``). Occluder patches come from
    ``occluder_photos`` (RGB uint8 ``[H, W, 3]`` each; non-class photos)."""

    def __init__(self, config: config_lib.ToyDataConfig,
                 occluder_photos: Sequence[np.ndarray]):
        self._partial_fraction = config.partial_fraction
        self._occluder_fraction = config.occluder_fraction
        self._occluder_photos = occluder_photos
        self.counts = {split: {"partial": 0, "occluded": 0} for split in _SPLITS}

    def draw(self, aux: np.random.Generator, split: str) -> camera.ViewExtras:
        """The extras of one test view of ``split``, from its aux stream; with both fractions
        0 nothing is drawn (the standard generator's views)."""
        if not (self._partial_fraction > 0 or self._occluder_fraction > 0):
            return camera.ViewExtras()
        extras = camera.draw_view_extras(aux, self._partial_fraction, self._occluder_fraction,
                                         self._occluder_photos)
        self.counts[split]["partial"] += extras.area_fraction is not None
        self.counts[split]["occluded"] += extras.occluder is not None
        return extras


@dataclasses.dataclass(frozen=True)
class _Run:
    """Everything the image loops share."""

    config: config_lib.ToyDataConfig
    classes: landmark_classes.LandmarkClasses
    landmark_ids: list[int]
    ids: streams.ImageIds
    writer: _ImageWriter
    test_extras: _TestViewExtras

    def render(self, scene: np.ndarray, rng: np.random.Generator,
               params: view_geometry.ViewParams,
               extras: camera.ViewExtras = camera.ViewExtras()) -> Image.Image:
        """:func:`~.camera.render_view` at the run's image sizes."""
        return camera.render_view(scene, rng, params, self.config.min_size,
                                  self.config.max_size, extras)


def _training_views(run: _Run, position: int) -> list[tuple[str, str, int]]:
    """Writes class ``position``'s training views; returns their train.csv rows."""
    rows = []
    per_class = run.config.train_per_class
    for view in range(per_class):
        index = position * per_class + view
        rng = streams.image_rng(run.config.seed, streams.ROLE_TRAIN, index)
        scene = run.classes.photo(position,
                                  streams.aux_rng(run.config.seed, streams.ROLE_TRAIN, index))
        url = f"images/train/{run.ids.train[index]}.jpg"
        run.writer.write(url, run.render(scene, rng, view_geometry.TRAIN_VIEW), rng)
        rows.append((run.ids.train[index], url, run.landmark_ids[position]))
    return rows


def _test_views(run: _Run, position: int) -> list[tuple[str, str, str]]:
    """Writes class ``position``'s test views; returns their (id, url, landmarks) rows."""
    rows = []
    per_class = run.config.test_per_class
    for view in range(per_class):
        index = position * per_class + view
        rng = streams.image_rng(run.config.seed, streams.ROLE_TEST, index)
        aux = streams.aux_rng(run.config.seed, streams.ROLE_TEST, index)
        scene = run.classes.photo(position, aux)  # first: independent of the fractions
        url = f"images/test/{run.ids.test[index]}.jpg"
        image = run.render(scene, rng, run.config.test_view, run.test_extras.draw(aux, "landmarks"))
        run.writer.write(url, image, rng)
        rows.append((run.ids.test[index], url, str(run.landmark_ids[position])))
    return rows


def _landmark_views(run: _Run) -> tuple[list[tuple[str, str, int]], list[tuple[str, str, str]]]:
    """Writes every class's training and test views (class by class); returns the train.csv
    rows and the test rows (id, url, landmarks)."""
    train_rows, test_rows = [], []
    for position in range(run.classes.count):
        train_rows += _training_views(run, position)
        test_rows += _test_views(run, position)
    return train_rows, test_rows


def _distractor_scene(run: _Run, index: int, role: int, rng: np.random.Generator,
                      aux: np.random.Generator) -> tuple[str, np.ndarray]:
    """(kind, content) of distractor ``index`` of ``role``, RGB uint8 ``[H, W, 3]``, before the
    camera. A hard one draws its class photo from ``aux``: call this after the view's extras
    were drawn from ``aux``, the order the files have always been made in."""
    fraction = run.config.hard_distractor_fraction
    photos = run.classes.distractor_photos
    if hard_distractors.is_hard_distractor(index, fraction):
        kind = hard_distractors.hard_distractor_kind(index, fraction, role)
        landmark_photo = run.classes.photo(int(aux.integers(0, run.classes.count)), aux)
        return kind, hard_distractors.hard_distractor_scene(kind, rng, landmark_photo, photos)
    kind = distractors.distractor_kind(index, fraction, run.config.seed + role)
    return kind, distractors.distractor_scene(kind, rng, photos)


def _distractors(run: _Run, split: str) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    """Writes the training (``split`` "train", under distractors/) or test ("test", under
    images/test/, through the test camera) distractors; returns the count of each kind and,
    for test, their (id, url, "") rows."""
    if split == "train":
        role, ids, folder = streams.ROLE_TRAIN_DISTRACTOR, run.ids.train_distractors, "distractors"
        params = view_geometry.TRAIN_VIEW
    else:
        role, ids, folder = streams.ROLE_TEST_DISTRACTOR, run.ids.test_distractors, "images/test"
        params = run.config.test_view
    kinds = {} if run.config.legacy_output else {
        kind: 0 for kind in hard_distractors.HARD_DISTRACTOR_KINDS}
    rows = []
    for index, image_id in enumerate(ids):
        rng = streams.image_rng(run.config.seed, role, index)
        aux = streams.aux_rng(run.config.seed, role, index)
        extras = (run.test_extras.draw(aux, "distractors") if split == "test"
                  else camera.ViewExtras())
        kind, scene = _distractor_scene(run, index, role, rng, aux)
        url = f"{folder}/{image_id}.jpg"
        run.writer.write(url, run.render(scene, rng, params, extras), rng)
        kinds[kind] = kinds.get(kind, 0) + 1
        if split == "test":
            rows.append((image_id, url, ""))
    return kinds, rows


def _classes(config: config_lib.ToyDataConfig, usable: list[scenes_dir.SceneClass],
             load_photo: Callable[[str], np.ndarray]) -> landmark_classes.LandmarkClasses:
    """``--scenes_dir``'s usable classes, or the skimage ones."""
    if usable:
        return landmark_classes.scene_dir_classes(usable, load_photo)
    return landmark_classes.skimage_classes(config.num_classes)


def generate(config: config_lib.ToyDataConfig, progress: Optional[Progress] = None) -> dict:
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
      InputError: a bad ``scenes_dir`` (see :func:`~.scenes_dir.usable_scene_classes`), checked
        before the output folder is touched; or a non-empty output folder without ``overwrite``.
    """
    start = time.monotonic()
    load_photo = functools.lru_cache(maxsize=16)(scenes_dir.load_scene_photo)
    usable, skipped = [], []
    if config.scenes_dir is not None:
        usable, skipped = scenes_dir.usable_scene_classes(config.scenes_dir, config.num_classes,
                                                          load_photo)
    io_utils.prepare_output_dir(config.output_dir, overwrite=config.overwrite)
    classes = _classes(config, usable, load_photo)
    master = streams.master_rng(config.seed)
    landmark_ids = streams.draw_landmark_ids(master, classes.count)
    ids = streams.draw_image_ids(
        master, classes.count * config.train_per_class, classes.count * config.test_per_class,
        config.num_train_distractors, config.num_test_distractors)
    run = _Run(config, classes, landmark_ids, ids,
               _ImageWriter(config.output_dir, ids.total, progress),
               _TestViewExtras(config, classes.distractor_photos))

    train_rows, test_rows = _landmark_views(run)
    train_kinds, _ = _distractors(run, "train")
    test_kinds, distractor_rows = _distractors(run, "test")

    manifests.write_csvs(config.output_dir, train_rows, test_rows + distractor_rows)
    record = manifests.summary(config, classes, landmark_ids, ids,
                               {"train": train_kinds, "test": test_kinds},
                               run.test_extras.counts, skipped)
    manifests.write_summary(config, record)
    return {**record, "seconds": round(time.monotonic() - start, 3)}
