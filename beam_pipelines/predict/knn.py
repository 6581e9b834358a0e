"""The retrieval recognizers' DoFns and element functions (``--recognizer knn`` and
``knn+classifier``), around :mod:`rescoring.retrieval`'s pure functions.

The named steps built from them are in :mod:`beam_pipelines.predict.steps` (``Embed``,
``EmbedReferences``, ``ShardIndex``, ``Retrieve``, ``ScoreNeighbours``, ``VerifyNeighbours``).
How the pieces fit, and the memory each holds:

* Reference index -> shards (:class:`MakeShards`): each reference embedding is keyed by a bucket,
  ``sha1(id) mod B`` with ``B = ceil(N / (0.9 * shard_size))`` (:func:`num_buckets`, N from the
  cache's counts); one ``GroupByKey`` gathers a bucket, whose rows are cut into shards of at most
  ``shard_size`` rows (a bucket holds 0.9 x shard_size rows on average, so a second shard is
  rare). A worker holds one shard while it builds it.
* Test batches x shards (:class:`SearchShard`): each batch of at most
  :data:`QUERY_BATCH_SIZE` test embeddings is replicated to every shard key (a side input holds
  the shard *keys* only, a few per 100k references), the shard and the batches are tagged and
  grouped by shard key (``Flatten`` + ``GroupByKey``: unlike ``CoGroupByKey``, which builds
  lists, the grouped values are iterated, so a runner that pages large groups never holds all
  the batches), and each (batch, shard) pair runs :func:`rescoring.retrieval.exact_top_k`.
  Memory per worker: one shard (``shard_size x D x 4`` bytes: 200 MB for 100k x 512, 800 MB
  for 100k x 2048) + one batch + ``exact_top_k``'s blocks (``256 x 16384`` similarities).
* Per test image, the shards' top-k lists are merged by ``CombinePerKey(MergeNeighboursFn)``
  (:func:`rescoring.retrieval.merge_top_k`): accumulators of k entries.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import NamedTuple, Optional

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from beam_pipelines import grouping
from beam_pipelines.predict.elements import (
    RECOGNIZER_KNN,
    RECOGNIZER_KNN_CLASSIFIER,
    STATUS_NO_FEATURES,
    STATUS_NO_NEIGHBOURS,
    STATUS_NO_REFERENCES,
    STATUS_SCORED,
    DecodedImage,
    IndexShard,
    KnnDetails,
    KnnScores,
    Neighbours,
    QueryBatch,
    ReferenceEmbedding,
    ScoredImage,
    Vote,
)
from beam_pipelines.predict.transforms import NAMESPACE, decode_rgb
from rescoring import crops, retrieval, scores, verification

_LOG = logging.getLogger(__name__)

QUERY_BATCH_SIZE = 256
"""Test embeddings per (batch, shard) search: one ``[256, D] x [D, block]`` product per block."""

SHARD_FILL = 0.9
"""Average fill of a bucket, as a fraction of ``--index_shard_size`` (see :func:`num_buckets`)."""

REFERENCE_VIEWS = 1
"""Views per reference image: the whole image (references are many; test images get
``--crops`` views)."""

TAG_SHARD = "shard"
TAG_QUERIES = "queries"


# ---- embeddings ---------------------------------------------------------------------------------


def combine_keyed(keyed_result):
    """``(key, PredictionResult with [V, D] view embeddings)`` -> ``(key, unit [D] float32)``
    (:func:`rescoring.retrieval.combine_view_embeddings`: views normalised, averaged,
    normalised again)."""
    key, result = keyed_result
    return key, retrieval.combine_view_embeddings(np.asarray(result.inference, np.float32))


def reference_views_keyed(image: DecodedImage, image_size: int):
    """A reference image -> ``((image_id, label), views [1, S, S, 3] uint8)``: the whole image."""
    spec = crops.CropSpec.for_num_views(REFERENCE_VIEWS)
    views = crops.make_views(image.image, image_size, spec, dtype=np.uint8)
    return (image.image_id, int(image.label)), views


def to_reference_embedding(keyed_embedding) -> ReferenceEmbedding:
    (image_id, label), embedding = keyed_embedding
    return ReferenceEmbedding(image_id, int(label), np.asarray(embedding, np.float32))


# ---- the index in shards -------------------------------------------------------------------------


def num_buckets(num_rows: int, shard_size: int) -> int:
    """``ceil(N / (SHARD_FILL * shard_size))``, at least 1."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    return max(1, math.ceil(max(int(num_rows), 0) / (SHARD_FILL * shard_size)))


