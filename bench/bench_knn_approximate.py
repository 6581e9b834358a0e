"""Approximate top-k search at 1M references: recall@100 and speed-up over exact, same run.

Run: ``.venv/bin/python bench/bench_knn_approximate.py`` (about 6-9 minutes, ~6 GB of memory at
its peak; ``--quick`` for 200k references, ~2 minutes). Needs FAISS (``pip install
'landmarks[ann]'``); ScaNN rows are added when ``scann`` is installed.

Data (synthetic, like landmark embeddings): 1M unit vectors of 512 dimensions around 4000 class
centres with a long-tailed class size (weight of class r proportional to ``(r + 10) ** -0.8``:
from ~3000 images for the largest class to ~75 for the smallest); centres are grouped around
100 "super" centres (cosine ~0.5 to theirs), so neighbouring classes overlap. A member is
``normalise(centre + 0.88 * noise)`` with ``|noise| ~ 1``: cosine ~0.75 to its centre, ~0.56 to
another member of its class, ~0.14 to members of a sibling class. Queries: 1000 new members
of classes drawn with the same weights; another 200 random unit vectors ("non-landmark"
queries, their neighbours scattered over the whole index) are reported separately, untimed.

Ground truth: :func:`rescoring.retrieval.exact_top_k` (its time on the same 1000 queries is the
baseline). Every search runs on one core (BLAS and FAISS/OpenMP limited to one thread; CPU
seconds); index building uses ``--build_threads``. recall@100 = mean fraction of each query's
exact top-100 found in its approximate top-100. Goal: >= 20x over exact at recall@100 >= 0.95.

Variants: FAISS IVF-flat (``rescoring.ann.ApproximateIndex``: k-means cells, exact dot products
inside the probed cells) over ``--probes``; FAISS IVF-SQ8 on the same cells (8-bit scalar
quantised vectors: less memory traffic, approximate similarities); ScaNN (tree + anisotropic
hashing + exact re-ordering), if installed. ScaNN 1.4.2's package ``__init__`` loads a
TensorFlow op library built for TF 2.20, which fails against this project's TF 2.21, so this
benchmark hides TensorFlow from it (ScaNN's pybind searcher needs no TensorFlow); a process that
has imported TensorFlow (a Beam worker running the model) cannot import ScaNN at all.
"""

from __future__ import annotations

import argparse
import gc
import sys
import time

import numpy as np
from threadpoolctl import threadpool_limits

from rescoring import ann, retrieval

DIM = 512
SUPER_CENTRES = 100
SUPER_SPREAD = 1.7  # class centre = normalise(super + 1.7 * unit noise): cosine ~0.5
MEMBER_NOISE = 0.88  # member = normalise(centre + 0.88 * noise), |noise| ~ 1: cosine ~0.75


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def class_weights(num_classes: int) -> np.ndarray:
    weights = 1.0 / (np.arange(num_classes) + 10.0) ** 0.8
    return weights / weights.sum()


def make_data(num_refs: int, num_classes: int, num_queries: int, num_ood: int, seed: int):
    """``(references [N, D], queries [Q, D], ood_queries [Q2, D])``, float32 unit rows."""
    rng = np.random.default_rng(seed)
    supers = retrieval.l2_normalise(rng.standard_normal((SUPER_CENTRES, DIM), dtype=np.float32))
    noise = retrieval.l2_normalise(rng.standard_normal((num_classes, DIM), dtype=np.float32))
    centres = retrieval.l2_normalise(
        supers[rng.integers(0, SUPER_CENTRES, num_classes)] + SUPER_SPREAD * noise)
    weights = class_weights(num_classes)

    def members(labels):
        out = np.empty((len(labels), DIM), np.float32)
        for start in range(0, len(labels), 100_000):
            part = labels[start : start + 100_000]
            noise = rng.standard_normal((len(part), DIM), dtype=np.float32) / np.sqrt(DIM)
            out[start : start + len(part)] = retrieval.l2_normalise(centres[part] + MEMBER_NOISE * noise)
        return out

    references = members(rng.choice(num_classes, num_refs, p=weights))
    queries = members(rng.choice(num_classes, num_queries, p=weights))
    ood = retrieval.l2_normalise(rng.standard_normal((num_ood, DIM), dtype=np.float32))
    return references, queries, ood


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([np.intersect1d(a, b).size / b.size for a, b in zip(found, truth)]))


