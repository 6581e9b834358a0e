"""``landmarks-query``'s kNN memory: the on-disk reference index (searched a block at a time)
against loading every reference embedding into RAM (the former way), in the same run.

Data: ``--rows`` (default 200,000) synthetic 512-d unit embeddings (normalised Gaussian rows)
written as the reference cache's embedding TFRecords (``reference_cache.serialize_embedding``,
4 files). Each mode then runs in a fresh Python process, so its peak resident memory is its own
(``ru_maxrss``; the kernel's page cache is not part of it):

* ``build``: ``embedding_index.open_index`` on a cache without an index: the streamed build;
* ``index``: ``open_index`` on the built index and ``--queries`` searches (k = 10);
* ``in_memory``: the former ``_load_knn``: every record parsed into a dict, ``make_shard``
  (one float32 ``[N, D]`` matrix), then the same searches by ``exact_top_k``.

Reported per mode: RSS after the imports (TensorFlow loaded: the baseline), peak RSS, peak
minus baseline (what the index costs), wall seconds, and for the searches the CPU time per
query (user + system: reading the mapped pages is kernel work; CPU time, as the machine is
shared) and whether the answers (ids, similarities) equal the in-memory ones. Each mode's
process is pinned to one core with one BLAS thread.

Then the float16 alternative (half the disk), on one 16,384-row block of the same rows: the
time per value of converting float16 to float32 (numpy, TensorFlow) against the float32
product itself, and ``max |cos16 - cos32|`` of the queries against 50,000 rows, with rows built
so that every rounding error adds up (query signs following a row's errors). Usage::

    .venv/bin/python bench/bench_query_index.py [--rows 200000] [--queries 20]
        [--work_dir DIR] [--block_rows 16384]
"""

from __future__ import annotations

import os

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
              "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS"):
    os.environ[_name] = "1"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

SHA = "0" * 64
DIMS = 512
K = 10


def rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def chunk_vectors(number: int, chunk: int = 10000) -> np.ndarray:
    """Rows ``number * chunk ..`` of the synthetic index: normalised Gaussian, seeded per chunk."""
    from rescoring import retrieval

    return retrieval.l2_normalise(np.random.default_rng(1000 + number)
                                  .standard_normal((chunk, DIMS), dtype=np.float32))


