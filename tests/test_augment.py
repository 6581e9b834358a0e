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


# ---------------------------------------------------------------------------------------------
# Split mode: host prepares, DeviceAugmentation warps the batch.

RECIPE = AugmentParams()


def _device_inputs(images_0_255, crop_branch, noise):
    contract = ImageContract(images_0_255.shape[1])
    return {augment.IMAGES: tf.constant(contract.scale(images_0_255)),
            augment.CROP_BRANCH: tf.constant(crop_branch),
            augment.NOISE: tf.constant(noise, tf.float32)}


def _batch(count, size, seed=0):
    images = np.stack([_textured(size, size, seed + i) for i in range(count)]).astype(np.float32)
    noise = np.random.default_rng(seed).uniform(0, 1, (count, augment.NOISE_SIZE)).astype(np.float32)
    crop_branch = np.arange(count) % 2 == 0
    return images, crop_branch, noise


def test_noise_maps_to_the_branch_ranges_by_hand():
    branch = RECIPE.whole_branch  # rotation 4, shear 0.2, zoom 0.5, shifts 0.2, channel 25
    low = augment.branch_parameters(tf.zeros([augment.NOISE_SIZE]), branch, 30, 50)
    high = augment.branch_parameters(tf.fill([augment.NOISE_SIZE], 0.75), branch, 30, 50)
    degree = np.pi / 180
    np.testing.assert_allclose([float(low[k]) for k in ("rotation", "shear", "zoom_x", "zoom_y",
                                                         "shift_x", "shift_y")],
                               [-4 * degree, -0.2 * degree, 0.5, 0.5, -0.2 * 50, -0.2 * 30], rtol=1e-6)
    np.testing.assert_allclose([float(high[k]) for k in ("rotation", "zoom_x", "shift_x", "shift_y")],
                               [2 * degree, 1.25, 0.1 * 50, 0.1 * 30], rtol=1e-5)
    assert bool(low["flip"]) and not bool(high["flip"])  # flip when u < 0.5
    np.testing.assert_allclose(low["channel_offsets"], [-25] * 3)
    np.testing.assert_allclose(high["channel_offsets"], [12.5] * 3)
    no_flip = augment.branch_parameters(tf.zeros([augment.NOISE_SIZE]), NO_CHANGE, 30, 50)
    assert not bool(no_flip["flip"]) and float(no_flip["zoom_x"]) == 1.0


@pytest.mark.parametrize("params", [
    RECIPE,
    AugmentParams(crop_branch=dataclasses.replace(RECIPE.crop_branch, fill_mode="reflect"),
                  interpolation="nearest"),
], ids=["recipe", "two_fill_modes_nearest"])
def test_device_batch_reproduces_the_per_image_reference(params):
    """One batched transform in a tf.function == per-image reference, same parameters."""
    size = 40
    contract = ImageContract(size)
    images, crop_branch, noise = _batch(6, size)
    layer = augment.DeviceAugmentation(params)
    device = tf.function(lambda inputs: layer(inputs, training=True))(
        _device_inputs(images, crop_branch, noise)).numpy()
    parameters = augment.batch_parameters(noise, crop_branch, params, size, size)
    for index in range(len(images)):
        one = {key: value[index] for key, value in parameters.items()}
        branch = params.crop_branch if crop_branch[index] else params.whole_branch
        reference = augment.apply_branch_parameters(
            images[index], one, branch, size=size, contract=contract,
            interpolation=params.interpolation)
        np.testing.assert_allclose(device[index], contract.scale(reference.numpy()), atol=2e-4)
        assert np.abs(device[index] - contract.scale(images[index])).mean() > 0.01  # it did change


def test_device_layer_is_identity_unless_training():
    images, crop_branch, noise = _batch(3, 32)
    inputs = _device_inputs(images, crop_branch, noise)
    layer = augment.DeviceAugmentation()
    for training in (False, None):
        np.testing.assert_array_equal(layer(inputs, training=training).numpy(),
                                      inputs[augment.IMAGES].numpy())
    assert not np.allclose(layer(inputs, training=True).numpy(), inputs[augment.IMAGES].numpy())
    as_tensor = tf.function(lambda x, flag: layer(x, training=flag))
    np.testing.assert_array_equal(as_tensor(inputs, tf.constant(False)).numpy(),
                                  inputs[augment.IMAGES].numpy())


def test_branch_flag_selects_the_branch_parameters():
    """Crop branch without changes: its images pass unchanged; whole-branch images change."""
    params = AugmentParams(crop_branch=NO_CHANGE)
    images, _, noise = _batch(4, 32, seed=3)
    layer = augment.DeviceAugmentation(params)
    for flags in ([True, False, True, False], [False, True, False, True]):
        flags = np.array(flags)
        inputs = _device_inputs(images, flags, noise)
        out = layer(inputs, training=True).numpy()
        original = inputs[augment.IMAGES].numpy()
        np.testing.assert_allclose(out[flags], original[flags], atol=1e-5)
        assert all(np.abs(o - i).mean() > 0.01 for o, i in zip(out[~flags], original[~flags]))


