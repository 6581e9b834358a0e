"""Geometric verification: synthetic affine matches, real photographs, parity with the seed's way."""

import cv2
import numpy as np
import pytest
import skimage.data
from scipy.spatial import cKDTree

from rescoring import local_features, verification


def unit_rows(values):
    values = np.asarray(values, np.float32)
    return values / np.linalg.norm(values, axis=1, keepdims=True)


def synthetic_pair(num_inliers=150, num_outliers=250, seed=0, noise_px=1.5):
    """Image-1 features, and image-2 features where ``num_inliers`` are a known affine map of
    image 1's (same descriptors plus a little noise) and ``num_outliers`` are matched
    descriptors at random places (so they become putative matches but not inliers)."""
    rng = np.random.default_rng(seed)
    total = num_inliers + num_outliers
    loc1 = rng.uniform(0, 400, size=(total, 2)).astype(np.float32)
    desc1 = unit_rows(rng.normal(size=(total, 40)))
    affine = np.array([[0.9, -0.2], [0.15, 1.1]])
    shift = np.array([12.0, -30.0])
    loc2 = loc1 @ affine.T + shift + rng.normal(0, noise_px, size=loc1.shape)
    loc2[num_inliers:] = rng.uniform(0, 400, size=(num_outliers, 2))
    desc2 = unit_rows(desc1 + rng.normal(0, 0.03, size=desc1.shape))
    order = rng.permutation(total)  # no information in the order of the features
    return loc1, desc1, loc2[order].astype(np.float32), desc2[order]


def test_synthetic_affine_gives_about_the_true_inlier_count():
    loc1, desc1, loc2, desc2 = synthetic_pair()
    count = verification.count_inliers(loc1, desc1, loc2, desc2)
    # 150 true inliers; a random outlier lands within 20 px of its prediction with probability
    # ~ pi * 20^2 / 400^2 ~ 0.8%, so ~2 of 250 add to the count.
    assert 148 <= count <= 158
    reference = verification.count_inliers_reference(loc1, desc1, loc2, desc2)
    assert abs(count - reference) <= 3


def test_ransac_finds_exactly_the_points_of_a_known_affine_map():
    rng = np.random.default_rng(11)
    points1 = rng.uniform(0, 500, size=(130, 2))
    affine = np.array([[1.2, 0.3], [-0.4, 0.8]])
    points2 = points1 @ affine.T + [40.0, 7.0]
    # 30 outliers moved at least 60 px away from where the map sends them.
    directions = rng.normal(size=(30, 2))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    points2[100:] += directions * rng.uniform(60, 200, size=(30, 1))
    inliers = verification.ransac_affine_inliers(points1, points2, verification.VerificationParams())
    np.testing.assert_array_equal(inliers, np.arange(130) < 100)
    # Collinear points admit no affine fit: no model, no inliers.
    line = np.stack([np.arange(10.0), 2 * np.arange(10.0)], axis=1)
    assert not verification.ransac_affine_inliers(line, line, verification.VerificationParams()).any()


def test_no_inliers_among_unrelated_features():
    rng = np.random.default_rng(3)
    loc1 = rng.uniform(0, 400, size=(300, 2))
    loc2 = rng.uniform(0, 400, size=(300, 2))
    # Unrelated random 40-dim unit vectors lie ~1.41 apart: no putative match at 0.8.
    desc1 = unit_rows(rng.normal(size=(300, 40)))
    desc2 = unit_rows(rng.normal(size=(300, 40)))
    assert verification.count_inliers(loc1, desc1, loc2, desc2) == 0
    assert verification.count_inliers_reference(loc1, desc1, loc2, desc2) == 0


def test_fewer_than_three_putative_matches_give_zero():
    loc1, desc1, loc2, desc2 = synthetic_pair(num_inliers=2, num_outliers=0)
    assert verification.count_inliers(loc1, desc1, loc2, desc2) == 0
    assert verification.count_inliers_reference(loc1, desc1, loc2, desc2) == 0
    # Exactly three matches under an affine map: all three are inliers.
    loc1, desc1, loc2, desc2 = synthetic_pair(num_inliers=3, num_outliers=0, noise_px=0.0)
    assert verification.count_inliers(loc1, desc1, loc2, desc2) == 3
    # No features on one side.
    empty = (np.zeros((0, 2), np.float32), np.zeros((0, 40), np.float32))
    assert verification.count_inliers(loc1, desc1, *empty) == 0
    assert verification.count_inliers(*empty, loc2, desc2) == 0
    assert verification.count_inliers_reference(*empty, loc2, desc2) == 0


def test_putative_matches_equal_the_kd_tree_query():
    rng = np.random.default_rng(5)
    desc1 = unit_rows(rng.normal(size=(400, 40)))
    desc2 = unit_rows(
        np.concatenate([desc1[:200] + rng.normal(0, 0.1, size=(200, 40)), rng.normal(size=(150, 40))])
    )
    index1, index2 = verification.putative_matches(desc1, desc2, 0.8)
    _, nearest = cKDTree(desc1).query(desc2, distance_upper_bound=0.8)
    found = np.flatnonzero(nearest != desc1.shape[0])
    np.testing.assert_array_equal(index2, found)
    np.testing.assert_array_equal(index1, nearest[found])
    assert 150 < len(index2) <= 200  # the noisy copies match, the random rows do not


