"""`landmarks-toy-data`: a small, realistic landmark dataset that needs no network.

Every landmark class is one real photograph shipped with scikit-image (``skimage.data``), seen
from many viewpoints: a random perspective view of part of the photo (crop, scale, rotation,
tilt, sometimes zoomed out so the scene's surroundings show), then lighting and colour changes,
blur, sensor noise, and JPEG compression at a random quality, at a random size up to
``--max_size`` pixels on the long side. Test views are harder (stronger warps, smaller crops).
Distractors (non-landmarks) go through exactly the same camera model, but their scenes are other
content: procedural textures, shapes, gratings, and crops of ``skimage.data`` images that are not
classes (grayscale ones often tinted, so colour alone does not separate them from landmarks).

Your own photos (``--scenes_dir DIR``, a local folder) replace the skimage classes: every image
file directly in DIR (.jpg .jpeg .png .webp .bmp .tif .tiff, any case) is one class named by its
file stem; every sub-folder with image files directly in it is one class named by the folder,
whose photos are all those images (each view shows one of them, chosen at random; deeper folders
are ignored). Photos are read with Pillow, turned upright by their EXIF orientation, converted to
RGB and shrunk to at most 2048 pixels on the long side. Classes are taken in name order;
``--num_classes`` caps them (default: all). A photo that cannot be read (or is under 32 pixels on
a side) is skipped with a logged warning and listed under ``skipped_photos`` in toy_data.json; a
class left without photos is dropped. Exit code 2 when the folder is missing, holds no usable
photo, or gives fewer than 2 classes, or when two classes share a name. Distractors never show
your photos (only the hard kinds below are made from them, on purpose).

``--difficulty standard|hard`` picks a preset for the settings below; each has its own flag, and
a flag given explicitly wins over the preset. ``standard`` is this generator as it always was:
the same seed and options still write byte-identical files.

    flag                        standard  hard      what it does
    --train_per_class           16        4         training views per class
    --perspective               0.12      0.25      test views: corner jitter (tilt), fraction
                                                    of the viewed region's side
    --rotation                  15        30        test views: in-plane rotation, degrees
    --scale_range               0.4,1.2   0.25,2.0  test views: side of the viewed region over
                                                    the source's (> 1: zoomed out, uniform)
    --partial_fraction          0         0.35      share of test views that show only 25-50 %
                                                    of the source's area (inside it)
    --occluder_fraction         0         0.4       share of test views with an opaque
                                                    rectangle/ellipse (flat colour or a patch of
                                                    a non-class photo) over 10-40 % of the view
    --hard_distractor_fraction  0         0.5       share of training and of test distractors
                                                    that are hard: "tile_shuffle" (a class photo
                                                    cut into 8-14 tiles along its long side,
                                                    shuffled: its colours and texture, none of
                                                    its geometry) or "recolour" (a non-class
                                                    photo crop or noise mapped to a class
                                                    photo's per-channel colour histogram)

Test distractors go through the same test camera as test landmarks (partial views, occluders),
so neither is a shortcut. Partial and occluded views are drawn per view with these
probabilities; hard distractors are every 1/fraction-th distractor (exact count
floor(n * fraction)), alternating the two kinds. toy_data.json records every resolved setting
(``config``), the counts of partial and occluded test views (``hard_views``) and of each
distractor kind (``distractor_kinds``); a run with standard settings and skimage classes keeps
the old toy_data.json and README.txt (no new keys), so its files stay byte-identical.

Output layout under ``--output_dir``::

    images/train/<id>.jpg   landmark training views (rows of train.csv)
    images/test/<id>.jpg    test views: landmarks and distractors (rows of test.csv)
    distractors/<id>.jpg    training non-landmarks (pass this folder as the ingest's
                            --distractor_dir)
    train.csv               id,url,landmark_id
    test.csv                id,url
    test_solution.csv       id,landmarks,Usage (GLDv2 form; empty landmarks = non-landmark)
    toy_data.json           config, counts and the class table (landmark id -> source photo)
    README.txt              this layout, in short
    _SUCCESS                written last

URLs are paths relative to the CSV's folder. Ids are 16 hex characters from the seeded RNG;
landmark ids are non-contiguous integers (as in GLD), so the label map matters. The same
``--seed`` and options give byte-identical files; each image has its own RNG stream derived from
``(seed, role, index)``, and what only the new settings draw (which photo of a class, partial
views, occluders, hard distractors' class photo) comes from a second stream derived from
``(seed, role, index, 101)``, so the standard streams never shift.

Example (the defaults take ~8 s on one core)::

    landmarks-toy-data --output_dir /tmp/toy --seed 0
    landmarks-toy-data --output_dir /tmp/toy_hard --seed 0 --difficulty hard
    landmarks-toy-data --output_dir /tmp/mine --scenes_dir ~/photos/landmarks --difficulty hard

The package, one part per module (each imports only modules listed above it)::

    skimage_photos    the offline skimage.data photos (classes and distractor photos)
    scenes_dir        --scenes_dir: finding and reading your own photos
    view_geometry     which region of the source a view shows (quads, homography, clipping)
    drawing           procedural pictures: noise, gradients, shapes, gratings, photo crops
    distractors       plain non-landmark content and whose turn each kind is
    hard_distractors  tile_shuffle and recolour
    occluders         opaque shapes in front of a test view
    photometric       light, saturation, blur and sensor noise
    camera            scene -> view (geometry, occluder, photometric) -> JPEG
    config            the --difficulty presets and ToyDataConfig
    streams           the per-image RNG streams and the ids drawn from them
    landmark_classes  the classes of a run and the photos each may show
    manifests         the CSVs, toy_data.json, README.txt, _SUCCESS
    dataset           generate(): everything above, in order
    flags             the command line -> ToyDataConfig
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from beam_pipelines import cli
from beam_pipelines.toy_data.camera import ViewExtras, draw_view_extras, encode_jpeg, render_view
from beam_pipelines.toy_data.config import (DEFAULT_NUM_CLASSES, DIFFICULTIES, Difficulty,
                                            ToyDataConfig)
from beam_pipelines.toy_data.dataset import generate
from beam_pipelines.toy_data.distractors import DISTRACTOR_KINDS, distractor_scene
from beam_pipelines.toy_data.flags import build_parser, parse_args, parse_scale_range
from beam_pipelines.toy_data.hard_distractors import (HARD_DISTRACTOR_KINDS, TILES_PER_SIDE,
                                                      hard_distractor_scene, is_hard_distractor,
                                                      match_colours, shuffled_tiles)
from beam_pipelines.toy_data.occluders import (OCCLUDER_AREA, OCCLUDER_SHAPES, Occluder,
                                               apply_occluder, draw_occluder, occluder_mask)
from beam_pipelines.toy_data.scenes_dir import (SCENE_EXTENSIONS, SCENE_MAX_SIDE, SCENE_MIN_SIDE,
                                                SceneClass, find_scene_classes,
                                                load_scene_photo, usable_scene_classes)
from beam_pipelines.toy_data.skimage_photos import CLASS_SOURCES, OTHER_SOURCES, load_source
from beam_pipelines.toy_data.view_geometry import (PARTIAL_AREA, TEST_VIEW, TRAIN_VIEW, ViewParams,
                                                   homography, output_size, view_corners,
                                                   visible_source_fraction)

__all__ = [
    # The command and the generator.
    "main", "build_parser", "parse_args", "parse_scale_range", "generate",
    # Settings.
    "ToyDataConfig", "Difficulty", "DIFFICULTIES", "DEFAULT_NUM_CLASSES",
    # Sources of the classes.
    "CLASS_SOURCES", "OTHER_SOURCES", "load_source",
    "SCENE_EXTENSIONS", "SCENE_MAX_SIDE", "SCENE_MIN_SIDE", "SceneClass", "find_scene_classes",
    "load_scene_photo", "usable_scene_classes",
    # The camera and its parts.
    "ViewParams", "TRAIN_VIEW", "TEST_VIEW", "PARTIAL_AREA", "homography", "output_size",
    "view_corners", "visible_source_fraction",
    "ViewExtras", "draw_view_extras", "render_view", "encode_jpeg",
    "OCCLUDER_AREA", "OCCLUDER_SHAPES", "Occluder", "draw_occluder", "occluder_mask",
    "apply_occluder",
    # Distractors.
    "DISTRACTOR_KINDS", "distractor_scene",
    "HARD_DISTRACTOR_KINDS", "TILES_PER_SIDE", "hard_distractor_scene", "is_hard_distractor",
    "match_colours", "shuffled_tiles",
]

logger = logging.getLogger(__name__)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: writes the dataset and prints a one-line summary.

    Returns 0; 2 for bad flags or values (one ``landmarks-toy-data: error:`` line on stderr);
    1 for an internal error (a bug: traceback logged), see :func:`beam_pipelines.cli.run_command`.
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return cli.run_command("landmarks-toy-data", lambda: _main(argv))


def _log_progress(done: int, total: int) -> None:
    """Every 25th image and the last: ``<done>/<total> images``."""
    if done % 25 == 0 or done == total:
        logger.info("%d/%d images", done, total)


def _main(argv: Optional[Sequence[str]]) -> int:
    """Generates the dataset and prints its summary line; returns 0."""
    config = parse_args(argv)
    # `generate` is looked up here, in this package's namespace: patching toy_data.generate
    # (as tests do) reaches the command.
    summary = generate(config, progress=_log_progress)
    counts = summary["counts"]
    print(f"wrote {counts['train_images']} training views of {counts['classes']} landmarks, "
          f"{counts['train_distractors']} training distractors, "
          f"{counts['test_images']} test images "
          f"({counts['test_landmark_images']} landmarks) to {config.output_dir} in "
          f"{summary['seconds']:.1f} s")
    return 0
