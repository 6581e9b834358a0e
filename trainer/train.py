"""``landmarks-train``: image-record TFRecords -> trained classifier in a model dir.

Usage (the recipe, ``--preset full`` is the default)::

    landmarks-train --train_data 'run/train-*.tfrecord' --label_map run/label_map.csv \\
        --model_dir models/m1 [--dev_data 'run/dev-*.tfrecord'] [--preset quick|full] \\
        [--image_size 299] [--backbone_weights imagenet|none|PATH] [--devices /cpu:0,/cpu:1] \\
        [--mixed_precision none|bfloat16|float16] [--jit_compile false] ...

Model dir (re-running the same command resumes an interrupted run):

    config.json         the resolved config (a resume must match it)
    label_map.csv       copy of the label map
    logs/               TensorBoard
    history.csv         one row per epoch (epoch 0 = dev GAP at initialisation)
    checkpoints/        last.weights.h5 every epoch, best.weights.h5 by dev GAP (model only)
    backup/             BackupAndRestore state per phase (deleted after success)
    class_counts.json   subcenter_arcface head only: training images per class and the
                        dynamic margins built from them (a resume must find the same counts)
    model.keras         images [B, S, S, 3] in [-1, 1] -> probabilities [B, C]; float32,
                        without optimizer state (best dev-GAP weights when dev data is given),
                        for every head (``--head``; the ArcFace margin is training-only)
    embedding.keras     images [B, S, S, 3] in [-1, 1] -> L2-normalised embeddings [B, D]
                        float32, same weights (sigmoid head: GeM, D = 2048; ArcFace heads: the
                        projection, D = --embedding_dim); written like model.keras
    summary.json        dev_gap_initial, dev_gap_final, head, embedding_dim, figures of the run
    _SUCCESS            written last
    workertemp_<id>/    under MultiWorkerMirroredStrategy, while a run is unfinished: a
                        non-chief worker's own files (its backup); deleted on success

The run, at a glance (:func:`train`): :func:`_prepare` (strategy, data checks, config files),
:func:`_build_models` (network, calibration, dev evaluator), :func:`_run_phase` per phase
(restore a finished phase or ``fit`` it), :func:`_export` (``model.keras``, ``embedding.keras``,
``summary.json``, ``_SUCCESS``; the chief only).

Phases and resume. Each phase (head, finetune from 85, deep from 25) is one ``fit`` call:
phases differ in batch size, hence in dataset, and the recipe recompiles after changing
``trainable``. Epochs are numbered continuously over the phases (``initial_epoch``), so the
history, TensorBoard and the learning-rate schedule see one run. Each phase has its own
``BackupAndRestore`` folder (``backup/<k>-<name>/``) that is kept until the whole run succeeds:
on a re-run, a phase whose backup records all its epochs is restored from it (weights and
optimizer) without training; the first unfinished phase resumes from its last complete epoch
(an epoch interrupted in the middle restarts from its first batch).

Exit codes of :func:`main`: 0 success; 2 bad input or config (one line on stderr,
``landmarks-train: error: ...``); 3 training diverged (NaN loss: stopped, last good
checkpoint and backup kept, nothing overwritten with NaN weights); 5 a resource cannot be
reached (a ``gs://`` model dir or data whose storage service does not answer, checked first;
the ImageNet weights' download); 1 an internal error (a bug: traceback logged, then
``landmarks-train: internal error: ...``). A run that failed before its first checkpoint does
not lock its model dir: another config may start there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import logging
import math
import os
import sys
import time
from typing import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # a CLI: keep TF's C++ chatter out of stderr

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tfrecords_schema  # noqa: E402
from tfrecords_schema import label_map as label_map_lib  # noqa: E402
from trainer import augment as augment_lib  # noqa: E402
from trainer import callbacks as callbacks_lib  # noqa: E402
from trainer import cli  # noqa: E402
from trainer import data as data_lib  # noqa: E402
from trainer import distribute  # noqa: E402
from trainer import heads as heads_lib  # noqa: E402
from trainer import keras_compat  # noqa: E402
from trainer import metrics  # noqa: E402
from trainer import model as model_lib  # noqa: E402
from trainer.config import PhaseConfig, TrainConfig, config_from_args  # noqa: E402
from trainer.preprocessing import ImageContract  # noqa: E402

_LOG = logging.getLogger("landmarks-train")

EXIT_OK, EXIT_BAD_INPUT, EXIT_DIVERGED = 0, 2, 3
_MIXED_POLICIES = {"none": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}


class TrainingDiverged(cli.CommandFailure):
    """The loss became NaN/inf; training stopped and nothing was overwritten (exit code 3)."""

    exit_code = EXIT_DIVERGED


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """File names inside the model dir (local path or ``gs://``)."""

    root: str

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    @property
    def config(self) -> str:
        return self.path("config.json")

    @property
    def label_map(self) -> str:
        return self.path(label_map_lib.LABEL_MAP_FILENAME)

    @property
    def history(self) -> str:
        return self.path("history.csv")

    @property
    def model(self) -> str:
        return self.path("model.keras")

    @property
    def embedding(self) -> str:
        return self.path("embedding.keras")

    @property
    def class_counts(self) -> str:
        return self.path("class_counts.json")

    @property
    def summary(self) -> str:
        return self.path("summary.json")

    @property
    def success(self) -> str:
        return self.path("_SUCCESS")

    @property
    def logs(self) -> str:
        return self.path("logs")

    @property
    def backup(self) -> str:
        return self.path("backup")

    def phase_backup(self, index: int, name: str) -> str:
        return self.path("backup", f"{index}-{name}")

    @property
    def last_checkpoint(self) -> str:
        return self.path("checkpoints", "last.weights.h5")

    @property
    def best_checkpoint(self) -> str:
        return self.path("checkpoints", "best.weights.h5")


# ---------------------------------------------------------------------------------------------
# Pure helpers.


def phase_epoch_ranges(config: TrainConfig) -> list[tuple[int, PhaseConfig, int, int]]:
    """``(phase_index, phase, first_epoch, end_epoch)`` for the active phases; epochs are global
    and 0-based, ``end_epoch`` exclusive (Keras' ``initial_epoch``/``epochs``)."""
    ranges, start = [], 0
    for index, phase in enumerate(config.phases):
        if phase.epochs == 0:
            continue
        ranges.append((index, phase, start, start + phase.epochs))
        start += phase.epochs
    return ranges


def _config_for_comparison(config_json: str) -> dict:
    """A config without the fields that may change between a run and its resume."""
    parsed = json.loads(config_json)
    parsed.pop("verbose", None)
    parsed.get("distribution", {}).pop("coordination_timeout", None)  # changes no result
    return parsed


def _write_text(path: str, text: str) -> None:
    temporary = path + ".tmp"
    with tf.io.gfile.GFile(temporary, "w") as handle:
        handle.write(text)
    tf.io.gfile.rename(temporary, path, overwrite=True)


def _read_json(path: str) -> dict:
    with tf.io.gfile.GFile(path, "r") as handle:
        return json.loads(handle.read())


def _completed_epochs(backup_dir: str) -> int:
    """Epochs recorded by a ``BackupAndRestore`` folder (0 if there is none)."""
    path = backup_dir + "/training_metadata.json"
    if not tf.io.gfile.exists(path):
        return 0
    return int(_read_json(path).get("epoch", 0))


@contextlib.contextmanager
def dtype_policy(mixed_precision: str):
    """Sets Keras' global dtype policy for the block, then restores the previous one."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(_MIXED_POLICIES[mixed_precision])
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


# ---------------------------------------------------------------------------------------------
# Model, compile, data.


def compile_for_phase(
    model: keras.Model,
    phase: PhaseConfig,
    config: TrainConfig,
    strategy: tf.distribute.Strategy,
    training_model: keras.Model | None = None,
    class_counts: Sequence[int] | None = None,
) -> keras.Model:
    """Sets ``trainable`` of ``model`` for ``phase`` and recompiles (fresh Adam at its rate).

    The loss and metrics are the head's (``config.model.head``, ``trainer.heads``).
    ``training_model`` is what ``fit`` trains; it shares the classifier's layers. Default: the
    head's training model of ``model`` (the classifier itself for the sigmoid head; the
    network up to the class cosines for the ArcFace heads); in split mode ``train`` passes that
    model behind ``DeviceAugmentation``. ``class_counts`` ``[C]``: training images per class,
    for a head whose loss needs them (``subcenter_arcface``'s dynamic margins).
    The backbone's BatchNorm stays in inference mode in every phase (``trainer.model``), as in
    Keras' finetuning guide. Returns the compiled training model.
    """
    head = heads_lib.make_head(config.model)
    with strategy.scope():
        if training_model is None:
            training_model = head.training_model(model)
        model_lib.set_trainable_from(model, phase.trainable_from)
        training_model.compile(
            optimizer=keras.optimizers.Adam(learning_rate=phase.learning_rate_at(0)),
            loss=head.loss(class_counts),
            metrics=head.metrics(),
            jit_compile=config.distribution.jit_compile,
        )
    return training_model


def augment_params(config: TrainConfig) -> augment_lib.AugmentParams | None:
    """The recipe's augmentation, or None when ``--augment false``.

    With the warp on the device, the host's only resize is the one to S: plain bilinear there
    (``antialias=False``) more than doubles the host pipeline's rate (bench_input_pipeline.py:
    ~200 -> ~450 images per core-second at 299 px) for a mean difference of ~1/255.
    """
    if not config.data.augment:
        return None
    return augment_lib.AugmentParams(antialias=not config.data.augment_on_device)


def make_training_model(
    model: keras.Model, config: TrainConfig, strategy: tf.distribute.Strategy
) -> keras.Model:
    """What ``fit`` trains: the head's training model of ``model`` (``model`` itself for the
    sigmoid head), behind ``DeviceAugmentation`` in split mode."""
    params = augment_params(config)
    with strategy.scope():
        training_model = heads_lib.make_head(config.model).training_model(model)
        if params is not None and config.data.augment_on_device:
            training_model = augment_lib.with_device_augmentation(training_model, params)
    keras_compat.build_from_local_batch(training_model)
    keras_compat.reduce_scalar_logs_across_workers()
    return training_model


def make_train_input(
    config: TrainConfig,
    phase: PhaseConfig,
    num_classes: int,
    strategy: tf.distribute.Strategy,
) -> tf.distribute.DistributedDataset:
    """The phase's training batches, one input pipeline per worker, sharded by file.

    Elements: ``(images, labels)``, or in split mode (augmentation on the device) the inputs
    dict of ``trainer.augment.with_device_augmentation`` and the labels.
    """
    contract = ImageContract(image_size=config.data.image_size)
    augment = augment_params(config)

    def per_replica(batch_size: int, input_context: tf.distribute.InputContext) -> tf.data.Dataset:
        seed = config.data.seed
        if seed is not None:
            seed += input_context.input_pipeline_id  # different shuffles per worker
        return data_lib.make_dataset(
            config.data.train_data,
            contract=contract,
            batch_size=batch_size,
            training=True,
            augment=augment,
            num_classes=num_classes,
            shuffle_buffer=config.data.shuffle_buffer,
            seed=seed,
            input_context=input_context,
            max_images_per_class=config.data.max_images_per_class,
            repeat=config.data.steps_per_epoch is not None,
            augment_on_device=config.data.augment_on_device,
        )

    return distribute.distribute_dataset(strategy, phase.batch_size, per_replica)


class DevEvaluator:
    """GAP over the whole dev set from each image's top-1 class and its probability.

    Runs the model on one device (inference, ``training=False``); only three numbers per image
    are kept, so memory does not grow with the number of classes. Under several workers only
    the chief evaluates, and every worker receives the chief's figure
    (:func:`trainer.distribute.broadcast_from_chief`): the dev GAP is computed once, and the
    best-checkpoint choice and the history are the same everywhere.
    """

    def __init__(
        self,
        config: TrainConfig,
        num_classes: int,
        batch_size: int,
        strategy: tf.distribute.Strategy | None = None,
        info: distribute.StrategyInfo | None = None,
    ):
        self.strategy, self.info = strategy, info
        self.dev_data = config.data.dev_data
        contract = ImageContract(image_size=config.data.image_size)
        dataset = data_lib.make_dataset(
            config.data.dev_data,
            contract=contract,
            batch_size=batch_size,
            training=False,
            num_classes=num_classes,
            deterministic=True,
        )
        if config.data.max_dev_images:
            dataset = dataset.take(math.ceil(config.data.max_dev_images / batch_size))
        self.dataset = dataset
        self._predict = None
        self._model = None

    def __call__(self, model: keras.Model) -> float:
        if self.info is None or self.info.kind != "multi_worker":
            return self._evaluate(model)
        local = self._evaluate(model) if self.info.is_chief else 0.0
        return distribute.broadcast_from_chief(self.strategy, self.info, local)

    def _evaluate(self, model: keras.Model) -> float:
        if self._model is not model:
            self._model = model
            self._predict = tf.function(lambda images: model(images, training=False))
        labels, classes, scores = [], [], []
        with reading("--dev_data", self.dev_data):
            for images, batch_labels in self.dataset:
                probabilities = tf.cast(self._predict(images), tf.float32)
                labels.append(batch_labels.numpy())
                classes.append(tf.argmax(probabilities, axis=-1).numpy())
                scores.append(tf.reduce_max(probabilities, axis=-1).numpy())
        if not labels:
            raise data_lib.DataError(f"--dev_data {self.dev_data}: holds no records")
        gap = metrics.gap_from_top1(
            np.concatenate(labels), np.concatenate(classes), np.concatenate(scores)
        )
        return float(gap)


def save_classifier_weights(model: keras.Model, path: str) -> None:
    """The classifier's weights without optimizer state (~1/3 of the size with Adam, and
    loadable into a model compiled for any phase, or not compiled at all).

    Written beside ``path`` and renamed into place: a process killed while writing leaves a
    temporary file, never a truncated ``path`` that a resume or the export would read.
    """
    tf.io.gfile.makedirs(path.rsplit("/", 1)[0])
    optimizer = getattr(model, "optimizer", None)
    skip = [optimizer] if optimizer is not None else None
    suffix = ".weights.h5"  # Keras requires it
    temporary = (path[: -len(suffix)] if path.endswith(suffix) else path) + ".tmp" + suffix
    keras.saving.save_weights(model, temporary, objects_to_skip=skip)
    tf.io.gfile.rename(temporary, path, overwrite=True)


class SaveCheckpoints(keras.callbacks.Callback):
    """Classifier weights each epoch; the best by ``dev_gap`` when present.

    Saves ``classifier`` (images -> probabilities), not the model ``fit`` trains (which may
    have ``DeviceAugmentation`` in front), so checkpoints load into ``build_model``'s model.
    """

    def __init__(self, layout: ModelDir, best_so_far: float | None, classifier: keras.Model):
        super().__init__()
        self.layout = layout
        self.best = best_so_far
        self.classifier = classifier

    def _save(self, path: str) -> None:
        save_classifier_weights(self.classifier, path)

    def on_epoch_end(self, epoch, logs=None):
        self._save(self.layout.last_checkpoint)
        dev_gap = (logs or {}).get("dev_gap")
        if dev_gap is not None and (self.best is None or dev_gap > self.best):
            _LOG.info("epoch %d: dev GAP %.4f is the best so far, saved", epoch + 1, dev_gap)
            self.best = float(dev_gap)
            self._save(self.layout.best_checkpoint)


def calibrate_batchnorm(model: keras.Model, images: tf.Tensor) -> None:
    """Sets every BatchNorm's moving mean/variance to its statistics on ``images``: the
    backbone's, and the head's own if it has one (ArcFace heads).

    One forward pass in training mode with momentum 0: each BatchNorm normalises with, and
    stores, the statistics of its own input given the layers before it, so afterwards the
    inference-mode backbone reproduces the training-mode activations on ``images`` (unit scale
    instead of vanishing). Meant for a randomly initialised backbone; weights are untouched.

    Args:
      model: a model from ``trainer.model.build_model``.
      images: float32 ``[N, S, S, 3]`` in [-1, 1], a few dozen training images.
    """
    backbone = model.get_layer(model_lib.BACKBONE_NAME)
    head_norms = [
        layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    norms = [
        layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)
    ] + head_norms
    saved = [(layer.momentum, layer.trainable) for layer in norms]
    try:
        for layer in norms:
            # A non-trainable BatchNorm runs in inference mode whatever `training` says.
            layer.trainable = True
            layer.momentum = 0.0
        if head_norms:
            model(images, training=True)
        else:
            backbone(images, training=True)
    finally:
        for layer, (momentum, trainable) in zip(norms, saved):
            layer.momentum = momentum
            layer.trainable = trainable
    _LOG.info("calibrated %d BatchNorm layers of the random backbone on %d images",
              len(norms), int(images.shape[0]))


def _calibration_images(config: TrainConfig, num_classes: int) -> tf.Tensor:
    count = config.model.calibrate_batchnorm_images
    dataset = data_lib.make_dataset(
        config.data.train_data,
        contract=ImageContract(image_size=config.data.image_size),
        batch_size=count,
        training=False,
        num_classes=num_classes,
        deterministic=True,
    )
    for images, _ in dataset.take(1):
        return images
    raise data_lib.DataError(f"no training records in {config.data.train_data!r}")


def _copy_backup_from_chief(chief_backup: str, own_backup: str) -> None:
    """Replaces a non-chief worker's backup of a phase by a copy of the chief's.

    As in Keras' multi-worker design, every worker restores the chief's state and writes its
    own: then all workers resume at the same epoch with the same weights and optimizer, even if
    one was killed before it finished writing its own backup. Needs the model dir to be
    readable by every worker (``gs://`` or a shared disk). Safe at the start of a phase: the
    chief cannot write a new backup before this worker joins the phase's first collective.
    """
    if tf.io.gfile.exists(own_backup):
        tf.io.gfile.rmtree(own_backup)
    if not tf.io.gfile.exists(chief_backup):
        return
    for folder, _subfolders, files in tf.io.gfile.walk(chief_backup):
        target = own_backup + folder[len(chief_backup):]
        tf.io.gfile.makedirs(target)
        for name in files:
            tf.io.gfile.copy(f"{folder}/{name}", f"{target}/{name}", overwrite=True)


def _restore_backup(model: keras.Model, backup_dir: str, strategy: tf.distribute.Strategy) -> None:
    """Loads a phase's backup (weights + optimizer) exactly as ``BackupAndRestore`` does."""
    restorer = keras.callbacks.BackupAndRestore(backup_dir, double_checkpoint=True)
    restorer.set_model(model)
    with strategy.scope():
        restorer.on_train_begin()


def export_model(
    layout: ModelDir, weights_path: str, config: TrainConfig, num_classes: int
) -> None:
    """Writes ``model.keras`` (images -> probabilities) and ``embedding.keras`` (images ->
    L2-normalised embeddings, the same weights): float32, uncompiled copies (no optimizer
    state, load fast), each written to a temporary name first and then renamed."""
    head = heads_lib.make_head(config.model)
    with dtype_policy("none"):
        exported = model_lib.build_model(
            num_classes,
            image_size=config.data.image_size,
            backbone_weights="none",
            dropout=config.model.dropout,
            gem_p=config.model.gem_p,
            head=head,
        )
        embedder = head.embedding_model(exported)
    keras.saving.load_weights(exported, weights_path)
    for model, final, temporary in (
        (exported, layout.model, "model.tmp.keras"),
        (embedder, layout.embedding, "embedding.tmp.keras"),
    ):
        local = layout.path(temporary)
        model.save(local)
        tf.io.gfile.rename(local, final, overwrite=True)


# ---------------------------------------------------------------------------------------------
# The run.


def _phase_callbacks(
    layout: ModelDir,
    phase: PhaseConfig,
    first_epoch: int,
    backup_dir: str,
    guard: callbacks_lib.DivergenceGuard,
    evaluator: DevEvaluator | None,
    best_dev_gap: float | None,
    classifier: keras.Model,
) -> list[keras.callbacks.Callback]:
    """The callbacks of one phase's ``fit``, in the order they must run (see callbacks.py)."""
    callbacks = [guard]
    if evaluator is not None:
        callbacks.append(callbacks_lib.DevGap(evaluator, guard, classifier))
    callbacks += [
        keras.callbacks.LearningRateScheduler(
            lambda epoch, _lr: phase.learning_rate_at(epoch - first_epoch)
        ),
        callbacks_lib.EpochLog(phase.name, phase.batch_size),
        callbacks_lib.HistoryCsv(layout.history, phase.name, guard),
        callbacks_lib.UnlessDiverged(SaveCheckpoints(layout, best_dev_gap, classifier), guard),
        # Kept after the phase (delete_checkpoint=False): a re-run restores a finished phase
        # from it; double_checkpoint survives a kill in the middle of writing the backup.
        callbacks_lib.UnlessDiverged(
            keras.callbacks.BackupAndRestore(
                backup_dir, double_checkpoint=True, delete_checkpoint=False
            ),
            guard,
        ),
        keras.callbacks.TensorBoard(layout.logs, update_freq="epoch"),
    ]
    return callbacks


def _has_training_state(layout: ModelDir) -> bool:
    """True once a run in ``layout`` saved something a resume continues from: a checkpoint, a
    phase backup, or ``_SUCCESS``."""
    return any(tf.io.gfile.exists(path) for path in (
        layout.last_checkpoint, layout.best_checkpoint, layout.backup, layout.success))


def _check_model_dir(layout: ModelDir, config: TrainConfig) -> bool:
    """True if the model dir already holds this finished run; raises if it holds another run.

    A run that failed before its first checkpoint (e.g. the ImageNet weights could not be
    downloaded) locks nothing: its files (config, history, class counts) describe no training,
    so another config may start there; they are replaced as the new run starts.
    """
    if not tf.io.gfile.exists(layout.config):
        return False
    with tf.io.gfile.GFile(layout.config, "r") as handle:
        existing = handle.read()
    if _config_for_comparison(existing) != _config_for_comparison(config.to_json()):
        if not _has_training_state(layout):
            _LOG.warning("%s holds the config of a run that saved no checkpoint; starting this "
                         "run there instead", layout.root)
            return False
        raise tfrecords_schema.InputError(
            f"{layout.root} holds a run with another config ({layout.config}); "
            "use a new --model_dir or repeat that run's flags to resume it"
        )
    return tf.io.gfile.exists(layout.success)


def _forget_untrained_run(layout: ModelDir, config: TrainConfig) -> None:
    """The chief's part of the rule above: the files of a run with another config that saved no
    checkpoint are removed before this run writes its own (its history's initial dev GAP and
    its class counts belong to that config)."""
    if not tf.io.gfile.exists(layout.config) or _has_training_state(layout):
        return
    if _config_for_comparison(_read_text(layout.config)) == _config_for_comparison(
            config.to_json()):
        return
    for path in (layout.history, layout.class_counts):
        if tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)


