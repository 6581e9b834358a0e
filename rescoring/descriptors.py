"""Local descriptors as they are stored and carried, and as they are compared.

Two forms, told apart by dtype:

* float32 ``[N, D]``: real-valued descriptors (DELF, RootSIFT), each row L2-normalised.
* uint8 ``[N, B]``: binary descriptors (ORB's 256 bits), packed 8 bits a byte as OpenCV gives
  them: ``D = 8 B`` bits. 32 bytes a keypoint instead of 1 KB as 256 float32 values; this is the
  form records, Beam elements and caches hold.

Matching works on unit float rows (:func:`unit_descriptors`): a packed row becomes
``(2 * bit - 1) / sqrt(D)`` (+-1/16 for 256 bits), whose squared Euclidean distance to another
is ``4 * hamming / D`` (``hamming / 64`` for 256 bits), so a Euclidean bound ``d`` is a Hamming
bound ``D d^2 / 4``. Unpacking is exact: the comparison gives the same numbers either way.
"""

from __future__ import annotations

import numpy as np


def is_packed(descriptors: np.ndarray) -> bool:
    """True for packed binary descriptors (uint8)."""
    return np.asarray(descriptors).dtype == np.uint8


def descriptor_dim(descriptors: np.ndarray) -> int:
    """D: the float length, or the number of bits of packed rows (8 per byte)."""
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2:
        raise ValueError(f"descriptors must be [N, D], got {descriptors.shape}")
    return int(descriptors.shape[1]) * (8 if is_packed(descriptors) else 1)


def unit_descriptors(descriptors: np.ndarray) -> np.ndarray:
    """float32 ``[N, D]`` unit rows: packed bits unpacked to ``+-1/sqrt(D)``; float rows as
    they are (already L2-normalised by their extractor)."""
    descriptors = np.asarray(descriptors)
    if not is_packed(descriptors):
        return np.asarray(descriptors, np.float32)
    if descriptors.ndim != 2:
        raise ValueError(f"packed descriptors must be [N, B], got {descriptors.shape}")
    bits = np.unpackbits(descriptors, axis=1).astype(np.float32)  # [N, 8B] of 0/1
    return (2.0 * bits - 1.0) / np.float32(np.sqrt(bits.shape[1]))


def nbytes(descriptors: np.ndarray) -> int:
    """Bytes the descriptors take as stored."""
    return int(np.asarray(descriptors).nbytes)
