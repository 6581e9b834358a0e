"""landmarks-query's on-disk reference index (beam_pipelines/query/embedding_index.py), built
from real embedding TFRecords: streamed, id-sorted with each id once, its search equal to the
old in-memory search, and rebuilt when stale or partial."""

import json
import logging
import os
import tracemalloc

import numpy as np
import pytest
import tensorflow as tf

from beam_pipelines.predict import knn, reference_cache
from beam_pipelines.predict.elements import ReferenceEmbedding
from beam_pipelines.query import embedding_index
from rescoring import retrieval
from tfrecords_schema import SchemaError

SHA = "a" * 64


def write_records(directory, references, files=3, name="embeddings"):
    """``references`` round-robin into ``files`` embedding TFRecords (the cache's names)."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"{name}-{i:05d}-of-{files:05d}.tfrecord")
             for i in range(files)]
    writers = [tf.io.TFRecordWriter(path) for path in paths]
    for position, reference in enumerate(references):
        writers[position % files].write(reference_cache.serialize_embedding(reference, SHA))
    for writer in writers:
        writer.close()


def references_of(vectors, prefix="r", labels=None):
    return [ReferenceEmbedding(f"{prefix}{i:05d}", int(labels[i]) if labels is not None
                               else i % 7 - 1, vectors[i]) for i in range(len(vectors))]


def old_search(references, query, k):
    """The query's former search: every embedding in memory (make_shard), exact_top_k."""
    rows = {}
    for reference in references:
        rows.setdefault(reference.image_id, reference)
    shard = knn.make_shard(list(rows.values()))
    sims, positions = retrieval.exact_top_k(query[None], shard.vectors, k)
    return sims[0], shard.ids[positions[0]], shard.labels[positions[0]]


def test_streamed_build_sorts_by_id_keeps_each_id_once_and_searches_as_before(tmp_path):
    rng = np.random.default_rng(0)
    dims = 256
    vectors = retrieval.l2_normalise(rng.standard_normal((600, dims), dtype=np.float32))
    references = references_of(vectors)
    references = references[::-1] + [references[10], references[20]]  # two ids twice
    embeddings = str(tmp_path / "embeddings")
    write_records(embeddings, references)
    tracemalloc.start()
    info = embedding_index.build(embeddings, os.path.join(embeddings, "index"), SHA,
                                 chunk_rows=16)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # Streamed: numpy's allocations (traced) stay well below the [N, D] float32 matrix.
    assert peak < vectors.nbytes / 4, (peak, vectors.nbytes)
    assert info["rows"] == 600 and info["dims"] == dims and info["duplicate_ids"] == 2
    index = embedding_index.EmbeddingIndex(os.path.join(embeddings, "index"))
    assert [bytes(i).decode() for i in index.ids] == [f"r{i:05d}" for i in range(600)]
    stored = np.fromfile(os.path.join(embeddings, "index", "vectors.f32"), np.float32)
    np.testing.assert_array_equal(stored.reshape(600, dims), vectors)
    np.testing.assert_array_equal(index.labels, np.arange(600) % 7 - 1)
    small_blocks = embedding_index.EmbeddingIndex(os.path.join(embeddings, "index"), 50)
    for query in [vectors[7], *retrieval.l2_normalise(rng.standard_normal((5, dims),
                                                                           dtype=np.float32))]:
        for k in (1, 10, 700):
            want_sims, want_ids, want_labels = old_search(references, query, k)
            sims, ids, labels = index.search(query, k)
            assert list(ids) == list(want_ids)
            np.testing.assert_array_equal(labels, want_labels)
            np.testing.assert_array_equal(sims, want_sims)  # the same products, same bits
            sims, ids, labels = small_blocks.search(query, k)
            assert list(ids) == list(want_ids)
            # Other products (50-row blocks): BLAS may sum in a shape-dependent order, within
            # float32 summation's bound for unit rows, gamma_D = D u / (1 - D u).
            gamma = dims * 2.0 ** -24 / (1 - dims * 2.0 ** -24)
            np.testing.assert_allclose(sims, want_sims, rtol=0, atol=2 * gamma)