def _read_text(path: str) -> str:
    with tf.io.gfile.GFile(path, "r") as handle:
        return handle.read()


@contextlib.contextmanager
def reading(flag: str, file_pattern: str):
    """Data errors raised in the block become one ``DataError`` line that names ``flag`` and,
    for a damaged record, the file and record (searched in ``file_pattern``'s files only)."""
    try:
        yield
    except tf.errors.OpError as error:
        if not data_lib.is_data_error(error):
            raise
        message = data_lib.explain_data_error(error, file_pattern)
        raise data_lib.DataError(f"{flag} {file_pattern}: {message}") from error
    except (data_lib.DataError, FileNotFoundError) as error:
        if str(error).startswith(flag):
            raise
        raise data_lib.DataError(
            f"{flag} {file_pattern}: {data_lib.explain_data_error(error)}") from error


def _check_dev_data(dev_data: str, num_classes: int, check_labels: bool) -> None:
    """A dev set was asked for: its files must exist and hold records (an empty dev set would
    train without one, silently), with labels of the label map when ``check_labels``."""
    with reading("--dev_data", dev_data):
        files = data_lib.list_files(dev_data)
        if not list(tf.data.TFRecordDataset(files).take(1).as_numpy_iterator()):
            raise data_lib.DataError(
                f"--dev_data {dev_data}: its {len(files)} file(s) hold no record; a dev set "
                "was asked for (an ingest whose dev split received no record writes no dev "
                "shards): pass other files or leave --dev_data out")
        if check_labels:
            data_lib.check_labels(data_lib.count_labels(dev_data), num_classes)


