"""``landmarks-ingest``: manifest CSV (+ distractor folder) -> normalised, sharded TFRecords.

Usage::

    landmarks-ingest --manifest train.csv --output_dir runs/ingest [--distractor_dir DIR]
        [--max_side 512] [--num_shards 4] [--dev_fraction 0.1] [--label_map FILE]
        [--split_name NAME] [--max_rejected_fraction 0.5] [--overwrite]
        [Beam flags, e.g. --runner=DataflowRunner ...]
    landmarks-ingest --input_tfrecords 'gldv2/train-*' --output_dir runs/ingest [...]
    landmarks-ingest --archives 'gldv2/train/images_*.tar' --labels_csv gldv2/train.csv
        [--md5_dir gldv2/md5sum/train] --output_dir runs/ingest [...]

``--archives`` reads GLDv2's tar archives as they ship, each as one stream, with a label CSV of
the release (:mod:`~beam_pipelines.ingest.archives`, :mod:`~beam_pipelines.ingest.gldv2`): the
label rows take the manifest rows' path (group by id, label map, dev split) on ids alone, the
archive members are matched to them by id and then normalised and written like fetched files.
``stats.json`` gets an ``archives`` part (archives read whole, damaged, refused by their MD5;
members by kind).

``--input_tfrecords`` replaces the manifest by existing TFRecord shards, in the layout of DELF's
``build_image_dataset.py`` (what most GLDv2 users have) or in this project's own: each record is
converted (:mod:`~beam_pipelines.ingest.tfrecord_input`; ``image/class/label`` is the landmark
id, a record without it is unlabelled and goes to split ``test``) and then takes the manifest
rows' path below from "group by id" on, its image bytes normalised like a fetched file.

Data flow (every input row ends in exactly one shard record or one ``rejected.csv`` row)::

    manifest lines (with numbers) --parse--> rows ----------------------+--> rejected (reason)
    distractor files ---------------------> rows                       |
      -> group by id, keep lowest line (duplicate_id) ---------------->-+
      -> class index from the label map (unknown_landmark) ---------->-+
      -> dev split per class by hash of id
      -> fetch (http, gs, local) -> normalise (Pillow) -> record ----->-+ (fetch / image reasons)
      -> WriteToTFRecord per split: {split}-00000-of-0000N.tfrecord

Outputs in ``--output_dir``: the shards, ``label_map.csv``, ``rejected.csv``
(``id,url,reason,detail,line``), ``stats.json``, ``config.json``, TensorFlow Datasets metadata
(``dataset_info.json``, ``features.json``: ``tfds.builder_from_directory(output_dir)`` reads
the shards; ``--no_tfds_metadata`` skips it), then ``_SUCCESS``.

Exit codes: 0 done; 2 bad input (a flag, the manifest's header, a missing file, ...);
**4 the job ran but did not do its work** (:data:`EXIT_INCOMPLETE`): nothing was written, or
more than ``--max_rejected_fraction`` (default 0.5) of the input rows were rejected. Then
``rejected.csv``, ``stats.json`` (``status: failed``, ``failure``, ``rejected_fraction``,
``rejected_per_reason``, ``rejected_examples``) and ``config.json`` are written, but neither TFDS
metadata nor ``_SUCCESS``: the folder is incomplete, and the one-line error names the dominant
rejection reasons with an example each. 1: the counts do not balance (a bug: one line, the
shards set aside as above), or any other bug. 5: an input or output cannot be reached (its
storage service does not answer; checked before the pipeline is built).

Runs on Beam's local FnApiRunner unless ``--runner`` is given; every read and write goes
through Beam's FileSystems, so ``gs://`` paths and Dataflow work by flags alone (ship the code
with ``--setup_file ./setup.py``). Locally, ``--direct_num_workers N`` fetches N images at a time;
on Dataflow each worker runs many threads, which hides HTTP latency.

Notes:
- The label map holds every landmark id of a valid, de-duplicated manifest row, decided before
  fetching: a class whose every image later fails keeps its index (``stats.json`` reports
  ``label_map_classes`` and the classes that got images).
- The dev split is decided before fetching too (see :mod:`beam_pipelines.ingest.split`).
- ``rejected.csv`` leaves ``line`` empty for distractor files (their ``url`` is the file).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import (DirectOptions, PipelineOptions,
                                                  StandardOptions, WorkerOptions)

from beam_pipelines import cli, io_utils
from beam_pipelines.ingest import archives, gldv2
from beam_pipelines.ingest import manifest as manifest_lib
from beam_pipelines.ingest import tfds_metadata
from beam_pipelines.ingest.config import IngestConfig, parse_args
from beam_pipelines.ingest.manifest import ManifestRow
from beam_pipelines.ingest import stats as stats_lib
from beam_pipelines.ingest.transforms import COUNTS_FILENAME, REJECTED_FILENAME, build_pipeline
from tfrecords_schema import InputError
from tfrecords_schema.image_record import NON_LANDMARK
from tfrecords_schema.label_map import LabelMap
from trainer.cli import CommandFailure

_LOGGER = logging.getLogger(__name__)

STATS_FILENAME = "stats.json"
EXIT_INCOMPLETE = 4
"""Exit code of a run that finished but did not do its work (see the module docstring)."""


class IngestIncomplete(CommandFailure):
    """The job ran but did not do its work: nothing written, or too many rows rejected.

    ``main`` reports the message in one line with exit code :data:`EXIT_INCOMPLETE`;
    ``stats`` holds what was written to ``stats.json`` (``status: failed``).
    """

    exit_code = EXIT_INCOMPLETE

    def __init__(self, message: str, stats: dict):
        super().__init__(message)
        self.stats = stats


class IngestUnbalanced(IngestIncomplete):
    """Rows in != written + rejected: a bug of the job's bookkeeping, reported like every other
    failed run (one line, shards set aside, no ``_SUCCESS``) with exit code 1."""

    exit_code = cli.EXIT_INTERNAL_ERROR


CONFIG_FILENAME = "config.json"
DISTRACTOR_PREFIX = "distractor_"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")


# ------------------------------------------------------------------------------------------
# Launcher-side helpers (run before the pipeline)
# ------------------------------------------------------------------------------------------


def read_first_line(path: str, what: str = "manifest") -> str:
    """The first line of ``path`` (the manifest header), read without loading the whole file."""
    if not io_utils.exists(path):
        raise InputError(f"{what} not found: {path}")
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
        head = raw.read(1 << 16)
    text = head.decode("utf-8-sig", errors="replace")
    return text.splitlines()[0] if text.strip() else ""


def list_distractors(folder: str) -> list[ManifestRow]:
    """Non-landmark rows (label -1) for the image files directly inside ``folder``, sorted.

    Id: ``distractor_`` + the file stem with unsafe characters replaced (see
    :func:`manifest.sanitise_id`); two files with the same stem become duplicate ids.
    """
    paths = io_utils.match(io_utils.join(folder, "*"))
    if not paths:
        check_folder_readable(folder, "--distractor_dir")
    images = [path for path in paths if path.lower().endswith(IMAGE_SUFFIXES)]
    if not images:
        raise InputError(
            f"--distractor_dir {folder} holds no image file ({', '.join(IMAGE_SUFFIXES)}; "
            f"{len(paths)} other entries): without it the model trains with no non-landmark "
            "image; fix the path or leave the flag out")
    rows = []
    for position, path in enumerate(images, start=1):
        stem = path.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        rows.append(ManifestRow(
            image_id=manifest_lib.sanitise_id(stem, DISTRACTOR_PREFIX), url=path,
            landmark_id=NON_LANDMARK, line=position, origin=manifest_lib.ORIGIN_DISTRACTOR,
        ))
    return rows


def check_folder_readable(folder: str, flag: str) -> None:
    """Raises ``InputError`` naming ``flag``, ``folder`` and the file system's own message when
    ``folder`` is not a folder that can be listed (a ``gs://`` prefix without objects counts as
    missing: object stores have no empty folders)."""
    if FileSystems.get_scheme(folder) is not None:
        if not io_utils.match(io_utils.join(folder, "**")):
            raise InputError(f"{flag} {folder}: no such folder (no object under this prefix)")
        return
    try:
        os.listdir(folder)
    except OSError as error:
        raise InputError(f"{flag} {folder}: {error.strerror or error}") from error


def with_absolute_local_paths(config: IngestConfig) -> IngestConfig:
    """Local paths made absolute, so workers and ``config.json`` do not depend on the cwd."""
    changes = {}
    for name in ("manifest", "input_tfrecords", "archives", "labels_csv", "md5_dir", "output_dir",
                 "distractor_dir", "label_map"):
        path = getattr(config, name)
        if path and FileSystems.get_scheme(path) is None:
            changes[name] = os.path.abspath(path)
    return dataclasses.replace(config, **changes)


def _is_within(path: str, folder: str) -> bool:
    path, folder = path.rstrip("/"), folder.rstrip("/")
    return path == folder or path.startswith(folder + "/")


def check_inputs_outside_output(config: IngestConfig) -> None:
    """Refuses an output folder holding an input: ``--overwrite`` would delete it."""
    for name in ("manifest", "input_tfrecords", "archives", "labels_csv", "md5_dir",
                 "distractor_dir", "label_map"):
        path = getattr(config, name)
        if path and _is_within(path, config.output_dir):
            raise InputError(f"--{name} {path} lies inside --output_dir {config.output_dir}; "
                             "write each run to its own folder")


def access_paths(config: IngestConfig, beam_args: list[str]) -> dict[str, str]:
    """Flag -> path of every input and output the job reads or writes, Beam's temporary and
    staging folders (Dataflow) included, for :func:`io_utils.check_access`."""
    from apache_beam.options.pipeline_options import GoogleCloudOptions

    paths = {f"--{name}": getattr(config, name) for name in (
        "manifest", "input_tfrecords", "distractor_dir", "label_map", "output_dir")}
    cloud = PipelineOptions(list(beam_args)).view_as(GoogleCloudOptions)
    paths.update({"--temp_location": cloud.temp_location,
                  "--staging_location": cloud.staging_location})
    return {flag: path for flag, path in paths.items() if path}


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options from the leftover flags; the local FnApiRunner unless a runner is given
    (Beam's default local runner first tries to download a runner binary)."""
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    if not standard.runner:
        standard.runner = "FnApiRunner"
    return options


