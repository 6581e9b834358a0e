"""The reference embeddings on disk for ``landmarks-query``: built once from the cache's
embedding records, searched a block at a time, so the query never holds every embedding in RAM
(GLDv2's 4.1M x 512 float32 would be 8.4 GB).

Layout (``<cache>/embeddings/index/``, beside the records it is made from)::

    vectors.f16    float16 [N, D], row-major, little-endian, no header: the embeddings, rows
                   sorted by reference id, each id once (as the prediction job's shards)
    ids.npy        bytes [N] (UTF-8 ids), labels.npy int64 [N] (class indices, -1 non-landmark)
    sources.npy    int32 [N], offsets.npy int64 [N]: each row's record (file number in
                   index.json's source_files, byte offset), to read its exact float32 values
    index.json     version, rows, dims, dtype, embedding_sha256, source_files (paths and
                   sizes of the embedding records), max_row_norm, duplicate_ids
    _SUCCESS       written last

The index is rebuilt when ``_SUCCESS`` or ``index.json`` is missing, when the recorded model
SHA-256 or the record files (paths, sizes) differ, or when ``vectors.f16`` does not hold
``N x D`` values. It is built in ``index.tmp-<pid>/`` and renamed into place, so a crash leaves
no ``index/`` that looks complete. A cache folder the query cannot write to (or one on an
object store) gets its index in a local temporary folder for the session, deleted at exit.

Building streams the records: embeddings are written ``chunk_rows`` at a time to an unsorted
file, then copied in id order; what is held besides one chunk is ``N x (id bytes + 28)``
bytes (ids, labels, record positions, the sort order): ~190 MB at 4.1M references with 16-byte
ids; the [N, D] matrix is never in memory.

Searching (:meth:`EmbeddingIndex.search`) reads ``vectors.f16`` in blocks of ``block_rows``
rows into one reused buffer (plain reads, not a memory map: the pages the kernel caches are
its page cache, shared and reclaimable, not this process's memory) and runs
:func:`rescoring.blocked_search.two_stage_top_k`: the float16 scan finds the candidates, whose
exact float32 embeddings are then read back from their records (a few dozen reads) and ranked.
So the similarities and their order are the float32 ones the prediction job computes, not
float16 approximations. Memory per search: ``block_rows x D x 6`` bytes (the float16 block and
its float32 copy: 48 MB at 16,384 x 512), independent of N.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import shutil
import tempfile
from typing import Optional

import numpy as np

from beam_pipelines import io_utils
from beam_pipelines.predict import reference_cache
from beam_pipelines.query import records
from rescoring import blocked_search

_LOG = logging.getLogger(__name__)

INDEX_DIRNAME = "index"
VECTORS_FILENAME = "vectors.f16"
INFO_FILENAME = "index.json"
ARRAY_FILENAMES = {"ids": "ids.npy", "labels": "labels.npy", "sources": "sources.npy",
                   "offsets": "offsets.npy"}
INDEX_VERSION = 1
STORED_DTYPE = np.dtype("<f2")
DEFAULT_CHUNK_ROWS = 8192
"""Rows per write while building (8192 x 512 float16: 8 MB)."""
DEFAULT_BLOCK_ROWS = 16384
"""Rows per read while searching: 16 MB of float16 and 32 MB of float32 at D = 512."""


class EmbeddingIndexError(ValueError):
    """The embedding records cannot be indexed (mixed lengths, values beyond float16)."""


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
    sources: list = dataclasses.field(default_factory=list)
    offsets: list = dataclasses.field(default_factory=list)

    def add(self, ids, labels, sources, offsets) -> None:
        self.ids.append(np.array(ids, dtype=bytes))
        self.labels.append(np.array(labels, np.int64))
        self.sources.append(np.array(sources, np.int32))
        self.offsets.append(np.array(offsets, np.int64))

    def arrays(self) -> dict:
        return {name: np.concatenate(chunks) if chunks else np.zeros([0], dtype)
                for name, chunks, dtype in (("ids", self.ids, "S1"),
                                            ("labels", self.labels, np.int64),
                                            ("sources", self.sources, np.int32),
                                            ("offsets", self.offsets, np.int64))}


def _write(wanted: dict, directory: str, embedding_sha256: str, chunk_rows: int) -> dict:
    unsorted_path = os.path.join(directory, "unsorted.f16")
    columns = _Columns()
    pending: list = []  # (id, label, source, offset, embedding) of the current chunk
    dims, rows, max_norm = None, 0, 0.0
    with open(unsorted_path, "wb") as unsorted:
        def flush():
            nonlocal max_norm
            matrix = np.stack([item[4] for item in pending])
            max_norm = max(max_norm, float(np.linalg.norm(matrix, axis=1).max()))
            stored = matrix.astype(STORED_DTYPE)
            if not np.all(np.isfinite(stored)):
                raise EmbeddingIndexError("reference embeddings hold values beyond float16's range "
                                  "(65504); they are meant to be unit vectors")
            unsorted.write(stored.tobytes())
            columns.add(*zip(*[(item[0].encode("utf-8"), item[1], item[2], item[3])
                               for item in pending]))
            pending.clear()

        for source, (path, _) in enumerate(wanted["source_files"]):
            for offset, payload in records.iter_records(path):
                reference = reference_cache.parse_embedding(payload, embedding_sha256)
                values = np.asarray(reference.embedding, np.float32).reshape(-1)
                if dims is None:
                    dims = values.size
                if values.size != dims:
                    raise EmbeddingIndexError(f"reference embedding {reference.image_id!r} has "
                                      f"{values.size} values, the others {dims}")
                pending.append((reference.image_id, reference.label, source, offset, values))
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
        source = np.memmap(unsorted_path, STORED_DTYPE, "r", shape=(rows, dims))
        with open(os.path.join(directory, VECTORS_FILENAME), "wb") as vectors:
            for start in range(0, len(order), chunk_rows):
                vectors.write(np.ascontiguousarray(source[order[start: start + chunk_rows]])
                              .tobytes())
        del source
    os.remove(unsorted_path)
    for name, filename in ARRAY_FILENAMES.items():
        np.save(os.path.join(directory, filename), arrays[name][order], allow_pickle=False)
    info = dict(wanted, rows=int(len(order)), dims=int(dims or 0),
                max_row_norm=max_norm, duplicate_ids=int(rows - len(order)))
    with open(os.path.join(directory, INFO_FILENAME), "w") as handle:
        json.dump(info, handle)
    io_utils.write_success_marker(directory)
    return info


class EmbeddingIndex:
    """An index folder opened for search (see the module docstring).

    ``ids`` (bytes), ``labels``, ``sources`` and ``offsets`` are memory-mapped ``[N]`` arrays:
    a search reads k of them.
    """

    def __init__(self, directory: str, block_rows: int = DEFAULT_BLOCK_ROWS):
        self.directory = directory
        with open(os.path.join(directory, INFO_FILENAME)) as handle:
            self.info = json.load(handle)
        self.rows, self.dims = int(self.info["rows"]), int(self.info["dims"])
        self.block_rows = int(block_rows)
        arrays = {name: np.load(os.path.join(directory, filename), mmap_mode="r",
                                allow_pickle=False)
                  for name, filename in ARRAY_FILENAMES.items()}
        self.ids, self.labels = arrays["ids"], arrays["labels"]
        self.sources, self.offsets = arrays["sources"], arrays["offsets"]

    @property
    def search_bytes(self) -> int:
        """Memory of one search's block: the float16 buffer and its float32 copy."""
        return min(self.block_rows, self.rows) * self.dims * (STORED_DTYPE.itemsize + 4)

    @property
    def disk_bytes(self) -> int:
        return sum(os.path.getsize(os.path.join(self.directory, name))
                   for name in [VECTORS_FILENAME, *ARRAY_FILENAMES.values()])

    def blocks(self):
        """``(start, float16 [b, D])`` of the stored rows, in order; the array is one buffer,
        overwritten by the next block."""
        buffer = np.empty([min(self.block_rows, self.rows), self.dims], STORED_DTYPE)
        with open(os.path.join(self.directory, VECTORS_FILENAME), "rb") as handle:
            for start in range(0, self.rows, self.block_rows):
                block = buffer[: min(self.block_rows, self.rows - start)]
                if handle.readinto(memoryview(block).cast("B")) != block.nbytes:
                    raise records.RecordFileError(
                        f"{self.directory}/{VECTORS_FILENAME} ends before row {start + len(block)}")
                yield start, block

    def exact_rows(self, positions) -> np.ndarray:
        """float32 ``[m, D]``: the embeddings of rows ``positions`` as their records hold them."""
        sha256 = self.info["embedding_sha256"]
        rows = np.zeros([len(positions), self.dims], np.float32)
        for row, position in enumerate(np.asarray(positions, np.int64)):
            path = self.info["source_files"][int(self.sources[position])][0]
            reference = reference_cache.parse_embedding(
                records.read_record_at(path, int(self.offsets[position])), sha256)
            if reference.image_id.encode("utf-8") != bytes(self.ids[position]):
                raise records.RecordFileError(
                    f"{path} at byte {int(self.offsets[position])} holds "
                    f"{reference.image_id!r}, the index expected {self.ids[position]!r}: the "
                    f"records changed since {self.directory} was built; delete it")
            rows[row] = reference.embedding
        return rows

    def search(self, query, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The k most similar references of one unit query ``[D]``, as the job's exact search
        ranks them (float32 similarity descending, then id ascending).

        Returns:
          ``(similarities float32 [k'], ids str [k'], labels int64 [k'])``, ``k' = min(k, N)``.
        """
        query = np.asarray(query, np.float32).reshape(-1)
        if query.size != self.dims:
            raise ValueError(f"the query has {query.size} values, the index {self.dims}")
        bound = blocked_search.float16_error_bound(query, self.dims, self.info["max_row_norm"])
        similarities, positions = blocked_search.two_stage_top_k(
            query, lambda width: blocked_search.blocked_top_k(query, self.blocks(), width),
            self.exact_rows, k, self.rows, bound)
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
    _LOG.info("query: reference index %s: %d rows x %d float16 (%.1f MB), %d duplicate ids "
              "kept once", index_dir, info["rows"], info["dims"],
              info["rows"] * info["dims"] * STORED_DTYPE.itemsize / 1e6, info["duplicate_ids"])


def _is_local(path: str) -> bool:
    from apache_beam.io.filesystems import FileSystems

    return FileSystems.get_scheme(path) is None
