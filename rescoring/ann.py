"""Approximate top-k search for large reference indexes, behind a flag (FAISS, optional).

:class:`ApproximateIndex` answers like :func:`rescoring.retrieval.exact_top_k` (same
``(similarities, positions)`` contract) but scans only part of the index: an inverted file
(FAISS ``IndexIVFFlat``, inner product). At build time k-means cuts the reference embeddings
into ``num_lists`` cells (lists); a query is compared exactly with the embeddings of the
``num_probes`` cells whose centroids are most similar to it. Cost per query: ``num_lists`` +
``num_probes * N / num_lists`` dot products instead of N.

Parameters, chosen with ``bench/bench_knn_approximate.py`` (1M clustered 512-d unit vectors,
top-100, 1000 queries, one core; FAISS IVF-flat, FAISS IVF-SQ8 and ScaNN against exact search):

* ``num_lists``: ``4 * sqrt(N)`` rounded to a power of two (4096 for 1M), FAISS's usual
  starting point (its guideline is 4 to 16 sqrt(N));
* ``num_probes`` = 8 (:data:`DEFAULT_NUM_PROBES`): recall@100 0.987 at 32x the speed of
  :func:`~rescoring.retrieval.exact_top_k` there (4: 0.948 at 50x; 16: 0.999 at 19x);
* k-means on a sample of ``min(N, 40 * num_lists)`` embeddings (FAISS warns below 39 per
  cell), 10 iterations, seeded.

Why FAISS IVF-flat: it returns exact dot products for the neighbours it finds (the scoring rules
use the similarity values), its recall keeps rising with ``num_probes`` (0.9999 at 32), and it
imports next to TensorFlow. In the same run IVF-SQ8 (8-bit codes) was ~2x faster at the same
``num_probes`` but its recall stopped at 0.989 and its similarities are approximate. ScaNN 1.4.2
(tree of 2048 leaves + anisotropic hashing + exact re-ordering of 250) reached 0.96-0.967 at
61-64x and stopped at 0.970 (44-51x) in two runs: quicker than IVF-flat at that recall, slower
than IVF-SQ8 (0.978 at 61-62x), never as accurate as IVF-flat's default; and its package cannot be imported in a process
that has TensorFlow 2.21 (its TF op library is built for 2.20), as a Beam worker running the
model has.

FAISS is an optional dependency (``pip install 'landmarks[ann]'``, i.e. ``faiss-cpu``); exact
search needs numpy only. :func:`make_index` is the switch the Beam job's flag uses.
"""

from __future__ import annotations

import math

import numpy as np

from rescoring import retrieval

DEFAULT_NUM_PROBES = 8
"""Cells scanned per query (chosen on the benchmark, see the module docstring)."""

KMEANS_ITERATIONS = 10
TRAINING_POINTS_PER_LIST = 40

_INSTALL_HINT = (
    "approximate search needs FAISS, which is not installed: pip install 'landmarks[ann]' "
    "(or pip install faiss-cpu); exact search (the default) needs no extra package"
)