def _check_data(config: TrainConfig, num_classes: int) -> dict[int, int]:
    """Lists the files and checks labels against the label map; returns label counts (or {})."""
    with reading("--train_data", config.data.train_data):
        data_lib.list_files(config.data.train_data)
    if config.data.dev_data:
        _check_dev_data(config.data.dev_data, num_classes, config.data.check_labels)
    if not config.data.check_labels:
        return {}
    with reading("--train_data", config.data.train_data):
        counts = data_lib.count_labels(config.data.train_data)
        data_lib.check_labels(counts, num_classes)
    return counts


@dataclasses.dataclass
class _Run:
    """What the steps of one run share. :func:`_prepare` fills the first block,
    :func:`_build_models` the second; :func:`_run_phase` updates ``history``."""

    config: TrainConfig
    layout: ModelDir  # where this process writes: the model dir, or a non-chief's temp folder
    chief: ModelDir  # the model dir; every worker reads its shared decisions from there
    strategy: tf.distribute.Strategy
    info: distribute.StrategyInfo
    num_classes: int
    counts: dict[int, int]  # label -> training images ({} when not counted)
    head: heads_lib.Head
    class_counts: np.ndarray | None  # [C], for a head whose loss needs them
    started: float

    model: keras.Model | None = None  # images -> probabilities (what is checkpointed, exported)
    training_model: keras.Model | None = None  # what fit trains (shares the model's layers)
    evaluator: DevEvaluator | None = None
    history: dict[int, dict] = dataclasses.field(default_factory=dict)
    last_images_per_second: str | None = None


