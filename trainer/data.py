"""tf.data input pipeline: image-record shards -> ``(images [B, S, S, 3] in [-1, 1], labels [B])``.

Steps, per input pipeline (one per worker under tf.distribute):

1. :func:`list_files` (sorted glob) and :func:`shard_files`: each pipeline reads its own files
   (``files[pipeline_id::num_pipelines]``); with fewer files than pipelines, every pipeline reads
   all files and keeps every n-th record instead (logged warning).
2. Parallel interleave over files, parse with ``tfrecords_schema.image_record.parse_tensors``
   (which checks the schema version in-graph), check labels against ``num_classes``.
3. Optional class-balanced epochs (:func:`balanced_thresholds`): at most K images per class
   per epoch, non-landmarks (-1) being one more class.
4. Shuffle (training), repeat (optional), decode + augment (:mod:`trainer.augment`) or decode +
   resize (eval), scale to [-1, 1] with the shared :class:`~trainer.preprocessing.ImageContract`,
   batch, prefetch.

Augmentation runs in one of two places (``make_dataset(augment_on_device=...)``):

- **split mode** (default, ``augment_on_device=True``): the host decodes, cuts the crop
  branch's window, resizes to ``S x S``, scales, and yields ``({"resized_images",
  "crop_branch", "augment_noise"}, labels)``; the warp and channel shift run batched on the
  accelerator in :class:`trainer.augment.DeviceAugmentation` (put in front of the model for
  training only, :func:`trainer.augment.with_device_augmentation`). The host's part is what
  must happen per image before batching; the warp, ~6 ms per image on a CPU core, is almost
  free next to Xception's forward/backward pass on an accelerator.
- **host mode** (``augment_on_device=False``): the whole augmentation per image here, yielding
  ``(images, labels)`` (the reference; for a machine whose CPU idles while the device is busy).

Eval mode (``augment=None``) always yields ``(images, labels)``.

Labels stay class indices (int64, -1 = non-landmark): the loss turns them into targets, so no
15k-wide dense target is ever built on the host (``one_hot(-1, C)`` is the all-zero target).

Bad input fails with one line, not a stack trace. A corrupt record is **not skipped**: records
come from our own ingest, so a corrupt one means a damaged file, and silently training on fewer
images would hide it. The pipeline fails and :func:`explain_data_error` names the file and the
record position (:func:`locate_bad_record`); the training loop raises ``DataError(message)``.
"""

from __future__ import annotations

import collections
import functools
import logging
import re

import numpy as np
import tensorflow as tf

import tfrecords_schema
from tfrecords_schema import image_record
from trainer import augment as augment_lib
from trainer.preprocessing import ImageContract

logger = logging.getLogger(__name__)

AUTOTUNE = tf.data.AUTOTUNE
LABEL_MISMATCH = "the label map does not match the records"
_HASH_BUCKETS = 2**62  # 62-bit keys: collisions within one class are negligible (n^2 / 2^63)
_INT64_MIN = np.iinfo(np.int64).min


class DataError(tfrecords_schema.InputError):
    """The training data cannot be read as asked (message is one line, meant for the user)."""


# ---------------------------------------------------------------------------------------------
# Files and labels.


def list_files(file_pattern: str) -> list[str]:
    """Sorted files matching ``file_pattern`` (local or ``gs://``).

    Raises:
      FileNotFoundError: nothing matches.
    """
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord files match {file_pattern!r}")
    return files


def _files(file_pattern_or_files) -> list[str]:
    if isinstance(file_pattern_or_files, (list, tuple)):
        if not file_pattern_or_files:
            raise FileNotFoundError("no TFRecord files given")
        return sorted(file_pattern_or_files)
    return list_files(file_pattern_or_files)