def test_channel_shift_on_device_is_in_pixel_units_of_the_recipe():
    """Channel shift only: each channel moves by its offset (pixel units / 127.5), clipped."""
    params = AugmentParams(crop_branch=BranchParams(channel_shift=20.0))
    images = np.full((2, 32, 32, 3), 100.0, np.float32)
    images[:, 0, 0] = [0, 255, 50]  # sets each image's [min, max] to [0, 255]: no clipping
    noise = np.zeros((2, augment.NOISE_SIZE), np.float32)
    noise[:, 7:] = [[0.0, 0.5, 1.0], [0.75, 0.25, 0.5]]  # offsets -20, 0, +20 / +10, -10, 0
    out = augment.DeviceAugmentation(params)(
        _device_inputs(images, np.array([True, True]), noise), training=True).numpy()
    shifted = (out[:, 5, 5] + 1.0) * 127.5
    np.testing.assert_allclose(shifted, [[80, 100, 120], [110, 90, 100]], atol=1e-3)


def test_seeded_augment_batch_is_stateless_inside_tf_function():
    images, crop_branch, _ = _batch(4, 32)
    scaled = ImageContract(32).scale(images)
    run = tf.function(lambda seed: augment.augment_batch(scaled, crop_branch, seed, RECIPE))
    first, again, other = run(_seed(1)).numpy(), run(_seed(1)).numpy(), run(_seed(2)).numpy()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).mean() > 0.01
    assert np.isfinite(first).all() and first.min() >= -1 and first.max() <= 1


def _two_cpu_strategy():
    """2 replicas on conftest's logical CPUs, collective keys moved as in test_losses.py."""
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return strategy


def test_device_layer_on_two_replicas_equals_one_device():
    """Randomness travels with the images, so a replica's rows get the same result as on one
    device, whatever the split."""
    images, crop_branch, noise = _batch(6, 32, seed=5)
    inputs = _device_inputs(images, crop_branch, noise)
    single = augment.DeviceAugmentation()(inputs, training=True).numpy()
    strategy = _two_cpu_strategy()
    with strategy.scope():
        layer = augment.DeviceAugmentation()
    split = (0, 4, 6)

    def value_fn(context):
        start, stop = split[context.replica_id_in_sync_group:context.replica_id_in_sync_group + 2]
        return {key: value[start:stop] for key, value in inputs.items()}

    per_replica = strategy.experimental_distribute_values_from_function(value_fn)
    outputs = tf.function(lambda x: strategy.run(lambda y: layer(y, training=True), args=(x,)))(
        per_replica)
    local = [value.numpy() for value in strategy.experimental_local_results(outputs)]
    assert [len(part) for part in local] == [4, 2]
    np.testing.assert_allclose(np.concatenate(local), single, atol=1e-6)


def test_device_layer_config_round_trip():
    import keras

    params = AugmentParams(crop_probability=0.3, interpolation="nearest",
                           whole_branch=BranchParams(rotation_degrees=7, fill_mode="reflect"))
    layer = augment.DeviceAugmentation(params, name="aug")
    assert keras.saving.get_registered_name(augment.DeviceAugmentation) == "landmarks>DeviceAugmentation"
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, augment.DeviceAugmentation)
    assert restored.params == params and restored.name == "aug"
    assert augment.DeviceAugmentation.from_config(layer.get_config()).params == params
    with pytest.raises(ValueError):
        augment.DeviceAugmentation({"crop_probability": 2.0})


def test_training_wrapper_shares_weights_and_is_plain_model_when_not_training():
    import keras

    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(3, activation="sigmoid")], name="tiny")
    wrapper = augment.with_device_augmentation(model, RECIPE)
    assert wrapper.count_params() == model.count_params()
    images, crop_branch, noise = _batch(2, 32)
    inputs = _device_inputs(images, crop_branch, noise)
    np.testing.assert_allclose(wrapper(inputs, training=False).numpy(),
                               model(inputs[augment.IMAGES]).numpy(), atol=1e-6)
    augmented = augment.DeviceAugmentation(RECIPE)(inputs, training=True)
    np.testing.assert_allclose(wrapper(inputs, training=True).numpy(), model(augmented).numpy(),
                               atol=1e-6)  # training=True reaches the augmentation
    assert not np.allclose(wrapper(inputs, training=True).numpy(),
                           wrapper(inputs, training=False).numpy(), atol=1e-4)
    assert "device_augmentation" not in [layer.name for layer in model.layers]


def test_host_preparation_plus_device_equals_host_augmentation():
    """prepare_jpeg_for_device + the device layer == augment_jpeg for the same seed."""
    contract = ImageContract(40)
    jpeg = _jpeg(_textured(50, 70, seed=4))
    prepared = [augment.prepare_jpeg_for_device(jpeg, _seed(i), RECIPE, contract) for i in range(6)]
    inputs = {key: tf.stack([p[key] for p in prepared]) for key in prepared[0]}
    assert set(inputs[augment.CROP_BRANCH].numpy().tolist()) == {0.0, 1.0}  # both branches
    inputs[augment.IMAGES] = contract.scale(inputs[augment.IMAGES])
    device = augment.DeviceAugmentation(RECIPE)(inputs, training=True).numpy()
    for i in range(6):
        host = augment.augment_jpeg(jpeg, _seed(i), RECIPE, contract).numpy()
        np.testing.assert_allclose(device[i], contract.scale(host), atol=2e-4)


def test_device_layer_computes_in_float32_under_mixed_precision():
    import keras

    images, crop_branch, noise = _batch(2, 32, seed=8)
    inputs = _device_inputs(images, crop_branch, noise)
    expected = augment.DeviceAugmentation()(inputs, training=True).numpy()
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        layer = augment.DeviceAugmentation()
        out = layer(inputs, training=True)
    finally:
        keras.config.set_dtype_policy(previous)
    assert layer.compute_dtype == "float32" and out.dtype == tf.float32
    np.testing.assert_array_equal(out.numpy(), expected)
