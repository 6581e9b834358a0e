"""A Bloom filter of image ids: "might this archive member have a label row?" in a few MB.

The archive input's listing pass (:class:`.archives.ListArchive`) keeps only the members a
label row may ask for: GLDv2's ``train_clean.csv`` lists 1.58M of the 4.1M images in the train
archives, so keeping every member would send 2.6 times the references through the join by id
(and a refused or unlabelled member is never read in the decoding pass). The exact set of
labelled ids (4.1M 16-character strings, about 300 MB as a Python set) is too big for a side
input; this filter answers the same question with no false negatives and a small rate of false
positives (a member kept in vain, then counted ``without_label_row`` by the join), in a bit
array whose size is fixed before the ids are seen.

Sizing: ``bits = 10 x expected ids`` rounded up to a power of two, ``HASHES = 7`` positions per
id: the false-positive rate at the expected count is about 0.8 % (``(1 - exp(-7/10))**7``) and
lower below it. ``expected ids`` is estimated from the labels file's size (at least 17 bytes per
id: 16 characters and a separator), so it over-estimates, which only lowers the rate; the array
is capped at :data:`MAX_BITS` (8 MB), where GLDv2's 4.13M train ids give 0.06 %.

Pure (no Beam): :class:`IdFilter` is the value, :func:`positions` the hashing.
"""

from __future__ import annotations

import dataclasses
import hashlib

HASHES = 7
BITS_PER_ID = 10
MIN_BITS = 1 << 13          # 1 kB: a toy labels file
MAX_BITS = 1 << 26          # 8 MB: GLDv2's train.csv and beyond
MIN_BYTES_PER_ID = 17       # a 16-character id and a separator


def bits_for_labels_file(size_bytes: int) -> int:
    """The filter's size in bits for a labels file of ``size_bytes`` (a power of two in
    [:data:`MIN_BITS`, :data:`MAX_BITS`])."""
    wanted = BITS_PER_ID * max(size_bytes, 1) // MIN_BYTES_PER_ID
    bits = MIN_BITS
    while bits < wanted and bits < MAX_BITS:
        bits <<= 1
    return bits


def positions(image_id: str, num_bits: int) -> list[int]:
    """The :data:`HASHES` bit positions of ``image_id`` in a filter of ``num_bits`` (a power of
    two): double hashing of a 128-bit BLAKE2b digest (``h1 + i * h2``, ``h2`` odd so the
    positions differ)."""
    digest = hashlib.blake2b(image_id.encode("utf-8"), digest_size=16).digest()
    first = int.from_bytes(digest[:8], "little")
    step = int.from_bytes(digest[8:], "little") | 1
    mask = num_bits - 1
    return [(first + index * step) & mask for index in range(HASHES)]


@dataclasses.dataclass
class IdFilter:
    """A Bloom filter over image ids. ``bits``: ``num_bits // 8`` bytes, bit ``p`` is
    ``bits[p >> 3] >> (p & 7) & 1``."""

    num_bits: int
    bits: bytearray

    @classmethod
    def empty(cls, num_bits: int) -> "IdFilter":
        if num_bits < 8 or num_bits & (num_bits - 1):
            raise ValueError(f"num_bits must be a power of two >= 8, got {num_bits}")
        return cls(num_bits, bytearray(num_bits // 8))

    def add(self, image_id: str) -> None:
        for position in positions(image_id, self.num_bits):
            self.bits[position >> 3] |= 1 << (position & 7)

    def might_contain(self, image_id: str) -> bool:
        """False: ``image_id`` was never added. True: it was, or (rarely) a false positive."""
        bits = self.bits
        return all(bits[position >> 3] >> (position & 7) & 1
                   for position in positions(image_id, self.num_bits))

    def to_value(self) -> tuple[int, bytes]:
        """``(num_bits, bits)``: plain values, which Beam's coders write without pickling."""
        return self.num_bits, bytes(self.bits)

    @classmethod
    def from_value(cls, value: tuple[int, bytes]) -> "IdFilter":
        num_bits, bits = value
        if len(bits) * 8 != num_bits:
            raise ValueError(f"{len(bits)} bytes for a filter of {num_bits} bits")
        return cls(num_bits, bytearray(bits))

    def union(self, other: "IdFilter") -> "IdFilter":
        """The filter of both sets of ids (in place; both must have the same size)."""
        if other.num_bits != self.num_bits:
            raise ValueError(f"filters of {self.num_bits} and {other.num_bits} bits")
        merged = int.from_bytes(self.bits, "little") | int.from_bytes(other.bits, "little")
        self.bits[:] = merged.to_bytes(len(self.bits), "little")
        return self