def runner_workers(options: PipelineOptions) -> int:
    """The workers the runner was told to use: on Dataflow ``--max_num_workers`` or
    ``--num_workers`` (1 when neither is given); on the local runners
    ``--direct_num_workers`` (0: one per core)."""
    if "dataflow" in str(options.view_as(StandardOptions).runner or "").lower():
        worker = options.view_as(WorkerOptions)
        return worker.max_num_workers or worker.num_workers or 1
    direct = options.view_as(DirectOptions).direct_num_workers
    return direct if direct else (os.cpu_count() or 1)


def beam_counters(result) -> dict[str, int]:
    """The job's ``ingest`` counters (committed values, summed over steps); {} if unavailable."""
    try:
        query = result.metrics().query(MetricsFilter().with_namespace("ingest"))
    except (NotImplementedError, AttributeError, KeyError, ValueError) as error:
        _LOGGER.warning("ingest: counters unavailable from this runner: %s", error)
        return {}
    totals: dict[str, int] = {}
    for counter in query["counters"]:
        name = counter.key.metric.name
        totals[name] = totals.get(name, 0) + int(counter.committed or 0)
    return dict(sorted(totals.items()))


def write_tfds_metadata_if_reachable(output_dir: str) -> None:
    """TFDS metadata beside the shards; TFDS' file layer (tf.io.gfile) cannot reach a storage
    emulator, so there the step is skipped with a warning instead of failing a complete ingest."""
    if output_dir.startswith("gs://") and os.environ.get("STORAGE_EMULATOR_HOST"):
        _LOGGER.warning("ingest: STORAGE_EMULATOR_HOST is set; TFDS metadata skipped (tf.io.gfile "
                        "cannot reach an emulator)")
        return
    tfds_metadata.write_tfds_metadata(output_dir)


