"""Training metrics: GAP inside a batch ("batch GAP") and the summed binary cross-entropy.

Batch GAP is the competition's GAP restricted to one batch, computed properly (the notebook
forgot to sort and let non-landmarks count as class 0):

    predictions: each image's top-1 class and its probability
    order:       by probability, descending; ties by position in the batch (the official
                 code breaks ties by image id, and a batch position is the id here)
    correct_i:   top-1 class == label and label != -1 (a non-landmark is never correct)
    GAP        = (1 / M) * sum_i P(i) * correct_i,   P(i) = (# correct in first i) / i,
                 M = number of landmark images (label != -1) in the batch; 0 when M = 0.

Under a tf.distribute strategy the Keras metric gathers every replica's top-1 predictions and
labels, so each replica computes the GAP of the whole global batch (see :class:`BatchGAP`).
"""

import keras
import tensorflow as tf

from trainer import losses

NON_LANDMARK = -1


def _labels_as_indices(labels, num_classes):
    """Class indices ``[B]`` int32 from indices ``[B]``/``[B, 1]`` or dense targets ``[B, C]``.

    A dense row without any positive target becomes ``-1`` (non-landmark).
    """
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == 2 and labels.shape[-1] == num_classes and num_classes > 1:
        has_positive = tf.reduce_any(labels > 0, axis=-1)
        index = tf.argmax(labels, axis=-1, output_type=tf.int32)
        return tf.where(has_positive, index, NON_LANDMARK)
    return losses.class_indices(labels)  # indices [B] or [B, 1], as the losses read them


def gap_from_top1(labels, predicted_classes, scores):
    """GAP of one top-1 prediction per image.

    Args:
        labels: ``[n]`` int, true class, ``-1`` for non-landmark images.
        predicted_classes: ``[n]`` int, top-1 class per image.
        scores: ``[n]`` float, confidence of that prediction.

    Returns:
        scalar float32 in [0, 1].
    """
    labels = tf.cast(labels, tf.int32)
    predicted_classes = tf.cast(predicted_classes, tf.int32)
    # Stable descending sort: equal scores keep their batch order.
    order = tf.argsort(tf.cast(scores, tf.float32), direction="DESCENDING", stable=True)
    is_landmark = labels != NON_LANDMARK
    correct = tf.cast(tf.gather((predicted_classes == labels) & is_landmark, order), tf.float32)
    positions = tf.cast(tf.range(1, tf.shape(correct)[0] + 1), tf.float32)  # 1..n
    precision_at_i = tf.cumsum(correct) / positions
    num_landmarks = tf.reduce_sum(tf.cast(is_landmark, tf.float32))
    return tf.math.divide_no_nan(tf.reduce_sum(precision_at_i * correct), num_landmarks)


def batch_gap(labels, probabilities):
    """GAP of the batch's top-1 predictions (module docstring), over the global batch.

    Args:
        labels: ``[B]`` or ``[B, 1]`` int class indices (``-1`` = non-landmark), or dense
            targets ``[B, C]``.
        probabilities: ``[B, C]`` class probabilities.

    Returns:
        scalar float32. Inside ``strategy.run`` the top-1 predictions and labels of all
        replicas are gathered first, so every replica returns the GAP of the global batch.
    """
    probabilities = tf.cast(probabilities, tf.float32)
    labels = _labels_as_indices(labels, probabilities.shape[-1])
    predicted = tf.argmax(probabilities, axis=-1, output_type=tf.int32)  # [B]
    scores = tf.reduce_max(probabilities, axis=-1)  # [B]
    labels, _ = losses.gather_across_replicas(labels)
    predicted, _ = losses.gather_across_replicas(predicted)
    scores, _ = losses.gather_across_replicas(scores)
    return gap_from_top1(labels, predicted, scores)


@keras.saving.register_keras_serializable(package="landmarks")
class BatchGAP(keras.metrics.Metric):
    """Mean over batches of :func:`batch_gap`.

    Keras runs ``update_state`` per replica inside ``strategy.run``; the gather in
    :func:`batch_gap` gives each replica the same global-batch GAP, so the per-replica
    results that Keras averages (``reduce_per_replica(..., "mean")``) are equal, and reading
    the ON_READ/SUM state variables across replicas gives ``R * total / (R * count)``, the same
    value. ``sample_weight`` is ignored (GAP has no per-image weights).
    """

    def __init__(self, name="batch_gap", **kwargs):
        super().__init__(name=name, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float32", name="count")

    def update_state(self, y_true, y_pred, sample_weight=None):
        del sample_weight
        value = batch_gap(y_true, y_pred)
        self.total.assign_add(tf.cast(value, self.total.dtype))
        self.count.assign_add(tf.constant(1.0, self.count.dtype))

    def result(self):
        return tf.math.divide_no_nan(self.total, self.count)

    def reset_state(self):
        self.total.assign(0.0)
        self.count.assign(0.0)

    def get_config(self):
        return super().get_config()


@keras.saving.register_keras_serializable(package="landmarks")
class ScaledCosineBatchGAP(BatchGAP):
    """:class:`BatchGAP` of an ArcFace head, from its class cosines ``[B, C]``.

    The probabilities are the ones the exported model outputs, ``softmax(scale * cos)`` without
    the training margin (``trainer.heads``), so the batch GAP and the dev GAP rank images by
    the same confidences. Logged under the same name, ``batch_gap``.
    """

    def __init__(self, scale=30.0, name="batch_gap", **kwargs):
        super().__init__(name=name, **kwargs)
        self.scale = float(scale)

    def update_state(self, y_true, y_pred, sample_weight=None):
        probabilities = tf.nn.softmax(self.scale * tf.cast(y_pred, tf.float32), axis=-1)
        super().update_state(y_true, probabilities, sample_weight)

    def get_config(self):
        config = super().get_config()
        config["scale"] = self.scale
        return config


def _summed_bce_metric_fn(y_true, y_pred, epsilon=losses.DEFAULT_EPSILON):
    return losses.summed_bce(y_true, y_pred, epsilon)


@keras.saving.register_keras_serializable(package="landmarks")
class SummedBCE(keras.metrics.MeanMetricWrapper):
    """Mean over images of the BCE summed over classes (the loss without the rank term).

    Per replica it averages that replica's images; Keras then averages the per-replica
    results, which equals the global mean when the replicas hold equal shares.
    """

    def __init__(self, name="summed_bce", epsilon=losses.DEFAULT_EPSILON, dtype=None):
        super().__init__(fn=_summed_bce_metric_fn, name=name, dtype=dtype, epsilon=epsilon)
        self.epsilon = float(epsilon)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype, "epsilon": self.epsilon}
