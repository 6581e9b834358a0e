"""``landmarks-ingest --archives GLOB --labels_csv CSV``: GLDv2's tar archives read as they ship.

Each archive is one unit of work, read sequentially as a stream (``tarfile`` mode ``r|*`` over a
Beam ``FileSystems`` handle: local or ``gs://``, never extracted to disk, one member in memory at
a time). The worker that reads an archive also decodes and normalises its images, with the
manifest input's own function (:func:`.normalise.normalise_image`), but only those a label row
may ask for (a Bloom filter of the labelled ids, :mod:`.id_filter`, is its side input:
``train_clean.csv`` asks for 1.58M of the 4.1M train images). The normalised images, about a
quarter of the raw bytes at ``--max_side 512``, are then spread over workers by the join that
gives them their rows. Decoding before the shuffle instead of after it is what makes this input
as fast per image as a folder of files (``bench/bench_ingest_archives.py``): the shuffle of raw
JPEGs cost more than reading the files one by one. GLDv2 ships enough archives (500 train, 100
index, 20 test) to keep that many workers decoding; with fewer archives than workers, each
archive is cut into ``--archive_parts`` units (:func:`parts_per_archive`), each streaming the
whole archive and decoding every K-th member, so the decoding is still spread over all workers.

Data flow (every label row ends in exactly one shard record or one ``rejected.csv`` row)::

    --labels_csv lines --parse (gldv2.parse_labels_line)--> rows ----------------+--> rejected
      -> group by id, keep first -> label map -> class index -> dev split ---+  (the manifest
         (transforms.label_rows: the manifest input's steps, ids only)       |   input's steps)
                         | LabelledRow by id --> Bloom filter of the ids     |
                         |                             | side input          |
    archive paths -> CheckArchive (MD5) -> parts -> ReadArchive (one stream  |
                     per unit; a member the filter rules out: without_label_row)
        members: (id, (archive, index, name))  --+                           |
        refused / cut-short ids               --+-> MatchIds (CoGroupByKey by id, ids only):
                                                 |   the first member of each labelled id gets
                                                 |   its row; a labelled id with no member is
                                                 |   rejected (not_in_archives, archive_damaged,
                                                 |   checksum_mismatch) ----------------------->+
        members: ((archive, index), normalised) -+-> AttachImages (CoGroupByKey by member: the
                 (decode_member: JPEG or reason)     one shuffle of image data, which also
                                                     spreads it over workers) -> record or the
                                                     normaliser's reason -> shards --------->+

Members that are not images, directory entries, links, names that are not safe ids, images
without a label row (or whose row was rejected) and second copies of an id are counted by kind
in ``stats.json`` (``archives.members``), not rejected: the CSV never asked for them. For every
archive read whole: ``images == used + without_label_row + duplicate_ids``.

Damage: a truncated or corrupt archive keeps the members read before the damage; the member cut
short and, since a tar has no index, every labelled id found in no archive while some archive
was not read to its end are rejected ``archive_damaged`` (:func:`.gldv2.unseen_reason`); the job
goes on. ``--md5_dir DIR``: the folder holding the release's ``md5.images_NNN.txt`` files of
*this* split (``md5sum/train`` for the train archives); archive ``images_NNN.tar`` is checked
against ``DIR/md5.images_NNN.txt`` before any member is used. An archive that does not match is
not used: only its member names are read (a second stream), so that its labelled rows are
rejected ``checksum_mismatch``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tarfile
from typing import Callable, Optional

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

TAG_EVENTS = "events"
TAG_REFUSED = "refused"
TAG_CUT = "cut"
TAG_KINDS = "kinds"
TAG_IDS = "ids"
_REJECTED = "rejected"  # the tag of transforms' steps

EVENT_READ = "read_whole"
EVENT_DAMAGED = "damaged"
EVENT_REFUSED = "checksum_mismatch"

KIND_USED = "used"
KIND_WITHOUT_LABEL_ROW = "without_label_row"
KIND_DUPLICATE = "duplicate_ids"
_DUPLICATE = "duplicate"  # MatchIds' decision for a second copy of an id


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


def iter_members(fileobj, read_data: Callable[[int, str], bool], max_bytes: int):
    """The members of a tar stream, in order: ``(index, name, kind, image_id, size, data)``.

    ``kind`` is a :mod:`.gldv2` ``MEMBER_*`` kind; ``data`` the bytes of an image member when
    ``read_data(index, image_id)`` and its size is at most ``max_bytes``, else None (the stream skips
    the member's data without copying it). Raises
    :class:`ArchiveDamaged` when the stream breaks off or ends without tar's end-of-archive
    block (after yielding everything read before).
    """
    try:
        tar = tarfile.open(fileobj=fileobj, mode="r|*", tarinfo=_EndRecordingTarInfo)
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ArchiveDamaged(f"not readable as a tar archive ({_error_text(error)})") from error
    index = -1
    try:
        iterator = iter(tar)
        while True:
            try:
                info = next(iterator)
            except StopIteration:
                break
            index += 1
            if info.isdir():
                yield index, info.name, gldv2.MEMBER_DIRECTORY, "", 0, None
                continue
            if not info.isfile():
                yield index, info.name, gldv2.MEMBER_OTHER, "", 0, None
                continue
            kind, image_id = gldv2.member_kind_and_id(info.name)
            data = None
            if (kind == gldv2.MEMBER_IMAGE and info.size <= max_bytes
                    and read_data(index, image_id)):
                try:
                    data = tar.extractfile(info).read()
                except (tarfile.TarError, EOFError, OSError) as error:
                    raise ArchiveDamaged(
                        f"member {index} {info.name!r} cut short ({_error_text(error)})",
                        cut=(image_id, info.name)) from error
            yield index, info.name, kind, image_id, info.size, data
    except (tarfile.TarError, EOFError, OSError) as error:
        raise ArchiveDamaged(f"broken after {index + 1} members ({_error_text(error)})") from error
    end = getattr(tar, "landmarks_end_error", None)
    if not isinstance(end, tarfile.EOFHeaderError):
        why = _error_text(end) if end is not None else "no end-of-archive block"
        raise ArchiveDamaged(f"ends after {index + 1} members without tar's end-of-archive "
                             f"block ({why}): truncated or corrupt")


def file_md5(path: str) -> str:
    """The MD5 hex digest of ``path``'s bytes, read as a stream."""
    digest = hashlib.md5()
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        while True:
            chunk = handle.read(_CHUNK_BYTES)
            if not chunk:
                break
            digest.update(chunk)
    return digest.hexdigest()


def checksum_problem(path: str, md5_dir: str) -> str:
    """'' when ``path`` matches its MD5 file in ``md5_dir``, else what is wrong (one line)."""
    md5_path = io_utils.join(md5_dir, gldv2.md5_file_name(path))
    try:
        expected = gldv2.parse_md5_file(io_utils.read_text(md5_path), path)
    except (OSError, ValueError, UnicodeDecodeError) as error:
        return f"unusable MD5 file {md5_path}: {_error_text(error)}"
    except Exception as error:  # noqa: BLE001 - Beam's BeamIOError for a missing object
        return f"unusable MD5 file {md5_path}: {_error_text(error)}"
    try:
        actual = file_md5(path)
    except OSError as error:
        return f"archive unreadable while checking its MD5: {_error_text(error)}"
    if actual != expected:
        return f"MD5 {actual} != {expected} in {md5_path}"
    return ""


class CheckArchive(beam.DoFn):
    """Archive path -> ``(path, problem)``: its MD5 against ``md5_dir`` (``problem`` empty when
    it matches or when there is no ``md5_dir``). One stream over the archive."""

    def __init__(self, md5_dir: str):
        self._md5_dir = md5_dir

    def process(self, path: str):
        problem = checksum_problem(path, self._md5_dir) if self._md5_dir else ""
        if problem:
            _LOGGER.warning("ingest: %s refused: %s", path, problem)
        yield path, problem


def archive_units(checked: tuple[str, str], parts: int):
    """``(path, problem)`` -> the units of reading work ``(path, part, parts, problem)``: one
    for a refused archive, else ``parts`` (each decodes every ``parts``-th member)."""
    path, problem = checked
    if problem:
        yield path, 0, 1, problem
    else:
        for part in range(parts):
            yield path, part, parts, ""


def parts_per_archive(num_archives: int, workers: int) -> int:
    """How many units to cut each archive into so that ``workers`` all have an archive's part to
    decode: ``ceil(workers / num_archives)`` (1 when there are at least as many archives)."""
    return max(1, -(-max(workers, 1) // max(num_archives, 1)))


class ReadArchive(beam.DoFn):
    """Unit ``(path, part, parts, problem)`` -> for each image member of that part that a label
    row may ask for, ``((archive, index), payload)`` (main output; ``index``: position in the
    archive, as a tar may hold one name twice; ``payload``: the member decoded and normalised
    here, see :func:`decode_member`). Part 0 also gives, for the whole archive, the labelled
    members' ``(image id, (archive, index, name))`` without bytes (:data:`TAG_IDS`), the kind
    :data:`KIND_WITHOUT_LABEL_ROW` of every other image member (:data:`TAG_KINDS`), one
    :class:`ArchiveEvent` (:data:`TAG_EVENTS`) and ``(image id, detail)`` of a member cut short
    (:data:`TAG_CUT`). A refused unit (``problem``: its MD5) gives ``(image id, archive name)``
    of its image names (:data:`TAG_REFUSED`) and its event.

    Decoding here, in the worker that streams the bytes, instead of after a shuffle: the join
    that follows then moves normalised JPEGs (a quarter of the raw bytes at ``--max_side 512``)
    instead of raw ones. The units of work are the archives (GLDv2: 500 train, 100 index, 20
    test), each cut into ``parts`` when there are fewer archives than workers: every part
    streams the whole archive (reading is cheap next to decoding) and decodes its share of the
    members (``index % parts == part``). Whether a row may ask for a member is the side input's
    answer, an :class:`.id_filter.IdFilter` of the labelled ids (no false negatives; a false
    positive is decoded in vain and counted ``without_label_row`` after the join).

    Idempotent: read-only, so Beam's bundle retries are harmless.
    """

    def __init__(self, max_bytes: int, normalise_params: NormaliseParams):
        self._max_bytes = max_bytes
        self._normalise_params = normalise_params
        self._progress = None

    def setup(self):
        self._progress = transforms.ImagesProgress()

    def process(self, unit: tuple, labelled_ids):
        path, part, parts, problem = unit
        if problem:
            yield from self._refuse(path, gldv2.archive_name(path), problem)
        else:
            yield from self._read(path, part, parts,
                                  id_filter_lib.IdFilter.from_value(labelled_ids))

    def _read(self, path: str, part: int, parts: int, labelled_ids: id_filter_lib.IdFilter):
        """Part ``part`` of a verified (or unchecked) archive (see the class docstring)."""
        whole_archive = part == 0  # the part that accounts for every member
        counts: dict[str, int] = {}
        kind, detail = EVENT_READ, ""

        def wanted(index: int, image_id: str) -> bool:
            # Part 0 reads the bytes of every labelled member (and decodes its share): so it
            # meets a member cut short exactly as a single reader would, and reports it.
            return ((whole_archive or index % parts == part)
                    and labelled_ids.might_contain(image_id))

        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
                for index, member, member_kind, image_id, size, data in iter_members(
                        raw, wanted, self._max_bytes):
                    counts[member_kind] = counts.get(member_kind, 0) + 1
                    if member_kind != gldv2.MEMBER_IMAGE:
                        continue
                    if not labelled_ids.might_contain(image_id):
                        if whole_archive:
                            yield beam.pvalue.TaggedOutput(TAG_KINDS, KIND_WITHOUT_LABEL_ROW)
                        continue
                    if whole_archive:
                        yield beam.pvalue.TaggedOutput(TAG_IDS, (image_id, (path, index, member)))
                    if index % parts == part:
                        yield (path, index), decode_member(size, data, self._max_bytes,
                                                           self._normalise_params)
                        _DECODED.inc()
                        self._progress.tick()
        except (ArchiveDamaged, OSError) as error:
            kind = EVENT_DAMAGED
            detail = error.detail if isinstance(error, ArchiveDamaged) else _error_text(error)
            _LOGGER.warning("ingest: archive %s (part %d of %d) damaged: %s", path, part + 1,
                            parts, detail)
            cut = getattr(error, "cut", None)
            if whole_archive and cut is not None and cut[0]:
                yield beam.pvalue.TaggedOutput(
                    TAG_CUT, (cut[0], f"{gldv2.archive_name(path)}: {detail}"))
        if whole_archive:
            yield beam.pvalue.TaggedOutput(TAG_EVENTS, ArchiveEvent(
                kind, path, detail, tuple(sorted(counts.items()))))

    def _refuse(self, path: str, name: str, problem: str):
        """A refused archive: its image names only (their bytes are never used)."""
        listed = 0
        kind, detail = EVENT_REFUSED, problem
        try:
            with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as raw:
                for _, _, member_kind, image_id, _, _ in iter_members(
                        raw, _read_none, self._max_bytes):
                    if member_kind == gldv2.MEMBER_IMAGE:
                        listed += 1
                        yield beam.pvalue.TaggedOutput(TAG_REFUSED, (image_id, name))
        except (ArchiveDamaged, OSError) as error:
            kind = EVENT_DAMAGED
            damage = error.detail if isinstance(error, ArchiveDamaged) else _error_text(error)
            detail = f"refused ({problem}), and listing its names: {damage}"
        yield beam.pvalue.TaggedOutput(TAG_EVENTS, ArchiveEvent(
            kind, path, detail, (("image_names_listed", listed),)))


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


def key_labelled_by_id(labelled: LabelledRow):
    return labelled.row.image_id, labelled


def is_distractor(labelled: LabelledRow) -> bool:
    return labelled.row.origin == manifest_lib.ORIGIN_DISTRACTOR


def is_label_row(labelled: LabelledRow) -> bool:
    return labelled.row.origin != manifest_lib.ORIGIN_DISTRACTOR


def incomplete_description(event: ArchiveEvent) -> list[str]:
    """``["images_003.tar: <detail>"]`` for an archive not read to its end, else []."""
    if event.kind != EVENT_DAMAGED:
        return []
    return [f"{gldv2.archive_name(event.archive)}: {event.detail}"]


class MatchIds(beam.DoFn):
    """``(image id, {"rows": LabelledRow, "members": (archive, index, name), "refused": archive
    name, "cut": detail})`` -> decisions ``((archive, index), LabelledRow | "duplicate")``
    (main), or a :class:`Rejection` (tagged) for a labelled id that no archive gave.

    Ids only: no image bytes pass here. The first member (smallest (archive, index)) of a
    labelled id gets the row (its ``url`` becomes ``<archive>:<member name>``); other copies
    are marked duplicates. Side input: the archives not read to their end (short strings).
    """

    def process(self, keyed, incomplete_archives):
        image_id, groups = keyed
        row = None
        for labelled in groups["rows"]:  # at most one: rows were de-duplicated by id
            row = labelled
        first = None
        for reference in groups["members"]:
            if first is None or reference < first:
                first = reference
        if row is not None and first is None:
            # One id's refused/cut values: at most one per archive that names it (usually 0-1).
            reason, detail = gldv2.unseen_reason(list(groups["refused"]), list(groups["cut"]),
                                                 list(incomplete_archives))
            yield beam.pvalue.TaggedOutput(_REJECTED, Rejection(
                image_id=image_id, url="", reason=reason, detail=detail, line=row.row.line,
                origin=row.row.origin))
        elif row is not None:
            # (Members without a label row get no decision: counted when their bytes arrive.)
            archive, index, name = first
            found = dataclasses.replace(row.row, url=f"{archive}:{name}")
            yield (archive, index), LabelledRow(found, row.label, row.split)
            for reference in groups["members"]:
                if reference != first:
                    yield (reference[0], reference[1]), _DUPLICATE


def decode_member(size: int, data: Optional[bytes], max_bytes: int,
                  params: NormaliseParams) -> tuple:
    """One image member's payload, ``(size, jpeg, height, width, source_format, reason,
    detail)``: normalised by the manifest input's :func:`.normalise.normalise_image` (``reason``
    empty), or why not (``jpeg`` empty; ``too_large`` when its bytes were not read: ``data``
    None). A plain tuple, which Beam's coder writes without pickling."""
    if data is None:
        return size, b"", 0, 0, "", "too_large", f"{size} bytes > --max_bytes {max_bytes}"
    try:
        image = normalise_image(data, params)
    except ImageRejected as failure:
        return size, b"", 0, 0, "", failure.reason, failure.detail
    return size, image.jpeg_bytes, image.height, image.width, image.source_format, "", ""


class AttachImages(beam.DoFn):
    """``((archive, index), {"decisions": ..., "members": payload})`` -> the shard record of
    the member's row (:class:`.transforms.WrittenImage`, main), a :class:`Rejection` with the
    normaliser's reason (tagged), or the member's kind for the counts (:data:`TAG_KINDS`:
    :data:`KIND_USED`, :data:`KIND_WITHOUT_LABEL_ROW`, :data:`KIND_DUPLICATE`)."""

    def process(self, keyed):
        _, groups = keyed
        decision = None
        for value in groups["decisions"]:
            decision = value
        payloads = groups["members"]
        if isinstance(decision, LabelledRow) and not payloads:
            # Part 0 listed the member, but the part that decodes it stopped before it (a read
            # error that part 0 did not meet): still one rejected row, not a silent loss.
            payloads = [(0, b"", 0, 0, "", "archive_damaged",
                         "member not decoded: the reading of its part of the archive stopped "
                         "before it (see the warnings of the ingest log)")]
        for size, jpeg, height, width, source_format, reason, detail in payloads:
            if decision is None:
                yield beam.pvalue.TaggedOutput(TAG_KINDS, KIND_WITHOUT_LABEL_ROW)
                continue
            if decision == _DUPLICATE:
                yield beam.pvalue.TaggedOutput(TAG_KINDS, KIND_DUPLICATE)
                continue
            yield beam.pvalue.TaggedOutput(TAG_KINDS, KIND_USED)
            row = decision.row
            if reason:
                yield beam.pvalue.TaggedOutput(_REJECTED, Rejection(
                    image_id=row.image_id, url=row.url, reason=reason, detail=detail,
                    line=row.line, origin=row.origin))
                continue
            image = NormalisedImage(jpeg, height, width, source_format)
            yield transforms.written_image(decision, image, size)


def labelled_id(labelled: LabelledRow) -> str:
    return labelled.row.image_id


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
    """:class:`ArchiveEvent` s and member kinds (strings) -> the ``archives`` part of
    ``stats.json`` (associative; lists sorted so the result does not depend on worker order)."""

    def create_accumulator(self):
        return {"events": [], "kinds": {}}

    def add_input(self, accumulator, item):
        if isinstance(item, ArchiveEvent):
            accumulator["events"].append(item)
        else:
            accumulator["kinds"][item] = accumulator["kinds"].get(item, 0) + 1
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


def build_archive_pipeline(pipeline: beam.Pipeline, config: IngestConfig, archive_paths: list[str],
                           labels: gldv2.LabelsFormat, distractors: list[ManifestRow],
                           given_label_map: Optional[LabelMap], labels_size: int,
                           parts: int = 1) -> None:
    """Adds the ``--archives`` ingest to ``pipeline`` (see the module docstring);
    ``labels_size``: the size of ``--labels_csv`` in bytes (sizes the filter of labelled ids);
    ``parts``: the units of reading work per archive (:func:`parts_per_archive`)."""
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

    label_rows_only = labelled.rows | "OnlyLabelRows" >> beam.Filter(is_label_row)
    labelled_ids = (
        label_rows_only
        | "LabelledIds" >> beam.Map(labelled_id)
        | "IdFilter" >> beam.CombineGlobally(BuildIdFilter(
            id_filter_lib.bits_for_labels_file(labels_size)))
    )
    read = (
        pipeline
        | "ArchivePaths" >> beam.Create(archive_paths)
        | "SpreadArchives" >> beam.Reshuffle()
        | "CheckArchives" >> beam.ParDo(CheckArchive(config.md5_dir))
        | "ArchiveParts" >> beam.FlatMap(archive_units, parts)
        | "SpreadParts" >> beam.Reshuffle()
        | "ReadArchives" >> beam.ParDo(
            ReadArchive(config.max_bytes, config.normalise_params()),
            beam.pvalue.AsSingleton(labelled_ids),
        ).with_outputs(TAG_IDS, TAG_EVENTS, TAG_REFUSED, TAG_CUT, TAG_KINDS, main="members")
    )
    incomplete = (
        read[TAG_EVENTS]
        | "IncompleteArchives" >> beam.FlatMap(incomplete_description)
        | "ListIncomplete" >> beam.combiners.ToList()
    )
    matched = (
        {"rows": label_rows_only | "KeyRowsById" >> beam.Map(key_labelled_by_id),
         "members": read[TAG_IDS],
         "refused": read[TAG_REFUSED],
         "cut": read[TAG_CUT]}
        | "JoinIds" >> beam.CoGroupByKey()
        | "MatchIds" >> beam.ParDo(MatchIds(), beam.pvalue.AsSingleton(incomplete)).with_outputs(
            _REJECTED, main="decisions")
    )
    # The one shuffle of image data: normalised JPEGs, which also spreads them over workers.
    attached = (
        {"decisions": matched.decisions,
         "members": read.members}
        | "JoinImages" >> beam.CoGroupByKey()
        | "AttachImages" >> beam.ParDo(AttachImages()).with_outputs(
            _REJECTED, TAG_KINDS, main="written")
    )
    distractor_images = transforms.normalise_images(
        labelled.rows | "OnlyDistractors" >> beam.Filter(is_distractor), config)
    written = (attached.written, distractor_images.written) | "AllWritten" >> beam.Flatten()
    transforms.write_shards_rejected_and_counts(
        written, shards, out,
        rejected=[parsed[_REJECTED], *labelled.rejected, matched[_REJECTED],
                  attached[_REJECTED], distractor_images[_REJECTED]],
        rows_in=[parsed.rows, parsed[_REJECTED], distractor_rows],
        num_classes=labelled.num_classes)
    (
        (read[TAG_EVENTS], read[TAG_KINDS], attached[TAG_KINDS])
        | "ArchiveItems" >> beam.Flatten()
        | "SummariseArchives" >> beam.CombineGlobally(ArchiveSummaryFn())
        | "WriteArchiveSummary" >> beam.Map(write_archive_summary, out)
    )
