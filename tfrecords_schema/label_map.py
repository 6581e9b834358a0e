"""The label-map file: original landmark id <-> contiguous class index.

File format (CSV, UTF-8, one header line)::

    # landmarks label map, schema version 1
    landmark_id,class_index
    7,0
    12,1
    100,2

Class indices are the positions of the landmark ids sorted as integers, so the same set of
landmark ids always gives the same map, whatever order the rows arrived in. Readers check that
the indices are exactly ``0..n-1`` in order and that ids are unique.

The functions here convert to and from text; callers do the I/O with the file layer they use
(Beam's FileSystems in pipelines, ``tf.io.gfile`` in the trainer), see :func:`read_label_map`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from tfrecords_schema import SCHEMA_VERSION, SchemaError

LABEL_MAP_FILENAME = "label_map.csv"
_COMMENT = f"# landmarks label map, schema version {SCHEMA_VERSION}"
_HEADER = "landmark_id,class_index"


@dataclasses.dataclass(frozen=True)
class LabelMap:
    """Sorted, unique landmark ids; class index ``i`` is ``landmark_ids[i]``."""

    landmark_ids: tuple[int, ...]

    def __post_init__(self):
        ids = self.landmark_ids
        if any(later <= earlier for earlier, later in zip(ids, ids[1:])):
            raise SchemaError("label map landmark ids must be unique and sorted")
        if any(landmark_id < 0 for landmark_id in ids):
            raise SchemaError("landmark ids must be >= 0 (-1 is reserved for non-landmarks)")
        object.__setattr__(self, "_index", {lid: i for i, lid in enumerate(ids)})

    @classmethod
    def from_landmark_ids(cls, landmark_ids: Iterable[int]) -> "LabelMap":
        """Builds the map from any iterable of ids (duplicates and order do not matter)."""
        return cls(tuple(sorted({int(landmark_id) for landmark_id in landmark_ids})))

    @property
    def num_classes(self) -> int:
        return len(self.landmark_ids)

    def class_index(self, landmark_id: int) -> int:
        """The class index of ``landmark_id``; raises ``KeyError`` for an unknown id."""
        return self._index[int(landmark_id)]

    def landmark_id(self, class_index: int) -> int:
        """The original landmark id of ``class_index`` (``IndexError`` when out of range)."""
        if not 0 <= class_index < len(self.landmark_ids):
            raise IndexError(f"class index {class_index} outside [0, {len(self.landmark_ids)})")
        return self.landmark_ids[class_index]

    def to_csv_text(self) -> str:
        lines = [_COMMENT, _HEADER]
        lines += [f"{landmark_id},{index}" for index, landmark_id in enumerate(self.landmark_ids)]
        return "\n".join(lines) + "\n"

    @classmethod
    def from_csv_text(cls, text: str, source: str = "label map") -> "LabelMap":
        """Parses :meth:`to_csv_text` output; raises :class:`SchemaError` naming ``source``."""
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        comments = [line for line in lines if line.startswith("#")]
        rows = [line for line in lines if not line.startswith("#")]
        if comments and comments[0] != _COMMENT:
            raise SchemaError(f"{source}: unexpected first line {comments[0]!r}, want {_COMMENT!r}")
        if not rows or rows[0] != _HEADER:
            raise SchemaError(f"{source}: missing header line {_HEADER!r}")
        landmark_ids = []
        for line_number, row in enumerate(rows[1:], start=2):
            parts = row.split(",")
            try:
                landmark_id, index = int(parts[0]), int(parts[1])
            except (ValueError, IndexError) as error:
                raise SchemaError(f"{source}: bad row {line_number}: {row!r}") from error
            if len(parts) != 2 or index != len(landmark_ids):
                raise SchemaError(
                    f"{source}: row {line_number} {row!r}: class indices must be 0..n-1 in order"
                )
            landmark_ids.append(landmark_id)
        try:
            return cls(tuple(landmark_ids))
        except SchemaError as error:
            raise SchemaError(f"{source}: {error}") from error


def read_label_map(path: str) -> LabelMap:
    """Reads a label-map file through ``tf.io.gfile`` (local paths and real ``gs://``)."""
    import tensorflow as tf  # the trainer's file layer; pipelines use Beam FileSystems instead

    if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f"label map not found: {path}")
    with tf.io.gfile.GFile(path, "r") as handle:
        return LabelMap.from_csv_text(handle.read(), source=path)


def write_label_map(label_map: LabelMap, path: str) -> None:
    """Writes ``label_map`` through ``tf.io.gfile``."""
    import tensorflow as tf

    with tf.io.gfile.GFile(path, "w") as handle:
        handle.write(label_map.to_csv_text())