def _parse_only(files: list[str], keys: dict[str, tf.io.FixedLenFeature], batch_size=4096):
    """Yields dicts of numpy arrays with only ``keys`` parsed, in batches (cheap: no decode)."""
    dataset = (
        tf.data.Dataset.from_tensor_slices(files)
        .interleave(tf.data.TFRecordDataset, cycle_length=4, num_parallel_calls=AUTOTUNE,
                    deterministic=True)
        .batch(batch_size)
        .map(lambda serialized: tf.io.parse_example(serialized, keys), num_parallel_calls=AUTOTUNE)
        .prefetch(2)
    )
    yield from dataset.as_numpy_iterator()


def count_labels(file_pattern) -> dict[int, int]:
    """Images per class index (``-1`` = non-landmark), parsing only the label of each record.

    Args:
      file_pattern: glob, or a list of files.

    Raises:
      DataError: the first record is not this project's image record (e.g. DELF's layout, whose
        ``image/class/label`` is a landmark id, not a class index: counting it would mislead).
    """
    counts: collections.Counter = collections.Counter()
    spec = {image_record.KEY_LABEL: tf.io.FixedLenFeature([], tf.int64)}
    files = _files(file_pattern)
    _check_first_record(files, file_pattern)
    for batch in _parse_only(files, spec):
        values, numbers = np.unique(batch[image_record.KEY_LABEL], return_counts=True)
        counts.update(dict(zip(values.tolist(), numbers.tolist())))
    return dict(sorted(counts.items()))


def check_labels(counts: dict[int, int], num_classes: int) -> None:
    """Raises :class:`DataError` unless every label is -1 or in ``[0, num_classes)``."""
    bad = sorted(label for label in counts if label < -1 or label >= num_classes)
    if bad:
        raise DataError(
            f"{LABEL_MISMATCH}: {len(bad)} label value(s) outside [-1, {num_classes}) "
            f"(e.g. {bad[:5]}, {sum(counts[b] for b in bad)} images); "
            "use the label_map.csv written by the same ingest run"
        )


def shard_files(files: list[str], input_context) -> tuple[list[str], bool]:
    """This pipeline's files, and whether records must be sharded instead of files.

    Returns ``(files, False)`` with ``files[pipeline_id::num_pipelines]`` when there are at least
    as many files as pipelines; otherwise ``(all files, True)``: each pipeline then keeps every
    ``num_pipelines``-th record (reads everything, so it is slower; logged).
    """
    if input_context is None or input_context.num_input_pipelines <= 1:
        return list(files), False
    count, index = input_context.num_input_pipelines, input_context.input_pipeline_id
    if len(files) >= count:
        return list(files[index::count]), False
    logger.warning(
        "only %d file(s) for %d input pipelines: sharding by record instead of by file "
        "(every pipeline reads every file); write more shards to avoid this", len(files), count)
    return list(files), True


# ---------------------------------------------------------------------------------------------
# Class-balanced epochs.


def _fingerprint(image_ids: tf.Tensor) -> tf.Tensor:
    return tf.strings.to_hash_bucket_fast(image_ids, _HASH_BUCKETS)


def epoch_keys(fingerprints: tf.Tensor, salt: tf.Tensor) -> tf.Tensor:
    """Per-epoch random-looking int64 key of each image: a hash of (id fingerprint, epoch salt).

    The same function serves the threshold computation (all images at once) and the filter
    (one image in-graph), so both see identical keys.
    """
    text = tf.strings.join(
        [tf.strings.as_string(fingerprints), tf.strings.as_string(tf.cast(salt, tf.int64))], "/")
    return tf.strings.to_hash_bucket_fast(text, _HASH_BUCKETS)


