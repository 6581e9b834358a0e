"""Rank-weighted BCE against an independent numpy reference, on one and on two replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import losses
from trainer import metrics

EPSILON = 1e-9


def reference_loss(targets, probabilities, rank_weight=1.0, epsilon=EPSILON):
    """The recipe's formula in float64 numpy, with true ranks (ties: earlier image first)."""
    targets = np.asarray(targets, np.float64)
    probabilities = np.asarray(probabilities, np.float64)
    n = len(probabilities)
    bce = -(targets * np.log(probabilities + epsilon) + (1 - targets) * np.log(1 - probabilities + epsilon))
    top_class = np.argmax(probabilities, axis=1)
    top_probability = probabilities[np.arange(n), top_class]
    order = np.argsort(-top_probability, kind="stable")  # most confident first
    ranks = np.empty(n, np.int64)
    ranks[order] = np.arange(n)
    weights = rank_weight * (n - ranks) / n
    return bce.sum(axis=1) + weights * bce[np.arange(n), top_class]


def targets_from_labels(labels, num_classes):
    """Dense targets by hand: row of zeros, a one at the label; -1 keeps the row all zero."""
    targets = np.zeros((len(labels), num_classes))
    for row, label in enumerate(labels):
        if label >= 0:
            targets[row, label] = 1.0
    return targets


def random_batch(rng, batch, num_classes):
    probabilities = rng.uniform(0.01, 0.99, (batch, num_classes)).astype(np.float32)
    labels = rng.integers(-1, num_classes, batch)  # includes non-landmarks (-1)
    labels[:2] = [-1, 0]
    return labels, probabilities


def test_integer_labels_match_reference():
    rng = np.random.default_rng(0)
    labels, probabilities = random_batch(rng, 9, 6)
    got = losses.rank_weighted_bce(labels.astype(np.int64), probabilities).numpy()
    expected = reference_loss(targets_from_labels(labels, 6), probabilities)
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_label_formats_agree():
    rng = np.random.default_rng(1)
    labels, probabilities = random_batch(rng, 7, 4)
    as_vector = losses.rank_weighted_bce(labels.astype(np.int32), probabilities).numpy()
    as_column = losses.rank_weighted_bce(labels.reshape(-1, 1).astype(np.int64), probabilities).numpy()
    as_float = losses.rank_weighted_bce(labels.astype(np.float32), probabilities).numpy()  # Loss.__call__ casts
    np.testing.assert_allclose(as_column, as_vector, rtol=1e-6)
    np.testing.assert_allclose(as_float, as_vector, rtol=1e-6)


def test_dense_targets_match_reference():
    rng = np.random.default_rng(2)
    probabilities = rng.uniform(0.01, 0.99, (8, 5)).astype(np.float32)
    targets = (rng.uniform(size=(8, 5)) < 0.3).astype(np.float32)  # multi-hot
    targets[0] = 0.0  # a non-landmark row
    got = losses.rank_weighted_bce(targets, probabilities, rank_weight=0.5).numpy()
    np.testing.assert_allclose(got, reference_loss(targets, probabilities, rank_weight=0.5), rtol=1e-5)


def test_rank_weights_follow_top1_confidence():
    # Top-1 probabilities 0.6, 0.9, 0.3, 0.75 -> ranks 2, 0, 3, 1 -> weights (4 - r) / 4.
    probabilities = np.array(
        [[0.6, 0.1], [0.2, 0.9], [0.3, 0.05], [0.1, 0.75]], np.float32
    )
    labels = np.array([1, 1, -1, 0])
    rank_weight = 2.0
    loss = losses.rank_weighted_bce(labels, probabilities, rank_weight=rank_weight).numpy()
    summed = losses.summed_bce(labels, probabilities).numpy()
    targets = targets_from_labels(labels, 2)
    top_class = np.argmax(probabilities, axis=1)
    p_top = probabilities[np.arange(4), top_class].astype(np.float64)
    y_top = targets[np.arange(4), top_class]
    top_bce = -(y_top * np.log(p_top + EPSILON) + (1 - y_top) * np.log(1 - p_top + EPSILON))
    weights = (loss - summed) / top_bce
    np.testing.assert_allclose(weights, rank_weight * np.array([2, 4, 1, 3]) / 4, rtol=1e-4)


def test_ties_rank_earlier_image_first():
    ranks, n = losses.confidence_ranks(tf.constant([0.5, 0.8, 0.5, 0.8, 0.1]))
    np.testing.assert_array_equal(ranks.numpy(), [2, 0, 3, 1, 4])
    assert int(n) == 5


def test_rejects_out_of_range_labels():
    probabilities = np.full((2, 3), 0.5, np.float32)
    with pytest.raises(tf.errors.InvalidArgumentError):
        losses.rank_weighted_bce(np.array([0, 3]), probabilities)
    with pytest.raises(ValueError, match="y_true"):
        losses.rank_weighted_bce(np.zeros((2, 2, 3)), probabilities)


