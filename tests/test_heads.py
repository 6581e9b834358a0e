"""The pluggable heads (trainer/heads.py): dynamic margins, the cosine layer, the ArcFace loss
against a numpy reference (non-landmark images excluded), the exported outputs and embeddings,
mixed precision, and the flags.

The one-step equality on 2 replicas and a CLI run with resume are in tests/test_train.py.
"""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from test_losses import reference_loss, run_split, targets_from_labels, two_cpu_strategy
from trainer import config as config_lib
from trainer import heads, layers, losses, metrics
from trainer import model as model_lib

SIZE = 71
NUM_CLASSES = 5


# ---------------------------------------------------------------------------------------------
# Dynamic margins (Ha et al. 2020).


def test_dynamic_margins_follow_a_power_law_spanning_the_range():
    counts = np.array([1000, 1, 50, 7, 200])
    margins = heads.dynamic_margins(counts)  # lambda 0.25, [0.05, 0.5]
    assert margins[0] == pytest.approx(0.05) and margins[1] == pytest.approx(0.5)
    # m = a * n^(-1/4) + b, with a and b solved from the two extreme classes.
    a = (0.5 - 0.05) / (1 ** -0.25 - 1000 ** -0.25)
    b = 0.05 - a * 1000 ** -0.25
    np.testing.assert_allclose(margins, a * counts ** -0.25 + b, rtol=1e-12)
    assert np.all(np.diff(margins[np.argsort(counts)]) < 0)  # fewer images, larger margin


