"""The resolved configuration of one ``landmarks-train`` run: frozen dataclasses, presets, CLI.

Every number of the recipe (``docs/METHOD.md``) is a default here; every field has a flag.
Resolution order: dataclass defaults < ``--preset`` < explicit flags. The resolved config is
written as ``config.json`` into the model dir, so a run can be reproduced and a resume can check
that it continues the same run.

Phases (the recipe's finetuning schedule, run one after another on one continuous epoch
counter):

===============  =================  ======  =====  ==================================
phase            trainable from     epochs  batch  learning rate (Adam)
===============  =================  ======  =====  ==================================
``head``         nothing (head)     2       128    1e-3
``finetune``     backbone layer 85  6       48     1e-4 -> 1e-6 (geometric, per epoch)
``deep``         backbone layer 25  2       48     1e-6 -> 3e-7
===============  =================  ======  =====  ==================================

The recipe gives the layer indices, batch sizes, optimiser and learning rates; it does not give
epoch counts, so the epochs above are our choice. A phase with ``epochs=0`` is skipped.
Batch sizes are *global* (all replicas together); each replica gets ``batch / replicas``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any, Sequence

from tfrecords_schema import InputError
from trainer import cli

PHASE_NAMES = ("head", "finetune", "deep")
MIXED_PRECISION_CHOICES = ("none", "bfloat16", "float16")
STRATEGY_CHOICES = ("auto", "default", "mirrored", "multi_worker")
HEAD_CHOICES = ("sigmoid", "arcface", "subcenter_arcface")  # trainer.heads.HEADS


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the records are and how they are read.

    Attributes:
      train_data: glob of training TFRecord shards (local or ``gs://``).
      label_map: the ingest's ``label_map.csv``; its size is the number of classes.
      dev_data: optional glob of dev shards; enables dev GAP per epoch and "best" checkpoints.
      image_size: side in pixels of the square network input (Xception needs >= 71).
      augment: the recipe's augmentation of training images (drawn per image, see
        docs/METHOD.md).
      augment_on_device: split mode of ``trainer.data``: the host decodes, crops and resizes;
        the warp and channel shift run batched on the accelerator in front of the model
        (``trainer.augment.DeviceAugmentation``). False: everything on the host, per image.
      shuffle_buffer: records in the shuffle buffer (per input pipeline).
      max_images_per_class: class-balanced epochs (recipe's option: 256); None = all images.
      steps_per_epoch: if set, the training data repeats and an epoch is this many global steps.
      max_dev_images: cap on dev images evaluated per epoch (None = all).
      check_labels: read every training label once before training to check them against the
        label map (a full pass over the labels; off for very large data checked at ingest).
      seed: seed for initialisation, shuffling and augmentation (None = random).
    """

    train_data: str = ""
    label_map: str = ""
    dev_data: str | None = None
    image_size: int = 299
    augment: bool = True
    augment_on_device: bool = True
    shuffle_buffer: int = 2048
    max_images_per_class: int | None = None
    steps_per_epoch: int | None = None
    max_dev_images: int | None = None
    check_labels: bool = True
    seed: int | None = None

    def validate(self) -> None:
        if not self.train_data:
            raise InputError("--train_data is required")
        if not self.label_map:
            raise InputError("--label_map is required")
        if self.image_size < 71:
            raise InputError(
                f"--image_size must be >= 71 (Xception's minimum), got {self.image_size}"
            )
        if self.shuffle_buffer < 1:
            raise InputError(f"--shuffle_buffer must be >= 1, got {self.shuffle_buffer}")
        for name in ("max_images_per_class", "steps_per_epoch", "max_dev_images"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name} must be >= 1 when given, got {value}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The network and its loss (see ``trainer.model.build_model``, ``trainer.heads``,
    ``trainer.losses``).

    Attributes:
      backbone_weights: ``"imagenet"`` (downloads), ``"none"`` (random init) or a local weights
        file for Xception without its top.
      dropout: dropout rate after GeM pooling, before the head (recipe: 0.05).
      gem_p: initial GeM exponent (recipe: 3.0, trainable).
      head: the head on the GeM features, one of :data:`HEAD_CHOICES`: ``sigmoid`` (the recipe),
        ``arcface`` or ``subcenter_arcface`` (``trainer.heads``; values and sources there).
      rank_weight: weight of the rank term of the sigmoid head's loss (recipe: 1.0).
      embedding_dim: ArcFace heads: width D of the projected, L2-normalised embedding.
      arcface_scale: ArcFace heads: the scale s of the cosine logits.
      arcface_margin: ``arcface``: the additive angular margin m (radians), the same for all
        classes.
      subcenters: ``subcenter_arcface``: sub-centers K per class.
      margin_min, margin_max, margin_power: ``subcenter_arcface``: the dynamic margins
        ``m_c = a * n_c^(-margin_power) + b``, with a and b such that the largest class gets
        ``margin_min`` and the smallest ``margin_max`` (``trainer.heads.dynamic_margins``).
      calibrate_batchnorm_images: with ``backbone_weights="none"`` only: set the backbone's
        BatchNorm moving statistics from this many training images before training (0 = off).
        The backbone runs with BatchNorm in inference mode (the finetuning recipe); with random
        weights and the initial statistics (mean 0, variance 1) its activations shrink layer
        after layer until the pooled features are ~0 and nothing can be learned.
    """

    backbone_weights: str = "imagenet"
    dropout: float = 0.05
    gem_p: float = 3.0
    head: str = "sigmoid"
    rank_weight: float = 1.0
    embedding_dim: int = 512
    arcface_scale: float = 30.0
    arcface_margin: float = 0.5
    subcenters: int = 3
    margin_min: float = 0.05
    margin_max: float = 0.5
    margin_power: float = 0.25
    calibrate_batchnorm_images: int = 64

    def validate(self) -> None:
        if not self.backbone_weights:
            raise InputError("--backbone_weights must be imagenet, none or a path")
        if not 0.0 <= self.dropout < 1.0:
            raise InputError(f"--dropout must be in [0, 1), got {self.dropout}")
        if self.gem_p <= 0:
            raise InputError(f"--gem_p must be > 0, got {self.gem_p}")
        if self.rank_weight < 0:
            raise InputError(f"--rank_weight must be >= 0, got {self.rank_weight}")
        if self.head not in HEAD_CHOICES:
            raise InputError(f"--head must be one of {HEAD_CHOICES}, got {self.head!r}")
        if self.embedding_dim < 1:
            raise InputError(f"--embedding_dim must be >= 1, got {self.embedding_dim}")
        if not self.arcface_scale > 0:
            raise InputError(f"--arcface_scale must be > 0, got {self.arcface_scale}")
        if self.subcenters < 1:
            raise InputError(f"--subcenters must be >= 1, got {self.subcenters}")
        # A margin of pi/2 or more would let theta + m pass pi for well-classified images.
        if not 0.0 <= self.arcface_margin < math.pi / 2:
            raise InputError(f"--arcface_margin must be in [0, pi/2), got {self.arcface_margin}")
        if not 0.0 <= self.margin_min <= self.margin_max < math.pi / 2:
            raise InputError(
                "--margin_min and --margin_max must satisfy 0 <= min <= max < pi/2, "
                f"got {self.margin_min} and {self.margin_max}"
            )
        if not self.margin_power > 0:
            raise InputError(f"--margin_power must be > 0, got {self.margin_power}")
        if self.calibrate_batchnorm_images < 0:
            raise InputError(
                f"--calibrate_batchnorm_images must be >= 0, got {self.calibrate_batchnorm_images}"
            )


@dataclasses.dataclass(frozen=True)
class PhaseConfig:
    """One finetuning phase: which layers train, for how long, how fast.

    Attributes:
      name: one of :data:`PHASE_NAMES`.
      trainable_from: first trainable backbone layer index; None = backbone frozen (head only).
      epochs: epochs of this phase (0 = skip the phase).
      batch_size: global batch (all replicas together).
      learning_rate: Adam learning rate in the phase's first epoch.
      final_learning_rate: learning rate of the phase's last epoch; in between it decays
        geometrically per epoch. None = constant ``learning_rate``.
    """

    name: str
    trainable_from: int | None
    epochs: int
    batch_size: int
    learning_rate: float
    final_learning_rate: float | None = None

    def validate(self) -> None:
        prefix = f"--{self.name}_"
        if self.trainable_from is not None and self.trainable_from < 0:
            raise InputError(
                f"{prefix}trainable_from must be >= 0 or none, got {self.trainable_from}"
            )
        if self.epochs < 0:
            raise InputError(f"{prefix}epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise InputError(f"{prefix}batch_size must be >= 1, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise InputError(f"{prefix}learning_rate must be > 0, got {self.learning_rate}")
        if self.final_learning_rate is not None and not self.final_learning_rate > 0:
            raise InputError(
                f"{prefix}final_learning_rate must be > 0, got {self.final_learning_rate}"
            )

    def learning_rate_at(self, epoch_in_phase: int) -> float:
        """Learning rate of the phase's ``epoch_in_phase``-th epoch (0-based), geometric decay."""
        if self.final_learning_rate is None or self.epochs <= 1:
            return float(self.learning_rate)
        fraction = min(max(epoch_in_phase, 0), self.epochs - 1) / (self.epochs - 1)
        ratio = self.final_learning_rate / self.learning_rate
        return float(self.learning_rate * ratio**fraction)


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
    """How the work is spread over devices and which numeric tricks are used.

    Attributes:
      strategy: ``auto`` = MultiWorkerMirrored when ``TF_CONFIG`` is set, else Mirrored over the
        devices named by ``devices`` or all local GPUs, else the default (one device) strategy.
      devices: explicit device names for MirroredStrategy, e.g. ``("/cpu:0", "/cpu:1")``;
        CPU devices beyond the physical ones are created as logical devices.
      mixed_precision: ``none``, ``bfloat16`` or ``float16`` compute (the output stays float32).
      jit_compile: XLA; off by default (made Xception ~10x slower on CPU here).
      coordination_timeout: seconds, under MultiWorkerMirroredStrategy: how long the
        coordination service waits for a worker's heartbeat, for all workers to register, and
        at the shutdown barrier. TensorFlow's 10 s heartbeat default failed a run on a busy
        2-core host (the chief computing the dev GAP beside other CPU-bound processes); 300 s
        rides out such stalls, and a dead worker is still reported within 5 minutes.
    """

    strategy: str = "auto"
    devices: tuple[str, ...] = ()
    mixed_precision: str = "none"
    jit_compile: bool = False
    coordination_timeout: int = 300

    def validate(self) -> None:
        if self.strategy not in STRATEGY_CHOICES:
            raise InputError(f"--strategy must be one of {STRATEGY_CHOICES}, got {self.strategy!r}")
        if self.mixed_precision not in MIXED_PRECISION_CHOICES:
            raise InputError(
                f"--mixed_precision must be one of {MIXED_PRECISION_CHOICES}, "
                f"got {self.mixed_precision!r}"
            )
        if self.devices and self.strategy in ("default", "multi_worker"):
            raise InputError(f"--devices cannot be combined with --strategy {self.strategy}")
        if len(set(self.devices)) != len(self.devices):
            raise InputError(f"--devices names a device twice: {','.join(self.devices)}")
        if self.coordination_timeout < 1:
            raise InputError(
                f"--coordination_timeout must be >= 1 second, got {self.coordination_timeout}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything one ``landmarks-train`` run needs. Build with :func:`config_from_args`."""

    model_dir: str
    data: DataConfig
    model: ModelConfig = ModelConfig()
    phases: tuple[PhaseConfig, ...] = ()
    distribution: DistributionConfig = DistributionConfig()
    preset: str = "full"
    verbose: int = 2

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if not self.model_dir:
            raise InputError("--model_dir is required")
        self.data.validate()
        self.model.validate()
        self.distribution.validate()
        if [phase.name for phase in self.phases] != list(PHASE_NAMES):
            raise InputError(f"phases must be {PHASE_NAMES} in this order")
        for phase in self.phases:
            phase.validate()
        if self.total_epochs < 1:
            raise InputError("every phase has 0 epochs: nothing to train")
        if self.verbose not in (0, 1, 2):
            raise InputError(f"--verbose must be 0, 1 or 2, got {self.verbose}")

    @property
    def active_phases(self) -> tuple[PhaseConfig, ...]:
        """Phases with at least one epoch, in order."""
        return tuple(phase for phase in self.phases if phase.epochs > 0)

    @property
    def total_epochs(self) -> int:
        return sum(phase.epochs for phase in self.phases)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


def _recipe_phases() -> dict[str, PhaseConfig]:
    return {
        "head": PhaseConfig("head", None, epochs=2, batch_size=128, learning_rate=1e-3),
        "finetune": PhaseConfig(
            "finetune", 85, epochs=6, batch_size=48, learning_rate=1e-4, final_learning_rate=1e-6
        ),
        "deep": PhaseConfig(
            "deep", 25, epochs=2, batch_size=48, learning_rate=1e-6, final_learning_rate=3e-7
        ),
    }


DEFAULT_PRESET = "full"  # used when --preset is not given

# Preset = overrides of the dataclass defaults, keyed like the CLI flags (dest names).
# "quick" (tests, demo; ~1-3 min on 2 shared CPU cores with small data): 96 px, batch 8,
# 3 x 15 head steps then 15 finetuning steps from layer 85; a random backbone (no download)
# whose BatchNorm statistics are calibrated on 64 training images (ModelConfig). Measured
# here: dev GAP 0.05 at initialisation -> 1.0 after the 4 epochs on the tests' 4-class data.
PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    "quick": {
        "image_size": 96,
        "steps_per_epoch": 15,
        "shuffle_buffer": 256,
        "backbone_weights": "none",
        "head_epochs": 3,
        "head_batch_size": 8,
        "head_learning_rate": 1e-3,
        "finetune_epochs": 1,
        "finetune_batch_size": 8,
        "finetune_learning_rate": 1e-4,
        "finetune_final_learning_rate": None,
        "deep_epochs": 0,
        "deep_batch_size": 8,
        "max_dev_images": 512,
    },
}


