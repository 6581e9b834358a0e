"""The reusable reference-feature folder: when to reuse it, the Beam job that fills it (job A,
:class:`FeaturiseReferences`) and the step that reads it back in job B
(:class:`ReadReferenceFeatures`); with a retrieval recognizer, also the reference embeddings
(job A', :class:`EmbedReferenceImages`, read back by :class:`ReadReferenceEmbeddings`).

Folder layout (``--reference_features``)::

    features-00000-of-0000N.tfrecord   one tfrecords_schema.local_features record per reference
    metadata.json                      what made them (see :func:`cache_metadata`), written
                                       before the job starts ("complete": false) and again after
    extraction_errors.json             {"count", "causes"}: the extraction failures of the job
    _SUCCESS                           written last, only if the folder is complete
    embeddings/                        --recognizer knn / knn+classifier only:
      embeddings-00000-of-0000N.tfrecord   one record per reference image (every one, see below)
      counts.json                      rows, landmark and non-landmark rows, dimension
      metadata.json, _SUCCESS          as above, for the embeddings alone

The folder is reused only when ``_SUCCESS`` exists and ``metadata.json`` records the same
extractor spec and extractor parameters, references per class K, class count and reference-data
files (paths and sizes); otherwise it is emptied and recomputed. The launcher logs which, and
``stats.json`` says so. A folder is complete (``_SUCCESS``) only when no reference image failed
extraction and at least one gave features (:func:`finish`): features made while the extractor
failed are used by the run that made them but never reused, so the next run recomputes them.

Reference sample (deterministic, so reruns and other machines pick the same images): per class,
the K records with the smallest ``sha1(image_id)`` among records with ``0 <= label <
num_classes``. Selection runs on ids only (``Top.SmallestPerKey`` over ``(label, (sha1, id))``);
each class's K-th smallest key then filters the records through a dict side input (a record is
kept when its key is at most its class's threshold), so image bytes are never shuffled and the
side input holds one entry per class (~30 MB at GLDv2's 203,094 classes), not K per class.

Reference embeddings (``embeddings/``, :func:`embedding_cache_metadata`): *every* reference
record with a label in ``[-1, num_classes)`` (non-landmarks, label -1, included: they give the
kNN recognizers' non-landmark penalty), each embedded by ``embedding.keras`` from its whole
image (one view). The part is reused only when ``_SUCCESS`` exists and its ``metadata.json``
records the same embedding model (SHA-256 of the file's bytes, so a copied or re-downloaded
model still matches and a retrained one does not), image size, views, class count and
reference files; otherwise ``embeddings/`` alone is emptied and recomputed. It is complete only
when the job finished and embedded at least one landmark reference. The two parts are
independent: recomputing the local features keeps ``embeddings/`` and vice versa.
"""

from __future__ import annotations

import logging
from typing import Optional

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import io_utils
from beam_pipelines.predict import knn, steps, transforms
from beam_pipelines.predict.elements import DecodedImage, ReferenceEmbedding
from tfrecords_schema import SCHEMA_VERSION, InputError, SchemaError

_LOG = logging.getLogger(__name__)

METADATA_FILENAME = "metadata.json"
ERRORS_FILENAME = "extraction_errors.json"
FEATURES_PREFIX = "features"
FEATURES_SUFFIX = ".tfrecord"
EMBEDDINGS_DIRNAME = "embeddings"
EMBEDDINGS_PREFIX = "embeddings"
COUNTS_FILENAME = "counts.json"
FEATURES_REUSE_REASON = "extractor, K, classes and reference files match"
EMBEDDINGS_REUSE_REASON = "embedding model, image size, views, classes and reference files match"


def features_pattern(directory: str) -> str:
    return io_utils.join(directory, f"{FEATURES_PREFIX}-*{FEATURES_SUFFIX}")


def file_fingerprint(pattern: str) -> list[list]:
    """``[[path, size_in_bytes], ...]`` of the files matching ``pattern``, sorted by path."""
    try:
        results = FileSystems.match([pattern])
    except Exception as error:  # Beam raises BeamIOError for a bad pattern or bucket
        raise io_utils.storage_failure(pattern, error) from error
    return sorted([item.path, int(item.size_in_bytes)] for item in results[0].metadata_list)


