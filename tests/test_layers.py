"""GeM pooling: values by hand, gradient to p, low precision, save/load round trip."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import layers

# One image, 2 x 2 grid, 2 channels. Channel 0 holds 1, -2, 3, -4; channel 1 holds 0, 0, 0, 2.
HAND_MAP = np.array(
    [[[[1.0, 0.0], [-2.0, 0.0]], [[3.0, 0.0], [-4.0, 2.0]]]], dtype=np.float32
)  # [1, 2, 2, 2]


def test_gem_p1_is_mean_of_absolute_values():
    pooled = layers.gem(HAND_MAP, 1.0).numpy()
    # channel 0: (1 + 2 + 3 + 4) / 4 = 2.5; channel 1: 2 / 4 = 0.5 (epsilon 1e-8 is below float32
    # resolution at these magnitudes).
    np.testing.assert_allclose(pooled, [[2.5, 0.5]], rtol=1e-6)


def test_gem_p3_by_hand():
    pooled = layers.gem(HAND_MAP, 3.0).numpy()
    # channel 0: (1 + 8 + 27 + 64) / 4 = 25, 25^(1/3) = 2.9240177...
    # channel 1: 8 / 4 = 2, 2^(1/3) = 1.2599210...
    np.testing.assert_allclose(pooled, [[2.9240177382, 1.2599210499]], rtol=1e-6)


def test_gem_epsilon_is_inside_the_root():
    zeros = np.zeros((2, 3, 3, 4), np.float32)
    pooled = layers.gem(zeros, 2.0, epsilon=1e-6).numpy()
    # (0 + 1e-6)^(1/2) = 1e-3
    np.testing.assert_allclose(pooled, np.full((2, 4), 1e-3), rtol=1e-5)


def test_gem_rejects_non_4d_input():
    with pytest.raises(ValueError, match="B, H, W, C"):
        layers.gem(np.ones((2, 3), np.float32), 3.0)


def test_layer_output_and_initial_p():
    layer = layers.GeMPooling()
    pooled = layer(HAND_MAP).numpy()
    assert float(layer.p.numpy()) == 3.0
    np.testing.assert_allclose(pooled, [[2.9240177382, 1.2599210499]], rtol=1e-6)


def test_gradient_reaches_p_and_matches_finite_difference():
    rng = np.random.default_rng(0)
    feature_map = np.maximum(rng.normal(size=(3, 4, 4, 5)), 0.0).astype(np.float32)  # ReLU zeros
    layer = layers.GeMPooling(p_init=2.5)
    layer.build(feature_map.shape)
    with tf.GradientTape() as tape:
        total = tf.reduce_sum(layer(feature_map))
    grad_p = tape.gradient(total, layer.p)
    assert grad_p is not None
    grad_p = float(grad_p.numpy())
    assert math.isfinite(grad_p) and grad_p != 0.0

    # Independent float64 reference of d/dp sum_k (mean |a|^p + eps)^(1/p), central difference.
    def total_at(p):
        mean = np.mean(np.abs(feature_map.astype(np.float64)) ** p, axis=(1, 2)) + 1e-8
        return np.sum(mean ** (1.0 / p))

    h = 1e-4
    expected = (total_at(2.5 + h) - total_at(2.5 - h)) / (2 * h)
    np.testing.assert_allclose(grad_p, expected, rtol=1e-3)


def test_gradient_finite_on_all_zero_channel():
    layer = layers.GeMPooling()
    zeros = tf.zeros((1, 2, 2, 3))
    layer.build(zeros.shape)
    with tf.GradientTape() as tape:
        tape.watch(zeros)
        total = tf.reduce_sum(layer(zeros))
    grad_p, grad_x = tape.gradient(total, [layer.p, zeros])
    assert np.all(np.isfinite(grad_p.numpy()))
    assert np.all(np.isfinite(grad_x.numpy()))


def test_float16_policy_does_not_overflow():
    # 50^3 = 125000 > float16 max 65504: a float16 power mean would be inf.
    layer = layers.GeMPooling(dtype="mixed_float16")
    feature_map = np.full((1, 2, 2, 1), 50.0, np.float32)
    pooled = layer(feature_map)
    assert pooled.dtype == tf.float16
    assert layer.p.dtype == "float32"
    np.testing.assert_allclose(pooled.numpy().astype(np.float32), [[50.0]], rtol=1e-3)


def test_registered_name():
    assert keras.saving.get_registered_name(layers.GeMPooling) == "landmarks>GeMPooling"


def test_save_load_round_trip(tmp_path):
    inputs = keras.Input((5, 5, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="conv")(inputs)
    x = layers.GeMPooling(p_init=2.5, epsilon=1e-7, name="gem")(x)
    outputs = keras.layers.Dense(2, name="dense")(x)
    model = keras.Model(inputs, outputs)
    model.get_layer("gem").p.assign(2.2)  # a "learned" value, distinct from p_init
    images = np.random.default_rng(1).uniform(-1, 1, (3, 5, 5, 3)).astype(np.float32)
    expected = model.predict(images, verbose=0)

    path = tmp_path / "gem_model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)  # no custom_objects: the class is registered

    gem_layer = loaded.get_layer("gem")
    assert isinstance(gem_layer, layers.GeMPooling)
    assert gem_layer.get_config()["p_init"] == 2.5
    assert gem_layer.get_config()["epsilon"] == 1e-7
    np.testing.assert_allclose(float(gem_layer.p.numpy()), 2.2, rtol=1e-7)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-6)


def test_rejects_non_positive_p_init():
    with pytest.raises(ValueError, match="p_init"):
        layers.GeMPooling(p_init=0.0)