def train(config: TrainConfig) -> dict:
    """Runs (or resumes) the phases of ``config``; returns the summary written to summary.json.

    Raises:
      ValueError (incl. ``DataError``, ``SchemaError``), FileNotFoundError: bad input.
      TrainingDiverged: the loss became non-finite.
    """
    layout = ModelDir(config.model_dir)
    # Seconds, not the storage clients' minutes of retries, when a bucket cannot be reached.
    cli.check_reachable({"--model_dir": config.model_dir, "--train_data": config.data.train_data,
                         "--dev_data": config.data.dev_data, "--label_map": config.data.label_map})
    if _check_model_dir(layout, config):
        _LOG.info("%s already holds this finished run (_SUCCESS); nothing to do", layout.root)
        return _read_json(layout.summary)
    run = _prepare(config)
    with dtype_policy(config.distribution.mixed_precision):
        _build_models(run)
        for index, phase, first_epoch, end_epoch in phase_epoch_ranges(config):
            _run_phase(run, index, phase, first_epoch, end_epoch)
    if not run.info.is_chief:
        return _finish_non_chief(run.layout, run.info)
    return _export(run)


def _prepare(config: TrainConfig) -> _Run:
    """Strategy, where this worker writes, data checks, class counts, config files, seed."""
    layout = chief = ModelDir(config.model_dir)
    strategy, info = distribute.make_strategy(config.distribution)  # first: may split the CPU
    if not info.is_chief:
        # Every worker runs this same code, but only the chief writes the model dir; the others
        # write their own temporary folder (their backup, for their resume), removed on success.
        layout = ModelDir(distribute.worker_temp_dir(config.model_dir, info))
        _LOG.info("not the chief (%s): writing to %s until the run succeeds", info.task,
                  layout.root)
    for phase in config.active_phases:
        distribute.check_global_batch(phase.batch_size, info, f"--{phase.name}_batch_size")
    label_map = label_map_lib.read_label_map(config.data.label_map)
    num_classes = label_map.num_classes
    counts = _check_data(config, num_classes)
    head = heads_lib.make_head(config.model)
    if head.uses_class_counts and not counts:  # --check_labels false: count them anyway
        counts = data_lib.count_labels(config.data.train_data)
    if counts:
        _LOG.info(
            "training data: %d images, %d classes used of %d, %d non-landmark images",
            sum(counts.values()),
            len([label for label in counts if label >= 0]),
            num_classes,
            counts.get(-1, 0),
        )
    _LOG.info("%s", head.describe())

    tf.io.gfile.makedirs(layout.root)
    if info.is_chief:
        _forget_untrained_run(layout, config)
    _write_text(layout.config, config.to_json() + "\n")
    label_map_lib.write_label_map(label_map, layout.label_map)
    class_counts = _write_class_counts(layout, chief, head, counts, num_classes)
    if config.data.seed is not None:
        keras.utils.set_random_seed(config.data.seed)
    return _Run(
        config=config, layout=layout, chief=chief, strategy=strategy, info=info,
        num_classes=num_classes, counts=counts, head=head, class_counts=class_counts,
        started=time.perf_counter(),
    )


