"""Crop voting's cost per image against 22 raw single-view forwards (target: overhead < 15%).

Both figures come from the same model in the same process, measured alternately so that load
from other processes on the machine hits both sides alike:

* baseline: ``model_handler.forward_views`` on already-scaled views, batches of
  ``batch_images * 22`` views -> seconds per view ``t_view``; the ideal crop-voting rate is
  ``1 / (22 * t_view)`` images/s;
* full path, as the predict job runs it per batch of ``batch_images`` decoded images: make the
  22 views (``rescoring.crops.make_views``), then ``CropViewsModelHandler.run_inference``
  (concatenate, scale with ``ImageContract``, one forward pass, split back), then
  ``rescoring.voting.vote`` per image -> seconds per image ``t_image``.

``overhead = t_image / (22 * t_view) - 1``. Usage::

    .venv/bin/python bench/bench_crop_voting.py [--image_size 128] [--batch_images 4]
        [--num_classes 1000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402


def _images(count: int, seed: int = 0) -> list[np.ndarray]:
    """Decoded test images of ingest-like sizes (longer side 384), from a bundled photo."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    photo = skimage.data.astronaut()
    images = []
    for _ in range(count):
        top, left = rng.integers(0, 128, size=2)
        crop = photo[top : top + 384, left : left + 384]
        height = int(rng.integers(256, 385))
        images.append(np.asarray(Image.fromarray(crop).resize((384, height), Image.BILINEAR)))
    return images


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=128)
    parser.add_argument("--batch_images", type=int, default=4)
    parser.add_argument("--num_classes", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)

    import keras

    from beam_pipelines.predict import model_handler
    from rescoring import crops, voting
    from trainer import model as model_lib
    from trainer.preprocessing import ImageContract

    size, batch_images = args.image_size, args.batch_images
    spec = crops.CropSpec.for_num_views(22)
    views_per_image = spec.num_views
    keras.utils.set_random_seed(0)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "model.keras")
        model_lib.build_model(args.num_classes, size, backbone_weights="none").save(path)
        handler = model_handler.CropViewsModelHandler(path, size, batch_images)
        model = handler.load_model()  # exactly what a Beam worker loads

    images = _images(batch_images)
    contract = ImageContract(size)
    scaled_views = contract.scale(
        np.concatenate([crops.make_views(image, size, spec) for image in images])
    )

    def baseline() -> float:
        start = time.perf_counter()
        model_handler.forward_views(model, scaled_views)
        return (time.perf_counter() - start) / len(scaled_views)

    def full_path() -> float:
        start = time.perf_counter()
        batch = [crops.make_views(image, size, spec) for image in images]
        results = handler.run_inference(batch, model)
        votes = [voting.vote(result.inference) for result in results]
        assert len(votes) == len(images)
        return (time.perf_counter() - start) / len(images)

    def around_forward() -> float:
        """Everything of the full path except the forward pass, per image."""
        start = time.perf_counter()
        batch = [crops.make_views(image, size, spec) for image in images]
        scaled = contract.scale(np.concatenate(batch))
        fake = np.full([len(scaled), args.num_classes], 0.5, np.float32)
        parts = model_handler.split_per_image(fake, [len(views) for views in batch])
        votes = [voting.vote(part) for part in parts]
        assert len(votes) == len(images)
        return (time.perf_counter() - start) / len(images)

    baseline(), full_path(), around_forward()  # warm-up: tracing, allocator, oneDNN primitives
    per_view, per_image, extra = [], [], []
    for _ in range(args.rounds):
        per_view.append(baseline())
        per_image.append(full_path())
        extra.append(around_forward())
    print(f"Xception {size} px, {args.num_classes} classes, {views_per_image} views/image, "
          f"{batch_images} images ({batch_images * views_per_image} views) per forward pass, "
          f"{args.rounds} alternating rounds; load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs")
    # The best round is the least disturbed by other processes; the median is shown too.
    for name, pick in (("best", min), ("median", statistics.median)):
        t_view, t_image, t_extra = pick(per_view), pick(per_image), pick(extra)
        ideal_rate = 1.0 / (views_per_image * t_view)
        overhead = t_image / (views_per_image * t_view) - 1.0
        print(f"  [{name}] raw forward {1.0 / t_view:7.2f} views/s -> 22 x single view = "
              f"{ideal_rate:6.3f} images/s; crop voting (views + scale + forward + vote) "
              f"{1.0 / t_image:6.3f} images/s; overhead {100 * overhead:+6.2f} %; "
              f"non-forward work alone {1000 * t_extra:6.1f} ms/image = "
              f"{100 * t_extra / (views_per_image * t_view):5.2f} % (target < 15 %)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
