"""The values that flow between the prediction job's steps (plain, picklable tuples).

Flow of one test image: ``DecodedImage`` -> views -> ``Vote`` (crop voting) -> ``TestQuery``
(vote + the image's local features) -> ``ScoredImage`` (local-feature scores against its
predicted class's references) -> ``FinalRow`` (normalised and blended).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

# Outcome of one test image; also the Beam counter names.
STATUS_SCORED = "scored"  # compared with >= 1 reference of its predicted class
STATUS_NO_REFERENCES = "no_references"  # predicted class has no reference features
STATUS_NO_FEATURES = "no_features"  # the test image gave no local features
STATUS_UNREADABLE = "unreadable"  # record or image could not be read: empty prediction
STATUSES = (STATUS_SCORED, STATUS_NO_REFERENCES, STATUS_NO_FEATURES, STATUS_UNREADABLE)


class DecodedImage(NamedTuple):
    """A readable test or reference image: ``image`` uint8 ``[H, W, 3]`` RGB."""

    image_id: str
    label: int
    image: np.ndarray


class Unreadable(NamedTuple):
    """A test record whose id is known but whose image (or record) could not be read."""

    image_id: str
    reason: str


class Vote(NamedTuple):
    """Crop-voting result: contiguous class index and its mean vote (confidence in [0, 1])."""

    class_index: int
    confidence: float


class TestQuery(NamedTuple):
    """A test image ready for verification: its vote and its local features (``[N, 2]``,
    ``[N, D]``; ``N`` may be 0)."""

    image_id: str
    vote: Vote
    locations: np.ndarray
    descriptors: np.ndarray

    @property
    def num_features(self) -> int:
        return int(self.locations.shape[0])


class ScoredImage(NamedTuple):
    """Per-image scores before normalisation (local scores are raw inlier counts).

    ``class_index`` is None (and every score 0) for an unreadable image.
    """

    image_id: str
    status: str
    class_index: Optional[int]
    nn_confidence: float
    local_max: float
    local_mean: float
    local_best_half: float
    num_features: int
    num_references: int


class FinalRow(NamedTuple):
    """One line of ``scores.csv`` plus bookkeeping; labels are ORIGINAL landmark ids."""

    image_id: str
    status: str
    nn_label: Optional[int]
    nn_confidence: float
    local_max: float
    local_mean: float
    local_best_half: float
    final_score: float
    label: Optional[int]
    num_features: int
    num_references: int
