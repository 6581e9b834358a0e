"""The stages that ``landmarks-demo`` and ``landmarks-benchmark`` run, shared by both.

Each stage is the real job, called in this process with the flags a user would type, on one
run folder ``root`` laid out as::

    <root>/toy_data/            landmarks-toy-data
    <root>/ingest_train/        landmarks-ingest of train.csv (+ distractors, 20 % dev split)
    <root>/ingest_test/         landmarks-ingest of test.csv
    <root>/model/               landmarks-train
    <root>/<predict output>/    landmarks-predict (one folder per predict run)
    <root>/<evaluate output>/   landmarks-evaluate (one folder per evaluation)
    <root>/reference_features/  the reference-feature cache every predict run of ``root`` shares

Every stage function returns ``(result, detail)``: the job's own summary and a one-line
description for the log; :func:`run_stage` times it, logs it and records it. A job's error
propagates unchanged (``InputError``, ``CommandFailure`` with its exit code, or a bug).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from typing import Callable, Sequence

from beam_pipelines import cli, toy_data
from tfrecords_schema import InputError

_LOG = logging.getLogger(__name__)

# The Beam stages run locally, in this process.
BEAM_FLAGS = ("--runner=FnApiRunner",)

# On top of the quick preset (3 x 15 head steps, 1 finetune epoch): 3 more finetune epochs of
# 15 steps cost ~10 s here and lift the toy dev GAP from ~0.5 to ~0.8, so that rescoring is
# measured on top of a classifier that works. Flags given by the user come later and win.
QUICK_TRAIN_FLAGS = ("--finetune_epochs", "4")

TOY_DATA = "toy_data"
INGEST_TRAIN = "ingest_train"
INGEST_TEST = "ingest_test"
MODEL = "model"
REFERENCE_FEATURES = "reference_features"


# Help texts of the flags that landmarks-demo and landmarks-benchmark both hand to a job.
JOB_FLAG_HELP = {
    "test_per_class": "toy test views per class",
    "num_train_distractors": "toy training non-landmark images",
    "num_test_distractors": "toy test non-landmark images",
    "image_size": "network input side, pixels, >= 71 (landmarks-train --image_size)",
    "crops": "views per test image in landmarks-predict: 22, 12, 2 or 1",
    "references_per_class": "reference images per class in landmarks-predict (K)",
    "local_features": "local-feature extractor of landmarks-predict: default, orb, sift or "
                      "delf:HANDLE",
}


def path(root: str, name: str) -> str:
    """The folder ``name`` of the run folder ``root``."""
    return os.path.join(root, name)


# ---------------------------------------------------------------------------------------------
# Running and recording a stage.


@dataclasses.dataclass
class Stage:
    """One stage as it ran: its name, wall-clock seconds and one line about its result."""

    name: str
    seconds: float
    detail: str


def run_stage(stages: list, tag: str, name: str,
              action: Callable[[], tuple[object, str]], logger: logging.Logger = _LOG):
    """Runs ``action`` (a stage function bound to its arguments), logs ``=== <tag> <name> ...``
    before and ``... done in S s: <detail>`` after, appends a :class:`Stage` to ``stages``;
    returns the action's result."""
    logger.info("=== %s %s ...", tag, name)
    start = time.perf_counter()
    result, detail = action()
    seconds = time.perf_counter() - start
    stages.append(Stage(name, seconds, detail))
    logger.info("=== %s %s done in %.1f s: %s", tag, name, seconds, detail)
    return result


# ---------------------------------------------------------------------------------------------
# Checks made before the first stage.