def _write_class_counts(
    layout: ModelDir, chief: ModelDir, head: heads_lib.Head, counts: dict[int, int],
    num_classes: int,
) -> np.ndarray | None:
    """For a head whose loss needs them: the training images per class ``[C]``, also written
    to ``class_counts.json`` with the margins built from them. A resume must find the counts
    the run started with (its margins would change otherwise)."""
    if not head.uses_class_counts:
        return None
    per_class = heads_lib.per_class_counts(counts, num_classes)
    record = {
        "num_classes": num_classes,
        "non_landmark_images": int(counts.get(-1, 0)),
        "images_per_class": per_class.tolist(),
        "margins": [round(float(margin), 6) for margin in head.margins(per_class)],
    }
    if tf.io.gfile.exists(chief.class_counts):
        stored = _read_json(chief.class_counts)
        if stored.get("images_per_class") != record["images_per_class"]:
            raise tfrecords_schema.InputError(
                f"the training data no longer has the images per class that the run in "
                f"{chief.root} started with ({chief.class_counts}); its {head.name} margins "
                "depend on them: use a new --model_dir"
            )
    _write_text(layout.class_counts, json.dumps(record) + "\n")
    return per_class


def _build_models(run: _Run) -> None:
    """The network (BatchNorm calibrated for a random backbone), what ``fit`` trains, the
    dev evaluator, and the history so far."""
    config, strategy = run.config, run.strategy
    with strategy.scope():
        run.model = model_lib.build_model(
            run.num_classes,
            image_size=config.data.image_size,
            backbone_weights=config.model.backbone_weights,
            dropout=config.model.dropout,
            gem_p=config.model.gem_p,
            head=run.head,
        )
    if (
        config.model.backbone_weights.lower() == "none"
        and config.model.calibrate_batchnorm_images > 0
    ):
        # Restored backups overwrite these statistics, so this is harmless on a resume.
        with strategy.scope():
            calibrate_batchnorm(run.model, _calibration_images(config, run.num_classes))
    run.training_model = make_training_model(run.model, config, strategy)
    # Every decision that changes which collectives run (restore a phase, evaluate at
    # initialisation) is read from the chief's files, so all workers take the same path.
    run.history = callbacks_lib.read_history(run.chief.history)
    if config.data.dev_data:
        eval_batch = max(phase.batch_size for phase in config.active_phases)
        run.evaluator = DevEvaluator(config, run.num_classes, eval_batch, strategy, run.info)


