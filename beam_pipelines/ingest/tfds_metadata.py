"""TensorFlow Datasets metadata beside the ingested shards.

With ``dataset_info.json`` and ``features.json`` written next to ``{split}-XXXXX-of-YYYYY.tfrecord``,
the ingest folder is also a TFDS dataset::

    import tensorflow_datasets as tfds
    builder = tfds.builder_from_directory("runs/demo/ingest_train")
    for example in builder.as_dataset(split="train").take(1):
        example["image"]["encoded"]   # uint8 [H, W, 3], decoded
        example["image"]["id"], example["image"]["class"]["label"]

No renaming is needed: TFDS flattens the nested feature dict below into exactly the keys of
:mod:`tfrecords_schema.image_record` (``image/encoded``, ``image/class/label``, ...). Keys that the
description leaves out (``schema/version``, ``image/format``, ...) are simply not decoded.

TFDS reaches files through ``tf.io.gfile``: local folders and real ``gs://`` buckets work; a
storage emulator does not (``tf.io.gfile``'s GCS endpoint is fixed and cannot be pointed at
one), so the ingest job treats this step as optional there.
"""

from __future__ import annotations

import logging

import numpy as np

from tfrecords_schema import SCHEMA_VERSION

_LOG = logging.getLogger(__name__)

FILENAME_TEMPLATE = "{SPLIT}-{SHARD_X_OF_Y}.{FILEFORMAT}"
"""Our shard names (``train-00000-of-00004.tfrecord``) in TFDS' template language."""


def describe_features():
    """The image record as a ``tfds.features.FeaturesDict`` (keys flatten to the schema's keys)."""
    import tensorflow_datasets as tfds  # heavy import, only where TFDS metadata is wanted

    scalar = tfds.features.Scalar
    return tfds.features.FeaturesDict(
        {
            "image": {
                "encoded": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                "id": tfds.features.Text(),
                "class": {"label": scalar(np.int64), "landmark_id": scalar(np.int64)},
                "height": scalar(np.int64),
                "width": scalar(np.int64),
            }
        }
    )


def write_tfds_metadata(output_dir: str, description: str = "") -> None:
    """Writes ``dataset_info.json`` and ``features.json`` into ``output_dir``.

    Counts the examples of every split by reading the shards once (TFDS needs per-shard lengths,
    which Beam's sharded writer does not report).
    """
    import tensorflow_datasets as tfds

    _LOG.info("writing TFDS metadata into %s", output_dir)
    tfds.disable_progress_bar()  # our own log line is enough; tqdm bars clutter job logs
    tfds.folder_dataset.write_metadata(
        data_dir=output_dir,
        features=describe_features(),
        filename_template=FILENAME_TEMPLATE,
        check_data=False,
        description=description or f"Landmark images (schema version {SCHEMA_VERSION}).",
    )
