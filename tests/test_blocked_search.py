"""rescoring.blocked_search: the blocked exact search equals exact_top_k over the whole index,
and the float16 two-stage search returns the float32 answer even where float16 alone would not.
"""

import numpy as np
import pytest

from rescoring import blocked_search, retrieval


def blocks_of(index, block_rows, dtype=np.float32):
    return [(start, index[start: start + block_rows].astype(dtype))
            for start in range(0, len(index), block_rows)]


@pytest.mark.parametrize("block_rows", [1, 7, 64, 250, 1000])
@pytest.mark.parametrize("k", [1, 5, 40, 300])
def test_blocked_top_k_equals_exact_top_k_with_ties(block_rows, k):
    # Small integers: every dot product is exact in float32, so the comparison is bit for bit,
    # and many similarities tie (ties: the smaller position first).
    rng = np.random.default_rng(block_rows * 1000 + k)
    index = rng.integers(-2, 3, size=(250, 16)).astype(np.float32)
    index[100:120] = index[3]  # 21 equal rows
    queries = rng.integers(-2, 3, size=(6, 16)).astype(np.float32)
    queries[0] = index[3]
    expected = retrieval.exact_top_k(queries, index, k)
    got = blocked_search.blocked_top_k(queries, blocks_of(index, block_rows), k)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])
    one = blocked_search.blocked_top_k(queries[0], blocks_of(index, block_rows), k)
    np.testing.assert_array_equal(one[1], expected[1][0])
    assert len(expected[1][0]) == min(k, 250)
    assert (expected[0][0][:21] == expected[0][0][0]).all()  # the ties were exercised


def test_blocked_top_k_of_no_rows():
    sims, positions = blocked_search.blocked_top_k(np.ones([2, 4], np.float32), [], 3)
    assert sims.shape == positions.shape == (2, 0)


def unit_rows(rng, rows, dims):
    return retrieval.l2_normalise(rng.standard_normal((rows, dims), dtype=np.float32))


def test_float16_error_bound_holds_on_random_and_adversarial_rows():
    """The bound is analytic; check it against the measured worst case of Gaussian unit rows
    and against rows and queries built to make rounding errors add up."""
    rng = np.random.default_rng(0)
    index = unit_rows(rng, 20000, 512)
    queries = unit_rows(rng, 20, 512)
    rounded = index.astype(np.float16).astype(np.float32)
    measured = np.abs(queries @ rounded.T - queries @ index.T).max()
    bound = max(blocked_search.float16_error_bound(q, 512) for q in queries)
    assert measured <= bound
    # Adversarial: the query's signs follow the rounding errors of one row, its magnitudes
    # that row's, so every term's error has the same sign (the Cauchy-Schwarz case).
    errors = rounded - index
    adversarial = retrieval.l2_normalise(np.sign(errors[:50]) * np.abs(index[:50]))
    worst = np.abs(np.einsum("ij,ij->i", adversarial, rounded[:50])
                   - np.einsum("ij,ij->i", adversarial, index[:50])).max()
    assert worst > 2 * measured  # a harder case than the random one...
    assert worst <= min(blocked_search.float16_error_bound(q, 512) for q in adversarial)


def near_ties(rng, dims=64):
    """Rows whose float32 similarities to the query differ by less than float16's rounding:
    one base row plus tiny perturbations, so float16 reorders them."""
    query = unit_rows(rng, 1, dims)[0]
    base = retrieval.l2_normalise(query + 0.3 * unit_rows(rng, 1, dims)[0])
    close = retrieval.l2_normalise(base + 2e-4 * rng.standard_normal((200, dims)).astype(
        np.float32))
    far = unit_rows(rng, 800, dims)
    index = np.concatenate([far[:400], close, far[400:]])
    return query, index


def two_stage(query, index, k, block_rows=97, first_width=0):
    stored = index.astype(np.float16)
    widths = []

    def scan(width):
        widths.append(width)
        return blocked_search.blocked_top_k(query, blocks_of(stored, block_rows), width)

    bound = blocked_search.float16_error_bound(query, index.shape[1])
    result = blocked_search.two_stage_top_k(query, scan, lambda positions: index[positions], k,
                                            len(index), bound, first_width)
    return result, widths


@pytest.mark.parametrize("k", [1, 3, 10])
def test_two_stage_gives_the_float32_answer_where_float16_alone_does_not(k):
    rng = np.random.default_rng(k)
    query, index = near_ties(rng)
    expected_sims, expected_positions = retrieval.exact_top_k(query[None], index, k)
    (sims, positions), widths = two_stage(query, index, k)
    np.testing.assert_array_equal(positions, expected_positions[0])
    np.testing.assert_array_equal(sims, expected_sims[0])
    # float16 alone ranks the near ties differently (so the test could fail).
    float16_positions = blocked_search.blocked_top_k(
        query, blocks_of(index.astype(np.float16), 97), k)[1]
    assert k == 1 or list(float16_positions) != list(expected_positions[0])
    # 200 rows within the margin: the first scan (2k + 16 rows) was widened.
    assert len(widths) > 1 and widths[-1] >= 200


def test_two_stage_with_a_clear_winner_scans_once_and_handles_small_indexes():
    rng = np.random.default_rng(5)
    index = unit_rows(rng, 500, 32)
    query = index[123]
    (sims, positions), widths = two_stage(query, index, 4)
    expected_sims, expected_positions = retrieval.exact_top_k(query[None], index, 4)
    np.testing.assert_array_equal(positions, expected_positions[0])
    np.testing.assert_array_equal(sims, expected_sims[0])
    assert positions[0] == 123 and widths == [24]
    (sims, positions), _ = two_stage(query, index[:3], 10)  # k > N
    np.testing.assert_array_equal(positions, retrieval.exact_top_k(query[None], index[:3],
                                                                   10)[1][0])
    empty = blocked_search.two_stage_top_k(query, None, None, 3, 0, 0.0)
    assert empty[0].shape == empty[1].shape == (0,)
