"""Local features of one image per ``tf.train.Example`` (reference features reused across runs).

Keys:

=============================  ========  ===================================================
``features/image_id``          bytes     id of the image the features come from
``features/class/label``       int64     class index of the image (-1: unlabelled)
``features/extractor``         bytes     extractor spec that made them (``"orb"``, ``"delf:..."``)
``features/num``               int64     N, number of keypoints (may be 0)
``features/dim``               int64     D, descriptor length
``features/locations``         float     N x 2 row-major, (y, x) in pixels of the input image
``features/descriptors``       float     N x D row-major, each row L2-normalised (real-valued
                                         descriptors: DELF, SIFT)
``features/descriptor_bits``   bytes     N x D / 8 bytes row-major: binary descriptors (ORB),
                                         8 bits a byte (numpy ``packbits`` order); then
                                         ``features/descriptors`` is absent
``schema/version``             int64     :data:`tfrecords_schema.SCHEMA_VERSION`
=============================  ========  ===================================================

Binary descriptors are stored packed, 32 bytes a 256-bit ORB keypoint rather than 1 KB as
floats; readers unpack them for matching (``rescoring.descriptors.unit_descriptors``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow as tf

from tfrecords_schema import SCHEMA_VERSION, SchemaError
from tfrecords_schema.image_record import check_version, example_bytes

KEY_IMAGE_ID = "features/image_id"
KEY_LABEL = "features/class/label"
KEY_EXTRACTOR = "features/extractor"
KEY_NUM = "features/num"
KEY_DIM = "features/dim"
KEY_LOCATIONS = "features/locations"
KEY_DESCRIPTORS = "features/descriptors"
KEY_DESCRIPTOR_BITS = "features/descriptor_bits"
KEY_SCHEMA_VERSION = "schema/version"


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureRecord:
    """Local features of one image.

    Attributes:
      image_id: id of the source image.
      label: class index of the image, -1 if unknown.
      extractor: the extractor spec string that produced the features.
      locations: float32 ``[N, 2]``, (y, x) pixel coordinates.
      descriptors: float32 ``[N, D]``, L2-normalised rows; or uint8 ``[N, D / 8]``, packed
        binary descriptors.
    """

    image_id: str
    label: int
    extractor: str
    locations: np.ndarray
    descriptors: np.ndarray

    def __post_init__(self):
        locations = np.asarray(self.locations, np.float32).reshape(-1, 2)
        descriptors = np.asarray(self.descriptors)
        if descriptors.dtype != np.uint8:
            descriptors = descriptors.astype(np.float32)
        if descriptors.ndim != 2 or descriptors.shape[0] != locations.shape[0]:
            raise SchemaError(
                f"{self.image_id!r}: descriptors {descriptors.shape} do not match "
                f"locations {locations.shape}"
            )
        object.__setattr__(self, "locations", locations)
        object.__setattr__(self, "descriptors", descriptors)

    @property
    def num_features(self) -> int:
        return int(self.locations.shape[0])

    @property
    def packed(self) -> bool:
        """True when the descriptors are packed binary rows (uint8)."""
        return self.descriptors.dtype == np.uint8

    @property
    def descriptor_dim(self) -> int:
        """D: descriptor length in floats, or in bits when packed."""
        return int(self.descriptors.shape[1]) * (8 if self.packed else 1)


def serialize_features(record: FeatureRecord) -> bytes:
    """Returns the serialised ``tf.train.Example`` of ``record``."""

    def ints(value):
        return tf.train.Feature(int64_list=tf.train.Int64List(value=[int(value)]))

    def text(value):
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value.encode("utf-8")]))

    def floats(array):
        return tf.train.Feature(float_list=tf.train.FloatList(value=array.reshape(-1).tolist()))

    feature = {
        KEY_IMAGE_ID: text(record.image_id),
        KEY_LABEL: ints(record.label),
        KEY_EXTRACTOR: text(record.extractor),
        KEY_NUM: ints(record.num_features),
        KEY_DIM: ints(record.descriptor_dim),
        KEY_LOCATIONS: floats(record.locations),
        KEY_SCHEMA_VERSION: ints(SCHEMA_VERSION),
    }
    if record.packed:
        feature[KEY_DESCRIPTOR_BITS] = tf.train.Feature(
            bytes_list=tf.train.BytesList(value=[record.descriptors.tobytes()]))
    else:
        feature[KEY_DESCRIPTORS] = floats(record.descriptors)
    return example_bytes(tf.train.Example(features=tf.train.Features(feature=feature)))


def parse_features(serialized: bytes) -> FeatureRecord:
    """Parses :func:`serialize_features` output; raises :class:`SchemaError` on any mismatch."""
    try:
        feature = tf.train.Example.FromString(serialized).features.feature
    except Exception as error:  # protobuf raises its own DecodeError type
        raise SchemaError(f"not a tf.train.Example: {error}") from error
    missing = [
        key
        for key in (KEY_IMAGE_ID, KEY_LABEL, KEY_EXTRACTOR, KEY_NUM, KEY_DIM, KEY_SCHEMA_VERSION)
        if key not in feature
    ]
    if missing:
        raise SchemaError(f"feature record is missing {missing}")
    image_id = feature[KEY_IMAGE_ID].bytes_list.value[0].decode("utf-8")
    check_version(feature[KEY_SCHEMA_VERSION].int64_list.value[0], f"feature record {image_id!r}")
    num = feature[KEY_NUM].int64_list.value[0]
    dim = feature[KEY_DIM].int64_list.value[0]
    locations = np.asarray(feature[KEY_LOCATIONS].float_list.value, np.float32)
    if KEY_DESCRIPTOR_BITS in feature:
        if dim % 8:
            raise SchemaError(f"feature record {image_id!r}: packed descriptors of {dim} bits")
        packed = feature[KEY_DESCRIPTOR_BITS].bytes_list.value
        descriptors = np.frombuffer(packed[0] if packed else b"", np.uint8)
        row_length = dim // 8
    else:
        descriptors = np.asarray(feature[KEY_DESCRIPTORS].float_list.value, np.float32)
        row_length = dim
    if locations.size != num * 2 or descriptors.size != num * row_length:
        raise SchemaError(f"feature record {image_id!r}: sizes do not match num={num}, dim={dim}")
    return FeatureRecord(
        image_id=image_id,
        label=int(feature[KEY_LABEL].int64_list.value[0]),
        extractor=feature[KEY_EXTRACTOR].bytes_list.value[0].decode("utf-8"),
        locations=locations.reshape(num, 2),
        descriptors=descriptors.reshape(num, row_length),
    )
