"""What would stop a GLDv2-size run, checked at a small size (each test fails if the hazard
comes back).

* A grouped step streams its large side: a group of 100 test images with 1 MB of descriptors
  each is verified with a memory peak of a few MB, not 100 MB (``tracemalloc``; numpy reports
  its buffers to it).
* A popular key is spread: a class that 120 test images predict, and a reference that 100 test
  images retrieve, are verified in several groups of bounded size, with the same scores as
  one group.
* On-demand reference features shuffle only the wanted images (the rest are filtered where they
  are read).
"""

from __future__ import annotations

import io
import tracemalloc

import numpy as np
from apache_beam import Create, Map
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_pipelines import grouping
from beam_pipelines.predict import knn, steps, transforms
from beam_pipelines.predict.elements import Neighbours, Vote
from beam_pipelines.predict.elements import TestQuery as Query
from rescoring.verification import VerificationParams, count_inliers
from tfrecords_schema.local_features import FeatureRecord

FEATURES = 24
MEGABYTE = 1 << 20


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(runner="FnApiRunner")


def _features(rng, image_id: str, label: int = -1, num: int = FEATURES) -> FeatureRecord:
    """Random keypoints; descriptors are shared unit rows so that pairs do match."""
    basis = np.eye(256, dtype=np.float32)
    return FeatureRecord(image_id, label, "orb", rng.uniform(0, 100, (num, 2)),
                         basis[rng.permutation(256)[:num]])


def _distributions(result) -> dict:
    query = result.metrics().query(MetricsFilter().with_namespace(transforms.NAMESPACE))
    return {item.key.metric.name: item.committed for item in query["distributions"]}


class _LazyGroup:
    """A re-iterable group ``(tag, value)`` whose large values are made on the fly (as a runner
    paging a large group from disk would): holding them all would cost ``count`` x their size."""

    def __init__(self, small, large_tag, make_large, count):
        self._small, self._large_tag = small, large_tag
        self._make_large, self._count = make_large, count

    def __iter__(self):
        yield from self._small
        for index in range(self._count):
            yield self._large_tag, self._make_large(index)


def _peak_while(consume) -> int:
    tracemalloc.start()
    try:
        consume()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---- groups are streamed ---------------------------------------------------------------------


def test_split_tagged_keeps_small_tags_and_streams_the_large_one():
    group = [("ref", 1), ("test", "a"), ("ref", 2), ("test", "b"), ("other", 9)]
    small, large = grouping.split_tagged(group, ("ref",), "test")
    assert small == {"ref": [1, 2]}
    assert list(large) == ["a", "b"]


def test_classifier_verification_streams_the_test_images_of_a_class():
    """100 test images of one class, 1 MB of float descriptors each (1000 x 256): the peak while
    verifying them stays under 10 MB (one test image and the class's references at a time),
    where gathering them would take 100 MB."""
    rng = np.random.default_rng(0)
    reference = _features(rng, "r", 0)
    vote = Vote(0, 0.5)

    def make_test(index):
        return Query(f"t{index}", vote, np.zeros((1000, 2), np.float32),
                         np.zeros((1000, 256), np.float32))

    group = _LazyGroup([(transforms.TAG_REFERENCES, reference)], transforms.TAG_TESTS,
                       make_test, 100)
    score = transforms.ScoreAgainstReferences(VerificationParams())
    outputs = []
    peak = _peak_while(lambda: outputs.extend(
        row.image_id for row in score.process(((0, 0), group))))
    assert len(outputs) == 100
    assert peak < 10 * MEGABYTE, f"peak {peak / MEGABYTE:.0f} MB: the group was gathered"