def balanced_thresholds(labels: tf.Tensor, keys: tf.Tensor, max_per_class: int,
                        num_slots: int) -> tf.Tensor:
    """Per class the largest key kept: ``[num_slots]`` int64, slot = label + 1.

    Within each class the images are ranked by key; the ``max_per_class`` smallest keys are
    kept, so an image is kept iff ``key <= threshold[label + 1]``. With distinct keys this keeps
    exactly ``min(count, K)`` images of each class. Keys are 62-bit hashes of distinct image ids,
    so they are distinct unless an id occurs twice in the data (ingest keeps ids unique; a
    duplicated id would be kept or dropped with its twin). Slots of absent classes hold int64 min.

    Args:
      labels: int64 ``[N]`` labels (-1 .. C-1) of all images; keys: int64 ``[N]``.
    """
    slots = tf.cast(labels, tf.int64) + 1
    by_key = tf.argsort(keys, stable=True)
    order = tf.gather(by_key, tf.argsort(tf.gather(slots, by_key), stable=True))
    sorted_slots, sorted_keys = tf.gather(slots, order), tf.gather(keys, order)
    class_start = tf.searchsorted(sorted_slots, sorted_slots, side="left")
    rank = tf.range(tf.size(slots, out_type=tf.int64), dtype=tf.int64) - tf.cast(class_start, tf.int64)
    kept = tf.where(rank < max_per_class, sorted_keys, tf.constant(_INT64_MIN, tf.int64))
    thresholds = tf.math.unsorted_segment_max(kept, sorted_slots, num_slots)
    return tf.maximum(thresholds, _INT64_MIN)  # empty segments give the dtype's lowest value


def _label_fingerprints(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Labels and id fingerprints of all records (a read of all files, no decode)."""
    spec = {image_record.KEY_LABEL: tf.io.FixedLenFeature([], tf.int64),
            image_record.KEY_ID: tf.io.FixedLenFeature([], tf.string)}
    labels, fingerprints = [], []
    for batch in _parse_only(files, spec):
        labels.append(batch[image_record.KEY_LABEL])
        fingerprints.append(_fingerprint(batch[image_record.KEY_ID]).numpy())
    return np.concatenate(labels), np.concatenate(fingerprints)


# ---------------------------------------------------------------------------------------------
# The dataset.


def _source_glob(file_pattern, path: str) -> str:
    """The glob to name in a conversion hint: the user's pattern, else the file itself."""
    return file_pattern if isinstance(file_pattern, str) and file_pattern else path


def _check_first_record(files: list[str], file_pattern=None) -> None:
    """Fails early, in one line, on a schema-version mismatch, a record of another layout (e.g.
    DELF's: the message names it and the ``landmarks-ingest --input_tfrecords`` command that
    converts it) or a non-record first file."""
    for path in files:
        try:
            first = list(tf.data.TFRecordDataset(path).take(1).as_numpy_iterator())
        except tf.errors.OpError as error:
            raise DataError(f"{path}: not a readable TFRecord file ({_first_line(error)})") from None
        if first:
            try:
                image_record.parse_record(first[0], source=_source_glob(file_pattern, path))
            except tfrecords_schema.SchemaError as error:
                raise DataError(f"{path}: {error}") from None
            return


def _parse_fn(num_classes):
    def parse(serialized):
        record = image_record.parse_tensors(serialized)
        label = record["label"]
        checks = [tf.debugging.assert_greater_equal(
            label, tf.constant(-1, tf.int64), message=f"{LABEL_MISMATCH}: a label is below -1")]
        if num_classes is not None:
            checks.append(tf.debugging.assert_less(
                label, tf.constant(num_classes, tf.int64),
                message=f"{LABEL_MISMATCH}: a label is >= num_classes ({num_classes})"))
        with tf.control_dependencies(checks):
            label = tf.identity(label)
        return {"jpeg": record["jpeg_bytes"], "label": label, "image_id": record["image_id"]}
    return parse


def _records(files, parse, *, training, seed, deterministic, element_shard, input_context):
    """Parsed records of ``files`` (dicts with ``jpeg``, ``label``, ``image_id``)."""
    file_names = tf.data.Dataset.from_tensor_slices(files)
    if training and not element_shard:
        file_names = file_names.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    records = file_names.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(files), 8),
        block_length=1,
        num_parallel_calls=AUTOTUNE,
        # Record sharding needs the same record order in every pipeline.
        deterministic=deterministic or element_shard,
    )
    if element_shard:
        records = records.shard(input_context.num_input_pipelines, input_context.input_pipeline_id)
    return records.map(parse, num_parallel_calls=AUTOTUNE, deterministic=deterministic)