def bucket_of(image_id: str, buckets: int) -> int:
    """A stable bucket of ``image_id`` in ``[0, buckets)`` (the same in every process):
    :func:`beam_pipelines.grouping.stable_bucket`."""
    return grouping.stable_bucket(image_id, buckets)


def key_by_bucket(reference: ReferenceEmbedding, buckets: int):
    return bucket_of(reference.image_id, buckets), reference


def make_shard(rows: list) -> IndexShard:
    """``ReferenceEmbedding`` s -> one :class:`IndexShard`, rows sorted by id."""
    rows = sorted(rows, key=lambda row: row.image_id)
    return IndexShard(
        ids=np.array([row.image_id for row in rows]),
        labels=np.array([row.label for row in rows], np.int64),
        vectors=np.stack([np.asarray(row.embedding, np.float32) for row in rows]),
    )


class MakeShards(beam.DoFn):
    """``(bucket, iterable of ReferenceEmbedding)`` -> ``((bucket, part), IndexShard)`` s of at
    most ``shard_size`` rows each, rows sorted by id within a shard.

    A reference id seen twice in the bucket (the same image twice in the reference data) is
    kept once. Counters: ``index_rows``, ``index_shards``, ``index_duplicate_ids``.
    """

    def __init__(self, shard_size: int):
        self._shard_size = int(shard_size)
        self._rows = Metrics.counter(NAMESPACE, "index_rows")
        self._shards = Metrics.counter(NAMESPACE, "index_shards")
        self._duplicates = Metrics.counter(NAMESPACE, "index_duplicate_ids")

    def process(self, element):
        bucket, references = element
        seen: set = set()
        rows: list = []
        part = 0
        for reference in references:
            if reference.image_id in seen:
                self._duplicates.inc()
                continue
            seen.add(reference.image_id)
            rows.append(reference)
            if len(rows) == self._shard_size:
                yield (bucket, part), make_shard(rows)
                self._rows.inc(len(rows))
                self._shards.inc()
                rows, part = [], part + 1
        if rows:
            self._rows.inc(len(rows))
            self._shards.inc()
            yield (bucket, part), make_shard(rows)


# ---- test batches x shards -----------------------------------------------------------------------


def to_query_batch(keyed_embeddings) -> QueryBatch:
    """``[(test_id, embedding [D])]`` (one ``BatchElements`` batch) -> :class:`QueryBatch`."""
    ids = tuple(image_id for image_id, _ in keyed_embeddings)
    vectors = np.stack([np.asarray(embedding, np.float32) for _, embedding in keyed_embeddings])
    return QueryBatch(ids, vectors)


def replicate_to_shards(batch: QueryBatch, shard_keys):
    """One ``(shard_key, (TAG_QUERIES, batch))`` per shard key (the keys: a side input)."""
    for key in shard_keys:
        yield key, (TAG_QUERIES, batch)


def tag_shard(keyed_shard):
    key, shard = keyed_shard
    return key, (TAG_SHARD, shard)


def _make_searcher(shard: IndexShard, approximate: bool):
    """``search(queries, k) -> (similarities, positions)`` over one shard: exact
    (:func:`rescoring.retrieval.exact_top_k`) or FAISS IVF (:mod:`rescoring.ann`)."""
    if not approximate:
        return lambda queries, k: retrieval.exact_top_k(queries, shard.vectors, k)
    from rescoring import ann

    lists = ann.default_num_lists(len(shard.ids))
    index = ann.make_index(shard.vectors, approximate=True, num_lists=lists,
                           num_probes=min(ann.DEFAULT_NUM_PROBES, lists))
    return index.search


