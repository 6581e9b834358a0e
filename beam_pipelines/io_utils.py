"""Small file helpers over Beam's ``FileSystems``: the same calls work on local paths and ``gs://``.

Every job reads and writes through these (or through Beam IO transforms), never through ``open``
or ``os``, so a job runs on Dataflow with ``gs://`` folders by flags alone.

Conventions:
- A run folder is written once: :func:`prepare_output_dir` refuses a non-empty folder unless the
  caller passes ``overwrite=True`` (then the old contents are deleted, so stale shards of an
  earlier run with another shard count never mix with new ones).
- Small files are written to a temporary name and renamed, so a reader never sees half a file.
- :func:`write_success_marker` is called last; readers check :func:`has_success_marker`.
"""

from __future__ import annotations

import json
import os
import uuid

from apache_beam.io.filesystem import BeamIOError, CompressionTypes
from apache_beam.io.filesystems import FileSystems

from tfrecords_schema import InputError

SUCCESS_MARKER = "_SUCCESS"


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def join(base: str, *names: str) -> str:
    """Joins path components in the style of ``base``'s file system (``/`` for ``gs://``)."""
    return FileSystems.join(base, *names)


def exists(path: str) -> bool:
    """True if ``path`` names an existing file (or, locally, a folder)."""
    return FileSystems.exists(path)


def match(pattern: str) -> list[str]:
    """Sorted paths of the files matching ``pattern`` (``*``, ``?``, ``**``); ``[]`` if none."""
    try:
        results = FileSystems.match([pattern])
    except BeamIOError:
        return []
    return sorted(metadata.path for metadata in results[0].metadata_list)


def read_bytes(path: str) -> bytes:
    """The whole contents of ``path``."""
    with FileSystems.open(path, mime_type="application/octet-stream",
                          compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        return handle.read()


def read_text(path: str) -> str:
    """The whole contents of ``path`` decoded as UTF-8 (a leading BOM is dropped)."""
    return read_bytes(path).decode("utf-8-sig")


def write_bytes(path: str, data: bytes) -> None:
    """Writes ``data`` to ``path`` through a temporary name and a rename (no half files)."""
    directory, name = FileSystems.split(path)
    temp_path = join(directory, f".{name}.tmp-{uuid.uuid4().hex}")
    with FileSystems.create(temp_path, mime_type="application/octet-stream",
                            compression_type=CompressionTypes.UNCOMPRESSED) as handle:
        handle.write(data)
    if exists(path):
        FileSystems.delete([path])
    FileSystems.rename([temp_path], [path])


def write_text(path: str, text: str) -> None:
    """Writes ``text`` as UTF-8 to ``path`` through a temporary name and a rename."""
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
    """Writes ``obj`` as JSON (sorted keys, indent 2, trailing newline) to ``path``."""
    write_text(path, json.dumps(obj, sort_keys=True, indent=2) + "\n")


def _contents(path: str) -> list[str]:
    """Top-level entries (local) or every object under the prefix (object stores)."""
    if _is_local(path):
        if not os.path.isdir(path):
            if os.path.exists(path):
                raise InputError(f"output path {path} exists and is not a folder")
            return []
        return sorted(os.path.join(path, name) for name in os.listdir(path))
    return match(join(path, "**"))


def list_contents(path: str) -> list[str]:
    """What :func:`prepare_output_dir` would delete: the top-level entries of a local folder
    (files and folders), every object under the prefix on an object store; ``[]`` if none."""
    return _contents(path)


def prepare_output_dir(path: str, overwrite: bool) -> None:
    """Makes ``path`` an empty folder ready for one run's outputs.

    Raises:
      InputError: ``path`` holds files and ``overwrite`` is False (the message names
        ``--overwrite``).
    """
    contents = _contents(path)
    if contents and not overwrite:
        raise InputError(
            f"output folder {path} is not empty ({len(contents)} entries); choose a new folder "
            "or pass --overwrite to delete its contents"
        )
    if contents:
        FileSystems.delete(contents)
    if _is_local(path) and not os.path.isdir(path):
        FileSystems.mkdirs(path)


def write_success_marker(directory: str) -> None:
    """Writes ``directory/_SUCCESS``; call it after every other output is complete."""
    write_text(join(directory, SUCCESS_MARKER), "")


def has_success_marker(directory: str) -> bool:
    """True if ``directory`` holds a ``_SUCCESS`` marker (its run finished)."""
    return exists(join(directory, SUCCESS_MARKER))