def _run_phase(
    run: _Run, index: int, phase: PhaseConfig, first_epoch: int, end_epoch: int
) -> None:
    """One phase: restored from its backup if that records all its epochs, else ``fit`` (from
    the backup's last complete epoch, if any).

    Raises:
      TrainingDiverged: the loss became non-finite.
    """
    config, layout, chief, model = run.config, run.layout, run.chief, run.model
    compile_for_phase(model, phase, config, run.strategy, run.training_model, run.class_counts)
    backup_dir = layout.phase_backup(index, phase.name)
    if layout != chief:
        _copy_backup_from_chief(chief.phase_backup(index, phase.name), backup_dir)
    if _completed_epochs(backup_dir) >= end_epoch:
        _restore_backup(run.training_model, backup_dir, run.strategy)
        _LOG.info("phase %s: already complete (epochs %d-%d), restored from %s",
                  phase.name, first_epoch + 1, end_epoch, backup_dir)
        return
    done = _completed_epochs(backup_dir)
    if done > first_epoch:
        _LOG.info("phase %s: resuming after epoch %d from %s", phase.name, done, backup_dir)
    if run.evaluator is not None and 0 not in run.history:
        run.history[0] = {"epoch": 0, "phase": "init", "dev_gap": f"{run.evaluator(model):.6g}"}
        callbacks_lib.write_history(layout.history, run.history)
        _LOG.info("dev GAP at initialisation: %s", run.history[0]["dev_gap"])
    _LOG.info(
        "phase %s: epochs %d-%d, backbone trainable from %s, %s, lr %.3g -> %.3g",
        phase.name, first_epoch + 1, end_epoch, phase.trainable_from,
        run.info.describe_batch(phase.batch_size), phase.learning_rate_at(0),
        phase.learning_rate_at(phase.epochs - 1),
    )
    guard = callbacks_lib.DivergenceGuard()
    phase_callbacks = _phase_callbacks(
        layout, phase, first_epoch, backup_dir, guard, run.evaluator,
        _best_dev_gap(run.history), classifier=model,
    )
    run.training_model.fit(
        make_train_input(config, phase, run.num_classes, run.strategy),
        initial_epoch=first_epoch,
        epochs=end_epoch,
        steps_per_epoch=config.data.steps_per_epoch,
        callbacks=phase_callbacks,
        verbose=config.verbose,
        shuffle=False,  # the input pipeline shuffles; Keras cannot shuffle a dataset
    )
    if guard.diverged:
        raise TrainingDiverged(
            f"training diverged in phase {phase.name}: {guard.where}; stopped, the last "
            f"good state is kept in {layout.last_checkpoint} and {layout.backup} "
            "(try a lower learning rate)"
        )
    run.history = callbacks_lib.read_history(chief.history)
    run.last_images_per_second = run.history.get(end_epoch, {}).get("images_per_second")


