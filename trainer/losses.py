"""The recipe's rank-weighted binary cross-entropy, correct under data parallelism.

Per image ``i`` of a batch of ``n`` images, with sigmoid probabilities ``p_i`` ``[C]`` and
targets ``y_i`` ``[C]`` (all zeros for a non-landmark image):

    bce(y, q)  = -(y * log(q + eps) + (1 - y) * log(1 - q + eps))
    k_i        = argmax_c p_ic                          (top-1 class)
    rank_i     = position of p_{i,k_i} among the batch's top-1 probabilities, sorted
                 descending (0 = most confident; ties go to the earlier image)
    loss_i     = sum_c bce(y_ic, p_ic) + rank_weight * (n - rank_i) / n * bce(y_{i,k_i}, p_{i,k_i})

So the most confident image's top-1 class counts twice (weight ``rank_weight * n/n``), the least
confident one's ``rank_weight * 1/n`` extra: confident wrong answers cost more. The original
notebook passed ``tf.nn.top_k`` *indices* where ranks were meant; here ranks are true ranks.

Data parallelism: under ``strategy.run`` each replica sees only its share of the batch, but
the ranking and ``n`` must cover the whole global batch, or the loss would change with the
number of devices. :func:`rank_weighted_bce` therefore all-gathers the (gradient-free) top-1
probabilities of every replica; the rank weight is a constant w.r.t. the parameters, so the
gradient stays local and needs no collective.

The ArcFace heads' loss (:class:`ArcMarginLoss`, see ``trainer.heads`` for the values and their
sources) is a softmax cross-entropy on scaled cosines with an additive angular margin on the
true class. Per landmark image ``i`` with label ``y``, class cosines ``cos_c`` (``[C]``, the
largest over the class's sub-centers), scale ``s`` and the margin ``m_y`` of its class:

    theta   = arccos(cos_y)
    phi     = cos(theta + m_y)                       if theta + m_y <= pi
              cos_y - m_y * sin(m_y)                 otherwise (keeps phi decreasing in theta)
    logit_c = s * phi  for c = y,   s * cos_c  for c != y
    loss_i  = logsumexp_c(logit_c) - s * phi

A non-landmark image (label -1) has no class to be pulled to: its loss is 0 and it adds nothing
to the gradient. The sum runs over the replica's images and is divided by the number of
*landmark* images in the GLOBAL batch (an all-reduce of the local counts), so the loss is the
mean cross-entropy over the batch's landmark images, as in the papers (whose training data has
no non-landmarks), and one step on N replicas equals one step on one device.
"""

import math

import keras
import tensorflow as tf
from keras import ops

DEFAULT_EPSILON = 1e-9