INCOMPLETE_SUFFIX = ".incomplete"


def set_aside_shards(output_dir: str) -> int:
    """Renames the shards of a failed run ``*.tfrecord`` -> ``*.tfrecord.incomplete``.

    Kept for inspection, but a glob such as ``train-*.tfrecord`` (the trainer's, the predict
    job's) no longer matches them. Returns how many were renamed.
    """
    paths = io_utils.match(io_utils.join(output_dir, "*.tfrecord"))
    if paths:
        FileSystems.rename(paths, [path + INCOMPLETE_SUFFIX for path in paths])
    return len(paths)


def remove_empty_splits(output_dir: str, shards: dict[str, int],
                        written_per_split: dict[str, int], keep=()) -> dict[str, int]:
    """Deletes the (empty) shards of the splits that received no record, except ``keep``, with
    a warning for each; returns the remaining split -> shards.

    A split with no record gets no shards: zero-byte shards would pass for a dataset (a
    ``dev-*`` glob matches them, TFDS fails on them with "corresponds to no data"). E.g.
    ``--dev_fraction 0.02`` of a small manifest may put no row in ``dev``; with TFRecord
    input, whose records decide between ``train`` and ``test``, a train set gets no ``test``.
    """
    remaining = {}
    for split, num_shards in shards.items():
        if split in keep or written_per_split.get(split, 0) > 0:
            remaining[split] = num_shards
            continue
        paths = io_utils.match(io_utils.join(output_dir, f"{split}-*-of-*.tfrecord"))
        if paths:
            FileSystems.delete(paths)
        _LOGGER.warning("ingest: split %s received no record: no %s shards written (%d empty "
                        "shard(s) removed)", split, split, len(paths))
    return remaining


