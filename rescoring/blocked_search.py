"""Exact top-k over an index that is read one block of rows at a time, and the two-stage search
of an index stored in float16: a float16 scan for candidates, then the candidates re-scored in
float32 from the exact rows, so the answer is the float32 answer.

Pure arithmetic (no I/O): the caller gives the blocks (any iterable of ``(start, rows)``, e.g.
read from a file) and, for the second stage, a function returning exact float32 rows.
``landmarks-query`` uses it over the on-disk reference index
(``beam_pipelines/query/embedding_index.py``): memory is one block, never the whole index.

Ranking rule everywhere: similarity (dot product) descending, then the smaller position first;
with rows stored in id order (as the prediction job's shards) that is the job's rule, similarity
descending then id ascending (:func:`rescoring.retrieval.merge_top_k`).

Why two stages: float16 has a unit roundoff of ``2**-11``; storing a unit row in float16 moves
its dot product with a unit query by at most ``2**-11 * |q| * |x|`` (about 4.9e-4; measured on
Gaussian unit rows, 512-d: at most 5.6e-5), far more than float32's rounding (about 6e-8 per
similarity). Rankings and similarities of the float16 scan therefore differ from the float32
ones the prediction job computes; :func:`two_stage_top_k` keeps every row that could be in the
float32 top-k (a margin of twice :func:`float16_error_bound` below the float16 k-th best) and
ranks those by their float32 similarities.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from rescoring import retrieval

FLOAT16_UNIT_ROUNDOFF = 2.0 ** -11
"""Largest relative error of rounding a normal float32 value to float16 (10 mantissa bits)."""

FLOAT16_SUBNORMAL_ERROR = 2.0 ** -25
"""Largest absolute error of rounding a value below float16's normal range (6.1e-5) to it."""

FLOAT32_UNIT_ROUNDOFF = 2.0 ** -24


