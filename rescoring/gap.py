"""Global Average Precision (GAP), the metric of the Google Landmark Recognition challenges.

GAP is micro-averaged precision over one prediction per test image::

    GAP = (1 / M) * sum_{i=1..N} P(i) * rel(i)

- the N predictions are sorted by score, descending; ties are ordered by image id, then label
  (as the official Kaggle / DELF implementation does);
- ``rel(i)`` is 1 when the i-th prediction's label is one of that image's true landmarks;
- ``P(i)`` is the precision over the first ``i`` predictions;
- ``M`` is the number of test images that show a landmark (non-empty solution), whether or not
  they received a prediction.

A prediction on a non-landmark image (empty solution) is simply wrong; an image without a
prediction is skipped (it lowers GAP only through ``M``). With ``landmarks_only=True``,
predictions on non-landmark images are left out before ranking (the official
``ignore_non_gt_test_images`` option).

Pure functions on mappings: no file I/O here (see :mod:`rescoring.submission` for the CSVs).
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Optional, Sequence, Tuple

Prediction = Optional[Tuple[Hashable, float]]
"""``(label, score)`` for one image, or ``None`` for no prediction."""


def ranked_predictions(
    predictions: Mapping[str, Prediction],
    solution: Mapping[str, Sequence[Hashable]],
    landmarks_only: bool = False,
) -> list[tuple[str, Hashable, float, bool]]:
    """The predictions in GAP's order, each with whether it is correct.

    Args:
      predictions: image id -> ``(label, score)`` or ``None`` (no prediction, skipped).
      solution: image id -> true labels (empty for a non-landmark image).
      landmarks_only: drop predictions on images whose solution is empty.

    Returns:
      ``[(image_id, label, score, correct), ...]`` sorted by score descending, then image id,
      then label.

    Raises:
      ValueError: a prediction for an id absent from ``solution``, or a non-finite score.
    """
    ranked = []
    unknown = []
    for image_id, prediction in predictions.items():
        if prediction is None:
            continue
        if image_id not in solution:
            unknown.append(image_id)
            continue
        label, score = prediction
        if label is None:
            continue
        score = float(score)
        if not math.isfinite(score):
            raise ValueError(f"prediction for image {image_id!r} has a non-finite score {score}")
        truth = solution[image_id]
        if landmarks_only and not truth:
            continue
        ranked.append((image_id, label, score, label in set(truth)))
    if unknown:
        shown = ", ".join(repr(i) for i in sorted(unknown)[:5])
        raise ValueError(f"{len(unknown)} predicted image ids are not in the solution: {shown}")
    # str(label) keeps the order total even if labels of mixed types ever meet.
    ranked.sort(key=lambda row: (-row[2], row[0], str(row[1])))
    return ranked


def num_landmark_images(solution: Mapping[str, Sequence[Hashable]]) -> int:
    """M of the GAP formula: the number of images whose solution is not empty."""
    return sum(1 for truth in solution.values() if len(truth) > 0)


def precision_at_ranks(correct: Sequence[bool]) -> list[float]:
    """``P(i)`` for ``i = 1..len(correct)``: the fraction correct among the first ``i``."""
    precisions = []
    hits = 0
    for rank, is_correct in enumerate(correct, start=1):
        hits += bool(is_correct)
        precisions.append(hits / rank)
    return precisions


def global_average_precision(
    predictions: Mapping[str, Prediction],
    solution: Mapping[str, Sequence[Hashable]],
    landmarks_only: bool = False,
) -> float:
    """GAP of one prediction per image against the solution (see the module docstring).

    Args:
      predictions: image id -> ``(label, score)``, or ``None`` for no prediction. Ids missing
        here are images without a prediction.
      solution: image id -> sequence of true labels; empty for an image without a landmark.
      landmarks_only: leave out predictions on images without a landmark.

    Returns:
      GAP in [0, 1].

    Raises:
      ValueError: the solution has no landmark image (``M = 0``, GAP undefined), a predicted
        id is not in the solution, or a score is NaN/infinite.
    """
    num_expected = num_landmark_images(solution)
    if num_expected == 0:
        raise ValueError("the solution has no image with a landmark: GAP is undefined (M = 0)")
    ranked = ranked_predictions(predictions, solution, landmarks_only=landmarks_only)
    total = 0.0
    hits = 0
    for rank, (_, _, _, correct) in enumerate(ranked, start=1):
        if correct:
            hits += 1
            total += hits / rank
    return total / num_expected