def check_train_flags(
    train_flags: Sequence[str], own_flags: Sequence[str] = (), preset: str = "quick",
    base_flags: Sequence[str] = QUICK_TRAIN_FLAGS,
) -> None:
    """Checks flags meant for ``landmarks-train`` as its parser and config would, under
    ``preset``, after ``base_flags`` and with placeholder paths (nothing is read): unknown flags
    (suggestion from ``own_flags`` and the trainer's flags), bad values, values that do not fit
    together.

    Raises:
      InputError: one line naming the problem.
    """
    from trainer import config as train_config

    train_parser = train_config.build_parser()
    _, unknown = train_parser.parse_known_args(list(train_flags))
    if unknown:
        known = [*own_flags, *cli.option_strings(train_parser)]
        raise InputError(cli.unknown_arguments_message(unknown, known))
    placeholders = ["--train_data", "unused", "--label_map", "unused", "--model_dir", "unused",
                    "--preset", preset]
    train_config.config_from_args([*placeholders, *base_flags, *train_flags])


# ---------------------------------------------------------------------------------------------
# The stages.


def make_toy_data(root: str, seed: int, toy_flags: Sequence[str] = ()) -> tuple[dict, str]:
    """``landmarks-toy-data --output_dir <root>/toy_data --seed <seed> <toy_flags>``."""
    toy = toy_data.parse_args([
        "--output_dir", path(root, TOY_DATA), "--seed", str(seed), *toy_flags])
    summary = toy_data.generate(toy)
    return summary, json.dumps(summary.get("counts", {}), sort_keys=True)


def ingest_train(root: str) -> tuple[dict, str]:
    """``landmarks-ingest`` of the toy train.csv with its distractors and a 20 % dev split."""
    from beam_pipelines.ingest import pipeline as ingest

    stats = ingest.run([
        "--manifest", os.path.join(path(root, TOY_DATA), "train.csv"),
        "--distractor_dir", os.path.join(path(root, TOY_DATA), "distractors"),
        "--output_dir", path(root, INGEST_TRAIN), "--dev_fraction", "0.2",
        "--num_shards", "2", *BEAM_FLAGS,
    ])
    return stats, ingest_detail(stats)


def ingest_test(root: str) -> tuple[dict, str]:
    """``landmarks-ingest`` of the toy test.csv (no labels)."""
    from beam_pipelines.ingest import pipeline as ingest

    stats = ingest.run([
        "--manifest", os.path.join(path(root, TOY_DATA), "test.csv"),
        "--output_dir", path(root, INGEST_TEST), "--num_shards", "2", *BEAM_FLAGS,
    ])
    return stats, ingest_detail(stats)


def train_argv(root: str, preset: str, image_size: int, seed: int,
               train_flags: Sequence[str] = ()) -> list[str]:
    """The ``landmarks-train`` command line of :func:`train_model`."""
    records = path(root, INGEST_TRAIN)
    return [
        "--train_data", os.path.join(records, "train-*.tfrecord"),
        "--dev_data", os.path.join(records, "dev-*.tfrecord"),
        "--label_map", os.path.join(records, "label_map.csv"),
        "--model_dir", path(root, MODEL), "--preset", preset,
        "--image_size", str(image_size), "--seed", str(seed),
        "--verbose", "2", *train_flags,
    ]


def train_model(root: str, preset: str, image_size: int, seed: int,
                train_flags: Sequence[str] = ()) -> tuple[dict, str]:
    """``landmarks-train`` on ``ingest_train`` (train + dev) into ``model/``; ``train_flags``
    come last and win."""
    from trainer import config as train_config
    from trainer import train

    argv = train_argv(root, preset, image_size, seed, train_flags)
    summary = train.train(train_config.config_from_args(argv))
    detail = (
        f"dev GAP {fmt(summary.get('dev_gap_initial'))} at init -> "
        f"{fmt(summary.get('dev_gap_final'))} after training"
    )
    return summary, detail