def test_knn_verification_streams_the_test_images_of_a_bucket():
    """The same for a kNN verification bucket: 100 test images, 1 MB each, one reference."""
    rng = np.random.default_rng(1)
    reference = _features(rng, "r", 0)
    params = knn.aggregation_params("knn", 3)
    neighbours = Neighbours(("r",), (0.9,), (0,))
    scores = knn.score_neighbours("t", neighbours, None, params, False)[1]

    def make_test(index):
        return knn.BucketTest(f"t{index}", scores, 1000, np.zeros((1000, 2), np.float32),
                              np.zeros((1000, 256), np.float32))

    group = _LazyGroup([(knn.TAG_REFERENCE, reference)], knn.TAG_TEST, make_test, 100)
    verify = knn.VerifyBucket(VerificationParams(), params, "knn")
    outputs = []
    peak = _peak_while(lambda: outputs.extend(row.image_id for row in verify.process((0, group))))
    assert len(outputs) == 100
    assert peak < 10 * MEGABYTE, f"peak {peak / MEGABYTE:.0f} MB: the bucket was gathered"


# ---- popular keys are spread -------------------------------------------------------------------


def _classifier_row(row):
    return row.image_id, row.class_index, row.local_max, row.local_mean, row.num_references


def _classifier_sizes(votes, features, references, expected, max_tests_per_group):
    """Runs ``Verify``; its rows must equal ``expected``; returns the group-size distribution."""
    with _pipeline() as p:
        scored = (
            {"votes": p | "Votes" >> Create(votes),
             "features": p | "Features" >> Create(features),
             "references": p | "References" >> Create(references)}
            | steps.Verify(VerificationParams(), max_tests_per_group=max_tests_per_group))
        assert_that(scored | Map(_classifier_row), equal_to(expected))
    return _distributions(p.result)["tests_per_group"]


def test_a_hot_class_is_verified_in_several_bounded_groups_with_the_same_scores():
    rng = np.random.default_rng(2)
    test_ids = [f"t{index:03d}" for index in range(126)]
    votes = [(image_id, Vote(0 if index < 120 else 1, 0.5))
             for index, image_id in enumerate(test_ids)]
    features = [(image_id, _features(rng, image_id)) for image_id in test_ids]
    references = [(0, _features(rng, "r0a", 0)), (0, _features(rng, "r0b", 0)),
                  (1, _features(rng, "r1", 1))]

    # Expected without Beam: each test image against its class's references.
    by_class = {0: [record for label, record in references if label == 0],
                1: [record for label, record in references if label == 1]}
    expected = []
    for (image_id, vote), (_, record) in zip(votes, features):
        query = Query(image_id, vote, record.locations, record.descriptors)
        expected.append(_classifier_row(transforms.score_query(
            query, vote.class_index, transforms.unique_references(by_class[vote.class_index]),
            VerificationParams())))
    assert any(row[2] > 0 for row in expected)

    single = _classifier_sizes(votes, features, references, expected, 10_000)
    spread = _classifier_sizes(votes, features, references, expected, 20)
    assert (single.count, single.max) == (2, 120)  # one group per class
    # ceil(120 / 20) = 6 sub-keys for class 0 (+ class 1's group), ~20 test images each.
    assert spread.count == 7 and spread.sum == 126
    assert spread.max <= 2 * 20


def _knn_row(row):
    return row.image_id, row.class_index, row.local_max, row.knn.neighbour_inliers


def _knn_sizes(tests, features, references, expected, tests_per_bucket):
    """Runs ``VerifyNeighbours``; its rows must equal ``expected``; returns the bucket sizes."""
    with _pipeline() as p:
        verified = (
            {"knn": p | "Knn" >> Create(tests),
             "features": p | "Features" >> Create(features),
             "references": p | "References" >> Create(references)}
            | steps.VerifyNeighbours(VerificationParams(), knn.aggregation_params("knn", 3),
                                     "knn", tests_per_bucket=tests_per_bucket))
        assert_that(verified["scored"] | Map(_knn_row), equal_to(expected))
    return _distributions(p.result)["knn_tests_per_bucket"]