def test_dynamic_margins_edge_cases():
    # A class without training images gets the largest margin and does not stretch the range.
    np.testing.assert_allclose(heads.dynamic_margins([16, 0, 1]), [0.05, 0.5, 0.5])
    np.testing.assert_allclose(heads.dynamic_margins([10, 10, 10]), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(heads.dynamic_margins([81, 1], 0.1, 0.3, 0.5), [0.1, 0.3])


def test_per_class_counts_from_count_labels_dict():
    counts = heads.per_class_counts({-1: 7, 0: 3, 2: 5}, 4)
    np.testing.assert_array_equal(counts, [3, 0, 5, 0])


# ---------------------------------------------------------------------------------------------
# The cosine layer.


def test_cosine_classifier_is_the_max_cosine_over_sub_centers(tmp_path):
    rng = np.random.default_rng(0)
    layer = layers.CosineClassifier(3, subcenters=2)
    inputs = rng.normal(size=(4, 6)).astype(np.float32)
    cosines = layer(inputs).numpy()
    kernel = layer.kernel.numpy().astype(np.float64)  # [6, 3 * 2], class-major
    unit_inputs = inputs / np.linalg.norm(inputs, axis=1, keepdims=True)
    unit_kernel = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    expected = (unit_inputs @ unit_kernel).reshape(4, 3, 2).max(axis=-1)
    np.testing.assert_allclose(cosines, expected, rtol=1e-5, atol=1e-6)
    assert cosines.dtype == np.float32

    model = keras.Sequential([keras.Input((6,)), layer])
    model.save(tmp_path / "m.keras")
    loaded = keras.saving.load_model(tmp_path / "m.keras")  # registered: no custom_objects
    np.testing.assert_allclose(loaded(inputs).numpy(), cosines, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# The ArcFace loss.


def reference_arcface(labels, cosines, margins, scale):
    """Per-image loss in float64 numpy, 0 for label -1 (trainer/losses.py docstring)."""
    cosines = np.asarray(cosines, np.float64)
    result = np.zeros(len(labels))
    for i, label in enumerate(labels):
        if label < 0:
            continue
        m = margins[label] if np.ndim(margins) else margins
        theta = math.acos(cosines[i, label])
        phi = math.cos(theta + m) if theta + m <= math.pi else cosines[i, label] - m * math.sin(m)
        logits = scale * cosines[i].copy()
        logits[label] = scale * phi
        result[i] = np.log(np.exp(logits - logits.max()).sum()) + logits.max() - scale * phi
    return result


def random_cosines(rng, batch, num_classes):
    cosines = rng.uniform(-0.9, 0.9, (batch, num_classes))
    cosines[0, 0] = -0.99  # theta + m beyond pi: the linear continuation
    return cosines.astype(np.float32)


@pytest.mark.parametrize("margins", [0.5, [0.05, 0.5, 0.2, 0.3]], ids=["fixed", "per_class"])
def test_arcface_loss_matches_reference(margins):
    rng = np.random.default_rng(1)
    labels = np.array([0, 1, -1, 3, 2, -1, 1, 0], np.int64)
    cosines = random_cosines(rng, len(labels), 4)
    per_image = losses.arc_margin_cross_entropy(labels, cosines, margins, 30.0).numpy()
    expected = reference_arcface(labels, cosines, margins, 30.0)
    np.testing.assert_allclose(per_image, expected, rtol=1e-4, atol=1e-4)
    assert np.all(per_image[labels == -1] == 0.0)
    # The Keras loss is the mean over the landmark images (6 of 8), also for float labels.
    loss = losses.ArcMarginLoss(margins=margins, scale=30.0)
    value = float(loss(labels.astype(np.float32)[:, None], cosines).numpy())
    np.testing.assert_allclose(value, expected.sum() / 6, rtol=1e-5)


def test_non_landmark_images_add_neither_loss_nor_gradient():
    """Non-landmarks (-1) are excluded: the loss of a batch with them equals the loss of its
    landmark images alone, their rows get an exactly zero gradient, and the landmark rows' the
    same gradient as without them."""
    rng = np.random.default_rng(2)
    labels = np.array([0, -1, 2, -1, 1], np.int64)
    cosines = tf.constant(random_cosines(rng, len(labels), 3))
    keep = labels >= 0
    loss = losses.ArcMarginLoss(margins=[0.1, 0.3, 0.5], scale=30.0)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(cosines)
        mixed = loss(labels, cosines)
        landmarks_only = loss(labels[keep], tf.boolean_mask(cosines, keep))
    np.testing.assert_allclose(float(mixed), float(landmarks_only), rtol=1e-6)
    gradient = tape.gradient(mixed, cosines).numpy()
    assert np.all(gradient[~keep] == 0.0)
    np.testing.assert_allclose(gradient[keep], tape.gradient(landmarks_only, cosines).numpy()[keep],
                               rtol=1e-6)
    assert np.all(np.isfinite(gradient)) and np.any(gradient[keep] != 0)
    # A batch of non-landmarks only: loss 0, no gradient.
    with tf.GradientTape() as tape:
        tape.watch(cosines)
        nothing = loss(np.full(5, -1), cosines)
    assert float(nothing) == 0.0 and np.all(tape.gradient(nothing, cosines).numpy() == 0.0)


def test_sigmoid_head_keeps_an_all_zero_target_for_non_landmark_images():
    """The recipe: a non-landmark (-1) image is trained towards a low score on every class,
    so, unlike with the ArcFace heads, it adds loss and gradient."""
    head = heads.make_head(config_lib.ModelConfig())
    probabilities = tf.constant([[0.7, 0.2, 0.1], [0.3, 0.6, 0.2], [0.1, 0.1, 0.8]])
    labels = np.array([0, -1, 2])
    targets = targets_from_labels(labels, 3)
    assert np.all(targets[1] == 0.0)
    with tf.GradientTape() as tape:
        tape.watch(probabilities)
        value = head.loss()(labels, probabilities)
    np.testing.assert_allclose(float(value), reference_loss(targets, probabilities.numpy()).mean(),
                               rtol=1e-5)
    assert np.all(tape.gradient(value, probabilities).numpy()[1] > 0)  # pushed down everywhere


def test_arcface_loss_divides_by_the_global_number_of_landmark_images():
    """Per replica: its sum / landmark images of the GLOBAL batch; uneven shares of landmarks
    (replica 0 holds 4 of them, replica 1 only 1) still add up to the one-device loss."""
    rng = np.random.default_rng(3)
    labels = np.array([0, 1, 2, 0, -1, -1, 1, -1], np.int64)
    cosines = random_cosines(rng, len(labels), 3)
    loss = losses.ArcMarginLoss(margins=0.5, scale=30.0)
    single = float(loss(labels, cosines).numpy())
    np.testing.assert_allclose(single, reference_arcface(labels, cosines, 0.5, 30.0).sum() / 5,
                               rtol=1e-5)
    per_replica = run_split(two_cpu_strategy(), lambda y, c: loss(y, c), (labels, cosines),
                            (0, 4, 8))
    np.testing.assert_allclose(sum(float(value) for value in per_replica), single, rtol=1e-5)


def test_arcface_loss_config_round_trip():
    loss = losses.ArcMarginLoss(margins=[0.1, 0.2], scale=64.0)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert (restored.margins, restored.scale, restored.reduction) == ([0.1, 0.2], 64.0, "sum")


# ---------------------------------------------------------------------------------------------
# The heads in the network.


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (4, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module", params=["arcface", "subcenter_arcface"])
def arcface_model(request):
    keras.utils.set_random_seed(0)
    head = heads.make_head(_model_config(request.param, embedding_dim=32))
    return head, model_lib.build_model(NUM_CLASSES, SIZE, backbone_weights="none", head=head)


def _model_config(head, **overrides):
    return config_lib.ModelConfig(backbone_weights="none", head=head, **overrides)


def test_arcface_model_outputs_softmax_of_scaled_cosines(arcface_model, images):
    head, model = arcface_model
    assert [layer.name for layer in model.layers][-6:] == [
        "projection", "embedding_bn", "embedding", "cosine", "logits", "probabilities"]
    assert model.get_layer("cosine").subcenters == (3 if head.name == "subcenter_arcface" else 1)
    probabilities = model(images, training=False).numpy()
    cosines = head.training_model(model)(images, training=False).numpy()
    assert probabilities.shape == cosines.shape == (4, NUM_CLASSES)
    assert np.all(np.abs(cosines) <= 1.0 + 1e-6)
    logits = 30.0 * cosines.astype(np.float64)
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(probabilities, expected / expected.sum(axis=1, keepdims=True),
                               rtol=1e-5, atol=1e-7)
    # The batch GAP is computed on those same probabilities.
    labels = np.array([0, -1, 2, 1])
    gap = metrics.ScaledCosineBatchGAP(scale=30.0)
    gap.update_state(labels, cosines)
    np.testing.assert_allclose(float(gap.result()), float(metrics.batch_gap(labels, probabilities)))


def test_embedding_models_have_unit_rows(arcface_model, images):
    head, model = arcface_model
    embeddings = head.embedding_model(model)(images, training=False).numpy()
    assert embeddings.shape == (4, 32) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    # The cosines are those of this very embedding with the class centres.
    kernel = model.get_layer("cosine").kernel.numpy()
    centres = kernel / np.linalg.norm(kernel, axis=0, keepdims=True)
    k = model.get_layer("cosine").subcenters
    expected = (embeddings @ centres).reshape(4, NUM_CLASSES, k).max(axis=-1)
    cosines = head.training_model(model)(images, training=False).numpy()
    np.testing.assert_allclose(cosines, expected, rtol=1e-4, atol=1e-5)


def test_sigmoid_embedding_is_the_normalised_gem():
    keras.utils.set_random_seed(0)
    model = model_lib.build_model(NUM_CLASSES, SIZE, backbone_weights="none")
    images = np.random.default_rng(1).uniform(-1, 1, (3, SIZE, SIZE, 3)).astype(np.float32)
    head = heads.make_head(_model_config("sigmoid"))
    assert head.embedding_dim == 2048 and head.training_model(model) is model
    embeddings = head.embedding_model(model)(images).numpy()
    gem = model_lib.embedding_model(model)(images).numpy()
    np.testing.assert_allclose(embeddings, gem / np.linalg.norm(gem, axis=1, keepdims=True),
                               rtol=1e-5)


def test_arcface_head_under_mixed_bfloat16_trains_in_float32(images):
    """The backbone computes in bfloat16; the projection, embedding, cosines, logits,
    probabilities and the loss stay float32, and a training step gives a finite loss."""
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        keras.utils.set_random_seed(0)
        head = heads.make_head(_model_config("subcenter_arcface", embedding_dim=32))
        model = model_lib.build_model(NUM_CLASSES, SIZE, backbone_weights="none", head=head)
        training = head.training_model(model)
        training.compile(optimizer=keras.optimizers.Adam(1e-3),
                         loss=head.loss([4, 2, 1, 1, 3]), metrics=head.metrics())
        logs = training.train_on_batch(images, np.array([0, 1, -1, 4]), return_dict=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert model.get_layer("gem").compute_dtype == "bfloat16"
    for name in ("projection", "embedding_bn", "embedding", "cosine", "logits", "probabilities"):
        assert model.get_layer(name).compute_dtype == "float32", name
    assert model(images, training=False).dtype == tf.float32
    assert np.isfinite(logs["loss"]) and logs["loss"] > 0 and 0 <= logs["batch_gap"] <= 1


# ---------------------------------------------------------------------------------------------
# Flags.


def test_head_flags_parse_and_default_to_the_recipe():
    base = ["--train_data", "a", "--label_map", "b", "--model_dir", "c"]
    recipe = config_lib.config_from_args(base).model
    assert (recipe.head, recipe.embedding_dim, recipe.subcenters) == ("sigmoid", 512, 3)
    assert (recipe.arcface_scale, recipe.arcface_margin) == (30.0, 0.5)
    assert (recipe.margin_min, recipe.margin_max, recipe.margin_power) == (0.05, 0.5, 0.25)
    assert isinstance(heads.make_head(recipe), heads.SigmoidHead)
    chosen = config_lib.config_from_args(base + [
        "--head", "subcenter_arcface", "--embedding_dim", "256", "--subcenters", "2",
        "--margin_min", "0.1", "--margin_max", "0.4", "--margin_power", "0.5",
        "--arcface_scale", "64"]).model
    head = heads.make_head(chosen)
    assert isinstance(head, heads.SubCenterArcFaceHead)
    assert (head.embedding_dim, head.subcenters, head.scale) == (256, 2, 64.0)
    np.testing.assert_allclose(head.margins([100, 1]), [0.1, 0.4])
    assert tuple(heads.HEADS) == config_lib.HEAD_CHOICES


@pytest.mark.parametrize("flags, message", [
    (["--head", "softmax"], "head"),
    (["--embedding_dim", "0"], "embedding_dim"),
    (["--subcenters", "0"], "subcenters"),
    (["--arcface_margin", "2"], "arcface_margin"),
    (["--margin_min", "0.6"], "margin_min"),
    (["--arcface_scale", "0"], "arcface_scale"),
])
def test_bad_head_flags_raise_value_error(flags, message):
    with pytest.raises(ValueError, match=message):
        config_lib.config_from_args(["--train_data", "a", "--label_map", "b", "--model_dir", "c",
                                     *flags])