class SearchShard(beam.DoFn):
    """``(shard_key, iterable of tagged values)`` -> ``(test_id, (similarities float32 [k'],
    ids str [k'], labels int64 [k']))``, one per test image of every batch in the group: the
    test image's top-k within that shard.

    The group holds one :data:`TAG_SHARD` value (the shard) and the :data:`TAG_QUERIES`
    batches; they are iterated twice (first to find the shard, then to search each batch), never
    copied into a list. Counters: ``retrieval_pairs`` ((batch, shard) searches),
    ``retrieval_queries`` (test images searched, once per shard).
    """

    def __init__(self, k: int, approximate: bool = False):
        self._k = int(k)
        self._approximate = bool(approximate)
        self._pairs = Metrics.counter(NAMESPACE, "retrieval_pairs")
        self._queries = Metrics.counter(NAMESPACE, "retrieval_queries")

    def process(self, element):
        _, values = element
        shards = [value for tag, value in values if tag == TAG_SHARD]  # one by construction
        for shard in shards:
            search = _make_searcher(shard, self._approximate)
            for tag, batch in values:
                if tag != TAG_QUERIES:
                    continue
                similarities, positions = search(batch.vectors, self._k)
                self._pairs.inc()
                self._queries.inc(len(batch.ids))
                for row, test_id in enumerate(batch.ids):
                    found = positions[row] >= 0  # FAISS marks unfilled slots with -1
                    kept = positions[row][found]
                    yield test_id, (np.asarray(similarities[row][found], np.float32),
                                    shard.ids[kept], shard.labels[kept])


class MergeNeighboursFn(beam.CombineFn):
    """Top-k lists of one test image (one per shard) -> its :class:`Neighbours`.

    A Top-style combiner: the accumulator is a top-k list ``(similarities, ids, labels)`` and
    every merge is :func:`rescoring.retrieval.merge_top_k` (similarity descending, ties by id;
    associative and commutative, so any split of the shards gives the same answer); the labels
    follow their ids.
    """

    def __init__(self, k: int):
        self._k = int(k)

    def create_accumulator(self):
        return (np.zeros([0], np.float32), np.zeros([0], np.str_), np.zeros([0], np.int64))

    def _merge(self, lists):
        lists = [item for item in lists if len(item[0])]
        if not lists:
            return self.create_accumulator()
        labels = {}
        for _, ids, list_labels in lists:
            labels.update(zip(ids.tolist(), list_labels.tolist()))
        sims, ids = retrieval.merge_top_k([(item[0], item[1]) for item in lists], self._k)
        return sims, ids, np.array([labels[image_id] for image_id in ids.tolist()], np.int64)

    def add_input(self, accumulator, element):
        return self._merge([accumulator, element])

    def merge_accumulators(self, accumulators):
        return self._merge(list(accumulators))

    def extract_output(self, accumulator):
        sims, ids, labels = accumulator
        return Neighbours(tuple(str(image_id) for image_id in ids.tolist()),
                          tuple(float(value) for value in sims.tolist()),
                          tuple(int(label) for label in labels.tolist()))


# ---- class scores from the neighbours ------------------------------------------------------------


def aggregation_params(recognizer: str, k: int) -> retrieval.AggregationParams:
    """The rule of ``recognizer`` with ``k`` voting neighbours: ``knn`` = GLR-2019 (votes
    ``2 s - 1``), ``knn+classifier`` = GLR-2020 3rd place (votes ``s ** 9 * p ** 10``, p the
    classifier's mean probability of the class if among its top 5, else 1e-8)."""
    if recognizer == RECOGNIZER_KNN:
        return dataclasses.replace(retrieval.AggregationParams.glr2019(), k=int(k))
    if recognizer == RECOGNIZER_KNN_CLASSIFIER:
        return dataclasses.replace(retrieval.AggregationParams.glr2020_third(), k=int(k))
    raise ValueError(f"no kNN aggregation for recognizer {recognizer!r}")


def split_neighbours(neighbours: Neighbours, penalty: float):
    """``(landmark positions in the list, penalised landmark similarities, landmark labels)``:
    :func:`rescoring.retrieval.split_non_landmarks` then :func:`~rescoring.retrieval.penalise`."""
    positions = [index for index, label in enumerate(neighbours.labels)
                 if label != retrieval.NON_LANDMARK_LABEL]
    landmark_sims, landmark_labels, _ = retrieval.split_non_landmarks(
        neighbours.similarities, neighbours.labels)
    return positions, retrieval.penalise(landmark_sims, penalty), landmark_labels


