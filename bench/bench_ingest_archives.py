"""Benchmark: ``landmarks-ingest --archives`` against ingest from a folder of the same files.

Input: N distinct photo-like JPEGs (random crops of scikit-image's photographs, resized to
1024x768, mild noise, quality 90: about the size of GLDv2's images), written twice:

- folder: extracted as GLDv2 extracts, ``train/a/b/c/<id>.jpg``, ingested with ``--manifest``
  ``train.csv`` (``id,url,landmark_id``, ``url`` relative to the CSV's folder);
- archives: the same files in ``--num_archives`` tar archives in GLDv2's layout
  (``a/b/c/<id>.jpg`` members), ingested with ``--archives`` and the same ``train.csv`` as
  ``--labels_csv`` (GLDv2's ``train.csv`` header is ``id,url,landmark_id``).

Both runs are the real job (``beam_pipelines.ingest.pipeline.run``) on Beam's FnApiRunner with
one worker (one core), same flags (``--max_side 512``, no TFDS metadata), interleaved in rounds
(the machine is shared); the figure is written images over the job's seconds (pipeline start-up
included), i.e. images/s per core. Done when: archives >= folder (ratio >= 1).

Usage: ``.venv/bin/python bench/bench_ingest_archives.py [--images 600] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import statistics
import tarfile
import tempfile
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


def run_once(flags: list[str], output: Path) -> tuple[float, int]:
    stats = pipeline.run([*flags, "--output_dir", str(output), *COMMON])
    return stats["images_per_second"], stats["written"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--num_archives", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory() as temp:
        root = Path(temp)
        images = photos(args.images)
        write_release(root, images, args.num_archives)
        mean_kb = sum(map(len, images)) / len(images) / 1024
        print(f"{args.images} JPEGs of {SIZE[0]}x{SIZE[1]} ({mean_kb:.0f} kB on average), "
              f"{args.num_archives} archives; FnApiRunner, 1 worker; images/s per core")
        paths = {
            "folder (--manifest)": ["--manifest", str(root / "train.csv")],
            "archives (--archives)": ["--archives", str(root / "archives" / "images_*.tar"),
                                      "--labels_csv", str(root / "train.csv")],
        }
        rates: dict[str, list[float]] = {name: [] for name in paths}
        for round_index in range(args.rounds):
            for name, flags in paths.items():
                rate, written = run_once(flags, root / "out")
                assert written == args.images, (name, written)
                rates[name].append(rate)
                print(f"  round {round_index + 1}: {name:24s} {rate:7.1f} images/s")
        best = {name: max(values) for name, values in rates.items()}
        for name, values in rates.items():
            print(f"{name:24s} best {best[name]:7.1f}, median {statistics.median(values):7.1f} "
                  "images/s per core")
        ratio = best["archives (--archives)"] / best["folder (--manifest)"]
        print(f"ratio archives / folder (best rounds): {ratio:.2f}x "
              f"({'met' if ratio >= 1 else 'NOT met'}: target >= 1)")


if __name__ == "__main__":
    main()
