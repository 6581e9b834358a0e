"""mAP@100, the metric of the Google Landmark Retrieval challenges and of GLDv2's retrieval task.

As the GLDv2 reference scorer defines it (DELF, ``compute_retrieval_metrics.py`` and
``metrics.py``'s ``MeanAveragePrecision``), for each query q with relevant index images R_q and
predicted list (nearest first)::

    AP@k(q) = (1 / min(|R_q|, k)) * sum_{i=1..min(n_q, k)} P(i) * rel(i)

- only the first k = 100 predictions count;
- ``rel(i)`` is 1 when the i-th prediction is relevant and was not predicted earlier in the list
  (a repeated id earns nothing, but still takes its rank);
- ``P(i)`` is the number of relevant first occurrences among the first i predictions, over i;
- mAP@k is the mean over *every* scored query of the solution: a query without a prediction
  counts as 0. Ignored queries (``Usage`` ``Ignored``, ``images`` ``None``) are left out.

Pure functions on mappings, plus the two CSVs as text (no file I/O here)::

    retrieval solution        id,images,Usage     (images: space-separated index ids, or None)
    retrieval predictions     id,images           (images: up to 100 index ids, nearest first)
"""

from __future__ import annotations

import csv
import io
from typing import Collection, Mapping, Optional, Sequence

from tfrecords_schema import InputError

K = 100
"""Predictions per query that count (GLDv2's retrieval task)."""

SOLUTION_HEADER = ("id", "images", "Usage")
PREDICTIONS_HEADER = ("id", "images")
IGNORED = "Ignored"
NONE_IMAGES = "None"