def score_neighbours(test_id: str, neighbours: Optional[Neighbours], vote: Optional[Vote],
                     params: retrieval.AggregationParams, with_classifier: bool):
    """One test image's :class:`KnnScores`.

    The non-landmark neighbours (label -1) give the penalty
    (:func:`rescoring.retrieval.non_landmark_penalty`, the mean of their similarities) that is
    subtracted from the landmark neighbours' similarities (:func:`~rescoring.retrieval.penalise`);
    only landmark neighbours vote (:func:`~rescoring.retrieval.class_scores_from_neighbours`).
    With the classifier, each vote is multiplied by the classifier's mean probability over the
    views of that class to the power 10 when the class is among the classifier's top 5
    (``vote.class_votes``, :func:`rescoring.voting.top_mean_probabilities`), else by
    ``missing_confidence`` (1e-8) to the power 10.
    """
    neighbours = neighbours or Neighbours()
    _, _, non_landmark_sims = retrieval.split_non_landmarks(
        neighbours.similarities, neighbours.labels)
    penalty = retrieval.non_landmark_penalty(non_landmark_sims)
    _, penalised, labels = split_neighbours(neighbours, penalty)
    confidences = None
    if with_classifier:
        confidences = dict(vote.class_votes) if vote is not None else {}
    verdict = retrieval.class_scores_from_neighbours(penalised, labels, params, confidences)
    return test_id, KnnScores(
        neighbours=neighbours, penalty=float(penalty), class_confidences=confidences,
        knn_class=verdict.best_class, knn_score=float(verdict.score),
        per_class=dict(verdict.per_class), vote=vote)


def score_keyed(element, params):
    """``(test_id, Neighbours)`` -> ``(test_id, KnnScores)`` without a classifier (``knn``)."""
    test_id, neighbours = element
    return score_neighbours(test_id, neighbours, None, params, False)


def score_joined(element, params, with_classifier: bool):
    """``(test_id, {"neighbours": [Neighbours], "votes": [Vote]})`` -> ``(test_id, KnnScores)``
    (a duplicated test id: its first neighbour list and most confident vote)."""
    test_id, grouped = element
    neighbours = next(iter(grouped.get("neighbours", ())), None)
    vote = min(grouped.get("votes", ()), key=lambda vote: (-vote.confidence, vote.class_index),
               default=None)
    if with_classifier and vote is None:
        return  # not a readable test image of this run: nothing to score
    yield score_neighbours(test_id, neighbours, vote, params, with_classifier)


# ---- verification of each (test image, neighbour) pair -------------------------------------------
#
# The pairs are verified in buckets of test images (VerifyNeighbours): a test image's features
# travel once, to its bucket; each retrieved reference's features travel once per bucket that
# needs them (never more than once per test image, far fewer for a popular reference); a
# bucket holds its references and streams its test images. A popular reference is thereby
# spread over every bucket that retrieved it instead of one worker.

TESTS_PER_BUCKET = 64
"""Test images per verification bucket (on average): the bucket holds the features of at
most ``64 x k`` references (k = 5: 320 records, ~13 MB of packed ORB, ~54 MB of DELF)."""

TAG_TEST = "test"
TAG_REFERENCE = "reference"
TAG_MISSING = "missing"
TAG_WANTED = "wanted"


class BucketTest(NamedTuple):
    """A test image in its verification bucket: its kNN scores and its local features."""

    test_id: str
    knn: KnnScores
    num_features: int
    locations: np.ndarray
    descriptors: np.ndarray


def num_test_buckets(num_test_images: int, tests_per_bucket: int = TESTS_PER_BUCKET) -> int:
    """``ceil(n / tests_per_bucket)``, at least 1."""
    return max(1, math.ceil(int(num_test_images) / int(tests_per_bucket)))


def landmark_neighbour_ids(neighbours: Neighbours) -> list:
    """The distinct ids of the landmark neighbours (label != -1), in list order."""
    seen: dict = {}
    for reference_id, label in zip(neighbours.ids, neighbours.labels):
        if label != retrieval.NON_LANDMARK_LABEL:
            seen.setdefault(reference_id, None)
    return list(seen)


