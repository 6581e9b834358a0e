"""landmarks-predict with a retrieval recognizer (``--recognizer knn`` / ``knn+classifier``).

Each named step of the kNN path (``Embed``, ``EmbedReferences``, ``ShardIndex``, ``Retrieve``,
``ScoreNeighbours``, ``VerifyNeighbours``) on a few inline elements with Beam's ``TestPipeline``
(``FnApiRunner``), then the whole job three times on ``test_predict.build_data``'s data: its
``embedding.keras`` is the fixture model's L2-normalised GeM output (as ``landmarks-train``
writes it), the reference data holds three views of landmarks 11 and 22 and one non-landmark
(``distractor``, a crop of the scene of ``test_c``, whose landmark 33 has no reference).

1. ``knn+classifier`` (FnApiRunner): embeds every reference into the cache.
2. ``knn`` (FnApiRunner): reuses the local features and the embeddings.
3. ``knn+classifier`` with another embedding model, in separate worker processes (DirectRunner
   ``multi_processing``): the embeddings are refused and recomputed, the features reused.

Every run: every test id once, counts reconcile, the neighbours are the true nearest references
(computed here without Beam, to float32 round-off), and every score of ``scores.csv`` is
recomputed from its own columns with ``rescoring.retrieval``'s and ``rescoring.scores``' pure
functions, and every landmark neighbour is verified: those outside the cached sample
(``--references_per_class`` 2 of 3) are featurised on demand, their inliers equal to
``rescoring``'s extractor + verification on the same images.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from apache_beam import Create, Map
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipelines import evaluate
from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import knn, pipeline, reference_cache, steps, transforms
from beam_pipelines.predict.elements import (
    DecodedImage,
    Neighbours,
    ReferenceEmbedding,
    Vote,
)
from rescoring import retrieval
from rescoring import scores as scores_lib
from test_predict import BLEND_WEIGHT, IMAGE_SIZE, _args, build_data
from tfrecords_schema.local_features import FeatureRecord

TOLERANCE = 1e-4  # float32 round-off of a forward pass in another batch composition


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(runner="FnApiRunner")


def _tiny_embedder(side: int = 32):
    import keras

    keras.utils.set_random_seed(0)
    return keras.Sequential([
        keras.Input((side, side, 3)), keras.layers.Conv2D(4, 3),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(8),
        keras.layers.UnitNormalization()])


def _unit_rows(rng, rows: int, dim: int) -> np.ndarray:
    return retrieval.l2_normalise(rng.normal(size=[rows, dim])).astype(np.float32)


# ---- Embed, EmbedReferences ---------------------------------------------------------------------


def test_embed_and_embed_references_combine_the_views(tmp_path):
    from rescoring import crops
    from trainer.preprocessing import ImageContract

    side = 32
    model = _tiny_embedder(side)
    model_path = str(tmp_path / "embedding.keras")
    model.save(model_path)
    rng = np.random.default_rng(0)
    images = [DecodedImage(f"img{index}", index - 1, rng.integers(0, 256, [40, 48, 3], np.uint8))
              for index in range(3)]

    def direct(image, num_views):
        views = crops.make_views(image.image, side, crops.CropSpec.for_num_views(num_views))
        embeddings = np.asarray(model.predict_on_batch(ImageContract(side).scale(views)))
        return retrieval.combine_view_embeddings(embeddings)

    tests = {image.image_id: direct(image, 2) for image in images}
    references = {image.image_id: (image.label, direct(image, 1)) for image in images}

    def check_tests(embedded):
        assert sorted(image_id for image_id, _ in embedded) == sorted(tests)
        for image_id, embedding in embedded:
            assert embedding.dtype == np.float32 and embedding.shape == (8,)
            np.testing.assert_allclose(embedding, tests[image_id], atol=1e-5)

    def check_references(embedded):
        assert sorted(row.image_id for row in embedded) == sorted(references)
        for row in embedded:
            assert row.label == references[row.image_id][0]
            np.testing.assert_allclose(row.embedding, references[row.image_id][1], atol=1e-5)

    with _pipeline() as p:
        decoded = p | Create(images)
        embedded = decoded | steps.Embed(model_path, side, 2, crops.CropSpec.for_num_views(2))
        assert_that(embedded, check_tests, label="tests")
        reference_rows = decoded | "References" >> steps.EmbedReferences(model_path, side, 2)
        assert_that(reference_rows, check_references, label="references")


# ---- ShardIndex, Retrieve -----------------------------------------------------------------------


def _references(rng, count: int, dim: int = 6):
    vectors = _unit_rows(rng, count, dim)
    labels = rng.integers(-1, 3, count)
    return [ReferenceEmbedding(f"r{index:03d}", int(labels[index]), vectors[index])
            for index in range(count)]


def test_shard_index_cuts_the_index_into_bounded_shards():
    references = _references(np.random.default_rng(1), 23)
    duplicated = references + [references[0]]  # the same image twice: indexed once
    buckets = knn.num_buckets(23, 4)
    assert buckets == 7  # ceil(23 / (0.9 * 4))

    def check(shards):
        ids = [image_id for _, shard in shards for image_id in shard.ids.tolist()]
        assert sorted(ids) == [row.image_id for row in references]  # each once
        for key, shard in shards:
            assert 1 <= len(shard.ids) <= 4 and list(shard.ids) == sorted(shard.ids)
            assert shard.vectors.shape == (len(shard.ids), 6) and shard.vectors.dtype == np.float32
            assert all(knn.bucket_of(image_id, buckets) == key[0] for image_id in shard.ids)
            by_id = {row.image_id: row for row in references}
            for image_id, label, vector in zip(shard.ids, shard.labels, shard.vectors):
                assert label == by_id[image_id].label
                np.testing.assert_array_equal(vector, by_id[image_id].embedding)
        assert len({key for key, _ in shards}) == len(shards)

    with _pipeline() as p:
        shards = p | Create(duplicated) | steps.ShardIndex(4, buckets)
        assert_that(shards, check)


@pytest.mark.parametrize("approximate", [False, True])
def test_retrieve_equals_brute_force_over_the_whole_index(approximate):
    if approximate:
        pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    references = _references(rng, 40)
    queries = _unit_rows(rng, 11, 6)
    index = np.stack([row.embedding for row in references])
    k = 5
    expected = {}
    for row, query in enumerate(queries):
        sims = index @ query
        order = np.argsort(-sims, kind="stable")[:k]
        expected[f"q{row}"] = ([references[i].image_id for i in order],
                               [references[i].label for i in order], sims[order])

    def check(results):
        assert sorted(test_id for test_id, _ in results) == sorted(expected)
        for test_id, neighbours in results:
            ids, labels, sims = expected[test_id]
            assert list(neighbours.ids) == ids and list(neighbours.labels) == labels
            np.testing.assert_allclose(neighbours.similarities, sims, rtol=1e-6)

    # Shards of at most 6 rows (>= 7 shards), batches of at most 3 queries: many pairs.
    # With approximate search every shard is small enough for FAISS to probe all its cells.
    with _pipeline() as p:
        shards = p | "Index" >> Create(references) | steps.ShardIndex(6, knn.num_buckets(40, 6))
        query_elements = p | "Queries" >> Create(
            [(f"q{row}", query) for row, query in enumerate(queries)])
        results = ({"queries": query_elements, "index": shards}
                   | steps.Retrieve(k, batch_size=3, approximate=approximate))
        assert_that(results, check)


def test_merge_neighbours_fn_keeps_labels_with_their_ids():
    combine = knn.MergeNeighboursFn(3)
    a = (np.array([0.5, 0.25], np.float32), np.array(["x", "y"]), np.array([1, -1]))
    b = (np.array([0.75, 0.25], np.float32), np.array(["z", "a"]), np.array([2, 0]))
    accumulators = [combine.add_input(combine.create_accumulator(), part) for part in (a, b)]
    merged = combine.extract_output(combine.merge_accumulators(accumulators))
    # Ties (0.25) by id: "a" before "y".
    assert merged == Neighbours(("z", "x", "a"), (0.75, 0.5, 0.25), (2, 1, 0))
    assert combine.extract_output(combine.create_accumulator()) == Neighbours()


# ---- ScoreNeighbours ----------------------------------------------------------------------------


def _plain_scores(element):
    test_id, scores = element
    return (test_id, scores.neighbours, scores.penalty, scores.class_confidences,
            scores.knn_class, scores.knn_score, scores.per_class)


def test_score_neighbours_hand_computed():
    # GLR-2019 rule, k = 3. q1: the non-landmark n1 (0.75) is the penalty; penalised landmark
    # similarities 0.125 (class 0) and -0.125 (class 1) vote 2 s - 1 = -0.75 and -1.25.
    # q2: no non-landmark; 2 * 0.75 - 1 = 0.5 for classes 1 and 0, 0 for class 1 again: a tie
    # at 0.5, won by class 1, whose neighbour is nearer.
    neighbours = [
        ("q1", Neighbours(("r1", "n1", "r2"), (0.875, 0.75, 0.625), (0, -1, 1))),
        ("q2", Neighbours(("r3", "r1", "r4"), (0.75, 0.75, 0.5), (1, 0, 1))),
    ]
    # GLR-2020 3rd place, k = 5: votes s^9 * p^10 (p: the classifier's probabilities of its top
    # classes, carried by the vote): class 0: 1 * 0.5^10 = 1/1024, class 1: 0.5^9 * 1 = 1/512.
    # The classifier's probabilities make the farther neighbour win.
    weighted = [("q3", Neighbours(("r1", "r2"), (1.0, 0.5), (0, 1)))]
    votes = [("q3", Vote(1, 1.0, ((0, 0.5), (1, 1.0))))]
    with _pipeline() as p:
        plain = ({"neighbours": p | "Neighbours" >> Create(neighbours)}
                 | "Knn" >> steps.ScoreNeighbours(knn.aggregation_params("knn", 3)))
        assert_that(plain | "PlainTuples" >> Map(_plain_scores), equal_to([
            ("q1", neighbours[0][1], 0.75, None, 0, -0.75, {0: -0.75, 1: -1.25}),
            ("q2", neighbours[1][1], 0.0, None, 1, 0.5, {1: 0.5, 0: 0.5}),
        ]), label="knn")
        with_classifier = (
            {"neighbours": p | "Weighted" >> Create(weighted),
             "votes": p | "Votes" >> Create(votes)}
            | "KnnClassifier" >> steps.ScoreNeighbours(knn.aggregation_params("knn+classifier", 5)))
        assert_that(with_classifier | "WeightedTuples" >> Map(_plain_scores), equal_to([
            ("q3", weighted[0][1], 0.0, {0: 0.5, 1: 1.0}, 1, 1 / 512,
             {0: 1 / 1024, 1: 1 / 512}),
        ]), label="knn+classifier")


# ---- VerifyNeighbours ---------------------------------------------------------------------------

POINTS = np.random.default_rng(3).uniform(0, 200, [24, 2]).astype(np.float32)
BASIS = np.eye(64, dtype=np.float32)


def _features(image_id, label, locations, descriptors):
    return FeatureRecord(image_id, label, "orb", locations, descriptors)


def test_verify_neighbours_hand_computed():
    from rescoring.verification import VerificationParams

    params = knn.aggregation_params("knn", 4)
    no_locations, no_descriptors = np.zeros([0, 2], np.float32), np.zeros([0, 64], np.float32)

    def scores_of(test_id, neighbours):
        return knn.score_neighbours(test_id, neighbours, None, params, False)

    # q1: r_missing (class 1, no cached features) is nearest; r_same (class 0) matches all 24
    # points; r_other (class 0) shares no descriptor. Similarity votes: class 1: 2 * 0.75 - 1 =
    # 0.5, class 0: 0.25 + 0 = 0.25 -> the kNN says class 1. With the inliers, class 0 gets
    # 0.25 + 24 / 70 > 0.5: verification flips the answer to class 0.
    q1 = scores_of("q1", Neighbours(("r_missing", "r_same", "r_other"), (0.75, 0.625, 0.5),
                                    (1, 0, 0)))
    q2 = scores_of("q2", Neighbours(("r_same",), (0.75,), (0,)))  # featureless test image
    q3 = scores_of("q3", Neighbours(("r_nl",), (0.5,), (-1,)))  # only a non-landmark
    tests = [("q1", _features("q1", -1, POINTS, BASIS[:24])),
             ("q2", _features("q2", -1, no_locations, no_descriptors)),
             ("q3", _features("q3", -1, POINTS, BASIS[:24]))]
    references = [
        (0, _features("r_same", 0, POINTS + [5.0, -3.0], BASIS[:24])),
        (0, _features("r_other", 0, POINTS, BASIS[32:56])),
        (1, _features("r_unretrieved", 1, POINTS, BASIS[:24])),
    ]
    with _pipeline() as p:
        scored = (
            {"knn": p | "Knn" >> Create([q1, q2, q3]),
             "features": p | "Features" >> Create(tests),
             "references": p | "References" >> Create(references)}
            | steps.VerifyNeighbours(VerificationParams(), params, "knn"))["scored"]
        rows = scored | Map(lambda row: (
            row.image_id, row.status, row.class_index, row.nn_confidence, row.local_max,
            row.local_mean, row.local_best_half, row.num_features, row.num_references,
            row.knn.knn_label, row.knn.neighbour_inliers))
        assert_that(rows, equal_to([
            # Class 0's voting neighbours, nearest first: r_same 24, r_other 0 -> max 24,
            # mean 12, best half 24; confidence = class 0's similarity score / k = 0.25 / 4.
            ("q1", "scored", 0, 0.0625, 24.0, 12.0, 24.0, 24, 2, 1, (0, 24, 0)),
            ("q2", "no_features", 0, 0.125, 0.0, 0.0, 0.0, 0, 0, 0, (0,)),
            ("q3", "no_landmark_neighbours", None, 0.0, 0.0, 0.0, 0.0, 24, 0, None, (0,)),
        ]))


def _image_record(image_id, label, jpeg):
    from tfrecords_schema.image_record import ImageRecord

    return ImageRecord(image_id=image_id, jpeg_bytes=jpeg, label=label, height=112, width=112)


def _counters(result) -> dict:
    from apache_beam.metrics.metric import MetricsFilter

    query = result.metrics().query(MetricsFilter().with_namespace(transforms.NAMESPACE))
    counters = {}
    for item in query["counters"]:
        value = item.committed if item.committed is not None else item.attempted
        counters[item.key.metric.name] = counters.get(item.key.metric.name, 0) + int(value)
    for item in query["distributions"]:
        counters[item.key.metric.name + ".count"] = item.committed.count
    return counters


def _orb(image):
    from rescoring import local_features

    extractor = local_features.make_extractor("orb")
    return transforms.check_features(extractor.extract(image))


def test_featurise_retrieved_references_extracts_each_wanted_image_once():
    from test_predict import _jpeg, _scenes, _view

    scenes = _scenes()
    jpegs = {"a": _jpeg(_view(scenes[0], 0.2, 0.3, 0.8)),
             "b": _jpeg(_view(scenes[1], 0.5, 0.5, 0.8)),
             "c": _jpeg(_view(scenes[2], 0.5, 0.5, 0.8))}
    images = [_image_record(image_id, 0, jpeg) for image_id, jpeg in jpegs.items()]
    images += [_image_record("b", 0, jpegs["b"]),  # the same id twice: featurised once
               _image_record("bad", 1, b"not a jpeg")]
    wanted = [("a", None), ("a", None), ("b", None), ("bad", None), ("ghost", None)]
    expected = {image_id: _orb(transforms.decode_rgb(jpegs[image_id])) for image_id in "ab"}

    def check(features):
        assert sorted(image_id for image_id, _ in features) == ["a", "b"]  # "c": not wanted
        for image_id, record in features:
            assert record.image_id == image_id and record.extractor == "orb"
            np.testing.assert_array_equal(record.locations, expected[image_id][0])
            np.testing.assert_array_equal(record.descriptors, expected[image_id][1])
            assert record.num_features > 0

    p = _pipeline()
    featurised = (
        {"ids": p | "Ids" >> Create(wanted),
         "images": p | "Images" >> Create(images) | Map(knn.key_image_record)}
        | steps.FeaturiseRetrievedReferences("orb"))
    assert_that(featurised["features"], check, label="features")
    assert_that(featurised["errors"], equal_to([{"count": 0, "causes": []}]), label="errors")
    result = p.run()
    result.wait_until_finish()
    counters = _counters(result)
    assert counters["knn_references_featurised_on_demand"] == 2
    assert counters["knn_references_missing"] == 1
    assert counters["knn_references_undecodable"] == 1
    # Counted as reference extractions (the launcher's failed fraction).
    assert counters["reference_features_per_image.count"] == 2


def test_verify_neighbours_featurises_uncached_neighbours_on_demand():
    from rescoring import local_features, verification
    from test_predict import _jpeg, _scenes, _view

    scene = _scenes()[0]
    test_image = _view(scene, 0.4, 0.4, 0.85)
    jpegs = {"r_on_demand": _jpeg(_view(scene, 0.3, 0.5, 0.8)),
             "r_cached": _jpeg(_view(scene, 0.6, 0.2, 0.8)),
             "r_unretrieved": _jpeg(_view(scene, 0.5, 0.5, 0.8))}
    vparams = verification.VerificationParams(
        max_descriptor_distance=local_features.make_extractor("orb").max_descriptor_distance)
    test_features = _orb(test_image)
    # The cache holds r_cached's features from another image than its record's: they win.
    cached = _orb(_view(scene, 0.5, 0.5, 0.8))
    on_demand = _orb(transforms.decode_rgb(jpegs["r_on_demand"]))
    expected = (verification.count_inliers(*test_features, *on_demand, vparams),
                verification.count_inliers(*test_features, *cached, vparams), 0)
    assert expected[0] > 0 and expected[1] > 0
    params = knn.aggregation_params("knn", 3)
    q1 = knn.score_neighbours("q1", Neighbours(("r_on_demand", "r_cached", "r_ghost"),
                                               (0.75, 0.625, 0.5), (0, 0, 1)),
                              None, params, False)
    images = [_image_record(image_id, 0, jpeg) for image_id, jpeg in jpegs.items()]

    p = _pipeline()
    verified = (
        {"knn": p | "Knn" >> Create([q1]),
         "features": p | "Features" >> Create([("q1", _features("q1", -1, *test_features))]),
         "references": p | "References" >> Create(
             [(0, FeatureRecord("r_cached", 0, "orb", *cached))]),
         "reference_images": p | "Images" >> Create(images)}
        | steps.VerifyNeighbours(vparams, params, "knn", "orb"))
    assert_that(verified["scored"] | Map(lambda row: row.knn.neighbour_inliers),
                equal_to([expected]), label="inliers")
    assert_that(verified["errors"], equal_to([{"count": 0, "causes": []}]), label="errors")
    result = p.run()
    result.wait_until_finish()
    counters = _counters(result)
    assert counters["knn_references_featurised_on_demand"] == 1  # not r_cached, r_unretrieved
    assert counters["knn_references_missing"] == 1  # r_ghost
    assert counters["knn_pairs_verified"] == 2
    assert counters["knn_pairs_unverified"] == counters["knn_pairs_unverified_not_featurised"] == 1


# ---- config, cache, evaluate (pure) -------------------------------------------------------------


def test_recognizer_flags(tmp_path):
    base = ["--model", str(tmp_path / "m" / "model.keras"), "--test_data", "t",
            "--reference_data", "r", "--output_dir", str(tmp_path / "out")]
    config, _ = config_lib.parse_args(base)
    assert (config.recognizer, config.embedding, config.knn_k) == ("classifier", "", 0)
    config, _ = config_lib.parse_args(base + ["--recognizer", "knn"])
    assert config.embedding == str(tmp_path / "m" / "embedding.keras")
    assert (config.knn_k, config.index_shard_size, config.ann) == (3, 100_000, "exact")
    config, _ = config_lib.parse_args(base + ["--recognizer", "knn+classifier", "--knn_k", "7",
                                             "--index_shard_size", "10", "--ann", "faiss"])
    assert (config.knn_k, config.index_shard_size, config.ann) == (7, 10, "faiss")
    assert config_lib.parse_args(base + ["--recognizer", "knn+classifier"])[0].knn_k == 5
    with pytest.raises(ValueError, match="need --recognizer knn"):
        config_lib.parse_args(base + ["--knn_k", "4"])
    with pytest.raises(ValueError, match="--index_shard_size"):
        config_lib.parse_args(base + ["--recognizer", "knn", "--index_shard_size", "0"])
    with pytest.raises(ValueError):
        config_lib.parse_args(base + ["--recognizer", "nearest"])


def test_embedding_cache_keyed_by_model_bytes_and_never_complete_without_landmarks(tmp_path):
    shard = tmp_path / "train-00000-of-00001.tfrecord"
    shard.write_bytes(b"x" * 10)
    pattern = str(tmp_path / "train-*.tfrecord")
    cache = tmp_path / "reference_features"
    directory = Path(reference_cache.embeddings_dir(str(cache)))
    reference_cache.clear_for_recompute(str(directory), keep=())
    (directory / "embeddings-00000-of-00001.tfrecord").write_bytes(b"")
    wanted = reference_cache.embedding_cache_metadata("a" * 64, 71, 3, pattern)

    def decision(metadata):
        return reference_cache.reuse_decision(
            str(directory), metadata, reference_cache.embeddings_pattern(str(directory)),
            reference_cache.EMBEDDINGS_REUSE_REASON, "reference embeddings")

    assert decision(wanted) == (False, f"no finished reference embeddings in {directory}")
    counts = {"rows": 2, "landmark": 0, "non_landmark": 2, "dims": [8]}
    assert reference_cache.finish_embeddings(str(directory), wanted, counts, "e.keras") is False
    assert reference_cache.finish_embeddings(str(directory), wanted, None, "e.keras") is False
    assert decision(wanted)[0] is False
    counts["landmark"] = 1
    assert reference_cache.finish_embeddings(str(directory), wanted, counts, "e.keras") is True
    assert decision(wanted) == (True, reference_cache.EMBEDDINGS_REUSE_REASON)
    reuse, reason = decision(dict(wanted, embedding_sha256="b" * 64))
    assert not reuse and "embedding_sha256" in reason
    # Recomputing the local features keeps the embeddings, and a record of another model is
    # refused when read back.
    (cache / "metadata.json").write_text("{}")
    (cache / "features-00000-of-00001.tfrecord").write_bytes(b"")
    reference_cache.clear_for_recompute(str(cache))
    assert sorted(path.name for path in cache.iterdir()) == ["embeddings"]
    assert decision(wanted)[0] is True
    record = ReferenceEmbedding("r1", -1, np.array([0.6, 0.8], np.float32))
    serialized = reference_cache.serialize_embedding(record, "a" * 64)
    parsed = reference_cache.parse_embedding(serialized, "a" * 64)
    assert (parsed.image_id, parsed.label, parsed.embedding.tolist()) == (
        "r1", -1, pytest.approx([0.6, 0.8]))
    with pytest.raises(ValueError, match="made by the embedding model"):
        reference_cache.parse_embedding(serialized, "b" * 64)


def test_the_vote_carries_the_classifiers_top_mean_probabilities():
    from rescoring import voting

    views = np.array([[0.875, 0.0625, 0.0625]] + [[0.25, 0.5, 0.25]] * 3, np.float32)
    assert voting.vote_shares(views) == {0: 0.875 / 4, 1: 1.5 / 4}
    _, vote = transforms.vote_keyed(("a", type("R", (), {"inference": views})()), True)
    # Class 1 wins the vote (3 views), class 0 has the larger mean probability (1.625 / 4):
    # the knn+classifier factor is the mean probability (GLR-2020 3rd place), most probable
    # first, every class here being among the top 5.
    assert vote == Vote(1, 0.375, ((0, 1.625 / 4), (1, 1.5625 / 4), (2, 0.8125 / 4)))


# ---- the whole job ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("predict_knn") / "data", crops=2)


@pytest.fixture(scope="module")
def other_embedding(data) -> Path:
    """Another embedding model on the same backbone: a seeded random projection of GeM to 64
    dimensions, L2-normalised."""
    import keras

    from beam_pipelines.predict import model_handler
    from trainer import model as model_lib

    model = model_handler.load_keras_model(str(data.model_path))
    keras.utils.set_random_seed(5)
    gem = model.get_layer(model_lib.GEM_NAME).output
    projected = keras.layers.Dense(64, name="projection")(gem)
    embedder = keras.Model(model.inputs[0], keras.layers.UnitNormalization()(projected))
    path = data.root / "other_model" / "embedding.keras"
    path.parent.mkdir()
    embedder.save(str(path))
    return path


def _run(data, name, *extra) -> tuple[dict, Path]:
    output_dir = data.root / "runs" / name
    summary = pipeline.run(_args(data, output_dir, "--crops", "2", *extra))
    return summary, output_dir


@pytest.fixture(scope="module")
def knn_classifier_run(data):
    return _run(data, "knn_classifier", "--recognizer", "knn+classifier", "--runner=FnApiRunner")


@pytest.fixture(scope="module")
def knn_run(data, knn_classifier_run):
    return _run(data, "knn", "--recognizer", "knn", "--runner=FnApiRunner")


def _rows(output_dir: Path) -> dict[str, dict]:
    with open(output_dir / "scores.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        assert tuple(reader.fieldnames) == (
            ("id", "nn_label", "nn_confidence", "local_max", "local_mean", "local_best_half",
             "final_score", "label") + knn_outputs_columns())
        return {row["id"]: row for row in reader}


def knn_outputs_columns():
    from beam_pipelines.predict import outputs

    return outputs.KNN_COLUMNS


def _floats(text: str) -> list[float]:
    return [float(value) for value in text.split()]


def _ints(text: str) -> list[int]:
    return [int(value) for value in text.split()]


def _recompute(row: dict, recognizer: str, k: int, local_max_top: float) -> None:
    """Every score of one readable row, from its own columns and the pure functions."""
    params = knn.aggregation_params(recognizer, k)
    sims, labels = _floats(row["neighbour_similarities"]), _ints(row["neighbour_labels"])
    inliers = _ints(row["neighbour_inliers"])
    ids = row["neighbour_ids"].split()
    assert len(ids) == len(sims) == len(labels) == len(inliers) == k
    confidences = None
    if recognizer == "knn+classifier":
        confidences = dict(zip(labels, _floats(row["neighbour_confidences"])))
    else:
        assert row["neighbour_confidences"] == "" and row["nn_label"] == ""
    landmark_sims, landmark_labels, non_landmark_sims = retrieval.split_non_landmarks(sims, labels)
    penalty = retrieval.non_landmark_penalty(non_landmark_sims)
    assert float(row["non_landmark_penalty"]) == penalty
    penalised = retrieval.penalise(landmark_sims, penalty)
    verdict = retrieval.class_scores_from_neighbours(penalised, landmark_labels, params,
                                                     confidences)
    assert int(row["knn_label"]) == verdict.best_class
    assert float(row["knn_score"]) == pytest.approx(verdict.score, rel=1e-12, abs=1e-300)
    landmark_inliers = [count for count, label in zip(inliers, labels) if label != -1]
    reranked = retrieval.rerank_with_inliers(penalised, landmark_labels, landmark_inliers, params,
                                             class_confidences=confidences)
    assert int(row["label"]) == reranked.best_class
    local = scores_lib.aggregate(reranked.best_class_inliers)
    assert [float(row[column]) for column in scores_lib.COLUMNS] == list(local)
    if confidences is None:
        confidence = min(max(verdict.per_class[reranked.best_class] / k, 0.0), 1.0)
    else:
        # The classifier factor of the final class (its mean probability over the views when
        # among the classifier's top 5, else 1e-8), not the crop vote's share.
        confidence = confidences.get(reranked.best_class, params.missing_confidence)
    assert float(row["confidence"]) == pytest.approx(confidence, rel=1e-12, abs=1e-15)
    expected = scores_lib.final_score(local[0], local_max_top, confidence, BLEND_WEIGHT)
    assert float(row["final_score"]) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def _direct_neighbours(data, embedding_path: Path, k: int) -> dict[str, tuple[list, np.ndarray]]:
    """Without Beam: every reference (whole image) and test image (2 views) embedded one image
    at a time -> ``{test_id: (reference ids by similarity, similarities)}``."""
    import glob

    import tensorflow as tf

    from beam_pipelines.predict import model_handler
    from rescoring import crops
    from tfrecords_schema import image_record
    from trainer.preprocessing import ImageContract

    model = model_handler.load_keras_model(str(embedding_path))
    contract = ImageContract(IMAGE_SIZE)

    def embed(image, num_views):
        views = crops.make_views(image, IMAGE_SIZE, crops.CropSpec.for_num_views(num_views))
        return retrieval.combine_view_embeddings(
            np.asarray(model.predict_on_batch(contract.scale(views))))

    references = {}
    for path in sorted(glob.glob(data.reference_glob)):
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            record = image_record.parse_record(serialized)
            references[record.image_id] = embed(transforms.decode_rgb(record.jpeg_bytes), 1)
    ids = sorted(references)
    index = np.stack([references[image_id] for image_id in ids])
    result = {}
    for test_id, image in data.test_images.items():
        sims = index @ embed(image, 2)
        order = np.argsort(-sims, kind="stable")
        result[test_id] = ([ids[i] for i in order], sims[order])
    return result


def _check_run(data, summary, output_dir: Path, recognizer: str, k: int,
               embedding_path: Path) -> dict[str, dict]:
    from rescoring import submission

    assert (output_dir / "_SUCCESS").exists()
    predictions = submission.check_submission(
        (output_dir / "submission.csv").read_text(), data.all_test_ids)
    rows = _rows(output_dir)
    assert sorted(rows) == sorted(predictions) == sorted(data.all_test_ids)  # each id once
    stats = json.loads((output_dir / "stats.json").read_text())
    assert stats["test_images"] == 6 == stats["predicted"] + stats["unreadable"]
    assert (stats["predicted"], stats["unreadable"]) == (4, 2)
    assert stats["predicted"] == (
        stats["with_references"] + stats["without_references"] + stats["without_features"]
        + stats["without_landmark_neighbours"])
    assert stats["without_features"] == 1  # the flat grey image
    retrieval_stats = stats["retrieval"]
    assert retrieval_stats["index_rows"] == 7 == stats["reference_embeddings"]["counts"]["rows"]
    assert retrieval_stats["retrieval_queries"] == 4  # one shard, 4 readable test images
    assert summary["test_images"] == 6
    readable = [rows[test_id] for test_id in data.readable_test_ids]
    local_max_top = max(float(row["local_max"]) for row in readable)
    direct = _direct_neighbours(data, embedding_path, k)
    for test_id in data.readable_test_ids:
        row = rows[test_id]
        assert row["recognizer"] == recognizer
        _recompute(row, recognizer, k, local_max_top)
        assert predictions[test_id] == (int(row["label"]), float(row["final_score"]))
        # The neighbours are the true top-k (up to float32 round-off between batchings).
        order, sims = direct[test_id]
        listed = row["neighbour_ids"].split()
        by_id = dict(zip(order, sims))
        np.testing.assert_allclose(_floats(row["neighbour_similarities"]),
                                   [by_id[image_id] for image_id in listed], atol=TOLERANCE)
        assert all(by_id[other] <= sims[k - 1] + TOLERANCE
                   for other in order if other not in listed)
    for test_id in ("test_corrupt_jpeg", "test_old_schema"):
        assert predictions[test_id] is None and rows[test_id]["label"] == ""
        assert rows[test_id]["recognizer"] == recognizer and rows[test_id]["neighbour_ids"] == ""
    _check_on_demand_verification(data, stats, output_dir, rows)
    return rows


def _check_on_demand_verification(data, stats: dict, output_dir: Path, rows: dict) -> None:
    """Every retrieved landmark neighbour is verified: those outside the cached per-class
    sample (``--references_per_class`` 2 of 3) were featurised in the job, and their inlier
    column equals rescoring's extractor + verification on the same images."""
    import glob

    import tensorflow as tf

    from rescoring import local_features, verification
    from tfrecords_schema import image_record
    from tfrecords_schema.local_features import parse_features

    retrieval_stats = stats["retrieval"]
    assert retrieval_stats["knn_pairs_unverified"] == 0
    assert retrieval_stats["knn_pairs_unverified_reasons"] == {
        "not_featurised": 0, "no_features": 0}
    config = json.loads((output_dir / "config.json").read_text())
    cache = Path(config["config"]["reference_features"])
    cached = {parse_features(serialized).image_id
              for path in sorted(cache.glob("features-*.tfrecord"))
              for serialized in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()}
    references = {}
    for path in sorted(glob.glob(data.reference_glob)):
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            record = image_record.parse_record(serialized)
            references[record.image_id] = transforms.decode_rgb(record.jpeg_bytes)
    extractor = local_features.make_extractor(config["extractor_spec"])
    params = verification.VerificationParams(
        max_descriptor_distance=float(extractor.max_descriptor_distance))
    on_demand = set()
    for test_id in data.readable_test_ids:
        row = rows[test_id]
        test_features = transforms.check_features(extractor.extract(data.test_images[test_id]))
        if len(test_features[0]) == 0:  # the flat grey image: no pairs to verify
            continue
        for reference_id, label, inliers in zip(row["neighbour_ids"].split(),
                                                _ints(row["neighbour_labels"]),
                                                _ints(row["neighbour_inliers"])):
            if label == -1 or reference_id in cached:
                continue
            on_demand.add(reference_id)
            reference_features = transforms.check_features(
                extractor.extract(references[reference_id]))
            assert inliers == verification.count_inliers(*test_features, *reference_features,
                                                         params), (test_id, reference_id)
    assert on_demand and retrieval_stats["knn_references_featurised_on_demand"] == len(on_demand)
    reference_features = stats["reference_features"]
    made = 0 if reference_features["reused"] else reference_features["num_images"]
    assert stats["extraction_attempts"]["reference"] == made + len(on_demand)


