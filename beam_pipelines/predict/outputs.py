"""Text of the job's result files from the final rows (pure functions, no I/O).

``scores.csv`` (one row per test id, sorted by id)::

    id,nn_label,nn_confidence,local_max,local_mean,local_best_half,final_score,label

``nn_label`` and ``label`` are ORIGINAL landmark ids (label map applied), empty for an
unreadable image. ``local_*`` are the raw aggregated inlier counts (before normalisation);
``final_score = (1 - w) * local_max / max(local_max over the test set) + w * nn_confidence``
(0 when the maximum is 0), so the file alone is enough to recompute every final score.
Floats are written with ``repr``, which reads back to the identical float.
"""

from __future__ import annotations

import statistics
from typing import Iterable, Sequence

from beam_pipelines.predict.elements import (
    STATUS_NO_FEATURES,
    STATUS_NO_REFERENCES,
    STATUS_SCORED,
    STATUS_UNREADABLE,
    FinalRow,
)

SCORES_HEADER = (
    "id", "nn_label", "nn_confidence", "local_max", "local_mean", "local_best_half",
    "final_score", "label",
)

# When one id appears in several test records, the row kept is the readable one with the
# highest final score (then the smallest label): deterministic whatever the arrival order.
_STATUS_RANK = {STATUS_SCORED: 0, STATUS_NO_REFERENCES: 0, STATUS_NO_FEATURES: 0,
                STATUS_UNREADABLE: 1}


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


def scores_csv(rows: Sequence[FinalRow]) -> str:
    """``scores.csv`` text for rows already reduced by :func:`one_row_per_id`."""
    lines = [",".join(SCORES_HEADER)]
    for row in rows:
        values = (row.image_id, row.nn_label, row.nn_confidence, row.local_max, row.local_mean,
                  row.local_best_half, row.final_score, row.label)
        lines.append(",".join(_text(value) for value in values))
    return "\n".join(lines) + "\n"


def pipeline_stats(rows: Sequence[FinalRow], duplicates: int, unparseable: int) -> dict:
    """Counts that reconcile: ``test_images == predicted + unreadable`` and ``predicted ==
    with_references + without_references + without_features``."""
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
        "duplicate_test_records": duplicates,
        "unparseable_test_records": unparseable,
        "features_per_image": features,
        "references_per_image_max": max(references) if references else 0,
    }
