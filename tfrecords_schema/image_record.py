"""One normalised image per ``tf.train.Example``, with GLDv2/DELF feature keys.

The field table :data:`FIELDS` is the single definition of the layout: the writer
(:func:`make_example`), the Python parser (:func:`parse_record`) and the tf.data parser
(:func:`parse_tensors`) are all derived from it, so they cannot drift apart.

Keys (``tf.train.Example`` feature name -> meaning):

===========================  ========  =====================================================
``image/encoded``            bytes     the image as JPEG, RGB, already oriented and resized
``image/format``             bytes     always ``b"jpeg"``
``image/id``                 bytes     the manifest id (UTF-8)
``image/class/label``        int64     contiguous class index; -1 = non-landmark or unlabelled
``image/class/landmark_id``  int64     original landmark id from the manifest; -1 if none
``image/height``             int64     pixels of the stored JPEG
``image/width``              int64     pixels of the stored JPEG
``image/source_format``      bytes     format of the input file (``JPEG``, ``PNG``, ...)
``schema/version``           int64     :data:`tfrecords_schema.SCHEMA_VERSION`
===========================  ========  =====================================================

The nested-looking key names are exactly what TensorFlow Datasets produces when it flattens a
nested ``FeaturesDict``, so the same shards can be described as a TFDS dataset.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
from typing import Iterable, Iterator

import tensorflow as tf

from tfrecords_schema import SCHEMA_VERSION, SchemaError

NON_LANDMARK = -1
"""Label of a distractor (non-landmark) image, and of an unlabelled test image."""

KEY_ENCODED = "image/encoded"
KEY_FORMAT = "image/format"
KEY_ID = "image/id"
KEY_LABEL = "image/class/label"
KEY_LANDMARK_ID = "image/class/landmark_id"
KEY_HEIGHT = "image/height"
KEY_WIDTH = "image/width"
KEY_SOURCE_FORMAT = "image/source_format"
KEY_SCHEMA_VERSION = "schema/version"

# (tf.train.Example key, ImageRecord attribute, kind). "bytes" fields hold str or bytes in Python.
FIELDS: tuple[tuple[str, str, str], ...] = (
    (KEY_ENCODED, "jpeg_bytes", "bytes"),
    (KEY_FORMAT, "image_format", "str"),
    (KEY_ID, "image_id", "str"),
    (KEY_LABEL, "label", "int"),
    (KEY_LANDMARK_ID, "landmark_id", "int"),
    (KEY_HEIGHT, "height", "int"),
    (KEY_WIDTH, "width", "int"),
    (KEY_SOURCE_FORMAT, "source_format", "str"),
    (KEY_SCHEMA_VERSION, "schema_version", "int"),
)

# ------------------------------------------------------------------------------------------
# Other layouts of image records (what a reader may meet instead of this one)
# ------------------------------------------------------------------------------------------

LAYOUT_LANDMARKS = "landmarks"
"""This project's layout (:data:`FIELDS`, with a ``schema/version`` key)."""
LAYOUT_DELF = "delf"
"""The layout of DELF's ``research/delf/delf/python/training/build_image_dataset.py``:
``image/encoded``, ``image/id``, ``image/height``, ``image/width``, ``image/colorspace``,
``image/channels``, ``image/format`` and, in training records only, ``image/class/label``
(the raw landmark id, or a contiguous id for the clean set); no ``schema/version``."""
LAYOUT_UNKNOWN = "unknown"

DELF_MARKER_KEYS = ("image/colorspace", "image/channels")
"""Keys DELF writes and this layout does not."""


def detect_layout(feature_keys: Iterable[str]) -> str:
    """:data:`LAYOUT_LANDMARKS`, :data:`LAYOUT_DELF` or :data:`LAYOUT_UNKNOWN` for the feature
    keys of one ``tf.train.Example`` (pure: looks at the key names only).

    A ``schema/version`` key means this project's layout (whatever its version). Without it,
    DELF's own keys ``image/colorspace`` / ``image/channels``, or ``image/encoded`` together with
    ``image/class/label`` (what DELF's training records have and ours lack), mean DELF's.
    """
    keys = set(feature_keys)
    if KEY_SCHEMA_VERSION in keys:
        return LAYOUT_LANDMARKS
    if keys & set(DELF_MARKER_KEYS) or {KEY_ENCODED, KEY_LABEL} <= keys:
        return LAYOUT_DELF
    return LAYOUT_UNKNOWN