def blocked_top_k(queries, blocks: Iterable, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar rows of every query over an index given block by block, exactly.

    Each block is converted to float32 and searched by :func:`rescoring.retrieval.exact_top_k`;
    the running lists are merged by :func:`rescoring.retrieval.merge_top_k` with the positions
    as ids. So the result equals ``exact_top_k(queries, concatenated blocks, k)`` whatever the
    block sizes (both rank by similarity, then position), up to float32 rounding of the dot
    products, which BLAS may sum in a shape-dependent order (~1e-7 relative).

    Args:
      queries: float ``[Q, D]`` (or ``[D]``: one query).
      blocks: iterable of ``(start, rows)``: ``rows`` float ``[b, D]`` (any float dtype, e.g.
        float16) are index rows ``start .. start + b - 1``; blocks must not overlap.
      k: neighbours wanted per query, >= 1.

    Returns:
      ``(similarities float32 [Q, k'], positions int64 [Q, k'])`` (``[k']`` for a ``[D]``
      query), ``k' = min(k, rows given)``, each row ranked as above.
    """
    queries = np.asarray(queries, np.float32)
    single = queries.ndim == 1
    queries = queries[None] if single else queries
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    lists: list = [[] for _ in range(queries.shape[0])]
    for start, rows in blocks:
        rows = np.asarray(rows, np.float32)
        if rows.shape[0] == 0:
            continue
        sims, positions = retrieval.exact_top_k(queries, rows, k)
        for query, (query_sims, query_positions) in enumerate(zip(sims, positions)):
            found = (query_sims, query_positions + int(start))
            lists[query] = [retrieval.merge_top_k(lists[query] + [found], k)]
    merged = [retrieval.merge_top_k(parts, k) for parts in lists]
    kept = min((len(sims) for sims, _ in merged), default=0)
    similarities = np.zeros([len(merged), kept], np.float32)
    positions = np.zeros([len(merged), kept], np.int64)
    for query, (sims, ids) in enumerate(merged):
        similarities[query], positions[query] = sims[:kept], ids[:kept]
    return (similarities[0], positions[0]) if single else (similarities, positions)


def float16_error_bound(query, dims: int, max_row_norm: float = 1.0) -> float:
    """An upper bound of ``|s16 - s32|`` for one query and any index row: ``s16`` its float32
    dot product with the row rounded to float16, ``s32`` with the row itself, both computed in
    float32.

    Rounding moves each of the row's values by at most ``2**-11`` of itself (normal range) or
    ``2**-25`` (below 6.1e-5), so the exact dot products differ by at most
    ``2**-11 |q| |x| + D 2**-25 max|q_i|`` (Cauchy-Schwarz); each float32 dot product is off by
    at most ``gamma_D |q| |x|`` (``gamma_D = D u / (1 - D u)``, ``u = 2**-24``, the classic
    summation bound), counted twice. For unit 512-d rows: 5.6e-4.

    Args:
      query: float ``[D]``.
      dims: D.
      max_row_norm: the largest L2 norm of an index row (1 for unit rows; give the measured
        one, float32 normalisation leaves it within 1e-7 of 1).
    """
    query = np.asarray(query, np.float64).reshape(-1)
    norm = float(np.linalg.norm(query))
    largest = float(np.abs(query).max()) if query.size else 0.0
    gamma = dims * FLOAT32_UNIT_ROUNDOFF / (1.0 - dims * FLOAT32_UNIT_ROUNDOFF)
    row_norm = float(max_row_norm) * (1.0 + FLOAT16_UNIT_ROUNDOFF)
    return (FLOAT16_UNIT_ROUNDOFF * norm * float(max_row_norm)
            + dims * FLOAT16_SUBNORMAL_ERROR * largest
            + 2.0 * gamma * norm * row_norm)


def two_stage_top_k(query, scan: Callable, exact_rows: Callable, k: int, num_rows: int,
                    bound: float, first_width: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The float32 top-k of one query over an index stored with rounding error, exactly.

    1. ``scan(K)`` gives the top K of the stored (rounded) index, e.g. :func:`blocked_top_k`
       over float16 blocks. With ``t`` its k-th similarity, every row of the float32 top-k
       has a stored similarity ``>= t - 2 * bound``: k rows have float32 similarities
       ``>= t - bound``, so the float32 k-th is ``>= t - bound``, and rounding moves it by at
       most ``bound`` again. When the K-th stored similarity is still ``>= t - 2 * bound``
       (many near-ties), the scan is repeated with 4 K until the candidates are complete.
    2. The candidates (rows with stored similarity ``>= t - 2 * bound``) are re-scored with
       ``exact_rows(positions)``, float32 ``[m, D]``, and ranked: similarity descending, then
       position.

    So the result is the float32 top-k of the index (similarities as ``exact_top_k``), ties
    included, provided ``bound`` bounds ``|stored - float32|`` (:func:`float16_error_bound`).

    Args:
      query: float ``[D]``.
      scan: ``scan(K) -> (similarities [min(K, N)], positions [min(K, N)])``, ranked.
      exact_rows: ``exact_rows(positions int64 [m]) -> float32 [m, D]``.
      k: neighbours wanted, >= 1.
      num_rows: N, rows in the index.
      bound: the largest ``|stored similarity - float32 similarity|``, >= 0.
      first_width: K of the first scan (default ``2 k + 16``).

    Returns:
      ``(similarities float32 [k'], positions int64 [k'])``, ``k' = min(k, N)``.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if not bound >= 0:
        raise ValueError(f"bound must be >= 0, got {bound}")
    query = np.asarray(query, np.float32).reshape(-1)
    if num_rows <= 0:
        return np.zeros([0], np.float32), np.zeros([0], np.int64)
    width = min(int(first_width) or 2 * int(k) + 16, num_rows)
    while True:
        stored, positions = scan(width)
        stored = np.asarray(stored, np.float32)
        positions = np.asarray(positions, np.int64)
        threshold = (float(stored[min(k, len(stored)) - 1]) - 2.0 * bound
                     if len(stored) else -np.inf)
        if width >= num_rows or float(stored[-1]) < threshold:
            break
        width = min(4 * width, num_rows)
    candidates = np.sort(positions[stored >= threshold])
    rows = np.asarray(exact_rows(candidates), np.float32)
    if rows.shape != (len(candidates), query.size):
        raise ValueError(f"exact_rows gave shape {rows.shape} for {len(candidates)} rows of "
                         f"{query.size} values")
    # The candidates in position order, so exact_top_k's tie rule (smaller position first)
    # is the index's; the same matrix product as a search of the float32 rows.
    similarities, chosen = retrieval.exact_top_k(query[None], rows, k)
    return similarities[0], candidates[chosen[0]]
