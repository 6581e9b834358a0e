"""The prediction jobs' DoFns and element functions, around ``rescoring``'s pure functions.

Each DoFn adapts one pure function (decode, make views, vote, extract, count inliers,
aggregate, blend) to Beam: it unpacks the element, calls the function, counts the outcome with
a Beam counter, and routes bad input to a tagged output instead of failing the job. The named
composite steps built from them are in :mod:`beam_pipelines.predict.steps`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
from typing import Optional

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.metrics import Metrics
from PIL import Image, UnidentifiedImageError

from beam_pipelines import grouping
from beam_pipelines.predict.elements import (
    STATUS_NO_FEATURES,
    STATUS_NO_REFERENCES,
    STATUS_SCORED,
    STATUS_UNREADABLE,
    Candidacy,
    DecodedImage,
    FinalRow,
    ScoredImage,
    TestQuery,
    Unreadable,
    Vote,
)
from rescoring import candidates as candidates_lib
from rescoring import crops, local_features, scores, verification, voting
from tfrecords_schema import SchemaError, image_record
from tfrecords_schema.local_features import FeatureRecord

_LOG = logging.getLogger(__name__)
NAMESPACE = "landmarks_predict"

TAG_UNREADABLE = "unreadable"
PROGRESS_EVERY = 500  # images per worker between progress log lines
TAG_UNPARSEABLE = "unparseable"
TAG_EXTRACTION_FAILED = "extraction_failed"  # ExtractFeatures: one cause string per failed image

MAX_CAUSE_CHARS = 300

# Decoded images are already normalised by ingestion (RGB, upright, bounded size); this bound
# only protects a worker from a hostile record that bypassed ingestion.
_MAX_PIXELS = 64_000_000


def decode_rgb(jpeg_bytes: bytes) -> np.ndarray:
    """JPEG (or any Pillow format) bytes -> uint8 ``[H, W, 3]`` RGB.

    Raises:
      ValueError: the bytes are not a readable image, or the image is absurdly large.
    """
    try:
        with Image.open(io.BytesIO(jpeg_bytes)) as image:
            if image.width * image.height > _MAX_PIXELS:
                raise ValueError(f"image of {image.width}x{image.height} pixels is too large")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise ValueError(f"undecodable image: {error}") from error


def error_summary(error: BaseException) -> str:
    """``"<ErrorType>: <one line>"`` (at most :data:`MAX_CAUSE_CHARS` characters) of an error.

    TensorFlow's "Graph execution error:" messages put the cause on the last line before the
    ``[[{{node ...}}]]`` trailer (after the node and stack lines); others start with it.
    """
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if lines and lines[0].startswith("Graph execution error"):
        causes = [line for line in lines[1:] if not line.startswith("[[")]
        line = causes[-1] if causes else lines[0]
    else:
        line = lines[0] if lines else ""
    line = line.split(" [Op:", 1)[0]
    text = f"{type(error).__name__}: {line}" if line else type(error).__name__
    return text if len(text) <= MAX_CAUSE_CHARS else text[: MAX_CAUSE_CHARS - 3] + "..."


def check_features(output) -> tuple[np.ndarray, np.ndarray]:
    """An extractor's output as ``(locations [N, 2] float32, descriptors [N, D] float32 or packed
    uint8 [N, D / 8])`` (:mod:`rescoring.descriptors`), or
    ``ValueError`` saying why it is not usable (not a pair, wrong shapes, N differs, D = 0,
    values not finite). ``N`` may be 0."""
    if not isinstance(output, (tuple, list)) or len(output) != 2:
        raise ValueError(
            f"extractor returned {type(output).__name__}, not (locations, descriptors)")
    try:
        locations = np.asarray(output[0], np.float32)
        descriptors = np.asarray(output[1])
        if descriptors.dtype != np.uint8:  # packed binary descriptors stay packed
            descriptors = descriptors.astype(np.float32)
    except (TypeError, ValueError) as error:
        raise ValueError(f"extractor output is not numeric arrays: {error}") from error
    if locations.ndim != 2 or locations.shape[1] != 2:
        raise ValueError(f"locations must be [N, 2], got {list(locations.shape)}")
    if descriptors.ndim != 2 or descriptors.shape[0] != locations.shape[0]:
        raise ValueError(
            f"descriptors must be [N={locations.shape[0]}, D], got {list(descriptors.shape)}")
    if len(locations) and descriptors.shape[1] < 1:
        raise ValueError("descriptors have 0 dimensions")
    if not (np.isfinite(locations).all() and np.isfinite(descriptors).all()):
        raise ValueError("locations or descriptors hold NaN or infinite values")
    return locations, descriptors


def record_id_if_any(serialized: bytes) -> Optional[str]:
    """The ``image/id`` of a record that failed full parsing, if it still holds one."""
    try:
        feature = tf.train.Example.FromString(serialized).features.feature
    except Exception:  # protobuf's DecodeError has no stable public type
        return None
    values = feature[image_record.KEY_ID].bytes_list.value if image_record.KEY_ID in feature else []
    if len(values) != 1:
        return None
    try:
        return values[0].decode("utf-8") or None
    except UnicodeDecodeError:
        return None


class ParseAndDecode(beam.DoFn):
    """Serialised ``image_record`` -> ``DecodedImage``.

    Tagged outputs: ``unreadable`` -> ``Unreadable`` (the id is known: the image still gets a
    row), ``unparseable`` -> a reason string (not even an id: counted and logged). A record of
    another layout (e.g. DELF's) is unreadable with a reason naming the layout and the
    ``landmarks-ingest --input_tfrecords`` command that converts ``source`` (the input glob).
    """

    def __init__(self, role: str, source: str = ""):
        self._role = role
        self._source = source
        self._decoded = Metrics.counter(NAMESPACE, f"{role}_decoded")
        self._unreadable = Metrics.counter(NAMESPACE, f"{role}_unreadable")
        self._unparseable = Metrics.counter(NAMESPACE, f"{role}_unparseable")
        self._undecodable = Metrics.counter(NAMESPACE, f"{role}_undecodable")

    def process(self, serialized: bytes):
        try:
            record = image_record.parse_record(serialized, source=self._source)
        except SchemaError as error:
            image_id = record_id_if_any(serialized)
            if image_id is None:
                self._unparseable.inc()
                _LOG.warning("%s record without a readable id skipped: %s", self._role, error)
                yield beam.pvalue.TaggedOutput(TAG_UNPARSEABLE, str(error))
            else:
                self._unreadable.inc()
                yield beam.pvalue.TaggedOutput(TAG_UNREADABLE, Unreadable(image_id, str(error)))
            return
        try:
            image = decode_rgb(record.jpeg_bytes)
        except ValueError as error:
            self._unreadable.inc()
            self._undecodable.inc()
            _LOG.warning("%s image %s unreadable: %s", self._role, record.image_id, error)
            yield beam.pvalue.TaggedOutput(TAG_UNREADABLE, Unreadable(record.image_id, str(error)))
            return
        self._decoded.inc()
        yield DecodedImage(record.image_id, int(record.label), image)


def make_views_keyed(image: DecodedImage, image_size: int, crop_spec):
    """``DecodedImage`` -> ``(image_id, views uint8 [V, S, S, 3])`` for the keyed model handler."""
    return image.image_id, crops.make_views(image.image, image_size, crop_spec, dtype=np.uint8)


def vote_keyed(keyed_result, class_votes: bool = False, rerank_top: int = 1):
    """``(image_id, PredictionResult with [V, C] probabilities)`` -> ``(image_id, Vote)``;
    with ``class_votes``, the vote also carries the classifier factor of the ``knn+classifier``
    rule (:func:`rescoring.voting.top_mean_probabilities`); with ``rerank_top`` K > 1, its K
    candidates (:func:`rescoring.candidates.top_candidates`)."""
    image_id, result = keyed_result
    probabilities = np.asarray(result.inference)
    class_index, confidence = voting.vote(probabilities)
    candidates = ()
    if rerank_top > 1:
        candidates = candidates_lib.top_candidates(probabilities, rerank_top)
    if not class_votes:
        return image_id, Vote(int(class_index), float(confidence), (), candidates)
    factors = tuple(voting.top_mean_probabilities(probabilities).items())
    return image_id, Vote(int(class_index), float(confidence), factors, candidates)


class ExtractFeatures(beam.DoFn):
    """``DecodedImage`` -> ``(image_id, FeatureRecord)``; the extractor is loaded once per worker.

    An extractor error on one image (or unusable output, see :func:`check_features`) yields a
    record with no features, so the image keeps its classifier score instead of failing the
    job; it is counted (``<role>_extraction_failed``) and its cause goes to the tagged output
    :data:`TAG_EXTRACTION_FAILED` (use ``.with_outputs(TAG_EXTRACTION_FAILED, main=...)``),
    from which the launcher reports the failed fraction and the most frequent cause. An
    extractor that does not load in a worker fails every image of that worker with that cause
    (loading is not retried per image).
    """

    def __init__(self, spec: str, role: str):
        self._spec = spec
        self._role = role
        self._extractor = None
        self._load_error = None
        self._features = Metrics.distribution(NAMESPACE, f"{role}_features_per_image")
        self._failed = Metrics.counter(NAMESPACE, f"{role}_extraction_failed")
        self._featureless = Metrics.counter(NAMESPACE, f"{role}_without_features")

    def setup(self):
        self._count = 0
        self._extractor = local_features.make_extractor(self._spec)
        self._load_error = None
        try:
            self._extractor.load()
        except Exception as error:  # noqa: BLE001 - hub.load raises OSError, KeyError, TF errors
            self._load_error = f"does not load in the worker: {error_summary(error)}"
            _LOG.error("extractor %s %s", self._spec, self._load_error)

    def process(self, image: DecodedImage):
        cause = self._load_error
        if cause is None:
            try:
                locations, descriptors = check_features(self._extractor.extract(image.image))
            # Any extractor failure (OpenCV's cv2.error, TF's OpError, ValueError) on one image
            # is counted, logged and reported; the image keeps its classifier score.
            except Exception as error:  # noqa: BLE001
                cause = error_summary(error)
                _LOG.warning("features of %s %s failed: %s", self._role, image.image_id, cause)
        if cause is not None:
            self._failed.inc()
            yield beam.pvalue.TaggedOutput(TAG_EXTRACTION_FAILED, cause)
            locations = np.zeros((0, 2), np.float32)
            descriptors = np.zeros((0, 1), np.float32)
        if len(locations) == 0:
            self._featureless.inc()
        self._features.update(int(len(locations)))
        self._count += 1
        if self._count % PROGRESS_EVERY == 0:
            _LOG.info("%s features: %d images done in this worker", self._role, self._count)
        yield image.image_id, FeatureRecord(
            image_id=image.image_id,
            label=int(image.label),
            extractor=self._extractor.spec,
            locations=locations,
            descriptors=descriptors,
        )


_NUMBER = re.compile(r"\d+(?:\.\d+)?")


def cause_key(cause: str) -> str:
    """Causes that differ only in numbers (a shape, a pixel value) are one cause."""
    return _NUMBER.sub("#", cause)


class ErrorSummaryFn(beam.CombineFn):
    """Failure causes -> ``{"count": n, "causes": [[example, count], ...]}``.

    Causes are grouped by :func:`cause_key` (numbers masked), each group shown by one example
    (its alphabetically first message, so the result does not depend on arrival order), most
    frequent first (ties: alphabetical), at most :attr:`TOP` groups. At most
    :attr:`MAX_DISTINCT` groups are tallied; failures of later new groups only count in
    ``count``.
    """

    TOP = 5
    MAX_DISTINCT = 100

    def create_accumulator(self):
        return 0, {}

    def _add(self, groups: dict, key: str, times: int, example: str) -> None:
        if key in groups:
            groups[key] = (groups[key][0] + times, min(groups[key][1], example))
        elif len(groups) < self.MAX_DISTINCT:
            groups[key] = (times, example)

    def add_input(self, accumulator, cause: str):
        count, groups = accumulator
        self._add(groups, cause_key(cause), 1, cause)
        return count + 1, groups

    def merge_accumulators(self, accumulators):
        total, merged = 0, {}
        for count, groups in accumulators:
            total += count
            for key, (times, example) in groups.items():
                self._add(merged, key, times, example)
        return total, merged

    def extract_output(self, accumulator):
        count, groups = accumulator
        ranked = sorted(groups.values(), key=lambda item: (-item[0], item[1]))[: self.TOP]
        return {"count": int(count),
                "causes": [[example, int(times)] for times, example in ranked]}


def join_vote_and_features(element):
    """``(image_id, {"votes": [Vote], "features": [FeatureRecord]})`` -> ``(class, TestQuery)``.

    Keyed by the predicted class for the join with that class's references. A duplicated test
    id (two records with one id) keeps one deterministic pair: the most confident vote and the
    record with most features.
    """
    image_id, grouped = element
    votes = sorted(grouped["votes"], key=lambda vote: (-vote.confidence, vote.class_index))
    if not votes:
        return
    records = sorted(grouped["features"], key=lambda record: -record.num_features)
    if records:
        locations, descriptors = records[0].locations, records[0].descriptors
    else:
        locations, descriptors = np.zeros((0, 2), np.float32), np.zeros((0, 1), np.float32)
    yield from candidate_queries(TestQuery(image_id, votes[0], locations, descriptors))


def candidate_queries(query: TestQuery):
    """``TestQuery`` -> ``(class_index, TestQuery)`` per class to verify: the vote's class
    alone (the recipe), or with ``--rerank_top K > 1`` one copy per candidate of
    ``query.vote.candidates``, keyed by its class, its ``rank`` set."""
    if not query.vote.candidates:
        yield query.vote.class_index, query
        return
    for rank, (class_index, _) in enumerate(query.vote.candidates):
        yield int(class_index), query._replace(rank=rank)


def query_confidence(query: TestQuery) -> float:
    """The confidence blended for this copy: its candidate's, or the vote's."""
    if not query.vote.candidates:
        return float(query.vote.confidence)
    return float(query.vote.candidates[query.rank][1])


def query_candidacy(query: TestQuery) -> Optional[Candidacy]:
    """Which candidate this copy is (None without candidates: the recipe)."""
    if not query.vote.candidates:
        return None
    return Candidacy(int(query.rank), len(query.vote.candidates), int(query.vote.class_index),
                     float(query.vote.confidence))


TAG_TESTS = "tests"
TAG_REFERENCES = "references"

HOT_CLASS_TESTS = 64
"""At most this many test images per worker group of one predicted class (``Verify``): a class
that more test images predict is split into ``ceil(n / 64)`` sub-keys, each with a copy of the
class's references. 64 test images x 32 references is ~2,000 comparisons, a few seconds."""


def test_query_id(query: TestQuery) -> str:
    """The id by which a test image picks its sub-key of a hot class."""
    return query.image_id


class ScoreAgainstReferences(beam.DoFn):
    """``((class, sub), iterable of (tag, value))`` (:class:`beam_pipelines.grouping.TaggedJoin`
    of :data:`TAG_TESTS` ``TestQuery`` s and :data:`TAG_REFERENCES` ``FeatureRecord`` s) ->
    ``ScoredImage`` s.

    Holds one class's references (at most K) and streams the test images of the group: they are
    never gathered (a class that thousands of test images predict is spread over sub-keys
    upstream, :class:`beam_pipelines.grouping.SpreadHotKeys`). Each test image is compared with
    every reference of its predicted class; the counts are aggregated (max, mean, mean of the
    best half) by :mod:`rescoring.scores`. Distribution ``tests_per_group``: test images per
    group (its max is bounded by the fan-out).
    """

    def __init__(self, verification_params):
        self._params = verification_params
        self._outcomes = {
            status: Metrics.counter(NAMESPACE, f"test_{status}")
            for status in (STATUS_SCORED, STATUS_NO_REFERENCES, STATUS_NO_FEATURES)
        }
        self._comparisons = Metrics.counter(NAMESPACE, "comparisons")
        self._group_sizes = Metrics.distribution(NAMESPACE, "tests_per_group")

    def process(self, element):
        (class_index, _), tagged_values = element  # keyed (class, sub-key) by SpreadHotKeys
        small, tests = grouping.split_tagged(tagged_values, (TAG_REFERENCES,), TAG_TESTS)
        references = unique_references(small[TAG_REFERENCES])
        _LOG.debug("class %s: %d references", class_index, len(references))
        count = 0
        for query in tests:
            count += 1
            scored = score_query(query, int(class_index), references, self._params)
            if scored.status == STATUS_SCORED:
                self._comparisons.inc(len(references))
            self._outcomes[scored.status].inc()
            yield scored
        if count:
            self._group_sizes.update(count)


def score_query(query: TestQuery, class_index: int, references, params,
                count_inliers=verification.count_inliers) -> ScoredImage:
    """One test image against the references of one class (its predicted class in the job):
    the inlier count against each (:func:`rescoring.verification.count_inliers`), aggregated
    (max, mean, mean of the best half; :func:`rescoring.scores.aggregate`).

    ``references``: that class's :func:`unique_references`. Also what ``landmarks-query``
    calls for its answer, so its scores are the job's; it passes a ``count_inliers`` that also
    keeps the matches (the same count, :func:`rescoring.verification.inlier_matches`).
    """
    counts: list[int] = []
    if query.num_features == 0:
        status = STATUS_NO_FEATURES
    elif not references:
        status = STATUS_NO_REFERENCES
    else:
        status = STATUS_SCORED
        for reference in references:
            counts.append(count_inliers(
                query.locations, query.descriptors, reference.locations, reference.descriptors,
                params))
    local_max, local_mean, local_best_half = (float(value) for value in scores.aggregate(counts))
    return ScoredImage(
        image_id=query.image_id,
        status=status,
        class_index=int(class_index),
        nn_confidence=query_confidence(query),
        local_max=local_max,
        local_mean=local_mean,
        local_best_half=local_best_half,
        num_features=query.num_features,
        num_references=len(references),
        candidate=query_candidacy(query),
    )


def unique_references(records) -> list:
    """One class's reference records with features, one per image id, in id order.

    A reference image present twice in the reference data would otherwise count twice in the
    mean and best-half columns.
    """
    by_id = {}
    for record in records:
        if record.num_features > 0 and record.image_id not in by_id:
            by_id[record.image_id] = record
    return [by_id[image_id] for image_id in sorted(by_id)]


def unreadable_to_scored(unreadable: Unreadable):
    """An unreadable test image: no prediction, every score 0."""
    return ScoredImage(unreadable.image_id, STATUS_UNREADABLE, None, 0.0, 0.0, 0.0, 0.0, 0, 0)


def local_scores(scored: ScoredImage) -> tuple[float, float, float]:
    """The row of ``rescoring.scores.COLUMNS`` of one image (raw aggregated inlier counts)."""
    return scored.local_max, scored.local_mean, scored.local_best_half


def blend_row(scored: ScoredImage, maxima, blend_weight: float, landmark_ids):
    """One image's final score (:func:`rescoring.scores.final_score` with the test-set maxima of
    :func:`local_scores`), labels mapped back to landmark ids.

    ``landmark_ids`` is the label map's tuple (class index -> original landmark id).

    A row of a kNN recognizer (``scored.knn`` set) blends ``scored.nn_confidence``, which is
    its ``KnnDetails.confidence``; its ``nn_label`` / ``nn_confidence`` columns are the
    classifier's crop vote (``knn+classifier``) or empty (``knn``).
    """
    knn = None if scored.knn is None else scored.knn.with_landmark_ids(landmark_ids)
    if scored.class_index is None:
        nn_label = knn.nn_label if knn is not None else None
        nn_confidence = knn.nn_confidence if knn is not None else 0.0
        return FinalRow(scored.image_id, scored.status, nn_label, nn_confidence, 0.0, 0.0, 0.0,
                        0.0, None, scored.num_features, scored.num_references, knn)
    landmark_id = int(landmark_ids[scored.class_index])
    candidate, candidate_confidence = scored.candidate, None
    nn_label, nn_confidence = landmark_id, scored.nn_confidence
    if candidate is not None:  # --rerank_top K > 1: the crop vote's columns stay the vote's
        candidate = candidate._replace(vote_class=int(landmark_ids[candidate.vote_class]))
        nn_label, nn_confidence = candidate.vote_class, candidate.vote_confidence
        candidate_confidence = scored.nn_confidence
    return FinalRow(
        image_id=scored.image_id,
        status=scored.status,
        nn_label=nn_label if knn is None else knn.nn_label,
        nn_confidence=nn_confidence if knn is None else knn.nn_confidence,
        local_max=scored.local_max,
        local_mean=scored.local_mean,
        local_best_half=scored.local_best_half,
        final_score=scores.final_score(
            scored.local_max, maxima[0], scored.nn_confidence, blend_weight),
        label=landmark_id,
        num_features=scored.num_features,
        num_references=scored.num_references,
        knn=knn,
        candidate=candidate,
        candidate_confidence=candidate_confidence,
    )


def is_candidate_row(row: FinalRow) -> bool:
    """A row of one of several candidates (``--rerank_top K > 1``)."""
    return row.candidate is not None


def is_not_candidate_row(row: FinalRow) -> bool:
    """A row that is its image's only one (an unreadable image's)."""
    return row.candidate is None


def key_by_image_id(row: FinalRow):
    return row.image_id, row


def candidate_preference(row: FinalRow) -> tuple:
    """:func:`rescoring.candidates.preference` of a candidate's row."""
    return candidates_lib.preference(row.final_score, row.candidate.rank)


class BestCandidateFn(beam.CombineFn):
    """One test image's candidate rows -> its answer: the row with the highest final score,
    equal scores to the earlier candidate (:func:`rescoring.candidates.pick_best`). The
    accumulator is one row; the rows are never gathered."""

    def create_accumulator(self):
        return None

    def _best(self, rows):
        return candidates_lib.pick_best((row for row in rows if row is not None),
                                        candidate_preference)

    def add_input(self, accumulator, row):
        return self._best((accumulator, row))

    def merge_accumulators(self, accumulators):
        return self._best(accumulators)

    def extract_output(self, accumulator):
        return accumulator


def reference_sort_key(image_id: str) -> str:
    """The deterministic sampling key of a reference image: ``sha1(id)`` in hex."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()
