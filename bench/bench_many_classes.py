"""The trainer with many classes: size, memory, step time and all-reduce volume per head.

For each (head, classes) pair (default: the recipe's ``sigmoid`` head and ``subcenter_arcface``
with K = 3, at 1,000, 20,000 and 203,094 classes, GLDv2's train label map) one fresh process
builds the classifier at a tiny image size (71 px, random backbone), trains a few steps of the
quick preset's finetune phase (backbone trainable from layer 85, Adam, global batch 8) on
in-memory random images, saves the two checkpoint kinds the trainer writes and reports, each
next to its closed-form value:

- parameters: ``model.count_params()`` vs ``trainer.model.parameter_count`` (Xception without
  top + GeM p + the head's formula, ``trainer.heads.Head.parameter_counts``);
- checkpoint sizes on disk: ``checkpoints/*.weights.h5`` (weights only, what
  ``trainer.train.save_classifier_weights`` writes) vs 4 bytes x parameters, and the
  ``BackupAndRestore`` file (``model.save_weights`` of the compiled model: weights + Adam's two
  slots per trainable weight + its step counter and learning rate) vs 4 bytes x (parameters +
  optimizer variables); the difference is HDF5's overhead, constant in the class count;
- peak resident memory of the process (``ru_maxrss``) and the median step time after the first
  (which traces the step function);
- bytes all-reduced per step under MirroredStrategy: the float32 gradient of every trainable
  weight of the phase (dense), analytic, for the head phase (backbone frozen), the finetune
  phase (from layer 85) and the deep phase (from 25).

The driver then runs, per head and again in its own process, one real ``fit`` step at a small
class count under a 2-logical-CPU MirroredStrategy and records what Keras hands to the
cross-replica all-reduce (``optimizer._all_reduce_sum_gradients``, on this instance, at trace
time): every gradient's type (a dense tensor or ``IndexedSlices``) and size, next to the dense
closed form.

Usage (one configuration per process, sequentially; results in runs/scale/many_classes.*)::

    .venv/bin/python bench/bench_many_classes.py [--classes 1000,20000,203094]
        [--heads sigmoid,subcenter_arcface] [--steps 5] [--output_dir runs/scale]
    # landmarks-train itself with a label map of N classes and tiny records whose labels are
    # spread over the range, under GNU time (runs/scale/many_classes_cli_N_HEAD.json):
    .venv/bin/python bench/bench_many_classes.py --cli 203094 [--heads ...] [--min_free_gb 16
        --wait_for_memory 1800]
    # the GLDv2 projection (closed forms; assumptions are named constants below):
    .venv/bin/python bench/bench_many_classes.py --project

Memory: the 203,094-class sigmoid configuration peaked at 15.2 GB here (sub-center ArcFace
11.9 GB; docs/SCALE.md); a configuration above 100,000 classes is skipped (and said so) unless
``MemAvailable`` is at least ``--min_free_gb``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOAT32 = 4
GIB = 2**30


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def _config(head: str, image_size: int, batch: int):
    from trainer import config as config_lib

    flags = ["--train_data", "x", "--label_map", "x", "--model_dir", "x", "--preset", "quick",
             "--image_size", str(image_size), "--finetune_batch_size", str(batch),
             "--head_batch_size", str(batch), "--head", head]
    return config_lib.config_from_args(flags)


def _backbone_trainable(model, first_index) -> int:
    """Trainable backbone weights when training from ``first_index`` (BatchNorm stays frozen)."""
    import keras

    if first_index is None:
        return 0
    backbone = model.get_layer("xception")
    return sum(
        int(weight.shape.num_elements() if hasattr(weight.shape, "num_elements")
            else _size(weight.shape))
        for layer in backbone.layers[first_index:]
        if not isinstance(layer, keras.layers.BatchNormalization)
        for weight in layer.weights
    )


def _size(shape) -> int:
    size = 1
    for dimension in shape:
        size *= int(dimension)
    return size


def _fit_dataset(strategy, config, num_classes: int, batch: int, steps: int):
    import numpy as np
    import tensorflow as tf

    from trainer import distribute

    rng = np.random.default_rng(0)
    size = config.data.image_size
    images = rng.uniform(-1, 1, (batch * 2, size, size, 3)).astype(np.float32)
    labels = rng.integers(-1, num_classes, batch * 2).astype(np.int64)

    def per_replica(batch_size, input_context):
        data = tf.data.Dataset.from_tensor_slices((images, labels))
        return data.repeat().batch(batch_size, drop_remainder=True)

    return distribute.distribute_dataset(strategy, batch, per_replica)


# The order of measure_one's figures (one JSON object per configuration).
MEASURED_FIGURES = (
    "head", "classes", "image_size", "global_batch", "params", "params_analytic",
    "head_params_analytic", "backbone_params_analytic", "trainable_finetune",
    "trainable_finetune_analytic", "optimizer_variables", "weights_file_bytes",
    "weights_file_bytes_analytic", "backup_file_bytes", "backup_file_bytes_analytic",
    "weights_file_seconds", "backup_file_seconds", "build_seconds", "first_step_seconds",
    "step_seconds_median", "steps", "rss_after_build_bytes", "rss_after_fit_bytes",
    "rss_peak_bytes", "allreduce_bytes_analytic", "backbone_trainable",
)


def measure_one(head_name: str, num_classes: int, image_size: int, batch: int, steps: int,
                scratch: str) -> dict:
    """One configuration in this process (module docstring); returns the figures."""
    import tensorflow as tf

    from trainer import heads as heads_lib

    config = _config(head_name, image_size, batch)
    head = heads_lib.make_head(config.model)
    strategy = tf.distribute.get_strategy()
    model, figures = _build_timed(num_classes, image_size, head)
    figures.update(_parameter_figures(model, num_classes, head))
    training_model, fit_figures = _fit_timed(model, config, head, strategy, num_classes, batch,
                                             steps)
    figures.update(fit_figures)
    figures.update(_checkpoint_figures(model, training_model, scratch))
    figures.update(head=head_name, classes=num_classes, image_size=image_size,
                   global_batch=batch, steps=steps, rss_peak_bytes=_rss_peak_bytes())
    return {key: figures[key] for key in MEASURED_FIGURES}


def _build_timed(num_classes: int, image_size: int, head):
    """The classifier, and the seconds its build took and the peak memory after it."""
    from trainer import model as model_lib

    started = time.perf_counter()
    model = model_lib.build_model(num_classes, image_size=image_size, head=head)
    return model, {"build_seconds": round(time.perf_counter() - started, 2),
                   "rss_after_build_bytes": _rss_peak_bytes()}


def _parameter_figures(model, num_classes: int, head) -> dict:
    """Parameters counted in the model next to their closed forms, and the closed-form sizes
    of the checkpoint files and of each phase's all-reduce (module docstring)."""
    from trainer import model as model_lib

    params_analytic = model_lib.parameter_count(num_classes, head)
    head_all, head_trainable = head.parameter_counts(num_classes)
    backbone_trainable = {name: _backbone_trainable(model, trainable_from)
                          for name, trainable_from in (("head", None), ("finetune", 85),
                                                       ("deep", 25))}
    finetune_trainable = backbone_trainable["finetune"] + 1 + head_trainable  # + GeM's p
    return {
        "params": int(model.count_params()),
        "params_analytic": params_analytic,
        "head_params_analytic": head_all,
        "backbone_params_analytic": model_lib.XCEPTION_NO_TOP_PARAMS,
        "trainable_finetune_analytic": finetune_trainable,
        "weights_file_bytes_analytic": FLOAT32 * params_analytic,
        # Adam: two slots per trainable weight, + its iterations and learning rate.
        "backup_file_bytes_analytic": FLOAT32 * (params_analytic + 2 * finetune_trainable + 2),
        "allreduce_bytes_analytic": {name: FLOAT32 * (count + 1 + head_trainable)
                                     for name, count in backbone_trainable.items()},
        "backbone_trainable": backbone_trainable,
    }


