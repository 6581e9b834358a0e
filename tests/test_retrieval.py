"""Retrieval recognizer (rescoring.retrieval): exact top-k against brute force, the Beam merge's
algebra, and the scoring rules against hand-computed cases."""

import itertools
import random

import numpy as np
import pytest

from rescoring import retrieval, scores
from tfrecords_schema import image_record


def brute_force_top_k(queries, index, k):
    """Independent reference: the full similarity matrix in float64, stable argsort per row."""
    similarities = np.asarray(queries, np.float64) @ np.asarray(index, np.float64).T
    order = np.argsort(-similarities, axis=1, kind="stable")[:, : min(k, len(index))]
    return np.take_along_axis(similarities, order, axis=1), order


def integer_data(rng, rows, dim, low=-2, high=2):
    """Small integers: every dot product is exact in float32, whatever order BLAS sums in, and
    equal similarities (ties) are frequent."""
    return rng.integers(low, high + 1, size=(rows, dim)).astype(np.float32)


# ---- exact_top_k ----------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_exact_top_k_equals_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    queries = integer_data(rng, int(rng.integers(1, 30)), int(rng.integers(1, 6)))
    index = integer_data(rng, int(rng.integers(1, 2500)), queries.shape[1])
    k = int(rng.integers(1, 120))
    expected_sims, expected_positions = brute_force_top_k(queries, index, k)
    for block_rows, query_rows in [(3, 64), (7, 3), (64, 256), (1000, 5), (4096, 1024)]:
        sims, positions = retrieval.exact_top_k(queries, index, k, block_rows, query_rows)
        assert sims.dtype == np.float32 and positions.dtype == np.int64
        np.testing.assert_array_equal(positions, expected_positions)
        np.testing.assert_array_equal(sims, expected_sims.astype(np.float32))


def test_exact_top_k_grouped_scan_equals_brute_force():
    # Blocks wide enough for the grouped threshold scan (>= 16 k columns), several blocks and a
    # ragged last block, and an index sorted so that later blocks keep beating the threshold.
    rng = np.random.default_rng(7)
    queries = integer_data(rng, 70, 6, -3, 3)
    index = integer_data(rng, 23_000, 6, -3, 3)
    for name, data in [("random", index), ("sorted", np.sort(index, axis=0))]:
        expected_sims, expected_positions = brute_force_top_k(queries, data, 100)
        for block_rows in (1700, 4096, 5000, 30_000):
            sims, positions = retrieval.exact_top_k(queries, data, 100, block_rows, 64)
            np.testing.assert_array_equal(positions, expected_positions, err_msg=f"{name} {block_rows}")
            np.testing.assert_array_equal(sims, expected_sims.astype(np.float32))


def test_exact_top_k_all_equal_similarities_take_the_smallest_positions():
    queries = np.ones([3, 4], np.float32)
    index = np.ones([5000, 4], np.float32)
    for block_rows in (7, 100, 1600, 4096):
        sims, positions = retrieval.exact_top_k(queries, index, 100, block_rows)
        np.testing.assert_array_equal(positions, np.tile(np.arange(100), (3, 1)))
        np.testing.assert_array_equal(sims, 4.0)


def test_exact_top_k_k_larger_than_index_returns_all_sorted():
    rng = np.random.default_rng(1)
    queries, index = integer_data(rng, 4, 3), integer_data(rng, 9, 3)
    sims, positions = retrieval.exact_top_k(queries, index, 50)
    assert sims.shape == positions.shape == (4, 9)
    expected_sims, expected_positions = brute_force_top_k(queries, index, 50)
    np.testing.assert_array_equal(positions, expected_positions)
    np.testing.assert_array_equal(sims, expected_sims)


def test_exact_top_k_random_unit_vectors_match_brute_force():
    # Real-valued data: BLAS may round block products differently, so compare similarities to
    # ~1e-6 and positions wherever neighbouring similarities are not within rounding.
    rng = np.random.default_rng(3)
    queries = retrieval.l2_normalise(rng.standard_normal((50, 64)))
    index = retrieval.l2_normalise(rng.standard_normal((20_000, 64)))
    expected_sims, expected_positions = brute_force_top_k(queries, index, 30)
    for block_rows in (500, 2048, 20_000):
        sims, positions = retrieval.exact_top_k(queries, index, 30, block_rows, 16)
        np.testing.assert_allclose(sims, expected_sims, atol=2e-6)
        gaps = np.diff(expected_sims, axis=1, prepend=np.inf, append=-np.inf)
        clear = (np.abs(gaps[:, :-1]) > 1e-5) & (np.abs(gaps[:, 1:]) > 1e-5)
        np.testing.assert_array_equal(positions[clear], expected_positions[clear])


