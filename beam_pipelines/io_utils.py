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
from trainer.cli import ResourceUnreachable, check_reachable

SUCCESS_MARKER = "_SUCCESS"


def _is_local(path: str) -> bool:
    return FileSystems.get_scheme(path) is None


def join(base: str, *names: str) -> str:
    """Joins path components in the style of ``base``'s file system (``/`` for ``gs://``)."""
    return FileSystems.join(base, *names)


def exists(path: str) -> bool:
    """True if ``path`` names an existing file (or, locally, a folder)."""
    return FileSystems.exists(path)


def storage_cause(error: BaseException) -> BaseException:
    """The storage back-end's own exception inside Beam's (nested) ``BeamIOError``s."""
    seen = set()
    while isinstance(error, BeamIOError) and id(error) not in seen:
        seen.add(id(error))
        details = getattr(error, "exception_details", None) or {}
        inner = [value for value in details.values() if isinstance(value, BaseException)]
        if not inner:
            break
        error = inner[0]
    return error


_UNREACHABLE_WORDS = ("timeout", "timed out", "connection refused", "connection reset",
                      "connection aborted", "name or service not known", "failed to resolve",
                      "temporary failure in name resolution", "max retries exceeded",
                      "network is unreachable", "no route to host", "service unavailable")


def is_unreachable(error: BaseException) -> bool:
    """True when a storage error says the service could not be reached (network, DNS, timeout,
    503), not that it answered no (missing bucket, permission denied)."""
    cause = storage_cause(error)
    if isinstance(cause, (ConnectionError, TimeoutError)):
        return True
    text = f"{type(cause).__name__} {cause}".lower()
    return "retryerror" in text or any(word in text for word in _UNREACHABLE_WORDS)


def storage_failure(path: str, error: BaseException, action: str = "list") -> Exception:
    """The error to raise for a failed listing or read of ``path``: one line with the path and
    the storage service's own message; :class:`~trainer.cli.ResourceUnreachable` when the
    service could not be reached, else ``InputError`` (a missing bucket, no permission: the
    user must fix the path or its access; not "no files")."""
    cause = storage_cause(error)
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    message = f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    if is_unreachable(error):
        return ResourceUnreachable(f"cannot {action} {path}: the storage service could not be "
                                   f"reached ({message})")
    return InputError(f"cannot {action} {path}: {message}")


def _listing(pattern: str) -> list:
    """Beam's metadata of the files matching ``pattern``, with the listing's failures turned
    into the project's errors (see :func:`match`)."""
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except BeamIOError as error:
        raise storage_failure(pattern, error) from error


def match(pattern: str) -> list[str]:
    """Sorted paths of the files matching ``pattern`` (``*``, ``?``, ``**``); ``[]`` if none.

    Raises:
      InputError: the listing failed (a missing bucket, permission denied): the message names
        ``pattern`` and carries the storage service's own message.
      ResourceUnreachable: the storage service could not be reached.
    """
    return [path for path, _ in match_with_sizes(pattern)]


def match_with_sizes(pattern: str) -> list[tuple[str, int]]:
    """:func:`match` with each file's size in bytes, from the same listing: ``[(path, size)]``
    sorted by path (raises as :func:`match`)."""
    return sorted((metadata.path, metadata.size_in_bytes) for metadata in _listing(pattern))


def file_size(path: str) -> int:
    """The size of the file ``path`` in bytes (local or remote).

    Raises:
      InputError: no such file, or the listing failed; ResourceUnreachable: the storage
        service could not be reached.
    """
    files = _listing(path)
    if not files:
        raise InputError(f"not found: {path}")
    return files[0].size_in_bytes


def check_access(paths: dict) -> None:
    """Checks, before a job builds its pipeline, that it can reach its inputs and outputs.

    For each remote path (``flag -> path``; empty and local ones are skipped): the storage
    endpoint must accept a connection (:func:`trainer.cli.check_reachable`, seconds instead of
    the clients' two minutes of retries), and for ``gs://`` its bucket must be listable (a
    missing bucket or a permission error is one line with the service's message, exit 2).

    Raises:
      ResourceUnreachable: an endpoint that does not answer.
      InputError: a bucket that cannot be listed.
    """
    check_reachable(paths)
    buckets = {}
    for flag, path in paths.items():
        if path and str(path).startswith("gs://"):
            bucket = str(path)[len("gs://"):].split("/", 1)[0]
            buckets.setdefault(bucket, (flag, path))
    for bucket, (flag, path) in buckets.items():
        probe = f"gs://{bucket}/.landmarks-access-check-*"
        try:
            FileSystems.match([probe])
        except BeamIOError as error:
            failure = storage_failure(f"gs://{bucket}", error, action="list the bucket")
            raise type(failure)(f"{flag} {path}: {failure}") from error


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
