"""Exact top-k search: ``rescoring.retrieval.exact_top_k`` vs plain numpy, per core, same run.

Run: ``.venv/bin/python bench/bench_knn_exact.py`` (about 1-2 minutes; ``--quick`` for ~20 s).

Task: the 100 nearest of 1000 query embeddings among 100k reference embeddings, 512-d float32
unit vectors (synthetic: normalised Gaussian rows), by dot product. BLAS is limited to one thread
(threadpoolctl), so every figure is per core; times are CPU seconds of this process.

Variants, on the same arrays:

* ``exact_top_k``: blocked matrix products (``block_rows`` index rows, ``query_rows`` queries
  at a time) and a threshold scan that keeps the running top-k; memory O(query_rows x
  block_rows).
* baseline ``matmul + argpartition``: the full ``[Q, N]`` similarity matrix (400 MB here),
  ``np.argpartition`` per row for the top k, then those k sorted.
* baseline ``matmul + argsort``: the full matrix, ``np.argsort`` of every row (first round only:
  it is slow).

The useful work of the search is ``2 Q N D`` floating-point operations; the table divides that
by each variant's time and compares it with this machine's float32 matrix-product rate measured
in the same run (``np.matmul`` of ``[1024, D] x [D, 16384]``, best of the rounds, interleaved
with the searches because the machine is shared). Goal: exact_top_k >= 80% of that rate.

The header names the BLAS library and kernel threadpoolctl reports, and the values of
``OPENBLAS_CORETYPE`` / ``OPENBLAS_L2_SIZE`` (some machines set them against old OpenBLAS
bugs; they can select a slower kernel): compare with
``env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE .venv/bin/python bench/bench_knn_exact.py``.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from rescoring import retrieval


def unit_rows(rng, rows: int, dim: int) -> np.ndarray:
    return retrieval.l2_normalise(rng.standard_normal((rows, dim), dtype=np.float32))


def cpu_seconds(function) -> tuple[float, object]:
    start = time.process_time()
    result = function()
    return time.process_time() - start, result


def matmul_rate(dim: int, repeats: int = 3) -> float:
    """Best float32 ``np.matmul`` rate (FLOP/s) of ``[1024, dim] x [dim, 16384]``."""
    rng = np.random.default_rng(1)
    left = rng.standard_normal((1024, dim), dtype=np.float32)
    right = rng.standard_normal((dim, 16384), dtype=np.float32)
    np.matmul(left, right)  # warm-up
    best = min(cpu_seconds(lambda: np.matmul(left, right))[0] for _ in range(repeats))
    return 2.0 * 1024 * 16384 * dim / best


def baseline_argpartition(queries, index, k):
    similarities = queries @ index.T
    top = np.argpartition(-similarities, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(similarities, top, axis=1)
    order = np.argsort(-top_sims, axis=1, kind="stable")
    return np.take_along_axis(top_sims, order, axis=1), np.take_along_axis(top, order, axis=1)


def baseline_argsort(queries, index, k):
    similarities = queries @ index.T
    order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(similarities, order, axis=1), order


def overlap(positions, reference) -> float:
    """Mean fraction of each row's reference top-k found in ``positions`` (1.0 = same sets)."""
    hits = sum(len(np.intersect1d(a, b)) for a, b in zip(positions, reference))
    return hits / reference.size


def blas_description() -> str:
    rows = [info for info in threadpool_info() if info.get("user_api") == "blas"]
    if not rows:
        return "BLAS: not reported by threadpoolctl"
    return "; ".join(
        f"BLAS {info.get('internal_api')} {info.get('version')}, kernel "
        f"{info.get('architecture', '?')}, {info.get('num_threads')} thread(s) in use"
        for info in rows
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--index", type=int, default=100_000, help="reference embeddings N")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (best of them)")
    parser.add_argument("--block_rows", type=int, default=retrieval.DEFAULT_BLOCK_ROWS)
    parser.add_argument("--query_rows", type=int, default=retrieval.DEFAULT_QUERY_ROWS)
    parser.add_argument("--sweep", default="",
                        help="comma-separated block_rows values to time as extra rows, e.g. "
                             "4096,8192,16384,32768")
    parser.add_argument("--quick", action="store_true", help="20k references, 1 round")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.index, args.rounds = 20_000, 1

    rng = np.random.default_rng(args.seed)
    index = unit_rows(rng, args.index, args.dim)
    queries = unit_rows(rng, args.queries, args.dim)
    flops = 2.0 * args.queries * args.index * args.dim

    variants = {
        f"exact_top_k (block_rows {args.block_rows}, query_rows {args.query_rows})": (
            lambda: retrieval.exact_top_k(queries, index, args.k, args.block_rows, args.query_rows)),
    }
    for value in [int(v) for v in args.sweep.split(",") if v.strip()]:
        if value != args.block_rows:
            variants[f"exact_top_k (block_rows {value}, query_rows {args.query_rows})"] = (
                lambda value=value: retrieval.exact_top_k(queries, index, args.k, value,
                                                          args.query_rows))
    variants["baseline: matmul + argpartition"] = lambda: baseline_argpartition(queries, index, args.k)
    slow = "baseline: matmul + argsort"
    variants[slow] = lambda: baseline_argsort(queries, index, args.k)

    best = {name: np.inf for name in variants}
    results = {}
    peak = 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        blas = blas_description()
        for round_number in range(args.rounds):
            peak = max(peak, matmul_rate(args.dim))
            for name, function in variants.items():
                if name == slow and round_number > 0:
                    continue
                seconds, results[name] = cpu_seconds(function)
                best[name] = min(best[name], seconds)

    reference_name = "baseline: matmul + argpartition"
    reference_positions = results[reference_name][1]
    print(f"exact top-{args.k}: {args.queries} queries x {args.index} references x {args.dim}-d "
          f"float32, 1 BLAS thread, CPU seconds, best of {args.rounds} round(s) (argsort: 1)")
    print(blas)
    print("OPENBLAS_CORETYPE=" + repr(os.environ.get("OPENBLAS_CORETYPE")) +
          " OPENBLAS_L2_SIZE=" + repr(os.environ.get("OPENBLAS_L2_SIZE")))
    print(f"machine float32 matmul rate ([1024, {args.dim}] x [{args.dim}, 16384], best): "
          f"{peak / 1e9:.1f} GFLOP/s per core; search work 2QND = {flops / 1e9:.1f} GFLOP")
    header = (f"{'variant':58s} {'seconds':>8s} {'queries/s':>10s} {'GFLOP/s':>8s} "
              f"{'% matmul':>9s} {'vs argpart.':>11s} {'same top-k':>10s}")
    print(header)
    print("-" * len(header))
    for name in variants:
        seconds = best[name]
        print(f"{name:58s} {seconds:8.3f} {args.queries / seconds:10.1f} "
              f"{flops / seconds / 1e9:8.1f} {100 * flops / seconds / peak:8.1f}% "
              f"{best[reference_name] / seconds:10.2f}x "
              f"{overlap(results[name][1], reference_positions):10.4f}")
    print("goal: exact_top_k >= 80% of the matmul rate; 'same top-k' = overlap of each query's "
          "top-k set with the argpartition baseline's")


if __name__ == "__main__":
    main()
