"""GLDv2's retrieval task in the prediction job: ``--retrieval_index GLOB`` -> ``retrieval.csv``.

With a retrieval recognizer (``--recognizer knn`` or ``knn+classifier``), job B already embeds
every test image (``steps.Embed``). With ``--retrieval_index`` (records ingested from GLDv2's
index archives, unlabelled), those same test embeddings also query the index::

    --retrieval_index records -> ParseRecord -> DecodeRecord -> steps.EmbedReferences
        -> steps.ShardIndex -> (key, shard) --+
    test embeddings (steps.Embed) ------------+--> steps.Retrieve(k = 100) -> (test id, Neighbours)
        -> retrieval.csv: ``id,images``, the 100 nearest index ids, nearest first (cosine
           similarity of the unit embeddings; ties by id, as ``rescoring.retrieval.merge_top_k``)

The index is embedded like the kNN references (the whole image as its only view) and searched
by the same sharded exact top-k (or FAISS with ``--ann faiss``): a worker holds one shard of at
most ``--index_shard_size`` embeddings and one batch of test embeddings. A test image that could
not be read gets a row with no image (scored 0 by ``landmarks-evaluate --retrieval``). The file
is written as a stream (no step holds all rows). The index embeddings are recomputed in every
run (they are not cached). Its own counts are in ``stats.json`` ``retrieval_task``
(:func:`write_stats`); the Beam counters of the shared steps (``retrieval.index_rows``,
``index_shards``, ``retrieval_pairs``, ``retrieval_queries``) then add up both searches, the
kNN recognizer's and this one.
"""

from __future__ import annotations

import json
import logging

import apache_beam as beam

from beam_pipelines import io_utils
from beam_pipelines.predict import knn, reference_cache, steps

_LOG = logging.getLogger(__name__)

RETRIEVAL_FILENAME = "retrieval.csv"
RETRIEVAL_COLUMNS = ("id", "images")
RETRIEVAL_K = 100
"""Index images listed per test image (GLDv2's retrieval task scores the first 100)."""
STATS_PART_FILENAME = ".retrieval_stats.json"
"""Written by :class:`RetrieveIndex`, folded into ``stats.json`` (``retrieval_task``)."""
RECORD_BYTES_ESTIMATE = 30_000
"""Bytes per index record assumed when no ingest ``stats.json`` gives the count (only the
number of hash buckets of the index depends on it, never the result)."""


def index_size_estimate(pattern: str) -> int:
    """Records matched by ``pattern``, for :func:`.knn.num_buckets`: the ingest's
    ``stats.json`` ``written`` of each folder when every folder has one, else the files' bytes
    over :data:`RECORD_BYTES_ESTIMATE`. A wrong estimate changes the shard count, not the
    neighbours (a bucket larger than a shard is cut into several shards)."""
    paths = io_utils.match(pattern)
    folders = sorted({path.rsplit("/", 1)[0] for path in paths})
    written = 0
    for folder in folders:
        stats_path = io_utils.join(folder, "stats.json")
        if not io_utils.exists(stats_path):
            written = -1
            break
        written += int(json.loads(io_utils.read_text(stats_path)).get("written", 0))
    if written >= 0:
        return written
    from apache_beam.io.filesystems import FileSystems

    sizes = FileSystems.match(paths)
    return sum(result.metadata_list[0].size_in_bytes for result in sizes) // RECORD_BYTES_ESTIMATE


def csv_line(keyed) -> str:
    """``(test id, Neighbours)`` -> ``id,<ids nearest first, space-separated>``."""
    test_id, neighbours = keyed
    return f"{test_id},{' '.join(neighbours.ids)}"


def unreadable_line(unreadable) -> str:
    """A test image that could not be read: its row, without images."""
    return f"{unreadable.image_id},"


def write_stats(index_images: int, queries: int, rows: int, output_dir: str) -> None:
    io_utils.write_json(io_utils.join(output_dir, STATS_PART_FILENAME),
                        {"index_images": int(index_images), "queries": int(queries),
                         "rows": int(rows), "k": RETRIEVAL_K})


def read_stats(output_dir: str) -> dict:
    """:data:`STATS_PART_FILENAME`'s counts (the file is removed)."""
    from apache_beam.io.filesystems import FileSystems

    path = io_utils.join(output_dir, STATS_PART_FILENAME)
    stats = json.loads(io_utils.read_text(path))
    FileSystems.delete([path])
    return stats


def problem(stats: dict, pattern: str):
    """Why the retrieval task did not do its work (None if it did)."""
    if not stats.get("index_images"):
        return (f"no index image embedded: the records of --retrieval_index {pattern} hold no "
                "readable image")
    return None


class RetrieveIndex(beam.PTransform):
    """``{"queries": (test id, unit embedding [D]), "unreadable": Unreadable}`` -> writes
    :data:`RETRIEVAL_FILENAME` and the counts (:data:`STATS_PART_FILENAME`) to ``output_dir``
    (see the module docstring)."""

    def __init__(self, index_pattern: str, embedding_path: str, image_size: int,
                 batch_images: int, shard_size: int, approximate: bool, output_dir: str):
        super().__init__()
        self._pattern = index_pattern
        self._embedding_path = embedding_path
        self._image_size = image_size
        self._batch_images = batch_images
        self._shard_size = shard_size
        self._approximate = approximate
        self._output_dir = output_dir

    def expand(self, inputs):
        pipeline = inputs["queries"].pipeline
        buckets = knn.num_buckets(index_size_estimate(self._pattern), self._shard_size)
        embedded = (
            pipeline
            | "ReadIndex" >> beam.io.ReadFromTFRecord(self._pattern)
            | "ParseIndex" >> beam.ParDo(reference_cache.ParseRecord())
            | "DecodeIndex" >> beam.ParDo(reference_cache.DecodeRecord())
            | "EmbedIndex" >> steps.EmbedReferences(
                self._embedding_path, self._image_size, self._batch_images)
        )
        shards = embedded | "ShardIndex" >> steps.ShardIndex(self._shard_size, buckets)
        neighbours = (
            {"queries": inputs["queries"], "index": shards}
            | "Retrieve" >> steps.Retrieve(RETRIEVAL_K, approximate=self._approximate)
        )
        lines = (
            (neighbours | "RetrievedLines" >> beam.Map(csv_line),
             inputs["unreadable"] | "UnreadableLines" >> beam.Map(unreadable_line))
            | "AllLines" >> beam.Flatten()
        )
        _ = lines | "WriteRetrieval" >> beam.io.WriteToText(
            io_utils.join(self._output_dir, RETRIEVAL_FILENAME[: -len(".csv")]),
            file_name_suffix=".csv", shard_name_template="", num_shards=1,
            header=",".join(RETRIEVAL_COLUMNS))

        def count(pcoll, name):
            return pcoll | name >> beam.combiners.Count.Globally()

        _ = (
            count(embedded, "CountIndexImages")
            | "WriteRetrievalStats" >> beam.Map(
                write_stats, beam.pvalue.AsSingleton(count(neighbours, "CountQueries")),
                beam.pvalue.AsSingleton(count(lines, "CountRows")), self._output_dir)
        )
        return neighbours