@pytest.mark.slow
def test_knn_classifier_end_to_end(data, knn_classifier_run):
    summary, output_dir = knn_classifier_run
    rows = _check_run(data, summary, output_dir, "knn+classifier", 5, data.embedding_path)
    # The right landmark is retrieved first; test_c's scene is the non-landmark reference's.
    first = {test_id: rows[test_id]["neighbour_ids"].split()[0] for test_id in rows
             if rows[test_id]["neighbour_ids"]}
    assert first["test_a"].startswith("ref0_") and first["test_b"].startswith("ref1_")
    assert first["test_c"] == "distractor"
    assert rows["test_c"]["neighbour_labels"].split()[0] == "-1"
    assert float(rows["test_c"]["non_landmark_penalty"]) > 0
    for test_id, landmark_id in (("test_a", 11), ("test_b", 22)):
        assert int(rows[test_id]["label"]) == int(rows[test_id]["knn_label"]) == landmark_id
        assert int(rows[test_id]["nn_label"]) == landmark_id  # the classifier agrees
        assert float(rows[test_id]["local_max"]) > 0  # verified against its neighbours
    assert summary["reference_embeddings"]["reused"] is False
    assert summary["reference_features"]["reused"] is False
    config = json.loads((output_dir / "config.json").read_text())
    assert config["config"]["embedding"] == str(data.embedding_path)
    assert config["knn"]["embedding_dim"] == 2048
    cache = Path(config["config"]["reference_features"]) / "embeddings"
    metadata = json.loads((cache / "metadata.json").read_text())
    assert metadata["complete"] is True and (cache / "_SUCCESS").exists()
    assert metadata["counts"] == {"rows": 7, "landmark": 6, "non_landmark": 1, "dims": [2048]}