def test_counts_are_seeded_and_reproducible():
    # 60 inliers among 360 matches: a sample is all-inlier with probability (1/6)^3 ~ 0.5%, so
    # 20 trials often miss (the result depends on the seed) and 1000 trials almost never do.
    loc1, desc1, loc2, desc2 = synthetic_pair(num_inliers=60, num_outliers=300, seed=7)
    few = [verification.VerificationParams(max_trials=20, seed=seed) for seed in range(8)]
    counts = [verification.count_inliers(loc1, desc1, loc2, desc2, params) for params in few]
    assert counts == [verification.count_inliers(loc1, desc1, loc2, desc2, params) for params in few]
    assert len(set(counts)) > 1  # the seed is really used
    assert 58 <= verification.count_inliers(loc1, desc1, loc2, desc2) <= 66


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_descriptor_distance": 0.0},
        {"min_samples": 4},
        {"residual_threshold": -1.0},
        {"max_trials": 0},
    ],
)
def test_invalid_params_raise(kwargs):
    with pytest.raises(ValueError):
        verification.VerificationParams(**kwargs)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError):
        verification.count_inliers(np.zeros((3, 2)), np.zeros((4, 40)), np.zeros((3, 2)), np.zeros((3, 40)))
    with pytest.raises(ValueError):
        verification.count_inliers(np.zeros((3, 3)), np.zeros((3, 40)), np.zeros((3, 2)), np.zeros((3, 40)))


# --- real photographs with the default offline extractor ---------------------------------


def warped_copy(image, angle=15.0, scale=0.8, shift=(25.0, -10.0)):
    """Rotated, scaled, shifted and re-lit copy: a stand-in for another photo of the landmark."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2, height / 2), angle, scale)
    matrix[:, 2] += shift
    warped = cv2.warpAffine(image, matrix, (width, height), borderMode=cv2.BORDER_REFLECT)
    return np.clip(warped.astype(np.float32) * 0.85 + 15, 0, 255).astype(np.uint8)


def rgb(image):
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


@pytest.fixture(scope="module")
def photo_features():
    extractor = local_features.make_extractor("default")
    astronaut = rgb(skimage.data.astronaut())
    images = {
        "astronaut": astronaut,
        "warped": warped_copy(astronaut),
        "zoomed": cv2.resize(astronaut[60:380, 100:460], (400, 356), interpolation=cv2.INTER_LINEAR),
        "coffee": rgb(skimage.data.coffee()),
        "chelsea": rgb(skimage.data.chelsea()),
        "rocket": rgb(skimage.data.rocket()),
        "camera": rgb(skimage.data.camera()),
    }
    features = {name: extractor.extract(image) for name, image in images.items()}
    params = verification.VerificationParams(max_descriptor_distance=extractor.max_descriptor_distance)
    return features, params


def test_photo_vs_its_warped_copy_scores_far_above_unrelated_photos(photo_features):
    features, params = photo_features
    query = features["astronaut"]
    same = verification.count_inliers(*query, *features["warped"], params)
    zoomed = verification.count_inliers(*query, *features["zoomed"], params)
    unrelated = [
        verification.count_inliers(*query, *features[name], params)
        for name in ("coffee", "chelsea", "rocket", "camera")
    ]
    assert same >= 100 and zoomed >= 100
    assert min(same, zoomed) >= 10 * max(max(unrelated), 1)


def test_reference_and_vectorised_counts_agree_on_photo_pairs(photo_features):
    features, params = photo_features
    pairs = [("astronaut", "warped"), ("astronaut", "zoomed"), ("warped", "zoomed"), ("astronaut", "coffee")]
    for first, second in pairs:
        fast = verification.count_inliers(*features[first], *features[second], params)
        reference = verification.count_inliers_reference(*features[first], *features[second], params)
        # RANSAC is random in both; the best models agree to a few percent (or a few inliers
        # for near-zero counts).
        assert abs(fast - reference) <= max(3, 0.05 * reference), (first, second, fast, reference)


def test_inlier_matches_pair_the_features_the_affine_map_relates():
    """The matches drawn by landmarks-query: every returned pair maps under the true affine
    map to within the residual threshold, the planted pairs are (nearly) all found, and their
    number is count_inliers."""
    rng = np.random.default_rng(5)
    loc1 = rng.uniform(0, 400, size=(120, 2)).astype(np.float32)
    desc1 = unit_rows(rng.normal(size=(120, 40)))
    affine, shift = np.array([[0.9, -0.2], [0.15, 1.1]]), np.array([12.0, -30.0])
    order = rng.permutation(120)
    loc2 = (loc1 @ affine.T + shift)[order].astype(np.float32)
    loc2[:30] = rng.uniform(0, 400, size=(30, 2))  # 30 moved: matched descriptors, wrong place
    desc2 = desc1[order]
    index1, index2 = verification.inlier_matches(loc1, desc1, loc2, desc2)
    assert len(index1) == verification.count_inliers(loc1, desc1, loc2, desc2)
    np.testing.assert_array_equal(order[index2], index1)  # each pair is a true correspondence
    residuals = np.linalg.norm(loc1[index1] @ affine.T + shift - loc2[index2], axis=1)
    assert residuals.max() < verification.VerificationParams().residual_threshold
    assert len(index1) >= 88  # 90 planted; a moved point may land near its prediction
    empty = verification.inlier_matches(loc1[:2], desc1[:2], loc2[:2], desc2[:2])
    assert empty[0].shape == (0,) and empty[1].shape == (0,)
