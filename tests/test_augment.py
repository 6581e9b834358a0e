"""The recipe's augmentation: transforms against hand-computed references, branches, ranges."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from trainer import augment
from trainer.augment import AugmentParams, BranchParams
from trainer.preprocessing import ImageContract

NO_CHANGE = BranchParams()


def _textured(height, width, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 90 * np.sin(x / 4.0)[..., None] * np.cos(y / 6.0 + seed)[..., None]
    return np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)


def _seed(value):
    return tf.constant([value, 12345], tf.int64)


def test_defaults_are_the_recipe_numbers():
    params = AugmentParams()
    assert (params.crop_probability, params.crop_extra_offset, params.crop_extra_span) == (0.5, 0.01, 0.5)
    crop, whole = params.crop_branch, params.whole_branch
    assert (crop.rotation_degrees, crop.shear_degrees, crop.zoom_range, crop.channel_shift) == (4, 0.2, 0.1, 20)
    assert (crop.width_shift, crop.height_shift, crop.horizontal_flip) == (0, 0, True)
    assert (whole.rotation_degrees, whole.width_shift, whole.height_shift, whole.shear_degrees,
            whole.zoom_range, whole.channel_shift) == (4, 0.2, 0.2, 0.2, 0.5, 25)
    assert whole.horizontal_flip and whole.fill_mode == "nearest"
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.crop_probability = 1.0


@pytest.mark.parametrize("bad", [dict(zoom_range=1.0), dict(rotation_degrees=-1), dict(fill_mode="mirror")])
def test_branch_params_are_validated(bad):
    with pytest.raises(ValueError):
        BranchParams(**bad)


def test_augment_params_are_validated():
    with pytest.raises(ValueError):
        AugmentParams(crop_probability=1.5)
    with pytest.raises(ValueError):
        AugmentParams(crop_branch={"rotation_degrees": 4})


def _apply(image, **kwargs):
    height, width = image.shape[:2]
    matrix = augment.transform_matrix(height=height, width=width, **kwargs)
    return augment.apply_transform(tf.constant(image, tf.float32), matrix).numpy()


def test_identity_flip_rotation_shift_and_zoom_against_numpy():
    image = _textured(24, 24).astype(np.float32)
    np.testing.assert_allclose(_apply(image), image, atol=1e-4)
    np.testing.assert_allclose(_apply(image, flip=True), image[:, ::-1], atol=1e-4)
    # Output (x, y) reads input (cx - (y - cy), cy + (x - cx)): numpy's rot90 on a square image.
    np.testing.assert_allclose(_apply(image, rotation=np.pi / 2), np.rot90(image), atol=1e-3)
    # A shift of +3 px reads 3 px to the right; past the edge, "nearest" repeats the last column.
    shifted = _apply(image, shift_x=3.0)
    np.testing.assert_allclose(shifted[:, :-3], image[:, 3:], atol=1e-4)
    np.testing.assert_allclose(shifted[:, -3:], np.repeat(image[:, -1:], 3, axis=1), atol=1e-4)
    # Zoom 2 about the centre (23 / 2 = 11.5) on x: output x reads input 2x - 11.5.
    zoomed = _apply(image, zoom_x=2.0)
    expected = 0.5 * (image[:, 6] + image[:, 7])  # output x = 9 reads 6.5: halfway 6 and 7
    np.testing.assert_allclose(zoomed[:, 9], expected, atol=1e-3)


def test_shear_follows_keras_matrix():
    matrix = augment.transform_matrix(height=11, width=11, shear=0.3).numpy()
    centre = 5.0
    x, y = 8.0, 2.0
    mapped = matrix @ np.array([x, y, 1.0])
    expected = np.array([centre + (x - centre) - np.sin(0.3) * (y - centre),
                         centre + np.cos(0.3) * (y - centre), 1.0])
    np.testing.assert_allclose(mapped, expected, atol=1e-5)


def test_channel_shift_offsets_each_channel_within_image_range():
    image = tf.constant(_textured(16, 16).astype(np.float32))
    shifted = augment.channel_shift(image, _seed(3), 25.0).numpy()
    low, high = float(tf.reduce_min(image)), float(tf.reduce_max(image))
    assert shifted.min() >= low and shifted.max() <= high
    inside = (shifted > low) & (shifted < high)
    offsets = [np.unique(np.round((shifted - image.numpy())[..., c][inside[..., c]], 3)) for c in range(3)]
    assert all(len(o) == 1 and abs(o[0]) <= 25 for o in offsets)  # one offset per channel
    assert len({float(o[0]) for o in offsets}) == 3  # drawn independently
    assert augment.channel_shift(image, _seed(3), 0.0) is image


def test_crop_branch_taken_about_half_the_time_and_reproducibly():
    params = AugmentParams()
    taken = [bool(augment.takes_crop_branch(_seed(i), params)) for i in range(1000)]
    assert 0.45 < np.mean(taken) < 0.55
    assert taken == [bool(augment.takes_crop_branch(_seed(i), params)) for i in range(1000)]
    assert not any(bool(augment.takes_crop_branch(_seed(i), AugmentParams(crop_probability=0.0)))
                   for i in range(50))


def test_crop_window_matches_recipe_scale_and_stays_inside():
    params = AugmentParams()
    ratios = []
    for i in range(300):
        y, x, h, w = augment.crop_window(_seed(i), 300, 500, params).numpy()
        assert 0 <= y and y + h <= 300 and 0 <= x and x + w <= 500
        ratios.append((300 / h, 500 / w))
    ratios = np.array(ratios)  # = 1 + c, c in [0.01, 0.51]
    assert ratios.min() > 1.005 and ratios.max() < 1.52
    assert np.abs(ratios[:, 0] - ratios[:, 1]).max() < 0.01  # same c for both axes
    assert ratios.mean() == pytest.approx(1.26, abs=0.03)


def test_crop_then_resize_equals_recipe_resize_then_crop():
    """The crop-first shortcut gives the same pixels as the recipe's resize-then-window order."""
    contract = ImageContract(64)
    y, x = np.mgrid[0:128, 0:128]
    smooth = np.stack([x * 2, y * 2, (x + y)], axis=-1).astype(np.float32)  # linear ramps
    c, size = 0.25, 64
    big = contract.resize(smooth, int(round((1 + c) * size)))  # 80 px
    oy, ox = 8, 12  # window in the 80 px image -> offsets 8 * 1.6, 12 * 1.6 in the original
    recipe = big[oy:oy + size, ox:ox + size]
    scale = 128 / 80
    window = smooth[round(oy * scale):round(oy * scale) + round(128 / (1 + c)),
                    round(ox * scale):round(ox * scale) + round(128 / (1 + c))]
    shortcut = contract.resize(window, size)
    assert np.abs(shortcut - recipe)[2:-2, 2:-2].max() < 1.5  # pixel units of [0, 255]