def cache_metadata(
    extractor_spec: str, references_per_class: int, num_classes: int, reference_data: str
) -> dict:
    """The record that decides reuse (everything the cached features depend on)."""
    import dataclasses

    from rescoring import local_features

    params = dataclasses.asdict(local_features.ExtractorParams())  # what ExtractFeatures uses
    return {
        "schema_version": SCHEMA_VERSION,
        "extractor": extractor_spec,
        # Lists, not tuples: the comparison is with the JSON read back from metadata.json.
        "extractor_params": {key: list(value) if isinstance(value, tuple) else value
                             for key, value in params.items()},
        "references_per_class": int(references_per_class),
        "num_classes": int(num_classes),
        "reference_data": reference_data,
        "reference_files": file_fingerprint(reference_data),
    }


def embeddings_dir(directory: str) -> str:
    """The reference-embedding part of the cache folder ``directory``."""
    return io_utils.join(directory, EMBEDDINGS_DIRNAME)


def embeddings_pattern(embedding_directory: str) -> str:
    return io_utils.join(embedding_directory, f"{EMBEDDINGS_PREFIX}-*{FEATURES_SUFFIX}")


def file_digest(path: str) -> str:
    """SHA-256 (hex) of the bytes of ``path`` (local or ``gs://``), read in 16 MB chunks."""
    import hashlib

    digest = hashlib.sha256()
    with FileSystems.open(path) as handle:
        for chunk in iter(lambda: handle.read(16 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def embedding_cache_metadata(embedding_sha256: str, image_size: int, num_classes: int,
                             reference_data: str) -> dict:
    """The record that decides reuse of the reference embeddings."""
    return {
        "schema_version": SCHEMA_VERSION,
        "embedding_sha256": embedding_sha256,
        "image_size": int(image_size),
        "reference_views": knn.REFERENCE_VIEWS,
        "num_classes": int(num_classes),
        "reference_data": reference_data,
        "reference_files": file_fingerprint(reference_data),
    }


def reuse_decision(directory: str, wanted: dict, shards_pattern: Optional[str] = None,
                   matched: str = FEATURES_REUSE_REASON,
                   what: str = "reference features") -> tuple[bool, str]:
    """``(reuse, reason)``: reuse only a finished folder whose metadata equals ``wanted`` and
    that holds shards (``shards_pattern``, default the feature shards); ``matched`` is the
    reason given for a reuse, ``what`` names the contents in the other reasons."""
    import json

    if not io_utils.has_success_marker(directory):
        return False, f"no finished {what} in {directory}"
    metadata_path = io_utils.join(directory, METADATA_FILENAME)
    if not io_utils.exists(metadata_path):
        return False, f"{metadata_path} is missing"
    try:
        recorded = json.loads(io_utils.read_text(metadata_path))
    except ValueError as error:
        return False, f"{metadata_path} is not valid JSON ({error})"
    recorded_cmp = {key: recorded.get(key) for key in wanted if key != "reference_files"}
    wanted_cmp = {key: value for key, value in wanted.items() if key != "reference_files"}
    if recorded_cmp != wanted_cmp:
        differing = sorted(key for key in wanted_cmp if recorded_cmp.get(key) != wanted_cmp[key])
        return False, f"recorded {', '.join(differing)} differ from this run's"
    if [list(item) for item in recorded.get("reference_files", [])] != wanted["reference_files"]:
        return False, "the reference-data files changed (paths or sizes)"
    if not io_utils.match(shards_pattern or features_pattern(directory)):
        return False, f"no {what} shards in {directory}"
    return True, matched


def clear_for_recompute(directory: str, keep: tuple = (EMBEDDINGS_DIRNAME,)) -> None:
    """Empties ``directory`` for a recomputation, except its entries named in ``keep`` (the
    features keep ``embeddings/``), refusing a folder that is not a cache.

    A non-empty folder without ``metadata.json`` is probably not ours (a typo in
    ``--reference_features``): deleting it would be a nasty surprise.
    """
    metadata_path = io_utils.join(directory, METADATA_FILENAME)
    kept = [io_utils.join(directory, name).rstrip("/") for name in keep]
    contents = [
        path for path in io_utils.list_contents(directory)
        if not any(path.rstrip("/") == folder or path.startswith(folder + "/") for folder in kept)
    ]
    if contents and not io_utils.exists(metadata_path):
        raise InputError(
            f"--reference_features {directory} holds files but no {METADATA_FILENAME}; "
            "refusing to delete them, choose another folder"
        )
    if contents:
        FileSystems.delete(contents)
    if FileSystems.get_scheme(directory) is None and not io_utils.exists(directory):
        FileSystems.mkdirs(directory)  # object stores have no folders to make


def mark_in_progress(directory: str, metadata: dict) -> None:
    """Writes ``metadata.json`` with ``"complete": false`` before the featurisation job starts,
    so a folder left by a crashed job is recognised as a cache (and emptied) by the next run."""
    io_utils.write_json(io_utils.join(directory, METADATA_FILENAME),
                        dict(metadata, complete=False))


def finish(directory: str, metadata: dict, num_written: Optional[int],
           extraction_failures: int = 0, with_features: Optional[int] = None) -> bool:
    """Writes ``metadata.json`` after the featurisation job, then ``_SUCCESS`` only if the folder
    is complete: no extraction failure and (when known) at least one reference with features.
    Returns whether it is complete."""
    complete = extraction_failures == 0 and (with_features is None or with_features > 0)
    metadata = dict(metadata, num_features_records=num_written,
                    extraction_failures=int(extraction_failures),
                    with_features=with_features, complete=complete)
    io_utils.write_json(io_utils.join(directory, METADATA_FILENAME), metadata)
    if complete:
        io_utils.write_success_marker(directory)
    return complete


# ---- the Beam part -------------------------------------------------------------------------


_LABEL_OUT_OF_RANGE = beam.metrics.Metrics.counter(
    transforms.NAMESPACE, "reference_label_out_of_range")


def _is_candidate(record, num_classes: int) -> bool:
    """Labelled references only; non-landmarks (-1) are expected, a label beyond the label map
    means records and model disagree: counted and logged, never silently dropped."""
    if record.label >= num_classes:
        _LABEL_OUT_OF_RANGE.inc()
        _LOG.warning("reference %s has label %d outside the label map's %d classes; skipped",
                     record.image_id, record.label, num_classes)
        return False
    return record.label >= 0


def _selection_key(record) -> tuple[int, tuple[str, str]]:
    return int(record.label), (transforms.reference_sort_key(record.image_id), record.image_id)


def _class_threshold(element) -> tuple[int, tuple[str, str]]:
    """``(label, the K smallest selection keys)`` -> ``(label, the largest of them)``."""
    label, chosen = element
    return label, max(chosen)


def _is_selected(record, thresholds) -> bool:
    """A record is in its class's sample when its selection key is at most the class's K-th
    smallest: the same records as the K smallest keys themselves (an id present twice has one
    key, so both copies pass, as they did when the chosen pairs were looked up)."""
    threshold = thresholds.get(int(record.label))
    return threshold is not None and _selection_key(record)[1] <= threshold


class ParseRecord(beam.DoFn):
    """Serialised ``image_record`` -> ``ImageRecord`` (JPEG still encoded); bad ones counted."""

    def __init__(self):
        self._bad = beam.metrics.Metrics.counter(transforms.NAMESPACE, "reference_unparseable")

    def process(self, serialized: bytes):
        from tfrecords_schema import image_record

        try:
            yield image_record.parse_record(serialized)
        except SchemaError as error:
            self._bad.inc()
            _LOG.warning("reference record skipped: %s", error)


class DecodeRecord(beam.DoFn):
    """``ImageRecord`` -> ``DecodedImage``; an undecodable reference is counted and dropped."""

    def __init__(self):
        self._bad = beam.metrics.Metrics.counter(transforms.NAMESPACE, "reference_undecodable")

    def process(self, record):
        try:
            image = transforms.decode_rgb(record.jpeg_bytes)
        except ValueError as error:
            self._bad.inc()
            _LOG.warning("reference %s skipped: %s", record.image_id, error)
            return
        yield DecodedImage(record.image_id, int(record.label), image)


def _serialize(keyed_record) -> bytes:
    from tfrecords_schema.local_features import serialize_features

    return serialize_features(keyed_record[1])


def _write_errors(summary: dict, path: str) -> None:
    io_utils.write_json(path, summary)


class FeaturiseReferences(beam.PTransform):
    """Reference shards -> deterministic per-class sample -> local features -> TFRecords, and
    the extraction failures' summary -> ``extraction_errors.json`` in the same folder."""

    def __init__(self, reference_data: str, output_dir: str, extractor_spec: str,
                 references_per_class: int, num_classes: int):
        super().__init__()
        self._reference_data = reference_data
        self._output_dir = output_dir
        self._spec = extractor_spec
        self._k = references_per_class
        self._num_classes = num_classes

    def expand(self, pipeline):
        records = (
            pipeline
            | "ReadReferences" >> beam.io.ReadFromTFRecord(self._reference_data)
            | "ParseReferences" >> beam.ParDo(ParseRecord())
            | "KeepLabelled" >> beam.Filter(_is_candidate, self._num_classes)
        )
        selected = (
            records
            | "SelectionKeys" >> beam.Map(_selection_key)
            | "SmallestSha1PerClass" >> beam.combiners.Top.SmallestPerKey(self._k)
            | "ClassThresholds" >> beam.Map(_class_threshold)
        )
        featurised = (
            records
            | "KeepSelected" >> beam.Filter(_is_selected, beam.pvalue.AsDict(selected))
            | "DecodeReferences" >> beam.ParDo(DecodeRecord())
            | "ReferenceFeatures" >> steps.ExtractLocalFeatures(self._spec, "reference")
        )
        _ = featurised["errors"] | "WriteFailures" >> beam.Map(
            _write_errors, io_utils.join(self._output_dir, ERRORS_FILENAME))
        return (
            featurised["features"]
            | "SerializeFeatures" >> beam.Map(_serialize)
            | "WriteFeatures" >> beam.io.WriteToTFRecord(
                io_utils.join(self._output_dir, FEATURES_PREFIX), file_name_suffix=FEATURES_SUFFIX
            )
        )


def parse_reference(serialized: bytes, extractor_spec: str):
    """A cached feature record -> ``(class_index, FeatureRecord)``; ``SchemaError`` (failing the
    job) for a record another extractor made."""
    from tfrecords_schema.local_features import parse_features

    record = parse_features(serialized)
    if record.extractor != extractor_spec:
        raise SchemaError(
            f"reference feature {record.image_id!r} was made by {record.extractor!r}, "
            f"this run uses {extractor_spec!r}"
        )
    return record.label, record


class ReadReferenceFeatures(beam.PTransform):
    """The folder's feature shards (applied to the pipeline) -> ``(class_index,
    FeatureRecord)``, all made by ``extractor_spec`` (:func:`parse_reference`)."""

    def __init__(self, directory: str, extractor_spec: str):
        super().__init__()
        self._directory = directory
        self._spec = extractor_spec

    def expand(self, pipeline):
        return (
            pipeline
            | "Read" >> beam.io.ReadFromTFRecord(features_pattern(self._directory))
            | "Parse" >> beam.Map(parse_reference, self._spec)
        )


# ---- reference embeddings (the kNN recognizers) ---------------------------------------------

_KEY_ID = "image/id"
_KEY_LABEL = "image/label"
_KEY_MODEL = "embedding/model_sha256"
_KEY_VALUES = "embedding/values"


def serialize_embedding(reference: ReferenceEmbedding, model_sha256: str) -> bytes:
    """One reference embedding -> a serialised ``tf.train.Example`` (id, label, the embedding
    model's SHA-256, the D floats)."""
    import tensorflow as tf

    from tfrecords_schema.image_record import example_bytes

    feature = {
        _KEY_ID: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[reference.image_id.encode("utf-8")])),
        _KEY_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(reference.label)])),
        _KEY_MODEL: tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[model_sha256.encode("ascii")])),
        _KEY_VALUES: tf.train.Feature(float_list=tf.train.FloatList(
            value=np.asarray(reference.embedding, np.float32).reshape(-1).tolist())),
    }
    return example_bytes(tf.train.Example(features=tf.train.Features(feature=feature)))


