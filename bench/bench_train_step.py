"""CPU training-step rate of the classifier: 1 vs 2 logical replicas, float32 vs bfloat16.

Runs the real training step (``trainer.train.compile_for_phase``: rank-weighted loss, batch
GAP, Adam) of the finetune phase (backbone trainable from layer 85) at the quick preset's size
(96 px, global batch 8) on in-memory random images, so the input pipeline is not measured.
Figures are ratios against the 1-replica float32 baseline of the same run.

    .venv/bin/python bench/bench_train_step.py [--image_size 96] [--batch 8] [--steps 20]

Two logical CPU devices share the same cores: a 2-replica MirroredStrategy on one CPU shows the
cost of the replication machinery (all-reduce, gathered ranking), not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from trainer import config as config_lib  # noqa: E402
from trainer import distribute  # noqa: E402
from trainer import model as model_lib  # noqa: E402
from trainer import train as train_lib  # noqa: E402

NUM_CLASSES = 16


class _StepTimer(keras.callbacks.Callback):
    """Wall time of the batches after ``warmup`` (the first one traces the step function)."""

    def __init__(self, warmup: int):
        super().__init__()
        self.warmup = warmup
        self.started = None
        self.measured_steps = 0
        self.seconds = 0.0

    def on_train_batch_end(self, batch, logs=None):
        if batch + 1 == self.warmup:
            self.started = time.perf_counter()
        elif batch + 1 > self.warmup:
            self.measured_steps += 1
            self.seconds = time.perf_counter() - self.started


def measure(replicas: int, mixed_precision: str, args) -> dict:
    """Images/s of the training step for one setting (fresh model, fresh trace)."""
    flags = ["--train_data", "x", "--label_map", "x", "--model_dir", "x", "--preset", "quick",
             "--image_size", str(args.image_size), "--finetune_batch_size", str(args.batch),
             "--mixed_precision", mixed_precision]
    config = config_lib.config_from_args(flags)
    phase = config.phases[1]
    if replicas == 1:
        strategy = tf.distribute.get_strategy()
    else:
        strategy = tf.distribute.MirroredStrategy([f"/cpu:{i}" for i in range(replicas)])
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (args.batch * 4, args.image_size, args.image_size, 3))
    labels = rng.integers(-1, NUM_CLASSES, args.batch * 4)
    with train_lib.dtype_policy(mixed_precision):
        with strategy.scope():
            model = model_lib.build_model(NUM_CLASSES, image_size=args.image_size)
        train_lib.compile_for_phase(model, phase, config, strategy)

        def per_replica(batch_size, input_context):
            data = tf.data.Dataset.from_tensor_slices(
                (images.astype(np.float32), labels.astype(np.int64)))
            return data.repeat().batch(batch_size, drop_remainder=True)

        dataset = distribute.distribute_dataset(strategy, args.batch, per_replica)
        timer = _StepTimer(args.warmup)
        model.fit(dataset, epochs=1, steps_per_epoch=args.warmup + args.steps, verbose=0,
                  callbacks=[timer], shuffle=False)
    rate = timer.measured_steps * args.batch / timer.seconds
    return {"replicas": replicas, "mixed_precision": mixed_precision,
            "steps": timer.measured_steps, "seconds": round(timer.seconds, 2),
            "images_per_second": round(rate, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image_size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    distribute.ensure_logical_cpus(2)  # before TensorFlow initialises its devices
    settings = [(1, "none"), (2, "none"), (1, "bfloat16"), (2, "bfloat16")]
    results = [measure(replicas, precision, args) for replicas, precision in settings]
    baseline = results[0]["images_per_second"]
    for result in results:
        result["ratio_vs_1_replica_float32"] = round(result["images_per_second"] / baseline, 3)
    print(json.dumps({"image_size": args.image_size, "global_batch": args.batch,
                      "phase": "finetune (from layer 85)", "results": results}, indent=2))


if __name__ == "__main__":
    main()
