"""Crop views (geometry, order, mirrors, resize parity with training) and crop voting."""

import numpy as np
import pytest

from rescoring import crops, voting
from trainer.preprocessing import ImageContract


def coordinate_image(height=100, width=120):
    """Float-exact coordinate encoding: channel 0 = 2 * y, channel 1 = 2 * x, channel 2 = 128."""
    ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return np.stack([2 * ys, 2 * xs, np.full_like(ys, 128)], axis=-1).astype(np.uint8)


def expected_coordinate(index, resized, original):
    """Input pixel coordinate that resized pixel ``index`` samples (half-pixel centres)."""
    return (index + 0.5) * original / resized - 0.5


# --- CropSpec and geometry ---------------------------------------------------------------


def test_num_views_of_presets_and_default():
    assert crops.CropSpec().num_views == 22
    assert crops.CropSpec.for_num_views(22) == crops.CropSpec()
    assert crops.CropSpec.for_num_views(12).num_views == 12
    assert crops.CropSpec.for_num_views(12).crop_fractions == (0.1,)
    assert crops.CropSpec.for_num_views(2).num_views == 2
    assert crops.CropSpec.for_num_views(1).num_views == 1
    assert crops.CropSpec(crop_fractions=(0.1,), mirror=False, include_whole=False).num_views == 5
    with pytest.raises(ValueError):
        crops.CropSpec.for_num_views(7)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"crop_fractions": (0.0,)},
        {"crop_fractions": (-0.1,)},
        {"crop_fractions": (0.1, 0.1)},
        {"crop_fractions": (), "include_whole": False},
    ],
)
def test_invalid_crop_specs_raise(kwargs):
    with pytest.raises(ValueError):
        crops.CropSpec(**kwargs)


def test_view_boxes_of_the_recipe_at_299():
    boxes = crops.view_boxes(299)
    assert len(boxes) == 22
    assert [box.name for box in boxes[:4]] == [
        "whole",
        "whole/mirror",
        "c0.05/top_left",
        "c0.05/top_left/mirror",
    ]
    assert boxes[11].name == "c0.05/centre/mirror"
    assert boxes[12].name == "c0.15/top_left"
    # R = round((1 + c) * 299): 314 for c = 0.05, 344 for c = 0.15.
    assert {box.resize_to for box in boxes[2:12]} == {314}
    assert {box.resize_to for box in boxes[12:]} == {344}
    by_name = {box.name: box for box in boxes}
    assert (by_name["whole"].top, by_name["whole"].left, by_name["whole"].resize_to) == (0, 0, 299)
    assert (by_name["c0.05/top_left"].top, by_name["c0.05/top_left"].left) == (0, 0)
    assert (by_name["c0.05/top_right"].top, by_name["c0.05/top_right"].left) == (0, 15)
    assert (by_name["c0.05/bottom_left"].top, by_name["c0.05/bottom_left"].left) == (15, 0)
    assert (by_name["c0.15/bottom_right"].top, by_name["c0.15/bottom_right"].left) == (45, 45)
    assert (by_name["c0.15/centre"].top, by_name["c0.15/centre"].left) == (22, 22)
    # Every plain view is followed by its mirror, identical geometry.
    for plain, mirrored in zip(boxes[0::2], boxes[1::2]):
        assert not plain.mirror and mirrored.mirror
        assert (plain.resize_to, plain.top, plain.left) == (
            mirrored.resize_to,
            mirrored.top,
            mirrored.left,
        )
    # Every window lies inside its resized image.
    assert all(box.top + 299 <= box.resize_to and box.left + 299 <= box.resize_to for box in boxes)


# --- make_views ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def float_views():
    image = coordinate_image()
    return image, crops.make_views(image, 32, dtype=np.float32)


