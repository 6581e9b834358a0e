"""The record contract: every TFRecord this project writes or reads goes through this package.

- :mod:`tfrecords_schema.image_record`: one normalised image per ``tf.train.Example``
  (GLDv2/DELF keys), its writer and its parsers (Python side and tf.data side).
- :mod:`tfrecords_schema.local_features`: local features (locations + descriptors) of one image.
- :mod:`tfrecords_schema.label_map`: original landmark id <-> contiguous class index.

This package imports none of the project's other packages.
"""

SCHEMA_VERSION = 1
"""Bumped whenever a key, a type or a meaning changes. Readers refuse other versions."""


class InputError(ValueError):
    """The user's input is wrong: a flag, a file, a label, a record, a manifest.

    Every command reports an ``InputError`` (and its subclasses) in one line with exit code 2;
    any other exception is a bug, logged with its traceback, exit code 1. It lives here because
    this is the one package that every other package may import.
    """


class SchemaError(InputError):
    """A record or file does not follow this schema (wrong version, missing key, bad value)."""