def import_faiss():
    """The ``faiss`` module, or ``ImportError`` with the install command."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from error
    return faiss


def default_num_lists(num_vectors: int) -> int:
    """``4 * sqrt(N)`` rounded to the nearest power of two, at least 1 and at most N."""
    if num_vectors < 1:
        raise ValueError(f"need at least one vector, got {num_vectors}")
    target = 4.0 * math.sqrt(num_vectors)
    power = 2 ** int(round(math.log2(target)))
    return max(1, min(power, num_vectors))


def _sorted_result(similarities: np.ndarray, positions: np.ndarray):
    """FAISS's answer in the exact contract: float32 / int64, similarity descending then
    position ascending; slots FAISS could not fill (position -1) last, with similarity -inf."""
    similarities = np.asarray(similarities, np.float32).copy()
    positions = np.asarray(positions, np.int64)
    missing = positions < 0
    similarities[missing] = -np.inf
    order = np.lexsort((np.where(missing, np.iinfo(np.int64).max, positions), -similarities), axis=1)
    return (np.take_along_axis(similarities, order, axis=1),
            np.take_along_axis(positions, order, axis=1))


class ApproximateIndex:
    """FAISS IVF-flat inner-product index over reference embeddings.

    Build with :meth:`build`; query with :meth:`search`. Pickles (FAISS's serialised bytes), so a
    Beam job can ship it as a side input or build it once per worker.

    Attributes:
      num_lists: k-means cells.
      num_probes: cells scanned per query (may be changed between searches).
      size: number of indexed embeddings N.
      dim: embedding length D.
    """

    def __init__(self, faiss_index, num_probes: int):
        self._index = faiss_index
        self.num_probes = int(num_probes)

    @classmethod
    def build(
        cls,
        vectors,
        num_lists: int | None = None,
        num_probes: int = DEFAULT_NUM_PROBES,
        training_points: int | None = None,
        seed: int = 0,
        threads: int | None = None,
    ) -> "ApproximateIndex":
        """Trains the cells on a sample of ``vectors`` and adds all of them.

        Args:
          vectors: float ``[N, D]`` reference embeddings (L2-normalised: the search ranks by dot
            product). Positions in search results are row numbers of this array.
          num_lists: cells; :func:`default_num_lists` of N when None.
          num_probes: cells scanned per query, in [1, num_lists].
          training_points: k-means sample size; ``min(N, 40 * num_lists)`` when None.
          seed: seeds the sample and k-means.
          threads: FAISS (OpenMP) threads for the build and later searches; FAISS's default
            (all cores) when None. Process-wide FAISS setting.

        Returns:
          The index.
        """
        faiss = import_faiss()
        vectors = np.ascontiguousarray(vectors, np.float32)
        if vectors.ndim != 2 or vectors.shape[0] < 1 or vectors.shape[1] < 1:
            raise ValueError(f"expected non-empty [N, D] vectors, got shape {vectors.shape}")
        if not np.isfinite(vectors.sum()):
            raise ValueError("vectors contain NaN or infinity")
        num_vectors, dim = vectors.shape
        num_lists = default_num_lists(num_vectors) if num_lists is None else int(num_lists)
        if not 1 <= num_lists <= num_vectors:
            raise ValueError(f"num_lists must lie in [1, N={num_vectors}], got {num_lists}")
        if not 1 <= num_probes <= num_lists:
            raise ValueError(f"num_probes must lie in [1, num_lists={num_lists}], got {num_probes}")
        if threads is not None:
            faiss.omp_set_num_threads(int(threads))
        if training_points is None:
            training_points = TRAINING_POINTS_PER_LIST * num_lists
        training_points = max(num_lists, min(num_vectors, int(training_points)))
        rng = np.random.default_rng(seed)
        sample = vectors if training_points == num_vectors else vectors[
            np.sort(rng.choice(num_vectors, training_points, replace=False))]
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, num_lists, faiss.METRIC_INNER_PRODUCT)
        index.cp.niter = KMEANS_ITERATIONS
        index.cp.seed = int(seed)
        index.cp.max_points_per_centroid = max(1, training_points // num_lists + 1)
        index.train(sample)
        index.add(vectors)
        return cls(index, num_probes)

    @property
    def num_lists(self) -> int:
        return int(self._index.nlist)

    @property
    def size(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k by dot product, in :func:`~rescoring.retrieval.exact_top_k`'s contract.

        Args:
          queries: float ``[Q, D]`` (cast to float32).
          k: neighbours wanted per query, >= 1; ``k' = min(k, N)`` columns are returned.

        Returns:
          ``(similarities float32 [Q, k'], positions int64 [Q, k'])``, each row descending by
          similarity, ties by position. When the probed cells hold fewer than k' embeddings, the
          missing slots come last with position -1 and similarity -inf.
        """
        queries = np.ascontiguousarray(queries, np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be [Q, {self.dim}], got shape {queries.shape}")
        if int(k) != k or k < 1:
            raise ValueError(f"k must be an integer >= 1, got {k!r}")
        if not np.isfinite(queries.sum()):
            raise ValueError("queries contain NaN or infinity")
        if not 1 <= self.num_probes <= self.num_lists:
            raise ValueError(f"num_probes must lie in [1, {self.num_lists}], got {self.num_probes}")
        kept = min(int(k), self.size)
        if queries.shape[0] == 0:
            return np.zeros([0, kept], np.float32), np.zeros([0, kept], np.int64)
        self._index.nprobe = self.num_probes
        similarities, positions = self._index.search(queries, kept)
        return _sorted_result(similarities, positions)

    def __getstate__(self):
        faiss = import_faiss()
        return {"index": faiss.serialize_index(self._index), "num_probes": self.num_probes}

    def __setstate__(self, state):
        faiss = import_faiss()
        self._index = faiss.deserialize_index(np.asarray(state["index"], np.uint8))
        self.num_probes = state["num_probes"]


class ExactIndex:
    """The exact counterpart with the same ``search`` interface (numpy only).

    Attributes:
      vectors: float32 ``[N, D]`` reference embeddings.
    """

    def __init__(self, vectors):
        self.vectors = np.ascontiguousarray(vectors, np.float32)
        if self.vectors.ndim != 2:
            raise ValueError(f"expected [N, D] vectors, got shape {self.vectors.shape}")

    @property
    def size(self) -> int:
        return int(self.vectors.shape[0])

    def search(self, queries, k: int) -> tuple[np.ndarray, np.ndarray]:
        """:func:`rescoring.retrieval.exact_top_k` of ``queries`` against the vectors."""
        return retrieval.exact_top_k(queries, self.vectors, k)


def make_index(vectors, approximate: bool = False, **approximate_params):
    """The Beam job's switch: :class:`ExactIndex` (default) or :class:`ApproximateIndex`.

    Args:
      vectors: float ``[N, D]`` reference embeddings.
      approximate: build the FAISS index (needs ``faiss-cpu``: a clear ``ImportError`` says how
        to install it otherwise).
      **approximate_params: passed to :meth:`ApproximateIndex.build` (``num_lists``,
        ``num_probes``, ``training_points``, ``seed``, ``threads``).

    Returns:
      An object with ``search(queries, k) -> (similarities, positions)`` and ``size``.
    """
    if approximate:
        return ApproximateIndex.build(vectors, **approximate_params)
    if approximate_params:
        raise ValueError(f"parameters {sorted(approximate_params)} need approximate=True")
    return ExactIndex(vectors)
