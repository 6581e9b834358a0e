"""Random access to TFRecord files: which record is where, so one photo's query reads only the
records it needs (a class's cached reference features, a retrieved reference's image).

A TFRecord file is a sequence of ``[length uint64 LE][crc32c of length uint32][payload]
[crc32c of payload uint32]`` frames. :func:`iter_records` walks them through Beam's
FileSystems (local paths and ``gs://``) and yields each payload with its byte offset;
:func:`read_record_at` reads one payload back. :class:`RecordIndex` maps a key (a class index,
an image id) to the offsets of its records. Building it reads every file once; it is saved as
JSON beside the data it indexes, keyed by the files' names and sizes, so the next load reuses
it (``query_index.json`` in the reference cache).

CRCs are not checked: the files were written by this project's jobs, and a damaged payload
fails to parse anyway (the caller reports it).
"""

from __future__ import annotations

import json
import logging
import struct
from typing import Callable, Hashable, Iterator, Optional

import google_crc32c
from apache_beam.io.filesystems import FileSystems

from beam_pipelines import io_utils
from tfrecords_schema import InputError

_LOG = logging.getLogger(__name__)

_HEADER = struct.Struct("<QI")  # payload length, crc32c of the length
_FOOTER_BYTES = 4  # crc32c of the payload
INDEX_VERSION = 1


class RecordFileError(InputError):
    """A TFRecord file ends in the middle of a frame (truncated or not a TFRecord file), or an
    index points where no record is (the file changed since it was indexed): the user's data,
    one line and exit code 2."""


_REWRITE_HINT = ("the file is truncated or not a TFRecord file: re-run the job that wrote it "
                 "(landmarks-predict for a reference cache, landmarks-ingest for records)")
_STALE_HINT = ("the file changed since it was indexed or is truncated: delete the cache's "
               "index (query_index.json) or re-run the job that wrote the file")


def masked_crc32c(data: bytes) -> int:
    """TFRecord's checksum of ``data``: CRC-32C, rotated right by 15 bits plus a constant."""
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def iter_records(path: str) -> Iterator[tuple[int, bytes]]:
    """``(offset of the frame in bytes, payload)`` of every record of one TFRecord file."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        offset = 0
        while True:
            header = handle.read(_HEADER.size)
            if not header:
                return
            if len(header) < _HEADER.size:
                raise RecordFileError(f"{path}: truncated record header at byte {offset}; "
                                      f"{_REWRITE_HINT}")
            length, length_crc = _HEADER.unpack(header)
            if masked_crc32c(header[:8]) != length_crc:
                # Random bytes would give a length of up to 2**64: never read it.
                raise RecordFileError(f"{path}: no valid record header at byte {offset} (its "
                                      f"length checksum does not match); {_REWRITE_HINT}")
            payload = handle.read(length)
            footer = handle.read(_FOOTER_BYTES)
            if len(payload) < length or len(footer) < _FOOTER_BYTES:
                raise RecordFileError(f"{path}: truncated record at byte {offset}; "
                                      f"{_REWRITE_HINT}")
            yield offset, payload
            offset += _HEADER.size + length + _FOOTER_BYTES


def read_record_at(path: str, offset: int) -> bytes:
    """The payload of the record whose frame starts at ``offset`` of ``path``."""
    with FileSystems.open(path, compression_type="uncompressed") as handle:
        handle.seek(offset)
        header = handle.read(_HEADER.size)
        if len(header) < _HEADER.size:
            raise RecordFileError(f"{path}: no record at byte {offset}; {_STALE_HINT}")
        length, _ = _HEADER.unpack(header)
        payload = handle.read(length)
        if len(payload) < length:
            raise RecordFileError(f"{path}: truncated record at byte {offset}; {_STALE_HINT}")
        return payload


class RecordIndex:
    """Key -> the ``(file, offset)`` of each of its records, over the files of one glob.

    ``keys_of(payload)`` returns the keys of one record (e.g. ``[label]`` or ``[image_id]``;
    an empty list leaves the record out). Keys are stored as JSON strings: use :meth:`get`
    with the original key.
    """

    def __init__(self, files: list, entries: dict):
        self.files = files  # [[path, size], ...]: the fingerprint the index was built from
        self._entries = entries  # key string -> [[file position, offset], ...]

    @classmethod
    def build(cls, pattern: str, keys_of: Callable[[bytes], list],
              files: Optional[list] = None) -> "RecordIndex":
        """Reads every record of ``pattern``'s files (``files``: their fingerprint, when the
        caller already listed them)."""
        files = files if files is not None else _fingerprint(pattern)
        entries: dict = {}
        for position, (path, _) in enumerate(files):
            for offset, payload in iter_records(path):
                for key in keys_of(payload):
                    entries.setdefault(_key(key), []).append([position, offset])
        return cls(files, entries)

    def get(self, key: Hashable) -> list[tuple[str, int]]:
        """``[(path, offset), ...]`` of the records with ``key`` (empty when none)."""
        return [(self.files[position][0], offset)
                for position, offset in self._entries.get(_key(key), [])]

    def read(self, key: Hashable) -> list[bytes]:
        """The payloads of the records with ``key``."""
        return [read_record_at(path, offset) for path, offset in self.get(key)]

    def __len__(self) -> int:
        return len(self._entries)

    def to_json(self) -> dict:
        return {"files": self.files, "entries": self._entries}


def _key(key: Hashable) -> str:
    return json.dumps(key)


def _fingerprint(pattern: str) -> list:
    files = sorted([item.path, int(item.size_in_bytes)]
                   for item in FileSystems.match([pattern])[0].metadata_list)
    if not files:
        raise FileNotFoundError(f"no files match {pattern}")
    return files


def cached_indexes(index_path: str, wanted: dict) -> dict:
    """Named indexes, ``wanted``: ``{name: (pattern, keys_of)}`` -> ``{name: RecordIndex}``.

    ``index_path`` is a JSON file holding the named indexes; it is read once, an index whose
    files (names and sizes) are unchanged is reused, the others are built now and the file is
    written once (when its folder cannot be written, they are kept in memory only).
    """
    stored: dict = {}
    if io_utils.exists(index_path):
        try:
            stored = json.loads(io_utils.read_text(index_path))
        except ValueError as error:
            _LOG.warning("ignoring unreadable %s: %s", index_path, error)
            stored = {}
    if stored.get("version") != INDEX_VERSION:
        stored = {"version": INDEX_VERSION}
    indexes, built = {}, False
    for name, (pattern, keys_of) in wanted.items():
        entry: Optional[dict] = stored.get(name)
        files = _fingerprint(pattern)
        if entry is not None and entry.get("files") == files:
            indexes[name] = RecordIndex(entry["files"], entry["entries"])
            continue
        _LOG.info("indexing the records of %s (once, saved to %s)", pattern, index_path)
        indexes[name] = RecordIndex.build(pattern, keys_of, files)
        stored[name] = indexes[name].to_json()
        built = True
    if built:
        try:
            io_utils.write_text(index_path, json.dumps(stored))
        except OSError as error:  # a read-only cache still answers queries
            _LOG.warning("cannot save the record index to %s (%s); it is rebuilt next time",
                         index_path, error)
    return indexes