@pytest.mark.slow
def test_knn_reuses_the_caches(data, knn_classifier_run, knn_run):
    summary, output_dir = knn_run
    rows = _check_run(data, summary, output_dir, "knn", 3, data.embedding_path)
    assert summary["reference_embeddings"]["reused"] is True
    assert summary["reference_embeddings"]["reason"] == reference_cache.EMBEDDINGS_REUSE_REASON
    assert summary["reference_features"]["reused"] is True
    for test_id, landmark_id in (("test_a", 11), ("test_b", 22)):
        assert int(rows[test_id]["label"]) == int(rows[test_id]["knn_label"]) == landmark_id
    # Same embeddings, same retrieval: the first 3 neighbours of the knn+classifier run.
    earlier = _rows(knn_classifier_run[1])
    for test_id in data.readable_test_ids:
        assert rows[test_id]["neighbour_ids"].split() == (
            earlier[test_id]["neighbour_ids"].split()[:3])


@pytest.mark.slow
def test_another_embedding_model_in_worker_processes(data, knn_classifier_run, knn_run,
                                                      other_embedding):
    summary, output_dir = _run(
        data, "other_embedding", "--recognizer", "knn+classifier", "--embedding",
        str(other_embedding), "--runner=DirectRunner", "--direct_running_mode=multi_processing",
        "--direct_num_workers=2")
    _check_run(data, summary, output_dir, "knn+classifier", 5, other_embedding)
    embeddings = summary["reference_embeddings"]
    assert embeddings["reused"] is False and "embedding_sha256" in embeddings["reason"]
    assert embeddings["counts"]["dims"] == [64]
    assert summary["reference_features"]["reused"] is True


@pytest.mark.slow
def test_evaluate_reports_gap_knn_only_on_a_knn_run(data, knn_run, tmp_path):
    _, output_dir = knn_run
    solution = tmp_path / "solution.csv"
    truth = {"test_a": "11", "test_b": "22", "test_c": "33", "test_blank": "",
             "test_corrupt_jpeg": "", "test_old_schema": ""}
    solution.write_text("id,landmarks,Usage\n" + "".join(
        f"{test_id},{labels},Public\n" for test_id, labels in sorted(truth.items())))
    report = evaluate.run(["--submission", str(output_dir / "submission.csv"),
                           "--solution", str(solution), "--scores", str(output_dir / "scores.csv"),
                           "--output_dir", str(tmp_path / "eval")])
    assert "gap_knn_only" in report and "gap_nn_only" not in report  # no classifier in knn
    # test_a and test_b right, test_c wrong (its landmark 33 has no reference to retrieve).
    assert report["top1_accuracy_knn_only"] == pytest.approx(2 / 3)