def two_cpu_strategy():
    """A fresh 2-replica strategy on the 2 logical CPUs that conftest makes.

    Every MirroredStrategy numbers its collective ops from the same keys, and TF caches a
    collective's shape by key for the whole process: a second strategy whose collective #1
    has another shape fails ("Shape mismatch in the collective instance"). TF's own test
    combinations (strategy_combinations.py) move the key base for each strategy; so do we.
    """
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # and leave an unused base behind for strategies that other tests create without this step
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return strategy


def run_split(strategy, function, arrays, split):
    """Run ``function`` per replica; replica r gets rows [split[r], split[r + 1]) of each array."""

    def value_fn(context):
        start = split[context.replica_id_in_sync_group]
        stop = split[context.replica_id_in_sync_group + 1]
        return tuple(tf.constant(array[start:stop]) for array in arrays)

    per_replica = strategy.experimental_distribute_values_from_function(value_fn)
    outputs = tf.function(lambda args: strategy.run(function, args=args))(per_replica)
    return [value.numpy() for value in strategy.experimental_local_results(outputs)]


@pytest.mark.parametrize("split", [(0, 5, 10), (0, 6, 10)], ids=["even", "uneven"])
def test_two_replicas_return_the_global_batch_values(split):
    rng = np.random.default_rng(3)
    labels, probabilities = random_batch(rng, 10, 7)
    labels = labels.astype(np.int64)
    single = losses.rank_weighted_bce(labels, probabilities).numpy()
    np.testing.assert_allclose(single, reference_loss(targets_from_labels(labels, 7), probabilities), rtol=1e-5)

    per_replica = run_split(two_cpu_strategy(), losses.rank_weighted_bce, (labels, probabilities), split)
    assert [len(values) for values in per_replica] == [split[1] - split[0], split[2] - split[1]]
    np.testing.assert_allclose(np.concatenate(per_replica), single, rtol=1e-6)


def test_loss_class_divides_by_global_batch():
    rng = np.random.default_rng(4)
    labels, probabilities = random_batch(rng, 10, 3)
    labels = labels.astype(np.int64)
    loss = losses.RankWeightedBCE()
    single = float(loss(labels, probabilities).numpy())
    np.testing.assert_allclose(single, reference_loss(targets_from_labels(labels, 3), probabilities).mean(), rtol=1e-5)
    # Per replica: sum of its rows / 10, uneven 6 + 4 split; the replica values add up.
    per_replica = run_split(two_cpu_strategy(), lambda y, p: loss(y, p), (labels, probabilities), (0, 6, 10))
    np.testing.assert_allclose(sum(float(value) for value in per_replica), single, rtol=1e-5)


def test_loss_config_round_trip():
    loss = losses.RankWeightedBCE(rank_weight=0.5, epsilon=1e-7)
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, losses.RankWeightedBCE)
    assert (restored.rank_weight, restored.epsilon, restored.reduction) == (0.5, 1e-7, "sum")


def _one_sgd_step(strategy, images, labels):
    with strategy.scope():
        model = keras.Sequential(
            [keras.Input((6,)), keras.layers.Dense(4, activation="sigmoid", kernel_initializer="ones")]
        )
        model.compile(
            optimizer=keras.optimizers.SGD(0.5),
            loss=losses.RankWeightedBCE(),
            metrics=[metrics.BatchGAP(), metrics.SummedBCE()],
        )
    history = model.fit(images, labels, batch_size=len(images), epochs=1, shuffle=False, verbose=0)
    return [weight.numpy() for weight in model.weights], history.history


def test_fit_step_on_two_replicas_equals_one():
    """The summed gradient of the per-replica losses is the global batch gradient; the logged
    loss and metrics are the global batch's too."""
    rng = np.random.default_rng(5)
    images = rng.normal(size=(8, 6)).astype(np.float32) * 0.3
    labels = np.array([0, 1, -1, 3, 2, 0, -1, 1], np.int64)
    one, logs_one = _one_sgd_step(tf.distribute.OneDeviceStrategy("/cpu:0"), images, labels)
    two, logs_two = _one_sgd_step(two_cpu_strategy(), images, labels)
    assert not np.allclose(one[0], 1.0)  # the step did move the weights
    for weight_one, weight_two in zip(one, two):
        np.testing.assert_allclose(weight_two, weight_one, rtol=1e-5, atol=1e-6)

    probabilities = 1 / (1 + np.exp(-images.sum(axis=1, keepdims=True).repeat(4, axis=1)))  # ones kernel
    expected_loss = reference_loss(targets_from_labels(labels, 4), probabilities).mean()
    for logs in (logs_one, logs_two):
        np.testing.assert_allclose(logs["loss"][0], expected_loss, rtol=1e-5)
        assert set(logs) == {"loss", "batch_gap", "summed_bce"}
    for name in ("batch_gap", "summed_bce"):
        np.testing.assert_allclose(logs_two[name][0], logs_one[name][0], rtol=1e-5)