def archive_inputs(config: IngestConfig):
    """``(label CSV format, [(archive path, size in bytes)])`` of an ``--archives`` run (the
    sizes from the same listing, so workers need not list each archive again), checked before
    any pipeline: a known ``--labels_csv`` header, at least one archive, and with ``--md5_dir``
    an MD5 file for every archive (``md5.images_NNN.txt`` for ``images_NNN.tar``)."""
    from beam_pipelines.ingest import gldv2

    labels = gldv2.parse_labels_header(read_first_line(config.labels_csv, "--labels_csv"),
                                       source=config.labels_csv)
    archive_files = io_utils.match_with_sizes(config.archives)
    paths = [path for path, _ in archive_files]
    if not paths:
        raise InputError(f"no files match --archives {config.archives!r} (quote the glob so "
                         "that the shell does not expand it)")
    if config.md5_dir:
        present = {path.rstrip("/").rsplit("/", 1)[-1]
                   for path in io_utils.match(io_utils.join(config.md5_dir, "md5.*.txt"))}
        missing = [gldv2.md5_file_name(path) for path in paths
                   if gldv2.md5_file_name(path) not in present]
        if missing:
            raise InputError(f"--md5_dir {config.md5_dir} lacks the MD5 file of "
                             f"{len(missing)} archive(s), e.g. {missing[0]} (one "
                             "md5.<archive name>.txt per archive, as in the release's "
                             "md5sum/<split>/)")
    if config.dev_fraction > 0 and not labels.labelled:
        raise InputError(f"--dev_fraction needs labels; --labels_csv {config.labels_csv} is "
                         f"{labels.kind} (ids only)")
    return labels, archive_files


