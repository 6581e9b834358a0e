"""Input-pipeline throughput, images/s per core, augmentation vs a decode+resize baseline.

Writes synthetic photo-like JPEG records (``--record_side`` longer side, 3:4 aspect, quality 90)
to a temporary folder, then runs :func:`trainer.data.make_dataset` in several modes on the same
records, in the same process, and prints images/s and the ratio to the baseline.

Pinned to ``--cores`` cores (default 1) three ways: the process's CPU affinity
(``os.sched_setaffinity``, what ``taskset`` does; set before TensorFlow starts its threads),
``tf.config.threading`` intra/inter-op threads, and tf.data's private thread pool size.

Target (issue): >= 500 images/s per core at 299 px from 512 px records with augmentation.

Split mode (``make_dataset(augment_on_device=True)``, the default): the rows "split mode, host
part" time the host pipeline alone (decode, crop window, resize, scale, noise); the row
"device layer" times :class:`trainer.augment.DeviceAugmentation` (the batched warp + channel
shift that runs on the accelerator in training) on this CPU, per image, for reference. The
"resize quality" line compares the host's two resizes on the same crops (plain bilinear vs the
contract's antialiased one): mean absolute difference and PSNR in [0, 255] pixel units.

Command::

    .venv/bin/python bench/bench_input_pipeline.py            # 1 core, 299 px, 512 px records
    .venv/bin/python bench/bench_input_pipeline.py --images 2048 --cores 2
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time


def _pin(cores: int) -> list[int]:
    allowed = sorted(os.sched_getaffinity(0))
    chosen = allowed[:cores]
    os.sched_setaffinity(0, chosen)
    return chosen


def _photo_like(rng, height, width):
    """Smooth colour blobs plus fine texture: compresses like a photo (~60 KB at 512 x 384, quality 90)."""
    import numpy as np
    import tensorflow as tf

    coarse = rng.integers(0, 256, (height // 32, width // 32, 3)).astype(np.float32)
    smooth = tf.image.resize(coarse, (height, width), method="bicubic").numpy()
    texture = rng.normal(0, 8, (height, width, 3))
    return np.clip(smooth + texture, 0, 255).astype(np.uint8)


def _write_records(folder, count, side, seed=0):
    import numpy as np
    import tensorflow as tf

    from tfrecords_schema import image_record

    rng = np.random.default_rng(seed)
    height, width = side * 3 // 4, side

    def records():
        for index in range(count):
            image = _photo_like(rng, height, width)
            yield image_record.ImageRecord(
                image_id=f"bench{index:05d}",
                jpeg_bytes=tf.io.encode_jpeg(image, quality=90).numpy(),
                label=index % 50, height=height, width=width)

    paths = image_record.write_shards(records(), os.path.join(folder, "train"), num_shards=4)
    kilobytes = sum(os.path.getsize(path) for path in paths) / count / 1024
    return os.path.join(folder, "train-*.tfrecord"), kilobytes


def _measure(dataset, images, batch_size, threads):
    import tensorflow as tf

    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    iterator = iter(dataset.with_options(options))
    for _ in range(3):  # warm-up: tracing, autotune, page cache
        next(iterator)
    batches = max(1, images // batch_size)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return batches * batch_size / wall, batches * batch_size / cpu


def _reference_pipeline(pattern, size, batch_size):
    """The "decode+crop+flip" rate (~650-775 img/s per core measured earlier on these CPUs): a
    random S x S window cut while decoding, a random flip, scaling; no resize and no warp.
    Calibrates this machine."""
    import tensorflow as tf

    from tfrecords_schema import image_record
    from trainer.preprocessing import ImageContract

    contract = ImageContract(size)

    def crop_flip(serialized):
        jpeg = image_record.parse_tensors(serialized)["jpeg_bytes"]
        shape = tf.io.extract_jpeg_shape(jpeg)
        y = tf.random.uniform([], 0, shape[0] - size + 1, dtype=tf.int32)
        x = tf.random.uniform([], 0, shape[1] - size + 1, dtype=tf.int32)
        image = tf.io.decode_and_crop_jpeg(jpeg, tf.stack([y, x, size, size]), channels=3)
        return contract.scale(tf.image.random_flip_left_right(image))

    files = tf.data.Dataset.from_tensor_slices(sorted(tf.io.gfile.glob(pattern)))
    return (files.interleave(tf.data.TFRecordDataset, num_parallel_calls=tf.data.AUTOTUNE)
            .repeat().map(crop_flip, num_parallel_calls=tf.data.AUTOTUNE)
            .batch(batch_size).prefetch(tf.data.AUTOTUNE))


def _measure_device_layer(size, batch_size, images):
    """CPU cost of DeviceAugmentation (training=True) per image, batched, in a tf.function."""
    import numpy as np
    import tensorflow as tf

    from trainer import augment

    layer = augment.DeviceAugmentation(augment.AugmentParams())
    rng = np.random.default_rng(0)
    inputs = {
        augment.IMAGES: tf.constant(rng.uniform(-1, 1, (batch_size, size, size, 3)), tf.float32),
        augment.CROP_BRANCH: tf.constant(np.arange(batch_size) % 2 == 0),
        augment.NOISE: tf.constant(rng.uniform(0, 1, (batch_size, augment.NOISE_SIZE)), tf.float32),
    }
    step = tf.function(lambda features: layer(features, training=True))
    for _ in range(2):
        step(inputs).numpy()
    batches = max(1, images // batch_size)
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(batches):
        step(inputs).numpy()
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    return batches * batch_size / wall, batches * batch_size / cpu


def _resize_quality(pattern, size, count=64):
    """Plain bilinear vs antialiased resize of the same crop windows: (mean |diff|, PSNR dB)."""
    import numpy as np
    import tensorflow as tf

    from tfrecords_schema import image_record
    from trainer import augment
    from trainer.preprocessing import ImageContract

    contract, params = ImageContract(size), augment.AugmentParams()
    files = sorted(tf.io.gfile.glob(pattern))
    errors = []
    for index, serialized in enumerate(tf.data.TFRecordDataset(files).take(count)):
        jpeg = image_record.parse_tensors(serialized)["jpeg_bytes"]
        decoded = tf.io.decode_jpeg(jpeg, channels=3)
        if index % 2:  # half crop windows (as the crop branch), half whole images
            seed = tf.constant([index, 7], tf.int64)
            y, x, h, w = augment.crop_window(seed, tf.shape(decoded)[0], tf.shape(decoded)[1],
                                             params).numpy()
            decoded = decoded[y:y + h, x:x + w]
        exact = augment.host_resize(decoded, size, contract, antialias=True)
        plain = augment.host_resize(decoded, size, contract, antialias=False)
        errors.append((plain - exact).numpy().ravel())
    errors = np.concatenate(errors)
    mse = float(np.mean(errors**2))
    return float(np.mean(np.abs(errors))), 10 * np.log10(255.0**2 / mse)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=768, help="images timed per mode")
    parser.add_argument("--records", type=int, default=256, help="records written (repeated)")
    parser.add_argument("--record_side", type=int, default=512, help="longer side of records, px")
    parser.add_argument("--image_size", type=int, default=299, help="model input side S, px")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--cores", type=int, default=1)
    args = parser.parse_args(argv)

    cpus = _pin(args.cores)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.cores)
    tf.config.threading.set_inter_op_parallelism_threads(args.cores)

    from trainer import data
    from trainer.augment import AugmentParams, BranchParams
    from trainer.preprocessing import ImageContract

    contract = ImageContract(args.image_size)
    modes = [
        ("baseline: decode + resize + scale (eval)", None),
        ("reference: decode_and_crop SxS + flip, no resize", "reference"),
        ("decode_and_crop + resize + flip", AugmentParams(
            crop_probability=1.0, crop_branch=BranchParams(horizontal_flip=True))),
        ("recipe augmentation (default: aa resize+warp)", AugmentParams()),
        ("recipe, resize folded into the warp", AugmentParams(antialias=False)),
        ("recipe, folded + nearest sampling", AugmentParams(antialias=False, interpolation="nearest")),
        ("split mode, host part (aa resize)", ("device", AugmentParams())),
        ("split mode, host part (plain bilinear resize)", ("device", AugmentParams(antialias=False))),
    ]
    with tempfile.TemporaryDirectory() as folder:
        pattern, kilobytes = _write_records(folder, args.records, args.record_side)
        rows = []
        for name, params in modes:
            if name.startswith("reference"):
                dataset = _reference_pipeline(pattern, args.image_size, args.batch_size)
                rows.append((name, _measure(dataset, args.images, args.batch_size, args.cores)))
                continue
            on_device = isinstance(params, tuple)
            if on_device:
                params = params[1]
            dataset = data.make_dataset(
                pattern, contract=contract, batch_size=args.batch_size, training=params is not None,
                augment=params, seed=0, repeat=True, shuffle_buffer=64,
                augment_on_device=on_device)
            if params is None:
                dataset = data.make_dataset(  # eval mode does not repeat by itself
                    pattern, contract=contract, batch_size=args.batch_size, training=False,
                    repeat=True)
            rows.append((name, _measure(dataset, args.images, args.batch_size, args.cores)))
        mean_difference, psnr = _resize_quality(pattern, args.image_size)
        rows.append((f"device layer (warp + shift, batch {args.batch_size}, this CPU)",
                     _measure_device_layer(args.image_size, args.batch_size, args.images)))

    baseline_wall, baseline_cpu = rows[0][1]
    print(f"input pipeline, {args.record_side} px records ({kilobytes:.0f} KB each) -> "
          f"{args.image_size} px, batch "
          f"{args.batch_size}, {args.images} images per mode, pinned to CPU(s) {cpus} "
          f"(sched_setaffinity + tf.config.threading + tf.data private pool = {args.cores}); "
          f"load average before: {os.getloadavg()[0]:.1f}")
    print("images/s per core: wall clock / cores, and images per CPU-second of this process "
          "(robust when other processes share the core)")
    print(f"{'mode':46s} {'wall/core':>9s} {'ratio':>6s} {'per CPU-s':>9s} {'ratio':>6s}")
    for name, (wall, cpu) in rows:
        print(f"{name:46s} {wall / args.cores:9.0f} {wall / baseline_wall:5.2f}x "
              f"{cpu:9.0f} {cpu / baseline_cpu:5.2f}x")
    print(f"resize quality, plain bilinear vs antialiased (split-mode host resize): mean |diff| "
          f"{mean_difference:.2f} of 255, PSNR {psnr:.1f} dB")


if __name__ == "__main__":
    main()
