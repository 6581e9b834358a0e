"""Recognition by retrieval over global descriptors: exact top-k search and the scoring rules.

A second recognizer beside the classifier (docs/METHOD.md, "Retrieval recognizer"). Every
image is one global descriptor: an L2-normalised float32 row of D numbers (an embedding), so
the cosine similarity of two images is a dot product, in [-1, 1]. A test image is recognised by
its nearest reference (training) images:

1. :func:`combine_view_embeddings`: a test image's views -> one unit embedding.
2. :func:`exact_top_k`: the k most similar references of each query, blocked over the index
   so memory stays bounded; the Beam job runs it on each shard of the reference index.
3. :func:`merge_top_k`: several top-k lists of the same query (one per shard) -> one; the
   combiner of the Beam job (associative and commutative, so any grouping gives one answer).
4. :func:`class_scores_from_neighbours`: the top-k neighbours' similarities and labels ->
   per-class scores, the best class and its score (GLR-2019 rule by default, see below).
5. :func:`non_landmark_penalty` / :func:`penalise`: test images that look like the training
   non-landmark images get their similarities lowered before step 4.
6. :func:`rerank_with_inliers`: step 4 with each neighbour's verified local-feature inlier
   count added (GLR-2019 spatial-verification re-ranking).

Everything here is numpy on plain arrays (no Beam, no TensorFlow); approximate search, which
needs FAISS, lives in :mod:`rescoring.ann`.

Sources of the rules (read for this module, not copied):

* GLR-2019, team smlyaka: K. Ozaki, S. Yokoo, "Large-scale Landmark Retrieval/Recognition
  under a Noisy and Diverse Dataset", arXiv:1906.04087 (1st place retrieval, 3rd place
  recognition), and their published recognition script: the k = 3 nearest training images
  (Euclidean search on unit descriptors) vote for their landmarks with ``1 - |q - x|^2``
  (``= 2 cos - 1`` for unit vectors), plus ``min(inliers, 70) / 70`` per neighbour when
  DELF + RANSAC verified the pair; the landmark with the largest sum wins, the sum is the
  confidence.
* GLR-2020, 3rd place: Q. Ha, B. Liu, F. Liu, P. Liao, arXiv:2010.05350, and their published
  submission notebook: the k = 5 nearest neighbours vote with ``cos^9`` (its sign kept: a
  negative similarity votes against), multiplied by the classifier's probability of that
  landmark to the power 10 (1e-8 for a landmark outside the classifier's top 5). Available here
  as ``AggregationParams.glr2020_third()``; the probabilities are
  ``rescoring.voting.top_mean_probabilities`` (the mean over the test image's views).
* Non-landmark penalty: the idea of GLR-2020's 1st place (C. Henkel, P. Singer,
  arXiv:2010.01650: "re-rank predictions and filter noise utilizing similarity to
  out-of-domain images") and GLR-2021's 3rd place (C. Xu et al., arXiv:2110.02794: "adjusting
  the retrieval score with [...] non-landmark distractors"). Their exact formulas were not
  available to us; the rule below (subtract the mean similarity to the test image's k = 5
  nearest non-landmark images) is our concrete form of it, and its k and weight are ours.
"""

from __future__ import annotations

import dataclasses
from typing import Hashable, Iterable, Mapping, NamedTuple, Optional, Sequence

import numpy as np

NON_LANDMARK_LABEL = -1
"""Label of a non-landmark (distractor) image, as ``tfrecords_schema.image_record.NON_LANDMARK``."""

DEFAULT_BLOCK_ROWS = 8192
"""Index rows per matrix product in :func:`exact_top_k` (8192 x 512 float32 = 16 MB of index).
Chosen with ``bench/bench_knn_exact.py --sweep 2048,4096,8192,16384,32768`` (1000 queries x
100k x 512, one core): 4096 and 8192 reached 89-91% of the machine's matrix-product rate,
16384 and 32768 ~80% (their ``1024 x block_rows`` similarity blocks, 64-128 MB, no longer stay
in the 32 MB L3 cache between the product and the scan), 2048 ~78% (smaller, less efficient
products)."""