def _fit_timed(model, config, head, strategy, num_classes: int, batch: int, steps: int):
    """``steps`` steps of the finetune phase on random images: the compiled model, and the
    trainable weights, optimizer variables, step times and peak memory after the fit."""
    import keras
    import numpy as np

    from trainer import train as train_lib

    class_counts = np.ones(num_classes, np.int64) if head.uses_class_counts else None
    phase = {p.name: p for p in config.phases}["finetune"]
    training_model = train_lib.compile_for_phase(model, phase, config, strategy,
                                                 class_counts=class_counts)
    trainable_measured = sum(_size(weight.shape) for weight in training_model.trainable_weights)
    step_ends = []

    class Timer(keras.callbacks.Callback):
        def on_train_batch_end(self, batch_index, logs=None):
            step_ends.append(time.perf_counter())

    dataset = _fit_dataset(strategy, config, num_classes, batch, steps)
    fit_started = time.perf_counter()
    training_model.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=0,
                       callbacks=[Timer()], shuffle=False)
    durations = np.diff([fit_started] + step_ends)
    return training_model, {
        "trainable_finetune": trainable_measured,
        "rss_after_fit_bytes": _rss_peak_bytes(),
        "optimizer_variables": sum(_size(v.shape) for v in training_model.optimizer.variables),
        "first_step_seconds": round(float(durations[0]), 2),
        "step_seconds_median": round(float(statistics.median(durations[1:])), 3),
    }


