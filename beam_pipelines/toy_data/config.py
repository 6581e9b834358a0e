"""What to generate: the ``--difficulty`` presets and :class:`ToyDataConfig`, resolved and
validated on construction (an instance holds the values used)."""

from __future__ import annotations

import dataclasses
from typing import Optional

from beam_pipelines.toy_data import skimage_photos, view_geometry
from tfrecords_schema import InputError

DEFAULT_NUM_CLASSES = 6


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """One ``--difficulty`` preset: the value of every setting its flag does not override.

    ``perspective``/``rotation``/``scale_range`` are the test views' ``max_tilt``,
    ``max_rotation`` (degrees) and (``min_scale``, ``max_scale``) (see
    :class:`~.view_geometry.ViewParams`); the fractions are shares in [0, 1] (see the package
    docstring).
    """

    train_per_class: int
    perspective: float
    rotation: float
    scale_range: tuple[float, float]
    partial_fraction: float
    occluder_fraction: float
    hard_distractor_fraction: float


DIFFICULTIES = {
    # Exactly the generator as it was: TEST_VIEW, no partial views, occluders or hard distractors.
    "standard": Difficulty(
        train_per_class=16, perspective=view_geometry.TEST_VIEW.max_tilt,
        rotation=view_geometry.TEST_VIEW.max_rotation,
        scale_range=(view_geometry.TEST_VIEW.min_scale, view_geometry.TEST_VIEW.max_scale),
        partial_fraction=0.0, occluder_fraction=0.0, hard_distractor_fraction=0.0),
    "hard": Difficulty(
        train_per_class=4, perspective=0.25, rotation=30.0, scale_range=(0.25, 2.0),
        partial_fraction=0.35, occluder_fraction=0.4, hard_distractor_fraction=0.5),
}
_PRESET_FIELDS = tuple(field.name for field in dataclasses.fields(Difficulty))
_FRACTIONS = ("partial_fraction", "occluder_fraction", "hard_distractor_fraction")
_COUNTS = ("train_per_class", "test_per_class", "num_train_distractors", "num_test_distractors")


@dataclasses.dataclass(frozen=True)
class ToyDataConfig:
    """What to generate. Sizes are pixels on an image's long side.

    A setting left ``None`` takes its ``difficulty`` preset's value (:data:`DIFFICULTIES`), and
    ``num_classes`` left ``None`` is 6 with the skimage classes; both are resolved on
    construction, so an instance holds the values used. Only with ``scenes_dir`` may
    ``num_classes`` stay ``None``: all the folder's classes.
    """

    output_dir: str
    num_classes: Optional[int] = None
    train_per_class: Optional[int] = None
    test_per_class: int = 4
    num_train_distractors: int = 16
    num_test_distractors: int = 12
    min_size: int = 300
    max_size: int = 1600
    seed: int = 0
    overwrite: bool = False
    scenes_dir: Optional[str] = None
    difficulty: str = "standard"
    perspective: Optional[float] = None
    rotation: Optional[float] = None
    scale_range: Optional[tuple[float, float]] = None
    partial_fraction: Optional[float] = None
    occluder_fraction: Optional[float] = None
    hard_distractor_fraction: Optional[float] = None

    def __post_init__(self):
        if not self.output_dir:
            raise InputError("output_dir is required")
        self._resolve_preset()
        if self.scenes_dir is not None and not self.scenes_dir:
            raise InputError("scenes_dir must not be empty")
        if self.num_classes is None and self.scenes_dir is None:
            object.__setattr__(self, "num_classes", DEFAULT_NUM_CLASSES)
        self._validate_classes()
        self._validate_sizes()
        self._validate_test_views()

    def _resolve_preset(self) -> None:
        """Fills every setting left ``None`` from the ``difficulty`` preset (frozen: resolved
        once, here) and normalises the types (floats; ``scale_range`` a 2-tuple)."""
        if self.difficulty not in DIFFICULTIES:
            raise InputError(f"difficulty must be one of {sorted(DIFFICULTIES)}, got "
                             f"{self.difficulty!r}")
        preset = DIFFICULTIES[self.difficulty]
        for name in _PRESET_FIELDS:
            if getattr(self, name) is None:
                object.__setattr__(self, name, getattr(preset, name))
        for name in ("perspective", "rotation") + _FRACTIONS:
            object.__setattr__(self, name, float(getattr(self, name)))
        if len(tuple(self.scale_range)) != 2:
            raise InputError(f"scale_range must be two numbers MIN,MAX, got {self.scale_range}")
        object.__setattr__(self, "scale_range", tuple(float(v) for v in self.scale_range))

    def _validate_classes(self) -> None:
        if self.scenes_dir is None and not 1 <= self.num_classes <= len(
                skimage_photos.CLASS_SOURCES):
            raise InputError(f"num_classes must be in [1, {len(skimage_photos.CLASS_SOURCES)}] "
                             f"(one skimage photo per class), got {self.num_classes}")
        if self.scenes_dir is not None:
            if "://" in self.scenes_dir:
                raise InputError(f"scenes_dir must be a local folder, got {self.scenes_dir}")
            if self.num_classes is not None and self.num_classes < 2:
                raise InputError(f"num_classes must be >= 2 with scenes_dir (at most that many "
                                 f"of the folder's classes), got {self.num_classes}")

    def _validate_sizes(self) -> None:
        for name in _COUNTS:
            if getattr(self, name) < 0:
                raise InputError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.train_per_class < 1:
            raise InputError("train_per_class must be >= 1")
        if not 32 <= self.min_size <= self.max_size <= 4096:
            raise InputError(f"need 32 <= min_size <= max_size <= 4096, got min_size="
                             f"{self.min_size}, max_size={self.max_size}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")

    def _validate_test_views(self) -> None:
        if not 0.0 <= self.perspective <= 0.4:
            raise InputError(f"perspective must be in [0, 0.4] (corner jitter, fraction of the "
                             f"region's side), got {self.perspective}")
        if not 0.0 <= self.rotation <= 90.0:
            raise InputError(f"rotation must be in [0, 90] degrees, got {self.rotation}")
        low, high = self.scale_range
        if not 0.05 <= low <= high <= 4.0:
            raise InputError(f"scale_range must satisfy 0.05 <= MIN <= MAX <= 4, got "
                             f"{low},{high}")
        for name in _FRACTIONS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise InputError(f"{name} must be in [0, 1], got {getattr(self, name)}")

    @property
    def test_view(self) -> view_geometry.ViewParams:
        """The camera of test views (landmarks and distractors) under these settings."""
        return view_geometry.ViewParams(
            min_scale=self.scale_range[0], max_scale=self.scale_range[1],
            max_rotation=self.rotation, max_tilt=self.perspective)

    @property
    def legacy_output(self) -> bool:
        """True when the output is the standard generator's: skimage classes, standard
        difficulty and every setting at its standard value. toy_data.json and README.txt then
        keep their old form (no new keys), so the files stay byte-identical to older versions'."""
        standard = DIFFICULTIES["standard"]
        return (self.scenes_dir is None and self.difficulty == "standard"
                and all(getattr(self, name) == getattr(standard, name)
                        for name in _PRESET_FIELDS if name != "train_per_class"))