def parse_embedding(serialized: bytes, model_sha256: str) -> ReferenceEmbedding:
    """A cached embedding record -> ``ReferenceEmbedding``; ``SchemaError`` (failing the job)
    for a record another embedding model made, or a malformed one."""
    import tensorflow as tf

    try:
        feature = tf.train.Example.FromString(serialized).features.feature
        image_id = feature[_KEY_ID].bytes_list.value[0].decode("utf-8")
        label = int(feature[_KEY_LABEL].int64_list.value[0])
        made_by = feature[_KEY_MODEL].bytes_list.value[0].decode("ascii")
        values = np.asarray(feature[_KEY_VALUES].float_list.value, np.float32)
    except Exception as error:  # protobuf's DecodeError, a missing key (IndexError)
        raise SchemaError(f"malformed reference embedding record: {error!r}") from error
    if made_by != model_sha256:
        raise SchemaError(
            f"reference embedding {image_id!r} was made by the embedding model with SHA-256 "
            f"{made_by[:12]}..., this run uses {model_sha256[:12]}...")
    return ReferenceEmbedding(image_id, label, values)


def _is_indexed(record, num_classes: int) -> bool:
    """Every reference with a label in ``[-1, num_classes)`` (non-landmarks included); a label
    beyond the label map is counted and logged."""
    if record.label >= num_classes:
        _LABEL_OUT_OF_RANGE.inc()
        _LOG.warning("reference %s has label %d outside the label map's %d classes; skipped",
                     record.image_id, record.label, num_classes)
        return False
    return record.label >= -1


