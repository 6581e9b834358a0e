"""From inlier counts to the final confidence (docs/METHOD.md, "Stage 2").

1. :func:`aggregate`: one test image's inlier counts against its (up to 32) references ->
   ``(max, mean, mean of the best half)``, the columns of :data:`COLUMNS`.
2. :func:`column_maxima` / :func:`normalise`: each column divided by its maximum over the
   whole test set. The Beam job computes the maxima with a global combine of
   :func:`maxima_of`, which merges partial maxima as well as rows.
3. :func:`blend`: ``final = (1 - w) * local_max_normalised + w * nn_confidence``, w = 0.15;
   :func:`final_score` is steps 2 and 3 for one image.
"""

from __future__ import annotations

import dataclasses

import numpy as np

COLUMNS = ("local_max", "local_mean", "local_best_half")


@dataclasses.dataclass(frozen=True)
class BlendParams:
    """Attributes:
    nn_weight: w, the classifier confidence's weight; the normalised local score gets 1 - w.
    """

    nn_weight: float = 0.15

    def __post_init__(self):
        if not 0.0 <= self.nn_weight <= 1.0:
            raise ValueError(f"nn_weight must lie in [0, 1], got {self.nn_weight}")


def best_half_size(num_scores: int) -> int:
    """How many scores "the best half" of ``num_scores`` holds: ``ceil(n / 2)`` (1 of 1, 2 of 3)."""
    return (num_scores + 1) // 2


def aggregate(inlier_counts) -> np.ndarray:
    """One test image's reference scores -> ``[max, mean, mean of the best half]``.

    Args:
      inlier_counts: sequence or array ``[R]`` of non-negative scores, one per reference
        compared (R may be 0).

    Returns:
      float64 ``[3]`` in the order of :data:`COLUMNS`; zeros when there are no scores. The
      best half is the ``ceil(R / 2)`` largest scores.
    """
    counts = np.asarray(inlier_counts, np.float64).reshape(-1)
    if counts.size == 0:
        return np.zeros([len(COLUMNS)], np.float64)
    if not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError(f"scores must be finite and >= 0, got {counts}")
    descending = np.sort(counts)[::-1]
    best_half = descending[: best_half_size(counts.size)]
    return np.array([descending[0], counts.mean(), best_half.mean()], np.float64)


def aggregate_many(inlier_counts_per_image) -> np.ndarray:
    """:func:`aggregate` for each image: a sequence of ``[R_i]`` -> float64 ``[N, 3]``."""
    rows = [aggregate(counts) for counts in inlier_counts_per_image]
    if not rows:
        return np.zeros([0, len(COLUMNS)], np.float64)
    return np.stack(rows)


def column_maxima(scores: np.ndarray) -> np.ndarray:
    """Maximum of each column over the test set: ``[N, K]`` -> ``[K]`` (zeros when N = 0)."""
    scores = np.asarray(scores, np.float64)
    if scores.ndim != 2:
        raise ValueError(f"expected [N, K] scores, got {scores.shape}")
    if scores.shape[0] == 0:
        return np.zeros([scores.shape[1]], np.float64)
    return scores.max(axis=0)


def maxima_of(rows, width: int = len(COLUMNS)) -> tuple[float, ...]:
    """Column maxima of score rows, as a tuple (zeros when there are none).

    Combine-friendly: the rows may be partial maxima (earlier results of this function), so
    ``maxima_of([maxima_of(a), maxima_of(b)]) == maxima_of(a + b)``; Beam's
    ``CombineGlobally(maxima_of)`` applies it to any split of the test set.

    Args:
      rows: iterable of ``[K]`` score rows, ``K = width``.
      width: K, the number of columns (that of :data:`COLUMNS` by default).
    """
    table = np.asarray(list(rows), np.float64).reshape(-1, width)
    return tuple(float(value) for value in column_maxima(table))


def normalise(scores, maxima=None) -> np.ndarray:
    """Each column divided by its test-set maximum; a zero maximum gives zeros, never NaN.

    Args:
      scores: ``[N, K]`` (or ``[N]`` for one column, or a scalar) non-negative scores.
      maxima: ``[K]`` (or a scalar) maxima to divide by, e.g. from a global combine; when None,
        :func:`column_maxima` of ``scores`` itself (``scores`` must then be ``[N, K]``).

    Returns:
      float64 of the shape of ``scores``, in [0, 1] when ``maxima`` are the true maxima.
    """
    scores = np.asarray(scores, np.float64)
    maxima = column_maxima(scores) if maxima is None else np.asarray(maxima, np.float64)
    if np.any(maxima < 0) or not np.all(np.isfinite(maxima)):
        raise ValueError(f"maxima must be finite and >= 0, got {maxima}")
    safe = np.where(maxima > 0, maxima, 1.0)
    return np.where(maxima > 0, scores / safe, 0.0)


def blend(local_max_normalised, nn_confidence, params: BlendParams | float | None = None):
    """``(1 - w) * local_max_normalised + w * nn_confidence``.

    Args:
      local_max_normalised: scalar or array, the normalised max inlier count.
      nn_confidence: scalar or array (broadcastable), the crop-voting confidence.
      params: :class:`BlendParams`, or w itself as a float; w = 0.15 when None.

    Returns:
      float64 scalar or array of the broadcast shape.
    """
    if params is None:
        params = BlendParams()
    elif not isinstance(params, BlendParams):
        params = BlendParams(nn_weight=float(params))
    weight = params.nn_weight
    local = np.asarray(local_max_normalised, np.float64)
    nn = np.asarray(nn_confidence, np.float64)
    result = (1.0 - weight) * local + weight * nn
    return float(result) if result.ndim == 0 else result


def final_score(local_max, local_max_top, nn_confidence,
                params: BlendParams | float | None = None) -> float:
    """One image's final confidence: its max inlier count normalised by the test set's largest,
    ``local_max_top`` (:func:`normalise`: 0 when that is 0), blended with its classifier
    confidence (:func:`blend`)."""
    return float(blend(normalise(local_max, local_max_top), nn_confidence, params))