@dataclasses.dataclass(frozen=True)
class InputPlan:
    """What the checks before the pipeline found: the manifest's ``header`` (manifest input),
    the label CSV's format and the archive paths (``--archives``; both None otherwise), the
    ``--label_map`` given, and the distractor rows."""

    header: Optional[manifest_lib.ManifestHeader]
    labels: Optional[gldv2.LabelsFormat]
    archive_files: Optional[list[tuple[str, int]]]  # (path, size in bytes)
    given_label_map: Optional[LabelMap]
    distractors: list[ManifestRow]


def run(argv=None, config: IngestConfig | None = None) -> dict:
    """Runs one ingest and returns the ``stats.json`` contents.

    Args:
      argv: command-line flags (ingest flags and Beam flags mixed); ignored for ingest flags
        when ``config`` is given (then only Beam flags are read from it).
      config: an already built configuration.

    Raises:
      InputError: bad or unknown flags, a bad manifest header, a non-empty output folder
        without ``--overwrite``, an unreadable ``--label_map``, no file matching
        ``--input_tfrecords`` or one that is not a TFRecord file; with ``--archives``: no
        archive matching, a ``--labels_csv`` header that is none of GLDv2's, an archive
        without its MD5 file in ``--md5_dir``.
      IngestIncomplete: the job ran but wrote nothing or rejected more than
        ``--max_rejected_fraction`` of its input (``error.stats`` is ``stats.json``).
    """
    config, beam_args = _config_and_beam_args(argv, config)
    plan = check_inputs(config, beam_args)
    io_utils.prepare_output_dir(config.output_dir, config.overwrite)
    _log_plan(config, plan)
    result, seconds = _run_pipeline(config, beam_args, plan)
    stats = _collect_stats(config, plan, result, seconds)
    _write_outcome(config, beam_args, stats)
    _LOGGER.info("ingest: %d rows in, %d written, %d rejected in %.1f s (%.1f images/s)",
                 stats["rows_in"], stats["written"], stats["rejected"], seconds,
                 stats["images_per_second"])
    return stats


def _config_and_beam_args(argv, config: Optional[IngestConfig]):
    """``(config with absolute local paths, Beam's flags)`` from the command line or ``config``."""
    if config is None:
        config, beam_args = parse_args(argv)
    else:
        beam_args = list(argv or [])
        cli.check_beam_args(beam_args)
    return with_absolute_local_paths(config), beam_args


def check_inputs(config: IngestConfig, beam_args: list[str]) -> InputPlan:
    """Every check that needs no pipeline: paths reachable and outside the output folder, the
    input's header or archives, ``--label_map``, the distractor folder (see :func:`run`)."""
    check_inputs_outside_output(config)
    io_utils.check_access(access_paths(config, beam_args))
    header = None  # TFRecord input: no header, records are labelled or not one by one
    labels = archive_files = None
    if config.archives:
        labels, archive_files = archive_inputs(config)
    elif config.manifest:
        header = manifest_lib.parse_header(read_first_line(config.manifest),
                                           source=config.manifest)
        if config.dev_fraction > 0 and not header.labelled:
            raise InputError("--dev_fraction needs a labelled manifest (id,url,landmark_id)")
    elif not io_utils.match(config.input_tfrecords):
        hint = (" (quote the glob so that the shell does not expand it)"
                if FileSystems.get_scheme(config.input_tfrecords) is None else "")
        raise InputError(f"no files match --input_tfrecords {config.input_tfrecords!r}{hint}")
    given_label_map = None
    if config.label_map:
        if not io_utils.exists(config.label_map):
            raise InputError(f"--label_map not found: {config.label_map}")
        given_label_map = LabelMap.from_csv_text(io_utils.read_text(config.label_map),
                                                 source=config.label_map)
    distractors = list_distractors(config.distractor_dir) if config.distractor_dir else []
    return InputPlan(header, labels, archive_files, given_label_map, distractors)


