"""Several candidates per test image: which classes are verified, and which one is the answer.

docs/METHOD.md, "Stage 2 with several candidates (``--rerank_top K``)". The recipe verifies only
the crop vote's class, and rescoring changes its confidence, never the class. With K > 1:

1. :func:`top_candidates`: the crop vote's K best classes, in the classifier's order (the
   vote's class first, then by vote share, then by mean probability over the views, then by
   class index), each with its confidence: the vote's own confidence for the vote's class (the
   recipe's number), ``min(mean probability over views, the vote's confidence)`` for the others.
2. Each candidate is verified against its own class's references and gets the recipe's blend
   (``rescoring.scores.final_score``) with its own confidence; the test-set normaliser of the
   local scores is the maximum over every candidate of every image.
3. :func:`preference` / :func:`pick_best`: the answer is the candidate with the highest final
   score; equal scores go to the earlier candidate (the classifier's order).

Why the confidence is capped at the vote's: the classifier's term of the blend then never
prefers a runner-up to the class the classifier chose, so the answer changes only when a
runner-up's local evidence outweighs the difference; an image with no local evidence at all
(no features, no references, 0 inliers everywhere) keeps the vote's class. The vote's own
confidence (its share of the votes) is at most its mean probability, so the rule reads the
same for every candidate: ``min(mean probability, vote confidence)``, which for the vote's class
is the vote confidence itself. With K = 1 the only candidate is the vote's class with the
vote's confidence: the recipe, to the bit.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, TypeVar

import numpy as np

from rescoring import voting

T = TypeVar("T")


def top_candidates(view_probabilities, k: int) -> tuple[tuple[int, float], ...]:
    """The K classes of one image that are verified, and the confidence each is blended with.

    Args:
      view_probabilities: float ``[V, C]``: V views' class probabilities.
      k: candidates wanted, >= 1 (at most C are returned).

    Returns:
      ``((class_index, confidence), ...)`` in candidate order (rank 0 first): rank 0 is
      :func:`rescoring.voting.vote`'s class with its confidence (the same floats); the others
      follow by vote share, then mean probability over the views (both descending), then class
      index, each with ``min(mean probability, rank 0's confidence)``.
    """
    if int(k) != k or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    probabilities = np.asarray(view_probabilities)
    class_index, confidence = voting.vote(probabilities)
    if k == 1:
        return ((int(class_index), float(confidence)),)
    shares = voting.vote_shares(probabilities)
    mean_probability = np.asarray(probabilities, np.float64).mean(axis=0)
    # Every class with a share comes before every class without one (share 0): only those
    # and the best of the rest by mean probability can be among the K.
    others = [c for c in shares if c != class_index]
    rest = np.argsort(-mean_probability, kind="stable")  # ties: lower class index first
    others += [int(c) for c in rest[: int(k) + len(shares)] if int(c) not in shares]
    others.sort(key=lambda c: (-shares.get(c, 0.0), -float(mean_probability[c]), c))
    chosen = [(int(class_index), float(confidence))]
    for candidate in others[: int(k) - 1]:
        chosen.append((int(candidate), float(min(float(mean_probability[candidate]),
                                                 float(confidence)))))
    return tuple(chosen)


def preference(final_score: float, rank: int) -> tuple[float, int]:
    """Sort key of a candidate: the smallest key is the answer (highest final score, then the
    earliest candidate)."""
    return (-float(final_score), int(rank))


def pick_best(items: Iterable[T], key: Callable[[T], tuple]) -> Optional[T]:
    """The item with the smallest ``key`` (the first of equal ones), streaming: the items are
    iterated once and never held together. None when there are none."""
    best, best_key = None, None
    for item in items:
        item_key = key(item)
        if best_key is None or item_key < best_key:
            best, best_key = item, item_key
    return best