def test_views_sample_the_right_input_positions(float_views):
    image, views = float_views
    height, width = image.shape[:2]
    size = 32
    assert views.shape == (22, size, size, 3) and views.dtype == np.float32
    interior = slice(3, size - 3)  # the antialias kernel is truncated near the borders
    index = np.arange(size)[interior]
    for view, box in zip(views, crops.view_boxes(size)):
        if box.mirror:
            continue
        want_y = expected_coordinate(index + box.top, box.resize_to, height)
        want_x = expected_coordinate(index + box.left, box.resize_to, width)
        np.testing.assert_allclose(view[interior, size // 2, 0] / 2, want_y, atol=0.05, err_msg=box.name)
        np.testing.assert_allclose(view[size // 2, interior, 1] / 2, want_x, atol=0.05, err_msg=box.name)
        np.testing.assert_allclose(view[..., 2], 128.0, atol=1e-3)


def test_corner_and_centre_windows_in_input_coordinates(float_views):
    _, views = float_views
    names = [box.name for box in crops.view_boxes(32)]
    top_left = views[names.index("c0.15/top_left")]
    bottom_right = views[names.index("c0.15/bottom_right")]
    centre = views[names.index("c0.15/centre")]
    whole = views[names.index("whole")]
    # The top-left crop starts at the image's top-left corner: its first pixel encodes nearly
    # the same coordinates as the whole view's first pixel (one resized pixel further would be
    # ~5 levels off).
    assert top_left[0, 0, 0] == pytest.approx(whole[0, 0, 0], abs=1.5)
    assert top_left[0, 0, 1] == pytest.approx(whole[0, 0, 1], abs=1.5)
    # The bottom-right crop ends at the image's bottom-right corner.
    assert bottom_right[-1, -1, 0] == pytest.approx(whole[-1, -1, 0], abs=1.5)
    assert bottom_right[-1, -1, 1] == pytest.approx(whole[-1, -1, 1], abs=1.5)
    # The centre crop is centred: its middle samples the image centre (y 49.5, x 59.5), within
    # half a resized pixel (R - S = 5 is odd, the window starts at 2).
    middle_y = (centre[15, 16, 0] + centre[16, 16, 0]) / 4
    middle_x = (centre[16, 15, 1] + centre[16, 16, 1]) / 4
    assert middle_y == pytest.approx(49.5, abs=100 / 37 / 2 + 0.01)
    assert middle_x == pytest.approx(59.5, abs=120 / 37 / 2 + 0.01)
    # Crops zoom in: they cover less of the image than the whole view.
    assert np.ptp(top_left[..., 0]) < np.ptp(whole[..., 0])


def test_mirrors_are_flipped_copies(float_views):
    _, views = float_views
    for plain, mirrored in zip(views[0::2], views[1::2]):
        np.testing.assert_array_equal(mirrored, plain[:, ::-1])


def test_views_match_the_training_resize_contract():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(57, 83, 3), dtype=np.uint8)
    size = 40
    views = crops.make_views(image, size, dtype=np.float32)
    contract = ImageContract(image_size=size)
    for view, box in zip(views, crops.view_boxes(size)):
        resized = contract.resize(image, box.resize_to)
        window = resized[box.top : box.top + size, box.left : box.left + size]
        if box.mirror:
            window = window[:, ::-1]
        np.testing.assert_allclose(view, window, atol=1e-4, err_msg=box.name)


def test_uint8_views_are_rounded_float_views():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    spec = crops.CropSpec(crop_fractions=(0.1,))
    as_float = crops.make_views(image, 36, spec, dtype=np.float32)
    as_uint8 = crops.make_views(image, 36, spec)
    assert as_uint8.dtype == np.uint8 and as_uint8.shape == (12, 36, 36, 3)
    np.testing.assert_array_equal(as_uint8, np.clip(np.rint(as_float), 0, 255).astype(np.uint8))


def test_make_views_rejects_bad_input():
    with pytest.raises(ValueError):
        crops.make_views(np.zeros((10, 10), np.uint8), 8)
    with pytest.raises(ValueError):
        crops.make_views(np.zeros((10, 10, 3), np.uint8), 8, dtype=np.int32)


# --- voting --------------------------------------------------------------------------------


def test_majority_beats_one_very_confident_view():
    # 4 views over 3 classes: three vote class 1 at 0.5, one votes class 2 at 0.99.
    probabilities = np.array(
        [
            [0.1, 0.5, 0.2],
            [0.3, 0.5, 0.1],
            [0.2, 0.5, 0.3],
            [0.0, 0.01, 0.99],
        ]
    )
    class_index, confidence = voting.vote(probabilities)
    assert class_index == 1
    assert confidence == pytest.approx(1.5 / 4)


def test_votes_use_only_the_top_class_of_each_view():
    # Class 0 has high probability everywhere but is never a view's top-1: it gets no votes.
    probabilities = np.array([[0.8, 0.9, 0.0], [0.8, 0.0, 0.85]])
    class_index, confidence = voting.vote(probabilities)
    assert class_index == 1  # 0.9 / 2 = 0.45 vs 0.85 / 2 = 0.425
    assert confidence == pytest.approx(0.45)


def test_ties_resolve_to_the_lowest_class_index():
    # Equal vote sums for classes 2 and 0 -> class 0.
    class_index, confidence = voting.vote(np.array([[0.0, 0.1, 0.6], [0.6, 0.1, 0.0]]))
    assert (class_index, confidence) == (0, pytest.approx(0.3))
    # A view whose top probability is shared votes for the lower index.
    class_index, confidence = voting.vote(np.array([[0.1, 0.4, 0.4]]))
    assert (class_index, confidence) == (1, pytest.approx(0.4))


def test_batched_vote_equals_vote_per_image():
    rng = np.random.default_rng(0)
    probabilities = rng.uniform(size=(6, 22, 9))
    classes, confidences = voting.vote_batch(probabilities)
    assert classes.dtype == np.int64 and confidences.dtype == np.float32
    for row, class_index, confidence in zip(probabilities, classes, confidences):
        # An independent per-image loop.
        sums = np.zeros(9)
        for view in row:
            sums[int(np.argmax(view))] += view.max()
        assert class_index == int(np.argmax(sums))
        assert confidence == pytest.approx(sums.max() / 22, rel=1e-6)
        assert voting.vote(row) == (class_index, pytest.approx(float(confidence), rel=1e-6))


def test_vote_rejects_bad_input():
    with pytest.raises(ValueError):
        voting.vote(np.zeros(3))
    with pytest.raises(ValueError):
        voting.vote_batch(np.zeros((2, 0, 3)))
    with pytest.raises(ValueError):
        voting.vote(np.array([[0.5, np.nan]]))
