"""Joins whose groups are streamed, and keys spread over several workers.

Beam's Python ``CoGroupByKey`` builds one Python list per tag and key before the consumer sees
anything (``_CoGBKImpl.collect_values``): a key shared by a million values is a million-element
list on one worker. The steps here keep the groups as Beam gives them (an iterable that a runner
may page from disk) and leave the consumer to hold only the small side of a join.

* :class:`TaggedJoin`: ``{tag: (key, value)}`` -> ``(key, iterable of (tag, value))`` (``Flatten``
  + ``GroupByKey``); :func:`split_tagged` reads one group in two passes: the small tags into
  lists, then a generator over the large tag.
* :class:`SpreadHotKeys`: sub-keys for keys with more than ``max_per_key`` values of the large
  side, and each small-side value replicated to every sub-key of its key, so no worker does one
  popular key's work alone. The per-key counts are a combine; only the hot keys reach the side
  input (at most ``values / max_per_key`` entries).
"""

from __future__ import annotations

import hashlib
import math
from typing import Iterable, Sequence

import apache_beam as beam


def tag_values(keyed, tag: str):
    """``(key, value)`` -> ``(key, (tag, value))``."""
    key, value = keyed
    return key, (tag, value)


class TaggedJoin(beam.PTransform):
    """``{tag: PCollection of (key, value)}`` -> ``(key, iterable of (tag, value))``.

    The values of a key arrive in no particular order; the iterable can be read more than once
    (Beam's grouped values are re-iterable), so a consumer can first collect the small tags and
    then stream the large one (:func:`split_tagged`).
    """

    def expand(self, tagged_inputs):
        return (
            [pcoll | f"Tag[{tag}]" >> beam.Map(tag_values, tag)
             for tag, pcoll in sorted(tagged_inputs.items())]
            | "Flatten" >> beam.Flatten()
            | "GroupByKey" >> beam.GroupByKey()
        )


def split_tagged(tagged_values: Iterable, small_tags: Sequence[str], large_tag: str):
    """One group of :class:`TaggedJoin` -> ``({small tag: [values]}, generator of large values)``.

    First pass: the values of ``small_tags`` into lists (the caller promises they are few); the
    generator then makes a second pass and yields the ``large_tag`` values one at a time, never
    holding them together. Values of other tags are ignored.
    """
    small = {tag: [] for tag in small_tags}
    for tag, value in tagged_values:
        if tag in small:
            small[tag].append(value)

    def large():
        for tag, value in tagged_values:
            if tag == large_tag:
                yield value

    return small, large()


def stable_bucket(text: str, buckets: int) -> int:
    """A bucket of ``text`` in ``[0, buckets)``, the same in every process (SHA-1, not ``hash``)."""
    if buckets <= 1:
        return 0
    digest = hashlib.sha1(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % buckets


def fan_out(count: int, max_per_key: int) -> int:
    """Sub-keys for a key with ``count`` values: ``ceil(count / max_per_key)``, at least 1."""
    if max_per_key < 1:
        raise ValueError(f"max_per_key must be >= 1, got {max_per_key}")
    return max(1, math.ceil(int(count) / max_per_key))


def hot_fanout(keyed_count, max_per_key: int):
    """``(key, count)`` -> ``(key, sub-keys)`` for a hot key only (more than ``max_per_key``)."""
    key, count = keyed_count
    if count > max_per_key:
        yield key, fan_out(count, max_per_key)


def sub_key_large(keyed, id_of, fanouts: dict):
    """``(key, value)`` of the large side -> ``((key, sub), value)``, ``sub`` from the value's id
    (``id_of(value)``, a string) among the key's sub-keys (``fanouts``, 1 when absent)."""
    key, value = keyed
    return (key, stable_bucket(id_of(value), fanouts.get(key, 1))), value


def sub_key_small(keyed, fanouts: dict):
    """``(key, value)`` of the small side -> ``((key, sub), value)`` for every sub-key of key."""
    key, value = keyed
    for sub in range(fanouts.get(key, 1)):
        yield (key, sub), value


class SpreadHotKeys(beam.PTransform):
    """``{"large": (key, value), "small": (key, value)}`` -> the same two collections keyed by
    ``(key, sub)``.

    A key with more than ``max_per_key`` large-side values gets ``ceil(count / max_per_key)``
    sub-keys; each large value goes to one of them (by ``id_of(value)``, stable across
    processes), each small value to all of them. Other keys get the one sub-key 0. With
    ``max_per_key`` at or above the largest key's count the result is the plain join keyed by
    ``(key, 0)``.
    """

    def __init__(self, max_per_key: int, id_of):
        super().__init__()
        if max_per_key < 1:
            raise ValueError(f"max_per_key must be >= 1, got {max_per_key}")
        self._max_per_key = int(max_per_key)
        self._id_of = id_of

    def expand(self, inputs):
        fanouts = (
            inputs["large"]
            | "CountPerKey" >> beam.combiners.Count.PerKey()
            | "HotKeys" >> beam.FlatMap(hot_fanout, self._max_per_key)
        )
        fanouts_dict = beam.pvalue.AsDict(fanouts)
        return {
            "large": inputs["large"] | "SubKeyLarge" >> beam.Map(
                sub_key_large, self._id_of, fanouts_dict),
            "small": inputs["small"] | "ReplicateSmall" >> beam.FlatMap(
                sub_key_small, fanouts_dict),
        }
