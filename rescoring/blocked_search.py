"""Exact top-k over an index that is read one block of rows at a time (e.g. from a file), so
memory is one block, never the whole index.

Pure arithmetic (no I/O): the caller gives the blocks, any iterable of ``(start, rows)``.
``landmarks-query`` uses it over the on-disk reference index
(``beam_pipelines/query/embedding_index.py``).

Ranking rule: similarity (dot product) descending, then the smaller position first; with rows
stored in id order (as the prediction job's shards) that is the job's rule, similarity
descending then id ascending (:func:`rescoring.retrieval.merge_top_k`).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from rescoring import retrieval


def blocked_top_k(queries, blocks: Iterable, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar rows of every query over an index given block by block, exactly.

    Each block is converted to float32 and searched by :func:`rescoring.retrieval.exact_top_k`;
    the running lists are merged by :func:`rescoring.retrieval.merge_top_k` with the positions
    as ids. So the result equals ``exact_top_k(queries, concatenated blocks, k)`` whatever the
    block sizes (both rank by similarity, then position); bit for bit when every block starts
    at a multiple of ``block_rows`` of ``exact_top_k`` (8192 by default: the same matrix
    products), else up to float32 rounding of the dot products, which BLAS may sum in a
    shape-dependent order (~1e-7 relative).

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
