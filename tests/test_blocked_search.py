"""rescoring.blocked_search: the blocked exact search equals exact_top_k over the whole index."""

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


@pytest.mark.parametrize("block_rows", [16384, 5000])
def test_real_valued_blocks_aligned_with_exact_top_k_give_the_same_bits(block_rows):
    """Gaussian unit rows: with blocks at multiples of exact_top_k's 8192 rows (the query's
    default 16,384) the products are the same, so the similarities are equal bit for bit;
    other blocks give the same neighbours, similarities within float32 summation's bound."""
    rng = np.random.default_rng(3)
    index = retrieval.l2_normalise(rng.standard_normal((20000, 64), dtype=np.float32))
    queries = retrieval.l2_normalise(rng.standard_normal((4, 64), dtype=np.float32))
    queries[0] = index[17000]  # its own row, in the last (partial) block
    expected = retrieval.exact_top_k(queries, index, 10)
    got = blocked_search.blocked_top_k(queries, blocks_of(index, block_rows), 10)
    np.testing.assert_array_equal(got[1], expected[1])
    assert got[1][0][0] == 17000
    if block_rows % retrieval.DEFAULT_BLOCK_ROWS == 0:
        np.testing.assert_array_equal(got[0], expected[0])
    else:
        gamma = 64 * 2.0 ** -24 / (1 - 64 * 2.0 ** -24)  # |fl(q.x) - q.x| <= gamma |q| |x|
        np.testing.assert_allclose(got[0], expected[0], rtol=0, atol=2 * gamma)