def make_dataset(
    file_pattern,
    *,
    contract: ImageContract,
    batch_size: int,
    training: bool,
    augment: augment_lib.AugmentParams | None = None,
    num_classes: int | None = None,
    shuffle_buffer: int = 1024,
    seed: int | None = None,
    deterministic: bool = False,
    input_context: tf.distribute.InputContext | None = None,
    max_images_per_class: int | None = None,
    repeat: bool = False,
    drop_remainder: bool | None = None,
    augment_on_device: bool = True,
) -> tf.data.Dataset:
    """The input pipeline: ``(images float32 [B, S, S, 3] in [-1, 1], labels int64 [B])``.

    With ``augment`` and ``augment_on_device`` (split mode) the first element is instead the
    dict ``{"resized_images": float32 [B, S, S, 3] in [-1, 1] (decoded, crop window cut,
    resized, not yet warped), "crop_branch": float32 [B] (1 = crop branch, 0 = whole-image branch),
    "augment_noise": float32 [B, NOISE_SIZE] (uniforms in [0, 1))}`` that
    :class:`trainer.augment.DeviceAugmentation` turns into augmented images on the accelerator
    (keys: ``augment.IMAGES``, ``augment.CROP_BRANCH``, ``augment.NOISE``).

    Args:
      file_pattern: glob of image-record shards (local or ``gs://``), or a list of files.
      contract: the shared resize/scale contract (``S = contract.image_size``).
      batch_size: images per batch *of this pipeline* (under tf.distribute: the per-replica
        batch, ``input_context.get_per_replica_batch_size(global_batch)``).
      training: shuffle files and records; drop the last partial batch by default.
      augment: the recipe's augmentation, or None for decode + resize only (eval mode).
      num_classes: if given, a label >= num_classes fails the pipeline (one-line message via
        :func:`explain_data_error`).
      shuffle_buffer: records in the shuffle buffer (serialized JPEGs: ~50 KB each at 512 px).
      seed: seeds file/record shuffling, augmentation and class balancing. Each iteration of
        the dataset (each Keras epoch) draws new values, reproducibly given the seed.
      deterministic: keep element order fixed in parallel maps/interleave; with a seed, two
        runs then yield identical batches (tests).
      input_context: ``tf.distribute.InputContext``: shard by file (see :func:`shard_files`).
      max_images_per_class: class-balanced epochs: at most K images per class per epoch
        (non-landmarks are one more class), a different selection each epoch. Reads the labels
        and ids of all files once when the dataset is built.
      repeat: repeat forever (each repetition is a new epoch, with a new balanced selection).
      drop_remainder: default ``training``.
      augment_on_device: with ``augment``: True (split mode, above): the host only decodes,
        cuts the crop window and resizes (``augment.antialias`` selects the antialiased or the
        ~2x cheaper plain bilinear resize), the warp and channel shift run batched in
        ``DeviceAugmentation``. False: the whole augmentation runs here, per image (the
        reference; for hosts with CPU to spare). Ignored without ``augment``.

    Raises:
      FileNotFoundError: no file matches. DataError: schema-version mismatch in the first
        record, or labels/arguments that cannot work. ValueError: bad arguments.
    """
    _check_arguments(batch_size, shuffle_buffer, num_classes, max_images_per_class)
    all_files = _files(file_pattern)
    _check_first_record(all_files, file_pattern)
    files, element_shard = shard_files(all_files, input_context)
    records = functools.partial(
        _records, files, _parse_fn(num_classes), training=training, seed=seed,
        deterministic=deterministic, element_shard=element_shard, input_context=input_context)
    dataset = _epochs(records, all_files, training=training, shuffle_buffer=shuffle_buffer,
                      seed=seed, repeat=repeat, max_images_per_class=max_images_per_class)
    dataset = tf.data.Dataset.zip((dataset, _element_seeds(seed)))
    dataset = dataset.map(_example_fn(contract, augment, augment_on_device),
                          num_parallel_calls=AUTOTUNE, deterministic=deterministic)
    dataset = dataset.batch(
        batch_size, drop_remainder=training if drop_remainder is None else drop_remainder)
    return _with_options(dataset, deterministic, input_context).prefetch(AUTOTUNE)


