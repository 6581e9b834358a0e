"""Random streams and the ids drawn from them.

Every image has its own RNG stream derived from ``(seed, role, index)``, so changing how many
images of one role are made never shifts another image's pixels. What only the non-standard
settings draw (which photo of a class, partial views, occluders, a hard distractor's class
photo) comes from a second, auxiliary stream ``(seed, role, index, AUX_STREAM)``, so the
standard streams, and a standard run's files, never shift either.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# RNG stream roles (part of each image's seed, so one count never shifts another's images).
ROLE_TRAIN, ROLE_TEST, ROLE_TRAIN_DISTRACTOR, ROLE_TEST_DISTRACTOR = 1, 2, 3, 4
# Appended to (seed, role, index) for the auxiliary stream. Not 0: SeedSequence([s, r, i, 0])
# equals SeedSequence([s, r, i]).
AUX_STREAM = 101
# Landmark ids are drawn from [1, LANDMARK_ID_LIMIT): non-contiguous, as in GLD, so the label
# map matters.
LANDMARK_ID_LIMIT = 20000


def master_rng(seed: int) -> np.random.Generator:
    """The run's stream for its ids (landmark ids first, then image ids)."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0]))


def image_rng(seed: int, role: int, index: int) -> np.random.Generator:
    """Image ``index`` of ``role``'s own stream: its scene, view, light and JPEG quality."""
    return np.random.default_rng(np.random.SeedSequence([seed, role, index]))


def aux_rng(seed: int, role: int, index: int) -> np.random.Generator:
    """The image's second stream: what only the new settings draw (see the module docstring)."""
    return np.random.default_rng(np.random.SeedSequence([seed, role, index, AUX_STREAM]))


def draw_landmark_ids(master: np.random.Generator, num_classes: int) -> list[int]:
    """``num_classes`` distinct landmark ids in [1, :data:`LANDMARK_ID_LIMIT`), class order."""
    return [int(i) for i in master.choice(np.arange(1, LANDMARK_ID_LIMIT), size=num_classes,
                                          replace=False)]


def unique_hex_ids(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct ids of 16 hex characters (63 random bits each), in draw order."""
    ids: list[str] = []
    seen = set()
    while len(ids) < count:
        candidate = f"{int(rng.integers(0, 2 ** 63)):016x}"
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


@dataclasses.dataclass(frozen=True)
class ImageIds:
    """The image ids of one run, by role. ``train``/``test``: landmark views, class-major
    (class ``c``'s view ``v`` is at ``c * per_class + v``); the distractors' in their order."""

    train: list[str]
    test: list[str]
    train_distractors: list[str]
    test_distractors: list[str]

    @property
    def total(self) -> int:
        """How many images the run writes."""
        return (len(self.train) + len(self.test) + len(self.train_distractors)
                + len(self.test_distractors))


def draw_image_ids(master: np.random.Generator, num_train: int, num_test: int,
                   num_train_distractors: int, num_test_distractors: int) -> ImageIds:
    """All ids in one draw from ``master``, split in the order train, test, training
    distractors, test distractors (so every id is unique across roles)."""
    ids = unique_hex_ids(master, num_train + num_test + num_train_distractors
                         + num_test_distractors)
    distractors_start = num_train + num_test
    return ImageIds(
        train=ids[:num_train],
        test=ids[num_train:distractors_start],
        train_distractors=ids[distractors_start:][:num_train_distractors],
        test_distractors=ids[distractors_start + num_train_distractors:])