def _replica_context_or_none():
    """The current replica context if it spans more than one replica, else ``None``.

    ``tf.distribute.get_replica_context()`` is ``None`` in a cross-replica context (inside
    ``strategy.scope()`` but outside ``strategy.run``) and a one-replica default context
    outside any strategy: in both cases the local batch *is* the global batch.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def gather_across_replicas(values):
    """Concatenate ``values`` ``[b, ...]`` of every replica in replica order -> ``[n, ...]``.

    Also returns the offset of this replica's first row in the result (0 without a strategy).
    Shares may differ in size (a short last batch): the offset comes from gathered sizes.
    """
    context = _replica_context_or_none()
    if context is None:
        return values, tf.constant(0, tf.int32)
    values = tf.convert_to_tensor(values)
    local_size = tf.shape(values)[:1]  # [1]
    sizes = context.all_gather(local_size, axis=0)  # [replicas]
    offset = tf.reduce_sum(sizes[: context.replica_id_in_sync_group])
    # Collective all-gather needs equal shapes on every replica: pad each share to the
    # largest, gather [replicas * largest, ...], then drop the padding rows.
    largest = tf.reduce_max(sizes)
    paddings = [[0, largest - local_size[0]]] + [[0, 0]] * (values.shape.rank - 1)
    padded = tf.pad(values, paddings)
    gathered = context.all_gather(padded, axis=0)
    keep = tf.reshape(tf.sequence_mask(sizes, largest), [-1])  # [replicas * largest]
    return tf.boolean_mask(gathered, keep), offset


def global_batch_size(local_batch_size):
    """The number of examples over all replicas (``local_batch_size`` without a strategy)."""
    return global_count(local_batch_size)


def global_count(local_count):
    """An integer count summed over all replicas (``local_count`` itself without a strategy)."""
    local_count = tf.cast(local_count, tf.int32)
    context = _replica_context_or_none()
    if context is None:
        return local_count
    return context.all_reduce(tf.distribute.ReduceOp.SUM, local_count)


def dense_targets(y_true, num_classes):
    """Targets ``[B, C]`` float32 from class indices ``[B]``/``[B, 1]`` or dense ``[B, C]``.

    Index ``-1`` (non-landmark) becomes an all-zero row (``tf.one_hot(-1, C)`` is all zeros).
    Indices may arrive as floats (``keras.losses.Loss`` casts ``y_true`` to its dtype); a float
    ``[B, C]`` tensor with ``C == num_classes`` is taken as dense targets. With
    ``num_classes == 1`` a float ``[B, 1]`` is ambiguous and taken as dense; pass integers.
    """
    y_true = tf.convert_to_tensor(y_true)
    is_integer = y_true.dtype.is_integer
    rank = y_true.shape.rank
    # An integer [B, 1] with one class is indices; any other [B, C] is a dense 0/1 matrix.
    if rank == 2 and y_true.shape[-1] == num_classes and not (is_integer and num_classes == 1):
        return tf.cast(y_true, tf.float32)
    if rank == 2 and y_true.shape[-1] == 1:
        y_true = tf.squeeze(y_true, axis=-1)
    elif rank != 1:
        raise ValueError(
            f"y_true must be class indices [B] or [B, 1], or dense targets [B, {num_classes}]; "
            f"got shape {y_true.shape}"
        )
    if not is_integer:
        y_true = tf.round(y_true)
    labels = tf.cast(y_true, tf.int32)
    checks = [
        tf.debugging.assert_greater_equal(labels, -1, message="class index below -1"),
        tf.debugging.assert_less(labels, num_classes, message="class index >= num_classes"),
    ]
    with tf.control_dependencies(checks):
        return tf.one_hot(labels, num_classes, dtype=tf.float32)


def per_class_bce(targets, probabilities, epsilon=DEFAULT_EPSILON):
    """Element-wise binary cross-entropy with ``epsilon`` inside the logs; same shape as inputs."""
    return -(
        targets * ops.log(probabilities + epsilon)
        + (1.0 - targets) * ops.log(1.0 - probabilities + epsilon)
    )


def summed_bce(y_true, y_pred, epsilon=DEFAULT_EPSILON):
    """Per-image BCE summed over classes, ``[B]``; ``y_true`` as in :func:`dense_targets`."""
    probabilities = tf.cast(y_pred, tf.float32)
    targets = dense_targets(y_true, probabilities.shape[-1])
    return ops.sum(per_class_bce(targets, probabilities, epsilon), axis=-1)


def confidence_ranks(local_scores):
    """Rank of each local score among the scores of the global batch, descending.

    Args:
        local_scores: ``[b]`` float32, this replica's share.

    Returns:
        ``(ranks [b] int32, n scalar int32)``: rank 0 is the highest score of the global batch;
        ties are broken by global position (earlier image ranks first), which makes the ranks
        a permutation of ``0..n-1`` and identical however the batch is split over replicas.
    """
    local_scores = tf.stop_gradient(local_scores)
    all_scores, offset = gather_across_replicas(local_scores)  # [n], scalar
    n = tf.shape(all_scores)[0]
    local_positions = offset + tf.range(tf.shape(local_scores)[0])  # [b]
    all_positions = tf.range(n)  # [n]
    # [b, n] comparisons: O(b * n), ~48 x 96 for two replicas of 48, negligible.
    higher = all_scores[None, :] > local_scores[:, None]
    tied_before = (all_scores[None, :] == local_scores[:, None]) & (
        all_positions[None, :] < local_positions[:, None]
    )
    ranks = tf.reduce_sum(tf.cast(higher | tied_before, tf.int32), axis=1)
    return ranks, n


def rank_weighted_bce(y_true, y_pred, rank_weight=1.0, epsilon=DEFAULT_EPSILON):
    """The recipe's loss per example (see the module docstring for the formula).

    Args:
        y_true: class indices ``[B]`` or ``[B, 1]`` (``-1`` = non-landmark, all-zero target), or
            dense targets ``[B, C]``.
        y_pred: sigmoid probabilities ``[B, C]`` (cast to float32).
        rank_weight: weight of the rank term (1.0 in the recipe).
        epsilon: added inside the logs (1e-9 in the recipe).

    Returns:
        ``[B]`` float32 per-example loss. Under ``strategy.run`` the ranks and ``n`` are taken
        over the global batch (all-gather), so each replica returns exactly the values a single
        call on the whole global batch returns for its rows.
    """
    probabilities = tf.cast(y_pred, tf.float32)  # [B, C]
    num_classes = probabilities.shape[-1]
    targets = dense_targets(y_true, num_classes)  # [B, C]
    bce = per_class_bce(targets, probabilities, epsilon)  # [B, C]

    top_class = tf.argmax(probabilities, axis=-1, output_type=tf.int32)  # [B]
    top_probability = tf.gather(probabilities, top_class, axis=1, batch_dims=1)  # [B]
    top_bce = tf.gather(bce, top_class, axis=1, batch_dims=1)  # [B]

    ranks, n = confidence_ranks(top_probability)
    n = tf.cast(n, tf.float32)
    weights = rank_weight * (n - tf.cast(ranks, tf.float32)) / n  # rank 0 -> rank_weight
    return tf.reduce_sum(bce, axis=-1) + weights * top_bce


@keras.saving.register_keras_serializable(package="landmarks")
class RankWeightedBCE(keras.losses.Loss):
    """``rank_weighted_bce`` summed over the replica's examples and divided by the GLOBAL batch.

    How Keras 3.15 reduces a loss under tf.distribute (read in ``keras/src/losses/loss.py``,
    ``keras/src/backend/tensorflow/trainer.py``, ``keras/src/backend/tensorflow/optimizer.py``):
    ``train_step`` runs per replica inside ``strategy.run``; ``Loss.__call__`` applies the
    reduction through ``reduce_values``: for ``"sum_over_batch_size"`` it divides the sum by the
    *local* batch size and then ``scale_loss_for_distribution`` multiplies by
    ``1 / num_replicas_in_sync``; for ``"sum"`` it returns the plain sum, unscaled. The optimizer
    then all-reduces the per-replica gradients with ``ReduceOp.SUM``
    (``_all_reduce_sum_gradients``). The built-in ``sum_over_batch_size`` thus equals
    ``sum / global_batch`` only when every replica holds the same number of examples.

    This class uses ``reduction="sum"`` and divides each per-example value by the global batch
    size (an all-reduce of the local sizes), so the per-replica losses add up to
    ``sum_global / n`` and the summed gradient does not depend on the number of replicas, even
    for a short last batch. The progress-bar ``loss`` is unaffected: Keras multiplies the
    per-replica value back by ``num_replicas`` (``unscale_loss_for_distribution``) before its
    mean tracker weighs it by the local batch size, which gives the per-example mean.
    Sample weights multiply the per-example values before the sum (not renormalised).
    """

    def __init__(self, rank_weight=1.0, epsilon=DEFAULT_EPSILON, name="rank_weighted_bce", **kwargs):
        kwargs.pop("reduction", None)  # fixed, see the class docstring
        super().__init__(name=name, reduction="sum", **kwargs)
        self.rank_weight = float(rank_weight)
        self.epsilon = float(epsilon)

    def call(self, y_true, y_pred):
        per_example = rank_weighted_bce(y_true, y_pred, self.rank_weight, self.epsilon)  # [b]
        n = tf.cast(global_batch_size(tf.shape(per_example)[0]), per_example.dtype)
        return per_example / n

    def get_config(self):
        config = super().get_config()
        config.pop("reduction", None)
        config.update({"rank_weight": self.rank_weight, "epsilon": self.epsilon})
        return config


def class_indices(y_true):
    """Class indices ``[B]`` int32 from ``[B]`` or ``[B, 1]`` (integers, or floats holding them:
    ``keras.losses.Loss`` casts ``y_true`` to its dtype). ``-1`` marks a non-landmark image."""
    y_true = tf.convert_to_tensor(y_true)
    if y_true.shape.rank == 2 and y_true.shape[-1] == 1:
        y_true = tf.squeeze(y_true, axis=-1)
    if y_true.shape.rank != 1:
        raise ValueError(f"y_true must be class indices [B] or [B, 1], got shape {y_true.shape}")
    if not y_true.dtype.is_integer:
        y_true = tf.round(y_true)
    return tf.cast(y_true, tf.int32)


def arc_margin_cross_entropy(y_true, cosines, margins, scale):
    """Per-image ArcFace loss (module docstring), 0 for non-landmark images.

    Args:
        y_true: class indices ``[B]`` or ``[B, 1]``; ``-1`` = non-landmark.
        cosines: ``[B, C]`` class cosines in [-1, 1] (cast to float32, clipped to [-1, 1]).
        margins: additive angular margin in radians, one float for every class or ``[C]``.
        scale: the scale ``s`` of the logits.

    Returns:
        ``[B]`` float32. A non-landmark row is exactly 0 and carries no gradient.
    """
    cosines = tf.clip_by_value(tf.cast(cosines, tf.float32), -1.0, 1.0)  # [B, C]
    num_classes = cosines.shape[-1]
    labels = class_indices(y_true)  # [B]
    checks = [
        tf.debugging.assert_greater_equal(labels, -1, message="class index below -1"),
        tf.debugging.assert_less(labels, num_classes, message="class index >= num_classes"),
    ]
    with tf.control_dependencies(checks):
        is_landmark = labels >= 0
    safe_labels = tf.maximum(labels, 0)  # a non-landmark row is computed on class 0, then zeroed
    margins = tf.convert_to_tensor(margins, tf.float32)
    margin = (tf.gather(margins, safe_labels) if margins.shape.rank == 1
              else tf.fill(tf.shape(safe_labels), margins))  # [B]
    cos_true = tf.gather(cosines, safe_labels, axis=1, batch_dims=1)  # [B]
    # sin(theta) >= 0 on [0, pi]; the floor keeps the square root's gradient finite at |cos| = 1.
    sin_true = tf.sqrt(tf.maximum(1.0 - tf.square(cos_true), 1e-12))
    phi = cos_true * tf.cos(margin) - sin_true * tf.sin(margin)  # cos(theta + m)
    # Past theta = pi - m, cos(theta + m) would rise again: continue linearly instead.
    phi = tf.where(cos_true > tf.cos(math.pi - margin), phi, cos_true - margin * tf.sin(margin))
    scale = tf.constant(scale, tf.float32)
    logits = scale * cosines + tf.one_hot(safe_labels, num_classes) * (
        scale * (phi - cos_true))[:, None]  # [B, C], the true class's logit is s * phi
    cross_entropy = tf.reduce_logsumexp(logits, axis=-1) - scale * phi  # [B]
    return cross_entropy * tf.cast(is_landmark, tf.float32)


@keras.saving.register_keras_serializable(package="landmarks")
class ArcMarginLoss(keras.losses.Loss):
    """:func:`arc_margin_cross_entropy` summed over the replica's images and divided by the
    number of landmark images in the GLOBAL batch (module docstring).

    Reduction ``"sum"`` for the reason given in :class:`RankWeightedBCE`. A global batch without
    any landmark image has loss 0. Keras' progress-bar ``loss`` is then the mean cross-entropy
    over landmark images (Keras scales the per-replica value back up by the number of replicas
    and weighs it by the local batch size; replicas hold equal shares).

    Args:
        margins: one margin for every class (float, radians) or a list of ``C`` margins.
        scale: the scale ``s``.
    """

    def __init__(self, margins=0.5, scale=30.0, name="arc_margin_loss", **kwargs):
        kwargs.pop("reduction", None)  # fixed, see the class docstring
        super().__init__(name=name, reduction="sum", **kwargs)
        if isinstance(margins, (int, float)):
            self.margins = float(margins)
        else:
            self.margins = [float(value) for value in margins]
        self.scale = float(scale)

    def call(self, y_true, y_pred):
        per_example = arc_margin_cross_entropy(y_true, y_pred, self.margins, self.scale)  # [b]
        is_landmark = class_indices(y_true) >= 0
        landmarks = global_count(tf.reduce_sum(tf.cast(is_landmark, tf.int32)))
        return per_example / tf.cast(tf.maximum(landmarks, 1), per_example.dtype)

    def get_config(self):
        config = super().get_config()
        config.pop("reduction", None)
        config.update({"margins": self.margins, "scale": self.scale})
        return config