def test_exact_top_k_blocked_equals_unblocked():
    rng = np.random.default_rng(5)
    queries, index = integer_data(rng, 40, 5), integer_data(rng, 9000, 5)
    whole = retrieval.exact_top_k(queries, index, 64, block_rows=9000, query_rows=40)
    for block_rows, query_rows in itertools.product((1, 33, 1024, 4096, 8999), (1, 7, 40)):
        blocked = retrieval.exact_top_k(queries, index, 64, block_rows, query_rows)
        np.testing.assert_array_equal(blocked[1], whole[1])
        np.testing.assert_array_equal(blocked[0], whole[0])


def test_exact_top_k_edge_shapes_and_errors():
    index = np.eye(3, dtype=np.float32)
    sims, positions = retrieval.exact_top_k(np.zeros([0, 3]), index, 2)
    assert sims.shape == positions.shape == (0, 2)
    sims, positions = retrieval.exact_top_k(np.ones([2, 3]), np.zeros([0, 3]), 5)
    assert sims.shape == positions.shape == (2, 0)
    with pytest.raises(ValueError, match="dimensions"):
        retrieval.exact_top_k(np.ones([1, 4]), index, 1)
    with pytest.raises(ValueError, match="k must"):
        retrieval.exact_top_k(np.ones([1, 3]), index, 0)
    with pytest.raises(ValueError, match="NaN"):
        retrieval.exact_top_k(np.full([1, 3], np.nan), index, 1)
    with pytest.raises(ValueError, match="NaN"):
        retrieval.exact_top_k(np.ones([1, 3]), np.array([[1, np.inf, 0]]), 1)
    with pytest.raises(ValueError, match="2-D"):
        retrieval.exact_top_k(np.ones(3), index, 1)


# ---- merge_top_k ------------------------------------------------------------------------------------


def shard_lists(rng, num_shards, k, ids_as_strings=False):
    """One query's top-k lists from disjoint shards of a random index with tied similarities."""
    index = integer_data(rng, 600, 3)
    query = integer_data(rng, 1, 3)
    ids = rng.permutation(10_000)[: len(index)]
    if ids_as_strings:
        ids = np.array([f"ref{i:05d}" for i in ids])
    bounds = np.sort(rng.choice(np.arange(1, len(index)), num_shards - 1, replace=False))
    lists = []
    for part in np.split(np.arange(len(index)), bounds):
        sims, positions = retrieval.exact_top_k(query, index[part], k)
        lists.append((sims[0], ids[part][positions[0]]))
    everything = (query @ index.T)[0]
    order = np.lexsort((ids, -everything))[:k]  # top-k of the whole index, ties by id
    return lists, (everything[order], ids[order])


@pytest.mark.parametrize("ids_as_strings", [False, True])
def test_merge_top_k_of_shards_equals_top_k_of_the_whole(ids_as_strings):
    rng = np.random.default_rng(11)
    lists, (expected_sims, expected_ids) = shard_lists(rng, 5, 20, ids_as_strings)
    sims, ids = retrieval.merge_top_k(lists, 20)
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(sims, expected_sims.astype(np.float32))


@pytest.mark.parametrize("ids_as_strings", [False, True])
def test_merge_top_k_is_associative_and_commutative(ids_as_strings):
    rng = np.random.default_rng(12)
    k = 15
    lists, _ = shard_lists(rng, 6, k, ids_as_strings)
    reference = retrieval.merge_top_k(lists, k)
    shuffler = random.Random(0)
    for _ in range(25):
        # A random binary merge tree over a random order, as Beam's combiner may build.
        pending = list(lists)
        shuffler.shuffle(pending)
        while len(pending) > 1:
            a = pending.pop(shuffler.randrange(len(pending)))
            b = pending.pop(shuffler.randrange(len(pending)))
            pending.append(retrieval.merge_top_k([b, a] if shuffler.random() < 0.5 else [a, b], k))
        np.testing.assert_array_equal(pending[0][1], reference[1])
        np.testing.assert_array_equal(pending[0][0], reference[0])
    # Idempotent and with an empty accumulator: merging a result again changes nothing.
    again = retrieval.merge_top_k([reference, reference, ([], [])], k)
    np.testing.assert_array_equal(again[1], reference[1])