def _export(run: _Run) -> dict:
    """The chief's end: ``model.keras`` and ``embedding.keras`` from the best (or last)
    weights, ``summary.json``, the backups removed, ``_SUCCESS`` last."""
    config, layout = run.config, run.layout
    history = callbacks_lib.read_history(layout.history)
    best_dev_gap = _best_dev_gap(history)
    use_best = best_dev_gap is not None and tf.io.gfile.exists(layout.best_checkpoint)
    weights = layout.best_checkpoint if use_best else layout.last_checkpoint
    if not tf.io.gfile.exists(weights):  # every phase was restored from backups only
        save_classifier_weights(run.model, weights)
    _release_training_state(run)
    export_model(layout, weights, config, run.num_classes)
    summary = {
        "model": layout.model,
        "embedding": layout.embedding,
        "exported_weights": "best dev GAP" if use_best else "last epoch",
        "head": run.head.name,
        "embedding_dim": run.head.embedding_dim,
        "num_classes": run.num_classes,
        "train_images": sum(run.counts.values()) if run.counts else None,
        "epochs": config.total_epochs,
        "strategy": run.info.kind,
        "replicas": run.info.num_replicas,
        "devices": list(run.info.devices),
        "global_batch_by_phase": {p.name: p.batch_size for p in config.active_phases},
        "mixed_precision": config.distribution.mixed_precision,
        "dev_gap_initial": _float_or_none(history.get(0, {}).get("dev_gap")),
        "dev_gap_final": _float_or_none(history.get(config.total_epochs, {}).get("dev_gap")),
        "dev_gap_best": best_dev_gap,
        "images_per_second_last_epoch": _float_or_none(run.last_images_per_second),
        "seconds_this_process": round(time.perf_counter() - run.started, 1),
    }
    _write_text(layout.summary, json.dumps(summary, indent=2) + "\n")
    if tf.io.gfile.exists(layout.backup):
        tf.io.gfile.rmtree(layout.backup)
    _write_text(layout.success, "")
    return summary