def _checkpoint_figures(model, training_model, scratch: str) -> dict:
    """Size and write time of the two checkpoint kinds the trainer writes (files removed)."""
    from trainer import train as train_lib

    weights_seconds, weights_bytes = _timed_file(
        lambda path: train_lib.save_classifier_weights(model, path),
        os.path.join(scratch, "classifier.weights.h5"))
    backup_seconds, backup_bytes = _timed_file(
        training_model.save_weights,  # what BackupAndRestore writes
        os.path.join(scratch, "backup.weights.h5"))
    return {"weights_file_bytes": weights_bytes, "backup_file_bytes": backup_bytes,
            "weights_file_seconds": round(weights_seconds, 2),
            "backup_file_seconds": round(backup_seconds, 2)}


def _timed_file(save, path: str) -> tuple[float, int]:
    """``save(path)``'s seconds and the bytes of the file it wrote, which is then removed."""
    started = time.perf_counter()
    save(path)
    seconds = time.perf_counter() - started
    size = os.path.getsize(path)
    os.remove(path)
    return seconds, size


def inspect_gradients(head_name: str, num_classes: int, image_size: int, batch: int) -> dict:
    """One ``fit`` step of ``head_name`` on a 2-replica MirroredStrategy (2 logical CPUs); what
    Keras passes to the cross-replica all-reduce (module docstring). One head per process: two
    strategies in one process clash in their collective instance keys."""
    from trainer import distribute

    distribute.ensure_logical_cpus(2)  # before TensorFlow initialises its devices
    import numpy as np
    import tensorflow as tf

    from trainer import heads as heads_lib
    from trainer import model as model_lib
    from trainer import train as train_lib

    config = _config(head_name, image_size, batch)
    head = heads_lib.make_head(config.model)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        model = model_lib.build_model(num_classes, image_size=image_size, head=head)
    class_counts = np.ones(num_classes, np.int64) if head.uses_class_counts else None
    phase = {p.name: p for p in config.phases}["finetune"]
    training_model = train_lib.compile_for_phase(model, phase, config, strategy,
                                                 class_counts=class_counts)
    seen = []
    optimizer = training_model.optimizer
    original = optimizer._all_reduce_sum_gradients  # Keras 3.15, tensorflow backend

    def recording(grads_and_vars, original=original, seen=seen):
        grads_and_vars = list(grads_and_vars)
        seen.append([(type(grad).__name__, _size(grad.shape) if grad is not None else 0,
                      getattr(var, "name", "?")) for grad, var in grads_and_vars])
        return original(grads_and_vars)

    optimizer._all_reduce_sum_gradients = recording  # this instance only
    dataset = _fit_dataset(strategy, config, num_classes, batch, 1)
    training_model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    if not seen:
        raise RuntimeError("the all-reduce path was not taken: Keras changed?")
    grads = seen[0]  # one trace per replica; all replicas see the same structure
    types = sorted({kind for kind, _, _ in grads})
    _, head_trainable = head.parameter_counts(num_classes)
    backbone = _backbone_trainable(model, 85)
    return {
        "head": head_name,
        "classes": num_classes,
        "replicas": strategy.num_replicas_in_sync,
        "gradients": len(grads),
        "gradient_types": types,
        "indexed_slices": sum(kind == "IndexedSlices" for kind, _, _ in grads),
        "allreduce_bytes_measured": FLOAT32 * sum(size for _, size, _ in grads),
        "allreduce_bytes_analytic": FLOAT32 * (backbone + 1 + head_trainable),
        "largest": max(grads, key=lambda item: item[1])[2],
    }


