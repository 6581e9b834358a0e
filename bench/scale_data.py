"""Synthetic many-class landmark data for the scale ladder (``bench/bench_scale.py``).

``landmarks-toy-data`` has a dozen classes (one scikit-image photo each); the ladder needs
thousands, made in seconds. Here every class is its own procedural scene (seeded multi-octave
value noise under random filled shapes and lines: corners and edges, so local features match),
and every image is a random perspective view of its class's scene (crop 50-90 % of the side,
in-plane rotation, corner jitter, brightness and contrast jitter, JPEG at quality 80-92). Images
are ``--min_size``-``--max_size`` pixels on the long side (default 96-128). Distractors (training
non-landmarks) and test non-landmarks are views of scenes of their own, one scene per image.

Sizes for ``--num_train N`` (the issue's ladder: classes grow with the data)::

    classes              C = max(2, N // 8), train images spread evenly (8 per class at N = 8C)
    train distractors    N // 8
    test images          T = max(4, N // 8): T // 2 non-landmarks, the rest landmarks
    hot class            with --hot_class true (default), round(0.2 T) of the test landmarks
                         show one class (the "attractor" of GLDv2's test set); the other
                         landmarks take the classes in turn. --hot_class false spreads all
                         test landmarks over the classes in turn.

The training images and distractors do not depend on ``--hot_class`` (their random streams are
separate from the test set's), so one trained model serves both test sets of a rung.

Output layout under ``--output_dir`` (the one ``landmarks-toy-data`` writes and
``landmarks-ingest`` reads)::

    images/train/<id>.jpg   images/test/<id>.jpg   distractors/<id>.jpg
    train.csv (id,url,landmark_id)   test.csv (id,url)   test_solution.csv (id,landmarks,Usage)
    scale_data.json (counts, settings, seconds)   _SUCCESS (written last)

Run: ``python bench/scale_data.py --output_dir /tmp/scale --num_train 16000`` (~10-20 s).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Optional, Sequence

import cv2
import numpy as np

logger = logging.getLogger(__name__)

SCENE_SIDE = 192  # pixels; each view shows 50-90 % of it, resampled to <= max_size
HOT_SHARE = 0.2  # share of the test images drawn from the hot class
# Random stream roles: train and test draw from separate streams (test does not shift train).
_SCENE, _TRAIN, _TEST = 0, 1, 2
_DISTRACTOR_SCENE_BASE = 1 << 30  # scene numbers of distractors, far from the class numbers


def sizes(num_train: int, hot_class: bool = True) -> dict:
    """The counts of a rung of ``num_train`` training images (see the module docstring)."""
    if num_train < 2:
        raise ValueError(f"num_train must be >= 2, got {num_train}")
    classes = max(2, num_train // 8)
    test = max(4, num_train // 8)
    non_landmarks = test // 2
    landmarks = test - non_landmarks
    hot = min(landmarks, round(HOT_SHARE * test)) if hot_class else 0
    return {"classes": classes, "train_images": num_train, "train_distractors": num_train // 8,
            "test_images": test, "test_landmarks": landmarks, "test_non_landmarks": non_landmarks,
            "test_hot_class": hot}


def scene(seed: int, number: int) -> np.ndarray:
    """Scene ``number``: [SCENE_SIDE, SCENE_SIDE, 3] uint8, the same for the same arguments."""
    rng = np.random.default_rng([seed, _SCENE, number])
    side = SCENE_SIDE
    image = np.zeros((side, side, 3), np.float32)
    # value noise, coarse to fine
    for cells, weight in ((3, 0.45), (6, 0.25), (12, 0.15), (32, 0.15)):
        grid = rng.random((cells, cells, 3), dtype=np.float32)
        image += weight * cv2.resize(grid, (side, side), interpolation=cv2.INTER_CUBIC)
    image = np.clip(image * 255.0, 0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(40, 60))):
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        kind = int(rng.integers(0, 4))
        x, y = (int(v) for v in rng.integers(0, side, 2))
        size = int(rng.integers(side // 40, side // 8))
        if kind == 0:
            cv2.circle(image, (x, y), size, colour, -1)
        elif kind == 1:
            corner = (x + size, y + int(rng.integers(4, 2 * size)))
            cv2.rectangle(image, (x, y), corner, colour, -1)
        elif kind == 2:
            points = rng.integers(-size, size, (3, 2)) + np.array([x, y])
            cv2.fillPoly(image, [points.astype(np.int32)], colour)
        else:
            end = (x + int(rng.integers(-side // 3, side // 3)),
                   y + int(rng.integers(-side // 3, side // 3)))
            cv2.line(image, (x, y), end, colour, int(rng.integers(1, 4)))
    return image


def view(source: np.ndarray, rng: np.random.Generator, min_size: int, max_size: int,
         hard: bool) -> bytes:
    """A JPEG of a random perspective view of ``source`` (long side in [min_size, max_size])."""
    side = source.shape[0]
    long_side = int(rng.integers(min_size, max_size + 1))
    short_side = int(long_side * rng.uniform(0.75, 1.0))
    width, height = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    scale = rng.uniform(0.5, 0.8) if hard else rng.uniform(0.6, 0.9)
    region = scale * side
    centre = rng.uniform(region / 2, side - region / 2, 2)
    angle = np.deg2rad(rng.uniform(-20, 20) if hard else rng.uniform(-10, 10))
    half_w, half_h = region / 2, region / 2 * height / width
    corners = np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h],
                        [-half_w, half_h]])
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    jitter = rng.uniform(-1, 1, (4, 2)) * region * (0.08 if hard else 0.05)
    quad = (corners @ rotation.T + centre + jitter).astype(np.float32)
    target = np.array([[0, 0], [width, 0], [width, height], [0, height]], np.float32)
    matrix = cv2.getPerspectiveTransform(quad, target)
    image = cv2.warpPerspective(source, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                borderMode=cv2.BORDER_REFLECT)
    gain, offset = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
    image = cv2.convertScaleAbs(image, alpha=gain, beta=offset)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY,
                                               int(rng.integers(80, 93))])
    if not ok:
        raise RuntimeError("JPEG encoding failed")
    return encoded.tobytes()


def _ids(rng: np.random.Generator, count: int) -> list[str]:
    """``count`` distinct 16-hex-character ids."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        candidate = rng.bytes(8).hex()
        if candidate not in seen:
            seen.add(candidate)
            ids.append(candidate)
    return ids


