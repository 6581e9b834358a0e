"""Text of the job's result files from the final rows (pure functions, no I/O).

``scores.csv`` (one row per test id, sorted by id)::

    id,nn_label,nn_confidence,local_max,local_mean,local_best_half,final_score,label

``nn_label`` and ``label`` are ORIGINAL landmark ids (label map applied), empty for an
unreadable image. ``local_*`` are the raw aggregated inlier counts (before normalisation);
``final_score = (1 - w) * local_max / max(local_max over the test set) + w * nn_confidence``
(0 when the maximum is 0), so the file alone is enough to recompute every final score.
Floats are written with ``repr``, which reads back to the identical float.

With a retrieval recognizer (``--recognizer knn`` or ``knn+classifier``) the file has the
columns of :data:`KNN_COLUMNS` after those (the classifier recognizer's file is unchanged)::

    recognizer,confidence,knn_label,knn_score,non_landmark_penalty,neighbour_ids,
    neighbour_similarities,neighbour_labels,neighbour_inliers,neighbour_confidences

The ``neighbour_*`` columns are space-separated lists, one entry per retrieved reference, most
similar first; labels are landmark ids (-1: a non-landmark reference). Then, with the rule of
:func:`beam_pipelines.predict.knn.aggregation_params` (k = the list length): the landmark
neighbours' similarities minus ``non_landmark_penalty`` (the mean similarity of the
non-landmark neighbours) vote by ``rescoring.retrieval.class_scores_from_neighbours`` (class
confidences ``dict(zip(neighbour_labels, neighbour_confidences))`` for ``knn+classifier``) ->
``knn_label``, ``knn_score``; the same with ``neighbour_inliers`` by
``rescoring.retrieval.rerank_with_inliers`` -> ``label``, and its voting neighbours' inliers ->
``local_max``, ``local_mean``, ``local_best_half``; ``final_score = (1 - w) * local_max /
max(local_max) + w * confidence``, where ``confidence`` replaces ``nn_confidence`` (see
:func:`beam_pipelines.predict.knn.blend_confidence`). ``nn_label`` and ``nn_confidence`` are the
classifier's crop vote with ``knn+classifier``, empty with ``knn``.

With the classifier and ``--rerank_top K > 1`` the file has :data:`CANDIDATE_COLUMNS` after the
first eight, ``candidate_rank,confidence``: ``nn_label``/``nn_confidence`` stay the crop vote's,
``label`` and the ``local_*`` columns are the answer's (the candidate ``candidate_rank`` of
``rescoring.candidates.top_candidates``), and ``final_score = (1 - w) * local_max /
max(local_max) + w * confidence``, where the maximum runs over every candidate of every image
(so it may exceed the largest ``local_max`` of the file).
"""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence

from beam_pipelines.predict.elements import (
    STATUS_NO_FEATURES,
    STATUS_NO_NEIGHBOURS,
    STATUS_NO_REFERENCES,
    STATUS_SCORED,
    STATUS_UNREADABLE,
    FinalRow,
)

SCORES_HEADER = (
    "id", "nn_label", "nn_confidence", "local_max", "local_mean", "local_best_half",
    "final_score", "label",
)
CANDIDATE_COLUMNS = ("candidate_rank", "confidence")
"""With ``--rerank_top K > 1`` (classifier): which candidate is the answer (0: the crop vote's
class) and the confidence its ``final_score`` blends in place of ``nn_confidence``."""
KNN_COLUMNS = (
    "recognizer", "confidence", "knn_label", "knn_score", "non_landmark_penalty",
    "neighbour_ids", "neighbour_similarities", "neighbour_labels", "neighbour_inliers",
    "neighbour_confidences",
)

# When one id appears in several test records, the row kept is the readable one with the
# highest final score (then the smallest label): deterministic whatever the arrival order.
_STATUS_RANK = {STATUS_SCORED: 0, STATUS_NO_REFERENCES: 0, STATUS_NO_FEATURES: 0,
                STATUS_NO_NEIGHBOURS: 0, STATUS_UNREADABLE: 1}


def _preference(row: FinalRow):
    return (_STATUS_RANK[row.status], -row.final_score,
            row.label if row.label is not None else -1)