def timed(function):
    start = time.process_time()
    result = function()
    return time.process_time() - start, result


def faiss_rows(faiss, references, sample, queries, ood, truth, ood_truth, args, exact_seconds):
    """IVF-flat (the library's ApproximateIndex) and IVF-SQ8 on the same k-means cells."""
    rows = []
    faiss.omp_set_num_threads(args.build_threads)
    log(f"FAISS: k-means of {len(sample)} points into {args.num_lists} cells, adding {len(references)}")
    start = time.time()
    index = ann.ApproximateIndex.build(references, num_lists=args.num_lists,
                                       training_points=len(sample), seed=args.seed,
                                       threads=args.build_threads)
    build_flat = time.time() - start
    log(f"FAISS IVF-flat built in {build_flat:.0f} s")
    faiss.omp_set_num_threads(1)
    for probes in args.probes:
        index.num_probes = probes
        seconds, (_, positions) = timed(lambda: index.search(queries, args.k))
        _, ood_positions = index.search(ood, args.k)
        rows.append((f"FAISS IVF-flat {args.num_lists} cells, nprobe {probes}", recall(positions, truth),
                     recall(ood_positions, ood_truth), seconds, exact_seconds / seconds))
    if args.sq8:
        # Same trained cells: only the 8-bit codebook is trained.
        faiss.omp_set_num_threads(args.build_threads)
        quantizer = index._index.quantizer
        start = time.time()
        sq8 = faiss.IndexIVFScalarQuantizer(quantizer, DIM, args.num_lists,
                                            faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        sq8.train(sample)
        sq8.add(references)
        log(f"FAISS IVF-SQ8 built in {time.time() - start:.0f} s (cells reused)")
        faiss.omp_set_num_threads(1)
        for probes in args.probes:
            sq8.nprobe = probes
            seconds, (_, positions) = timed(lambda: sq8.search(queries, args.k))
            _, ood_positions = sq8.search(ood, args.k)
            rows.append((f"FAISS IVF-SQ8 {args.num_lists} cells, nprobe {probes}", recall(positions, truth),
                         recall(ood_positions, ood_truth), seconds, exact_seconds / seconds))
        del sq8
    del index
    gc.collect()
    return rows, build_flat


def import_scann():
    """ScaNN's pybind searcher with TensorFlow hidden from its package init (see docstring)."""
    if "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None:
        return None
    hidden = "tensorflow" not in sys.modules
    sys.modules["tensorflow"] = None  # "import tensorflow" now raises ModuleNotFoundError
    try:
        import scann
    except ImportError:
        return None
    finally:
        if hidden:
            del sys.modules["tensorflow"]
    return scann


def scann_rows(scann, references, queries, ood, truth, ood_truth, args, exact_seconds):
    rows = []
    leaves = args.num_lists // 2
    log(f"ScaNN: tree of {leaves} leaves, AH 2 dims/block, exact re-ordering of {args.reorder}")
    start = time.time()
    searcher = (scann.scann_ops_pybind.builder(references, args.k, "dot_product")
                .tree(num_leaves=leaves, num_leaves_to_search=args.scann_leaves[0],
                      training_sample_size=min(len(references), 64 * leaves))
                .score_ah(2, anisotropic_quantization_threshold=0.2)
                .reorder(args.reorder)
                .set_n_training_threads(args.build_threads)
                .build())
    log(f"ScaNN built in {time.time() - start:.0f} s")
    for to_search in args.scann_leaves:
        def search(data):
            return searcher.search_batched(data, leaves_to_search=to_search,
                                           pre_reorder_num_neighbors=args.reorder,
                                           final_num_neighbors=args.k)
        seconds, (positions, _) = timed(lambda: search(queries))
        ood_positions, _ = search(ood)
        rows.append((f"ScaNN {leaves} leaves, search {to_search}, reorder {args.reorder}",
                     recall(positions, truth), recall(ood_positions, ood_truth), seconds,
                     exact_seconds / seconds))
    del searcher
    gc.collect()
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--references", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=4000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--ood_queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--num_lists", type=int, default=None, help="default: 4 sqrt(N), power of 2")
    parser.add_argument("--probes", default="4,8,16,32")
    parser.add_argument("--no_sq8", dest="sq8", action="store_false")
    parser.add_argument("--scann", choices=("auto", "no"), default="auto")
    parser.add_argument("--scann_leaves", default="20,40,80")
    parser.add_argument("--reorder", type=int, default=250)
    parser.add_argument("--build_threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="200k references")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.references = 200_000
    args.probes = [int(v) for v in args.probes.split(",")]
    args.scann_leaves = [int(v) for v in args.scann_leaves.split(",")]
    args.num_lists = args.num_lists or ann.default_num_lists(args.references)
    faiss = ann.import_faiss()

    log(f"making {args.references} x {DIM} references ({args.references * DIM * 4 / 2**30:.1f} GiB)")
    references, queries, ood = make_data(args.references, args.classes, args.queries,
                                         args.ood_queries, args.seed)
    rng = np.random.default_rng(args.seed + 1)
    sample = references[np.sort(rng.choice(len(references),
                                           min(len(references), ann.TRAINING_POINTS_PER_LIST * args.num_lists),
                                           replace=False))]
    with threadpool_limits(limits=1, user_api="blas"):
        log("exact search (ground truth, timed baseline)")
        exact_seconds, (truth_sims, truth) = timed(lambda: retrieval.exact_top_k(queries, references, args.k))
        _, ood_truth = retrieval.exact_top_k(ood, references, args.k)
        rows = [(f"exact_top_k (baseline)", 1.0, 1.0, exact_seconds, 1.0)]
        faiss_table, build_seconds = faiss_rows(faiss, references, sample, queries, ood, truth,
                                                ood_truth, args, exact_seconds)
        rows += faiss_table
        scann = import_scann() if args.scann == "auto" else None
        if scann is not None:
            rows += scann_rows(scann, references, queries, ood, truth, ood_truth, args, exact_seconds)
        scann_note = "ScaNN: included" if scann is not None else "ScaNN: not installed or not importable, skipped"

    print(f"approximate top-{args.k}: {args.references} references x {DIM}-d, {args.classes} classes "
          f"(long tail), {args.queries} class queries (timed) + {args.ood_queries} random "
          f"'non-landmark' queries (recall only); one core per search (CPU seconds)")
    print(f"exact top-{args.k} similarities of the class queries: 1st {truth_sims[:, 0].mean():.3f}, "
          f"100th {truth_sims[:, -1].mean():.3f} (means); FAISS IVF-flat build "
          f"{build_seconds:.0f} s wall with {args.build_threads} threads; {scann_note}")
    header = (f"{'variant':52s} {'recall@100':>10s} {'(non-lm)':>9s} {'seconds':>8s} "
              f"{'queries/s':>10s} {'speed-up':>9s}")
    print(header)
    print("-" * len(header))
    for name, rec, ood_rec, seconds, speed_up in rows:
        print(f"{name:52s} {rec:10.4f} {ood_rec:9.4f} {seconds:8.3f} "
              f"{args.queries / seconds:10.1f} {speed_up:8.1f}x")
    default = f"FAISS IVF-flat {args.num_lists} cells, nprobe {ann.DEFAULT_NUM_PROBES}"
    chosen = [row for row in rows if row[0] == default]
    if chosen:
        _, rec, _, _, speed_up = chosen[0]
        verdict = "met" if rec >= 0.95 and speed_up >= 20 else "NOT met"
        print(f"library default ({default}): recall@100 {rec:.4f}, {speed_up:.1f}x over exact; "
              f"goal (>= 20x at recall >= 0.95) {verdict}")


if __name__ == "__main__":
    main()