class EmbeddingCountsFn(beam.CombineFn):
    """``ReferenceEmbedding`` s -> ``{"rows", "landmark", "non_landmark", "dims"}`` (``dims``:
    the distinct embedding lengths seen, one when the model is sound)."""

    def create_accumulator(self):
        return 0, 0, set()

    def add_input(self, accumulator, reference):
        rows, landmark, dims = accumulator
        dims.add(int(np.asarray(reference.embedding).size))
        return rows + 1, landmark + int(reference.label >= 0), dims

    def merge_accumulators(self, accumulators):
        rows, landmark, dims = 0, 0, set()
        for part_rows, part_landmark, part_dims in accumulators:
            rows, landmark = rows + part_rows, landmark + part_landmark
            dims |= part_dims
        return rows, landmark, dims

    def extract_output(self, accumulator):
        rows, landmark, dims = accumulator
        return {"rows": rows, "landmark": landmark, "non_landmark": rows - landmark,
                "dims": sorted(dims)}


def _write_counts(counts: dict, path: str) -> None:
    io_utils.write_json(path, counts)


class EmbedReferenceImages(beam.PTransform):
    """Reference shards -> every reference with a label in ``[-1, num_classes)`` -> its
    embedding (:class:`.steps.EmbedReferences`) -> TFRecords in ``output_dir``, and their
    counts -> ``counts.json`` (job A')."""

    def __init__(self, reference_data: str, output_dir: str, embedding_path: str,
                 embedding_sha256: str, image_size: int, batch_images: int, num_classes: int):
        super().__init__()
        self._reference_data = reference_data
        self._output_dir = output_dir
        self._embedding_path = embedding_path
        self._sha256 = embedding_sha256
        self._image_size = image_size
        self._batch_images = batch_images
        self._num_classes = num_classes

    def expand(self, pipeline):
        embeddings = (
            pipeline
            | "ReadReferences" >> beam.io.ReadFromTFRecord(self._reference_data)
            | "ParseReferences" >> beam.ParDo(ParseRecord())
            | "KeepIndexed" >> beam.Filter(_is_indexed, self._num_classes)
            | "DecodeReferences" >> beam.ParDo(DecodeRecord())
            | "EmbedReferences" >> steps.EmbedReferences(
                self._embedding_path, self._image_size, self._batch_images)
        )
        _ = (
            embeddings
            | "CountEmbeddings" >> beam.CombineGlobally(EmbeddingCountsFn())
            | "WriteCounts" >> beam.Map(
                _write_counts, io_utils.join(self._output_dir, COUNTS_FILENAME))
        )
        return (
            embeddings
            | "SerializeEmbeddings" >> beam.Map(serialize_embedding, self._sha256)
            | "WriteEmbeddings" >> beam.io.WriteToTFRecord(
                io_utils.join(self._output_dir, EMBEDDINGS_PREFIX),
                file_name_suffix=FEATURES_SUFFIX)
        )


