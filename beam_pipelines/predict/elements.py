"""The values that flow between the prediction job's steps (plain, picklable tuples).

Flow of one test image: ``DecodedImage`` -> views -> ``Vote`` (crop voting) -> ``TestQuery``
(vote + the image's local features) -> ``ScoredImage`` (local-feature scores against its
predicted class's references) -> ``FinalRow`` (normalised and blended).

With a retrieval recognizer (``--recognizer knn`` or ``knn+classifier``): ``DecodedImage`` ->
views -> one unit embedding -> ``Neighbours`` (its top-k references, merged over the
``IndexShard`` s of the reference index) -> ``KnnScores`` (class scores from the neighbours) ->
``ScoredImage`` whose ``knn`` field holds ``KnnDetails`` (after verification of each neighbour)
-> ``FinalRow``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

# Outcome of one test image; also the Beam counter names.
STATUS_SCORED = "scored"  # compared with >= 1 reference of its predicted class
STATUS_NO_REFERENCES = "no_references"  # predicted class has no reference features
STATUS_NO_FEATURES = "no_features"  # the test image gave no local features
STATUS_UNREADABLE = "unreadable"  # record or image could not be read: empty prediction
# kNN recognizers only: no landmark reference among the image's top-k neighbours (all of them
# non-landmark images, or an empty index): empty prediction.
STATUS_NO_NEIGHBOURS = "no_landmark_neighbours"
STATUSES = (STATUS_SCORED, STATUS_NO_REFERENCES, STATUS_NO_FEATURES, STATUS_UNREADABLE,
            STATUS_NO_NEIGHBOURS)

RECOGNIZER_CLASSIFIER = "classifier"
RECOGNIZER_KNN = "knn"
RECOGNIZER_KNN_CLASSIFIER = "knn+classifier"
RECOGNIZERS = (RECOGNIZER_CLASSIFIER, RECOGNIZER_KNN, RECOGNIZER_KNN_CLASSIFIER)


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
    """Crop-voting result: contiguous class index and its mean vote (confidence in [0, 1]).

    ``class_votes``: the classifier factor of the ``knn+classifier`` rule: its 5 most probable
    classes with their mean probability over the views
    (:func:`rescoring.voting.top_mean_probabilities`), as ``((class_index, probability), ...)``,
    most probable first; filled only when asked for (``CropVote(..., class_votes=True)``, the
    ``knn+classifier`` recognizer), empty otherwise.

    ``candidates``: with ``--rerank_top K > 1``, the K classes to verify and the confidence
    each is blended with, ``((class_index, confidence), ...)`` in candidate order, the first
    being ``(class_index, confidence)`` (:func:`rescoring.candidates.top_candidates`); empty
    otherwise (the recipe: only ``class_index`` is verified).
    """

    class_index: int
    confidence: float
    class_votes: tuple = ()
    candidates: tuple = ()


class TestQuery(NamedTuple):
    """A test image ready for verification: its vote and its local features (``[N, 2]``,
    ``[N, D]``; ``N`` may be 0).

    ``rank``: which of ``vote.candidates`` this copy verifies (0: the vote's class; always 0
    without candidates)."""

    image_id: str
    vote: Vote
    locations: np.ndarray
    descriptors: np.ndarray
    rank: int = 0

    @property
    def num_features(self) -> int:
        return int(self.locations.shape[0])


class Candidacy(NamedTuple):
    """Where a row stands among its image's candidates (``--rerank_top K > 1`` only).

    Attributes:
      rank: the candidate's position (0: the crop vote's class).
      num_candidates: the candidates verified for the image (K, or C when C < K).
      vote_class: the crop vote's class (class index in ``ScoredImage``, landmark id in
        ``FinalRow``).
      vote_confidence: the crop vote's confidence.
    """

    rank: int
    num_candidates: int
    vote_class: int
    vote_confidence: float


class ScoredImage(NamedTuple):
    """Per-image scores before normalisation (local scores are raw inlier counts).

    ``class_index`` is None (and every score 0) for an unreadable image. With ``--rerank_top
    K > 1`` there is one per candidate: ``class_index`` and ``nn_confidence`` are the
    candidate's, ``candidate`` says which.
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
    knn: Optional["KnnDetails"] = None
    candidate: Optional[Candidacy] = None


class FinalRow(NamedTuple):
    """One line of ``scores.csv`` plus bookkeeping; labels are ORIGINAL landmark ids.

    ``candidate`` (``--rerank_top K > 1``): ``nn_label``/``nn_confidence`` are the crop vote's,
    ``label`` the candidate's, blended with ``candidate_confidence``.
    """

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
    knn: Optional["KnnDetails"] = None
    candidate: Optional[Candidacy] = None
    candidate_confidence: Optional[float] = None


