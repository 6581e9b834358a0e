"""Pure pieces of Google Landmarks v2 as it ships (``landmarks-ingest --archives``).

GLDv2 (cvdfoundation/google-landmark, version 2.1) ships its images as tar archives
(``train/images_000.tar`` ... ``images_499.tar``, ``index/...``, ``test/...``; each member is
``a/b/c/<id>.jpg``, sometimes written ``./a/b/c/<id>.jpg``), one MD5 file per archive
(``md5sum/<split>/md5.images_000.txt``: one line ``<md5>  images_000.tar``) and label CSVs.
This module reads the text parts; the Beam steps around it are in
:mod:`beam_pipelines.ingest.archives`. No I/O here.

Label CSVs (``--labels_csv``), recognised by their header (:func:`parse_labels_header`):

=================================  ==========================  ====================================
file                               header                      rows
=================================  ==========================  ====================================
``train.csv``                      ``id,url,landmark_id``      one image per line (``url`` unused)
``train_clean.csv``                ``landmark_id,images``      one *row per listed id*: ``images``
                                                               is a space-separated list of ids
``index_image_to_landmark.csv``    ``id,landmark_id``          one image per line
``test.csv``, ``index.csv``        ``id`` (or ``id,url``)      one unlabelled image per line
=================================  ==========================  ====================================

A row is what ``stats.json`` counts as a row in: each ends in one written record or one
``rejected.csv`` row (:func:`parse_labels_line` returns rows and rejections; ``train_clean.csv``
gives one per listed id).
"""

from __future__ import annotations

import csv
import dataclasses
import posixpath
import re

from beam_pipelines.ingest.manifest import ManifestHeader, ManifestRow, Rejection, is_safe_id
from tfrecords_schema import InputError
from tfrecords_schema.image_record import NON_LANDMARK

KIND_TRAIN = "train.csv"
KIND_CLEAN = "train_clean.csv"
KIND_ID_TO_LANDMARK = "index_image_to_landmark.csv"
KIND_IDS = "test.csv / index.csv"

_HEADERS = {
    ("id", "url", "landmark_id"): KIND_TRAIN,
    ("landmark_id", "images"): KIND_CLEAN,
    ("id", "landmark_id"): KIND_ID_TO_LANDMARK,
    ("id",): KIND_IDS,
    ("id", "url"): KIND_IDS,
}

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")
"""Member names with these endings (any case) are images; any other file is a non-image."""

# What an archive member is (counted in stats.json by kind, never a rejected row).
MEMBER_IMAGE = "images"
MEMBER_DIRECTORY = "directories"
MEMBER_NON_IMAGE = "non_image_files"
MEMBER_UNSAFE_NAME = "unsafe_names"
MEMBER_OTHER = "links_and_special_files"

# Rejection reasons of labelled rows whose image no archive gave (see unseen_reason).
REASON_NOT_IN_ARCHIVES = "not_in_archives"
REASON_ARCHIVE_DAMAGED = "archive_damaged"
REASON_CHECKSUM_MISMATCH = "checksum_mismatch"
REASONS = frozenset({REASON_NOT_IN_ARCHIVES, REASON_ARCHIVE_DAMAGED, REASON_CHECKSUM_MISMATCH})

_MD5_LINE = re.compile(r"^([0-9a-fA-F]{32}) [ *](.+)$")


@dataclasses.dataclass(frozen=True)
class LabelsFormat(ManifestHeader):
    """A recognised label CSV: its column order (``labelled``, ``index`` as a manifest's
    header) and its kind (a file name of the release)."""

    kind: str = ""