# ---------------------------------------------------------------------------------------------
# The real CLI (landmarks-train) with a label map of many classes and a handful of records.


def write_cli_data(folder: str, num_classes: int, seed: int = 0) -> dict:
    """A label map of ``num_classes`` ids (``10 i + 7``) and tiny train/dev records whose labels
    are spread over the whole range (6 classes from 0 to C - 1, plus non-landmarks), 80 px."""
    import io

    import numpy as np
    from PIL import Image

    from tfrecords_schema import image_record
    from tfrecords_schema import label_map as label_map_lib

    os.makedirs(folder, exist_ok=True)
    landmark_ids = [10 * index + 7 for index in range(num_classes)]
    label_map_path = os.path.join(folder, "label_map.csv")
    label_map_lib.write_label_map(label_map_lib.LabelMap(tuple(landmark_ids)), label_map_path)
    used = sorted({int(v) for v in np.linspace(0, num_classes - 1, 6).round()})
    rng = np.random.default_rng(seed)

    def records(split, per_class, non_landmarks):
        labels = [label for label in used for _ in range(per_class)] + [-1] * non_landmarks
        for index, label in enumerate(labels):
            pixels = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=85)
            yield image_record.ImageRecord(
                image_id=f"{split}-{index:05d}", jpeg_bytes=buffer.getvalue(), label=label,
                height=80, width=80,
                landmark_id=landmark_ids[label] if label >= 0 else -1)

    image_record.write_shards(records("train", 3, 6), os.path.join(folder, "train"), 2)
    image_record.write_shards(records("dev", 1, 2), os.path.join(folder, "dev"), 1)
    return {"train": os.path.join(folder, "train-*.tfrecord"),
            "dev": os.path.join(folder, "dev-*.tfrecord"), "label_map": label_map_path,
            "used_classes": used}


def run_cli(head: str, num_classes: int, output_dir: str) -> dict:
    """``landmarks-train`` (``python -m trainer.train``) under GNU time, quick preset at 71 px,
    two phases of one epoch of 2 steps each, with dev data; wall time, peak RSS and the size of
    every file it writes."""
    data = write_cli_data(os.path.join(output_dir, f"cli_data_{num_classes}"), num_classes)
    model_dir = os.path.join(output_dir, f"cli_model_{head}_{num_classes}")
    if os.path.exists(model_dir):
        import shutil

        shutil.rmtree(model_dir)
    argv = ["--train_data", data["train"], "--dev_data", data["dev"],
            "--label_map", data["label_map"], "--model_dir", model_dir, "--preset", "quick",
            "--image_size", "71", "--steps_per_epoch", "2", "--head_epochs", "1",
            "--finetune_epochs", "1", "--calibrate_batchnorm_images", "16", "--seed", "1",
            "--verbose", "0", "--head", head]
    command = ["/usr/bin/time", "-v", sys.executable, "-m", "trainer.train", *argv]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    wall = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"landmarks-train failed ({result.returncode}):\n"
                           f"{result.stderr[-6000:]}")
    peak_kb = [int(line.split(":")[1]) for line in result.stderr.splitlines()
               if "Maximum resident set size" in line][0]
    files = {}
    for folder, _subfolders, names in os.walk(model_dir):
        for name in names:
            path = os.path.join(folder, name)
            files[os.path.relpath(path, model_dir)] = os.path.getsize(path)
    summary = json.load(open(os.path.join(model_dir, "summary.json")))
    log = [line for line in result.stderr.splitlines() if "landmarks-train" in line
           or "trainer" in line]
    return {"head": head, "classes": num_classes, "wall_seconds": round(wall, 1),
            "rss_peak_bytes": peak_kb * 1024, "bytes_written": sum(files.values()),
            "files": dict(sorted(files.items())), "summary": summary,
            "command": "python -m trainer.train " + " ".join(argv), "log": log[-40:]}


