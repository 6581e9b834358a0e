"""Pure parsing of GLD-style manifests (``id,url,landmark_id``; test manifests ``id,url``).

One CSV line at a time (:func:`parse_line`), so the pipeline can read a huge manifest
sequentially with line numbers and parse in parallel. Each line becomes a :class:`ManifestRow` or
a :class:`Rejection` with a reason: nothing is dropped silently. A quoted field spanning several
lines is not supported (GLD manifests never have one); such a row is rejected, not repaired.

Ids become part of the records and of ``rejected.csv`` only, never of a file name; still, ids
unsafe as file names (``../../evil``, spaces, slashes) are rejected here (``unsafe_id``) so no
later step or tool can be tricked with them.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import re
from typing import Optional

from tfrecords_schema import InputError
from tfrecords_schema.image_record import NON_LANDMARK

ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Accepted ids: 1-128 characters, letters, digits, ``.``, ``_``, ``-``, not starting with a dot."""

TRAIN_COLUMNS = ("id", "url", "landmark_id")
TEST_COLUMNS = ("id", "url")

REASONS = frozenset(
    {"malformed_row", "missing_column", "empty_id", "empty_url", "bad_label", "unsafe_id"}
)
"""Rejection reasons of :func:`parse_line`."""

ORIGIN_MANIFEST = "manifest"
ORIGIN_DISTRACTOR = "distractor"
ORIGIN_TFRECORD = "tfrecord"


@dataclasses.dataclass(frozen=True)
class ManifestRow:
    """One valid input image.

    Attributes:
      image_id: the id (matches :data:`ID_PATTERN`).
      url: where the image is (http(s)://, gs://, file:// or a local path).
      landmark_id: original landmark id, or -1 for a non-landmark / unlabelled image.
      line: 1-based line number in the manifest (the header is line 1); for a distractor file,
        its 1-based position in the sorted folder listing.
      origin: :data:`ORIGIN_MANIFEST`, :data:`ORIGIN_DISTRACTOR` or :data:`ORIGIN_TFRECORD`
        (``--input_tfrecords``: ``url`` is the TFRecord file, ``line`` 0, the image in ``data``).
      data: the image file's bytes when the input carried them (TFRecord input); then nothing
        is fetched. None: fetch ``url``.
      unlabelled: the input said nothing about the label (a DELF test record without
        ``image/class/label``): the row goes to the unlabelled split (``test``). A row with
        ``landmark_id`` -1 and ``unlabelled`` False is a non-landmark image (a distractor).
    """

    image_id: str
    url: str
    landmark_id: int
    line: int
    origin: str = ORIGIN_MANIFEST
    data: Optional[bytes] = dataclasses.field(default=None, repr=False)
    unlabelled: bool = False

    @property
    def order_key(self) -> tuple:
        """Input order: manifest lines first, then distractor files, then TFRecord records (by
        file name, then by the SHA-1 of the image bytes: Beam's reader gives no record index);
        "first" = smallest key."""
        rank = {ORIGIN_MANIFEST: 0, ORIGIN_DISTRACTOR: 1}.get(self.origin, 2)
        content = hashlib.sha1(self.data).hexdigest() if self.data is not None else ""
        return (rank, self.line, self.url, content)


@dataclasses.dataclass(frozen=True)
class Rejection:
    """One input row that produced no record, with the reason (one ``rejected.csv`` row)."""

    image_id: str
    url: str
    reason: str
    detail: str
    line: int
    origin: str = ORIGIN_MANIFEST


@dataclasses.dataclass(frozen=True)
class ManifestHeader:
    """Column positions of a validated header."""

    columns: tuple[str, ...]

    @property
    def labelled(self) -> bool:
        return "landmark_id" in self.columns

    def index(self, name: str) -> int:
        return self.columns.index(name)