def parse_labels_header(line: str, source: str = "--labels_csv") -> LabelsFormat:
    """The label CSV's header line -> :class:`LabelsFormat`; ``InputError`` naming the known
    headers otherwise (columns must be exactly those of one of the release's files, in any
    order)."""
    try:
        fields = next(csv.reader([line.lstrip("\ufeff")]))
    except (csv.Error, StopIteration) as error:
        raise InputError(f"{source}: unreadable header line {line!r}") from error
    columns = tuple(field.strip().lower() for field in fields)
    for known, kind in _HEADERS.items():
        if sorted(columns) == sorted(known) and len(set(columns)) == len(columns):
            return LabelsFormat(columns=columns, kind=kind)
    wanted = "; ".join(f"'{','.join(known)}' ({kind})" for known, kind in _HEADERS.items())
    raise InputError(f"{source}: header {line.strip()!r} is none of GLDv2's label files: "
                     f"want {wanted}")


def _landmark_id(raw: str) -> tuple[int, str]:
    """(landmark id, problem): the id, or -1 and why it is not a non-negative integer."""
    try:
        value = int(raw)
    except ValueError:
        return NON_LANDMARK, f"landmark_id {raw!r} is not an integer"
    if value < 0:
        return NON_LANDMARK, f"landmark_id {value} is negative"
    return value, ""


def _row(image_id: str, landmark_id: int, line: int, unlabelled: bool) -> ManifestRow | Rejection:
    if not image_id:
        return Rejection(image_id="", url="", reason="empty_id", detail="empty id", line=line)
    if not is_safe_id(image_id):
        return Rejection(image_id=image_id[:128], url="", reason="unsafe_id",
                         detail="id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}", line=line)
    # url is filled in when the image is found in an archive (archive:member).
    return ManifestRow(image_id=image_id, url="", landmark_id=landmark_id, line=line,
                       unlabelled=unlabelled)


def parse_labels_line(text: str, line: int, labels: LabelsFormat) -> list[ManifestRow | Rejection]:
    """One data line of a label CSV -> its rows (:class:`ManifestRow`, ``url`` empty until the
    archive member is found; unlabelled rows have ``landmark_id`` -1 and ``unlabelled``) or
    rejections (the manifest's reasons: ``malformed_row``, ``missing_column``, ``empty_id``,
    ``unsafe_id``, ``bad_label``).

    A ``train_clean.csv`` line gives one row per listed id (a bad ``landmark_id`` rejects each of
    them; an empty list is one ``empty_id`` rejection); every other kind gives exactly one.
    """
    def reject(reason: str, detail: str, image_id: str = "") -> list[Rejection]:
        return [Rejection(image_id=image_id, url="", reason=reason, detail=detail, line=line)]

    try:
        parsed = list(csv.reader([text], strict=True))
    except csv.Error as error:
        return reject("malformed_row", f"csv: {error}")
    fields = [field.strip() for field in parsed[0]] if parsed else []
    first_id = ""
    if "id" in labels.columns and labels.index("id") < len(fields):
        first_id = fields[labels.index("id")]
    if len(fields) != len(labels.columns):
        reason = "missing_column" if len(fields) < len(labels.columns) else "malformed_row"
        return reject(reason, f"{len(fields)} fields, header has {len(labels.columns)}",
                      first_id[:128])
    landmark_id, problem = NON_LANDMARK, ""
    if labels.labelled:
        landmark_id, problem = _landmark_id(fields[labels.index("landmark_id")])
    if labels.kind == KIND_CLEAN:
        ids = fields[labels.index("images")].split()
        if not ids:
            return reject("empty_id", f"landmark {fields[labels.index('landmark_id')]} lists no "
                          "image id")
        if problem:
            return [Rejection(image_id=image_id[:128], url="", reason="bad_label", detail=problem,
                              line=line) for image_id in ids]
        return [_row(image_id, landmark_id, line, False) for image_id in ids]
    if problem:
        return reject("bad_label", problem, first_id[:128])
    return [_row(first_id, landmark_id, line, not labels.labelled)]