def one_row_per_id(rows: Iterable[FinalRow]) -> tuple[list[FinalRow], int]:
    """Rows sorted by id with one row per id; returns ``(rows, number of dropped duplicates)``."""
    best: dict[str, FinalRow] = {}
    duplicates = 0
    for row in rows:
        current = best.get(row.image_id)
        if current is None:
            best[row.image_id] = row
            continue
        duplicates += 1
        if _preference(row) < _preference(current):
            best[row.image_id] = row
    return [best[image_id] for image_id in sorted(best)], duplicates


def submission_rows(rows: Sequence[FinalRow]) -> list[tuple[str, object]]:
    """``[(image_id, (landmark_id, final_score) | None)]`` for ``rescoring.submission``."""
    return [
        (row.image_id, None if row.label is None else (row.label, row.final_score))
        for row in rows
    ]


def _text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _list_text(values) -> str:
    return " ".join(_text(value) for value in values)


def _knn_values(row: FinalRow, recognizer: str) -> tuple:
    knn = row.knn
    if knn is None:  # an unreadable image: no retrieval
        return (recognizer,) + ("",) * (len(KNN_COLUMNS) - 1)
    return (knn.recognizer, knn.confidence, knn.knn_label, knn.knn_score,
            knn.non_landmark_penalty, " ".join(knn.neighbour_ids),
            _list_text(knn.neighbour_similarities), _list_text(knn.neighbour_labels),
            _list_text(knn.neighbour_inliers), _list_text(knn.neighbour_confidences))


def scores_csv(rows: Sequence[FinalRow], recognizer: str = "classifier",
               rerank_top: int = 1) -> str:
    """``scores.csv`` text for rows already reduced by :func:`one_row_per_id`; a kNN
    ``recognizer`` adds :data:`KNN_COLUMNS`, the classifier with ``rerank_top`` K > 1
    :data:`CANDIDATE_COLUMNS` (K = 1, the recipe: the file as it always was)."""
    knn_columns = recognizer != "classifier"
    candidate_columns = not knn_columns and rerank_top > 1
    lines = [",".join(SCORES_HEADER + (KNN_COLUMNS if knn_columns else ())
                      + (CANDIDATE_COLUMNS if candidate_columns else ()))]
    for row in rows:
        values = (row.image_id, row.nn_label, row.nn_confidence, row.local_max, row.local_mean,
                  row.local_best_half, row.final_score, row.label)
        if knn_columns:
            values += _knn_values(row, recognizer)
        if candidate_columns:
            values += ((None, None) if row.candidate is None
                       else (row.candidate.rank, row.candidate_confidence))
        lines.append(",".join(_text(value) for value in values))
    return "\n".join(lines) + "\n"


def pipeline_stats(rows: Sequence[FinalRow], duplicates: int, unparseable: int) -> dict:
    """Counts that reconcile: ``test_images == predicted + unreadable`` and ``predicted ==
    with_references + without_references + without_features + without_landmark_neighbours``
    (the last only with a kNN recognizer: readable images whose neighbours are all
    non-landmarks, which get no label)."""
    by_status = {status: 0 for status in _STATUS_RANK}
    for row in rows:
        by_status[row.status] += 1
    readable = [row.num_features for row in rows if row.status != STATUS_UNREADABLE]
    features = {"images": len(readable)}
    if readable:
        features.update(min=min(readable), max=max(readable),
                        mean=float(statistics.fmean(readable)),
                        median=float(statistics.median(readable)),
                        zero=sum(1 for count in readable if count == 0))
    references = [row.num_references for row in rows if row.status != STATUS_UNREADABLE]
    return {
        "test_images": len(rows),
        "predicted": len(rows) - by_status[STATUS_UNREADABLE],
        "unreadable": by_status[STATUS_UNREADABLE],
        "with_references": by_status[STATUS_SCORED],
        "without_references": by_status[STATUS_NO_REFERENCES],
        "without_features": by_status[STATUS_NO_FEATURES],
        "without_landmark_neighbours": by_status[STATUS_NO_NEIGHBOURS],
        "duplicate_test_records": duplicates,
        "unparseable_test_records": unparseable,
        "features_per_image": features,
        "references_per_image_max": max(references) if references else 0,
    }