def _check_arguments(batch_size, shuffle_buffer, num_classes, max_images_per_class) -> None:
    """Raises ``ValueError`` for a size or count that cannot work (before any file is read)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shuffle_buffer < 1:
        raise ValueError(f"shuffle_buffer must be >= 1, got {shuffle_buffer}")
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if max_images_per_class is not None and max_images_per_class < 1:
        raise ValueError(f"max_images_per_class must be >= 1, got {max_images_per_class}")


def _epochs(records, all_files, *, training, shuffle_buffer, seed, repeat, max_images_per_class):
    """Parsed records in epoch order: every record once per epoch, or a class-balanced
    selection (:func:`_balanced`); shuffled when training; repeated forever with ``repeat``.

    ``records``: a function returning a fresh dataset of this pipeline's parsed records.
    """
    if max_images_per_class is None:
        dataset = records()
    else:  # repeats through its per-epoch salts, so that each epoch draws a new selection
        dataset = _balanced(records, all_files, max_images_per_class, seed, repeat)
    if training:
        dataset = dataset.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    if repeat and max_images_per_class is None:
        dataset = dataset.repeat()
    return dataset


def _element_seeds(seed) -> tf.data.Dataset:
    """One stateless seed ``int64 [2]`` per element; new values on each iteration (each epoch),
    reproducible with ``seed``."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def _example_fn(contract: ImageContract, augment, augment_on_device: bool):
    """``(record, element_seed) -> (model input, label)``, per element (module docstring):
    split mode's device-input dict, host mode's augmented image, or eval mode's resized image."""

    def split_mode(record, element_seed):
        features = augment_lib.prepare_jpeg_for_device(
            record["jpeg"], element_seed, augment, contract)
        features[augment_lib.IMAGES] = contract.scale(features[augment_lib.IMAGES])
        return features, record["label"]

    def image_mode(record, element_seed):
        if augment is None:
            image = contract.resize(tf.io.decode_jpeg(record["jpeg"], channels=3))
        else:
            image = augment_lib.augment_jpeg(record["jpeg"], element_seed, augment, contract)
        image = tf.ensure_shape(contract.scale(image), [contract.image_size] * 2 + [3])
        return image, record["label"]

    return split_mode if augment is not None and augment_on_device else image_mode


def _with_options(dataset, deterministic: bool, input_context) -> tf.data.Dataset:
    """``dataset`` with its element order fixed or not, and no auto-sharding under
    tf.distribute (the files or records were sharded here, tf.distribute must not shard again)."""
    options = tf.data.Options()
    options.deterministic = deterministic
    if input_context is not None:
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return dataset.with_options(options)


def _balanced(records, all_files, max_per_class, seed, repeat):
    """Epochs of at most ``max_per_class`` images per class, a new selection per epoch.

    Thresholds come from the labels/ids of *all* files with the same salt on every pipeline,
    so the cap holds for the global epoch even when pipelines read different files. The salt
    sequence is seeded (seed 0 when ``seed`` is None) so that all pipelines agree.
    """
    labels, fingerprints = _label_fingerprints(all_files)
    if labels.size == 0:
        raise DataError("class-balanced epochs asked for, but the files hold no records")
    num_slots = int(labels.max()) + 2
    all_labels = tf.constant(labels, tf.int64)
    all_fingerprints = tf.constant(fingerprints, tf.int64)
    logger.info("class-balanced epochs: %d images, %d classes incl. non-landmark, cap %d",
                labels.size, np.unique(labels).size, max_per_class)

    def one_epoch(salt):
        thresholds = balanced_thresholds(
            all_labels, epoch_keys(all_fingerprints, salt), max_per_class, num_slots)

        def keep(record):
            slot = tf.minimum(record["label"] + 1, num_slots - 1)
            key = epoch_keys(_fingerprint(record["image_id"]), salt)
            return key <= tf.gather(thresholds, slot)

        return records().filter(keep)

    salts = tf.data.Dataset.random(
        seed=0 if seed is None else seed, rerandomize_each_iteration=True)
    if not repeat:
        salts = salts.take(1)
    return salts.flat_map(one_epoch)


