"""``landmarks-ingest --archives GLOB --labels_csv CSV``: GLDv2's tar archives read as they ship.

Two passes over each archive, neither extracting it nor holding it in memory (``FileSystems``
handles: local or ``gs://``):

1. **Listing** (:class:`ListArchive`, one worker per archive): the member headers, read in
   order; the data of an uncompressed archive is skipped by seeking (on a local disk, only
   the headers are read; ``gs://`` reads go through a 16 MB buffer, so the data streams past).
   With ``--md5_dir`` the same stream reads every byte and computes the archive's MD5. It
   gives the ``(image id, member reference)`` of every image member a label row may ask for
   (a Bloom filter of the labelled ids, :mod:`.id_filter`, is its side input:
   ``train_clean.csv`` asks for 1.58M of the 4.1M train images).
2. **Decoding** (:class:`DecodeUnit`): once the label rows are joined to the references by id,
   the decisions are grouped by unit of work: a contiguous byte range of one archive
   (``--archive_parts`` per archive, default enough for every worker when archives are few)
   and at most :data:`MEMBERS_PER_UNIT` members. The worker of a unit reads each member with
   one seek and one read, as the folder input reads a file, then decodes and normalises it
   with the manifest input's own function (:func:`.normalise.normalise_image`).

So the image bytes are never shuffled: only ids and rows are. An earlier design decoded in
the listing worker and joined the normalised images to their rows by a shuffle; that shuffle
was what kept it below the folder input's images per second (``bench/bench_ingest_archives.py``).

Data flow (every label row ends in exactly one shard record or one ``rejected.csv`` row)::

    --labels_csv lines --parse (gldv2.parse_labels_line)--> rows ----------------+--> rejected
      -> group by id, keep first -> label map -> class index -> dev split ---+  (the manifest
         (transforms.label_rows: the manifest input's steps, ids only)       |   input's steps)
                         | LabelledRow by id --> Bloom filter of the ids     |
                         |                             | side input          |
    archive paths -> ListArchive (pass 1: headers; MD5 with --md5_dir)       |
        members: (id, (archive, index, name, offset, size, unit)) --+        |
        cut short: (id, (archive, detail))                         --+-> MatchIds (GroupByKey
        events (counts by kind, damage, MD5 refusal) -> outcomes ----+   by id): the first member
                                                    (side input)    |   of a labelled id gets its
                                                                    |   row; a labelled id with no
                                                                    |   usable member is rejected
                                                                    |   (not_in_archives,
                                                                    |   archive_damaged,
                                                                    |   checksum_mismatch) ---->+
        decisions ((archive, unit), (offset, size, index, row)) -> GroupByKey by unit
          -> DecodeUnit (pass 2: seek, read, normalise) -> record or the normaliser's reason ->+

Members that are not images, directory entries, links, names that are not safe ids, images
without a label row (or whose row was rejected) and second copies of an id are counted by kind
in ``stats.json`` (``archives.members``), not rejected: the CSV never asked for them. For every
archive read whole: ``images == used + without_label_row + duplicate_ids``.

Damage: a truncated or corrupt archive keeps the members listed before the damage; the member
cut short (its data runs past the end of the file) and, since a tar has no index, every
labelled id found in no archive while some archive was not read to its end are rejected
``archive_damaged`` (:func:`.gldv2.unseen_reason`); the job goes on. ``--md5_dir DIR``: the
folder holding the release's ``md5.images_NNN.txt`` files of *this* split (``md5sum/train`` for
the train archives); archive ``images_NNN.tar`` is checked against ``DIR/md5.images_NNN.txt``
in its listing pass, and when it does not match, none of its members is used: the labelled
rows it names are rejected ``checksum_mismatch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import tarfile
import time
from typing import Callable, NamedTuple, Optional

import apache_beam as beam
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipelines import io_utils
from beam_pipelines.ingest import gldv2
from beam_pipelines.ingest import id_filter as id_filter_lib
from beam_pipelines.ingest import manifest as manifest_lib
from beam_pipelines.ingest import transforms
from beam_pipelines.ingest.config import IngestConfig
from beam_pipelines.ingest.manifest import ManifestRow, Rejection
from beam_pipelines.ingest.normalise import (ImageRejected, NormalisedImage, NormaliseParams,
                                             normalise_image)
from beam_pipelines.ingest.transforms import LabelledRow
from tfrecords_schema.label_map import LabelMap

_LOGGER = logging.getLogger(__name__)
# Image members decoded where their archive is read (those a label row may ask for).
_DECODED = Metrics.counter("ingest", "archive_images_decoded")

ARCHIVES_FILENAME = "_archives.json"  # the archive summary, folded into stats.json
_CHUNK_BYTES = 8 << 20
_STREAM_BUFFER_BYTES = 64 << 10  # tarfile's stream reads (its default, 10 kB, costs CPU)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz
# At most this many members per unit of decoding work (pass 2 holds a unit's decisions, about
# 690 bytes each in memory, measured: ~1.4 MB, to sort them by offset), whatever the size of
# one archive.
MEMBERS_PER_UNIT = 2048

TAG_EVENTS = "events"
TAG_CUT = "cut"
TAG_KINDS = "kinds"
TAG_DISTRACTORS = "distractors"
TAG_LABELLED_IDS = "labelled_ids"
_JOIN_ROWS, _JOIN_MEMBERS, _JOIN_CUT = "rows", "members", "cut"  # MatchIds' tagged values
_REJECTED = "rejected"  # the tag of transforms' steps

EVENT_READ = "read_whole"
EVENT_DAMAGED = "damaged"
EVENT_REFUSED = "checksum_mismatch"

KIND_USED = "used"
KIND_WITHOUT_LABEL_ROW = "without_label_row"
KIND_DUPLICATE = "duplicate_ids"


@dataclasses.dataclass(frozen=True)
class ArchiveEvent:
    """What happened to one archive: ``kind`` is :data:`EVENT_READ`, :data:`EVENT_DAMAGED` or
    :data:`EVENT_REFUSED`; ``counts`` the members by kind (:mod:`.gldv2` ``MEMBER_*``) read
    before the end or the damage (for a refused archive: ``image_names_listed``)."""

    kind: str
    archive: str
    detail: str = ""
    counts: tuple = ()


class ArchiveDamaged(Exception):
    """The stream of an archive broke off: ``cut`` is ``(image id, member name)`` of the member
    whose data was cut short, or None."""

    def __init__(self, detail: str, cut: Optional[tuple[str, str]] = None):
        super().__init__(detail)
        self.detail = detail
        self.cut = cut


class _EndRecordingTarInfo(tarfile.TarInfo):
    """Remembers on the ``TarFile`` the header error that ended the iteration: ``tarfile`` ends a
    stream silently at a truncated or invalid header, and only the zero block of a proper end
    (``EOFHeaderError``) means the archive was read whole."""

    @classmethod
    def fromtarfile(cls, tar):
        try:
            return super().fromtarfile(tar)
        except tarfile.HeaderError as error:
            tar.landmarks_end_error = error
            raise


def _error_text(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"[:300]


def _read_none(_index: int, _image_id: str) -> bool:
    return False


class Member(NamedTuple):
    """One member of a tar archive, as :func:`iter_members` gives it.

    ``index``: position in the archive (a tar may hold one name twice); ``kind``: a
    :mod:`.gldv2` ``MEMBER_*`` kind; ``image_id``: set for image members; ``size``: bytes of
    data; ``offset``: byte offset of the data in the archive file (-1 in a compressed archive,
    where a position in the file says nothing); ``data``: the bytes, when asked for."""

    index: int
    name: str
    kind: str
    image_id: str
    size: int
    offset: int
    data: Optional[bytes]


def _describe(tar: tarfile.TarFile, info: tarfile.TarInfo, index: int, plain: bool,
              read_data: Callable[[int, str], bool], max_bytes: int) -> Member:
    """``info`` as a :class:`Member`, its data read when ``read_data`` asks (raises
    :class:`ArchiveDamaged` with ``cut`` set when that data is cut short)."""
    if info.isdir():
        return Member(index, info.name, gldv2.MEMBER_DIRECTORY, "", 0, -1, None)
    if not info.isfile():
        return Member(index, info.name, gldv2.MEMBER_OTHER, "", 0, -1, None)
    kind, image_id = gldv2.member_kind_and_id(info.name)
    data = None
    if kind == gldv2.MEMBER_IMAGE and info.size <= max_bytes and read_data(index, image_id):
        try:
            data = tar.extractfile(info).read()
        except (tarfile.TarError, EOFError, OSError) as error:
            raise ArchiveDamaged(f"member {index} {info.name!r} cut short ({_error_text(error)})",
                                 cut=(image_id, info.name)) from error
    return Member(index, info.name, kind, image_id, info.size,
                  info.offset_data if plain else -1, data)


def _bytes_available(tar: tarfile.TarFile, fileobj, seekable: bool) -> int:
    """How many (uncompressed) bytes of the archive exist, once its reading has stopped."""
    if seekable:
        return fileobj.seek(0, io.SEEK_END)
    return tar.fileobj.pos  # tarfile's stream: every byte it could read, skipped ones too


def iter_members(fileobj, read_data: Callable[[int, str], bool] = _read_none,
                 max_bytes: int = 0, seekable: bool = False):
    """The :class:`Member` s of a tar archive, in order.

    ``seekable``: ``fileobj`` is an uncompressed tar that can seek, so the data of members is
    skipped by seeking (tarfile mode ``r:``); else it is read as a stream (mode ``r|*``, any
    compression; every byte passes through, which an MD5 needs). The data of an image member
    is read when ``read_data(index, image_id)`` and its size is at most ``max_bytes``. A member
    is given only once the next header (or the end) was read, so that a member whose data the
    end of the file cut short is known as such. Raises :class:`ArchiveDamaged` (after giving
    everything before the damage; ``cut``: that member) when the archive breaks off or ends
    without tar's end-of-archive block.
    """
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r:" if seekable else "r|*",
                           tarinfo=_EndRecordingTarInfo, bufsize=_STREAM_BUFFER_BYTES)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ArchiveDamaged(f"not readable as a tar archive ({_error_text(error)})") from error
    plain = seekable or getattr(tar.fileobj, "comptype", "") == "tar"
    index, pending, damage = -1, None, None
    try:
        while (info := tar.next()) is not None:
            tar.members.clear()  # tarfile keeps every header; one at a time is enough here
            index += 1
            member = _describe(tar, info, index, plain, read_data, max_bytes)
            if pending is not None:
                yield pending
            pending = member
    except ArchiveDamaged as error:
        damage = error
    except (tarfile.TarError, EOFError, OSError) as error:
        damage = ArchiveDamaged(f"broken after {index + 1} members ({_error_text(error)})")
    if damage is None:
        end = getattr(tar, "landmarks_end_error", None)
        if not isinstance(end, tarfile.EOFHeaderError):
            why = _error_text(end) if end is not None else "no end-of-archive block"
            damage = ArchiveDamaged(f"ends after {index + 1} members without tar's "
                                    f"end-of-archive block ({why}): truncated or corrupt")
    if (damage is not None and damage.cut is None and pending is not None
            and pending.kind == gldv2.MEMBER_IMAGE and plain
            and pending.offset + pending.size > _bytes_available(tar, fileobj, seekable)):
        damage = ArchiveDamaged(f"member {pending.index} {pending.name!r} cut short "
                                f"({damage.detail})", cut=(pending.image_id, pending.name))
        pending = None
    if pending is not None:
        yield pending
    if damage is not None:
        raise damage


class _HashingReader(io.RawIOBase):
    """A read-only stream over ``raw`` that feeds every byte read to ``digest``."""

    def __init__(self, raw, digest):
        super().__init__()
        self._raw, self._digest = raw, digest

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk = self._raw.read(size)
        self._digest.update(chunk)
        return chunk

    def drain(self) -> None:
        """Reads (and hashes) what is left: an MD5 is over the whole file."""
        while self.read(_CHUNK_BYTES):
            pass


def _is_plain_and_seekable(raw) -> bool:
    """Whether ``raw`` (at its start) can seek and is no compressed file (by magic bytes)."""
    if not raw.seekable():
        return False
    head = raw.read(6)
    raw.seek(0)
    return not head.startswith(_COMPRESSED_MAGIC)


def expected_md5(path: str, md5_dir: str) -> tuple[str, str]:
    """``(expected hex digest, problem)`` of archive ``path`` from its MD5 file in ``md5_dir``
    (``problem``: why that file is unusable, one line; then the digest is '')."""
    md5_path = io_utils.join(md5_dir, gldv2.md5_file_name(path))
    try:
        return gldv2.parse_md5_file(io_utils.read_text(md5_path), path), ""
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return "", f"unusable MD5 file {md5_path}: {_error_text(error)}"
    except Exception as error:  # noqa: BLE001 - Beam's BeamIOError for a missing object
        return "", f"unusable MD5 file {md5_path}: {_error_text(error)}"


def parts_per_archive(num_archives: int, workers: int) -> int:
    """How many byte ranges to cut each archive into so that ``workers`` all have members to
    decode: ``ceil(workers / num_archives)`` (1 when there are at least as many archives)."""
    return max(1, -(-max(workers, 1) // max(num_archives, 1)))


def unit_of(member: Member, archive_bytes: int, parts: int) -> tuple[int, int]:
    """The unit of decoding work of ``member``: ``(byte range, block of members)``.

    Byte range: which of ``parts`` equal ranges of the archive holds the member's data, so
    that each unit reads one contiguous stretch of the file; block: ``index //``
    :data:`MEMBERS_PER_UNIT`, which bounds a unit (its decisions are held together, sorted by
    offset) whatever the size of the archive. In a compressed archive (no offsets): the block.
    """
    if member.offset < 0 or archive_bytes <= 0:
        return 0, member.index // MEMBERS_PER_UNIT
    return min(parts - 1, member.offset * parts // archive_bytes), member.index // MEMBERS_PER_UNIT


class ListArchive(beam.DoFn):
    """``(archive path, size in bytes)`` -> pass 1 of the archive input: one stream over the
    archive, no decoding (the size, from the launcher's listing, places members in units).

    Gives, for each image member a label row may ask for (the side input, an
    :class:`.id_filter.IdFilter` of the labelled ids: no false negatives), ``(image id,
    (_JOIN_MEMBERS, (archive, index, name, offset, size, unit)))`` (main output; ``unit``:
    :func:`unit_of`); ``(image id, (_JOIN_CUT, (archive, detail)))`` of a member cut short
    (:data:`TAG_CUT`): values tagged for :class:`MatchIds`' join; and one
    :class:`ArchiveEvent` (:data:`TAG_EVENTS`) with the members by kind, the images the filter
    ruled out counted :data:`KIND_WITHOUT_LABEL_ROW`.

    With ``md5_dir`` the same stream computes the archive's MD5: the listing then says only
    which ids the archive holds, and :class:`MatchIds` rejects them ``checksum_mismatch``
    when the event says the archive was refused (its bytes are never used). Without it, an
    uncompressed archive's data is skipped by seeking: only its headers are read.

    Idempotent: read-only, so Beam's bundle retries are harmless.
    """

    def __init__(self, md5_dir: str, parts: int):
        self._md5_dir = md5_dir
        self._parts = parts

    def process(self, archive_file: tuple[str, int], labelled_ids):
        path, archive_bytes = archive_file
        wanted = id_filter_lib.IdFilter.from_value(labelled_ids)
        expected, problem = expected_md5(path, self._md5_dir) if self._md5_dir else ("", "")
        digest = hashlib.md5() if expected else None
        counts: dict[str, int] = {}
        kind, detail, started, cut_short = EVENT_READ, "", time.monotonic(), 0
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
                source = _HashingReader(raw, digest) if digest is not None else raw
                seekable = digest is None and _is_plain_and_seekable(raw)
                try:
                    for member in iter_members(source, seekable=seekable):
                        counts[member.kind] = counts.get(member.kind, 0) + 1
                        if member.kind != gldv2.MEMBER_IMAGE:
                            continue
                        if not wanted.might_contain(member.image_id):
                            counts[KIND_WITHOUT_LABEL_ROW] = counts.get(
                                KIND_WITHOUT_LABEL_ROW, 0) + 1
                            continue
                        yield member.image_id, (_JOIN_MEMBERS, (
                            path, member.index, member.name, member.offset, member.size,
                            unit_of(member, archive_bytes, self._parts)))
                finally:
                    if digest is not None:  # the MD5 is of the whole file, damaged or not
                        source.drain()
        except (ArchiveDamaged, OSError) as error:
            kind = EVENT_DAMAGED
            detail = error.detail if isinstance(error, ArchiveDamaged) else _error_text(error)
            cut = getattr(error, "cut", None)
            if cut is not None and cut[0]:
                cut_short = 1
                yield beam.pvalue.TaggedOutput(TAG_CUT, (cut[0], (
                    _JOIN_CUT, (path, f"{gldv2.archive_name(path)}: {detail}"))))
        if digest is not None and not problem and digest.hexdigest() != expected:
            problem = (f"MD5 {digest.hexdigest()} != {expected} in "
                       f"{io_utils.join(self._md5_dir, gldv2.md5_file_name(path))}")
        _LOGGER.info("ingest: listed %s in %.1f s: %s%s", gldv2.archive_name(path),
                     time.monotonic() - started, dict(sorted(counts.items())),
                     f" ({kind}: {detail})" if detail else "")
        yield beam.pvalue.TaggedOutput(TAG_EVENTS, _event(path, kind, detail, problem, counts,
                                                          cut_short))


def _event(path: str, kind: str, detail: str, problem: str, counts: dict,
           cut_short: int) -> ArchiveEvent:
    """The :class:`ArchiveEvent` of a listed archive; ``problem``: why its MD5 refuses it;
    ``cut_short``: 1 when the damage cut an image member short (its name was listed)."""
    if not problem:
        return ArchiveEvent(kind, path, detail, tuple(sorted(counts.items())))
    _LOGGER.warning("ingest: %s refused: %s", path, problem)
    listed = (("image_names_listed", counts.get(gldv2.MEMBER_IMAGE, 0) + cut_short),)
    if kind == EVENT_DAMAGED:
        return ArchiveEvent(EVENT_DAMAGED, path,
                            f"refused ({problem}), and listing its names: {detail}", listed)
    return ArchiveEvent(EVENT_REFUSED, path, problem, listed)


def read_unit_members(path: str, wanted: list[tuple[int, int, int]], max_bytes: int):
    """Pass 2's reading: the data of the members ``wanted`` (``(offset, size, index)``, sorted
    by offset; in a compressed archive, offset -1 and sorted by index) of archive ``path``, as
    ``(position in wanted, data, problem)``: ``data`` None when the member is larger than
    ``max_bytes``; ``problem`` (one line, ``data`` None) when it could not be read again (the
    file changed or broke since it was listed). Every position is given exactly once."""
    given: set[int] = set()
    problem = "the archive ended before it"
    try:
        with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
            members = (_stream_unit_members(raw, wanted, max_bytes) if wanted[0][0] < 0
                       else _seek_unit_members(raw, wanted, max_bytes))
            for position, data in members:
                given.add(position)
                yield position, data, ""
    except (ArchiveDamaged, OSError) as error:
        problem = error.detail if isinstance(error, ArchiveDamaged) else _error_text(error)
    for position in range(len(wanted)):
        if position not in given:
            yield position, None, problem


def _seek_unit_members(raw, wanted: list[tuple[int, int, int]], max_bytes: int):
    """:func:`read_unit_members` for an uncompressed archive: one seek and read per member."""
    for position, (offset, size, index) in enumerate(wanted):
        if size > max_bytes:
            yield position, None
            continue
        raw.seek(offset)
        data = raw.read(size)
        if len(data) != size:
            raise ArchiveDamaged(f"member {index} cut short when read again: {len(data)} of its "
                                 f"{size} bytes at offset {offset}")
        yield position, data


def _stream_unit_members(raw, wanted: list[tuple[int, int, int]], max_bytes: int):
    """:func:`read_unit_members` for a compressed archive: one stream, members by index."""
    positions = {index: position for position, (_, _, index) in enumerate(wanted)}
    last = max(positions)
    for member in iter_members(raw, lambda index, _id: index in positions, max_bytes):
        if member.index in positions:
            yield positions[member.index], member.data
        if member.index >= last:
            return


class ParseLabelsLine(beam.DoFn):
    """``(line number, text)`` of ``--labels_csv`` -> :class:`ManifestRow` s, or
    :class:`Rejection` s (tagged), by :func:`.gldv2.parse_labels_line`."""

    def __init__(self, labels: gldv2.LabelsFormat):
        self._labels = labels

    def process(self, numbered_line):
        number, text = numbered_line
        for parsed in gldv2.parse_labels_line(text, number, self._labels):
            if isinstance(parsed, Rejection):
                yield beam.pvalue.TaggedOutput(_REJECTED, parsed)
            else:
                yield parsed


def route_labelled(labelled: LabelledRow):
    """A labelled row -> a distractor (:data:`TAG_DISTRACTORS`: normalised like the manifest
    input's), or a label row: ``(image id, (_JOIN_ROWS, row))`` for the join by id (main) and
    its id for the filter of labelled ids (:data:`TAG_LABELLED_IDS`). One step instead of a
    filter and two maps: this runs once per label row (4.1M for GLDv2's train.csv)."""
    if labelled.row.origin == manifest_lib.ORIGIN_DISTRACTOR:
        yield beam.pvalue.TaggedOutput(TAG_DISTRACTORS, labelled)
        return
    yield labelled.row.image_id, (_JOIN_ROWS, labelled)
    yield beam.pvalue.TaggedOutput(TAG_LABELLED_IDS, labelled.row.image_id)


@dataclasses.dataclass(frozen=True)
class ArchiveOutcomes:
    """What :class:`MatchIds` needs to know of the archives (small: one entry per archive at
    most): ``refused`` archive path -> file name, for archives whose MD5 refused them;
    ``incomplete``: ``"images_003.tar: <detail>"`` of every archive not read to its end."""

    refused: dict
    incomplete: tuple


def archive_outcomes(events: list[ArchiveEvent]) -> ArchiveOutcomes:
    refused, incomplete = {}, []
    for event in events:
        name = gldv2.archive_name(event.archive)
        if event.kind == EVENT_REFUSED or dict(event.counts).get("image_names_listed") is not None:
            refused[event.archive] = name
        if event.kind == EVENT_DAMAGED:
            incomplete.append(f"{name}: {event.detail}")
    return ArchiveOutcomes(refused, tuple(sorted(incomplete)))


class MatchIds(beam.DoFn):
    """``(image id, tagged values)`` (a ``GroupByKey`` of values tagged where they are made:
    :data:`_JOIN_ROWS`: its LabelledRow; :data:`_JOIN_MEMBERS`: a member reference;
    :data:`_JOIN_CUT`: ``(archive, detail)`` of a member cut short) -> the decision for the id
    (no image bytes pass here).

    A labelled id found in an archive that was not refused: its first member (smallest
    (archive, index)) gets the row, whose ``url`` becomes ``<archive>:<member name>``, as
    ``((archive, unit), (offset, size, index, LabelledRow))`` (main: pass 2 reads and decodes
    it, and counts it :data:`KIND_USED`); other copies are counted :data:`KIND_DUPLICATE`
    (:data:`TAG_KINDS`). A labelled id that no archive gave is a :class:`Rejection` (tagged;
    :func:`.gldv2.unseen_reason`). Members without a row (the filter's false positives) are
    counted :data:`KIND_WITHOUT_LABEL_ROW`. Side input: :class:`ArchiveOutcomes`.
    """

    def process(self, keyed, outcomes: ArchiveOutcomes):
        image_id, tagged_values = keyed
        row, first, copies, refused_in, cut_in = None, None, 0, [], []
        # One id's values: its row (at most one: rows were de-duplicated by id) and one value
        # per copy of the id in the archives (usually one).
        for tag, value in tagged_values:
            if tag == _JOIN_ROWS:
                row = value
            elif value[0] in outcomes.refused:
                refused_in.append(outcomes.refused[value[0]])
            elif tag == _JOIN_CUT:
                cut_in.append(value[1])
            else:
                copies += 1
                if first is None or value < first:
                    first = value
        if row is None:
            for _ in range(copies):
                yield beam.pvalue.TaggedOutput(TAG_KINDS, KIND_WITHOUT_LABEL_ROW)
        elif first is None:
            reason, detail = gldv2.unseen_reason(refused_in, cut_in, list(outcomes.incomplete))
            yield beam.pvalue.TaggedOutput(_REJECTED, Rejection(
                image_id=image_id, url="", reason=reason, detail=detail, line=row.row.line,
                origin=row.row.origin))
        else:
            archive, index, name, offset, size, unit = first
            found = dataclasses.replace(row.row, url=f"{archive}:{name}")
            yield (archive, unit), (offset, size, index, LabelledRow(found, row.label, row.split))
            for _ in range(copies - 1):
                yield beam.pvalue.TaggedOutput(TAG_KINDS, KIND_DUPLICATE)


def decode_member(size: int, data: Optional[bytes], max_bytes: int,
                  params: NormaliseParams) -> NormalisedImage:
    """One image member normalised by the manifest input's :func:`.normalise.normalise_image`
    (raises :class:`.normalise.ImageRejected`; ``too_large`` when its bytes were not read:
    ``data`` None)."""
    if data is None:
        raise ImageRejected("too_large", f"{size} bytes > --max_bytes {max_bytes}")
    return normalise_image(data, params)


class DecodeUnit(beam.DoFn):
    """Pass 2: ``((archive, unit), decisions)`` -> the shard records of the unit's members
    (:class:`.transforms.WrittenImage`, main) or :class:`Rejection` s (tagged: the
    normaliser's reason, or ``archive_damaged`` when a member cannot be read again), and
    ``(KIND_USED, number of decisions)`` (:data:`TAG_KINDS`).

    The decisions (at most :data:`MEMBERS_PER_UNIT`) are read in the order of their offsets,
    each with one seek and one read, as the folder input reads a file: the image bytes are
    read and decoded where they are written from, and never shuffled.
    """

    def __init__(self, max_bytes: int, normalise_params: NormaliseParams):
        self._max_bytes = max_bytes
        self._normalise_params = normalise_params
        self._progress = None

    def setup(self):
        self._progress = transforms.ImagesProgress()

    def process(self, keyed):
        (archive, _unit), decisions = keyed
        # By offset, then index: in a compressed archive (every offset -1), by index alone.
        ordered = sorted(decisions, key=lambda decision: (decision[0], decision[2]))
        yield beam.pvalue.TaggedOutput(TAG_KINDS, (KIND_USED, len(ordered)))
        wanted = [(offset, size, index) for offset, size, index, _ in ordered]
        for position, data, problem in read_unit_members(archive, wanted, self._max_bytes):
            _, size, _, labelled = ordered[position]
            row = labelled.row
            if problem:
                yield beam.pvalue.TaggedOutput(_REJECTED, Rejection(
                    image_id=row.image_id, url=row.url, reason=gldv2.REASON_ARCHIVE_DAMAGED,
                    detail=f"member listed, then not readable: {problem}", line=row.line,
                    origin=row.origin))
                continue
            if data is not None:
                _DECODED.inc()
                self._progress.tick()
            try:
                image = decode_member(size, data, self._max_bytes, self._normalise_params)
            except ImageRejected as failure:
                yield beam.pvalue.TaggedOutput(_REJECTED, Rejection(
                    image_id=row.image_id, url=row.url, reason=failure.reason,
                    detail=failure.detail, line=row.line, origin=row.origin))
                continue
            yield transforms.written_image(labelled, image, size)


class _IdFilterCoder(beam.coders.Coder):
    """:class:`.id_filter.IdFilter` accumulators as ``num_bits`` (8 bytes) + the bits."""

    def encode(self, value):
        return value.num_bits.to_bytes(8, "little") + bytes(value.bits)

    def decode(self, encoded):
        return id_filter_lib.IdFilter(int.from_bytes(encoded[:8], "little"),
                                      bytearray(encoded[8:]))

    def is_deterministic(self):
        return True


class BuildIdFilter(beam.CombineFn):
    """Image ids -> ``IdFilter.to_value()`` of all of them (a filter of ``num_bits``)."""

    def __init__(self, num_bits: int):
        self._num_bits = num_bits

    def create_accumulator(self):
        return id_filter_lib.IdFilter.empty(self._num_bits)

    def add_input(self, accumulator, image_id):
        accumulator.add(image_id)
        return accumulator

    def merge_accumulators(self, accumulators):
        merged = self.create_accumulator()
        for accumulator in accumulators:
            merged.union(accumulator)
        return merged

    def extract_output(self, accumulator):
        return accumulator.to_value()

    def get_accumulator_coder(self):
        return _IdFilterCoder()


class ArchiveSummaryFn(beam.CombineFn):
    """:class:`ArchiveEvent` s and member kinds (a kind, or ``(kind, count)``) -> the
    ``archives`` part of ``stats.json`` (associative; lists sorted so the result does not
    depend on worker order)."""

    def create_accumulator(self):
        return {"events": [], "kinds": {}}

    def add_input(self, accumulator, item):
        if isinstance(item, ArchiveEvent):
            accumulator["events"].append(item)
        else:
            kind, count = item if isinstance(item, tuple) else (item, 1)
            accumulator["kinds"][kind] = accumulator["kinds"].get(kind, 0) + count
        return accumulator

    def merge_accumulators(self, accumulators):
        total = self.create_accumulator()
        for accumulator in accumulators:
            total["events"].extend(accumulator["events"])
            for kind, count in accumulator["kinds"].items():
                total["kinds"][kind] = total["kinds"].get(kind, 0) + count
        return total

    def extract_output(self, accumulator):
        return summarise_archives(accumulator["events"], accumulator["kinds"])


MEMBER_KINDS = (gldv2.MEMBER_IMAGE, gldv2.MEMBER_DIRECTORY, gldv2.MEMBER_NON_IMAGE,
                gldv2.MEMBER_UNSAFE_NAME, gldv2.MEMBER_OTHER, KIND_USED,
                KIND_WITHOUT_LABEL_ROW, KIND_DUPLICATE)


def summarise_archives(events: list[ArchiveEvent], kinds: dict[str, int]) -> dict:
    """The ``archives`` part of ``stats.json`` (pure).

    ``members``: by kind, over the archives read (whole or up to their damage): ``images``,
    ``directories``, ``non_image_files``, ``unsafe_names``, ``links_and_special_files``, and
    what became of the images: ``used`` (asked for by a label row: written or rejected),
    ``without_label_row``, ``duplicate_ids``; ``members_balanced``: ``images == used +
    without_label_row + duplicate_ids``.
    """
    members = {kind: 0 for kind in MEMBER_KINDS}
    for kind, count in kinds.items():
        members[kind] = members.get(kind, 0) + count
    damaged, refused, read = [], [], []
    for event in sorted(events, key=lambda item: item.archive):
        counts = dict(event.counts)
        name = gldv2.archive_name(event.archive)
        if event.kind == EVENT_REFUSED:
            refused.append({"archive": name, "detail": event.detail, **counts})
            continue
        if event.kind == EVENT_DAMAGED and "image_names_listed" in counts:
            refused.append({"archive": name, "detail": event.detail, **counts})
            damaged.append({"archive": name, "detail": event.detail, "members_read": 0})
            continue
        for kind, count in counts.items():
            members[kind] = members.get(kind, 0) + count
        if event.kind == EVENT_DAMAGED:
            damaged.append({"archive": name, "detail": event.detail,
                            "members_read": sum(counts.values())})
        else:
            read.append(name)
    used = members[KIND_USED] + members[KIND_WITHOUT_LABEL_ROW] + members[KIND_DUPLICATE]
    return {
        "archives": len(events),
        "read_whole": len(read),
        "damaged": damaged,
        "checksum_mismatch": refused,
        "members": members,
        "members_balanced": members[gldv2.MEMBER_IMAGE] == used,
    }


def write_archive_summary(summary: dict, output_dir: str) -> None:
    io_utils.write_json(io_utils.join(output_dir, ARCHIVES_FILENAME), summary)


def build_archive_pipeline(pipeline: beam.Pipeline, config: IngestConfig,
                           archive_files: list[tuple[str, int]],
                           labels: gldv2.LabelsFormat, distractors: list[ManifestRow],
                           given_label_map: Optional[LabelMap], labels_size: int,
                           parts: int = 1) -> None:
    """Adds the ``--archives`` ingest to ``pipeline`` (see the module docstring);
    ``archive_files``: ``(path, size in bytes)`` of each archive; ``labels_size``: the size of
    ``--labels_csv`` in bytes (sizes the filter of labelled ids); ``parts``: the byte ranges
    each archive is decoded in (:func:`parts_per_archive`)."""
    out = config.output_dir
    main_split = config.main_split(labels.labelled)
    shards = config.shards_per_split(labels.labelled)

    lines = (
        pipeline
        | "LabelsPath" >> beam.Create([config.labels_csv])
        | "ReadLabelLines" >> beam.ParDo(transforms.ReadManifestLines())
        | "SpreadLabelLines" >> beam.Reshuffle()
    )
    parsed = lines | "ParseLabels" >> beam.ParDo(ParseLabelsLine(labels)).with_outputs(
        _REJECTED, main="rows")
    distractor_rows = pipeline | "Distractors" >> beam.Create(distractors)
    all_rows = (parsed.rows, distractor_rows) | "AllRows" >> beam.Flatten()
    labelled = transforms.label_rows(pipeline, all_rows, config, main_split, None,
                                     given_label_map)

    routed = labelled.rows | "RouteRows" >> beam.FlatMap(route_labelled).with_outputs(
        TAG_DISTRACTORS, TAG_LABELLED_IDS, main="keyed_rows")
    labelled_ids = (
        routed[TAG_LABELLED_IDS]
        | "IdFilter" >> beam.CombineGlobally(BuildIdFilter(
            id_filter_lib.bits_for_labels_file(labels_size)))
    )
    listed = (
        pipeline
        | "ArchiveFiles" >> beam.Create(archive_files)
        | "SpreadArchives" >> beam.Reshuffle()
        | "ListArchives" >> beam.ParDo(
            ListArchive(config.md5_dir, parts), beam.pvalue.AsSingleton(labelled_ids),
        ).with_outputs(TAG_EVENTS, TAG_CUT, main="members")
    )
    outcomes = (
        listed[TAG_EVENTS]
        | "CollectEvents" >> beam.combiners.ToList()
        | "ArchiveOutcomes" >> beam.Map(archive_outcomes)
    )
    # The join by id: values tagged where they are made (as grouping.TaggedJoin would, without
    # its one extra step per value), grouped; MatchIds streams each id's few values.
    matched = (
        (routed.keyed_rows, listed.members, listed[TAG_CUT])
        | "IdValues" >> beam.Flatten()
        | "JoinIds" >> beam.GroupByKey()
        | "MatchIds" >> beam.ParDo(MatchIds(), beam.pvalue.AsSingleton(outcomes)).with_outputs(
            _REJECTED, TAG_KINDS, main="decisions")
    )
    # Pass 2: the decisions grouped by unit of decoding work (a byte range of one archive);
    # the image bytes are read where they are decoded and written, never shuffled.
    decoded = (
        matched.decisions
        | "GroupByUnit" >> beam.GroupByKey()
        | "DecodeUnits" >> beam.ParDo(DecodeUnit(
            config.max_bytes, config.normalise_params())).with_outputs(
                _REJECTED, TAG_KINDS, main="written")
    )
    distractor_images = transforms.normalise_images(routed[TAG_DISTRACTORS], config)
    written = (decoded.written, distractor_images.written) | "AllWritten" >> beam.Flatten()
    transforms.write_shards_rejected_and_counts(
        written, shards, out,
        rejected=[parsed[_REJECTED], *labelled.rejected, matched[_REJECTED],
                  decoded[_REJECTED], distractor_images[_REJECTED]],
        rows_in=[parsed.rows, parsed[_REJECTED], distractor_rows],
        num_classes=labelled.num_classes)
    (
        (listed[TAG_EVENTS], matched[TAG_KINDS], decoded[TAG_KINDS])
        | "ArchiveItems" >> beam.Flatten()
        | "SummariseArchives" >> beam.CombineGlobally(ArchiveSummaryFn())
        | "WriteArchiveSummary" >> beam.Map(write_archive_summary, out)
    )