def _log_plan(config: IngestConfig, plan: InputPlan) -> None:
    if plan.labels is not None:
        _LOGGER.info("ingest: %d archives of %s with %s (%s) + %d distractor files -> %s",
                     len(plan.archive_files), config.archives, config.labels_csv,
                     plan.labels.kind, len(plan.distractors), config.output_dir)
    elif plan.header is not None:
        _LOGGER.info("ingest: %s (%s manifest) + %d distractor files -> %s", config.manifest,
                     "labelled" if plan.header.labelled else "unlabelled",
                     len(plan.distractors), config.output_dir)
    else:
        _LOGGER.info("ingest: TFRecords %s + %d distractor files -> %s", config.input_tfrecords,
                     len(plan.distractors), config.output_dir)


def _run_pipeline(config: IngestConfig, beam_args: list[str], plan: InputPlan):
    """Builds and runs the Beam job: ``(result, wall seconds)``."""
    start = time.monotonic()
    pipeline = beam.Pipeline(options=pipeline_options(beam_args))
    if plan.labels is not None:
        parts = config.archive_parts or archives.parts_per_archive(
            len(plan.archive_files), runner_workers(pipeline.options))
        _LOGGER.info("ingest: each archive decoded in %d byte range(s)", parts)
        archives.build_archive_pipeline(
            pipeline, config, plan.archive_files, plan.labels, plan.distractors,
            plan.given_label_map, io_utils.file_size(config.labels_csv), parts)
    else:
        build_pipeline(pipeline, config, plan.header, plan.distractors, plan.given_label_map)
    try:
        result = pipeline.run()
        state = result.wait_until_finish()
    except Exception as error:  # noqa: BLE001 - only Beam's TFRecord framing error is input
        if config.input_tfrecords and "Not a valid TFRecord" in str(error):
            raise InputError(
                f"a file matched by --input_tfrecords {config.input_tfrecords!r} is not a "
                "TFRecord file or is truncated (Beam's reader: 'Not a valid TFRecord'); check "
                "the glob and the files' sizes, outputs in "
                f"{config.output_dir} are incomplete") from error
        raise
    if state not in (None, "DONE", beam.runners.runner.PipelineState.DONE):
        raise RuntimeError(f"ingest pipeline ended in state {state}")
    return result, time.monotonic() - start


def _read_and_delete_json(path: str) -> dict:
    """A job's intermediate JSON file, removed once read (its content goes to stats.json)."""
    contents = json.loads(io_utils.read_text(path))
    FileSystems.delete([path])
    return contents


def _collect_stats(config: IngestConfig, plan: InputPlan, result, seconds: float) -> dict:
    """``stats.json``: the job's counts, shards, the archive summary and the verdict of
    :func:`.stats.assess` (``failure`` None when the run did its work)."""
    stats = _read_and_delete_json(io_utils.join(config.output_dir, COUNTS_FILENAME))
    archive_summary = None
    if plan.labels is not None:
        archive_summary = _read_and_delete_json(
            io_utils.join(config.output_dir, archives.ARCHIVES_FILENAME))
        labelled = plan.labels.labelled
        if not archive_summary["members_balanced"]:
            _LOGGER.error("ingest: archive members do not reconcile: %s",
                          archive_summary["members"])
    elif plan.header is not None:
        labelled = plan.header.labelled
    else:
        labelled = stats["class_histogram"]["num_classes"] > 0
    shards = config.shards_per_split(labelled if not config.input_tfrecords else None)
    by_rows = not config.input_tfrecords
    source = ("the manifest" if config.manifest else
              "--labels_csv" if config.archives else "--input_tfrecords")
    outcome = stats_lib.assess(stats, config.max_rejected_fraction,
                               noun="rows" if by_rows else "records", source=source)
    if outcome["failure"] is None:
        shards = remove_empty_splits(config.output_dir, shards, stats["written_per_split"])
    elif config.input_tfrecords:  # a failed run's shards are set aside below, for inspection
        shards = remove_empty_splits(config.output_dir, shards, stats["written_per_split"],
                                     keep=("dev",))
    stats.update({
        "seconds": round(seconds, 3),
        "images_per_second": round(stats["written"] / seconds, 3) if seconds > 0 else 0.0,
        "shards_per_split": shards,
        "labelled": labelled,
        "input": ("manifest" if config.manifest else
                  "archives" if config.archives else "tfrecords"),
        "counters": beam_counters(result),
        **outcome,
    })
    if archive_summary is not None:
        stats["archives"] = archive_summary
        stats["labels_csv"] = {"path": config.labels_csv, "kind": plan.labels.kind}
    return stats