DEFAULT_QUERY_ROWS = 1024
"""Queries per matrix product in :func:`exact_top_k`: with 8192 index rows, a 32 MB similarity
block. Fewer queries per product lowered the rate in the same measurements (256: ~75%)."""

_GROUP_SIZE = 16
"""Elements per group in the threshold scan of :func:`exact_top_k` (see ``_TopK``)."""


def l2_normalise(vectors, axis: int = -1) -> np.ndarray:
    """Each vector scaled to unit length along ``axis``; all-zero vectors stay zero.

    Args:
      vectors: float array ``[..., D]`` (any float dtype).
      axis: the axis holding the D numbers of one vector.

    Returns:
      float32 array of the same shape.
    """
    vectors = np.asarray(vectors, np.float32)
    norms = np.linalg.norm(vectors, axis=axis, keepdims=True)
    return vectors / np.maximum(norms, np.float32(1e-12))


def combine_view_embeddings(view_embeddings) -> np.ndarray:
    """One embedding per image from the embeddings of its views (crops, mirrors).

    Rule: each view's embedding is L2-normalised, the V unit vectors are averaged, and the mean
    is L2-normalised again. So every view weighs the same whatever its raw norm, and the result
    is a unit vector whose dot product with a reference is the mean of the views' cosines
    divided by the norm of the mean (``|mean| <= 1``, equal to 1 when all views agree). This is
    the usual multi-view (e.g. flip) averaging of global descriptors; with one view it is just
    that view normalised.

    Args:
      view_embeddings: float ``[V, D]`` (one image) or ``[B, V, D]`` (a batch), V >= 1.

    Returns:
      float32 ``[D]`` or ``[B, D]``, unit rows (zero if every view embedding is zero).
    """
    views = np.asarray(view_embeddings)
    if views.ndim not in (2, 3) or views.shape[-2] < 1 or views.shape[-1] < 1:
        raise ValueError(f"expected [V, D] or [B, V, D] view embeddings with V, D >= 1, got {views.shape}")
    if not np.all(np.isfinite(views)):
        raise ValueError("view embeddings contain NaN or infinity")
    return l2_normalise(l2_normalise(views).mean(axis=-2))


# ---- exact top-k --------------------------------------------------------------------------------


def _as_matrix(values, name: str) -> np.ndarray:
    matrix = np.asarray(values)
    if matrix.ndim != 2:
        raise ValueError(f"{name} must be a 2-D [rows, D] array, got shape {matrix.shape}")
    if not np.issubdtype(matrix.dtype, np.number) or np.iscomplexobj(matrix):
        raise ValueError(f"{name} must be real numbers, got dtype {matrix.dtype}")
    return np.ascontiguousarray(matrix, np.float32)


