"""Each named step of the prediction job (``beam_pipelines.predict.steps`` and
``reference_cache.ReadReferenceFeatures``) on a few inline elements, with Beam's ``TestPipeline``
on the in-process ``FnApiRunner``; the whole job is tested in ``test_predict.py``.

Elements holding numpy arrays are mapped to plain tuples before ``assert_that``.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from apache_beam import Create, Map
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from beam_pipelines.predict import reference_cache, steps, transforms
from beam_pipelines.predict.elements import DecodedImage, FinalRow, ScoredImage, Unreadable, Vote
from tfrecords_schema import image_record
from tfrecords_schema.local_features import FeatureRecord, serialize_features

LANDMARK_IDS = (11, 22, 33)


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(runner="FnApiRunner")


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _astronaut(side: int = 128) -> np.ndarray:
    import skimage.data

    return np.asarray(Image.fromarray(skimage.data.astronaut()).resize((side, side)), np.uint8)


# ---- ReadTestImages ---------------------------------------------------------------------------


def test_read_test_images_routes_readable_unreadable_and_unparseable(tmp_path):
    def record(image_id, jpeg, **kwargs):
        return image_record.ImageRecord(image_id=image_id, jpeg_bytes=jpeg, label=-1, height=16,
                                        width=16, **kwargs)

    good = _jpeg(np.full([16, 16, 3], 200, np.uint8))
    image_record.write_shards(
        [record("good", good), record("corrupt", b"\xff\xd8 not a jpeg"),
         record("old_schema", good, schema_version=99)],
        str(tmp_path / "test"))
    with tf.io.TFRecordWriter(str(tmp_path / "test-garbage.tfrecord")) as writer:
        writer.write(b"\x0a\xff\xff\xff garbage")  # not a tf.train.Example: no id

    with _pipeline() as p:
        test = p | steps.ReadTestImages(str(tmp_path / "test-*.tfrecord"))
        images = test["images"] | Map(lambda image: (image.image_id, image.label, image.image.shape))
        assert_that(images, equal_to([("good", -1, (16, 16, 3))]), label="images")
        unreadable = test["unreadable"] | "Ids" >> Map(lambda element: element.image_id)
        assert_that(unreadable, equal_to(["corrupt", "old_schema"]), label="unreadable")
        unparseable = test["unparseable"] | "Kinds" >> Map(lambda reason: type(reason).__name__)
        assert_that(unparseable, equal_to(["str"]), label="unparseable")


# ---- CropVote ---------------------------------------------------------------------------------


def test_vote_over_views_hand_computed():
    # a: three views vote class 1 at 0.5 (sum 1.5), one view class 0 at 0.875: class 1 wins,
    #    confidence 1.5 / 4 views = 0.375. b: class 2 at 0.5 and 0.75: (0.5 + 0.75) / 2 = 0.625.
    a = np.array([[0.875, 0.0625, 0.0625]] + [[0.25, 0.5, 0.25]] * 3, np.float32)
    b = np.array([[0.25, 0.25, 0.5], [0.125, 0.125, 0.75]], np.float32)
    with _pipeline() as p:
        votes = (p | Create([("a", PredictionResult(None, a)), ("b", PredictionResult(None, b))])
                 | steps.VoteOverViews())
        assert_that(votes, equal_to([("a", Vote(1, 0.375)), ("b", Vote(2, 0.625))]))


def test_crop_vote_runs_the_saved_model_on_each_images_views(tmp_path):
    """A tiny Keras model (32 px): the step equals views -> model -> vote for each image."""
    import keras

    from rescoring import crops, voting
    from trainer.preprocessing import ImageContract

    side = 32
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((side, side, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="softmax")])
    model_path = str(tmp_path / "model.keras")
    model.save(model_path)
    spec = crops.CropSpec.for_num_views(2)
    rng = np.random.default_rng(0)
    images = [DecodedImage(f"img{index}", -1, rng.integers(0, 256, [40, 48, 3], np.uint8))
              for index in range(3)]
    expected = {}
    for image in images:
        _, views = transforms.make_views_keyed(image, side, spec)
        probabilities = model.predict_on_batch(ImageContract(side).scale(views))
        expected[image.image_id] = voting.vote(np.asarray(probabilities))

    def check(votes):
        assert sorted(image_id for image_id, _ in votes) == sorted(expected)
        for image_id, vote in votes:
            assert vote.class_index == expected[image_id][0]
            assert vote.confidence == pytest.approx(expected[image_id][1], rel=1e-5)

    with _pipeline() as p:
        votes = p | Create(images) | steps.CropVote(model_path, side, 2, spec)
        assert_that(votes, check)


# ---- ExtractLocalFeatures ---------------------------------------------------------------------


def _feature_summary(element):
    image_id, record = element
    return image_id, record.image_id, record.extractor, record.num_features > 0


def test_extract_local_features_one_record_per_image():
    images = [DecodedImage("astronaut", 3, _astronaut()),
              DecodedImage("grey", -1, np.full([64, 64, 3], 128, np.uint8))]
    with _pipeline() as p:
        extracted = p | Create(images) | steps.ExtractLocalFeatures("orb", "test")
        assert_that(extracted["features"] | Map(_feature_summary), equal_to([
            ("astronaut", "astronaut", "orb", True), ("grey", "grey", "orb", False)]),
            label="features")
        assert_that(extracted["errors"], equal_to([{"count": 0, "causes": []}]), label="errors")


def test_extract_local_features_failures_give_empty_records_and_a_summary():
    spec = "delf:/no/such/module"

    def check_errors(summaries):
        [summary] = summaries
        [[cause, times]] = summary["causes"]
        assert (summary["count"], times) == (2, 2)
        assert cause.startswith("does not load in the worker: OSError"), cause

    images = [DecodedImage(name, -1, _astronaut(64)) for name in ("x", "y")]
    with _pipeline() as p:
        extracted = p | Create(images) | steps.ExtractLocalFeatures(spec, "test")
        assert_that(extracted["features"] | Map(_feature_summary), equal_to([
            ("x", "x", spec, False), ("y", "y", spec, False)]), label="features")
        assert_that(extracted["errors"], check_errors, label="errors")


# ---- ReadReferenceFeatures --------------------------------------------------------------------


def _write_references(directory, records) -> None:
    directory.mkdir()
    path = directory / f"{reference_cache.FEATURES_PREFIX}-00000-of-00001.tfrecord"
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(serialize_features(record))


def _reference(image_id, label, extractor="orb", num=3):
    return FeatureRecord(image_id, label, extractor, np.zeros([num, 2]), np.ones([num, 4]))


def test_read_reference_features_keyed_by_class(tmp_path):
    _write_references(tmp_path / "refs", [_reference("r0", 0), _reference("r1", 1, num=0)])
    with _pipeline() as p:
        references = (p | reference_cache.ReadReferenceFeatures(str(tmp_path / "refs"), "orb")
                      | Map(lambda keyed: (keyed[0], keyed[1].image_id, keyed[1].num_features)))
        assert_that(references, equal_to([(0, "r0", 3), (1, "r1", 0)]))


def test_read_reference_features_refuses_another_extractors(tmp_path):
    _write_references(tmp_path / "refs", [_reference("r0", 0, extractor="sift")])
    with pytest.raises(Exception, match="made by 'sift', this run uses 'orb'"):
        with _pipeline() as p:
            _ = p | reference_cache.ReadReferenceFeatures(str(tmp_path / "refs"), "orb")


# ---- Verify -----------------------------------------------------------------------------------

# Eight points in general position; unit descriptors that match only themselves (distinct basis
# vectors are sqrt(2) > 0.8 apart).
POINTS = np.array([[10, 20], [50, 80], [90, 30], [30, 60], [70, 10], [20, 90], [80, 70],
                   [60, 45]], np.float32)
BASIS = np.eye(16, dtype=np.float32)


def test_verify_hand_computed():
    def features(image_id, label, locations, descriptors):
        return FeatureRecord(image_id, label, "orb", locations, descriptors)

    no_locations, no_descriptors = np.zeros([0, 2]), np.zeros([0, 16])
    test_features = [
        ("q1", features("q1", -1, POINTS, BASIS[:8])),
        ("q2", features("q2", -1, no_locations, no_descriptors)),  # featureless
        ("q3", features("q3", -1, POINTS, BASIS[:8])),  # predicted class 1: no references
        ("q4", features("q4", -1, POINTS, BASIS[:8])),  # no vote: no row from this step
    ]
    votes = [("q1", Vote(0, 0.5)), ("q2", Vote(0, 0.75)), ("q3", Vote(1, 0.25))]
    references = [
        # The same features, translated: all 8 matches are affine inliers.
        (0, features("r_same", 0, POINTS + [5.0, -3.0], BASIS[:8])),
        (0, features("r_same", 0, POINTS + [5.0, -3.0], BASIS[:8])),  # a duplicate: counted once
        (0, features("r_other", 0, POINTS, BASIS[8:])),  # no descriptor matches: 0 inliers
        (0, features("r_empty", 0, no_locations, no_descriptors)),  # no features: not compared
        (2, features("r2", 2, POINTS, BASIS[:8])),  # a class no test image is predicted as
    ]
    from rescoring.verification import VerificationParams

    with _pipeline() as p:
        scored = (
            {"votes": p | "Votes" >> Create(votes),
             "features": p | "Features" >> Create(test_features),
             "references": p | "References" >> Create(references)}
            | steps.Verify(VerificationParams())
        )
        # q1 against r_other, r_same: counts [0, 8] -> max 8, mean 4, best half (1 of 2) 8.
        assert_that(scored, equal_to([
            ScoredImage("q1", "scored", 0, 0.5, 8.0, 4.0, 8.0, 8, 2),
            ScoredImage("q2", "no_features", 0, 0.75, 0.0, 0.0, 0.0, 0, 2),
            ScoredImage("q3", "no_references", 1, 0.25, 0.0, 0.0, 0.0, 8, 0),
        ]))


# ---- Blend ------------------------------------------------------------------------------------


def test_blend_hand_computed():
    # w = 0.25 and dyadic scores: exact. Test-set maximum of local_max: 8.
    scored = [
        ScoredImage("a", "scored", 0, 0.5, 8.0, 4.0, 6.0, 10, 2),  # 0.75 * 8/8 + 0.25 * 0.5
        ScoredImage("b", "scored", 1, 0.25, 2.0, 5.0, 2.0, 10, 2),  # 0.75 * 2/8 + 0.25 * 0.25
        ScoredImage("c", "no_references", 2, 0.5, 0.0, 0.0, 0.0, 10, 0),  # 0.25 * 0.5
        transforms.unreadable_to_scored(Unreadable("d", "undecodable")),
    ]
    with _pipeline() as p:
        rows = p | Create(scored) | steps.Blend(0.25, LANDMARK_IDS)
        assert_that(rows, equal_to([
            FinalRow("a", "scored", 11, 0.5, 8.0, 4.0, 6.0, 0.875, 11, 10, 2),
            FinalRow("b", "scored", 22, 0.25, 2.0, 5.0, 2.0, 0.25, 22, 10, 2),
            FinalRow("c", "no_references", 33, 0.5, 0.0, 0.0, 0.0, 0.125, 33, 10, 0),
            FinalRow("d", "unreadable", None, 0.0, 0.0, 0.0, 0.0, 0.0, None, 0, 0),
        ]))


# ---- WriteSubmission --------------------------------------------------------------------------


def test_write_submission_files(tmp_path):
    rows = [
        FinalRow("b", "scored", 22, 0.5, 8.0, 4.0, 6.0, 0.875, 22, 10, 2),
        FinalRow("a", "unreadable", None, 0.0, 0.0, 0.0, 0.0, 0.0, None, 0, 0),
        FinalRow("b", "scored", 11, 0.5, 2.0, 2.0, 2.0, 0.25, 11, 5, 2),  # duplicate id: lower
    ]
    errors = {"count": 1, "causes": [["ValueError: bad", 1]]}
    with _pipeline() as p:
        _ = ({"rows": p | "Rows" >> Create(rows),
              "unparseable": p | "Unparseable" >> Create(["no id"]),
              "extraction_errors": p | "Errors" >> Create([errors])}
             | steps.WriteSubmission(str(tmp_path)))
    assert (tmp_path / "submission.csv").read_text() == "id,landmarks\na,\nb,22 0.875\n"
    assert (tmp_path / "scores.csv").read_text().splitlines()[1:] == [
        "a,,0.0,0.0,0.0,0.0,0.0,", "b,22,0.5,8.0,4.0,6.0,0.875,22"]
    stats = json.loads((tmp_path / steps.PIPELINE_STATS_FILENAME).read_text())
    assert (stats["test_images"], stats["predicted"], stats["unreadable"]) == (2, 1, 1)
    assert (stats["duplicate_test_records"], stats["unparseable_test_records"]) == (1, 1)
    assert stats["test_extraction_errors"] == errors