def _jpeg(image):
    return tf.io.encode_jpeg(image, quality=95)


def test_augment_jpeg_changes_images_stays_finite_in_range_and_is_seeded():
    contract = ImageContract(48)
    jpeg = _jpeg(_textured(60, 90))
    plain = contract.resize(tf.io.decode_jpeg(jpeg, channels=3)).numpy()
    outputs = [augment.augment_jpeg(jpeg, _seed(i), AugmentParams(), contract).numpy()
               for i in range(8)]
    for out in outputs:
        assert out.shape == (48, 48, 3) and np.isfinite(out).all()
        assert out.min() >= 0 and out.max() <= 255
        assert np.abs(out - plain).mean() > 1.0
    again = augment.augment_jpeg(jpeg, _seed(3), AugmentParams(), contract).numpy()
    np.testing.assert_array_equal(again, outputs[3])
    assert np.abs(outputs[0] - outputs[1]).mean() > 1.0


def test_flips_really_flip():
    """Only flips switched on: the output is the resized image or its exact mirror, both seen."""
    contract = ImageContract(40)
    jpeg = _jpeg(_textured(50, 70))
    plain = contract.resize(tf.io.decode_jpeg(jpeg, channels=3)).numpy()
    params = AugmentParams(crop_probability=0.0,
                           whole_branch=BranchParams(horizontal_flip=True))
    seen = set()
    for i in range(16):
        out = augment.augment_jpeg(jpeg, _seed(i), params, contract).numpy()
        if np.allclose(out, plain, atol=1e-3):
            seen.add("same")
        else:
            np.testing.assert_allclose(out, plain[:, ::-1], atol=1e-3)
            seen.add("mirrored")
    assert seen == {"same", "mirrored"}