def finish_embeddings(directory: str, metadata: dict, counts: Optional[dict],
                      embedding_path: str) -> bool:
    """Writes the embeddings' ``metadata.json`` after job A', then ``_SUCCESS`` only if it is
    complete: the counts were written, at least one landmark reference was embedded, and every
    embedding has the same length. Returns whether it is complete."""
    complete = bool(counts) and counts["landmark"] > 0 and len(counts["dims"]) == 1
    recorded = dict(metadata, embedding=embedding_path, counts=counts, complete=complete)
    io_utils.write_json(io_utils.join(directory, METADATA_FILENAME), recorded)
    if complete:
        io_utils.write_success_marker(directory)
    return complete


class ReadReferenceEmbeddings(beam.PTransform):
    """The cached embedding shards in ``directory`` (the ``embeddings/`` part; applied to the
    pipeline) -> ``ReferenceEmbedding``, all made by the model of ``embedding_sha256``
    (:func:`parse_embedding`)."""

    def __init__(self, directory: str, embedding_sha256: str):
        super().__init__()
        self._directory = directory
        self._sha256 = embedding_sha256

    def expand(self, pipeline):
        return (
            pipeline
            | "Read" >> beam.io.ReadFromTFRecord(embeddings_pattern(self._directory))
            | "Parse" >> beam.Map(parse_embedding, self._sha256)
        )