def probe_memory(head: str, num_classes: int, output_dir: str) -> list[dict]:
    """``landmarks-train``'s run of :func:`run_cli`, in this process, reporting at each checkpoint
    save and at the export the process's current resident memory (VmRSS) and the bytes of the
    ``tf.Variable`` objects alive (after ``gc.collect()``): what the run holds beyond its
    weights and optimizer state. Wraps this project's own functions only."""
    import gc

    import tensorflow as tf

    from trainer import config as config_lib
    from trainer import train as train_lib

    data = write_cli_data(os.path.join(output_dir, f"cli_data_{num_classes}"), num_classes)
    model_dir = os.path.join(output_dir, f"probe_model_{head}_{num_classes}")
    if os.path.exists(model_dir):
        import shutil

        shutil.rmtree(model_dir)
    records = []

    def snapshot(where: str) -> None:
        gc.collect()
        with open("/proc/self/status") as handle:
            rss = [int(line.split()[1]) * 1024 for line in handle if line.startswith("VmRSS")][0]
        variables = [obj for obj in gc.get_objects() if isinstance(obj, tf.Variable)]
        live = sum(v.shape.num_elements() * v.dtype.size for v in variables)
        records.append({"at": where, "vmrss_bytes": rss, "live_variables": len(variables),
                        "live_variable_bytes": live})
        print(json.dumps(records[-1]), file=sys.stderr, flush=True)

    save, export = train_lib.save_classifier_weights, train_lib.export_model

    def watched_save(model, path):
        snapshot(f"save {os.path.basename(path)}")
        return save(model, path)

    def watched_export(*args, **kwargs):
        snapshot("export")
        return export(*args, **kwargs)

    train_lib.save_classifier_weights, train_lib.export_model = watched_save, watched_export
    argv = ["--train_data", data["train"], "--dev_data", data["dev"],
            "--label_map", data["label_map"], "--model_dir", model_dir, "--preset", "quick",
            "--image_size", "71", "--steps_per_epoch", "2", "--head_epochs", "1",
            "--finetune_epochs", "1", "--calibrate_batchnorm_images", "16", "--seed", "1",
            "--verbose", "0", "--head", head]
    train_lib.train(config_lib.config_from_args(argv))
    return records


# ---------------------------------------------------------------------------------------------
# Projection to GLDv2 (closed forms only; every assumption is a named constant).

# Assumed, not measured here (no GPU on this machine): ring all-reduce bus bandwidths, and the
# time of Xception's forward + backward pass at 299 px per image on one A100-class GPU in mixed
# precision. 2 ms/image = 500 images/s: NVIDIA's published ResNet-50 mixed-precision training
# rate on an A100 is ~2,500 images/s at 4.1 G multiply-adds per image; Xception at 299 px has
# 8.4 G (2x), and Keras without XLA reaches about half of NVIDIA's tuned rate (2500 / 2 / 2 =
# 625 images/s, rounded down).
ASSUMED_MS_PER_IMAGE = 2.0
ASSUMED_LINKS = (  # (name, replicas, bus bandwidth GB/s per replica, hosts)
    ("8 GPUs, NVLink/NVSwitch (A100 class), NCCL bus bandwidth 200 GB/s", 8, 200.0),
    ("8 GPUs, PCIe 4.0 without NVLink, bus bandwidth 12 GB/s", 8, 12.0),
    ("2 x 8 GPUs, 100 Gbit/s between hosts (12.5 GB/s)", 16, 12.5),
    ("2 x 8 GPUs, 25 Gbit/s between hosts (3.125 GB/s)", 16, 3.125),
)
GLDV2_CLASSES = (("GLDv2 train", 203_094), ("GLDv2 clean train", 81_313), ("1,000 classes", 1000))
# Backbone weights trained per phase (BatchNorm frozen; measured by measure_one, independent of
# the class count): head phase none, finetune from layer 85, deep from layer 25.
BACKBONE_TRAINABLE = {"head": 0, "finetune": 11_604_488, "deep": 20_564_104}