def queries_of(count: int) -> np.ndarray:
    """Half near a reference of the first chunk (a clear neighbour), half random directions."""
    from rescoring import retrieval

    rng = np.random.default_rng(7)
    near = chunk_vectors(0)[rng.integers(0, 10000, count // 2)]
    near = retrieval.l2_normalise(near + 0.5 * retrieval.l2_normalise(
        rng.standard_normal(near.shape, dtype=np.float32)))
    far = retrieval.l2_normalise(rng.standard_normal((count - count // 2, DIMS),
                                                     dtype=np.float32))
    return np.concatenate([near, far])


def write_records(directory: str, rows: int, files: int = 4, chunk: int = 10000) -> None:
    import tensorflow as tf

    from beam_pipelines.predict import reference_cache
    from beam_pipelines.predict.elements import ReferenceEmbedding
    os.makedirs(directory, exist_ok=True)
    writers = [tf.io.TFRecordWriter(os.path.join(
        directory, f"embeddings-{i:05d}-of-{files:05d}.tfrecord")) for i in range(files)]
    for start in range(0, rows, chunk):
        block = chunk_vectors(start // chunk, chunk)
        for i in range(min(chunk, rows - start)):
            reference = ReferenceEmbedding(f"{start + i:08x}", (start + i) % 1000 - 1, block[i])
            writers[(start + i) % files].write(reference_cache.serialize_embedding(reference, SHA))
    for writer in writers:
        writer.close()


def child(mode: str, directory: str, rows: int, count: int, block_rows: int) -> dict:
    """One mode, in this (fresh) process; returns its figures."""
    import tensorflow as tf  # noqa: F401 - the baseline includes TensorFlow, as in the query

    from beam_pipelines import io_utils
    from beam_pipelines.predict import knn, reference_cache
    from beam_pipelines.query import embedding_index, records
    from rescoring import retrieval

    queries = queries_of(count)
    baseline = rss_mb()
    start = time.monotonic()
    answers = []
    search_seconds = 0.0
    if mode in ("build", "index"):
        index = embedding_index.open_index(directory, SHA, block_rows=block_rows)
        loaded = time.process_time()
        if mode == "index":
            for query in queries:
                sims, ids, _ = index.search(query, K)
                answers.append([list(ids), sims.tolist()])
        search_seconds = time.process_time() - loaded
        extra = {"disk_mb": index.disk_bytes / 2 ** 20, "block_mb": index.search_bytes / 2 ** 20}
    else:
        references = {}
        for path in sorted(io_utils.match(
                reference_cache.embeddings_pattern(directory))):
            for _, payload in records.iter_records(path):
                reference = reference_cache.parse_embedding(payload, SHA)
                references.setdefault(reference.image_id, reference)
        shard = knn.make_shard(list(references.values()))
        loaded = time.process_time()
        for query in queries:
            sims, positions = retrieval.exact_top_k(query[None], shard.vectors, K)
            answers.append([list(shard.ids[positions[0]]), sims[0].tolist()])
        search_seconds = time.process_time() - loaded
        extra = {}
    return dict(extra, mode=mode, baseline_mb=baseline, peak_mb=peak_mb(),
                seconds=time.monotonic() - start, search_seconds=search_seconds,
                answers=answers)


def run_child(mode: str, directory: str, args) -> dict:
    command = ["taskset", "-c", "0", sys.executable, os.path.abspath(__file__), "--child", mode,
               "--work_dir", directory, "--rows", str(args.rows), "--queries",
               str(args.queries), "--block_rows", str(args.block_rows)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--block_rows", type=int, default=16384)
    parser.add_argument("--work_dir", default="")
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work_dir, args.rows, args.queries,
                               args.block_rows)))
        return
    work = args.work_dir or tempfile.mkdtemp(prefix="bench-query-index-")
    directory = os.path.join(work, "embeddings")
    try:
        start = time.monotonic()
        shutil.rmtree(directory, ignore_errors=True)
        write_records(directory, args.rows)
        print(f"{args.rows} x {DIMS} reference embeddings written in "
              f"{time.monotonic() - start:.0f} s ({DIMS * 4 * args.rows / 2 ** 20:.0f} MB "
              "as float32)")
        results = {mode: run_child(mode, directory, args)
                   for mode in ("build", "index", "in_memory")}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    same_ids = all(a[0] == b[0] for a, b in zip(results["index"]["answers"],
                                                results["in_memory"]["answers"]))
    largest = max(abs(x - y) for a, b in zip(results["index"]["answers"],
                                             results["in_memory"]["answers"])
                  for x, y in zip(a[1], b[1]))
    print(f"\n{'mode':<10} {'baseline MB':>11} {'peak MB':>8} {'peak - base':>11} "
          f"{'seconds':>8} {'CPU/query':>10}")
    for mode, result in results.items():
        per_query = (f"{1000 * result['search_seconds'] / args.queries:.0f} ms"
                     if mode != "build" else "")
        print(f"{mode:<10} {result['baseline_mb']:>11.0f} {result['peak_mb']:>8.0f} "
              f"{result['peak_mb'] - result['baseline_mb']:>11.0f} {result['seconds']:>8.1f} "
              f"{per_query:>10}")
    index_cost = results["index"]["peak_mb"] - results["index"]["baseline_mb"]
    memory_cost = results["in_memory"]["peak_mb"] - results["in_memory"]["baseline_mb"]
    print(f"\nindex on disk: {results['build']['disk_mb']:.0f} MB; search block "
          f"{results['index']['block_mb']:.0f} MB ({args.block_rows} rows)")
    print(f"peak above baseline, in-memory / index: {memory_cost:.0f} / {index_cost:.0f} MB "
          f"= {memory_cost / max(index_cost, 1e-9):.1f}x")
    print(f"answers: ids equal the in-memory search's: {same_ids}; largest similarity "
          f"difference {largest:.2e}")
    float16_alternative(args.queries)


def float16_alternative(count: int) -> None:
    """Prints what storing float16 would cost per value and change in the similarities."""
    import tensorflow as tf

    from rescoring import retrieval

    block = np.concatenate([chunk_vectors(0), chunk_vectors(1)])[:16384]
    halves = block.astype(np.float16)
    query = queries_of(2)[0]

    def per_value(action, repeats: int = 5) -> float:
        action()
        start = time.perf_counter()
        for _ in range(repeats):
            action()
        return (time.perf_counter() - start) / repeats / block.size * 1e9

    print(f"\nfloat16 alternative, ns per value on one core: numpy float16 -> float32 "
          f"{per_value(lambda: halves.astype(np.float32)):.1f}, TensorFlow cast "
          f"{per_value(lambda: tf.cast(halves, tf.float32).numpy()):.1f}; the float32 "
          f"product {per_value(lambda: block @ query):.1f}")
    rows = np.concatenate([chunk_vectors(i) for i in range(5)])
    queries = queries_of(count)
    rounded = rows.astype(np.float16).astype(np.float32)
    random_case = float(np.abs(queries @ rounded.T - queries @ rows.T).max())
    errors = rounded[:1000] - rows[:1000]
    built = retrieval.l2_normalise(np.sign(errors) * np.abs(rows[:1000]))
    worst_case = float(np.abs(np.einsum("ij,ij->i", built, rounded[:1000])
                              - np.einsum("ij,ij->i", built, rows[:1000])).max())
    print(f"max |cos16 - cos32|: {random_case:.2e} (queries x {len(rows)} rows), "
          f"{worst_case:.2e} (rows built to add the errors up); bound 2**-11 = {2 ** -11:.2e}")


if __name__ == "__main__":
    main()
