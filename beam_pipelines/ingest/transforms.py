"""The Beam steps of ``landmarks-ingest``: element types, DoFns and :func:`build_pipeline`.

Kept apart from the launcher (:mod:`beam_pipelines.ingest.pipeline`) on purpose: everything
Beam ships to workers must live in an importable module, not in ``__main__`` (``python -m
beam_pipelines.ingest.pipeline`` would otherwise pickle ``__main__.LabelledRow`` and a worker
process could not find it). Each DoFn is an adapter around a pure function of
:mod:`~beam_pipelines.ingest.manifest`, :mod:`~beam_pipelines.ingest.split`,
:mod:`~beam_pipelines.ingest.fetch`, :mod:`~beam_pipelines.ingest.normalise`,
:mod:`~beam_pipelines.ingest.tfrecord_input` or :mod:`~beam_pipelines.ingest.stats`.

Two sources feed the same downstream steps (dedupe, label map, split, normalise, write, counts):
manifest lines (+ distractor files), or the records of ``--input_tfrecords``, which become
:class:`ManifestRow` s that carry their image bytes (nothing is fetched for them). A third,
``--archives`` (:mod:`~beam_pipelines.ingest.archives`), reuses the same pieces
(:func:`label_rows`, :func:`normalise_images`, :func:`write_shards_rejected_and_counts`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import time

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines import io_utils
from beam_pipelines.ingest import manifest as manifest_lib
from beam_pipelines.ingest import split as split_lib
from beam_pipelines.ingest import stats as stats_lib
from beam_pipelines.ingest import tfrecord_input
from beam_pipelines.ingest.config import IngestConfig
from beam_pipelines.ingest.fetch import FetchFailed, FetchParams, fetch_bytes
from beam_pipelines.ingest.manifest import ManifestHeader, ManifestRow, Rejection
from beam_pipelines.ingest.normalise import (ImageRejected, NormalisedImage, NormaliseParams,
                                             normalise_image)
from tfrecords_schema.image_record import NON_LANDMARK, ImageRecord, serialize_record
from tfrecords_schema.label_map import LABEL_MAP_FILENAME, LabelMap

_LOGGER = logging.getLogger(__name__)

REJECTED_FILENAME = "rejected.csv"
REJECTED_COLUMNS = ("id", "url", "reason", "detail", "line")
COUNTS_FILENAME = "_counts.json"  # the pipeline's counts, folded into stats.json by the launcher

_REJECTED = "rejected"

# ------------------------------------------------------------------------------------------
# Element types
# ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LabelledRow:
    """A valid, de-duplicated row with its class index (-1: non-landmark) and split name."""

    row: ManifestRow
    label: int
    split: str


@dataclasses.dataclass(frozen=True)
class WrittenImage:
    """A record ready for a shard: the serialised example plus what the counts need."""

    split: str
    label: int
    serialized: bytes
    bytes_in: int


# ------------------------------------------------------------------------------------------
# DoFns and small functions (each an adapter around a pure function)
# ------------------------------------------------------------------------------------------


class ReadManifestLines(beam.DoFn):
    """Manifest path -> ``(line_number, text)`` for every non-blank data line (header skipped).

    The file is read sequentially by one worker so line numbers are exact; a Reshuffle after
    this step spreads the rows over workers.
    """

    def process(self, path: str):
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            text = io.TextIOWrapper(raw, encoding="utf-8-sig", errors="replace")
            for number, line in enumerate(text, start=1):
                line = line.rstrip("\r\n")
                if number > 1 and line.strip():
                    yield number, line


class ParseLine(beam.DoFn):
    """``(line_number, text)`` -> :class:`ManifestRow`, or a :class:`Rejection` (tagged)."""

    def __init__(self, header: ManifestHeader):
        self._header = header

    def process(self, numbered_line):
        number, text = numbered_line
        parsed = manifest_lib.parse_line(text, number, self._header)
        if isinstance(parsed, Rejection):
            yield beam.pvalue.TaggedOutput(_REJECTED, parsed)
        else:
            yield parsed


def key_by_id(row: ManifestRow):
    return row.image_id, row


class KeepFirst(beam.DoFn):
    """``(id, rows)`` -> the first row in input order; the others as ``duplicate_id`` (tagged)."""

    def process(self, keyed_rows):
        _, rows = keyed_rows
        kept, duplicates = manifest_lib.keep_first(list(rows))
        yield kept
        for rejection in duplicates:
            yield beam.pvalue.TaggedOutput(_REJECTED, rejection)


def landmark_ids_of(row: ManifestRow):
    if row.landmark_id >= 0:
        yield row.landmark_id


def build_label_map(landmark_ids) -> LabelMap:
    return LabelMap.from_landmark_ids(landmark_ids)


def write_label_map(label_map: LabelMap, output_dir: str) -> int:
    io_utils.write_text(io_utils.join(output_dir, LABEL_MAP_FILENAME), label_map.to_csv_text())
    return label_map.num_classes


class AssignLabel(beam.DoFn):
    """Row -> :class:`LabelledRow` with the class index (main split), or ``unknown_landmark``.

    With ``unlabelled_split`` (TFRecord input), rows without any label (``row.unlabelled``) go
    there, and non-landmark rows too when the input holds no labelled row at all
    (``any_labelled``, a side input): converting a test set keeps it a test set.
    """

    def __init__(self, split: str, unlabelled_split: str | None = None):
        self._split = split
        self._unlabelled_split = unlabelled_split or split

    def process(self, row: ManifestRow, label_map: LabelMap, any_labelled: bool = True):
        if row.unlabelled:
            yield LabelledRow(row, NON_LANDMARK, self._unlabelled_split)
            return
        if row.landmark_id == NON_LANDMARK:
            yield LabelledRow(row, NON_LANDMARK,
                              self._split if any_labelled else self._unlabelled_split)
            return
        try:
            label = label_map.class_index(row.landmark_id)
        except KeyError:
            yield beam.pvalue.TaggedOutput(_REJECTED, Rejection(
                image_id=row.image_id, url=row.url, reason="unknown_landmark",
                detail=f"landmark_id {row.landmark_id} is not in the label map",
                line=row.line, origin=row.origin))
            return
        yield LabelledRow(row, label, self._split)


def key_by_class(labelled: LabelledRow):
    return labelled.label, labelled


def assign_dev_split(keyed: tuple[int, list[LabelledRow]], fraction: float,
                     from_split: str | None = None):
    """One class's rows with ``split`` set to ``dev`` for the hash-chosen share.

    Only rows of ``from_split`` (all rows if None) are candidates; the others pass unchanged
    (TFRecord input: unlabelled test rows never move to dev). The group is iterated twice
    instead of being copied, so rows that carry image bytes are not all held in memory.
    """
    _, members = keyed

    def candidate(member: LabelledRow) -> bool:
        return from_split is None or member.split == from_split

    chosen = split_lib.dev_ids(
        [member.row.image_id for member in members if candidate(member)], fraction)
    for member in members:
        split = "dev" if candidate(member) and member.row.image_id in chosen else member.split
        yield LabelledRow(member.row, member.label, split)


class ImagesProgress:
    """Logs images done and images/s every ``every`` images or ``seconds`` s (per worker)."""

    def __init__(self, every: int = 500, seconds: float = 10.0):
        self._every, self._seconds = every, seconds
        self._start = self._last = time.monotonic()
        self._done = 0

    def tick(self) -> None:
        self._done += 1
        now = time.monotonic()
        if self._done % self._every == 0 or now - self._last >= self._seconds:
            self._last = now
            rate = self._done / max(now - self._start, 1e-9)
            _LOGGER.info("ingest: %d images processed by this worker, %.1f images/s",
                         self._done, rate)


class FetchAndNormalise(beam.DoFn):
    """:class:`LabelledRow` -> :class:`WrittenImage`, or a :class:`Rejection` (tagged).

    Idempotent (read-only fetch, pure normalisation), so Beam's bundle retries are harmless.
    """

    def __init__(self, fetch_params: FetchParams, normalise_params: NormaliseParams):
        self._fetch_params = fetch_params
        self._normalise_params = normalise_params
        self._progress = None

    def setup(self):
        self._progress = ImagesProgress()

    def process(self, labelled: LabelledRow):
        row = labelled.row
        self._progress.tick()
        try:
            data = row.data if row.data is not None else fetch_bytes(row.url, self._fetch_params)
            image = normalise_image(data, self._normalise_params)
        except (FetchFailed, ImageRejected) as failure:
            yield beam.pvalue.TaggedOutput(_REJECTED, Rejection(
                image_id=row.image_id, url=row.url, reason=failure.reason, detail=failure.detail,
                line=row.line, origin=row.origin))
            return
        yield written_image(labelled, image, len(data))


def written_image(labelled: LabelledRow, image: NormalisedImage, bytes_in: int) -> WrittenImage:
    """The shard record of ``labelled``'s normalised image (counted ``written_<split>``);
    ``bytes_in``: the size of the file it came from."""
    row = labelled.row
    record = ImageRecord(
        image_id=row.image_id, jpeg_bytes=image.jpeg_bytes, label=labelled.label,
        height=image.height, width=image.width, landmark_id=row.landmark_id,
        source_format=image.source_format,
    )
    Metrics.counter("ingest", f"written_{labelled.split}").inc()
    return WrittenImage(labelled.split, labelled.label, serialize_record(record), bytes_in)


def has_split(written: WrittenImage, split: str) -> bool:
    return written.split == split


def serialized_of(written: WrittenImage) -> bytes:
    return written.serialized


def count_rejection(rejection: Rejection) -> Rejection:
    Metrics.counter("ingest", f"rejected_{rejection.reason}").inc()
    return rejection


def rejection_csv_line(rejection: Rejection) -> str:
    """One ``rejected.csv`` line (CSV-quoted, newlines in details flattened)."""
    detail = " ".join(rejection.detail.split())[:500]
    line = rejection.line if rejection.origin == manifest_lib.ORIGIN_MANIFEST else ""
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(
        [rejection.image_id, rejection.url, rejection.reason, detail, line])
    return buffer.getvalue()


def row_in_event(_element) -> stats_lib.Outcome:
    Metrics.counter("ingest", "rows_in").inc()
    return stats_lib.Outcome(stats_lib.ROW_IN)


def written_event(written: WrittenImage) -> stats_lib.Outcome:
    return stats_lib.Outcome(stats_lib.WRITTEN, written.split, written.label, written.bytes_in,
                             len(written.serialized))


def rejected_event(rejection: Rejection) -> stats_lib.Outcome:
    return stats_lib.Outcome(stats_lib.REJECTED, rejection.reason, image_id=rejection.image_id,
                             detail=" ".join(rejection.detail.split())[:500])


class CountOutcomes(beam.CombineFn):
    """Adds :class:`stats.Outcome` events into a :class:`stats.Counts` (associative)."""

    def create_accumulator(self):
        return stats_lib.Counts()

    def add_input(self, counts, outcome):
        return counts.add(outcome)

    def merge_accumulators(self, accumulators):
        accumulators = iter(accumulators)
        total = next(accumulators)
        for counts in accumulators:
            total.merge(counts)
        return total

    def extract_output(self, counts):
        return stats_lib.summarise(counts)


def write_counts(summary: dict, num_classes: int, output_dir: str) -> None:
    io_utils.write_json(io_utils.join(output_dir, COUNTS_FILENAME),
                        {**summary, "label_map_classes": num_classes})



class ConvertRecords(beam.DoFn):
    """``(file, serialised record)`` -> :class:`ManifestRow` carrying the image bytes, or a
    :class:`Rejection` (tagged); an adapter around :func:`tfrecord_input.convert_record`."""

    def process(self, keyed_record):
        path, serialized = keyed_record
        converted = tfrecord_input.convert_record(serialized)
        if isinstance(converted, tfrecord_input.RecordRejected):
            yield beam.pvalue.TaggedOutput(_REJECTED, Rejection(
                image_id=converted.image_id, url=path, reason=converted.reason,
                detail=converted.detail, line=0, origin=manifest_lib.ORIGIN_TFRECORD))
            return
        Metrics.counter("ingest", f"layout_{converted.layout}").inc()
        landmark_id = converted.landmark_id
        yield ManifestRow(
            image_id=converted.image_id, url=path,
            landmark_id=NON_LANDMARK if landmark_id is None else landmark_id, line=0,
            origin=manifest_lib.ORIGIN_TFRECORD, data=converted.image_bytes,
            unlabelled=landmark_id is None)


def is_labelled(row: ManifestRow) -> bool:
    return row.landmark_id >= 0


def manifest_folder(path: str) -> str:
    """The folder holding the manifest (relative image paths are resolved against it)."""
    folder, _ = FileSystems.split(path)
    return folder


# ------------------------------------------------------------------------------------------
# The pipeline
# ------------------------------------------------------------------------------------------


def is_positive(count: int) -> bool:
    return count > 0


def build_pipeline(pipeline: beam.Pipeline, config: IngestConfig, header: ManifestHeader | None,
                   distractors: list[ManifestRow], given_label_map: LabelMap | None) -> None:
    """Adds every ingest step to ``pipeline`` (nothing runs until ``pipeline.run()``).

    ``header``: the manifest's; None for ``--input_tfrecords`` (records are labelled or not one
    by one: labelled ones go to the main split, unlabelled ones to ``test``). The steps after
    the source are shared with ``--archives`` (:mod:`beam_pipelines.ingest.archives`):
    :func:`label_rows`, :func:`normalise_images`, :func:`write_shards_rejected_and_counts`.
    """
    from_tfrecords = header is None
    if from_tfrecords:
        main_split, unlabelled_split = config.main_split(True), config.main_split(False)
        shards = config.shards_per_split(None)
        # ReadAllFromTFRecord (the glob as an element) keys each record by its file and, like
        # ReadFromTFRecord, reads local and gs:// files through Beam's FileSystems.
        lines = (
            pipeline
            | "InputPattern" >> beam.Create([config.input_tfrecords])
            | "ReadRecords" >> beam.io.ReadAllFromTFRecord(with_filename=True)
        )
        parsed = lines | "ConvertRecords" >> beam.ParDo(ConvertRecords()).with_outputs(
            _REJECTED, main="rows")
        base_dir = ""
    else:
        main_split, unlabelled_split = config.main_split(header.labelled), None
        shards = config.shards_per_split(header.labelled)
        lines = (
            pipeline
            | "ManifestPath" >> beam.Create([config.manifest])
            | "ReadLines" >> beam.ParDo(ReadManifestLines())
            | "SpreadLines" >> beam.Reshuffle()
        )
        parsed = lines | "Parse" >> beam.ParDo(ParseLine(header)).with_outputs(
            _REJECTED, main="rows")
        base_dir = manifest_folder(config.manifest)
    distractor_rows = pipeline | "Distractors" >> beam.Create(distractors)
    all_rows = (parsed.rows, distractor_rows) | "AllRows" >> beam.Flatten()
    labelled = label_rows(pipeline, all_rows, config, main_split, unlabelled_split,
                          given_label_map)
    images = normalise_images(labelled.rows, config, base_dir)
    write_shards_rejected_and_counts(
        images.written, shards, config.output_dir,
        rejected=[parsed[_REJECTED], *labelled.rejected, images[_REJECTED]],
        rows_in=[lines, distractor_rows], num_classes=labelled.num_classes)


@dataclasses.dataclass(frozen=True)
class LabelledRows:
    """What :func:`label_rows` adds: the rows to normalise (:class:`LabelledRow`, split set),
    its rejections (PCollections of :class:`Rejection`) and the label map's class count (a
    one-element PCollection, written to ``label_map.csv`` on the way)."""

    rows: beam.PCollection
    rejected: tuple
    num_classes: beam.PCollection


def label_rows(pipeline: beam.Pipeline, all_rows, config: IngestConfig, main_split: str,
               unlabelled_split: str | None, given_label_map: LabelMap | None) -> LabelledRows:
    """Rows -> group by id, keep the first (``duplicate_id``) -> label map (built from every
    unique row's landmark id, or ``given_label_map``) -> class index (``unknown_landmark``) ->
    dev split per class by hash of id. Nothing here reads an image.

    ``unlabelled_split`` (TFRecord input only): rows without any label go there, and
    non-landmark rows too when no row is labelled (see :class:`AssignLabel`).
    """
    out = config.output_dir
    unique = (
        all_rows
        | "KeyById" >> beam.Map(key_by_id)
        | "GroupById" >> beam.GroupByKey()
        | "KeepFirst" >> beam.ParDo(KeepFirst()).with_outputs(_REJECTED, main="rows")
    )

    if given_label_map is not None:
        label_map = pipeline | "GivenLabelMap" >> beam.Create([given_label_map])
    else:
        label_map = (
            unique.rows
            | "LandmarkIds" >> beam.FlatMap(landmark_ids_of)
            | "DistinctIds" >> beam.Distinct()
            | "CollectIds" >> beam.combiners.ToList()
            | "BuildLabelMap" >> beam.Map(build_label_map)
        )
    num_classes = label_map | "WriteLabelMap" >> beam.Map(write_label_map, out)

    side_inputs = [beam.pvalue.AsSingleton(label_map)]
    if unlabelled_split is not None:
        any_labelled = (
            unique.rows
            | "OnlyLabelled" >> beam.Filter(is_labelled)
            | "CountLabelled" >> beam.combiners.Count.Globally()
            | "AnyLabelled" >> beam.Map(is_positive)
        )
        side_inputs.append(beam.pvalue.AsSingleton(any_labelled))
    labelled = unique.rows | "AssignLabel" >> beam.ParDo(
        AssignLabel(main_split, unlabelled_split), *side_inputs
    ).with_outputs(_REJECTED, main="rows")
    rows = labelled.rows
    if config.dev_fraction > 0:
        rows = (
            rows
            | "KeyByClass" >> beam.Map(key_by_class)
            | "GroupByClass" >> beam.GroupByKey()
            | "DevSplit" >> beam.FlatMap(assign_dev_split, config.dev_fraction,
                                         main_split if unlabelled_split is not None else None)
        )
    return LabelledRows(rows, (unique[_REJECTED], labelled[_REJECTED]), num_classes)


def normalise_images(rows, config: IngestConfig, base_dir: str = "", spread: bool = True):
    """:class:`LabelledRow` s -> fetched (unless they carry their bytes) and normalised: a
    tagged result with ``written`` (:class:`WrittenImage`) and the rejections. ``spread``: a
    Reshuffle first, so the images are spread over workers (the archive input's rows arrive
    already spread by a join)."""
    if spread:
        rows = rows | "SpreadImages" >> beam.Reshuffle()
    return rows | "FetchAndNormalise" >> beam.ParDo(FetchAndNormalise(
        config.fetch_params(base_dir), config.normalise_params()
    )).with_outputs(_REJECTED, main="written")


def write_shards_rejected_and_counts(written, shards: dict[str, int], out: str, rejected: list,
                                     rows_in: list, num_classes) -> None:
    """The shards per split, ``rejected.csv`` and the counts file (:data:`COUNTS_FILENAME`).

    Args:
      written: :class:`WrittenImage` s (:func:`normalise_images`' ``written``).
      shards: split name -> number of shards.
      rejected: PCollections of :class:`Rejection`, every one of the run (the normaliser's
        too).
      rows_in: PCollections with one element per input row (each counts as a row in).
      num_classes: :attr:`LabelledRows.num_classes`.
    """
    for split, num_shards in shards.items():
        (
            written
            | f"Only_{split}" >> beam.Filter(has_split, split)
            | f"Serialized_{split}" >> beam.Map(serialized_of)
            | f"Write_{split}" >> beam.io.WriteToTFRecord(
                io_utils.join(out, split), file_name_suffix=".tfrecord", num_shards=num_shards)
        )

    all_rejected = (
        rejected
        | "AllRejected" >> beam.Flatten()
        | "CountRejected" >> beam.Map(count_rejection)
    )
    (
        all_rejected
        | "RejectedCsv" >> beam.Map(rejection_csv_line)
        | "WriteRejected" >> beam.io.WriteToText(
            io_utils.join(out, REJECTED_FILENAME[: -len(".csv")]), file_name_suffix=".csv",
            shard_name_template="",
            num_shards=1, header=",".join(REJECTED_COLUMNS))
    )

    row_events = [rows | f"RowEvents{position}" >> beam.Map(row_in_event)
                  for position, rows in enumerate(rows_in)]
    events = (
        (
            *row_events,
            written | "WrittenEvents" >> beam.Map(written_event),
            all_rejected | "RejectedEvents" >> beam.Map(rejected_event),
        )
        | "AllEvents" >> beam.Flatten()
    )
    (
        events
        | "CountOutcomes" >> beam.CombineGlobally(CountOutcomes())
        | "WriteCounts" >> beam.Map(write_counts, beam.pvalue.AsSingleton(num_classes), out)
    )
