"""Crop voting: many views' class probabilities -> one class and its confidence.

docs/METHOD.md, "Stage 1 at test time": each view votes for its top-1 class with that class's
probability; per class the votes are summed and divided by the number of views; the answer is
the class with the largest sum, and that average is its confidence. So a class most views
agree on beats a single very confident view: 3 views at 0.5 (sum 1.5) win over 1 view at 0.99.

Ties, resolved deterministically: a view whose top probability is shared by several classes
votes for the lowest class index; classes with equal vote sums resolve to the lowest class
index too (``numpy.argmax`` returns the first maximum).
"""

from __future__ import annotations

import numpy as np


def vote_batch(view_probabilities: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Votes for a batch of images.

    Args:
      view_probabilities: float ``[B, V, C]``: B images, V views each, C class probabilities.

    Returns:
      ``(class_index int64 [B], confidence float32 [B])``; confidence in [0, 1] when the inputs
      are probabilities (the winning class's summed votes divided by V).
    """
    probabilities = np.asarray(view_probabilities, np.float64)
    if probabilities.ndim != 3 or 0 in probabilities.shape:
        raise ValueError(f"expected non-empty [B, V, C] probabilities, got {probabilities.shape}")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("view probabilities contain NaN or infinity")
    batch, num_views, num_classes = probabilities.shape
    top_class = np.argmax(probabilities, axis=2)  # [B, V], lowest index on ties
    top_probability = np.take_along_axis(probabilities, top_class[..., None], axis=2)[..., 0]
    # Sum the votes per (image, class) with one bincount over flat indices b * C + class:
    # memory B x C, never B x V x C one-hots (C is ~15k in the recipe).
    flat = (np.arange(batch)[:, None] * num_classes + top_class).ravel()
    sums = np.bincount(flat, weights=top_probability.ravel(), minlength=batch * num_classes)
    sums = sums.reshape(batch, num_classes)
    winner = np.argmax(sums, axis=1)  # lowest index on ties
    confidence = sums[np.arange(batch), winner] / num_views
    return winner.astype(np.int64), confidence.astype(np.float32)


def vote(view_probabilities: np.ndarray) -> tuple[int, float]:
    """Votes for one image.

    Args:
      view_probabilities: float ``[V, C]``: V views' class probabilities.

    Returns:
      ``(class_index, confidence)`` as a Python ``int`` and ``float``.
    """
    probabilities = np.asarray(view_probabilities)
    if probabilities.ndim != 2:
        raise ValueError(f"expected [V, C] probabilities, got {probabilities.shape}")
    classes, confidences = vote_batch(probabilities[None])
    return int(classes[0]), float(confidences[0])


def vote_shares(view_probabilities: np.ndarray) -> dict[int, float]:
    """Every class's share of one image's votes: its summed votes divided by the views.

    The same votes as :func:`vote` (each view votes for its top-1 class with that probability);
    classes no view voted for are absent. The class of :func:`vote` is the one with the largest
    share (lowest index on ties), and its share is :func:`vote`'s confidence (shares are
    rounded to float32 as that confidence is).

    Args:
      view_probabilities: float ``[V, C]``: V views' class probabilities.

    Returns:
      ``{class_index: share}`` with Python ``int`` keys and ``float`` values.
    """
    probabilities = np.asarray(view_probabilities, np.float64)
    if probabilities.ndim != 2 or 0 in probabilities.shape:
        raise ValueError(f"expected non-empty [V, C] probabilities, got {probabilities.shape}")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("view probabilities contain NaN or infinity")
    top_class = np.argmax(probabilities, axis=1)  # lowest index on ties, as vote_batch
    top_probability = probabilities[np.arange(len(probabilities)), top_class]
    shares: dict[int, float] = {}
    for class_index, probability in zip(top_class.tolist(), top_probability.tolist()):
        shares[class_index] = shares.get(class_index, 0.0) + probability
    return {class_index: float(np.float32(shares[class_index] / len(probabilities)))
            for class_index in sorted(shares)}


TOP_CLASSES_OF_CLASSIFIER = 5
"""How many of the classifier's classes the ``knn+classifier`` rule weighs by their probability
(GLR-2020 3rd place: the classifier's top 5; every other class gets ``missing_confidence``)."""


def top_mean_probabilities(view_probabilities: np.ndarray,
                           n: int = TOP_CLASSES_OF_CLASSIFIER) -> dict[int, float]:
    """The classifier's n most probable classes of one image, with their probabilities.

    The probability of a class is its mean over the V views (the views are one image; a single
    view gives its own probabilities). The n classes with the largest means are kept (equal
    means: the lower class index first); this is the classifier factor of the GLR-2020
    3rd-place rule (``rescoring.retrieval.AggregationParams.glr2020_third``), which multiplies
    a neighbour's vote by this probability of its class to the power 10, and by
    ``missing_confidence`` (1e-8) for a class outside these n.

    Args:
      view_probabilities: float ``[V, C]``: V views' class probabilities.
      n: classes kept, >= 1 (at most C).

    Returns:
      ``{class_index: mean probability}`` with Python ``int`` keys and ``float`` values, in
      decreasing order of probability.
    """
    probabilities = np.asarray(view_probabilities, np.float64)
    if probabilities.ndim != 2 or 0 in probabilities.shape:
        raise ValueError(f"expected non-empty [V, C] probabilities, got {probabilities.shape}")
    if not np.all(np.isfinite(probabilities)):
        raise ValueError("view probabilities contain NaN or infinity")
    if int(n) != n or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    mean = probabilities.mean(axis=0)
    order = np.argsort(-mean, kind="stable")[: int(n)]  # equal means: lower index first
    return {int(c): float(mean[c]) for c in order}