def _release_training_state(run: _Run) -> None:
    """Drops the trained network, its optimizer state and the dev evaluator before the export
    builds its own copy from the weights file: the export then needs the memory of one model,
    not of the training state plus a model (at GLDv2's 203,094 classes the sigmoid head's
    weights and Adam slots are 5.2 GB, the exported model 1.7 GB; docs/SCALE.md, "Training with
    many classes"). Keras models hold reference cycles (layers <-> model, train function), so
    the memory returns only with a collection."""
    run.model = run.training_model = run.evaluator = None
    gc.collect()


def _finish_non_chief(layout: ModelDir, info: distribute.StrategyInfo) -> dict:
    """A non-chief worker's end: nothing to export (the chief does), its temporary folder goes."""
    if tf.io.gfile.exists(layout.root):
        tf.io.gfile.rmtree(layout.root)
    _LOG.info("worker %s done; removed its temporary folder %s", info.task, layout.root)
    return {"task": info.task, "chief": False, "removed": layout.root}


def _float_or_none(value) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def _best_dev_gap(history: dict[int, dict]) -> float | None:
    """Best dev GAP over the *trained* epochs of ``history`` (the initial row does not count)."""
    values = [_float_or_none(row.get("dev_gap")) for epoch, row in history.items() if epoch > 0]
    values = [value for value in values if value is not None and math.isfinite(value)]
    return max(values) if values else None


# ---------------------------------------------------------------------------------------------
# CLI.


def _run(argv: Sequence[str]) -> int:
    """Parses ``argv``, trains, prints the summary; returns :data:`EXIT_OK`.

    A TensorFlow error raised while training is re-raised as ``DataError`` with
    ``trainer.data``'s one-line explanation (file and record) only when
    :func:`trainer.data.is_data_error` says it is about the records (corrupt or truncated
    TFRecords, another schema version, labels outside the label map, undecodable images, a
    record file that cannot be opened); any other TensorFlow error is not the user's input and
    reaches :func:`trainer.cli.run_command` unchanged, which reports it as a bug (exit code 1).
    """
    config = config_from_args(argv)
    try:
        summary = train(config)
    except tf.errors.OpError as error:
        if not data_lib.is_data_error(error):
            raise
        message = data_lib.explain_data_error(error, config.data.train_data)
        raise data_lib.DataError(f"--train_data {config.data.train_data}: {message}") from error
    print(json.dumps(summary, indent=2))
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (see the module docstring and
    :func:`trainer.cli.run_command`)."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # per-step collective chatter
    argv = sys.argv[1:] if argv is None else list(argv)
    return cli.run_command("landmarks-train", lambda: _run(argv))


if __name__ == "__main__":
    sys.exit(main())