def _optional_int(text: str) -> int | None:
    return None if text.lower() in ("none", "") else int(text)


def _optional_float(text: str) -> float | None:
    return None if text.lower() in ("none", "") else float(text)



def _device_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def preset_defaults(preset_name: str) -> dict[str, Any]:
    """Flag dest -> the value a run gets when that flag is not given, under ``preset_name``.

    The same resolution as :func:`config_from_args` (preset, else dataclass/recipe default); used
    for the help text, so ``--help`` shows the values a run really uses.
    """
    preset = PRESETS[preset_name]
    values: dict[str, Any] = {}
    for config_class in (DataConfig, ModelConfig, DistributionConfig):
        defaults = config_class()
        for field in dataclasses.fields(config_class):
            values[field.name] = preset.get(field.name, getattr(defaults, field.name))
    for name, recipe in _recipe_phases().items():
        for field in dataclasses.fields(PhaseConfig):
            if field.name != "name":
                key = f"{name}_{field.name}"
                values[key] = preset.get(key, getattr(recipe, field.name))
    verbose_default = {f.name: f.default for f in dataclasses.fields(TrainConfig)}["verbose"]
    values["verbose"] = preset.get("verbose", verbose_default)
    return values


def format_flag_value(value: Any) -> str:
    """A default as it is typed on the command line (``none``, ``true``, ``1e-06``, ``a,b``)."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):
        return ",".join(str(part) for part in value)
    return str(value)


TRAIN_EPILOG = """\
Defaults: "full" is the recipe, "quick" the --preset for tests and the demo; a flag given on
the command line beats the preset. Optional numbers take "none"; booleans take true/false.
Phases run in order head -> finetune -> deep on one epoch counter; a phase with 0 epochs is
skipped; the learning rate decays geometrically per epoch from *_learning_rate to
*_final_learning_rate. Batch sizes are global (all replicas together). All paths may be gs://.

