"""The Kaggle submission and GLDv2 solution CSVs, as text (no file I/O here).

Submission (one row per test image, one prediction at most)::

    id,landmarks
    000088da12d664db,8815 0.0312
    0001623c6d808702,

``landmarks`` is ``"<landmark_id> <score>"`` (original landmark id, not the class index), or
empty for no prediction. Scores are written with :func:`repr` of the float, the shortest text
that reads back to exactly the same float, so ties and orderings survive a round trip.

Solution (GLDv2's ``recognition_solution`` form)::

    id,landmarks,Usage
    000088da12d664db,8815,Public
    0001623c6d808702,,Private

``landmarks`` is a space-separated list of landmark ids, empty for an image without a landmark;
``Usage`` is ``Public``, ``Private`` or ``Ignored`` (the official scorer leaves ``Ignored`` rows
out of the metric).
"""

from __future__ import annotations

import csv
import io
import math
from typing import Iterable, Iterator, Mapping, Optional, Sequence, Tuple, Union

from tfrecords_schema import InputError

SUBMISSION_HEADER = ("id", "landmarks")
SOLUTION_HEADER = ("id", "landmarks", "Usage")
USAGES = ("Public", "Private", "Ignored")

Prediction = Optional[Tuple[int, float]]
Rows = Union[Mapping[str, Prediction], Iterable[Tuple[str, Prediction]]]

_FORBIDDEN_ID_CHARS = set(',"\r\n')


def format_prediction(prediction: Prediction) -> str:
    """``(label, score)`` -> ``"<label> <score>"``; ``None`` -> ``""``.

    Raises:
      ValueError: a non-integer label or a NaN/infinite score.
    """
    if prediction is None:
        return ""
    label, score = prediction
    if label is None:
        return ""
    if int(label) != label:
        raise ValueError(f"landmark label must be an integer, got {label!r}")
    score = float(score)
    if not math.isfinite(score):
        raise ValueError(f"score must be finite, got {score}")
    return f"{int(label)} {score!r}"


def format_submission(rows: Rows) -> str:
    """Submission CSV text (header ``id,landmarks``) in the order of ``rows``.

    Args:
      rows: a mapping or an iterable of ``(image_id, (label, score) | None)``.

    Raises:
      ValueError: an id that is empty, repeated, or contains a comma, quote or newline; or a bad
        prediction (see :func:`format_prediction`).
    """
    items = rows.items() if isinstance(rows, Mapping) else rows
    lines = [",".join(SUBMISSION_HEADER)]
    seen = set()
    for image_id, prediction in items:
        image_id = str(image_id)
        if not image_id or _FORBIDDEN_ID_CHARS & set(image_id):
            raise ValueError(f"image id {image_id!r} is empty or contains , \" or a newline")
        if image_id in seen:
            raise ValueError(f"image id {image_id!r} appears twice")
        seen.add(image_id)
        lines.append(f"{image_id},{format_prediction(prediction)}")
    return "\n".join(lines) + "\n"


def _csv_rows(text: str, expected_header: Sequence[str], what: str,
              optional_last: bool = False) -> Iterator[tuple[int, list[str]]]:
    """Yields ``(line_number, fields)`` for each data row (line 1 is the header).

    Checks the header. With ``optional_last`` the last header column may be missing (rows then
    have one field less). Blank lines are skipped.
    """
    text = text.lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise InputError(
            f"{what}: empty file, expected header {','.join(expected_header)}") from None
    header = [name.strip() for name in header]
    allowed = [list(expected_header)]
    if optional_last:
        allowed.append(list(expected_header[:-1]))
    if header not in allowed:
        raise InputError(
            f"{what}: line 1: header is {','.join(header)!r}, "
            f"expected {','.join(expected_header)!r}")
    for fields in reader:
        line_number = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != len(header):
            raise InputError(f"{what}: line {line_number}: expected {len(header)} fields, "
                             f"got {len(fields)}: {','.join(fields)!r}")
        image_id = fields[0].strip()
        if not image_id:
            raise InputError(f"{what}: line {line_number}: empty id")
        yield line_number, [image_id] + [field.strip() for field in fields[1:]]


def parse_prediction(field: str, line_number: Optional[int] = None) -> Prediction:
    """``"<label> <score>"`` -> ``(label, score)``; ``""`` -> ``None``.

    Raises:
      InputError: not exactly two tokens, a non-integer label, a negative label, or a score that
        is not a finite number. The message names ``line_number`` when given.
    """
    where = f"line {line_number}: " if line_number is not None else ""
    tokens = field.split()
    if not tokens:
        return None
    if len(tokens) != 2:
        raise InputError(f"{where}expected '<landmark_id> <score>', got {field!r}")
    try:
        label = int(tokens[0])
    except ValueError:
        raise InputError(f"{where}landmark id {tokens[0]!r} is not an integer") from None
    if label < 0:
        raise InputError(f"{where}landmark id {label} is negative")
    try:
        score = float(tokens[1])
    except ValueError:
        raise InputError(f"{where}score {tokens[1]!r} is not a number") from None
    if not math.isfinite(score):
        raise InputError(f"{where}score {tokens[1]!r} is not finite")
    return label, score


