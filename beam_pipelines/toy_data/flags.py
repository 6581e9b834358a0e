"""The ``landmarks-toy-data`` command line -> :class:`~.config.ToyDataConfig`.

Defaults come from :class:`~.config.ToyDataConfig` and :data:`~.config.DIFFICULTIES`: a
preset's setting is left ``None`` here and resolved by the config, so a flag given explicitly
wins over ``--difficulty``.
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

from beam_pipelines import cli
from beam_pipelines.toy_data import config as config_lib, occluders, skimage_photos, view_geometry

DESCRIPTION = "`landmarks-toy-data`: a small, realistic landmark dataset that needs no network."
EPILOG = (
    "examples (the defaults take ~8 s on one core):\n"
    "  landmarks-toy-data --output_dir /tmp/toy --seed 0\n"
    "  landmarks-toy-data --output_dir /tmp/toy_hard --seed 0 --difficulty hard\n"
    "  landmarks-toy-data --output_dir /tmp/mine --scenes_dir ~/photos/landmarks\n"
    "then ingest /tmp/toy/train.csv with --distractor_dir /tmp/toy/distractors.\n"
    "--difficulty hard = --train_per_class 4 --perspective 0.25 --rotation 30\n"
    "  --scale_range 0.25,2.0 --partial_fraction 0.35 --occluder_fraction 0.4\n"
    "  --hard_distractor_fraction 0.5 (a flag given explicitly wins).")
_STANDARD, _HARD = config_lib.DIFFICULTIES["standard"], config_lib.DIFFICULTIES["hard"]


def parse_scale_range(text: str) -> tuple[float, float]:
    """``"MIN,MAX"`` -> ``(MIN, MAX)`` for ``--scale_range`` (argparse type)."""
    parts = text.split(",")
    try:
        if len(parts) != 2:
            raise ValueError(text)
        return float(parts[0]), float(parts[1])
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected two numbers MIN,MAX such as 0.25,2.0, got {text!r}") from None


def _add_size_flags(parser: argparse.ArgumentParser) -> None:
    """--output_dir, how many classes and images, image sizes, seed, --overwrite."""
    defaults = config_lib.ToyDataConfig(output_dir="unused")
    parser.add_argument("--output_dir", required=True,
                        help="folder to write, local or gs:// (required)")
    parser.add_argument(
        "--num_classes", type=int, default=None,
        help=f"landmark classes: skimage photos (at most {len(skimage_photos.CLASS_SOURCES)}), "
             f"or with --scenes_dir the first N of the folder's classes by name (default: "
             f"{config_lib.DEFAULT_NUM_CLASSES}; with --scenes_dir: all)")
    parser.add_argument(
        "--train_per_class", type=int, default=None,
        help=f"training views per class (images/train, train.csv) (default: "
             f"{_STANDARD.train_per_class}; hard: {_HARD.train_per_class})")
    helps = {
        "test_per_class": "test views per class (images/test)",
        "num_train_distractors": "training non-landmark images (distractors/)",
        "num_test_distractors": "test non-landmark images (images/test, empty landmarks)",
        "min_size": "smallest long side of an image, pixels",
        "max_size": "largest long side of an image, pixels",
        "seed": "random seed; the same seed and options give byte-identical files",
    }
    for name, text in helps.items():
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name),
                            help=f"{text} (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true",
                        help="delete the output folder's contents first (default: off, a "
                             "non-empty folder is refused)")


def _add_scene_flags(parser: argparse.ArgumentParser) -> None:
    """--scenes_dir and --difficulty: where the classes come from and the preset."""
    parser.add_argument(
        "--scenes_dir", default=None,
        help="local folder of your own photos: each photo file directly in it, and each "
             "sub-folder of photos, is one landmark class (.jpg .jpeg .png .webp .bmp .tif "
             ".tiff, any case; EXIF orientation applied; unreadable photos skipped with a "
             "warning and listed in toy_data.json) (default: none, skimage photos)")
    parser.add_argument(
        "--difficulty", choices=sorted(config_lib.DIFFICULTIES), default="standard",
        help="preset of the settings below: standard = the classic set (unchanged output); "
             "hard = strong perspective, partial and occluded test views, wider zoom, few "
             "training views, hard distractors. A flag given explicitly wins "
             "(default: %(default)s)")


def _add_preset_flags(parser: argparse.ArgumentParser) -> None:
    """The settings ``--difficulty`` presets (default ``None``: the preset's value)."""
    partial_low, partial_high = view_geometry.PARTIAL_AREA
    occluder_low, occluder_high = occluders.OCCLUDER_AREA
    presets = {
        "perspective": ("test views: largest corner jitter (tilt) as a fraction of the viewed "
                        "region's side, in [0, 0.4]"),
        "rotation": "test views: largest in-plane rotation, degrees",
        "partial_fraction": (f"share of test views showing only {partial_low:g}-"
                             f"{partial_high:g} of the source's area"),
        "occluder_fraction": (f"share of test views with an opaque shape or photo patch over "
                              f"{occluder_low:g}-{occluder_high:g} of the view"),
        "hard_distractor_fraction": ("share of training and of test distractors that are hard: "
                                     "shuffled tiles of a class photo, or other content "
                                     "recoloured to a class photo's colour histogram"),
    }
    for name, text in presets.items():
        parser.add_argument(f"--{name}", type=float, default=None,
                            help=f"{text} (default: {getattr(_STANDARD, name):g}; hard: "
                                 f"{getattr(_HARD, name):g})")
    parser.add_argument(
        "--scale_range", type=parse_scale_range, default=None, metavar="MIN,MAX",
        help=f"test views: side of the viewed region over the source's, uniform; above 1 the "
             f"view is zoomed out (default: {_STANDARD.scale_range[0]:g},"
             f"{_STANDARD.scale_range[1]:g}; hard: {_HARD.scale_range[0]:g},"
             f"{_HARD.scale_range[1]:g})")


def build_parser() -> argparse.ArgumentParser:
    """The ``landmarks-toy-data`` argument parser (see the module docstring for defaults)."""
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-toy-data", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG)
    _add_size_flags(parser)
    _add_scene_flags(parser)
    _add_preset_flags(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> config_lib.ToyDataConfig:
    """Command line -> :class:`~.config.ToyDataConfig` (``InputError`` for bad or unknown
    flags, values)."""
    args = build_parser().parse_args(argv)
    return config_lib.ToyDataConfig(**vars(args))
