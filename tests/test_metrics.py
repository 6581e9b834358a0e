"""Batch GAP and summed BCE against independent references, on one and on two replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from trainer import metrics


def reference_batch_gap(labels, probabilities):
    """GAP by the definition, in plain Python: sort by (-score, position), count, divide by M."""
    labels = [int(label) for label in labels]
    predictions = [(int(np.argmax(row)), float(np.max(row))) for row in probabilities]
    order = sorted(range(len(labels)), key=lambda i: (-predictions[i][1], i))
    hits, total = 0, 0.0
    for seen, i in enumerate(order, start=1):
        if labels[i] >= 0 and predictions[i][0] == labels[i]:
            hits += 1
            total += hits / seen
    landmarks = sum(label >= 0 for label in labels)
    return total / landmarks if landmarks else 0.0


def probabilities_for(top_classes, top_scores, num_classes=4):
    """Rows whose maximum is ``top_scores[i]`` at ``top_classes[i]`` (others below)."""
    rows = np.full((len(top_classes), num_classes), 0.01, np.float32)
    rows[np.arange(len(top_classes)), top_classes] = top_scores
    return rows


def test_hand_worked_batch():
    # labels 3, -1, 1, 2; top-1 (class, score): (3, .9) right, (0, .95) non-landmark so wrong,
    # (1, .5) right, (0, .7) wrong. Sorted: .95 x, .9 v, .7 x, .5 v -> P = 1/2 at the first hit,
    # 2/4 at the second; M = 3 landmark images -> (0.5 + 0.5) / 3 = 1/3.
    labels = np.array([3, -1, 1, 2])
    probabilities = probabilities_for([3, 0, 1, 0], [0.9, 0.95, 0.5, 0.7])
    np.testing.assert_allclose(float(metrics.batch_gap(labels, probabilities)), 1 / 3, rtol=1e-6)
    np.testing.assert_allclose(reference_batch_gap(labels, probabilities), 1 / 3, rtol=1e-12)


def test_ties_keep_batch_order():
    # Equal scores: the earlier image comes first. Image 0 wrong, image 1 right -> P(2) = 1/2,
    # M = 2 -> 0.25. Swapping the two images puts the hit first -> 1 / 2.
    labels = np.array([0, 1])
    wrong_first = probabilities_for([2, 1], [0.8, 0.8])
    right_first = probabilities_for([1, 2], [0.8, 0.8])
    np.testing.assert_allclose(float(metrics.batch_gap(labels, wrong_first)), 0.25, rtol=1e-6)
    np.testing.assert_allclose(float(metrics.batch_gap(labels[::-1].copy(), right_first)), 0.5, rtol=1e-6)


def test_non_landmark_predicted_as_class_zero_is_wrong():
    labels = np.array([-1, 0])
    probabilities = probabilities_for([0, 0], [0.9, 0.6])
    # the non-landmark's class-0 guess ranks first and is wrong: P(2) = 1/2, M = 1 -> 0.5
    np.testing.assert_allclose(float(metrics.batch_gap(labels, probabilities)), 0.5, rtol=1e-6)


def test_only_non_landmarks_gives_zero():
    probabilities = probabilities_for([0, 1], [0.9, 0.6])
    assert float(metrics.batch_gap(np.array([-1, -1]), probabilities)) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_random_batches_match_reference(seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(-1, 5, 16)
    # scores on a coarse grid so that ties happen
    probabilities = np.round(rng.uniform(size=(16, 5)), 1).astype(np.float32)
    np.testing.assert_allclose(
        float(metrics.batch_gap(labels, probabilities)), reference_batch_gap(labels, probabilities), rtol=1e-6
    )


def test_label_formats_agree():
    rng = np.random.default_rng(7)
    labels = rng.integers(-1, 4, 10)
    probabilities = rng.uniform(size=(10, 4)).astype(np.float32)
    dense = np.zeros((10, 4), np.float32)
    for row, label in enumerate(labels):
        if label >= 0:
            dense[row, label] = 1.0
    expected = float(metrics.batch_gap(labels, probabilities))
    assert float(metrics.batch_gap(labels.reshape(-1, 1), probabilities)) == pytest.approx(expected)
    assert float(metrics.batch_gap(labels.astype(np.float32), probabilities)) == pytest.approx(expected)
    assert float(metrics.batch_gap(dense, probabilities)) == pytest.approx(expected)


def test_keras_metric_averages_batches_and_resets():
    metric = metrics.BatchGAP()
    labels_a, probabilities_a = np.array([3, -1, 1, 2]), probabilities_for([3, 0, 1, 0], [0.9, 0.95, 0.5, 0.7])
    labels_b, probabilities_b = np.array([0, 1]), probabilities_for([0, 1], [0.9, 0.8])  # GAP 1
    metric.update_state(labels_a, probabilities_a)
    metric.update_state(labels_b, probabilities_b)
    np.testing.assert_allclose(float(metric.result()), (1 / 3 + 1.0) / 2, rtol=1e-6)
    metric.reset_state()
    assert float(metric.result()) == 0.0
    restored = metrics.BatchGAP.from_config(metric.get_config())
    assert restored.name == "batch_gap"


def test_summed_bce_metric_matches_numpy():
    probabilities = np.array([[0.9, 0.2, 0.1], [0.3, 0.4, 0.5]], np.float32)
    labels = np.array([0, -1])
    targets = np.array([[1, 0, 0], [0, 0, 0]], np.float64)
    p = probabilities.astype(np.float64)
    per_image = -(targets * np.log(p + 1e-9) + (1 - targets) * np.log(1 - p + 1e-9)).sum(axis=1)
    metric = metrics.SummedBCE()
    metric.update_state(labels, probabilities)
    np.testing.assert_allclose(float(metric.result()), per_image.mean(), rtol=1e-6)
    restored = keras.metrics.deserialize(keras.metrics.serialize(metric))
    assert isinstance(restored, metrics.SummedBCE) and restored.epsilon == 1e-9


def two_cpu_strategy():
    """A fresh 2-replica strategy; the collective key base moves per strategy (see test_losses)."""
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    # and leave an unused base behind for strategies that other tests create without this step
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return strategy


def test_two_replicas_compute_the_global_batch_gap():
    # Replica 0 holds the two wrong, very confident images; replica 1 the two right ones.
    # Per-replica GAPs would be 0 and 1; the global batch gives P at hits 1/3 and 2/4 over M = 4.
    labels = np.array([0, 1, 2, 3], np.int64)
    probabilities = probabilities_for([1, 0, 2, 3], [0.99, 0.98, 0.97, 0.5])
    expected = reference_batch_gap(labels, probabilities)
    np.testing.assert_allclose(expected, (1 / 3 + 2 / 4) / 4, rtol=1e-12)
    strategy = two_cpu_strategy()

    def value_fn(context):
        rows = slice(2 * context.replica_id_in_sync_group, 2 * context.replica_id_in_sync_group + 2)
        return tf.constant(labels[rows]), tf.constant(probabilities[rows])

    per_replica = strategy.experimental_distribute_values_from_function(value_fn)
    with strategy.scope():
        metric = metrics.BatchGAP()

    @tf.function
    def step(args):
        def replica_fn(y, p):
            metric.update_state(y, p)
            return metrics.batch_gap(y, p)

        return strategy.run(replica_fn, args=args)

    values = strategy.experimental_local_results(step(per_replica))
    np.testing.assert_allclose([float(v) for v in values], [expected, expected], rtol=1e-6)
    np.testing.assert_allclose(float(metric.result()), expected, rtol=1e-6)