def parse_submission(text: str) -> dict[str, Prediction]:
    """Submission CSV text -> ``{image_id: (label, score) | None}`` in file order.

    Raises:
      InputError: a wrong header, a malformed row, or a repeated id, naming the line.
    """
    predictions: dict[str, Prediction] = {}
    for line_number, (image_id, field) in _csv_rows(text, SUBMISSION_HEADER, "submission"):
        if image_id in predictions:
            raise InputError(f"submission: line {line_number}: image id {image_id!r} repeated")
        try:
            predictions[image_id] = parse_prediction(field, line_number)
        except ValueError as error:
            raise InputError(f"submission: {error}") from None
    return predictions


def _solution_rows(text: str) -> Iterator[tuple[int, str, list[int], str]]:
    """Yields ``(line_number, image_id, labels, usage)``; usage is ``""`` without the column."""
    seen = set()
    for line_number, fields in _csv_rows(text, SOLUTION_HEADER, "solution", optional_last=True):
        image_id, landmarks = fields[0], fields[1]
        usage = fields[2] if len(fields) > 2 else ""
        if len(fields) > 2 and usage not in USAGES:
            raise InputError(f"solution: line {line_number}: Usage {usage!r} is not one of "
                             f"{', '.join(USAGES)}")
        if image_id in seen:
            raise InputError(f"solution: line {line_number}: image id {image_id!r} repeated")
        seen.add(image_id)
        try:
            labels = [int(token) for token in landmarks.split()]
        except ValueError:
            raise InputError(f"solution: line {line_number}: landmarks {landmarks!r} are not "
                             "space-separated integers") from None
        yield line_number, image_id, labels, usage


def parse_solution(text: str) -> dict[str, list[int]]:
    """Solution CSV text -> ``{image_id: [landmark_id, ...]}`` (empty list = no landmark).

    Every row is returned, ``Ignored`` ones included (see :func:`parse_solution_usage`). The
    ``Usage`` column may be missing (header ``id,landmarks``).

    Raises:
      InputError: a wrong header, a malformed row, an unknown Usage or a repeated id.
    """
    return {image_id: labels for _, image_id, labels, _ in _solution_rows(text)}


def parse_solution_usage(text: str) -> dict[str, str]:
    """Solution CSV text -> ``{image_id: usage}``; usage is ``""`` without a Usage column."""
    return {image_id: usage for _, image_id, _, usage in _solution_rows(text)}


def _submission_problems_and_predictions(text: str) -> tuple[list[str], dict[str, Prediction]]:
    problems: list[str] = []
    predictions: dict[str, Prediction] = {}
    try:
        rows = list(_csv_rows_lenient(text))
    except ValueError as error:
        return [str(error)], {}
    for line_number, image_id, field, error in rows:
        if error:
            problems.append(error)
            continue
        if image_id in predictions:
            problems.append(f"line {line_number}: duplicate id {image_id!r}")
            continue
        try:
            predictions[image_id] = parse_prediction(field, line_number)
        except ValueError as parse_error:
            problems.append(str(parse_error))
            predictions[image_id] = None
    return problems, predictions


def _csv_rows_lenient(text: str) -> Iterator[tuple[int, str, str, str]]:
    """Like :func:`_csv_rows` for the submission, but reports bad rows instead of raising.

    Yields ``(line_number, image_id, landmarks_field, error_or_empty)``; raises only on a bad
    header.
    """
    text = text.lstrip("\ufeff")
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or [name.strip() for name in header] != list(SUBMISSION_HEADER):
        shown = ",".join(header) if header else "nothing"
        raise InputError(f"line 1: header is {shown!r}, expected {','.join(SUBMISSION_HEADER)!r}")
    for fields in reader:
        line_number = reader.line_num
        if not fields or (len(fields) == 1 and not fields[0].strip()):
            continue
        if len(fields) != 2:
            yield line_number, "", "", f"line {line_number}: expected 2 fields, got {len(fields)}"
        elif not fields[0].strip():
            yield line_number, "", "", f"line {line_number}: empty id"
        else:
            yield line_number, fields[0].strip(), fields[1].strip(), ""


def validate_submission(text: str, expected_ids: Iterable[str], max_listed: int = 10) -> list[str]:
    """Every problem of a submission against the test ids, as readable lines (empty = valid).

    Checks: the header, each row's shape and prediction (integer label, finite score),
    duplicate ids, ids missing from the submission and ids not among ``expected_ids``. Missing
    and unknown ids are summarised (count plus the first ``max_listed``).
    """
    problems, predictions = _submission_problems_and_predictions(text)
    expected = list(expected_ids)
    expected_set = set(expected)
    missing = [image_id for image_id in expected if image_id not in predictions]
    unknown = [image_id for image_id in predictions if image_id not in expected_set]

    def listed(ids: list[str]) -> str:
        more = f", ... ({len(ids) - max_listed} more)" if len(ids) > max_listed else ""
        return ", ".join(ids[:max_listed]) + more

    if missing:
        problems.append(f"{len(missing)} test ids have no row: {listed(missing)}")
    if unknown:
        problems.append(f"{len(unknown)} ids are not test ids: {listed(unknown)}")
    return problems


def check_submission(text: str, expected_ids: Iterable[str]) -> dict[str, Prediction]:
    """Parses a submission that must be valid for ``expected_ids``.

    Returns:
      ``{image_id: (label, score) | None}``.

    Raises:
      InputError: listing every problem found by :func:`validate_submission`.
    """
    problems = validate_submission(text, expected_ids)
    if problems:
        raise InputError("invalid submission: " + "; ".join(problems))
    return parse_submission(text)
