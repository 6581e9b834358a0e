"""Pure conversion of one input TFRecord record (``--input_tfrecords``) into an ingest row.

:func:`convert_record` takes one serialised record and returns either a
:class:`ConvertedRecord` (id, landmark id or None, the image file's bytes) or a
:class:`RecordRejected` with a reason: nothing raises, nothing is dropped. The Beam step around
it (:class:`beam_pipelines.ingest.transforms.ConvertRecords`) only routes the result into the
manifest path's downstream steps (dedupe, label map, split, normalise, write).

Layouts read (see :func:`tfrecords_schema.image_record.detect_layout`):

- DELF's ``build_image_dataset.py`` (the usual GLDv2 TFRecords): ``image/encoded``, ``image/id``
  and, in training records, ``image/class/label`` = the landmark id (a raw GLDv2 landmark id, or
  DELF's contiguous id for the clean set: both are simply ids here). Without that key a record
  is unlabelled (split ``test``).
- This project's own layout (``schema/version`` present, the same version as this code):
  ``image/class/landmark_id`` is the landmark id, -1 a non-landmark image.
- Any other record with ``image/encoded`` and ``image/id`` is read like DELF's.

Reasons (besides the manifest's ``empty_id``, ``unsafe_id``, ``bad_label`` and the image
reasons of :mod:`~beam_pipelines.ingest.normalise`, met later):

- ``not_an_example``: the bytes are not a ``tf.train.Example`` (or one without any feature);
- ``missing_key``: no ``image/encoded`` or no ``image/id`` (the detail names the key and the
  record's layout), or this project's layout without ``image/class/landmark_id``;
- ``schema_version``: this project's layout, but another schema version.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import tensorflow as tf

from beam_pipelines.ingest import manifest as manifest_lib
from tfrecords_schema import SCHEMA_VERSION
from tfrecords_schema import image_record

REASONS = frozenset({"not_an_example", "missing_key", "schema_version"})
"""Reasons of :func:`convert_record` besides the manifest's ``empty_id``, ``unsafe_id`` and
``bad_label``."""

ID_KEYS = (image_record.KEY_ID, "image/filename")
"""Where the id is looked for, in order (DELF's docstring calls it ``image/filename``)."""


@dataclasses.dataclass(frozen=True)
class ConvertedRecord:
    """A readable input record.

    Attributes:
      image_id: the record's id (checked like a manifest id).
      landmark_id: the landmark id (>= 0), -1 for a non-landmark image (this project's layout),
        or None when the record carries no label at all (unlabelled: split ``test``).
      image_bytes: the stored image file, not yet decoded.
      layout: :data:`~tfrecords_schema.image_record.LAYOUT_DELF`, ``..._LANDMARKS`` or
        ``..._UNKNOWN``.
    """

    image_id: str
    landmark_id: Optional[int]
    image_bytes: bytes = dataclasses.field(repr=False)
    layout: str


@dataclasses.dataclass(frozen=True)
class RecordRejected:
    """A record that cannot become an image row; ``image_id`` is '' when unknown."""

    reason: str
    detail: str
    image_id: str = ""


def _single_bytes(feature, key: str) -> tuple[Optional[bytes], str]:
    """(value, problem): the one bytes value of ``key``, or None and what is wrong."""
    if key not in feature:
        return None, "absent"
    values = feature[key].bytes_list.value
    if len(values) != 1:
        kind = feature[key].WhichOneof("kind")
        if kind not in (None, "bytes_list"):
            return None, f"holds {kind.replace('_list', '')} values, not bytes"
        return None, f"holds {len(values)} values, not 1"
    return values[0], ""


def _single_int(feature, key: str) -> tuple[Optional[int], str]:
    """(value, problem): the one int64 value of ``key``, or None and what is wrong."""
    values = feature[key].int64_list.value
    if len(values) != 1:
        kind = feature[key].WhichOneof("kind")
        if kind not in (None, "int64_list"):
            return None, f"holds {kind.replace('_list', '')} values, not int64"
        return None, f"holds {len(values)} values, not 1"
    return int(values[0]), ""


def _image_id(feature, layout_text: str) -> Union[str, RecordRejected]:
    for key in ID_KEYS:
        raw, problem = _single_bytes(feature, key)
        if problem == "absent":
            continue
        if raw is None:
            return RecordRejected("missing_key", f"{key!r} {problem}")
        try:
            image_id = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            return RecordRejected("unsafe_id", f"{key!r} is not UTF-8 text")
        if not image_id:
            return RecordRejected("empty_id", f"empty {key!r}")
        if not manifest_lib.is_safe_id(image_id):
            return RecordRejected("unsafe_id", "id must match [A-Za-z0-9][A-Za-z0-9._-]{0,127}",
                                  image_id[:128])
        return image_id
    return RecordRejected("missing_key", f"no {image_record.KEY_ID!r} key; record in {layout_text}")


def _landmark_id(feature, layout: str, image_id: str) -> Union[Optional[int], RecordRejected]:
    if layout == image_record.LAYOUT_LANDMARKS:
        version, problem = _single_int(feature, image_record.KEY_SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            found = (f"version {version}" if version is not None
                     else f"a schema/version that {problem}")
            return RecordRejected("schema_version", f"{found}; this code reads version "
                                  f"{SCHEMA_VERSION}", image_id)
        key = image_record.KEY_LANDMARK_ID
        if key not in feature:
            return RecordRejected("missing_key", f"no {key!r} key (this project's layout)",
                                  image_id)
        lowest = image_record.NON_LANDMARK
    else:
        key = image_record.KEY_LABEL
        if key not in feature:
            return None  # DELF's test records: unlabelled
        lowest = 0
    value, problem = _single_int(feature, key)
    if value is None:
        return RecordRejected("bad_label", f"{key!r} {problem}", image_id)
    if value < lowest:
        return RecordRejected("bad_label", f"{key!r} is {value}, below {lowest}", image_id)
    return value


def convert_record(serialized: bytes) -> Union[ConvertedRecord, RecordRejected]:
    """One serialised input record -> :class:`ConvertedRecord` or :class:`RecordRejected`.

    Pure and total: any bytes give one of the two (the image bytes are not decoded here; the
    normaliser does that, with the manifest path's reasons).
    """
    try:
        example = tf.train.Example.FromString(serialized)
    except Exception as error:  # protobuf's DecodeError has no stable public type
        return RecordRejected("not_an_example", f"not a tf.train.Example: {error}")
    feature = example.features.feature
    keys = set(feature.keys())
    if not keys:
        return RecordRejected("not_an_example", "a tf.train.Example without any feature")
    layout = image_record.detect_layout(keys)
    layout_text = image_record.describe_layout(keys)
    image_id = _image_id(feature, layout_text)
    if isinstance(image_id, RecordRejected):
        return image_id
    image_bytes, problem = _single_bytes(feature, image_record.KEY_ENCODED)
    if image_bytes is None:
        if problem == "absent":
            problem = f"absent; record in {layout_text}"
        return RecordRejected("missing_key", f"{image_record.KEY_ENCODED!r} {problem}", image_id)
    landmark_id = _landmark_id(feature, layout, image_id)
    if isinstance(landmark_id, RecordRejected):
        return landmark_id
    return ConvertedRecord(image_id=image_id, landmark_id=landmark_id, image_bytes=image_bytes,
                           layout=layout)