def member_kind_and_id(name: str) -> tuple[str, str]:
    """A regular file's member name -> ``(kind, image id)``.

    The id is the file name without its image suffix, whatever the folders before it
    (``a/b/c/0123abcd.jpg``, ``./a/b/c/0123abcd.jpg`` -> ``0123abcd``). Kinds:
    :data:`MEMBER_IMAGE` (id set), :data:`MEMBER_NON_IMAGE` (no image suffix),
    :data:`MEMBER_UNSAFE_NAME` (an image suffix but a stem that is not a safe id, e.g. macOS'
    ``._0123abcd.jpg``); the id is '' unless the kind is an image.
    """
    base = posixpath.basename(name.replace("\\", "/").rstrip("/"))
    stem, suffix = posixpath.splitext(base)
    if suffix.lower() not in IMAGE_SUFFIXES:
        return MEMBER_NON_IMAGE, ""
    if not is_safe_id(stem):
        return MEMBER_UNSAFE_NAME, ""
    return MEMBER_IMAGE, stem


def archive_name(path: str) -> str:
    """The archive's file name (``gs://b/train/images_000.tar`` -> ``images_000.tar``)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def md5_file_name(archive_path: str) -> str:
    """The MD5 file of an archive in ``--md5_dir``: ``images_000.tar`` -> ``md5.images_000.txt``
    (the release's ``md5sum/<split>/`` naming; any ``.tar``/``.tar.gz``/``.tgz`` ending)."""
    name = archive_name(archive_path)
    for ending in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(ending):
            name = name[: -len(ending)]
            break
    return f"md5.{name}.txt"


def parse_md5_file(text: str, archive_path: str) -> str:
    """An MD5 file's text -> the expected hex digest (lower case) of ``archive_path``.

    The file holds one line ``<32 hex digits>  <archive file name>`` (``md5sum``'s output; a
    ``*`` before the name, md5sum's binary mark, is accepted). Raises ``ValueError`` naming the
    problem: no such line, or a line naming another archive.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if len(lines) != 1:
        raise ValueError(f"expected one line '<md5>  {archive_name(archive_path)}', got "
                         f"{len(lines)} lines")
    match = _MD5_LINE.match(lines[0])
    if match is None:
        raise ValueError(f"not an md5sum line: {lines[0][:100]!r}")
    digest, named = match.group(1).lower(), match.group(2).strip().lstrip("*")
    if archive_name(named) != archive_name(archive_path):
        raise ValueError(f"the line names {named!r}, not {archive_name(archive_path)!r}")
    return digest


def unseen_reason(refused_in: list[str], cut_in: list[str],
                  incomplete_archives: list[str]) -> tuple[str, str]:
    """``(reason, detail)`` of a labelled row whose image no archive gave.

    Args:
      refused_in: archives whose checksum did not match and whose member list names this id
        (their images are never used).
      cut_in: archives whose damage cut this id's member short (its header was read).
      incomplete_archives: every archive not read to its end (damaged, or refused and damaged
        while its names were listed), each with what happened; a tar has no index, so an id
        in no archive read whole may have been in their unread part.

    Returns:
      :data:`REASON_CHECKSUM_MISMATCH`, :data:`REASON_ARCHIVE_DAMAGED` (cut short, or in no
      archive while some archive is incomplete) or :data:`REASON_NOT_IN_ARCHIVES`.
    """
    if refused_in:
        return REASON_CHECKSUM_MISMATCH, (
            f"in {', '.join(sorted(refused_in))}, whose MD5 does not match --md5_dir: not read")
    if cut_in:
        return REASON_ARCHIVE_DAMAGED, f"member cut short: {'; '.join(sorted(cut_in))}"
    if incomplete_archives:
        shown = "; ".join(sorted(incomplete_archives)[:3])
        more = len(incomplete_archives) - 3
        return REASON_ARCHIVE_DAMAGED, (
            f"in no archive read whole; {len(incomplete_archives)} archive(s) could not be read "
            f"to the end and may hold it: {shown}" + (f"; {more} more" if more > 0 else ""))
    return REASON_NOT_IN_ARCHIVES, "no archive of --archives holds this id"