def bucket_test(element, num_test_images: int, tests_per_bucket: int = TESTS_PER_BUCKET):
    """``(test_id, {"knn": [KnnScores], "features": [FeatureRecord]})`` -> ``(bucket,
    BucketTest)`` and, tagged :data:`TAG_WANTED`, one ``(reference_id, bucket)`` per distinct
    landmark neighbour (none when the test image has no local features).

    A duplicated test id keeps its record with most features. A readable test image without
    neighbours (none retrieved) gets empty :class:`KnnScores`, so it still gets its row.
    ``num_test_images`` (a side input: the number of joined test ids) sets the bucket count
    (:func:`num_test_buckets`).
    """
    test_id, grouped = element
    knn = next(iter(grouped["knn"]), None)
    record = None
    for candidate in grouped["features"]:
        if record is None or candidate.num_features > record.num_features:
            record = candidate
    if knn is None and record is None:
        return
    scored = knn if knn is not None else KnnScores(Neighbours(), 0.0, None, None, 0.0, {})
    bucket = bucket_of(test_id, num_test_buckets(num_test_images, tests_per_bucket))
    if record is None or record.num_features == 0:
        yield bucket, BucketTest(test_id, scored, 0, np.zeros((0, 2), np.float32),
                                 np.zeros((0, 1), np.float32))
        return
    yield bucket, BucketTest(test_id, scored, record.num_features, record.locations,
                             record.descriptors)
    for reference_id in landmark_neighbour_ids(scored.neighbours):
        yield beam.pvalue.TaggedOutput(TAG_WANTED, (reference_id, bucket))


def key_reference_by_id(keyed_record):
    """``(class_index, FeatureRecord)`` -> ``(image_id, FeatureRecord)``."""
    return keyed_record[1].image_id, keyed_record[1]


def reference_id_only(keyed):
    """``(reference_id, anything)`` -> ``(reference_id, None)``: the id alone, so that a join on
    ids shuffles no features."""
    return keyed[0], None


def uncached_ids(element):
    """``(reference_id, iterable of (tag, None))`` with tags ``wanted`` / ``cached`` (a
    :class:`beam_pipelines.grouping.TaggedJoin` of ids only) -> ``reference_id`` of a wanted
    reference whose features are not in the cache."""
    reference_id, tagged = element
    wanted = cached = False
    for tag, _ in tagged:
        wanted = wanted or tag == "wanted"
        cached = cached or tag == "cached"
    if wanted and not cached:
        yield reference_id


def id_with_none(image_id: str):
    """``image_id`` -> ``(image_id, None)``: an id as a key with nothing to carry."""
    return image_id, None


def key_image_record(record):
    """``ImageRecord`` -> ``(image_id, ImageRecord)`` (JPEG still encoded)."""
    return record.image_id, record


class KeepWantedImages(beam.DoFn):
    """``(image_id, ImageRecord)`` -> the same, only for ids in the side input ``wanted`` (an
    iterable of ids, turned into a set once per worker): reference images nobody retrieved are
    dropped before any shuffle. Counter ``knn_reference_images_kept``."""

    def __init__(self):
        self._wanted_source = None
        self._wanted: frozenset = frozenset()
        self._kept = Metrics.counter(NAMESPACE, "knn_reference_images_kept")

    def process(self, keyed_record, wanted):
        if wanted is not self._wanted_source:
            self._wanted_source, self._wanted = wanted, frozenset(wanted)
        if keyed_record[0] in self._wanted:
            self._kept.inc()
            yield keyed_record


class DecodeRetrievedImage(beam.DoFn):
    """``(reference_id, iterable of (tag, value))`` with tags ``wanted`` (None) and ``images``
    (ImageRecord) -> ``DecodedImage`` of a wanted reference, once per distinct id (the image
    with the smallest JPEG bytes when the id is in the reference data twice).

    Counters: ``knn_references_featurised_on_demand`` (decoded, handed to the extractor),
    ``knn_references_missing`` (wanted, but no such id in the reference data),
    ``knn_references_undecodable``.
    """

    def __init__(self):
        self._featurised = Metrics.counter(NAMESPACE, "knn_references_featurised_on_demand")
        self._missing = Metrics.counter(NAMESPACE, "knn_references_missing")
        self._undecodable = Metrics.counter(NAMESPACE, "knn_references_undecodable")

    def process(self, element):
        reference_id, tagged = element
        wanted = False
        record = None
        for tag, value in tagged:
            if tag == "wanted":
                wanted = True
            elif record is None or value.jpeg_bytes < record.jpeg_bytes:
                record = value
        if not wanted:
            return
        if record is None:
            self._missing.inc()
            _LOG.warning("retrieved reference %s is not in the reference data", reference_id)
            return
        try:
            image = decode_rgb(record.jpeg_bytes)
        except ValueError as error:
            self._undecodable.inc()
            _LOG.warning("retrieved reference %s is undecodable: %s", reference_id, error)
            return
        self._featurised.inc()
        yield DecodedImage(record.image_id, int(record.label), image)


