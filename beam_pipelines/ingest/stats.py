"""Counting outcomes of an ingest run (pure): what ``stats.json`` reports.

The pipeline turns every input row into :class:`Outcome` events: one ``row_in`` event as the row
is read, and later exactly one ``written`` or ``rejected`` event. :class:`Counts` adds them up
(associatively, so Beam can combine partial counts from many workers), and :func:`summarise`
turns the total into the JSON-ready dict, including the check ``rows_in == written + rejected``.

:func:`assess` then decides whether the run did its work (something written, rows balanced,
rejected share within ``--max_rejected_fraction``) and words the failure, naming the dominant
rejection reasons with an example detail each (:func:`dominant_reasons`,
:func:`describe_rejections`).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Optional

ROW_IN = "row_in"
WRITTEN = "written"
REJECTED = "rejected"


@dataclasses.dataclass(frozen=True)
class Outcome:
    """One event.

    Attributes:
      kind: :data:`ROW_IN`, :data:`WRITTEN` or :data:`REJECTED`.
      key: the split name (written) or the reason (rejected); empty for row_in.
      label: class index of a written image (-1 = non-landmark / unlabelled).
      bytes_in: bytes fetched for this image (0 if it was not fetched).
      bytes_out: bytes of the serialised record written (0 unless written).
      image_id, detail: of a rejected row (one example per reason is kept for the report).
    """

    kind: str
    key: str = ""
    label: int = -1
    bytes_in: int = 0
    bytes_out: int = 0
    image_id: str = ""
    detail: str = ""


@dataclasses.dataclass
class Counts:
    """Running totals; :meth:`add` one event, :meth:`merge` two partial totals."""

    rows_in: int = 0
    written: dict[str, int] = dataclasses.field(default_factory=dict)
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    class_counts: dict[int, int] = dataclasses.field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0
    examples: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    """reason -> (image id, detail) of one rejected row: the smallest pair, so the choice does not
    depend on the order in which workers combine their counts."""

    def _keep_example(self, reason: str, example: tuple[str, str]) -> None:
        current = self.examples.get(reason)
        if current is None or example < current:
            self.examples[reason] = example

    def add(self, outcome: Outcome) -> "Counts":
        if outcome.kind == ROW_IN:
            self.rows_in += 1
        elif outcome.kind == WRITTEN:
            self.written[outcome.key] = self.written.get(outcome.key, 0) + 1
            self.class_counts[outcome.label] = self.class_counts.get(outcome.label, 0) + 1
            self.bytes_out += outcome.bytes_out
        elif outcome.kind == REJECTED:
            self.rejected[outcome.key] = self.rejected.get(outcome.key, 0) + 1
            self._keep_example(outcome.key, (outcome.image_id, outcome.detail))
        else:
            raise ValueError(f"unknown outcome kind {outcome.kind!r}")
        self.bytes_in += outcome.bytes_in
        return self

    def merge(self, other: "Counts") -> "Counts":
        self.rows_in += other.rows_in
        for mine, theirs in ((self.written, other.written), (self.rejected, other.rejected),
                             (self.class_counts, other.class_counts)):
            for key, value in theirs.items():
                mine[key] = mine.get(key, 0) + value
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        for reason, example in other.examples.items():
            self._keep_example(reason, example)
        return self


def class_histogram(class_counts: dict[int, int]) -> dict:
    """Summary of images per class over landmark classes (label >= 0) that got any image."""
    sizes = sorted(count for label, count in class_counts.items() if label >= 0)
    if not sizes:
        return {"num_classes": 0, "min": 0, "median": 0, "max": 0, "non_landmark_images":
                class_counts.get(-1, 0)}
    return {
        "num_classes": len(sizes),
        "min": sizes[0],
        "median": statistics.median(sizes),
        "max": sizes[-1],
        "non_landmark_images": class_counts.get(-1, 0),
    }


def summarise(counts: Counts) -> dict:
    """The counting part of ``stats.json`` (the launcher adds timing)."""
    written = sum(counts.written.values())
    rejected = sum(counts.rejected.values())
    return {
        "rows_in": counts.rows_in,
        "written": written,
        "rejected": rejected,
        "written_per_split": dict(sorted(counts.written.items())),
        "rejected_per_reason": dict(sorted(counts.rejected.items())),
        "balanced": counts.rows_in == written + rejected,
        "class_histogram": class_histogram(counts.class_counts),
        "bytes_fetched": counts.bytes_in,
        "bytes_written": counts.bytes_out,
        "rejected_examples": {reason: {"id": image_id, "detail": detail}
                              for reason, (image_id, detail) in sorted(counts.examples.items())},
    }


# ------------------------------------------------------------------------------------------
# Did the run do its work?
# ------------------------------------------------------------------------------------------

STATUS_OK = "ok"
STATUS_FAILED = "failed"
FAILURE_NOTHING_WRITTEN = "nothing_written"
FAILURE_TOO_MANY_REJECTED = "too_many_rejected"
FAILURE_UNBALANCED = "unbalanced"
EXAMPLE_CHARS = 100
"""Longest example detail quoted in a failure message."""


def rejected_fraction(rows_in: int, rejected: int) -> float:
    """Share of the input rows that were rejected (0.0 for no rows)."""
    return rejected / rows_in if rows_in > 0 else 0.0


def _percent(fraction: float) -> str:
    text = f"{fraction * 100:.1f}".rstrip("0").rstrip(".")
    return f"{text}%"


def dominant_reasons(rejected_per_reason: dict[str, int], examples: dict[str, dict],
                     top: int = 3) -> list[tuple[str, int, str]]:
    """The ``top`` most frequent rejection reasons: ``(reason, count, example)``, most frequent
    first (ties by name). ``example`` is one row's detail (``"id: detail"``, shortened), or ''.

    Args:
      rejected_per_reason: reason -> rows, as in ``stats.json``.
      examples: reason -> ``{"id": ..., "detail": ...}`` (``stats.json``'s ``rejected_examples``).
    """
    ordered = sorted(rejected_per_reason.items(), key=lambda item: (-item[1], item[0]))
    result = []
    for reason, count in ordered[:top]:
        example = examples.get(reason) or {}
        detail = " ".join(str(example.get("detail", "")).split())
        if len(detail) > EXAMPLE_CHARS:
            detail = detail[: EXAMPLE_CHARS - 3] + "..."
        image_id = example.get("id", "")
        result.append((reason, count, f"{image_id}: {detail}" if image_id and detail else detail))
    return result


def describe_rejections(rejected_per_reason: dict[str, int], examples: dict[str, dict],
                        top: int = 3, noun: str = "rows") -> str:
    """The dominant reasons in words: ``"3 missing_file (e.g. a1: file not found: ...), 1 http_404
    (e.g. ...); 2 more reasons (4 rows)"``; ``"none"`` without rejections."""
    if not rejected_per_reason:
        return "none"
    parts = [f"{count} {reason} (e.g. {example})" if example else f"{count} {reason}"
             for reason, count, example in dominant_reasons(rejected_per_reason, examples, top)]
    text = ", ".join(parts)
    rest = sorted(rejected_per_reason.items(), key=lambda item: (-item[1], item[0]))[top:]
    if rest:
        text += (f"; {len(rest)} more reason{'s' if len(rest) > 1 else ''} "
                 f"({sum(count for _, count in rest)} {noun})")
    return text


def assess(summary: dict, max_rejected_fraction: float, noun: str = "rows",
           source: str = "the manifest") -> dict:
    """Whether a run did its work, from :func:`summarise`'s dict (pure).

    Failed when nothing was written (``nothing_written``), when the rejected share exceeds
    ``max_rejected_fraction`` (``too_many_rejected``), or when ``rows_in != written + rejected``
    (``unbalanced``, a bug; checked first).

    Returns:
      ``{"status": "ok" | "failed", "rejected_fraction": float, "max_rejected_fraction": float,
      "failure": None | {"kind": ..., "message": one line naming the dominant reasons}}``.
    """
    rows_in, written, rejected = summary["rows_in"], summary["written"], summary["rejected"]
    fraction = rejected_fraction(rows_in, rejected)
    reasons = describe_rejections(summary.get("rejected_per_reason", {}),
                                  summary.get("rejected_examples", {}), noun=noun)
    share = _percent(fraction)
    if fraction > max_rejected_fraction:
        share += f" > --max_rejected_fraction {max_rejected_fraction:g}"
    failure: Optional[dict] = None
    if not summary.get("balanced", rows_in == written + rejected):
        failure = {"kind": FAILURE_UNBALANCED, "message":
                   f"{noun} in ({rows_in}) != written ({written}) + rejected ({rejected})"}
    elif written == 0 and rows_in == 0:
        failure = {"kind": FAILURE_NOTHING_WRITTEN, "message": f"{source} holds no {noun}: "
                   "nothing written"}
    elif written == 0:
        failure = {"kind": FAILURE_NOTHING_WRITTEN, "message":
                   f"{rejected} of {rows_in} {noun} rejected ({share}), nothing written: "
                   f"{reasons}"}
    elif fraction > max_rejected_fraction:
        failure = {"kind": FAILURE_TOO_MANY_REJECTED, "message":
                   f"{rejected} of {rows_in} {noun} rejected ({share}): {reasons}"}
    return {
        "status": STATUS_FAILED if failure else STATUS_OK,
        "rejected_fraction": round(fraction, 6),
        "max_rejected_fraction": max_rejected_fraction,
        "failure": failure,
    }
