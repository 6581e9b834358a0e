"""Score aggregation, test-set normalisation and blending, against hand-computed values."""

import numpy as np
import pytest

from rescoring import scores


def test_aggregate_hand_computed():
    # counts 0, 10, 4, 7, 1: max 10; mean 22 / 5 = 4.4; best half = ceil(5/2) = 3 largest:
    # (10 + 7 + 4) / 3 = 7.
    np.testing.assert_allclose(scores.aggregate([0, 10, 4, 7, 1]), [10.0, 4.4, 7.0])
    # Even count: best half of 4 is 2: (9 + 5) / 2.
    np.testing.assert_allclose(scores.aggregate(np.array([5, 9, 1, 0])), [9.0, 3.75, 7.0])
    # One reference: all three equal it.
    np.testing.assert_allclose(scores.aggregate([3]), [3.0, 3.0, 3.0])


def test_aggregate_of_nothing_is_zeros():
    np.testing.assert_array_equal(scores.aggregate([]), [0.0, 0.0, 0.0])
    np.testing.assert_array_equal(scores.aggregate_many([[], [2, 4]]), [[0, 0, 0], [4, 3, 4]])
    assert scores.aggregate_many([]).shape == (0, 3)


def test_aggregate_rejects_negative_or_nan():
    with pytest.raises(ValueError):
        scores.aggregate([1, -1])
    with pytest.raises(ValueError):
        scores.aggregate([np.nan])


def test_best_half_size():
    assert [scores.best_half_size(n) for n in range(6)] == [0, 1, 1, 2, 2, 3]


def test_normalise_by_test_set_maximum_per_column():
    table = np.array([[10.0, 4.0, 0.0], [5.0, 8.0, 0.0], [0.0, 2.0, 0.0]])
    normalised = scores.normalise(table)
    # Column maxima 10, 8, 0: the zero column stays zero (no NaN).
    np.testing.assert_allclose(
        normalised, [[1.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.25, 0.0]]
    )
    assert not np.isnan(normalised).any()
    np.testing.assert_array_equal(scores.column_maxima(table), [10.0, 8.0, 0.0])


def test_normalise_with_given_maxima_and_one_column():
    # Maxima from a global combine (partial maxima merged with np.maximum).
    maxima = np.maximum(scores.column_maxima(np.array([[2.0, 1.0]])), [4.0, 0.0])
    np.testing.assert_allclose(scores.normalise(np.array([[2.0, 0.0]]), maxima), [[0.5, 0.0]])
    np.testing.assert_allclose(scores.normalise(np.array([3.0, 6.0]), 12.0), [0.25, 0.5])
    np.testing.assert_array_equal(scores.normalise(np.array([0.0, 0.0]), 0.0), [0.0, 0.0])
    assert scores.column_maxima(np.zeros((0, 3))).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        scores.normalise(np.array([1.0]), -1.0)


def test_blend_hand_computed():
    # (1 - 0.15) * 0.2 + 0.15 * 0.6 = 0.17 + 0.09 = 0.26
    assert scores.blend(0.2, 0.6) == pytest.approx(0.26)
    assert scores.blend(0.2, 0.6, scores.BlendParams(nn_weight=0.5)) == pytest.approx(0.4)
    assert scores.blend(0.2, 0.6, 1.0) == pytest.approx(0.6)  # w as a float
    np.testing.assert_allclose(
        scores.blend(np.array([0.0, 1.0]), np.array([1.0, 0.0])), [0.15, 0.85]
    )


def test_blend_params_validated():
    assert scores.BlendParams().nn_weight == 0.15
    with pytest.raises(ValueError):
        scores.BlendParams(nn_weight=1.5)
    with pytest.raises(ValueError):
        scores.blend(0.1, 0.2, -0.1)


def test_pipeline_of_the_three_steps_orders_images():
    # Image a: strong local match, weak classifier; b: no local match, confident classifier.
    table = scores.aggregate_many([[40, 2, 0, 0], [0, 0], [10, 10]])
    local_max = scores.normalise(table)[:, 0]  # 1.0, 0.0, 0.25
    final = scores.blend(local_max, np.array([0.2, 0.9, 0.5]))
    np.testing.assert_allclose(final, [0.85 + 0.03, 0.135, 0.2125 + 0.075])
    assert list(np.argsort(-final)) == [0, 2, 1]


def test_maxima_of_rows_and_of_partial_maxima():
    rows = [(10.0, 4.0, 0.0), (5.0, 8.0, 0.0), (0.0, 2.0, 1.0)]
    assert scores.maxima_of(rows) == (10.0, 8.0, 1.0)
    # Partial maxima of any split merge to the maxima of all rows (what a Beam combine does).
    assert scores.maxima_of([scores.maxima_of(rows[:1]), scores.maxima_of(rows[1:])]) == (
        10.0, 8.0, 1.0)
    assert scores.maxima_of(iter(rows[2:])) == (0.0, 2.0, 1.0)  # any iterable
    assert scores.maxima_of([]) == (0.0, 0.0, 0.0)  # an empty test set
    assert scores.maxima_of([], width=2) == (0.0, 0.0)
    assert all(type(value) is float for value in scores.maxima_of(rows))


def test_final_score_hand_computed():
    # local_max 5 of a test-set top of 20 -> 0.25; (1 - 0.15) * 0.25 + 0.15 * 0.6 = 0.3025.
    assert scores.final_score(5.0, 20.0, 0.6) == pytest.approx(0.3025)
    # w = 0.25 with dyadic values is exact: 0.75 * 0.5 + 0.25 * 0.5 = 0.5.
    assert scores.final_score(4.0, 8.0, 0.5, 0.25) == 0.5
    # A test set without any inlier: the classifier part alone, never NaN.
    assert scores.final_score(0.0, 0.0, 0.6) == pytest.approx(0.09)
    assert type(scores.final_score(1, 2, 0.5)) is float