UNVERIFIED_NOT_FEATURISED = "not_featurised"
"""Why a pair is unverified: its reference has no feature record, neither cached nor made on
demand (not in the reference data, or undecodable)."""
UNVERIFIED_NO_FEATURES = "no_features"
"""Why a pair is unverified: its reference's record holds no local features (featureless
image, or the extractor failed on it)."""
UNVERIFIED_REASONS = (UNVERIFIED_NOT_FEATURISED, UNVERIFIED_NO_FEATURES)


class RouteReferenceToBuckets(beam.DoFn):
    """``(reference_id, iterable of (tag, value))`` with tags ``buckets`` (the buckets that
    retrieved it), ``cached`` and ``on_demand`` (its ``FeatureRecord`` s) -> for each bucket,
    ``(bucket, (TAG_REFERENCE, FeatureRecord))``, or ``(bucket, (TAG_MISSING, (reference_id,
    reason)))`` when it has no usable record (reasons: :data:`UNVERIFIED_REASONS`).

    The cached record takes precedence over one extracted on demand; among several, the one with
    most features. Holds the reference's records (a few) and streams its buckets.
    """

    def process(self, element):
        reference_id, tagged = element
        small, buckets = grouping.split_tagged(tagged, ("cached", "on_demand"), "buckets")
        records = small["cached"] or small["on_demand"]
        best = max(records, key=lambda record: record.num_features, default=None)
        if best is None:
            value = (TAG_MISSING, (reference_id, UNVERIFIED_NOT_FEATURISED))
        elif best.num_features == 0:
            value = (TAG_MISSING, (reference_id, UNVERIFIED_NO_FEATURES))
        else:
            value = (TAG_REFERENCE, best)
        for bucket in buckets:
            yield bucket, value


class VerifyBucket(beam.DoFn):
    """``(bucket, iterable of (tag, value))`` (:data:`TAG_TEST` ``BucketTest`` s,
    :data:`TAG_REFERENCE` ``FeatureRecord`` s, :data:`TAG_MISSING` ``(reference_id, reason)``)
    -> one ``ScoredImage`` per test image (:func:`rerank_scored`).

    Holds the bucket's references (those its test images retrieved) and streams its test
    images: each is compared with each of its landmark neighbours
    (:func:`rescoring.verification.count_inliers`), then re-ranked. A neighbour without usable
    features is not verified (counter ``knn_pairs_unverified`` and, by reason,
    ``knn_pairs_unverified_<reason>``; ``knn_pairs_verified`` otherwise).
    """

    def __init__(self, verification_params, params: retrieval.AggregationParams,
                 recognizer: str):
        self._verification = verification_params
        self._params = params
        self._recognizer = recognizer
        self._verified = Metrics.counter(NAMESPACE, "knn_pairs_verified")
        self._unverified = Metrics.counter(NAMESPACE, "knn_pairs_unverified")
        self._reasons = {reason: Metrics.counter(NAMESPACE, f"knn_pairs_unverified_{reason}")
                         for reason in UNVERIFIED_REASONS}
        self._group_sizes = Metrics.distribution(NAMESPACE, "knn_tests_per_bucket")

    def process(self, element):
        _, tagged = element
        small, tests = grouping.split_tagged(tagged, (TAG_REFERENCE, TAG_MISSING), TAG_TEST)
        references = {}
        for record in small[TAG_REFERENCE]:
            references.setdefault(record.image_id, record)
        missing = dict(small[TAG_MISSING])
        count = 0
        for test in tests:
            count += 1
            pairs = []
            if test.num_features > 0:
                for reference_id in landmark_neighbour_ids(test.knn.neighbours):
                    reference = references.get(reference_id)
                    if reference is None:
                        reason = missing.get(reference_id, UNVERIFIED_NOT_FEATURISED)
                        self._unverified.inc()
                        self._reasons[reason].inc()
                        continue
                    inliers = verification.count_inliers(
                        test.locations, test.descriptors, reference.locations,
                        reference.descriptors, self._verification)
                    self._verified.inc()
                    pairs.append((reference_id, int(inliers)))
            yield rerank_scored(test.test_id, test.knn, test.num_features, pairs,
                                self._params, self._recognizer)[0]
        if count:
            self._group_sizes.update(count)