def projection(per_replica_batches=(6, 48)) -> dict:
    """Model, checkpoint and all-reduce sizes at GLDv2's class counts and the data-parallel
    efficiency ``T_compute / (T_compute + T_allreduce)`` (Keras all-reduces all gradients
    after the backward pass: no overlap), ``T_allreduce = 2 (n - 1) / n * S / bandwidth``
    (ring all-reduce), ``T_compute = batch per replica x ASSUMED_MS_PER_IMAGE``."""
    from trainer import heads as heads_lib
    from trainer import model as model_lib

    rows = []
    for head in (heads_lib.SigmoidHead(), heads_lib.SubCenterArcFaceHead(subcenters=3)):
        for label, classes in GLDV2_CLASSES:
            params = model_lib.parameter_count(classes, head)
            _, head_trainable = head.parameter_counts(classes)
            trainable = {name: count + 1 + head_trainable
                         for name, count in BACKBONE_TRAINABLE.items()}
            gradient_bytes = FLOAT32 * trainable["finetune"]
            row = {"head": head.name, "data": label, "classes": classes, "params": params,
                   "weights_file_gb": FLOAT32 * params / 1e9,
                   "backup_file_gb": FLOAT32 * (params + 2 * trainable["finetune"] + 2) / 1e9,
                   "allreduce_gb": {name: FLOAT32 * count / 1e9
                                    for name, count in trainable.items()},
                   "efficiency": {}}
            for link, replicas, bandwidth in ASSUMED_LINKS:
                seconds = 2 * (replicas - 1) / replicas * gradient_bytes / (bandwidth * 1e9)
                for batch in per_replica_batches:
                    compute = batch * ASSUMED_MS_PER_IMAGE / 1000
                    row["efficiency"][f"{link} | batch {batch}/replica"] = {
                        "allreduce_ms": round(1000 * seconds, 1),
                        "compute_ms": round(1000 * compute, 1),
                        "efficiency": round(compute / (compute + seconds), 3)}
            rows.append(row)
    return {"assumed_ms_per_image": ASSUMED_MS_PER_IMAGE, "links": ASSUMED_LINKS, "rows": rows}


def projection_markdown(result: dict) -> str:
    lines = ["| head | data | classes | params | weights file GB | backup (weights + Adam) GB "
             "| all-reduce per step GB: head / finetune / deep phase |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in result["rows"]:
        allreduce = row["allreduce_gb"]
        lines.append(f"| {row['head']} | {row['data']} | {row['classes']:,} | {row['params']:,} "
                     f"| {row['weights_file_gb']:.3f} | {row['backup_file_gb']:.3f} | "
                     f"{allreduce['head']:.3f} / {allreduce['finetune']:.3f} / "
                     f"{allreduce['deep']:.3f} |")
    lines += ["", "| head | classes | interconnect (assumed) | batch per replica | all-reduce ms "
              "| compute ms (assumed) | efficiency |", "|---|---:|---|---:|---:|---:|---:|"]
    for row in result["rows"]:
        for key, value in row["efficiency"].items():
            link, batch = key.split(" | ")
            lines.append(f"| {row['head']} | {row['classes']:,} | {link} | "
                         f"{batch.split()[1].split('/')[0]} | {value['allreduce_ms']} | "
                         f"{value['compute_ms']} | {value['efficiency']:.0%} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Driver: one subprocess per configuration, then the tables.


def _child(args, extra: list[str]) -> dict:
    command = [sys.executable, os.path.abspath(__file__), *extra,
               "--image_size", str(args.image_size), "--batch", str(args.batch),
               "--steps", str(args.steps)]
    started = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-4000:]}")
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    if isinstance(figures, dict):
        figures["process_seconds"] = round(time.perf_counter() - started, 1)
    return figures


def _gb(value: float) -> str:
    return f"{value / 1e9:.3f}"


def _image_size(rows: list[dict]) -> str:
    """The image size of the measured rows ('-' when every configuration was skipped)."""
    sizes = {row["image_size"] for row in rows if "image_size" in row}
    return ", ".join(map(str, sorted(sizes))) or "-"