example:
  landmarks-train --train_data 'records/train/train-*.tfrecord' \\
      --dev_data 'records/train/dev-*.tfrecord' --label_map records/train/label_map.csv \\
      --model_dir model/ --preset quick
exit status: 0 done, 1 internal error (a bug: traceback logged), 2 bad flags or input,
3 training diverged (loss not finite).
"""


def build_parser() -> argparse.ArgumentParser:
    """The ``landmarks-train`` argument parser. Unset flags are left out of the namespace.

    Help texts show the resolved default under each preset (:func:`preset_defaults`).
    """
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-train",
        description="Train the Xception + GeM landmark classifier on TFRecords (phases).",
        # Unset flags are absent from the namespace, so an explicit "none" differs from "unset".
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=TRAIN_EPILOG,
    )
    add = _preset_flag_adder(parser)
    _add_input_flags(parser, add)
    _add_data_flags(add)
    _add_model_flags(add)
    _add_phase_flags(add)
    _add_distribution_flags(add)
    return parser


def _preset_flag_adder(parser: argparse.ArgumentParser):
    """``add(flag, text, **kwargs)``: a flag of ``parser`` whose help ends in its default under
    the presets, ``(default: X)`` or ``(full: X; quick: Y)``."""
    full, quick = preset_defaults("full"), preset_defaults("quick")

    def add(flag: str, text: str, **kwargs) -> None:
        dest = flag[2:]
        full_text, quick_text = format_flag_value(full[dest]), format_flag_value(quick[dest])
        if full_text == quick_text:
            text += f" (default: {full_text})"
        else:
            text += f" (full: {full_text}; quick: {quick_text})"
        parser.add_argument(flag, help=text, **kwargs)

    return add


def _add_input_flags(parser: argparse.ArgumentParser, add) -> None:
    """Where the records, the label map and the output are; the preset."""
    parser.add_argument("--train_data", help="glob of training TFRecord shards (required)")
    parser.add_argument("--label_map", help="label_map.csv written by landmarks-ingest; its size "
                        "is the number of classes (required)")
    parser.add_argument("--model_dir",
                        help="output folder; resumes an unfinished run found there (required)")
    add("--dev_data", "glob of dev TFRecord shards: dev GAP per epoch and the best checkpoint")
    parser.add_argument(
        "--preset", choices=sorted(PRESETS),
        help="full = the recipe; quick = a few steps at 96 px (tests, demo) "
        f"(default: {DEFAULT_PRESET})")


def _add_data_flags(add) -> None:
    """Input size, augmentation, epochs and seed (:class:`DataConfig`)."""
    add("--image_size", "side of the square network input, pixels, >= 71", type=int)
    add("--augment", "the recipe's augmentation on training batches", type=cli.parse_bool)
    add("--augment_on_device", "run the warp and channel shift batched on the accelerator "
        "(true) or per image on the host (false)", type=cli.parse_bool)
    add("--shuffle_buffer", "records in the shuffle buffer", type=int)
    add("--max_images_per_class", "class-balanced epochs: at most this many images per class "
        "(recipe option: 256; none = all)", type=_optional_int)
    add("--steps_per_epoch", "repeat the data and make an epoch this many global steps "
        "(none = one pass)", type=_optional_int)
    add("--max_dev_images", "dev images evaluated per epoch (none = all)", type=_optional_int)
    add("--check_labels", "read every training label once and check it against the label map",
        type=cli.parse_bool)
    add("--seed", "seed of initialisation, shuffling and augmentation (none = random)",
        type=_optional_int)


def _add_model_flags(add) -> None:
    """Backbone, pooling and head (:class:`ModelConfig`)."""
    add("--backbone_weights", "imagenet (download), none (random init) or a path to Xception "
        "no-top weights")
    add("--dropout", "dropout rate after GeM pooling, before the head, in [0, 1)", type=float)
    add("--gem_p", "initial GeM exponent p (trainable)", type=float)
    add("--head", "the head on the GeM features: sigmoid (the recipe), arcface or "
        "subcenter_arcface", choices=HEAD_CHOICES)
    add("--rank_weight", "weight of the rank term of the sigmoid head's loss", type=float)
    add("--embedding_dim", "ArcFace heads: width of the L2-normalised embedding", type=int)
    add("--arcface_scale", "ArcFace heads: scale s of the cosine logits", type=float)
    add("--arcface_margin", "arcface head: additive angular margin m, radians", type=float)
    add("--subcenters", "subcenter_arcface head: sub-centers K per class", type=int)
    add("--margin_min", "subcenter_arcface head: dynamic margin of the largest class, radians",
        type=float)
    add("--margin_max", "subcenter_arcface head: dynamic margin of the smallest class, radians",
        type=float)
    add("--margin_power", "subcenter_arcface head: exponent lambda of the dynamic margins "
        "a * n^(-lambda) + b", type=float)
    add("--calibrate_batchnorm_images", "with --backbone_weights none only: training images used "
        "to set the backbone's BatchNorm statistics (0 = off)", type=int)


def _add_phase_flags(add) -> None:
    """Five flags per training phase (:class:`PhaseConfig`), phase by phase."""
    for name in PHASE_NAMES:
        add(f"--{name}_epochs", f"epochs of the {name} phase (0 = skip it)", type=int)
        add(f"--{name}_batch_size", f"global batch of the {name} phase, images", type=int)
        add(f"--{name}_learning_rate", f"Adam learning rate in the {name} phase's first epoch",
            type=float)
        add(f"--{name}_final_learning_rate", f"learning rate of the {name} phase's last epoch "
            "(none = constant)", type=_optional_float)
        add(f"--{name}_trainable_from", f"first trainable backbone layer index in the {name} "
            "phase (none = backbone frozen)", type=_optional_int)


def _add_distribution_flags(add) -> None:
    """Devices, precision and compilation (:class:`DistributionConfig`); Keras' verbosity."""
    add("--strategy", "auto = multi_worker with TF_CONFIG, else mirrored over --devices or all "
        "GPUs, else default (one device)", choices=STRATEGY_CHOICES)
    add("--devices", "comma-separated devices for mirrored, e.g. /cpu:0,/cpu:1 or /gpu:0,/gpu:1 "
        "(none = all GPUs)", type=_device_list)
    add("--mixed_precision", "compute dtype; the output stays float32",
        choices=MIXED_PRECISION_CHOICES)
    add("--jit_compile", "XLA compilation (slow for Xception on CPU)", type=cli.parse_bool)
    add("--coordination_timeout", "multi_worker only: seconds the coordination service waits "
        "for a worker's heartbeat, for all workers to join and at the shutdown barrier (raise "
        "it on oversubscribed or preemptible hosts)", type=int)
    add("--verbose", "Keras progress: 0 silent, 1 bar, 2 one line per epoch", type=int,
        choices=(0, 1, 2))