def parse_header(line: str, source: str = "manifest") -> ManifestHeader:
    """Validates the header line: ``id,url,landmark_id`` (train) or ``id,url`` (test).

    Column order is free and extra columns are ignored. Raises ``InputError`` naming ``source``
    and the expected columns.
    """
    try:
        fields = next(csv.reader([line.lstrip("\ufeff")]))
    except (csv.Error, StopIteration) as error:
        raise InputError(f"{source}: unreadable header line {line!r}") from error
    columns = tuple(field.strip().lower() for field in fields)
    expected = f"'{','.join(TRAIN_COLUMNS)}' (train) or '{','.join(TEST_COLUMNS)}' (test)"
    if "id" not in columns or "url" not in columns:
        raise InputError(f"{source}: header {line.strip()!r} lacks id/url columns; want {expected}")
    if len(set(columns)) != len(columns):
        raise InputError(f"{source}: header {line.strip()!r} repeats a column")
    return ManifestHeader(columns)


def is_safe_id(image_id: str) -> bool:
    """True if ``image_id`` matches :data:`ID_PATTERN` (safe as a file name on any system)."""
    return ID_PATTERN.fullmatch(image_id) is not None


def sanitise_id(name: str, prefix: str = "") -> str:
    """A safe id from a file stem: unsafe characters become ``_``, length capped at 128."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    candidate = (prefix + cleaned)[:128]
    if not candidate or not candidate[0].isalnum():
        candidate = ("x" + candidate)[:128]
    return candidate


def parse_line(text: str, line: int, header: ManifestHeader) -> ManifestRow | Rejection:
    """Parses one manifest data line.

    Args:
      text: the line without its newline.
      line: its 1-based line number (for ``rejected.csv`` and "first kept" of duplicates).
      header: the manifest's validated header.

    Returns:
      A :class:`ManifestRow`, or a :class:`Rejection` whose reason is in :data:`REASONS`.
    """
    def reject(reason: str, detail: str, image_id: str = "", url: str = "") -> Rejection:
        return Rejection(image_id=image_id, url=url, reason=reason, detail=detail, line=line)

    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error as error:
        return reject("malformed_row", f"csv: {error}")
    fields = [field.strip() for field in rows[0]] if rows else []
    id_index, url_index = header.index("id"), header.index("url")
    image_id = fields[id_index] if id_index < len(fields) else ""
    url = fields[url_index] if url_index < len(fields) else ""
    if len(fields) < len(header.columns):
        return reject("missing_column",
                      f"{len(fields)} fields, header has {len(header.columns)}", image_id, url)
    if len(fields) > len(header.columns):
        return reject("malformed_row",
                      f"{len(fields)} fields, header has {len(header.columns)}", image_id, url)
    if not image_id:
        return reject("empty_id", "empty id", image_id, url)
    if not is_safe_id(image_id):
        return reject("unsafe_id", "id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}", image_id, url)
    if not url:
        return reject("empty_url", "empty url", image_id, url)
    landmark_id = NON_LANDMARK
    if header.labelled:
        raw_label = fields[header.index("landmark_id")]
        try:
            landmark_id = int(raw_label)
        except ValueError:
            return reject("bad_label", f"landmark_id {raw_label!r} is not an integer",
                          image_id, url)
        if landmark_id < 0:
            return reject("bad_label", f"landmark_id {landmark_id} is negative", image_id, url)
    return ManifestRow(image_id=image_id, url=url, landmark_id=landmark_id, line=line)


def keep_first(rows: list[ManifestRow]) -> tuple[ManifestRow, list[Rejection]]:
    """Of rows sharing one id, keeps the first in input order and rejects the others.

    Returns:
      (the kept row, ``duplicate_id`` rejections of the rest in input order).
    """
    ordered = sorted(rows, key=lambda row: row.order_key)
    kept = ordered[0]
    if kept.origin == ORIGIN_MANIFEST:
        where = f"line {kept.line}"
    elif kept.origin == ORIGIN_TFRECORD:
        where = f"a record in {kept.url}"
    else:
        where = f"distractor {kept.url}"
    rejections = [
        Rejection(image_id=row.image_id, url=row.url, reason="duplicate_id",
                  detail=f"id already used at {where}", line=row.line, origin=row.origin)
        for row in ordered[1:]
    ]
    return kept, rejections