def test_crop_branch_without_changes_is_a_resized_window():
    contract = ImageContract(40)
    image = _textured(64, 80)
    jpeg = _jpeg(image)
    params = AugmentParams(crop_probability=1.0, crop_branch=NO_CHANGE)
    decoded = tf.io.decode_jpeg(jpeg, channels=3).numpy()
    for i in range(3):
        out = augment.augment_jpeg(jpeg, _seed(i), params, contract).numpy()
        # Same derivation of the window seed as augment_jpeg: split into (branch, crop, change).
        crop_seed = tf.random.experimental.stateless_split(_seed(i), num=3)[1]
        y, x, h, w = augment.crop_window(crop_seed, 64, 80, params).numpy()
        expected = contract.resize(decoded[y:y + h, x:x + w], 40)
        # decode_and_crop_jpeg upsamples chroma at the window's edge from fewer neighbours.
        np.testing.assert_allclose(out[1:-1, 1:-1], expected[1:-1, 1:-1], atol=1e-3)
        assert np.abs(out - expected).max() < 6


def test_same_result_eagerly_and_inside_tf_data():
    contract = ImageContract(40)
    jpeg = _jpeg(_textured(50, 60, seed=2))
    seeds = [_seed(i) for i in range(4)]
    eager = [augment.augment_jpeg(jpeg, s, AugmentParams(), contract).numpy() for s in seeds]
    dataset = tf.data.Dataset.from_tensor_slices(tf.stack(seeds)).map(
        lambda s: augment.augment_jpeg(jpeg, s, AugmentParams(), contract))
    for got, want in zip(dataset.as_numpy_iterator(), eager):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("shape", [(50, 70), (30, 36)])  # shrink and enlarge
def test_fast_path_folds_the_resize_into_the_transform(shape):
    """antialias=False, no changes: the one transform equals plain bilinear resizing."""
    contract = ImageContract(40)
    image = _textured(*shape)
    params = AugmentParams(crop_probability=0.0, whole_branch=NO_CHANGE, antialias=False)
    out = augment.augment_jpeg(_jpeg(image), _seed(0), params, contract).numpy()
    decoded = tf.io.decode_jpeg(_jpeg(image), channels=3)
    expected = tf.image.resize(decoded, (40, 40), antialias=False).numpy()
    np.testing.assert_allclose(out, expected, atol=1e-2)


def test_fast_nearest_path_is_finite_in_range_and_differs_from_plain():
    contract = ImageContract(48)
    jpeg = _jpeg(_textured(60, 90))
    plain = contract.resize(tf.io.decode_jpeg(jpeg, channels=3)).numpy()
    params = AugmentParams(antialias=False, interpolation="nearest")
    for i in range(6):
        out = augment.augment_jpeg(jpeg, _seed(i), params, contract).numpy()
        assert np.isfinite(out).all() and out.min() >= 0 and out.max() <= 255
        assert np.abs(out - plain).mean() > 1.0
    with pytest.raises(ValueError):
        AugmentParams(interpolation="bicubic")
