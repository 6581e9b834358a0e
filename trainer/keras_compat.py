"""Work-arounds for known Keras 3 bugs on the paths this trainer uses.

Each one is small, says which bug it avoids, and is covered by a test that fails without it.

- :func:`build_from_local_batch`: ``Model.fit`` under ``MultiWorkerMirroredStrategy`` dies
  before its first step (keras-team/keras issues 20329 and 20585, tensorflow/tensorflow 72388,
  still open in Keras 3.15). Before training, ``fit`` takes one batch from the distributed
  iterator and averages it over the replicas with ``strategy.reduce("MEAN", batch)`` only to
  learn the input shapes; the collective all-reduce of ``MultiWorkerMirroredStrategy`` accepts
  one tensor, not a nested ``(inputs, labels)`` structure, and raises ``ValueError: Attempt to
  convert a value ({...: PerReplica...}) with an unsupported type``. The shapes are the same on
  every replica, so this build reads them from this worker's first replica instead: no
  collective, no averaging of images and labels (which was meaningless anyway).
- :func:`reduce_scalar_logs_across_workers`: the next failure on the same path. After each step
  ``fit`` averages the logs (loss, metrics: scalars) over the replicas with
  ``strategy.reduce("MEAN", value, axis=0)`` when the strategy spans several workers; a scalar
  has no axis 0 (``Invalid reduction dimension 0 for input with 0 dimensions``). Scalars are
  all-reduced with ``axis=None`` instead: the same mean over all replicas of all workers, so
  every worker logs (and the divergence guard sees) the same global value.
"""

from __future__ import annotations

import types

from keras.src.backend.tensorflow import trainer as _keras_tf_trainer

import keras
import tensorflow as tf


def _first_local_value(strategy: tf.distribute.Strategy, value):
    """This worker's first replica's component of a distributed value (others unchanged)."""
    if isinstance(value, tf.distribute.DistributedValues):
        return strategy.experimental_local_results(value)[0]
    return value


def build_from_local_batch(model: keras.Model) -> None:
    """Makes ``model.fit``'s pre-training build read one replica's batch (see module docstring).

    Replaces, on this instance only, the TensorFlow trainer's ``_maybe_symbolic_build``, which
    ``fit`` and ``evaluate`` call once before the first step. Without a strategy, or with a batch
    that holds no distributed values, it behaves as Keras' own. Idempotent.
    """
    if getattr(model, "_landmarks_local_build", False):
        return

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        strategy = self._distribute_strategy
        if strategy is None:  # Keras defers the build to the first traced step
            return
        if iterator is not None:
            for _, _, batches in iterator:
                batch = next(batches)
                data_batch = tf.nest.map_structure(
                    lambda value: _first_local_value(strategy, value), batch
                )
                break
        with strategy.scope():
            self._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = types.MethodType(_maybe_symbolic_build, model)
    model._landmarks_local_build = True


def _is_multi_worker(strategy: tf.distribute.Strategy) -> bool:
    return isinstance(
        strategy, tf.distribute.MultiWorkerMirroredStrategy
    ) and strategy.extended._in_multi_worker_mode()


def reduce_scalar_logs_across_workers() -> None:
    """Wraps Keras' ``reduce_per_replica`` so that multi-worker means of scalars work.

    Only the multi-worker ``"auto"``/``"mean"`` case changes; every other call goes to Keras'
    own function unchanged. Process-wide and idempotent (the trainer calls it before ``fit``).
    """
    original = _keras_tf_trainer.reduce_per_replica
    if getattr(original, "_landmarks_wrapped", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not _is_multi_worker(strategy):
            return original(values, strategy, reduction)

        def mean(value):
            if not isinstance(value, tf.distribute.DistributedValues):
                return value
            rank = strategy.experimental_local_results(value)[0].shape.rank
            return strategy.reduce("MEAN", value, axis=None if rank == 0 else 0)

        return tf.nest.map_structure(mean, values)

    reduce_per_replica._landmarks_wrapped = True
    _keras_tf_trainer.reduce_per_replica = reduce_per_replica