def test_merge_top_k_hand_computed():
    a = ([0.9, 0.5, 0.5], [7, 3, 9])
    b = ([0.5, 0.7], [2, 7])  # id 7 again, with a smaller similarity: counts once, at 0.9
    sims, ids = retrieval.merge_top_k([a, b], 4)
    np.testing.assert_array_equal(ids, [7, 2, 3, 9])  # 0.5 ties ordered by id
    np.testing.assert_allclose(sims, [0.9, 0.5, 0.5, 0.5])
    sims, ids = retrieval.merge_top_k([], 3)
    assert sims.shape == ids.shape == (0,)
    with pytest.raises(ValueError, match="mix"):
        retrieval.merge_top_k([([0.1], [1]), ([0.2], ["a"])], 2)
    with pytest.raises(ValueError, match="NaN"):
        retrieval.merge_top_k([([np.nan], [1])], 2)


# ---- view embeddings ------------------------------------------------------------------------------


def test_combine_view_embeddings_hand_computed():
    views = np.array([[3.0, 0.0], [0.0, 0.5]])  # unit views (1, 0) and (0, 1): mean (0.5, 0.5)
    np.testing.assert_allclose(retrieval.combine_view_embeddings(views), [2**-0.5, 2**-0.5], rtol=1e-6)
    batch = np.stack([views, np.array([[0.0, 2.0], [0.0, 1.0]])])
    np.testing.assert_allclose(retrieval.combine_view_embeddings(batch),
                               [[2**-0.5, 2**-0.5], [0.0, 1.0]], rtol=1e-6)
    with pytest.raises(ValueError):
        retrieval.combine_view_embeddings(np.ones(3))


# ---- class scores ----------------------------------------------------------------------------------


def test_glr2019_rule_hand_computed():
    # k = 3 nearest: 0.95 (A), 0.8 (B), 0.8 (B); 0.7 (A) is 4th and does not vote.
    result = retrieval.class_scores_from_neighbours([0.8, 0.95, 0.7, 0.8], ["B", "A", "A", "B"])
    # Votes 2 s - 1: A 0.9; B 0.6 + 0.6 = 1.2: two good neighbours beat one very good one.
    assert result.best_class == "B"
    assert result.score == pytest.approx(1.2)
    assert result.per_class == pytest.approx({"A": 0.9, "B": 1.2})
    assert list(result.per_class) == ["A", "B"]  # nearest first


def test_class_scores_ties_go_to_the_nearer_neighbour_and_empty_input():
    result = retrieval.class_scores_from_neighbours([0.75, 0.75, 0.5], [4, 2, 9],
                                                    retrieval.AggregationParams(k=2))
    assert result.best_class == 4 and result.score == pytest.approx(0.5)
    assert retrieval.class_scores_from_neighbours([], []) == (None, 0.0, {})
    with pytest.raises(ValueError):
        retrieval.class_scores_from_neighbours([0.5], [1, 2])


def test_glr2020_third_rule_hand_computed():
    params = retrieval.AggregationParams.glr2020_third()
    assert (params.k, params.weighting, params.power) == (5, "power", 9.0)
    sims = [0.9, 0.8, 0.8, 0.5, 0.4, 0.3]
    labels = [1, 2, 2, 1, 3, 1]  # the 6th does not vote
    result = retrieval.class_scores_from_neighbours(sims, labels, params)
    assert result.per_class == pytest.approx({1: 0.9**9 + 0.5**9, 2: 2 * 0.8**9, 3: 0.4**9})
    assert result.best_class == 1
    # With the classifier's probabilities: class 2 at 0.9, class 1 at 0.5, class 3 unreported.
    result = retrieval.class_scores_from_neighbours(sims, labels, params, {2: 0.9, 1: 0.5})
    assert result.per_class[2] == pytest.approx(2 * 0.8**9 * 0.9**10)
    assert result.per_class[1] == pytest.approx((0.9**9 + 0.5**9) * 0.5**10)
    assert result.per_class[3] == pytest.approx(0.4**9 * 1e-80)
    assert result.best_class == 2