def blend_confidence(knn: KnnScores, final_class, params: retrieval.AggregationParams) -> float:
    """What ``final_score`` blends in place of the classifier's confidence.

    ``knn``: the final class's kNN similarity score (votes without inliers) divided by k,
    clipped to [0, 1]. ``knn+classifier``: the classifier's mean probability of the final class
    when it is among the classifier's top 5, else ``missing_confidence`` (1e-8): the factor its
    votes were weighted with.
    """
    if final_class is None:
        return 0.0
    if knn.class_confidences is not None:
        return float(knn.class_confidences.get(final_class, params.missing_confidence))
    return float(min(max(knn.per_class.get(final_class, 0.0) / params.k, 0.0), 1.0))


def rerank_scored(test_id: str, knn: KnnScores, num_features: int, inlier_pairs,
                  params: retrieval.AggregationParams, recognizer: str):
    """One test image's final answer: ``(ScoredImage with KnnDetails, RerankedScores)``, the
    second with every class's re-ranked score (``landmarks-query`` lists them as candidates).

    :func:`rescoring.retrieval.rerank_with_inliers` on the penalised landmark neighbours with
    their inlier counts (0 when not verified) gives the final class; its voting neighbours'
    inliers give the local columns (:func:`rescoring.scores.aggregate`). Status: no landmark
    neighbour -> ``no_landmark_neighbours`` (no prediction); featureless test image ->
    ``no_features``; no neighbour verified -> ``no_references``; else ``scored``. Labels are
    still class indices.

    ``inlier_pairs``: ``(reference_id, inlier count)`` of the verified neighbours.
    """
    inliers = {}
    for reference_id, count in inlier_pairs:
        inliers[reference_id] = max(count, inliers.get(reference_id, 0))
    neighbours = knn.neighbours
    positions, penalised, labels = split_neighbours(neighbours, knn.penalty)
    counts = [inliers.get(neighbours.ids[index], 0) for index in positions]
    reranked = retrieval.rerank_with_inliers(penalised, labels, counts, params,
                                             class_confidences=knn.class_confidences)
    final_class = reranked.best_class
    verified = sum(1 for index in positions if neighbours.ids[index] in inliers)
    if final_class is None:
        status = STATUS_NO_NEIGHBOURS
    elif num_features == 0:
        status = STATUS_NO_FEATURES
    elif verified == 0:
        status = STATUS_NO_REFERENCES
    else:
        status = STATUS_SCORED
    local_max, local_mean, local_best_half = (
        float(value) for value in scores.aggregate(reranked.best_class_inliers))
    confidence = blend_confidence(knn, final_class, params)
    shares = knn.class_confidences
    details = KnnDetails(
        recognizer=recognizer,
        knn_label=knn.knn_class,
        knn_score=knn.knn_score,
        confidence=confidence,
        neighbour_ids=neighbours.ids,
        neighbour_similarities=neighbours.similarities,
        neighbour_labels=neighbours.labels,
        neighbour_inliers=tuple(int(inliers.get(image_id, 0)) for image_id in neighbours.ids),
        neighbour_confidences=(() if shares is None else tuple(
            float(shares.get(label, params.missing_confidence)) for label in neighbours.labels)),
        non_landmark_penalty=knn.penalty,
        nn_label=None if knn.vote is None else int(knn.vote.class_index),
        nn_confidence=None if knn.vote is None else float(knn.vote.confidence),
    )
    return ScoredImage(
        image_id=test_id,
        status=status,
        class_index=None if final_class is None else int(final_class),
        nn_confidence=confidence,
        local_max=local_max,
        local_mean=local_mean,
        local_best_half=local_best_half,
        num_features=int(num_features),
        num_references=int(verified),
        knn=details,
    ), reranked

