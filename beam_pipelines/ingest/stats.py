"""Counting outcomes of an ingest run (pure): what ``stats.json`` reports.

The pipeline turns every input row into :class:`Outcome` events: one ``row_in`` event as the row
is read, and later exactly one ``written`` or ``rejected`` event. :class:`Counts` adds them up
(associatively, so Beam can combine partial counts from many workers), and :func:`summarise`
turns the total into the JSON-ready dict, including the check ``rows_in == written + rejected``.
"""

from __future__ import annotations

import dataclasses
import statistics

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
    """

    kind: str
    key: str = ""
    label: int = -1
    bytes_in: int = 0
    bytes_out: int = 0


@dataclasses.dataclass
class Counts:
    """Running totals; :meth:`add` one event, :meth:`merge` two partial totals."""

    rows_in: int = 0
    written: dict[str, int] = dataclasses.field(default_factory=dict)
    rejected: dict[str, int] = dataclasses.field(default_factory=dict)
    class_counts: dict[int, int] = dataclasses.field(default_factory=dict)
    bytes_in: int = 0
    bytes_out: int = 0

    def add(self, outcome: Outcome) -> "Counts":
        if outcome.kind == ROW_IN:
            self.rows_in += 1
        elif outcome.kind == WRITTEN:
            self.written[outcome.key] = self.written.get(outcome.key, 0) + 1
            self.class_counts[outcome.label] = self.class_counts.get(outcome.label, 0) + 1
            self.bytes_out += outcome.bytes_out
        elif outcome.kind == REJECTED:
            self.rejected[outcome.key] = self.rejected.get(outcome.key, 0) + 1
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
    }
