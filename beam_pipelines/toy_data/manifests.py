"""What a run writes besides images: the three CSVs, toy_data.json, README.txt, _SUCCESS.

A run with standard settings and skimage classes (``config.legacy_output``) writes the old
toy_data.json and README.txt (no new keys), so its files stay byte-identical to older versions'.
"""

from __future__ import annotations

import os
from typing import Sequence

from beam_pipelines import io_utils
from beam_pipelines.toy_data import (config as config_lib, hard_distractors, landmark_classes,
                                     occluders, scenes_dir, streams, view_geometry)

README = """Toy landmark dataset written by landmarks-toy-data (see toy_data.json for the options).

images/train/   landmark training views, listed in train.csv (id,url,landmark_id)
images/test/    test views (landmarks and non-landmarks), listed in test.csv (id,url)
distractors/    training non-landmarks: pass this folder to landmarks-ingest --distractor_dir
test_solution.csv  id,landmarks,Usage (empty landmarks = no landmark); for landmarks-evaluate
URLs are relative to this folder. Each class is one scikit-image photograph.
"""


def readme_text(config: config_lib.ToyDataConfig) -> str:
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
    partial_low, partial_high = view_geometry.PARTIAL_AREA
    occluder_low, occluder_high = occluders.OCCLUDER_AREA
    return text + (
        f"\nDifficulty {config.difficulty}: {config.train_per_class} training views per class. "
        f"Test views (landmarks and\nnon-landmarks alike): tilt up to {config.perspective:g} of "
        f"the region's side, rotation up to\n{config.rotation:g} degrees, region side "
        f"{low:g}-{high:g} x the source's; a share of {config.partial_fraction:g} show\n"
        f"only {partial_low:g}-{partial_high:g} of the source's area, "
        f"{config.occluder_fraction:g} have an occluder over "
        f"{occluder_low:g}-{occluder_high:g} of the view\n(counted under \"hard_views\" "
        f"in toy_data.json). A share of {config.hard_distractor_fraction:g} of the "
        f"distractors\nare hard: tile_shuffle (a class photo's tiles, shuffled) or recolour "
        f"(other content\nwith a class photo's colour histogram), counted under "
        f"\"distractor_kinds\".\n")


def config_record(config: config_lib.ToyDataConfig, num_classes: int) -> dict:
    """toy_data.json's ``config``: every resolved setting (a standard run: the old keys only);
    ``num_classes`` is the number of classes made (with ``scenes_dir``, maybe fewer asked)."""
    record = {name: getattr(config, name) for name in (
        "num_classes", "train_per_class", "test_per_class", "num_train_distractors",
        "num_test_distractors", "min_size", "max_size", "seed")}
    record["num_classes"] = num_classes
    if config.legacy_output:
        return record
    record.update(
        difficulty=config.difficulty, perspective=config.perspective, rotation=config.rotation,
        scale_range=list(config.scale_range), partial_fraction=config.partial_fraction,
        partial_area=list(view_geometry.PARTIAL_AREA), occluder_fraction=config.occluder_fraction,
        occluder_area=list(occluders.OCCLUDER_AREA),
        occluder_shapes=list(occluders.OCCLUDER_SHAPES),
        hard_distractor_fraction=config.hard_distractor_fraction,
        hard_distractor_kinds=list(hard_distractors.HARD_DISTRACTOR_KINDS),
        tiles_per_side=list(hard_distractors.TILES_PER_SIDE),
        scenes_dir=None if config.scenes_dir is None else os.path.abspath(config.scenes_dir))
    if config.scenes_dir is not None:
        record.update(num_classes_requested=config.num_classes,
                      scene_max_side=scenes_dir.SCENE_MAX_SIDE,
                      scene_extensions=list(scenes_dir.SCENE_EXTENSIONS))
    return record


def _csv(header: str, rows: Sequence[Sequence[object]]) -> str:
    """CSV text: ``header``, then one line per row (fields never hold commas or quotes)."""
    return "\n".join([header] + [",".join(str(field) for field in row) for row in rows]) + "\n"


def write_csvs(output_dir: str, train_rows: Sequence[tuple[str, str, int]],
               solution_rows: Sequence[tuple[str, str, str]]) -> None:
    """train.csv (id,url,landmark_id), test.csv (id,url) and test_solution.csv
    (id,landmarks,Usage), all sorted by id.

    ``solution_rows``: (id, url, landmarks) of every test image, landmarks ``""`` for a
    non-landmark. Usage alternates Public/Private along the sorted rows (GLDv2's two splits).
    """
    train_rows, solution_rows = sorted(train_rows), sorted(solution_rows)
    io_utils.write_text(io_utils.join(output_dir, "train.csv"),
                        _csv("id,url,landmark_id", train_rows))
    io_utils.write_text(io_utils.join(output_dir, "test.csv"),
                        _csv("id,url", [(image_id, url) for image_id, url, _ in solution_rows]))
    io_utils.write_text(
        io_utils.join(output_dir, "test_solution.csv"),
        _csv("id,landmarks,Usage", [(image_id, landmarks, "Public" if i % 2 == 0 else "Private")
                                    for i, (image_id, _, landmarks) in enumerate(solution_rows)]))


def class_table(config: config_lib.ToyDataConfig, classes: landmark_classes.LandmarkClasses,
                landmark_ids: Sequence[int]) -> list[dict]:
    """toy_data.json's ``classes``: one entry per class, by landmark id (with ``scenes_dir``
    also its name and how many readable photos it has)."""
    table = []
    for landmark_id, position in sorted(zip(landmark_ids, range(classes.count))):
        entry = {"landmark_id": landmark_id, "source": classes.sources[position],
                 "train_images": config.train_per_class, "test_images": config.test_per_class}
        if classes.from_scenes_dir:
            entry.update(name=classes.names[position], photos=len(classes.photos[position]))
        table.append(entry)
    return table


def summary(config: config_lib.ToyDataConfig, classes: landmark_classes.LandmarkClasses,
            landmark_ids: Sequence[int], ids: streams.ImageIds, distractor_kinds: dict,
            hard_views: dict, skipped: list[dict]) -> dict:
    """toy_data.json's content (see :func:`beam_pipelines.toy_data.dataset.generate`).

    ``distractor_kinds``: per split, images of each distractor kind; ``hard_views``: per split,
    partial and occluded test views (written unless the run is standard); ``skipped``: the
    ``--scenes_dir`` photos that could not be read (written with ``scenes_dir``).
    """
    record = {
        "config": config_record(config, classes.count),
        "counts": {
            "classes": classes.count,
            "train_images": len(ids.train),
            "train_distractors": len(ids.train_distractors),
            "test_images": len(ids.test) + len(ids.test_distractors),
            "test_landmark_images": len(ids.test),
            "test_distractors": len(ids.test_distractors),
        },
        "classes": class_table(config, classes, landmark_ids),
        "distractor_kinds": distractor_kinds,
    }
    if not config.legacy_output:
        record["hard_views"] = hard_views
    if config.scenes_dir is not None:
        record["counts"]["skipped_photos"] = len(skipped)
        record["skipped_photos"] = skipped
    return record


def write_summary(config: config_lib.ToyDataConfig, record: dict) -> None:
    """toy_data.json and README.txt, then _SUCCESS (last: the folder is complete)."""
    io_utils.write_json(io_utils.join(config.output_dir, "toy_data.json"), record)
    io_utils.write_text(io_utils.join(config.output_dir, "README.txt"), readme_text(config))
    io_utils.write_success_marker(config.output_dir)