def _select_exact(sims: np.ndarray, positions: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best entries of each row (in no particular order).

    "Best": larger similarity, and on equal similarity the smaller position.

    Args:
      sims: float32 ``[R, W]``, W >= k; -inf marks padding (never chosen while a row holds k
        finite values).
      positions: int64 ``[R, W]``, the positions of ``sims``, distinct within a row (padding:
        the largest int64).
      k: entries kept per row.

    Returns:
      ``(sims [R, k], positions [R, k])``.
    """
    rows, width = sims.shape
    if width == k:
        return sims, positions
    chosen = np.argpartition(sims, width - k, axis=1)[:, width - k :]  # k largest, ties arbitrary
    top_sims = np.take_along_axis(sims, chosen, axis=1)
    top_positions = np.take_along_axis(positions, chosen, axis=1)
    # Ties at the boundary: where more entries equal the k-th largest than were chosen, choose
    # those with the smallest positions instead (rare with real-valued similarities).
    kth = top_sims.min(axis=1)
    tied = np.flatnonzero(np.count_nonzero(sims == kth[:, None], axis=1)
                          > np.count_nonzero(top_sims == kth[:, None], axis=1))
    if tied.size:
        tied_sims, tied_positions = sims[tied], positions[tied]
        order = np.lexsort((tied_positions, -tied_sims), axis=1)[:, :k]
        top_sims[tied] = np.take_along_axis(tied_sims, order, axis=1)
        top_positions[tied] = np.take_along_axis(tied_positions, order, axis=1)
    return top_sims, top_positions


class _TopK:
    """Running top-k of R queries while index blocks arrive in increasing position order.

    State: ``sims``/``positions`` ``[R, m]`` (m <= k, the same for every row, unordered within a
    row). A new block of similarities ``[R, b]`` is scanned against each row's
    threshold (its current k-th best similarity): only entries at or above it can enter.

    The scan is cheap relative to the matrix product: the block is cut into G groups of g
    columns (group j = columns j, j + G, j + 2G, ...: strided, so the group maxima are g
    elementwise maxima of contiguous slices), and only groups whose maximum reaches the
    threshold are looked at element by element. Before a row holds k entries the threshold is
    the k-th largest group maximum of the block (if there are >= k groups), a lower bound of the
    block's k-th largest similarity; otherwise every entry is a candidate.
    """

    def __init__(self, rows: int, k: int):
        self.k = k
        self.sims = np.zeros([rows, 0], np.float32)
        self.positions = np.zeros([rows, 0], np.int64)

    @staticmethod
    def _offsets(group: int, groups: int) -> np.ndarray:
        return (np.arange(group, dtype=np.int64) * groups)[None, :]

    def _group_size(self, width: int) -> int:
        # Grouping pays when there are enough groups for the first-block threshold (>= k).
        return _GROUP_SIZE if width // _GROUP_SIZE >= self.k else 0

    def update(self, block: np.ndarray, start: int) -> None:
        """Takes the similarities ``block [R, b]`` of index rows ``start .. start + b - 1``."""
        rows, width = block.shape
        full = self.sims.shape[1] == self.k
        group = self._group_size(width)
        if not full and not group:
            # Everything is a candidate: append the block and keep the k best.
            positions = np.broadcast_to(np.arange(start, start + width, dtype=np.int64), block.shape)
            sims = np.concatenate([self.sims, block], axis=1)
            positions = np.concatenate([self.positions, positions], axis=1)
            self.sims, self.positions = _select_exact(sims, positions, min(self.k, sims.shape[1]))
            return
        if group:
            groups = width // group
            main = groups * group
            grouped = block if main == width else block[:, :main]
            group_max = grouped.reshape(rows, group, groups).max(axis=1)  # [R, G]
        if full:
            threshold = self.sims.min(axis=1)  # the current k-th best
        else:  # a lower bound of the block's k-th largest: its k-th largest group maximum
            threshold = np.partition(group_max, groups - self.k, axis=1)[:, groups - self.k]
        if group:
            cand_rows, cand_groups = np.nonzero(group_max >= threshold[:, None])
            # Element i of group j is column j + i * groups; gather every candidate group's g.
            flat = cand_rows * width + cand_groups  # flat index of each group's first element
            values = np.take(block.reshape(-1), flat[:, None] + self._offsets(group, groups))
            hit_c, hit_i = np.nonzero(values >= threshold[cand_rows, None])
            hit_rows, hit_vals = cand_rows[hit_c], values[hit_c, hit_i]
            hit_cols = cand_groups[hit_c] + hit_i * groups
            if main < width:  # the last < g columns, compared directly
                tail_rows, tail_cols = np.nonzero(block[:, main:] >= threshold[:, None])
                tail_cols = tail_cols + main
                hit_rows = np.concatenate([hit_rows, tail_rows])
                hit_cols = np.concatenate([hit_cols, tail_cols])
                hit_vals = np.concatenate([hit_vals, block[tail_rows, tail_cols]])
                order = np.argsort(hit_rows, kind="stable")  # row by row again
                hit_rows, hit_cols, hit_vals = hit_rows[order], hit_cols[order], hit_vals[order]
        else:
            hit_rows, hit_cols = np.nonzero(block >= threshold[:, None])  # already row-major
            hit_vals = block[hit_rows, hit_cols]
        if hit_rows.size:
            self._merge(hit_rows, hit_cols.astype(np.int64) + start, hit_vals)

    def _merge(self, hit_rows: np.ndarray, hit_positions: np.ndarray, hit_vals: np.ndarray) -> None:
        """Merges candidates, grouped row by row (``hit_rows`` non-decreasing), into the state."""
        rows, current = self.sims.shape
        counts = np.bincount(hit_rows, minlength=rows)
        changed = np.flatnonzero(counts)
        slot = np.zeros(rows, np.int64)
        slot[changed] = np.arange(changed.size)
        width = current + int(counts.max())
        sims = np.full([changed.size, width], -np.inf, np.float32)
        positions = np.full([changed.size, width], np.iinfo(np.int64).max, np.int64)
        sims[:, :current] = self.sims[changed]
        positions[:, :current] = self.positions[changed]
        first = np.cumsum(counts) - counts  # index of each row's first candidate
        column = current + np.arange(hit_rows.size) - first[hit_rows]
        sims[slot[hit_rows], column] = hit_vals
        positions[slot[hit_rows], column] = hit_positions
        if current == self.k:
            self.sims[changed], self.positions[changed] = _select_exact(sims, positions, self.k)
            return
        # Filling up (first grouped block): every row has >= k candidates, so every row changed.
        if changed.size != rows:
            raise AssertionError("a row got no candidate while its top-k was not full")
        self.sims, self.positions = _select_exact(
            sims, positions, min(self.k, current + int(counts.min())))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """``(sims [R, m], positions [R, m])`` sorted: similarity descending, then position."""
        order = np.lexsort((self.positions, -self.sims), axis=1)
        return (np.take_along_axis(self.sims, order, axis=1),
                np.take_along_axis(self.positions, order, axis=1))


def exact_top_k(
    queries,
    index,
    k: int,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    query_rows: int = DEFAULT_QUERY_ROWS,
) -> tuple[np.ndarray, np.ndarray]:
    """The k most similar index rows of every query, by dot product, exactly.

    The index is processed in blocks of ``block_rows`` rows (and the queries in chunks of
    ``query_rows``): one matrix product per block, then a threshold scan that keeps each query's
    running top-k (see ``_TopK``). Memory is ``O(query_rows * block_rows + Q * k)`` besides the
    inputs; there is never a ``[Q, N]`` matrix, and no Python loop over queries or references.

    Ties: of equal similarities the smaller index position ranks first, as a stable sort of
    the full similarity matrix would order them. Results equal a brute-force
    ``np.argsort(-(queries @ index.T), kind="stable")`` whenever the matrix product itself is
    exact (e.g. small-integer data); otherwise up to float32 rounding of the dot products, which
    BLAS may sum in a block-dependent order (~1e-7 relative).

    Args:
      queries: float ``[Q, D]``, e.g. L2-normalised test embeddings (cast to float32).
      index: float ``[N, D]``, e.g. L2-normalised reference embeddings (cast to float32).
      k: neighbours wanted per query, >= 1; ``k' = min(k, N)`` are returned.
      block_rows: index rows per matrix product (>= 1).
      query_rows: queries per matrix product (>= 1).

    Returns:
      ``(similarities, positions)``: float32 ``[Q, k']`` dot products (cosines for unit rows),
      each row descending; int64 ``[Q, k']`` row numbers in ``index``.

    Raises:
      ValueError: bad shapes, k < 1, non-finite values.
    """
    queries = _as_matrix(queries, "queries")
    index = _as_matrix(index, "index")
    if queries.shape[1] != index.shape[1]:
        raise ValueError(f"queries have {queries.shape[1]} dimensions, the index {index.shape[1]}")
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if block_rows < 1 or query_rows < 1:
        raise ValueError(f"block_rows and query_rows must be >= 1, got {block_rows}, {query_rows}")
    # One sum per array: NaN or infinity anywhere makes it non-finite (so would values near
    # float32's limit, 3.4e38, which no embedding has), at a fraction of np.isfinite's cost.
    if not np.isfinite(queries.sum()) or not np.isfinite(index.sum()):
        raise ValueError("queries or index contain NaN or infinity")
    num_queries, num_index = queries.shape[0], index.shape[0]
    kept = min(int(k), num_index)
    similarities = np.zeros([num_queries, kept], np.float32)
    positions = np.zeros([num_queries, kept], np.int64)
    if kept == 0:
        return similarities, positions
    for q_start in range(0, num_queries, query_rows):
        chunk = queries[q_start : q_start + query_rows]
        state = _TopK(chunk.shape[0], kept)
        for start in range(0, num_index, block_rows):
            state.update(chunk @ index[start : start + block_rows].T, start)
        chunk_sims, chunk_positions = state.result()
        similarities[q_start : q_start + chunk.shape[0]] = chunk_sims
        positions[q_start : q_start + chunk.shape[0]] = chunk_positions
    return similarities, positions


# ---- merging top-k lists (the Beam combiner) -----------------------------------------------------


def _check_list(similarities, ids) -> tuple[np.ndarray, np.ndarray]:
    sims = np.asarray(similarities, np.float32).reshape(-1)
    ids = np.asarray(ids).reshape(-1)
    if sims.shape != ids.shape:
        raise ValueError(f"a top-k list needs one id per similarity, got {sims.shape} and {ids.shape}")
    if not np.all(np.isfinite(sims)):
        raise ValueError("similarities contain NaN or infinity")
    if ids.size and ids.dtype.kind not in "iuUS":
        raise ValueError(f"ids must be integers or strings, got dtype {ids.dtype}")
    return sims, ids


def merge_top_k(lists: Iterable[tuple], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merges top-k lists of one query (e.g. one per index shard) into its top-k.

    Order: similarity descending, then id ascending (so equal similarities resolve the same way
    however the lists were split). An id present in several lists counts once, with its largest
    similarity. The result is the top-k of the union of the inputs, so merging is associative,
    commutative and idempotent, and merged results may be merged again: Beam's
    ``CombinePerKey(lambda lists: merge_top_k(lists, k))`` gives one answer whatever the
    grouping of partial merges.

    Args:
      lists: iterable of ``(similarities, ids)``: float ``[n_i]`` and ``[n_i]`` reference ids,
        all integers or all strings (n_i may be 0, any order).
      k: length kept, >= 1.

    Returns:
      ``(similarities float32 [m], ids [m])``, ``m = min(k, distinct ids)``, in the order above;
      ids keep their dtype (int64 for integers). No input list: float32 ``[0]`` and int64 ``[0]``.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    checked = [_check_list(sims, ids) for sims, ids in lists]
    checked = [(sims, ids) for sims, ids in checked if sims.size]
    if not checked:
        return np.zeros([0], np.float32), np.zeros([0], np.int64)
    kinds = {"int" if ids.dtype.kind in "iu" else "str" for _, ids in checked}
    if len(kinds) > 1:
        raise ValueError("ids mix integers and strings across lists")
    sims = np.concatenate([s for s, _ in checked])
    ids = np.concatenate([i for _, i in checked])
    if ids.dtype.kind in "iu":
        ids = ids.astype(np.int64)
    order = np.lexsort((ids, -sims))  # similarity descending, then id ascending
    sims, ids = sims[order], ids[order]
    # The first occurrence of each id in this order is its largest similarity.
    _, first = np.unique(ids, return_index=True)
    first.sort()
    first = first[: int(k)]
    return sims[first], ids[first]


# ---- from neighbours to class scores -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class AggregationParams:
    """How the nearest neighbours vote (see :func:`class_scores_from_neighbours`).

    Attributes:
      k: neighbours that vote (the k most similar of those given).
      weighting: ``"distance"``: a neighbour of similarity s votes ``1 - |q - x|^2 = 2 s - 1``
        (GLR-2019, Ozaki & Yokoo, with k = 3, the default); ``"power"``: it votes
        ``sign(s) * |s| ** power``, which is ``s ** 9`` for power = 9 (GLR-2020 3rd place, Ha
        et al., with k = 5: a negative similarity votes against its class).
      power: exponent of the ``"power"`` weighting.
      confidence_power: with class confidences given (a classifier's probabilities), each vote
        is multiplied by ``confidence(class) ** confidence_power`` (Ha et al.: 10).
      missing_confidence: confidence of a class the classifier did not report (Ha et al.: 1e-8).
    """

    k: int = 3
    weighting: str = "distance"
    power: float = 9.0
    confidence_power: float = 10.0
    missing_confidence: float = 1e-8

    def __post_init__(self):
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if self.weighting not in ("distance", "power"):
            raise ValueError(f"weighting must be 'distance' or 'power', got {self.weighting!r}")
        if not self.power > 0 or not self.confidence_power >= 0:
            raise ValueError(f"power must be > 0 and confidence_power >= 0, got {self.power}, "
                             f"{self.confidence_power}")
        if not 0 <= self.missing_confidence <= 1:
            raise ValueError(f"missing_confidence must lie in [0, 1], got {self.missing_confidence}")

    @classmethod
    def glr2019(cls) -> "AggregationParams":
        """Ozaki & Yokoo (GLR-2019): k = 3, votes ``2 s - 1`` (the default)."""
        return cls()

    @classmethod
    def glr2020_third(cls) -> "AggregationParams":
        """Ha et al. (GLR-2020 3rd place): k = 5, votes ``s ** 9 * confidence ** 10``."""
        return cls(k=5, weighting="power", power=9.0)


class ClassScores(NamedTuple):
    """One test image's verdict.

    Attributes:
      best_class: the label with the largest score (None when there were no neighbours).
      score: its score (0.0 when there were no neighbours); see the rule for its range.
      per_class: every voted label -> its score.
    """

    best_class: Optional[Hashable]
    score: float
    per_class: dict


def _top_neighbours(similarities, labels, k: int):
    sims = np.asarray(similarities, np.float64).reshape(-1)
    labels = list(np.asarray(labels, dtype=object).reshape(-1))
    if len(labels) != sims.size:
        raise ValueError(f"one label per similarity needed, got {sims.size} and {len(labels)}")
    if not np.all(np.isfinite(sims)):
        raise ValueError("similarities contain NaN or infinity")
    # The k most similar, nearest first; equal similarities keep the given order.
    order = np.argsort(-sims, kind="stable")[:k]
    return sims[order], [_plain(labels[i]) for i in order], order


def _plain(label):
    """numpy scalars -> Python scalars, so labels hash and print as the caller expects."""
    return label.item() if isinstance(label, np.generic) else label


def _neighbour_votes(sims: np.ndarray, labels: list, params: AggregationParams,
                     class_confidences: Optional[Mapping]) -> np.ndarray:
    if params.weighting == "distance":
        votes = 2.0 * sims - 1.0
    else:
        # The sign is kept (the source votes cos ** 9): a neighbour less similar than
        # orthogonal, e.g. after the non-landmark penalty, lowers its class's score.
        votes = np.sign(sims) * np.abs(sims) ** params.power
    if class_confidences is not None:
        factors = [float(class_confidences.get(label, params.missing_confidence)) for label in labels]
        votes = votes * np.asarray(factors, np.float64) ** params.confidence_power
    return votes


def _sum_by_class(labels: list, votes: np.ndarray) -> ClassScores:
    """Sums votes per label; the best label wins, ties go to the label of the nearer neighbour."""
    per_class: dict = {}
    for label, vote in zip(labels, votes):  # labels are nearest first: dict order = first rank
        per_class[label] = per_class.get(label, 0.0) + float(vote)
    if not per_class:
        return ClassScores(None, 0.0, {})
    best = max(per_class, key=per_class.get)  # first maximum in insertion order
    return ClassScores(best, per_class[best], per_class)


def class_scores_from_neighbours(
    similarities,
    labels,
    params: AggregationParams | None = None,
    class_confidences: Optional[Mapping] = None,
) -> ClassScores:
    """Per-class scores of one test image from its nearest reference images.

    Rule (default, GLR-2019, Ozaki & Yokoo, arXiv:1906.04087): the k = 3 most similar
    references vote; a reference of cosine similarity s votes ``1 - |q - x|^2 = 2 s - 1`` (the
    squared Euclidean distance of unit vectors is ``2 - 2 s``) for its label; a label's score is
    the sum of its votes; the best label is the one with the largest score, which is also the
    prediction's confidence. So a label with 2 neighbours at 0.8 (0.6 + 0.6 = 1.2) beats one
    neighbour at 0.95 (0.9). Scores lie in ``[-k, k]``. Ties between labels go to the label
    whose first neighbour ranks higher.

    ``AggregationParams.glr2020_third()`` (Ha et al., arXiv:2010.05350) uses k = 5 and votes
    ``s ** 9`` (sign kept), each times ``class_confidences[label] ** 10`` when given (1e-8 for
    a label not in it), the classifier's probabilities of its top 5 classes.

    Args:
      similarities: float ``[n]``, cosine similarities to n reference images (any order; e.g. a
        merged top-k list). Non-landmark references should be removed first
        (:func:`split_non_landmarks`).
      labels: ``[n]`` their labels (any hashable values, e.g. landmark ids).
      params: the rule; :class:`AggregationParams` defaults (GLR-2019) when None.
      class_confidences: optional label -> probability in [0, 1] from a classifier.

    Returns:
      :class:`ClassScores` ``(best_class, score, per_class)``; ``(None, 0.0, {})`` for n = 0.
    """
    params = params or AggregationParams()
    sims, labels, _ = _top_neighbours(similarities, labels, params.k)
    return _sum_by_class(labels, _neighbour_votes(sims, labels, params, class_confidences))


def split_non_landmarks(similarities, labels, non_landmark_label=NON_LANDMARK_LABEL):
    """Separates the neighbours that are non-landmark images (label ``non_landmark_label``).

    For a reference index that holds landmark and non-landmark training images together.

    Returns:
      ``(landmark_similarities float64 [n1], landmark_labels list [n1],
      non_landmark_similarities float64 [n2])``, each in the given order.
    """
    sims = np.asarray(similarities, np.float64).reshape(-1)
    labels = [_plain(label) for label in np.asarray(labels, dtype=object).reshape(-1)]
    if len(labels) != sims.size:
        raise ValueError(f"one label per similarity needed, got {sims.size} and {len(labels)}")
    is_non = np.array([label == non_landmark_label for label in labels], bool)
    kept = [label for label, non in zip(labels, is_non) if not non]
    return sims[~is_non], kept, sims[is_non]


DEFAULT_NON_LANDMARK_K = 5
"""Nearest non-landmark images averaged by :func:`non_landmark_penalty` (our choice)."""


def non_landmark_penalty(non_landmark_similarities, k: int = DEFAULT_NON_LANDMARK_K) -> float:
    """How much a test image looks like the training non-landmark images.

    Rule: the mean cosine similarity of the test image to its k = 5 most similar non-landmark
    (distractor) training images; the mean of all of them when fewer are given, 0 when none.
    :func:`penalise` subtracts it from the test image's similarities to the landmark
    references before they vote, so a test image as close to non-landmarks as to landmarks
    scores low (its votes drop towards ``2 * 0 - 1``), while a clear landmark image, far from
    every non-landmark, keeps its score. Source of the idea: GLR-2020 1st place (Henkel &
    Singer, arXiv:2010.01650) and GLR-2021 3rd place (Xu et al., arXiv:2110.02794), which
    re-rank with the similarity to non-landmark images; this form, k and the weight are ours.

    Args:
      non_landmark_similarities: float ``[n]`` similarities to non-landmark images (any order,
        e.g. the test image's top-k in a non-landmark index).
      k: how many of the most similar are averaged, >= 1.

    Returns:
      The mean, a float in [-1, 1] for unit embeddings.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    sims = np.asarray(non_landmark_similarities, np.float64).reshape(-1)
    if not np.all(np.isfinite(sims)):
        raise ValueError("similarities contain NaN or infinity")
    if sims.size == 0:
        return 0.0
    return float(np.sort(sims)[::-1][: int(k)].mean())


def penalise(similarities, penalty: float, weight: float = 1.0) -> np.ndarray:
    """``similarities - weight * penalty`` (float64), the penalty of :func:`non_landmark_penalty`."""
    if not np.isfinite(penalty) or not np.isfinite(weight) or weight < 0:
        raise ValueError(f"penalty must be finite and weight finite and >= 0, got {penalty}, {weight}")
    return np.asarray(similarities, np.float64) - weight * float(penalty)


# ---- re-ranking with verified local features ------------------------------------------------------

INLIER_CAP = 70
"""Inlier count at which a neighbour's verification bonus saturates at 1 (Ozaki & Yokoo)."""


class RerankedScores(NamedTuple):
    """:class:`ClassScores` fields plus what the existing blend needs.

    Attributes:
      best_class, score, per_class: as :class:`ClassScores`, votes including the inlier term.
      best_class_inliers: float64 ``[r]``, the inlier counts of the best class's voting
        neighbours (nearest first), for ``rescoring.scores.aggregate`` and the blend.
    """

    best_class: Optional[Hashable]
    score: float
    per_class: dict
    best_class_inliers: np.ndarray


def rerank_with_inliers(
    similarities,
    labels,
    inlier_counts,
    params: AggregationParams | None = None,
    inlier_cap: float = INLIER_CAP,
    class_confidences: Optional[Mapping] = None,
) -> RerankedScores:
    """Per-class scores of one test image from its neighbours and their verified inliers.

    Rule (GLR-2019, Ozaki & Yokoo): as :func:`class_scores_from_neighbours`, and each of the k
    voting neighbours adds ``min(inliers, 70) / 70`` to its vote, where ``inliers`` is the
    RANSAC inlier count of the test image against that reference
    (``rescoring.verification.count_inliers``). A geometrically verified neighbour (70 or more
    inliers) thus counts as much as a perfect similarity (``2 s - 1 = 1``); an unverified one
    (0 inliers) keeps its plain vote. Scores lie in ``[-k, 2k]`` with the default weighting.

    Only the k most similar neighbours need inlier counts: the Beam job verifies those pairs
    (others may be given as 0, they do not vote). Afterwards, the classic blend still applies:
    ``rescoring.scores.aggregate(result.best_class_inliers)`` gives the local-feature columns
    for ``normalise`` and ``blend``.

    Args:
      similarities: float ``[n]`` cosine similarities to the retrieved references.
      labels: ``[n]`` their labels.
      inlier_counts: ``[n]`` non-negative inlier counts of the same pairs.
      params: the similarity rule (:class:`AggregationParams`; GLR-2019 when None).
      inlier_cap: the count worth a bonus of 1 (> 0).
      class_confidences: optional label -> probability, as in :func:`class_scores_from_neighbours`
        (it multiplies the similarity vote only).

    Returns:
      :class:`RerankedScores`.
    """
    params = params or AggregationParams()
    if not inlier_cap > 0:
        raise ValueError(f"inlier_cap must be > 0, got {inlier_cap}")
    counts = np.asarray(inlier_counts, np.float64).reshape(-1)
    if counts.size != np.asarray(similarities).size:
        raise ValueError(f"one inlier count per similarity needed, got {counts.size}")
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"inlier counts must be finite and >= 0, got {counts}")
    sims, labels, order = _top_neighbours(similarities, labels, params.k)
    counts = counts[order]
    votes = _neighbour_votes(sims, labels, params, class_confidences)
    votes = votes + np.minimum(counts, inlier_cap) / inlier_cap
    scores = _sum_by_class(labels, votes)
    best_inliers = np.array([c for c, label in zip(counts, labels) if label == scores.best_class],
                            np.float64)
    return RerankedScores(scores.best_class, scores.score, scores.per_class, best_inliers)
