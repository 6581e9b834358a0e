"""Round-off of a forward pass, measured rather than assumed (shared by the predict tests).

Why the tests need this: the predict job forwards several images' views in one batch
(``--batch_images``), a direct computation forwards one image's views at a time. The two are
the same mathematics, but a CPU kernel may be chosen by batch shape (oneDNN picks blockings
and vector widths by shape and instruction set), so the float32 results may differ in their
last bits, and by how much depends on the machine. Two rules keep the comparisons honest:

1. The test models are well conditioned: :func:`head_gain` bounds how much a relative change
   of the GeM embedding can move a logit. An untrained backbone with its BatchNorm left at
   initialisation maps every image to nearly the same embedding (equal to 7 digits), and a
   head scaled to separate such embeddings multiplies float32 round-off by ~1e7: a last-bit
   difference then moved confidences by 1% on another CPU. The fixtures calibrate BatchNorm
   on their images first (``trainer.train.calibrate_batchnorm``).
2. The tolerance is measured on the machine that runs the test: :func:`batching_spread`
   forwards the same views in every batch composition the job can form and reports how far
   the voted confidences move.
"""

from __future__ import annotations

import numpy as np


def head_gain(embeddings: np.ndarray) -> float:
    """How much the relative differences between ``embeddings`` ``[N, D]`` are below their norm.

    ``max ||e_i|| / max ||e_i - e_j||``: a head that separates these embeddings to logits of
    order 1 multiplies a relative perturbation of an embedding by about this factor.
    """
    embeddings = np.asarray(embeddings, np.float64)
    norms = np.linalg.norm(embeddings, axis=1)
    differences = np.linalg.norm(embeddings[:, None, :] - embeddings[None, :, :], axis=-1)
    return float(norms.max() / differences.max())


def batching_spread(model, views_by_image: dict[str, np.ndarray], max_images: int) -> float:
    """Largest change of an image's voted confidence over batch compositions of its views.

    Args:
      model: the classifier (scaled views ``[N, S, S, 3]`` -> probabilities ``[N, C]``).
      views_by_image: image id -> its scaled views ``[V, S, S, 3]`` float32.
      max_images: the most images the job puts in one forward pass (``--batch_images``).

    Returns:
      max over images of (max - min) of the vote confidence, over batches of 1 .. max_images
      images taken in sorted and in reversed order (0.0 where every batching gives the same
      bits).
    """
    from rescoring import voting

    ids = sorted(views_by_image)
    seen: dict[str, list[float]] = {image_id: [] for image_id in ids}
    for size in range(1, max_images + 1):
        for order in (ids, ids[::-1]):
            for start in range(0, len(order), size):
                group = order[start:start + size]
                batch = np.concatenate([views_by_image[image_id] for image_id in group])
                probabilities = np.asarray(model.predict_on_batch(batch))
                offset = 0
                for image_id in group:
                    count = len(views_by_image[image_id])
                    _, confidence = voting.vote(probabilities[offset:offset + count])
                    seen[image_id].append(float(confidence))
                    offset += count
    return max(max(values) - min(values) for values in seen.values())


def assert_close_to_measured(actual: float, expected: float, spread: float) -> None:
    """``|actual - expected| <= spread`` plus 2 float32 ulps of ``expected`` (the vote's float32
    result read back through float64)."""
    allowed = spread + 2 * float(np.spacing(np.float32(expected)))
    assert abs(actual - expected) <= allowed, (actual, expected, allowed)
