"""Benchmark: the ingest's per-image normalise step vs a naive Pillow baseline, same run.

Input: real photographs from scikit-image (astronaut, coffee, chelsea, rocket) upscaled to
1600x1200 and stored as JPEG (quality 90) - photo-like content, not flat colour.
Output of every path: RGB JPEG (quality 90), longer side 512 px.

- naive: full decode (``Image.open(...).convert("RGB")``), LANCZOS resize, encode: the obvious
  high-quality way, the baseline of the target.
- naive bicubic: the same with Pillow's (antialiased) bicubic resize, shown for transparency:
  part of the gain comes from the cheaper filter, not from the decoder.
- normalise: :func:`beam_pipelines.ingest.normalise.normalise_image`, whose JPEG path decodes at
  reduced scale inside libjpeg (``Image.draft``; 1600x1200 -> 800x600, i.e. >= 1.5x the target
  kept for quality), then a bicubic resize and the encode, plus its guards (format whitelist,
  pixel limit, EXIF orientation).

Quality column: mean absolute difference (grey levels of 255) of each decoded output from a
reference made without compromise (full decode, LANCZOS, not re-encoded); the JPEG encode alone
accounts for most of it.

All paths run single-threaded in this process, interleaved in rounds (the machine is shared),
so the figures are images/s per core; the ratio is what matters. Target: normalise >= 3x naive.

Usage: ``.venv/bin/python bench/bench_normalise.py [--rounds 5] [--repeats 4]``
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
from PIL import Image
from skimage import data as skimage_data

from beam_pipelines.ingest.normalise import NormaliseParams, normalise_image

SOURCE_SIZE = (1600, 1200)
MAX_SIDE = 512


def photo_jpegs() -> list[bytes]:
    """Real photographs upscaled to 1600x1200, JPEG quality 90."""
    photos = [skimage_data.astronaut(), skimage_data.coffee(), skimage_data.chelsea(),
              skimage_data.rocket()]
    encoded = []
    for pixels in photos:
        image = Image.fromarray(pixels).convert("RGB").resize(SOURCE_SIZE,
                                                              Image.Resampling.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        encoded.append(buffer.getvalue())
    return encoded


def _full_decode_resize(data: bytes, resample, max_side: int = MAX_SIDE) -> Image.Image:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    scale = max_side / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, resample)


def _encode(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def naive_normalise(data: bytes) -> bytes:
    """Baseline: full decode, then LANCZOS resize, then encode."""
    return _encode(_full_decode_resize(data, Image.Resampling.LANCZOS))


def naive_bicubic(data: bytes) -> bytes:
    """Baseline with the cheaper filter: full decode, bicubic resize, encode."""
    return _encode(_full_decode_resize(data, Image.Resampling.BICUBIC))


def timed(function, inputs: list[bytes], repeats: int) -> tuple[float, float]:
    """(images per wall second, images per CPU second) of ``function`` over ``inputs``."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(repeats):
        for data in inputs:
            function(data)
    count = repeats * len(inputs)
    return count / (time.perf_counter() - wall), count / (time.process_time() - cpu)


def error_from_reference(function, inputs: list[bytes]) -> float:
    """Mean |output - reference| in grey levels, reference = full decode + LANCZOS, no encode."""
    errors = []
    for data in inputs:
        reference = np.asarray(_full_decode_resize(data, Image.Resampling.LANCZOS), np.float64)
        output = np.asarray(Image.open(io.BytesIO(function(data))).convert("RGB"), np.float64)
        errors.append(np.abs(output - reference).mean())
    return float(np.mean(errors))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=4, help="passes over the photos per round")
    args = parser.parse_args(argv)

    inputs = photo_jpegs()
    params = NormaliseParams(max_side=MAX_SIDE)

    def ours(data: bytes) -> bytes:
        return normalise_image(data, params).jpeg_bytes

    paths = {"naive": naive_normalise, "naive bicubic": naive_bicubic, "normalise": ours}
    for function in paths.values():
        function(inputs[0])  # warm-up
    results = {name: [] for name in paths}
    for _ in range(args.rounds):
        for name, function in paths.items():
            results[name].append(timed(function, inputs, args.repeats))

    def median(name: str, index: int) -> float:
        return statistics.median(result[index] for result in results[name])

    count = args.rounds * args.repeats * len(inputs)
    widths = sorted({normalise_image(d, params).width for d in inputs})
    print(f"normalise benchmark: {len(inputs)} photos {SOURCE_SIZE[0]}x{SOURCE_SIZE[1]} JPEG -> "
          f"{MAX_SIDE} px JPEG (widths {widths}), {count} images per path, 1 thread, "
          f"median of {args.rounds} rounds")
    print(f"{'path':<15}{'img/s wall':>12}{'img/s per CPU s':>17}{'vs naive':>10}"
          f"{'vs bicubic':>12}{'error':>8}")
    for name, function in paths.items():
        print(f"{name:<15}{median(name, 0):>12.1f}{median(name, 1):>17.1f}"
              f"{median(name, 1) / median('naive', 1):>9.2f}x"
              f"{median(name, 1) / median('naive bicubic', 1):>11.2f}x"
              f"{error_from_reference(function, inputs):>8.2f}")
    print("target: normalise >= 3x naive per core; error = mean |output - reference| "
          "(grey levels)")

if __name__ == "__main__":
    main()
