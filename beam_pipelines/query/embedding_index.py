"""The reference embeddings on disk for ``landmarks-query``: built once from the cache's
embedding records, searched a block at a time, so the query never holds every embedding in RAM
(GLDv2's 4.1M x 512 float32 would be 8.4 GB).

Layout (``<cache>/embeddings/index/``, beside the records it is made from)::

    vectors.f32    float32 [N, D], row-major, little-endian, no header: the embeddings, rows
                   sorted by reference id, each id once (as the prediction job's shards)
    ids.npy        bytes [N] (UTF-8 ids); labels.npy int64 [N] (class indices, -1 non-landmark)
    index.json     version, rows, dims, dtype, embedding_sha256, source_files (paths and
                   sizes of the embedding records), duplicate_ids
    _SUCCESS       written last

The index is rebuilt when ``_SUCCESS`` or ``index.json`` is missing, when the recorded model
SHA-256 or the record files (paths, sizes) differ, or when ``vectors.f32`` does not hold
``N x D`` values. It is built in ``index.tmp-<pid>/`` and renamed into place, so a crash leaves
no ``index/`` that looks complete. A cache folder the query cannot write to (or one on an
object store) gets its index in a local temporary folder for the session, deleted at exit.

Building streams the records: embeddings are written ``chunk_rows`` at a time to an unsorted
file, then copied in id order; what is held besides two chunks (32 MB at 8192 x 512) is per
row: the id (twice while sorting), the label and the sort order, about 60 bytes with 16-byte
ids, ~250 MB at 4.1M references; the [N, D] matrix is never in memory (200k x 512: 38 MB above
the process's baseline, ``bench/bench_query_index.py``).

Searching (:meth:`EmbeddingIndex.search`) memory-maps ``vectors.f32`` and runs
:func:`rescoring.blocked_search.blocked_top_k` over blocks of ``block_rows`` rows, releasing
each block's pages from the process (``MADV_DONTNEED``) before the next: they stay in the
kernel's page cache (shared, reclaimable; the next photo's search reads them from there when
they fit), but the process holds one block, ``block_rows x D x 4`` bytes (32 MB at
16,384 x 512), independent of N. (Reading each block into a buffer instead costs a copy:
2.3x the in-memory search's CPU time at 200k rows, against 1.15x for the mapped blocks.) The
blocks start at multiples of ``rescoring.retrieval.DEFAULT_BLOCK_ROWS``, so the matrix
products, hence the similarities, are bit for bit those of ``exact_top_k`` over the whole
matrix in memory.

Why float32 on disk and not float16 (half the bytes): numpy converts float16 to float32 at
4.6-6.5 ns per value on this machine (TensorFlow's cast: 4.1), three to four times the float32
product itself (1.5 ns per value), so a float16 scan would be about 4x slower per photo; and
its similarities would differ from the job's by up to ``2**-11`` (measured on Gaussian unit
512-d rows: 5.6e-5; rows built to add the errors up: 1.8e-4), reordering near ties, so its
candidates would need re-scoring in float32 anyway (``bench/bench_query_index.py`` measures both).
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import mmap
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from beam_pipelines import io_utils
from beam_pipelines.predict import reference_cache
from beam_pipelines.query import records
from rescoring import blocked_search, retrieval

_LOG = logging.getLogger(__name__)

INDEX_DIRNAME = "index"
VECTORS_FILENAME = "vectors.f32"
INFO_FILENAME = "index.json"
ARRAY_FILENAMES = {"ids": "ids.npy", "labels": "labels.npy"}
INDEX_VERSION = 1
STORED_DTYPE = np.dtype("<f4")
DEFAULT_CHUNK_ROWS = 8192
"""Rows per write while building (8192 x 512 float32: 16 MB)."""
DEFAULT_BLOCK_ROWS = 2 * retrieval.DEFAULT_BLOCK_ROWS
"""Rows per read while searching: 16,384 (32 MB at D = 512); a multiple of exact_top_k's
block, so the products are those of a search of the whole matrix."""


class EmbeddingIndexError(ValueError):
    """The embedding records cannot be indexed (mixed lengths, non-finite values)."""


def wanted_info(embedding_dir: str, embedding_sha256: str) -> dict:
    """What an index of ``embedding_dir``'s records must record to be reused."""
    return {"version": INDEX_VERSION, "dtype": STORED_DTYPE.str,
            "embedding_sha256": embedding_sha256,
            "source_files": reference_cache.file_fingerprint(
                reference_cache.embeddings_pattern(embedding_dir))}