def average_precision(predicted: Sequence[str], relevant: Collection[str], k: int = K) -> float:
    """AP@k of one query (see the module docstring).

    Raises:
      ValueError: ``relevant`` is empty (AP undefined; such a query must be ignored) or k < 1.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    relevant = set(relevant)
    if not relevant:
        raise ValueError("a query without relevant images has no AP (ignore it)")
    seen: set = set()
    hits = 0
    total = 0.0
    for rank, image_id in enumerate(predicted[:k], start=1):
        if image_id in seen:
            continue
        seen.add(image_id)
        if image_id in relevant:
            hits += 1
            total += hits / rank
    return total / min(len(relevant), k)


def mean_average_precision(predictions: Mapping[str, Sequence[str]],
                           solution: Mapping[str, Collection[str]], k: int = K) -> float:
    """mAP@k over every query of ``solution`` (a query absent from ``predictions`` scores 0).

    Args:
      predictions: query id -> predicted index ids, nearest first.
      solution: query id -> relevant index ids (only scored queries: leave ignored ones out).

    Raises:
      ValueError: an empty solution, a query of ``solution`` without relevant images, or a
        predicted query that is not in ``solution``.
    """
    if not solution:
        raise ValueError("the solution has no scored query: mAP is undefined")
    unknown = [query for query in predictions if query not in solution]
    if unknown:
        raise ValueError(f"{len(unknown)} predicted queries are not in the solution, e.g. "
                         f"{sorted(unknown)[0]!r}")
    total = sum(average_precision(predictions.get(query, ()), relevant, k)
                for query, relevant in solution.items())
    return total / len(solution)


def _rows(text: str, header: Sequence[str], what: str):
    reader = csv.reader(io.StringIO(text.lstrip("\ufeff")))
    first = next(reader, None)
    if first is None or [field.strip() for field in first] != list(header):
        raise InputError(f"{what}: header must be {','.join(header)}, got "
                         f"{','.join(first) if first else 'an empty file'}")
    for line, fields in enumerate(reader, start=2):
        if not fields or not any(field.strip() for field in fields):
            continue
        if len(fields) != len(header):
            raise InputError(f"{what}: line {line} has {len(fields)} fields, want {len(header)}")
        yield line, [field.strip() for field in fields]


def parse_solution(text: str) -> tuple[dict[str, list[str]], dict[str, str]]:
    """``retrieval_solution_v2.1.csv`` text -> ``(relevant ids of each scored query, usage of
    every query)``. A query whose ``Usage`` is ``Ignored`` or whose ``images`` is ``None`` is
    ignored: it is only in the usage dict (as ``Ignored``).

    Raises:
      InputError: a bad header, a repeated id, an unknown Usage, or a scored query with no
        image.
    """
    relevant: dict[str, list[str]] = {}
    usage: dict[str, str] = {}
    for line, (query, images, query_usage) in _rows(text, SOLUTION_HEADER, "retrieval solution"):
        if query in usage:
            raise InputError(f"retrieval solution: line {line}: query {query!r} repeated")
        if query_usage not in ("Public", "Private", IGNORED):
            raise InputError(f"retrieval solution: line {line}: Usage {query_usage!r} is not "
                             "Public, Private or Ignored")
        if query_usage == IGNORED or images == NONE_IMAGES:
            usage[query] = IGNORED
            continue
        ids = images.split()
        if not ids:
            raise InputError(f"retrieval solution: line {line}: scored query {query!r} lists "
                             "no image (write None to ignore it)")
        relevant[query] = ids
        usage[query] = query_usage
    return relevant, usage


def parse_predictions(text: str) -> dict[str, list[str]]:
    """``retrieval.csv`` text (``id,images``) -> query id -> predicted ids in file order.

    Raises:
      InputError: a bad header or a repeated query id.
    """
    predictions: dict[str, list[str]] = {}
    for line, (query, images) in _rows(text, PREDICTIONS_HEADER, "retrieval predictions"):
        if query in predictions:
            raise InputError(f"retrieval predictions: line {line}: query {query!r} repeated")
        predictions[query] = images.split()
    return predictions


def format_predictions(rows) -> str:
    """``[(query id, [index ids nearest first])]`` -> ``retrieval.csv`` text, rows sorted by id."""
    lines = [",".join(PREDICTIONS_HEADER)]
    for query, images in sorted(rows):
        lines.append(f"{query},{' '.join(images)}")
    return "\n".join(lines) + "\n"


def evaluate(predictions_text: str, solution_text: str, k: int = K) -> dict:
    """The retrieval part of ``landmarks-evaluate``'s report.

    Returns:
      ``{"map_at_100": float, "by_usage": {"Public": {"map_at_100", "queries"}, "Private":
      ...}, "counts": {"queries", "ignored_queries", "queries_without_prediction",
      "predictions_beyond_k"}}`` (the key is ``map_at_<k>``); a Usage without scored queries is
      left out of ``by_usage``.

    Raises:
      InputError: malformed files, or predicted queries that the solution does not hold.
    """
    relevant, usage = parse_solution(solution_text)
    predictions = parse_predictions(predictions_text)
    unknown = sorted(query for query in predictions if query not in usage)
    if unknown:
        raise InputError(f"retrieval predictions: {len(unknown)} queries are not in the "
                         f"retrieval solution, e.g. {unknown[0]!r}")
    scored = {query: ids for query, ids in predictions.items() if query in relevant}
    name = f"map_at_{k}"
    report: dict = {name: _map_or_none(scored, relevant, k), "by_usage": {}}
    for usage_name in ("Public", "Private"):
        subset = {query: ids for query, ids in relevant.items() if usage[query] == usage_name}
        if subset:
            report["by_usage"][usage_name] = {
                name: _map_or_none({q: p for q, p in scored.items() if q in subset}, subset, k),
                "queries": len(subset)}
    report["counts"] = {
        "queries": len(relevant),
        "ignored_queries": len(usage) - len(relevant),
        "queries_without_prediction": sum(1 for query in relevant if query not in predictions),
        "predictions_beyond_k": sum(max(0, len(ids) - k) for ids in scored.values()),
    }
    return report


def _map_or_none(predictions, solution, k: int) -> Optional[float]:
    return mean_average_precision(predictions, solution, k) if solution else None