def predict_test(root: str, output: str, local_features: str, references_per_class: int,
                 crops: int, extra: Sequence[str] = ()) -> tuple[dict, str]:
    """``landmarks-predict`` of the test records into ``<root>/<output>``; every predict run
    of ``root`` shares one reference-feature cache (computed once, then reused)."""
    from beam_pipelines.predict import pipeline as predict

    summary = predict.run([
        "--model", os.path.join(path(root, MODEL), "model.keras"),
        "--test_data", os.path.join(path(root, INGEST_TEST), "test-*.tfrecord"),
        "--reference_data", os.path.join(path(root, INGEST_TRAIN), "train-*.tfrecord"),
        "--output_dir", path(root, output),
        "--reference_features", path(root, REFERENCE_FEATURES),
        "--local_features", local_features,
        "--references_per_class", str(references_per_class),
        "--crops", str(crops), *extra, *BEAM_FLAGS,
    ])
    seconds = summary.get("seconds", {}).get("total") or 0.0
    detail = (
        f"{summary.get('test_images')} test images, {summary.get('predicted')} predicted, "
        f"{summary.get('unreadable')} unreadable"
        + (f", {summary['test_images'] / seconds:.2f} images/s" if seconds else "")
    )
    return summary, detail


def evaluate_submission(root: str, predicted: str, output: str) -> tuple[dict, str]:
    """``landmarks-evaluate`` of ``<root>/<predicted>`` (submission and scores) against the toy
    test solution, into ``<root>/<output>``."""
    from beam_pipelines import evaluate

    report = evaluate.run([
        "--submission", os.path.join(path(root, predicted), "submission.csv"),
        "--solution", os.path.join(path(root, TOY_DATA), "test_solution.csv"),
        "--scores", os.path.join(path(root, predicted), "scores.csv"),
        "--output_dir", path(root, output),
    ])
    alone = ("knn alone", report.get("gap_knn_only")) if "gap_knn_only" in report else (
        "classifier alone", report.get("gap_nn_only"))
    return report, f"GAP {fmt(report.get('gap'))}, {alone[0]} {fmt(alone[1])}"


# ---------------------------------------------------------------------------------------------
# Reading what the jobs wrote.


def fmt(value) -> str:
    """A metric with 4 decimals, ``n/a`` for None."""
    return "n/a" if value is None else f"{value:.4f}"


def required(record: dict, key: str, source: str):
    """``record[key]``; a missing key fails loudly instead of leaving a blank in the report."""
    if key not in record or record[key] is None:
        raise RuntimeError(f"{source} has no {key!r}; cannot report it")
    return record[key]


# What landmarks-ingest's stats.json holds (beam_pipelines.ingest.stats.summarise, plus the
# launcher's timing) and the stage line reports.
INGEST_STATS_KEYS = ("rows_in", "written", "rejected", "written_per_split", "images_per_second")


def ingest_detail(stats: dict) -> str:
    """One line about an ingest run from its ``stats.json`` (:data:`INGEST_STATS_KEYS`)."""
    rows_in, written, rejected, per_split, rate = (
        required(stats, key, "ingest stats.json") for key in INGEST_STATS_KEYS)
    splits = ", ".join(f"{name} {count}" for name, count in sorted(per_split.items()))
    return (f"{rows_in} rows -> {written} written ({splits or 'none'}), {rejected} rejected, "
            f"{rate:.1f} img/s")


def recorded_config(predict_dir: str, key: str):
    """``key`` of the config that the predict run in ``predict_dir`` recorded in ``config.json``."""
    config_path = os.path.join(predict_dir, "config.json")
    with open(config_path) as handle:
        recorded = json.load(handle)
    return required(required(recorded, "config", config_path), key, f"{config_path} config")


def predict_views_per_image(predict_dir: str) -> int:
    """Views per test image of the predict run in ``predict_dir``, from its ``config.json``.

    The job records its ``--crops``; the count is that of the crop spec it maps to
    (``rescoring.crops.CropSpec.for_num_views``), so the report names what was really run.
    """
    from rescoring import crops

    requested = recorded_config(predict_dir, "crops")
    return crops.CropSpec.for_num_views(int(requested)).num_views