# ---- the retrieval recognizers ------------------------------------------------------------------


class ReferenceEmbedding(NamedTuple):
    """One reference image of the index: its id, label (class index, -1 for a non-landmark)
    and unit embedding float32 ``[D]``."""

    image_id: str
    label: int
    embedding: np.ndarray


class IndexShard(NamedTuple):
    """At most ``--index_shard_size`` rows of the reference index, sorted by id: ``ids`` str
    ``[n]``, ``labels`` int64 ``[n]`` (class indices, -1 for non-landmarks), ``vectors`` float32
    ``[n, D]`` (unit rows)."""

    ids: np.ndarray
    labels: np.ndarray
    vectors: np.ndarray


class QueryBatch(NamedTuple):
    """Up to a few hundred test embeddings: ``ids`` (a tuple of test ids) and float32
    ``[b, D]`` unit rows."""

    ids: tuple
    vectors: np.ndarray


class Neighbours(NamedTuple):
    """A test image's retrieved references, most similar first (ties: smaller id first).

    ``labels`` are class indices (-1: non-landmark image) in the job, ORIGINAL landmark ids
    (-1 stays) in ``FinalRow.knn``.
    """

    ids: tuple = ()
    similarities: tuple = ()
    labels: tuple = ()


class KnnScores(NamedTuple):
    """``ScoreNeighbours``' verdict on one test image, before verification.

    Attributes:
      neighbours: the retrieved references (landmarks and non-landmarks).
      penalty: ``rescoring.retrieval.non_landmark_penalty`` of the non-landmark neighbours.
      class_confidences: ``{class_index: mean probability}`` of the classifier's top 5 classes
        (``knn+classifier``), None for ``knn``.
      knn_class: best class of ``class_scores_from_neighbours`` (None: no landmark neighbour).
      knn_score: its score.
      per_class: every voted class -> its score (similarity votes only, no inliers).
      vote: the classifier's crop vote (``knn+classifier``), None for ``knn``.
    """

    neighbours: Neighbours
    penalty: float
    class_confidences: Optional[dict]
    knn_class: Optional[int]
    knn_score: float
    per_class: dict
    vote: Optional[Vote] = None


class KnnDetails(NamedTuple):
    """The retrieval columns of one ``scores.csv`` row (see :mod:`.outputs`).

    Attributes:
      recognizer: ``knn`` or ``knn+classifier``.
      knn_label: the kNN's label before verification (class index in ``ScoredImage``, landmark
        id in ``FinalRow``), None without a landmark neighbour.
      knn_score: its score (``class_scores_from_neighbours``).
      confidence: the value blended into ``final_score`` in place of the classifier's
        confidence: the kNN similarity score of the final label divided by k, clipped to [0, 1].
      neighbour_ids, neighbour_similarities, neighbour_labels: the retrieved references.
      neighbour_inliers: verified inlier count per neighbour (0 when not compared: a
        non-landmark, a reference without cached local features, a featureless test image).
      neighbour_confidences: the classifier factor of each neighbour's class: its mean
        probability when among the classifier's top 5, else ``missing_confidence`` (1e-8;
        always for a non-landmark, which does not vote anyway); empty for ``knn``.
      non_landmark_penalty: subtracted from the landmark neighbours' similarities.
      nn_label, nn_confidence: the classifier's crop vote (``knn+classifier``), else None.
    """

    recognizer: str
    knn_label: Optional[int]
    knn_score: float
    confidence: float
    neighbour_ids: tuple
    neighbour_similarities: tuple
    neighbour_labels: tuple
    neighbour_inliers: tuple
    neighbour_confidences: tuple
    non_landmark_penalty: float
    nn_label: Optional[int] = None
    nn_confidence: Optional[float] = None

    def with_landmark_ids(self, landmark_ids) -> "KnnDetails":
        """Class indices -> ORIGINAL landmark ids (-1 stays -1) in the labels of this row
        (``landmark_ids``: the label map's tuple, class index -> landmark id)."""
        def landmark(class_index):
            if class_index is None:
                return None
            return -1 if class_index < 0 else int(landmark_ids[class_index])

        return self._replace(
            knn_label=landmark(self.knn_label),
            neighbour_labels=tuple(landmark(label) for label in self.neighbour_labels),
            nn_label=landmark(self.nn_label),
        )
