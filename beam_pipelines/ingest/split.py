"""Deterministic, stratified dev split by hash of id (pure).

Within one class (non-landmarks are a class of their own), ids are ordered by the SHA-1 of the
id, and the first ``round(fraction * n)`` go to dev; a class with at least 2 images keeps at
least one in train. The same ids always give the same split, on any machine and in any order.

The split is decided on valid, de-duplicated rows *before* fetching, so an image that later
fails to fetch or decode shifts the achieved fraction slightly; ``stats.json`` reports the
per-split counts actually written.
"""

from __future__ import annotations

import hashlib
from typing import Iterable


def id_hash(image_id: str) -> str:
    """Stable ordering key of an id (hex SHA-1 of its UTF-8 bytes)."""
    return hashlib.sha1(image_id.encode("utf-8")).hexdigest()


def num_dev(class_size: int, fraction: float) -> int:
    """How many of ``class_size`` images go to dev: ``round(fraction * n)``, leaving >= 1 in
    train when ``n >= 2`` (Python's round: halves go to the even neighbour)."""
    count = int(round(fraction * class_size))
    if class_size >= 2:
        count = min(count, class_size - 1)
    return max(0, min(count, class_size))


def dev_ids(class_ids: Iterable[str], fraction: float) -> set[str]:
    """The ids of one class that go to dev."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"dev fraction must be in [0, 1), got {fraction}")
    ordered = sorted(set(class_ids), key=lambda image_id: (id_hash(image_id), image_id))
    return set(ordered[: num_dev(len(ordered), fraction)])