def write_tables(rows: list[dict], gradients: list[dict], output_dir: str, command: str) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "many_classes.json"), "w") as handle:
        json.dump({"command": command, "configurations": rows, "gradients": gradients},
                  handle, indent=2)
    columns = ["head", "classes", "params", "params_analytic", "weights_file_bytes",
               "weights_file_bytes_analytic", "backup_file_bytes", "backup_file_bytes_analytic",
               "optimizer_variables", "rss_after_build_bytes", "rss_after_fit_bytes",
               "rss_peak_bytes", "build_seconds",
               "first_step_seconds", "step_seconds_median", "weights_file_seconds",
               "backup_file_seconds", "allreduce_head_phase_bytes",
               "allreduce_finetune_phase_bytes", "allreduce_deep_phase_bytes"]
    with open(os.path.join(output_dir, "many_classes.csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            flat = dict(row)
            allreduce = row.get("allreduce_bytes_analytic", {})  # absent from a skipped row
            for phase in ("head", "finetune", "deep"):
                flat[f"allreduce_{phase}_phase_bytes"] = allreduce.get(phase, "")
            writer.writerow(flat)
    lines = [
        "# Trainer with many classes (bench/bench_many_classes.py)", "",
        f"Command: `{command}`. Image size {_image_size(rows)} px, global "
        "batch 8, quick preset's finetune phase (backbone from layer 85), 1 replica, 2 shared "
        "CPU cores. Measured / analytic; sizes in GB (10^9 bytes).", "",
        "| head | classes | params measured | params analytic | weights file measured | "
        "4 x params | backup file (weights + Adam) measured | analytic | peak RSS | "
        "build s | step s (median) | all-reduce/step head phase | finetune | deep |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.get("skipped"):
            lines.append(f"| {row['head']} | {row['classes']:,} | skipped: {row['skipped']} |"
                         + " |" * 11)
            continue
        allreduce = row["allreduce_bytes_analytic"]
        lines.append(
            f"| {row['head']} | {row['classes']:,} | {row['params']:,} | "
            f"{row['params_analytic']:,} | {_gb(row['weights_file_bytes'])} | "
            f"{_gb(row['weights_file_bytes_analytic'])} | {_gb(row['backup_file_bytes'])} | "
            f"{_gb(row['backup_file_bytes_analytic'])} | {_gb(row['rss_peak_bytes'])} | "
            f"{row['build_seconds']} | {row['step_seconds_median']} | "
            f"{_gb(allreduce['head'])} | {_gb(allreduce['finetune'])} | "
            f"{_gb(allreduce['deep'])} |")
    if gradients:
        lines += ["", "What Keras all-reduces in one step, 2-replica MirroredStrategy "
                  "(`--inspect_gradients`):", "",
                  "| head | classes | gradients | types | IndexedSlices | bytes measured | "
                  "bytes analytic (dense) |", "|---|---:|---:|---|---:|---:|---:|"]
        for item in gradients:
            lines.append(
                f"| {item['head']} | {item['classes']:,} | {item['gradients']} | "
                f"{', '.join(item['gradient_types'])} | {item['indexed_slices']} | "
                f"{item['allreduce_bytes_measured']:,} | {item['allreduce_bytes_analytic']:,} |")
    with open(os.path.join(output_dir, "many_classes.md"), "w") as handle:
        handle.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.one:
        print(json.dumps(_measure_in_scratch(args)))
    elif args.inspect_gradients:
        print(json.dumps(inspect_gradients(args.inspect_gradients, args.gradient_classes,
                                           args.image_size, args.batch)))
    else:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.probe_memory:
            print(json.dumps(probe_memory(args.probe_memory[0], int(args.probe_memory[1]),
                                          args.output_dir), indent=2))
        elif args.project:
            _write_projection(args.output_dir)
        elif args.cli:
            _run_cli_per_head(args)
        else:
            _sweep(args, argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="1000,20000,203094",
                        help="comma-separated class counts")
    parser.add_argument("--heads", default="sigmoid,subcenter_arcface")
    parser.add_argument("--image_size", type=int, default=71)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--steps", type=int, default=5, help="steps (the first one traces)")
    parser.add_argument("--output_dir", default=os.path.join(REPO, "runs", "scale"))
    parser.add_argument("--min_free_gb", type=float, default=14.0,
                        help="MemAvailable needed before a configuration above 100k classes")
    parser.add_argument("--wait_for_memory", type=float, default=0,
                        help="--cli: seconds to wait for --min_free_gb before a run above "
                        "100k classes")
    parser.add_argument("--gradient_classes", type=int, default=1000,
                        help="class count of --inspect_gradients")
    parser.add_argument("--cli", metavar="CLASSES", type=int,
                        help="instead: run landmarks-train itself with a label map of CLASSES "
                        "classes for each of --heads (runs/scale/many_classes_cli_C_HEAD.json)")
    parser.add_argument("--project", action="store_true",
                        help="instead: print the GLDv2 projection (closed forms, assumptions "
                        "named in the source) and write runs/scale/many_classes_projection.json")
    parser.add_argument("--probe_memory", nargs=2, metavar=("HEAD", "CLASSES"),
                        help="instead: landmarks-train's run in this process, with VmRSS and "
                        "the live variables at each checkpoint save and at the export")
    parser.add_argument("--one", nargs=2, metavar=("HEAD", "CLASSES"),
                        help="(internal) measure one configuration in this process")
    parser.add_argument("--inspect_gradients", metavar="HEAD",
                        help="(internal) the 2-replica gradient inspection of one head")
    return parser


def _measure_in_scratch(args) -> dict:
    """``--one``: :func:`measure_one` with a scratch folder for its checkpoint files."""
    with tempfile.TemporaryDirectory(dir=args.output_dir if os.path.isdir(args.output_dir)
                                     else None) as scratch:
        return measure_one(args.one[0], int(args.one[1]), args.image_size, args.batch,
                           args.steps, scratch)


def _write_projection(output_dir: str) -> None:
    """``--project``: the projection's JSON into ``output_dir``, its tables on stdout."""
    result = projection()
    with open(os.path.join(output_dir, "many_classes_projection.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    print(projection_markdown(result))


def _run_cli_per_head(args) -> None:
    """``--cli``: landmarks-train once per head, each run's figures in their own file."""
    for head in args.heads.split(","):
        _wait_for_memory(args)
        print(f"landmarks-train, {head}, {args.cli:,} classes (MemAvailable "
              f"{_mem_available_bytes() / GIB:.1f} GiB) ...", file=sys.stderr, flush=True)
        result = run_cli(head, args.cli, args.output_dir)
        name = f"many_classes_cli_{args.cli}_{head}.json"  # one file per run: none lost
        with open(os.path.join(args.output_dir, name), "w") as handle:
            json.dump(result, handle, indent=2)
        print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=2))


def _wait_for_memory(args) -> None:
    """Above 100k classes, waits up to ``--wait_for_memory`` seconds for ``--min_free_gb``."""
    waited = 0
    while (args.cli > 100_000 and _mem_available_bytes() < args.min_free_gb * GIB
           and waited < args.wait_for_memory):
        time.sleep(10)  # the machine is shared: wait for memory, do not OOM others
        waited += 10


def _sweep(args, argv) -> None:
    """The default run: every (head, classes) pair in its own process, then the gradient
    inspection per head; the tables are rewritten after each configuration and printed."""
    command = "bench/bench_many_classes.py " + " ".join(argv if argv is not None else sys.argv[1:])
    rows = []
    for head in args.heads.split(","):
        for classes in (int(value) for value in args.classes.split(",")):
            available = _mem_available_bytes()
            if classes > 100_000 and available < args.min_free_gb * GIB:
                rows.append(_skipped(head, classes, available, args.min_free_gb))
                continue
            rows.append(_measure_in_child(args, head, classes, available))
            write_tables(rows, [], args.output_dir, command)
    gradients = [_child(args, ["--inspect_gradients", head, "--gradient_classes",
                               str(args.gradient_classes)]) for head in args.heads.split(",")]
    write_tables(rows, gradients, args.output_dir, command)
    print(open(os.path.join(args.output_dir, "many_classes.md")).read())


def _skipped(head: str, classes: int, available: int, min_free_gb: float) -> dict:
    """The row of a configuration left out for lack of memory (said on stderr)."""
    print(f"skipping {head} x {classes}: MemAvailable {available / GIB:.1f} GiB < "
          f"--min_free_gb {min_free_gb}", file=sys.stderr)
    return {"head": head, "classes": classes,
            "skipped": f"MemAvailable {available / GIB:.1f} GiB"}


def _measure_in_child(args, head: str, classes: int, available: int) -> dict:
    """One configuration measured in a fresh process (``--one``); its row, also on stderr."""
    print(f"{head} x {classes:,} classes (MemAvailable {available / GIB:.1f} GiB) ...",
          file=sys.stderr, flush=True)
    row = _child(args, ["--one", head, str(classes), "--output_dir", args.output_dir])
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


if __name__ == "__main__":
    sys.exit(main())