# ---------------------------------------------------------------------------------------------
# Errors in one line.

_NOISE = re.compile(r"\{\{function_node [^}]*\}\}\s*|\s*\[\[\{\{node [^]]*\]\]|\s*\[Op:\w+\].*$")


def _first_line(error: BaseException) -> str:
    text = getattr(error, "message", None) or str(error)
    lines = [line for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else type(error).__name__
    return _NOISE.sub("", line).strip()


def locate_bad_record(file_pattern, check: str = "images"):
    """Finds the first record that cannot be read: ``(path, record_index, reason)`` or None.

    Reads the files one by one in name order. ``check``: ``"frames"`` (TFRecord framing and
    checksums only), ``"examples"`` (also parse and schema version), ``"images"`` (also decode
    the JPEG). Slow (a full read up to the bad record): meant for the failure path only.
    """
    if check not in ("frames", "examples", "images"):
        raise ValueError(f"check must be frames, examples or images, got {check!r}")

    def validate(serialized):
        if check == "frames":
            return tf.constant(True)
        record = image_record.parse_tensors(serialized)
        if check == "images":
            return tf.reduce_all(tf.shape(tf.io.decode_jpeg(record["jpeg_bytes"], channels=3)) > 0)
        return tf.constant(True)

    for path in _files(file_pattern):
        index = 0
        try:
            for _ in tf.data.TFRecordDataset(path).map(validate).as_numpy_iterator():
                index += 1
        except tf.errors.OpError as error:
            return path, index, _first_line(error)
    return None


_PROBLEM_TEXT = {
    "frames": "corrupt or truncated TFRecord data",
    "images": "an image that cannot be decoded",
    "examples": "a record that is not an image record",
}
# tf.io.parse_*'s message for an absent key, e.g. "Feature: image/class/landmark_id (data type:
# int64) is required but could not be found."
_MISSING_FEATURE = re.compile(
    r"Feature: (\S+) \(data type: \w+\) is required but could not be found")
_DECODE_FAILURE = ("jpeg", "decode", "image file format", "image data")


def _record_problem(error: BaseException) -> str | None:
    """Which record problem a TensorFlow error names, or None: ``"schema"``, ``"labels"``,
    ``"frames"`` (corrupt TFRecord framing), ``"keys"`` (a record without a key the image record
    needs: names a key such as ``image/class/landmark_id``, so it is tested before the decode
    words), ``"images"`` (undecodable) or ``"examples"``."""
    line = _first_line(error)
    if "schema version mismatch" in line:
        return "schema"
    if LABEL_MISMATCH in line:
        return "labels"
    if isinstance(error, tf.errors.DataLossError):
        return "frames"
    if _MISSING_FEATURE.search(line):
        return "keys"
    if any(word in line.lower() for word in _DECODE_FAILURE):
        return "images"
    if "parse" in line.lower() or "Feature" in line or "Key:" in line:
        return "examples"
    return None


def _record_keys(path: str, index: int) -> list[str]:
    """The feature keys of record ``index`` of ``path`` ([] if unreadable); failure path only."""
    try:
        for serialized in tf.data.TFRecordDataset(path).skip(index).take(1).as_numpy_iterator():
            return list(tf.train.Example.FromString(serialized).features.feature.keys())
    except Exception:  # noqa: BLE001 - a damaged record: no keys to describe
        return []
    return []


def _explain_missing_key(line: str, file_pattern) -> str:
    """A record without a key: names the key, the record and its layout (and, for a foreign
    layout such as DELF's, the ``landmarks-ingest --input_tfrecords`` command that converts it)."""
    key = _MISSING_FEATURE.search(line).group(1)
    found = locate_bad_record(file_pattern, "examples") if file_pattern else None
    if found is None:
        where = f" in {file_pattern!r}" if file_pattern else ""
        return f"a record without the key {key!r}{where}: {line}"
    path, index, _ = found
    keys = _record_keys(path, index)
    error = image_record.foreign_layout_error(keys, key, source=_source_glob(file_pattern, path),
                                              what=f"{path}, record #{index} (0-based)")
    return str(error)


def is_data_error(error: BaseException) -> bool:
    """True if ``error``, raised while training, is about the user's records, not about the code.

    Data errors: :class:`DataError` and ``FileNotFoundError``; ``DataLossError`` (corrupt or
    truncated TFRecord data); ``NotFoundError`` (a listed record file that cannot be opened);
    an ``InvalidArgumentError`` that names a record problem :func:`explain_data_error` explains
    (another schema version, a label outside the label map, an image that cannot be decoded, a
    record that is not an image record). Any other TensorFlow error (a shape mismatch in the
    model, out of memory, a failed collective, ...) is not the data's fault: the CLI reports
    it as a bug, with its traceback.
    """
    if isinstance(error, (DataError, FileNotFoundError)):
        return True
    if isinstance(error, (tf.errors.DataLossError, tf.errors.NotFoundError)):
        return True
    return isinstance(error, tf.errors.InvalidArgumentError) and _record_problem(error) is not None


def explain_data_error(error: BaseException, file_pattern=None) -> str:
    """One line for the user from an error raised while iterating :func:`make_dataset`.

    Recognises schema-version mismatches, labels outside the label map, corrupt TFRecord
    framing, records without a key of the image record (named, with the record's layout, e.g.
    DELF's, and how to convert it), unparsable examples and undecodable JPEGs. With
    ``file_pattern`` a corrupt record is located (file and record index, by
    :func:`locate_bad_record`; slow, failure path only).
    Anything else comes back as its first line without TensorFlow's node noise.
    """
    if isinstance(error, (DataError, FileNotFoundError)):
        return _first_line(error)
    line = _first_line(error)
    where = f" in {file_pattern!r}" if file_pattern else ""
    problem = _record_problem(error)
    if problem == "schema":
        found = locate_bad_record(file_pattern, "examples") if file_pattern else None
        message = (f"another schema version than this code reads (version "
                   f"{tfrecords_schema.SCHEMA_VERSION}); re-run landmarks-ingest")
        if found and "schema version" in found[2]:
            return f"{found[0]}, record #{found[1]} (0-based): {message}"
        if found:  # an earlier, different problem stops the scan: report both
            return (f"records{where}: {message}; first unreadable record: {found[0]}, "
                    f"record #{found[1]} (0-based): {found[2]}")
        return f"records{where}: {message}"
    if problem == "labels":
        reason = line[line.index(LABEL_MISMATCH):].split("]")[0]
        value = re.search(r"\[x \([^)]*\) = \] \[(-?\d+)", line)
        found = f" (label {value.group(1)})" if value else ""
        return f"{reason}{found}{where}; use the label_map.csv written by the same ingest run"
    if problem is None:
        return line
    if problem == "keys":
        return _explain_missing_key(line, file_pattern)
    what = _PROBLEM_TEXT[problem]
    found = locate_bad_record(file_pattern, problem) if file_pattern else None
    if found is None:
        return f"{what}{where}: {line}"
    path, index, reason = found
    return f"{what}: {path}, record #{index} (0-based): {reason}"
