"""Keras callbacks of ``landmarks-train``: divergence guard, dev GAP, throughput log, history CSV.

Order matters: Keras hands the *same* ``logs`` dict to every callback in list order, so
:class:`DivergenceGuard` must come first (it decides whether anything may be saved),
:class:`DevGap` next (it adds ``dev_gap`` to the logs), then :class:`EpochLog`/
:class:`HistoryCsv`, then the savers wrapped in :class:`UnlessDiverged`.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from typing import Callable

import keras
import tensorflow as tf

_LOG = logging.getLogger(__name__)

HISTORY_COLUMNS = (
    "epoch",
    "phase",
    "learning_rate",
    "loss",
    "batch_gap",
    "dev_gap",
    "images_per_second",
    "seconds",
)
"""``history.csv`` columns. ``epoch`` counts completed epochs over all phases (1-based);
the row with epoch 0 (phase ``init``) holds the dev GAP of the untrained model."""


class DivergenceGuard(keras.callbacks.Callback):
    """Stops training as soon as the loss is not finite, and remembers that it did.

    After each batch it checks the running loss; at the end of each epoch it also checks every
    weight (the last update of an epoch may turn weights NaN while the loss was still finite).
    Savers wrapped in :class:`UnlessDiverged` then leave the last good files untouched.
    """

    def __init__(self):
        super().__init__()
        self.diverged = False
        self.where = ""
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(f"loss {float(loss)} at epoch {self._epoch + 1}, batch {batch + 1}")

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged:
            return
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            self._stop(f"loss {float(loss)} at the end of epoch {epoch + 1}")
            return
        for variable in self.model.weights:
            if not _all_finite(variable):
                self._stop(f"non-finite weights in {variable.path} after epoch {epoch + 1}")
                return

    def _stop(self, where: str) -> None:
        self.diverged = True
        self.where = where
        self.model.stop_training = True
        _LOG.error("training diverged: %s; stopping without saving", where)


def _all_finite(variable) -> bool:
    """Whether every value of ``variable`` is finite, reduced where the variable lives.

    Only a boolean leaves the device: a copy to the host (``convert_to_numpy``) would move the
    whole model every epoch (the sigmoid head alone is 1.7 GB at GLDv2's 203,094 classes) and
    allocate a boolean array of its size (docs/SCALE.md, "Training with many classes").
    """
    if not variable.dtype.startswith(("float", "bfloat")):
        return True  # integer state (counters, seeds) cannot be NaN
    return bool(tf.reduce_all(tf.math.is_finite(variable.value)))


class UnlessDiverged(keras.callbacks.Callback):
    """Runs ``inner`` (a saver) only while ``guard`` has not seen a non-finite loss.

    Keeps ``BackupAndRestore`` and ``ModelCheckpoint`` from writing NaN weights over the last
    good ones at the end of a diverged epoch, and ``BackupAndRestore`` from deleting its backup.
    """

    def __init__(self, inner: keras.callbacks.Callback, guard: DivergenceGuard):
        super().__init__()
        self.inner = inner
        self.guard = guard

    def set_model(self, model):
        super().set_model(model)
        self.inner.set_model(model)

    def set_params(self, params):
        super().set_params(params)
        self.inner.set_params(params)

    def on_train_begin(self, logs=None):
        self.inner.on_train_begin(logs)

    def on_epoch_begin(self, epoch, logs=None):
        self.inner.on_epoch_begin(epoch, logs)

    def on_train_batch_begin(self, batch, logs=None):
        self.inner.on_train_batch_begin(batch, logs)

    def on_train_batch_end(self, batch, logs=None):
        if not self.guard.diverged:
            self.inner.on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        if not self.guard.diverged:
            self.inner.on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if not self.guard.diverged:
            self.inner.on_train_end(logs)


class DevGap(keras.callbacks.Callback):
    """Adds ``dev_gap`` (GAP over the whole dev set) to the logs at the end of every epoch.

    Args:
      evaluate: ``model -> GAP`` (a float in [0, 1]); see ``trainer.train.DevEvaluator``.
      guard: skip evaluation after divergence (NaN predictions say nothing).
      classifier: the model to evaluate (images -> probabilities) when ``fit`` trains a wrapper
        around it (``DeviceAugmentation`` in front); default: the model being fit.
    """

    def __init__(
        self,
        evaluate: Callable[[keras.Model], float],
        guard: DivergenceGuard,
        classifier: keras.Model | None = None,
    ):
        super().__init__()
        self.evaluate = evaluate
        self.guard = guard
        self.classifier = classifier

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.diverged or logs is None:
            return
        started = time.perf_counter()
        model = self.model if self.classifier is None else self.classifier
        logs["dev_gap"] = float(self.evaluate(model))
        seconds = time.perf_counter() - started
        _LOG.info("epoch %d: dev GAP %.4f (%.1f s)", epoch + 1, logs["dev_gap"], seconds)


class EpochLog(keras.callbacks.Callback):
    """Logs one line per epoch with the phase, loss, learning rate and training images/s.

    Adds ``images_per_second``, ``seconds`` and ``learning_rate`` to the logs (for history.csv).
    Time includes the first step's tracing, so epoch 1 of each phase reads lower.

    Args:
      phase: phase name for the log line.
      global_batch: images per step over all replicas.
    """

    def __init__(self, phase: str, global_batch: int):
        super().__init__()
        self.phase = phase
        self.global_batch = global_batch
        self._started = 0.0
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()
        self._steps = 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        seconds = time.perf_counter() - self._started
        images = self._steps * self.global_batch
        logs["seconds"] = seconds
        logs["images_per_second"] = images / seconds if seconds > 0 else float("nan")
        learning_rate = self.model.optimizer.learning_rate
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(learning_rate))
        extras = "".join(
            f", {name} {logs[name]:.4f}" for name in ("batch_gap", "dev_gap") if name in logs
        )
        _LOG.info(
            "epoch %d (%s): loss %.4f%s, lr %.3g, %d images in %.1f s = %.1f images/s",
            epoch + 1,
            self.phase,
            float(logs.get("loss", float("nan"))),
            extras,
            logs["learning_rate"],
            images,
            seconds,
            logs["images_per_second"],
        )


def read_history(path: str) -> dict[int, dict[str, str]]:
    """Rows of an existing ``history.csv`` keyed by epoch (empty if the file does not exist)."""
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path, "r") as handle:
        return {int(row["epoch"]): row for row in csv.DictReader(handle)}


def write_history(path: str, rows: dict[int, dict]) -> None:
    """Writes ``rows`` (epoch -> values) as CSV in epoch order, replacing the file at once."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=HISTORY_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for epoch in sorted(rows):
        writer.writerow({column: rows[epoch].get(column, "") for column in HISTORY_COLUMNS})
    temporary = path + ".tmp"
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(buffer.getvalue())
    tf.io.gfile.rename(temporary, path, overwrite=True)


class HistoryCsv(keras.callbacks.Callback):
    """Keeps ``history.csv`` as one row per completed epoch, keyed by the global epoch.

    Unlike ``CSVLogger(append=True)``, re-running an epoch after a resume replaces its row
    instead of adding a second one.
    """

    def __init__(self, path: str, phase: str, guard: DivergenceGuard):
        super().__init__()
        self.path = path
        self.phase = phase
        self.guard = guard

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.diverged:
            return
        rows = read_history(self.path)
        row = {"epoch": epoch + 1, "phase": self.phase}
        row.update({key: _format(value) for key, value in (logs or {}).items()})
        rows[epoch + 1] = row
        write_history(self.path, rows)


def _format(value) -> str:
    try:
        return f"{float(value):.6g}"
    except (TypeError, ValueError):
        return str(value)