def test_ties_rank_by_id_as_the_job(tmp_path):
    # Equal rows under shuffled ids: the order among equal similarities is id order.
    vectors = np.tile(np.array([[0.6, 0.8, 0.0, 0.0]], np.float32), (40, 1))
    vectors[::3] = [0.0, 0.0, 1.0, 0.0]
    rng = np.random.default_rng(1)
    references = [references_of(vectors)[i] for i in rng.permutation(40)]
    embeddings = str(tmp_path / "embeddings")
    write_records(embeddings, references, files=2)
    index = embedding_index.open_index(embeddings, SHA, block_rows=7)
    sims, ids, _ = index.search(np.array([0.6, 0.8, 0.0, 0.0], np.float32), 12)
    want_sims, want_ids, _ = old_search(references, np.array([0.6, 0.8, 0, 0], np.float32), 12)
    assert list(ids) == list(want_ids) == sorted(ids)
    np.testing.assert_array_equal(sims, want_sims)


def test_stale_or_partial_indexes_are_rebuilt(tmp_path, caplog):
    rng = np.random.default_rng(2)
    vectors = retrieval.l2_normalise(rng.standard_normal((60, 8), dtype=np.float32))
    embeddings = str(tmp_path / "embeddings")
    index_dir = os.path.join(embeddings, "index")
    write_records(embeddings, references_of(vectors[:50]), files=2)
    caplog.set_level(logging.INFO, logger=embedding_index.__name__)

    def open_and_count_builds():
        caplog.clear()
        index = embedding_index.open_index(embeddings, SHA)
        return index, sum("indexing the reference embeddings" in r.message
                          for r in caplog.records)

    index, builds = open_and_count_builds()
    assert builds == 1 and index.rows == 50
    assert open_and_count_builds()[1] == 0  # fresh: reused
    os.remove(os.path.join(index_dir, "_SUCCESS"))  # a build that stopped before its marker
    assert open_and_count_builds()[1] == 1
    with open(os.path.join(index_dir, "vectors.f32"), "r+b") as handle:
        handle.truncate(100)  # a damaged matrix
    index, builds = open_and_count_builds()
    assert builds == 1 and os.path.getsize(os.path.join(index_dir, "vectors.f32")) == 50 * 8 * 4
    # New records (the embeddings were recomputed with more references): rebuilt, searched.
    write_records(embeddings, references_of(vectors), files=2)
    index, builds = open_and_count_builds()
    assert builds == 1 and index.rows == 60
    assert index.search(vectors[55], 1)[1][0] == "r00055"
    # Another embedding model's index: rebuilt, and its records are refused as the job does.
    with open(os.path.join(index_dir, "index.json")) as handle:
        info = json.load(handle)
    assert embedding_index.is_fresh(index_dir, embedding_index.wanted_info(embeddings, SHA))[0]
    assert not embedding_index.is_fresh(
        index_dir, embedding_index.wanted_info(embeddings, "b" * 64))[0]
    with pytest.raises(SchemaError, match="made by the embedding model"):
        embedding_index.open_index(embeddings, "b" * 64)
    assert info["rows"] == 60 and not any(
        name.startswith("index.tmp") for name in os.listdir(embeddings))  # nothing left over


def test_an_unwritable_cache_gets_a_temporary_index(tmp_path):
    # The index cannot be written into the cache: here a file stands where its build folder
    # goes (a read-only folder would do, but these tests may run as root).
    vectors = retrieval.l2_normalise(np.eye(5, 8, dtype=np.float32) + 0.1)
    embeddings = str(tmp_path / "embeddings")
    write_records(embeddings, references_of(vectors), files=1)
    with open(os.path.join(embeddings, f"index.tmp-{os.getpid()}"), "w") as handle:
        handle.write("in the way")
    index = embedding_index.open_index(embeddings, SHA)
    assert not index.directory.startswith(embeddings)
    assert not os.path.exists(os.path.join(embeddings, "index"))
    assert index.search(vectors[3], 1)[1][0] == "r00003"