def _csv(header: str, rows) -> str:
    return header + "\n" + "".join(",".join(str(v) for v in row) + "\n" for row in rows)


def generate(output_dir: str, num_train: int, seed: int = 0, hot_class: bool = True,
             min_size: int = 96, max_size: int = 128) -> dict:
    """Writes one rung's data set to ``output_dir`` (must not hold one); returns its summary."""
    if os.path.exists(os.path.join(output_dir, "_SUCCESS")):
        raise FileExistsError(f"{output_dir} already holds a data set")
    start = time.monotonic()
    counts = sizes(num_train, hot_class)
    classes = counts["classes"]
    for folder in ("images/train", "images/test", "distractors"):
        os.makedirs(os.path.join(output_dir, folder), exist_ok=True)

    def write(relative: str, data: bytes) -> None:
        with open(os.path.join(output_dir, relative), "wb") as handle:
            handle.write(data)

    train_rng = np.random.default_rng([seed, _TRAIN])
    landmark_ids = sorted(int(v) for v in train_rng.choice(
        np.arange(1, 20 * classes + 1000), size=classes, replace=False))
    train_ids = _ids(train_rng, num_train + counts["train_distractors"])
    train_rows = []
    scenes = {}
    for index in range(num_train):  # class of image i: i mod C, so classes differ by <= 1 image
        position = index % classes
        if position not in scenes:
            scenes[position] = scene(seed, position)
        url = f"images/train/{train_ids[index]}.jpg"
        write(url, view(scenes[position], train_rng, min_size, max_size, hard=False))
        train_rows.append((train_ids[index], url, landmark_ids[position]))
    for number, image_id in enumerate(train_ids[num_train:]):
        source = scene(seed, _DISTRACTOR_SCENE_BASE + number)
        write(f"distractors/{image_id}.jpg", view(source, train_rng, min_size, max_size, False))

    test_rng = np.random.default_rng([seed, _TEST, int(hot_class)])
    test_ids = _ids(test_rng, counts["test_images"])
    hot_position = int(test_rng.integers(0, classes))
    others = [p for p in range(classes) if p != hot_position] if hot_class else list(range(classes))
    offset = int(test_rng.integers(0, len(others)))
    solution_rows = []
    for index, image_id in enumerate(test_ids):
        url = f"images/test/{image_id}.jpg"
        if index < counts["test_non_landmarks"]:
            source = scene(seed, _DISTRACTOR_SCENE_BASE + counts["train_distractors"] + index)
            landmark = ""
        else:
            landmark_index = index - counts["test_non_landmarks"]
            if landmark_index < counts["test_hot_class"]:
                position = hot_position
            else:
                position = others[(offset + landmark_index) % len(others)]
            source = scenes.get(position)
            if source is None:
                source = scenes[position] = scene(seed, position)
            landmark = str(landmark_ids[position])
        write(url, view(source, test_rng, min_size, max_size, hard=True))
        solution_rows.append((image_id, url, landmark))

    train_rows.sort()
    solution_rows.sort()
    with open(os.path.join(output_dir, "train.csv"), "w") as handle:
        handle.write(_csv("id,url,landmark_id", train_rows))
    with open(os.path.join(output_dir, "test.csv"), "w") as handle:
        handle.write(_csv("id,url", [(i, u) for i, u, _ in solution_rows]))
    with open(os.path.join(output_dir, "test_solution.csv"), "w") as handle:
        handle.write(_csv("id,landmarks,Usage", [
            (i, landmark, "Public" if n % 2 == 0 else "Private")
            for n, (i, _, landmark) in enumerate(solution_rows)]))
    summary = {
        "counts": counts, "seed": seed, "hot_class": hot_class,
        "hot_landmark_id": landmark_ids[hot_position] if hot_class else None,
        "min_size": min_size, "max_size": max_size,
        "seconds": round(time.monotonic() - start, 3),
    }
    with open(os.path.join(output_dir, "scale_data.json"), "w") as handle:
        json.dump(summary, handle, indent=2, sort_keys=True)
    with open(os.path.join(output_dir, "_SUCCESS"), "w"):
        pass
    return summary


def _parse_bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--num_train", type=int, required=True,
                        help="N, training images (classes N // 8)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hot_class", type=_parse_bool, default=True, metavar="true|false",
                        help="20 %% of the test images show one class (default: true)")
    parser.add_argument("--min_size", type=int, default=96)
    parser.add_argument("--max_size", type=int, default=128)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = generate(args.output_dir, args.num_train, args.seed, args.hot_class,
                       args.min_size, args.max_size)
    logger.info("wrote %s to %s in %.1f s", summary["counts"], args.output_dir,
                summary["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