def is_fresh(index_dir: str, wanted: dict) -> tuple[bool, str]:
    """``(fresh, reason)``: a complete index recording ``wanted``."""
    info_path = os.path.join(index_dir, INFO_FILENAME)
    if not os.path.exists(os.path.join(index_dir, io_utils.SUCCESS_MARKER)):
        return False, f"no complete index in {index_dir}"
    try:
        with open(info_path) as handle:
            info = json.load(handle)
    except (OSError, ValueError) as error:
        return False, f"{info_path} is unreadable ({error})"
    differing = sorted(key for key, value in wanted.items() if info.get(key) != value)
    if differing:
        return False, f"recorded {', '.join(differing)} differ"
    expected = int(info["rows"]) * int(info["dims"]) * STORED_DTYPE.itemsize
    vectors = os.path.join(index_dir, VECTORS_FILENAME)
    if not os.path.exists(vectors) or os.path.getsize(vectors) != expected:
        return False, f"{vectors} does not hold {info['rows']} x {info['dims']} values"
    if not all(os.path.exists(os.path.join(index_dir, name))
               for name in ARRAY_FILENAMES.values()):
        return False, f"{index_dir} misses an array"
    return True, "index matches the embedding records"


def build(embedding_dir: str, index_dir: str, embedding_sha256: str,
          chunk_rows: int = DEFAULT_CHUNK_ROWS) -> dict:
    """Streams ``embedding_dir``'s records into an index at ``index_dir`` (replaced); returns
    its ``index.json``. Raises ``SchemaError`` for a record of another model (as the job)."""
    wanted = wanted_info(embedding_dir, embedding_sha256)
    if not wanted["source_files"]:
        raise FileNotFoundError(f"no embedding records in {embedding_dir}")
    parent = os.path.dirname(os.path.abspath(index_dir))
    temporary = os.path.join(parent, f"{os.path.basename(index_dir)}.tmp-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    os.makedirs(temporary)
    try:
        info = _write(wanted, temporary, embedding_sha256, int(chunk_rows))
        shutil.rmtree(index_dir, ignore_errors=True)
        os.rename(temporary, index_dir)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return info


@dataclasses.dataclass
class _Columns:
    """Per-row values gathered while streaming, one numpy array per chunk."""

    ids: list = dataclasses.field(default_factory=list)
    labels: list = dataclasses.field(default_factory=list)

    def add(self, ids, labels) -> None:
        self.ids.append(np.array(ids, dtype=bytes))
        self.labels.append(np.array(labels, np.int64))

    def arrays(self) -> dict:
        return {name: np.concatenate(chunks) if chunks else np.zeros([0], dtype)
                for name, chunks, dtype in (("ids", self.ids, "S1"),
                                            ("labels", self.labels, np.int64))}


def _write(wanted: dict, directory: str, embedding_sha256: str, chunk_rows: int) -> dict:
    unsorted_path = os.path.join(directory, "unsorted.f32")
    columns = _Columns()
    pending: list = []  # (id, label, embedding) of the current chunk
    dims, rows = None, 0
    with open(unsorted_path, "wb") as unsorted:
        def flush():
            stored = np.stack([item[2] for item in pending]).astype(STORED_DTYPE)
            if not np.all(np.isfinite(stored)):
                raise EmbeddingIndexError("reference embeddings hold NaN or infinity")
            unsorted.write(stored.tobytes())
            columns.add(*zip(*[(item[0].encode("utf-8"), item[1]) for item in pending]))
            pending.clear()

        for path, _ in wanted["source_files"]:
            for _, payload in records.iter_records(path):
                reference = reference_cache.parse_embedding(payload, embedding_sha256)
                values = np.asarray(reference.embedding, np.float32).reshape(-1)
                if dims is None:
                    dims = values.size
                if values.size != dims:
                    raise EmbeddingIndexError(
                        f"reference embedding {reference.image_id!r} has {values.size} "
                        f"values, the others {dims}")
                pending.append((reference.image_id, reference.label, values))
                rows += 1
                if len(pending) == chunk_rows:
                    flush()
        if pending:
            flush()
    arrays = columns.arrays()
    # Rows in id order, each id once (its first record), as the job's shards (make_shard).
    order = np.argsort(arrays["ids"], kind="stable")
    sorted_ids = arrays["ids"][order]
    first = np.ones(len(order), bool)
    first[1:] = sorted_ids[1:] != sorted_ids[:-1]
    order = order[first]
    if rows:
        _copy_rows(unsorted_path, os.path.join(directory, VECTORS_FILENAME), order,
                   dims * STORED_DTYPE.itemsize, chunk_rows)
    os.remove(unsorted_path)
    for name, filename in ARRAY_FILENAMES.items():
        np.save(os.path.join(directory, filename), arrays[name][order], allow_pickle=False)
    info = dict(wanted, rows=int(len(order)), dims=int(dims or 0),
                duplicate_ids=int(rows - len(order)))
    with open(os.path.join(directory, INFO_FILENAME), "w") as handle:
        json.dump(info, handle)
    io_utils.write_success_marker(directory)
    return info


def _copy_rows(source_path: str, target_path: str, order: np.ndarray, row_bytes: int,
               chunk_rows: int) -> None:
    """Writes rows ``order`` of ``source_path`` to ``target_path``, ``chunk_rows`` at a time.

    Row by row with ``os.pread`` into one chunk buffer: a memory map would count every page it
    touched as this process's memory (the whole matrix by the end)."""
    buffer = bytearray(min(chunk_rows, len(order)) * row_bytes)
    view = memoryview(buffer)
    source = os.open(source_path, os.O_RDONLY)
    try:
        with open(target_path, "wb") as target:
            for start in range(0, len(order), chunk_rows):
                chunk = order[start: start + chunk_rows]
                for slot, row in enumerate(chunk.tolist()):
                    data = os.pread(source, row_bytes, row * row_bytes)
                    if len(data) != row_bytes:
                        raise OSError(f"{source_path} ends before row {row}")
                    view[slot * row_bytes: (slot + 1) * row_bytes] = data
                target.write(view[: len(chunk) * row_bytes])
    finally:
        os.close(source)


class EmbeddingIndex:
    """An index folder opened for search (see the module docstring); ``ids`` (bytes) and
    ``labels`` are memory-mapped ``[N]`` arrays, of which a search reads k entries."""

    def __init__(self, directory: str, block_rows: int = DEFAULT_BLOCK_ROWS):
        self.directory = directory
        with open(os.path.join(directory, INFO_FILENAME)) as handle:
            self.info = json.load(handle)
        self.rows, self.dims = int(self.info["rows"]), int(self.info["dims"])
        self.block_rows = int(block_rows)
        self.ids, self.labels = (np.load(os.path.join(directory, ARRAY_FILENAMES[name]),
                                         mmap_mode="r", allow_pickle=False)
                                 for name in ("ids", "labels"))

    @property
    def search_bytes(self) -> int:
        """Resident memory of one search: one block of the mapped matrix."""
        return min(self.block_rows, self.rows) * self.dims * STORED_DTYPE.itemsize

    @property
    def disk_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.directory, name))
                   for name in [VECTORS_FILENAME, *ARRAY_FILENAMES.values()])

    def blocks(self):
        """``(start, float32 [b, D])`` of the stored rows, in order: read-only views of a memory
        map of ``vectors.f32``, each released (``MADV_DONTNEED``) once the next is asked for."""
        if self.rows == 0:
            return
        row_bytes = self.dims * STORED_DTYPE.itemsize
        with open(os.path.join(self.directory, VECTORS_FILENAME), "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        if len(mapped) != self.rows * row_bytes:
            raise records.RecordFileError(
                f"{self.directory}/{VECTORS_FILENAME} holds {len(mapped)} bytes, not "
                f"{self.rows} x {self.dims} float32")
        for start in range(0, self.rows, self.block_rows):
            count = min(self.block_rows, self.rows - start)
            yield start, np.frombuffer(mapped, STORED_DTYPE, count * self.dims,
                                       start * row_bytes).reshape(count, self.dims)
            _release(mapped, start * row_bytes, count * row_bytes)
        # The mapping closes when the last view is gone (closing it under a view would fail).


    def search(self, query, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k most similar references of one query ``[D]``, ranked as the job's exact
        search: similarity descending, then id ascending.

        Returns:
          ``(similarities float32 [k'], ids str [k'], labels int64 [k'])``, ``k' = min(k, N)``.
        """
        query = np.asarray(query, np.float32).reshape(-1)
        if query.size != self.dims:
            raise ValueError(f"the query has {query.size} values, the index {self.dims}")
        similarities, positions = blocked_search.blocked_top_k(query, self.blocks(), k)
        ids = np.array([bytes(self.ids[p]).decode("utf-8") for p in positions], dtype=str)
        return similarities, ids, np.asarray(self.labels[positions], np.int64)


def open_index(embedding_dir: str, embedding_sha256: str,
               block_rows: int = DEFAULT_BLOCK_ROWS,
               chunk_rows: int = DEFAULT_CHUNK_ROWS) -> EmbeddingIndex:
    """The index of a cache's ``embeddings/`` part: reused when fresh, else built (in the cache
    folder when it is local and writable, else in a temporary folder for this process)."""
    wanted = wanted_info(embedding_dir, embedding_sha256)
    index_dir: Optional[str] = None
    if _is_local(embedding_dir):
        index_dir = os.path.join(embedding_dir, INDEX_DIRNAME)
        fresh, reason = is_fresh(index_dir, wanted)
        if fresh:
            return EmbeddingIndex(index_dir, block_rows)
        _LOG.info("query: indexing the reference embeddings into %s (%s; once)", index_dir,
                  reason)
        try:
            _log_built(build(embedding_dir, index_dir, embedding_sha256, chunk_rows), index_dir)
            return EmbeddingIndex(index_dir, block_rows)
        except OSError as error:
            _LOG.warning("cannot write the reference index into %s (%s); building it in a "
                         "temporary folder for this session", index_dir, error)
    else:
        _LOG.info("query: the reference cache %s is not local; its embedding index is built "
                  "in a temporary folder for this session", embedding_dir)
    scratch = tempfile.mkdtemp(prefix="landmarks-query-index-")
    atexit.register(shutil.rmtree, scratch, True)
    index_dir = os.path.join(scratch, INDEX_DIRNAME)
    _log_built(build(embedding_dir, index_dir, embedding_sha256, chunk_rows), index_dir)
    return EmbeddingIndex(index_dir, block_rows)


def _log_built(info: dict, index_dir: str) -> None:
    _LOG.info("query: reference index %s: %d rows x %d float32 (%.1f MB), %d duplicate ids "
              "kept once", index_dir, info["rows"], info["dims"],
              info["rows"] * info["dims"] * STORED_DTYPE.itemsize / 1e6, info["duplicate_ids"])


def _release(mapped: mmap.mmap, offset: int, length: int) -> None:
    """Drops the pages of ``[offset, offset + length)`` from this process's resident set.

    A mapped file's pages count as the process's memory once touched, up to the whole file; for
    a read-only file mapping MADV_DONTNEED only unmaps them (they stay in the kernel's page
    cache and are read back on the next touch), so at most one block stays resident."""
    if hasattr(mmap, "MADV_DONTNEED"):
        aligned = offset - offset % mmap.PAGESIZE
        mapped.madvise(mmap.MADV_DONTNEED, aligned, length + offset - aligned)


def _is_local(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.get_scheme(path) is None
