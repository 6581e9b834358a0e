"""Geometric verification throughput: the seed's way vs ``rescoring.verification.count_inliers``.

Run: ``.venv/bin/python bench/bench_verification.py`` (about a minute; ``--quick`` for ~15 s).

Inputs, as DELF gives them: 1000 features per side, 40-dim unit descriptors drawn around a
shared "visual vocabulary" of cluster centres, so unrelated images still produce a few hundred
putative matches (at random places) and RANSAC has to run all its trials on them. A matching
pair shares a fraction of its features under an affine map (plus pixel noise and descriptor
noise). The mix follows the recipe's use: a test image against 32 references of its predicted
class, most of which do not match (default 8 matching + 24 non-matching pairs).

Every variant runs on one core (BLAS/OpenCV threads pinned to 1, KD-tree ``workers=1``) on the
same pairs in the same run; the table gives pairs/s, the speed-up over the seed's way and how
far the inlier counts are from the seed's.
"""

from __future__ import annotations

import os

# One core: set before numpy/OpenCV start their thread pools.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from rescoring import verification  # noqa: E402

IMAGE_SIDE = 384.0  # pixels, the recipe's DELF input size
VOCABULARY = 2000  # cluster centres of the synthetic descriptor distribution
DESCRIPTOR_SPREAD = 0.11  # per-dimension noise around a centre: same-cluster distance ~0.7-1.0


def unit_rows(values):
    values = np.asarray(values, np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def random_features(rng, centres, num_features):
    """Random locations, descriptors near random vocabulary centres: one unrelated image."""
    locations = rng.uniform(0, IMAGE_SIDE, size=(num_features, 2)).astype(np.float32)
    words = rng.integers(0, len(centres), num_features)
    noise = rng.normal(0, DESCRIPTOR_SPREAD, (num_features, centres.shape[1]))
    descriptors = unit_rows(centres[words] + noise)
    return locations, descriptors


def make_pair(rng, centres, num_features, matching, shared_fraction):
    """``(loc1, desc1, loc2, desc2)``; a matching pair shares ``shared_fraction`` of features."""
    loc1, desc1 = random_features(rng, centres, num_features)
    loc2, desc2 = random_features(rng, centres, num_features)
    if matching:
        shared = int(shared_fraction * num_features)
        angle = rng.uniform(-0.3, 0.3)
        scale = rng.uniform(0.7, 1.3)
        rotation = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
        shift = rng.uniform(-40, 40, size=2)
        source = rng.choice(num_features, shared, replace=False)
        target = rng.choice(num_features, shared, replace=False)
        loc2[target] = loc1[source] @ rotation.T + shift + rng.normal(0, 2.0, (shared, 2))
        desc2[target] = unit_rows(desc1[source] + rng.normal(0, 0.04, (shared, desc1.shape[1])))
    return loc1, desc1, loc2, desc2


def count_inliers_opencv(loc1, desc1, loc2, desc2, params):
    """Same matching, OpenCV's RANSAC (unseedable, adaptive stop): the alternative considered."""
    index1, index2 = verification.putative_matches(desc1, desc2, params.max_descriptor_distance)
    if len(index1) < params.min_samples:
        return 0
    _, inliers = cv2.estimateAffine2D(
        loc1[index1],
        loc2[index2],
        method=cv2.RANSAC,
        ransacReprojThreshold=params.residual_threshold,
        maxIters=params.max_trials,
        confidence=0.999,
        refineIters=0,
    )
    return 0 if inliers is None else int(inliers.sum())


def time_variant(function, pairs, params, repeats):
    """Best-of-``repeats`` CPU time for all pairs (seconds) and the counts of the last run.

    CPU time of this single-threaded process, not wall time: the figure is per core and does
    not drift when other jobs share the machine.
    """
    best = np.inf
    counts = []
    for _ in range(repeats):
        start = time.process_time()
        counts = [function(*pair, params) for pair in pairs]
        best = min(best, time.process_time() - start)
    return best, np.array(counts)


def describe_agreement(counts, reference, matching):
    """Mean |difference| and worst relative difference on matching pairs, mean |diff| on others."""
    difference = np.abs(counts - reference)
    relative = difference[matching] / np.maximum(reference[matching], 1)
    worst = f"{100 * relative.max():.1f}%" if matching.any() else "-"
    return f"{difference[matching].mean():.1f} / {worst} / {difference[~matching].mean():.1f}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matching", type=int, default=8, help="matching pairs")
    parser.add_argument("--non_matching", type=int, default=24, help="non-matching pairs")
    parser.add_argument("--features", type=int, default=1000, help="features per side")
    parser.add_argument("--dim", type=int, default=40, help="descriptor length (DELF: 40)")
    parser.add_argument("--shared_fraction", type=float, default=0.25)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs per variant (best)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 + 6 pairs")
    args = parser.parse_args(argv)
    if args.quick:
        args.matching, args.non_matching = 2, 6

    cv2.setNumThreads(1)
    rng = np.random.default_rng(args.seed)
    centres = unit_rows(rng.normal(size=(VOCABULARY, args.dim)))
    matching = np.array([True] * args.matching + [False] * args.non_matching)
    pairs = [make_pair(rng, centres, args.features, flag, args.shared_fraction) for flag in matching]
    params = verification.VerificationParams()
    putative = np.array(
        [len(verification.putative_matches(p[1], p[3], params.max_descriptor_distance)[0]) for p in pairs]
    )

    # Every variant gets the same number of timed runs (best of them), so none is favoured.
    seconds_reference, reference = time_variant(
        verification.count_inliers_reference, pairs, params, args.repeats
    )
    rows = [("seed's way (cKDTree + loop + skimage ransac)", seconds_reference, reference)]
    seconds, counts = time_variant(verification.count_inliers, pairs, params, args.repeats)
    rows.append(("count_inliers (matrix NN + numpy RANSAC)", seconds, counts))
    seconds, counts = time_variant(count_inliers_opencv, pairs, params, args.repeats)
    rows.append(("matrix NN + cv2.estimateAffine2D (not used)", seconds, counts))

    print(
        f"{len(pairs)} pairs ({args.matching} matching, {args.non_matching} not), "
        f"{args.features} x {args.dim}-dim features per side, one core (CPU time); "
        f"putative matches per pair: matching {putative[matching].mean():.0f}, "
        f"non-matching {putative[~matching].mean():.0f}"
    )
    print(
        f"inliers (seed's way): matching mean {reference[matching].mean():.0f}, "
        f"non-matching mean {reference[~matching].mean():.1f}"
    )
    header = (
        f"{'variant':46s} {'pairs/s':>9s} {'ms/pair':>8s} {'speed-up':>9s}  "
        "|count - seed|: matching mean / worst / non-matching mean"
    )
    print(header)
    print("-" * len(header))
    for name, seconds, counts in rows:
        print(
            f"{name:46s} {len(pairs) / seconds:9.1f} {1e3 * seconds / len(pairs):8.2f} "
            f"{seconds_reference / seconds:8.1f}x  {describe_agreement(counts, reference, matching)}"
        )


if __name__ == "__main__":
    main()