def test_split_non_landmarks():
    assert retrieval.NON_LANDMARK_LABEL == image_record.NON_LANDMARK
    sims, labels, non = retrieval.split_non_landmarks([0.9, 0.8, 0.7], [5, -1, np.int64(6)])
    np.testing.assert_allclose(sims, [0.9, 0.7])
    assert labels == [5, 6] and type(labels[1]) is int
    np.testing.assert_allclose(non, [0.8])


def test_non_landmark_penalty_hand_computed():
    # Mean of the 5 largest of 7: (0.9 + 0.8 + 0.7 + 0.6 + 0.5) / 5 = 0.7.
    assert retrieval.non_landmark_penalty([0.1, 0.5, 0.9, 0.6, 0.8, 0.2, 0.7]) == pytest.approx(0.7)
    assert retrieval.non_landmark_penalty([0.3, 0.1], k=5) == pytest.approx(0.2)  # fewer than k
    assert retrieval.non_landmark_penalty([]) == 0.0
    np.testing.assert_allclose(retrieval.penalise([0.9, 0.4], 0.25, weight=2.0), [0.4, -0.1])
    with pytest.raises(ValueError):
        retrieval.non_landmark_penalty([0.5], k=0)


def test_non_landmark_penalty_pushes_a_distractor_below_a_landmark():
    # Two test images with equally close landmark neighbours: the one that is also close to the
    # non-landmark images ends up with the lower score.
    neighbours, labels = [0.8, 0.75, 0.7], [1, 1, 1]
    landmark_like = retrieval.non_landmark_penalty([0.2, 0.15, 0.1])
    distractor_like = retrieval.non_landmark_penalty([0.85, 0.8, 0.8])
    clean = retrieval.class_scores_from_neighbours(retrieval.penalise(neighbours, landmark_like), labels)
    noisy = retrieval.class_scores_from_neighbours(retrieval.penalise(neighbours, distractor_like), labels)
    # Votes 2 (s - p) - 1: clean p = 0.15 -> 0.3 + 0.2 + 0.1; noisy p = 0.8167 -> sum -3.03.
    assert clean.score == pytest.approx(0.6)
    assert noisy.score == pytest.approx(2 * (2.25 - 3 * 0.8166666667) - 3)
    assert noisy.score < clean.score


def test_rerank_with_inliers_hand_computed():
    sims = [0.9, 0.85, 0.8, 0.3]
    labels = ["A", "B", "B", "A"]
    inliers = [0, 35, 140, 500]  # the 4th is not among the k = 3 and does not vote
    result = retrieval.rerank_with_inliers(sims, labels, inliers)
    # A: (2 * 0.9 - 1) + 0 = 0.8; B: (0.7 + 35 / 70) + (0.6 + min(140, 70) / 70) = 1.2 + 1.6.
    assert result.per_class == pytest.approx({"A": 0.8, "B": 2.8})
    assert result.best_class == "B" and result.score == pytest.approx(2.8)
    np.testing.assert_array_equal(result.best_class_inliers, [35, 140])
    # Without inliers the plain rule's answer comes back.
    plain = retrieval.rerank_with_inliers(sims, labels, [0, 0, 0, 0])
    assert plain[:3] == retrieval.class_scores_from_neighbours(sims, labels)[:3]
    # The classic blend still applies to the winner's inlier counts.
    local = scores.aggregate(result.best_class_inliers)
    np.testing.assert_allclose(local, [140.0, 87.5, 140.0])
    with pytest.raises(ValueError):
        retrieval.rerank_with_inliers(sims, labels, [0, -1, 0, 0])
    with pytest.raises(ValueError):
        retrieval.rerank_with_inliers(sims, labels, [0, 1])


def test_inlier_verification_can_overturn_the_similarity_vote():
    # A is nearer, B is geometrically verified: the bonus (up to 1 per neighbour) decides.
    sims, labels = [0.95, 0.9, 0.6], ["A", "A", "B"]
    assert retrieval.class_scores_from_neighbours(sims, labels).best_class == "A"  # 1.7 vs 0.2
    result = retrieval.rerank_with_inliers(sims, labels, [0, 0, 400])
    assert result.per_class == pytest.approx({"A": 1.7, "B": 1.2})
    result = retrieval.rerank_with_inliers(sims, labels, [0, 0, 400],
                                           retrieval.AggregationParams(k=2))
    assert result.best_class == "A" and "B" not in result.per_class