def _write_outcome(config: IngestConfig, beam_args: list[str], stats: dict) -> None:
    """``stats.json`` and ``config.json``; then ``_SUCCESS`` (and TFDS metadata) for a run that
    did its work, or, for one that did not, its shards set aside and
    :class:`IngestIncomplete` raised."""
    io_utils.write_json(io_utils.join(config.output_dir, STATS_FILENAME), stats)
    io_utils.write_json(io_utils.join(config.output_dir, CONFIG_FILENAME),
                        {**config.to_dict(), "beam_args": list(beam_args)})
    failure = stats["failure"]
    if failure is None:
        if config.tfds_metadata:
            write_tfds_metadata_if_reachable(config.output_dir)
        io_utils.write_success_marker(config.output_dir)
        return
    # No TFDS metadata, no _SUCCESS, and no shard under its usual name: nothing here may pass
    # for a complete dataset, not even to a reader that globs '*.tfrecord'.
    renamed = set_aside_shards(config.output_dir)
    message = (f"{failure['message']}; outputs in {config.output_dir} are incomplete (no "
               f"_SUCCESS; {renamed} shard(s) renamed *{INCOMPLETE_SUFFIX}): see "
               f"{REJECTED_FILENAME} and {STATS_FILENAME} there")
    if failure["kind"] == stats_lib.FAILURE_UNBALANCED:
        message = f"the counts do not add up: {message}; {cli.BUG_HINT_NO_TRACEBACK}"
        _LOGGER.error("ingest: %s", message)
        raise IngestUnbalanced(message, stats)
    _LOGGER.error("ingest: %s", message)
    raise IngestIncomplete(message, stats)


def main(argv=None) -> int:
    """CLI entry point: prints a short summary; returns the exit code.

    0 success; 1 the counts do not balance (:class:`IngestUnbalanced`, one line, no
    ``_SUCCESS``, shards set aside) or an internal error (a bug: its traceback is logged);
    5 an input or output cannot be reached; 2 bad input, e.g. an unknown flag (one ``landmarks-ingest: error:``
    line, see :func:`beam_pipelines.cli.run_command`); 4 (:data:`EXIT_INCOMPLETE`) the job ran
    but wrote nothing or rejected too much (:class:`IngestIncomplete`, one such line naming the
    dominant reasons).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    # Beam logs one INFO line per postponed type hint; keep the progress lines readable.
    logging.getLogger("apache_beam.typehints").setLevel(logging.WARNING)
    return cli.run_command("landmarks-ingest", lambda: _main(argv))


def _main(argv) -> int:
    """Runs the ingest and prints its summary line; the exit code of a finished run."""
    stats = run(argv)
    per_split = ", ".join(f"{name} {count}" for name, count in stats["written_per_split"].items())
    per_reason = ", ".join(f"{name} {count}" for name, count in
                           stats["rejected_per_reason"].items()) or "none"
    print(f"rows in {stats['rows_in']}: written {stats['written']} ({per_split or 'none'}), "
          f"rejected {stats['rejected']} ({per_reason}); {stats['seconds']:.1f} s, "
          f"{stats['images_per_second']:.1f} images/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
