"""Benchmark: ``landmarks-ingest --archives`` against ingest from a folder of the same files.

Input: N distinct photo-like JPEGs (random crops of scikit-image's photographs, resized to
1024x768, mild noise, quality 90: about the size of GLDv2's images), written twice:

- folder: extracted as GLDv2 extracts, ``train/a/b/c/<id>.jpg``, ingested with ``--manifest``
  ``train.csv`` (``id,url,landmark_id``, ``url`` relative to the CSV's folder);
- archives: the same files in ``--num_archives`` tar archives in GLDv2's layout
  (``a/b/c/<id>.jpg`` members), ingested with ``--archives`` and the same ``train.csv`` as
  ``--labels_csv`` (GLDv2's ``train.csv`` header is ``id,url,landmark_id``).

Both runs are the real job (``beam_pipelines.ingest.pipeline.run``) on Beam's FnApiRunner with
one worker, in this process, same flags (``--max_side 512``, no TFDS metadata), interleaved in
rounds. Each path runs on a small and a large set (``--small``, ``--images``), and the figures are
per core from this process's CPU time (``time.process_time``: every thread of the in-process
runner; the wall clock of a shared machine says more about the neighbours than about the job):

- end to end: large-set images / CPU seconds of the whole run (pipeline construction and
  start-up included, which the archive path's larger graph makes dearer);
- per image (the steady state, what a 4.1M-image run sees): (large - small images) / (large -
  small CPU seconds), the fixed cost of a run cancelled out; from the best round of each run,
  and, as a second estimate, the median over rounds of the ratio within each round (the order
  of the two inputs alternates from round to round).

Done when: archives >= folder per image (ratio >= 1). Wall-clock images/s are printed too.
Both inputs do the same decoding work per image, so the ratio is decided by what surrounds it
(the folder input opens a file per image; the archive input joins ids and reads members by
offset) and sits within the machine's noise of 1: use 8 rounds or more.

``--spread``: instead, whether one archive's decoding is spread over workers: the large set in
ONE archive, ingested on the local runner with 2 worker processes (``--direct_num_workers 2
--direct_running_mode multi_processing``) with ``--archive_parts 1`` (one worker decodes it all)
and with the default (``ceil(2 workers / 1 archive)`` = 2 byte ranges); wall seconds, best of the
rounds. Expected: about 2x on 2 idle cores, less the runner's fixed start-up.

Usage: ``.venv/bin/python bench/bench_ingest_archives.py [--images 600] [--small 150]
[--rounds 6] [--spread]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data as skimage_data

from beam_pipelines.ingest import pipeline

SIZE = (1024, 768)
COMMON = ["--max_side", "512", "--num_shards", "2", "--no_tfds_metadata", "--overwrite",
          "--runner=FnApiRunner"]


def photos(count: int, seed: int = 0) -> list[bytes]:
    """``count`` distinct JPEGs: random crops of four photographs, resized, with noise."""
    sources = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(),
               skimage_data.rocket()]
    rng = np.random.default_rng(seed)
    encoded = []
    for index in range(count):
        pixels = sources[index % len(sources)]
        height, width = pixels.shape[:2]
        top, left = rng.integers(0, height // 4), rng.integers(0, width // 4)
        crop = pixels[top: top + 3 * height // 4, left: left + 3 * width // 4]
        image = Image.fromarray(crop).convert("RGB").resize(SIZE, Image.Resampling.BICUBIC)
        noisy = np.asarray(image, np.float32) + rng.normal(0, 3, (SIZE[1], SIZE[0], 3))
        buffer = io.BytesIO()
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG",
                                                                       quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def write_release(root: Path, images: list[bytes], num_archives: int) -> None:
    """``train/a/b/c/<id>.jpg`` files, ``archives/images_NNN.tar`` and ``train.csv``."""
    ids = [hashlib.sha1(str(n).encode()).hexdigest()[:16] for n in range(len(images))]
    names = [f"{i[0]}/{i[1]}/{i[2]}/{i}.jpg" for i in ids]
    rows = ["id,url,landmark_id"]
    for position, (image_id, name, data) in enumerate(zip(ids, names, images)):
        path = root / "train" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        rows.append(f"{image_id},train/{name},{position % 20}")
    (root / "train.csv").write_text("\n".join(rows) + "\n")
    (root / "archives").mkdir()
    for archive in range(num_archives):
        with tarfile.open(root / "archives" / f"images_{archive:03d}.tar", "w") as tar:
            for name, data in list(zip(names, images))[archive::num_archives]:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def run_once(flags: list[str], output: Path) -> tuple[float, float, int]:
    """(CPU seconds, wall seconds, images written) of one ingest."""
    cpu, wall = time.process_time(), time.monotonic()
    stats = pipeline.run([*flags, "--output_dir", str(output), *COMMON])
    return time.process_time() - cpu, time.monotonic() - wall, stats["written"]


def spread_check(images: list[bytes], rounds: int) -> None:
    """One archive, 2 worker processes: ``--archive_parts 1`` against the default (2 parts)."""
    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        write_release(root, images, 1)
        flags = ["--archives", str(root / "archives" / "images_*.tar"), "--labels_csv",
                 str(root / "train.csv"), "--direct_num_workers=2",
                 "--direct_running_mode=multi_processing"]
        walls: dict = {"1 part": [], "default (2 parts)": []}
        for round_index in range(rounds):
            for name, extra in (("1 part", ["--archive_parts", "1"]), ("default (2 parts)", [])):
                start = time.monotonic()
                stats = pipeline.run([*flags, *extra, "--output_dir", str(root / "out"),
                                      *COMMON[:-1]])
                walls[name].append(time.monotonic() - start)
                assert stats["written"] == len(images), stats["written"]
                print(f"  round {round_index + 1}: {name:18s} wall {walls[name][-1]:6.1f} s")
        best = {name: min(values) for name, values in walls.items()}
        one, two = best["1 part"], best["default (2 parts)"]
        print(f"one archive of {len(images)} images, 2 worker processes: 1 part {one:.1f} s, "
              f"default {two:.1f} s (best of {rounds}): {one / two:.2f}x faster with the default")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--small", type=int, default=150)
    parser.add_argument("--num_archives", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--spread", action="store_true",
                        help="measure the spread of one archive over 2 worker processes instead")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.spread:
        spread_check(photos(args.images), args.rounds)
        return

    with tempfile.TemporaryDirectory() as temp:
        images = photos(args.images)
        roots = {}
        for size in (args.small, args.images):
            roots[size] = Path(temp) / str(size)
            roots[size].mkdir()
            write_release(roots[size], images[:size], args.num_archives)
        mean_kb = sum(map(len, images)) / len(images) / 1024
        print(f"{args.small} and {args.images} JPEGs of {SIZE[0]}x{SIZE[1]} ({mean_kb:.0f} kB "
              f"on average), {args.num_archives} archives; FnApiRunner, 1 worker")

        def flags(name: str, root: Path) -> list[str]:
            if name == "folder":
                return ["--manifest", str(root / "train.csv")]
            return ["--archives", str(root / "archives" / "images_*.tar"),
                    "--labels_csv", str(root / "train.csv")]

        cpu: dict = {(name, size): [] for name in ("folder", "archives") for size in roots}
        for round_index in range(args.rounds):
            for size, root in roots.items():
                # Which input runs first alternates, so neither always meets a warmer cache.
                for name in ("folder", "archives")[::1 if round_index % 2 == 0 else -1]:
                    seconds, wall, written = run_once(flags(name, root), root / "out")
                    assert written == size, (name, size, written)
                    cpu[name, size].append(seconds)
                    print(f"  round {round_index + 1}: {name:8s} {size:5d} images: CPU "
                          f"{seconds:6.1f} s, wall {wall:6.1f} s ({size / wall:5.1f} images/s)")
        best = {key: min(values) for key, values in cpu.items()}
        per_image = {}
        for name in ("folder", "archives"):
            end_to_end = args.images / best[name, args.images]
            per_image[name] = (args.images - args.small) / (
                best[name, args.images] - best[name, args.small])
            print(f"{name:8s} images/s per core: end to end {end_to_end:6.1f}, per image "
                  f"(steady state) {per_image[name]:6.1f}  (best rounds)")
        ratio = per_image["archives"] / per_image["folder"]
        # The same per-image ratio within each round (both inputs measured minutes apart at
        # most), and its median: a second estimate, less exposed to one lucky round.
        paired = sorted(
            (cpu["folder", args.images][r] - cpu["folder", args.small][r])
            / (cpu["archives", args.images][r] - cpu["archives", args.small][r])
            for r in range(args.rounds))
        print(f"per-round ratios archives / folder, per image: "
              f"{', '.join(f'{value:.2f}' for value in paired)}; median "
              f"{statistics.median(paired):.2f}x")
        print(f"ratio archives / folder, per image: {ratio:.2f}x "
              f"({'met' if ratio >= 1 else 'NOT met'}: target >= 1); end to end: "
              f"{best['folder', args.images] / best['archives', args.images]:.2f}x")


if __name__ == "__main__":
    main()