def _resolve(values: dict[str, Any], preset: dict[str, Any], name: str, default: Any) -> Any:
    """Explicit flag, else the preset's value, else the default."""
    if name in values:
        return values[name]
    return preset.get(name, default)


def config_from_args(argv: Sequence[str] | None) -> TrainConfig:
    """Parses ``argv`` into a validated :class:`TrainConfig`.

    Raises:
      InputError: a bad, unknown or abbreviated flag, or values that do not fit together.
    """
    values = vars(build_parser().parse_args(argv))
    preset_name = values.pop("preset", DEFAULT_PRESET)
    preset = PRESETS[preset_name]

    def pick(name, default):
        return _resolve(values, preset, name, default)

    data_defaults = DataConfig()
    data = DataConfig(
        **{
            field.name: pick(field.name, getattr(data_defaults, field.name))
            for field in dataclasses.fields(DataConfig)
        }
    )
    model_defaults = ModelConfig()
    model = ModelConfig(
        **{
            field.name: pick(field.name, getattr(model_defaults, field.name))
            for field in dataclasses.fields(ModelConfig)
        }
    )
    phases = []
    for name, recipe in _recipe_phases().items():
        fields = {
            field.name: pick(f"{name}_{field.name}", getattr(recipe, field.name))
            for field in dataclasses.fields(PhaseConfig)
            if field.name != "name"
        }
        phases.append(PhaseConfig(name=name, **fields))
    distribution_defaults = DistributionConfig()
    distribution = DistributionConfig(
        **{
            field.name: pick(field.name, getattr(distribution_defaults, field.name))
            for field in dataclasses.fields(DistributionConfig)
        }
    )
    return TrainConfig(
        model_dir=values.get("model_dir", ""),
        data=data,
        model=model,
        phases=tuple(phases),
        distribution=distribution,
        preset=preset_name,
        verbose=pick("verbose", 2),
    )