def test_a_popular_reference_is_verified_in_many_buckets_with_the_same_scores():
    rng = np.random.default_rng(3)
    params = knn.aggregation_params("knn", 3)
    test_ids = [f"t{index:03d}" for index in range(100)]
    neighbours = Neighbours(("popular", "other"), (0.9, 0.8), (0, 1))
    tests = [knn.score_neighbours(image_id, neighbours, None, params, False)
             for image_id in test_ids]
    features = [(image_id, _features(rng, image_id)) for image_id in test_ids]
    references = [(0, _features(rng, "popular", 0)), (1, _features(rng, "other", 1))]

    # Expected without Beam: each test image verified against both neighbours, re-ranked.
    by_id = {record.image_id: record for _, record in references}
    expected = []
    for (image_id, scored), (_, record) in zip(tests, features):
        pairs = [(reference_id, count_inliers(record.locations, record.descriptors,
                                              by_id[reference_id].locations,
                                              by_id[reference_id].descriptors,
                                              VerificationParams()))
                 for reference_id in ("popular", "other")]
        expected.append(_knn_row(knn.rerank_scored(
            image_id, scored, record.num_features, pairs, params, "knn")[0]))
    assert any(max(row[3]) > 0 for row in expected)

    single = _knn_sizes(tests, features, references, expected, 10_000)
    spread = _knn_sizes(tests, features, references, expected, 10)
    assert (single.count, single.max) == (1, 100)
    # ceil(100 / 10) = 10 buckets; the popular reference is sent to each, once.
    assert spread.count == 10 and spread.sum == 100
    assert spread.max <= 2 * 10


# ---- move ids, not bytes -----------------------------------------------------------------------


def test_on_demand_features_filter_the_reference_images_where_they_are_read():
    """Of 60 reference images, the 2 wanted ones (and only they) go past the filter."""
    from tfrecords_schema.image_record import ImageRecord


    def jpeg(seed):
        pixels = np.random.default_rng(seed).integers(0, 255, (96, 96, 3), dtype=np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "JPEG")
        return buffer.getvalue()

    images = [ImageRecord(image_id=f"i{index:02d}", jpeg_bytes=jpeg(index), label=0,
                          height=96, width=96) for index in range(60)]
    wanted = [("i07", None), ("i42", None), ("i42", None)]
    with _pipeline() as p:
        featurised = (
            {"ids": p | "Ids" >> Create(wanted),
             "images": p | "Images" >> Create(images) | Map(knn.key_image_record)}
            | steps.FeaturiseRetrievedReferences("orb"))
        assert_that(featurised["features"] | Map(lambda keyed: keyed[0]),
                    equal_to(["i07", "i42"]))
    query = p.result.metrics().query(MetricsFilter().with_name("knn_reference_images_kept"))
    assert sum(item.committed for item in query["counters"]) == 2


def test_the_reference_sample_side_input_holds_one_threshold_per_class():
    """The per-class sample (K smallest sha1 keys) is selected through one threshold per class
    (~30 MB at 203k classes), not K (class, id) pairs, and picks exactly the K smallest keys
    (an id present twice: both copies, as before)."""
    from tfrecords_schema.image_record import ImageRecord

    from beam_pipelines.predict import reference_cache

    rng = np.random.default_rng(5)
    records = [ImageRecord(image_id=f"id{index:04d}", jpeg_bytes=b"", label=int(label),
                           height=1, width=1)
               for index, label in enumerate(rng.integers(0, 7, 400))]
    records.append(records[3])  # the same image twice
    k = 5
    keys: dict = {}
    for record in records:
        label, key = reference_cache._selection_key(record)
        keys.setdefault(label, []).append(key)
    thresholds = dict(reference_cache._class_threshold((label, sorted(values)[:k]))
                      for label, values in keys.items())
    assert len(thresholds) == 7  # one entry per class
    chosen = [record for record in records if reference_cache._is_selected(record, thresholds)]
    expected = []
    for label, values in keys.items():
        smallest = set(sorted(values)[:k])
        expected += [record for record in records
                     if record.label == label and reference_cache._selection_key(record)[1]
                     in smallest]
    assert sorted(r.image_id for r in chosen) == sorted(r.image_id for r in expected)
    assert 7 * k <= len(chosen) <= 7 * k + 1