def describe_layout(feature_keys: Iterable[str]) -> str:
    """The layout of a record's keys in words, for error messages (pure).

    E.g. ``"the layout of DELF's build_image_dataset.py (no schema/version key)"``.
    """
    keys = sorted(set(feature_keys))
    layout = detect_layout(keys)
    if layout == LAYOUT_LANDMARKS:
        return "this project's image-record layout (with a schema/version key)"
    if layout == LAYOUT_DELF:
        return "the layout of DELF's build_image_dataset.py (no schema/version key)"
    shown = ", ".join(keys[:8]) + (", ..." if len(keys) > 8 else "")
    return f"an unknown layout (keys: {shown or 'none'}; no schema/version key)"


def conversion_hint(source: str = "") -> str:
    """How to turn records of another layout into this one: the ``landmarks-ingest`` command.

    ``source``: the glob or file the records came from (``GLOB`` when unknown).
    """
    glob = source or "GLOB"
    return f"convert it with: landmarks-ingest --input_tfrecords '{glob}' --output_dir DIR"


def foreign_layout_error(feature_keys: Iterable[str], missing_key: str, source: str = "",
                         what: str = "record") -> SchemaError:
    """The :class:`SchemaError` for a record that lacks ``missing_key``: names the key, and for a
    record without ``schema/version`` (not written by this project) its layout and the command
    that converts it."""
    keys = set(feature_keys)
    if KEY_SCHEMA_VERSION in keys:
        return SchemaError(f"{what} is missing the key {missing_key!r}")
    return SchemaError(
        f"{what} lacks the key {missing_key!r}: it is in {describe_layout(keys)}, not this "
        f"project's image-record layout; {conversion_hint(source)}")


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image as stored in a shard.

    Attributes:
      image_id: the manifest id.
      jpeg_bytes: the JPEG file contents (RGB, upright, longer side <= the ingest's max side).
      label: contiguous class index in ``[0, num_classes)``, or :data:`NON_LANDMARK`.
      height, width: size of the stored JPEG in pixels.
      landmark_id: the original landmark id, or -1 for a non-landmark / unlabelled image.
      source_format: the input file's format as Pillow names it (``"JPEG"``, ``"PNG"``, ...).
    """

    image_id: str
    jpeg_bytes: bytes
    label: int
    height: int
    width: int
    landmark_id: int = NON_LANDMARK
    source_format: str = "JPEG"
    image_format: str = "jpeg"
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self):
        if not self.image_id:
            raise SchemaError("an image record needs a non-empty image_id")
        if self.label < NON_LANDMARK:
            raise SchemaError(f"label must be >= -1, got {self.label} for {self.image_id!r}")
        if self.height <= 0 or self.width <= 0:
            raise SchemaError(f"bad size {self.height}x{self.width} for {self.image_id!r}")


def _feature(kind: str, value) -> tf.train.Feature:
    if kind == "int":
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))
    if kind == "str":
        value = value.encode("utf-8")
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def make_example(record: ImageRecord) -> tf.train.Example:
    """Returns the ``tf.train.Example`` holding ``record`` (every key of :data:`FIELDS`)."""
    features = {key: _feature(kind, getattr(record, attr)) for key, attr, kind in FIELDS}
    return tf.train.Example(features=tf.train.Features(feature=features))


def example_bytes(example: tf.train.Example) -> bytes:
    """Serialises ``example`` with its feature keys sorted: the same record gives the same
    bytes in every process (a proto map's default order changes from one process to the next).
    Every record kind of the project is written through here."""
    return example.SerializeToString(deterministic=True)


def serialize_record(record: ImageRecord) -> bytes:
    """Returns the serialised ``tf.train.Example`` of ``record``, ready for a TFRecord file."""
    return example_bytes(make_example(record))


def check_version(version: int, where: str = "record") -> None:
    """Raises :class:`SchemaError` unless ``version`` is the version this code reads."""
    if int(version) != SCHEMA_VERSION:
        raise SchemaError(
            f"{where} has schema version {int(version)}, this code reads version {SCHEMA_VERSION}; "
            "re-run landmarks-ingest with this version of the code"
        )


def parse_record(serialized: bytes, source: str = "") -> ImageRecord:
    """Parses one serialised example into an :class:`ImageRecord` (Python side, no graph).

    Args:
      serialized: one record.
      source: the file or glob it came from, only for the conversion hint of a foreign layout.

    Raises:
      SchemaError: a key is missing (for a record of another layout, e.g. DELF's, the message
        names the layout and the ``landmarks-ingest --input_tfrecords`` command that converts
        it) or the schema version differs.
    """
    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as error:  # protobuf raises its own DecodeError type
        raise SchemaError(f"not a tf.train.Example: {error}") from error
    feature = example.features.feature
    values = {}
    for key, attr, kind in FIELDS:
        if key not in feature:
            raise foreign_layout_error(feature.keys(), key, source)
        if kind == "int":
            raw = feature[key].int64_list.value
        else:
            raw = feature[key].bytes_list.value
        if len(raw) != 1:
            raise SchemaError(f"key {key!r} should hold one value, holds {len(raw)}")
        value = raw[0]
        values[attr] = value.decode("utf-8") if kind == "str" else value
    check_version(values["schema_version"], f"record {values['image_id']!r}")
    return ImageRecord(**values)


def _feature_spec() -> dict[str, tf.io.FixedLenFeature]:
    dtypes = {"int": tf.int64, "str": tf.string, "bytes": tf.string}
    return {key: tf.io.FixedLenFeature([], dtypes[kind]) for key, _, kind in FIELDS}


FEATURE_SPEC = _feature_spec()
"""``tf.io.parse_*`` spec for every key of :data:`FIELDS`."""


def parse_tensors(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
    """tf.data parser: a scalar string tensor -> dict of scalar tensors keyed by attribute name.

    Keys: ``image_id`` (string), ``jpeg_bytes`` (string), ``label``, ``landmark_id``, ``height``,
    ``width``, ``schema_version`` (int64), ``image_format``, ``source_format`` (string). Fails the
    pipeline with an ``InvalidArgumentError`` naming the version if the schema version differs.
    """
    parsed = tf.io.parse_single_example(serialized, FEATURE_SPEC)
    version = parsed[KEY_SCHEMA_VERSION]
    # tf.Assert (not assert_equal) so that the error message carries the version it found.
    check = tf.Assert(
        tf.equal(version, tf.constant(SCHEMA_VERSION, tf.int64)),
        [f"schema version mismatch: this code reads version {SCHEMA_VERSION}, the record has", version],
    )
    with tf.control_dependencies([check]):
        return {attr: tf.identity(parsed[key]) for key, attr, _ in FIELDS}


def shard_paths(prefix: str, num_shards: int) -> list[str]:
    """Shard file names in Beam's convention: ``{prefix}-00000-of-00004.tfrecord``."""
    return [f"{prefix}-{index:05d}-of-{num_shards:05d}.tfrecord" for index in range(num_shards)]


def write_shards(records: Iterable[ImageRecord], prefix: str, num_shards: int = 1) -> list[str]:
    """Writes ``records`` round-robin into ``num_shards`` local TFRecord files; returns the paths.

    Beam jobs write through ``WriteToTFRecord`` with :func:`serialize_record`; this is for tests,
    tools and small datasets written from one process.
    """
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    paths = shard_paths(prefix, num_shards)
    writers = [tf.io.TFRecordWriter(path) for path in paths]
    try:
        for index, record in enumerate(records):
            writers[index % num_shards].write(serialize_record(record))
    finally:
        for writer in writers:
            writer.close()
    return paths


def read_records(pattern: str) -> Iterator[ImageRecord]:
    """Yields every record of the local files matching ``pattern``, file by file in name order."""
    paths = sorted(tf.io.gfile.glob(pattern)) if "://" in pattern else sorted(_glob.glob(pattern))
    if not paths:
        raise FileNotFoundError(f"no TFRecord files match {pattern!r}")
    for path in paths:
        for serialized in tf.data.TFRecordDataset(path).as_numpy_iterator():
            yield parse_record(serialized)
