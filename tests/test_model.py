"""The classifier: shapes and values of the head, phased unfreezing, weights files, precision."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import layers
from trainer import model as model_lib

SIZE = 71  # Xception's smallest input: builds in ~1 s
NUM_CLASSES = 5


@pytest.fixture(scope="module")
def classifier():
    keras.utils.set_random_seed(0)
    return model_lib.build_model(NUM_CLASSES, SIZE, backbone_weights="none")


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_probabilities_equal_the_head_computed_by_hand(classifier, images):
    probabilities = classifier(images, training=False).numpy()
    assert probabilities.shape == (3, NUM_CLASSES) and probabilities.dtype == np.float32
    assert np.all((probabilities > 0) & (probabilities < 1))

    features = classifier.get_layer("xception")(images, training=False).numpy().astype(np.float64)
    assert features.shape == (3, 3, 3, 2048)
    p = float(classifier.get_layer("gem").p.numpy())
    pooled = (np.mean(np.abs(features) ** p, axis=(1, 2)) + 1e-8) ** (1 / p)  # GeM
    kernel, bias = (w.numpy().astype(np.float64) for w in classifier.get_layer("logits").weights)
    expected = sigmoid(np.maximum(pooled, 0.0) @ kernel + bias)  # dropout is off at inference
    np.testing.assert_allclose(probabilities, expected, rtol=1e-5)


def test_layer_names_and_embedding(classifier, images):
    names = [layer.name for layer in classifier.layers]
    assert names == ["images", "xception", "gem", "dropout", "relu", "logits", "probabilities"]
    assert isinstance(classifier.get_layer("gem"), layers.GeMPooling)
    assert classifier.get_layer("dropout").rate == 0.05
    embedder = model_lib.embedding_model(classifier)
    embeddings = embedder(images, training=False).numpy()
    assert embeddings.shape == (3, 2048)
    # same weights: the embedding is the GeM of the classifier's own backbone
    features = classifier.get_layer("xception")(images, training=False).numpy()
    np.testing.assert_allclose(embeddings, layers.gem(features, 3.0).numpy(), rtol=1e-5)


def count_weights_when_trainable(backbone):
    """Per backbone layer, how many weights it trains when unfrozen; BatchNorm never trains."""
    backbone.trainable = True
    return [
        0 if isinstance(layer, keras.layers.BatchNormalization) else len(layer.trainable_weights)
        for layer in backbone.layers
    ]


@pytest.mark.parametrize("first_index", [None, 85, 25, 0])
def test_set_trainable_from_freezes_exactly_the_layers_before(classifier, first_index):
    backbone = classifier.get_layer("xception")
    per_layer = count_weights_when_trainable(backbone)
    head = 3  # gem/p, logits/kernel, logits/bias
    expected = head + (0 if first_index is None else sum(per_layer[first_index:]))

    model_lib.set_trainable_from(classifier, first_index)
    assert len(classifier.trainable_weights) == expected
    trainable_ids = {id(w) for w in classifier.trainable_weights}
    for index, layer in enumerate(backbone.layers):
        is_batchnorm = isinstance(layer, keras.layers.BatchNormalization)
        should_train = first_index is not None and index >= first_index and not is_batchnorm
        assert layer.trainable == should_train, layer.name
        assert all((id(w) in trainable_ids) == should_train for w in layer.weights if w.trainable or should_train)
    assert id(classifier.get_layer("gem").p) in trainable_ids
    model_lib.set_trainable_from(classifier, None)


def test_recipe_phase_counts(classifier):
    # Concrete numbers for the recipe's phases (Keras 3.15's Xception has 132 layers):
    counts = {}
    for first_index in (None, 85, 25):
        model_lib.set_trainable_from(classifier, first_index)
        counts[first_index] = len(classifier.trainable_weights)
    model_lib.set_trainable_from(classifier, None)
    assert len(classifier.get_layer("xception").layers) == 132
    assert counts[None] == 3 < counts[85] < counts[25]


def test_batchnorm_stays_in_inference_mode_when_unfrozen(classifier, images):
    """A training-mode call (as in fit) on a fully unfrozen backbone leaves BN statistics alone."""
    model_lib.set_trainable_from(classifier, 0)
    backbone = classifier.get_layer("xception")
    batchnorm = backbone.get_layer("block1_conv1_bn")
    conv = backbone.get_layer("block1_conv1")
    moving_mean = batchnorm.moving_mean.numpy().copy()
    moving_variance = batchnorm.moving_variance.numpy().copy()
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(classifier(images, training=True))
    gradient = tape.gradient(loss, conv.kernel)
    model_lib.set_trainable_from(classifier, None)
    np.testing.assert_array_equal(batchnorm.moving_mean.numpy(), moving_mean)
    np.testing.assert_array_equal(batchnorm.moving_variance.numpy(), moving_variance)
    assert gradient is not None and np.any(gradient.numpy() != 0)


def test_set_trainable_from_rejects_bad_index(classifier):
    with pytest.raises(ValueError, match="first_index"):
        model_lib.set_trainable_from(classifier, 1000)


def test_local_weights_file_is_loaded(tmp_path, classifier, images):
    path = tmp_path / "backbone.weights.h5"
    classifier.get_layer("xception").save_weights(path)
    loaded = model_lib.build_model(NUM_CLASSES, SIZE, backbone_weights=str(path))
    fresh = model_lib.build_model(NUM_CLASSES, SIZE, backbone_weights="none")
    source_weights = classifier.get_layer("xception").get_weights()
    for got, want in zip(loaded.get_layer("xception").get_weights(), source_weights):
        np.testing.assert_array_equal(got, want)
    # a fresh random backbone differs, so the equality above is not an accident
    assert not all(np.array_equal(a, b) for a, b in zip(fresh.get_layer("xception").get_weights(), source_weights))


@pytest.mark.parametrize(
    "bad, message",
    [("imagenett", "backbone_weights"), ("/no/such/backbone.weights.h5", "does not exist"), (3, "backbone_weights")],
)
def test_bad_backbone_weights_raise_value_error(bad, message):
    with pytest.raises(ValueError, match=message):
        model_lib.build_model(NUM_CLASSES, SIZE, backbone_weights=bad)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"image_size": 64}, "image_size"), ({"num_classes": 0}, "num_classes"), ({"dropout": 1.0}, "dropout")],
)
def test_bad_arguments_raise_value_error(kwargs, message):
    arguments = {"num_classes": NUM_CLASSES, "image_size": SIZE, **kwargs}
    with pytest.raises(ValueError, match=message):
        model_lib.build_model(**arguments)


def test_mixed_bfloat16_policy_keeps_float32_output(images):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = model_lib.build_model(NUM_CLASSES, SIZE, backbone_weights="none")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert mixed.get_layer("gem").compute_dtype == "bfloat16"
    assert mixed.get_layer("gem").p.dtype == "float32"
    assert mixed.get_layer("xception").get_layer("block1_conv1").compute_dtype == "bfloat16"
    assert mixed.get_layer("logits").compute_dtype == "float32"
    probabilities = mixed(images, training=False)
    assert probabilities.dtype == tf.float32
    assert np.all(np.isfinite(probabilities.numpy()))
    assert np.all((probabilities.numpy() > 0) & (probabilities.numpy() < 1))


def test_model_keras_round_trip(tmp_path, classifier, images):
    classifier.get_layer("gem").p.assign(2.2)
    path = tmp_path / "model.keras"
    classifier.save(path)
    loaded = keras.models.load_model(path)  # GeMPooling is registered
    np.testing.assert_allclose(
        loaded(images, training=False).numpy(), classifier(images, training=False).numpy(), rtol=1e-6
    )
    np.testing.assert_allclose(float(loaded.get_layer("gem").p.numpy()), 2.2, rtol=1e-7)
    assert model_lib.embedding_model(loaded).output.shape == (None, 2048)
    classifier.get_layer("gem").p.assign(3.0)
