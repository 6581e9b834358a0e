"""Tests of ``landmarks-train`` (trainer/config.py, distribute.py, callbacks.py, train.py).

Data: tiny synthetic JPEG records written with ``tfrecords_schema.image_record.write_shards``:
4 landmark classes of distinct coloured patterns (stripes, checkerboard, rings) plus
non-landmark noise images, 80 px, and a matching ``LabelMap``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfrecords_schema import SCHEMA_VERSION, image_record
from tfrecords_schema import label_map as label_map_lib
from trainer import callbacks as callbacks_lib
from trainer import config as config_lib
from trainer import distribute
from trainer import heads
from trainer import model as model_lib
from trainer import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LANDMARK_IDS = (7, 12, 100, 512)
NUM_CLASSES = len(LANDMARK_IDS)
QUICK = ("--preset", "quick", "--verbose", "0", "--seed", "1")


# ---------------------------------------------------------------------------------------------
# Synthetic data.


def synthetic_pixels(label: int, rng: np.random.Generator, size: int = 80) -> np.ndarray:
    """uint8 ``[size, size, 3]``: a class-specific coloured pattern with random phase and noise;
    label -1 gives random blotches (a non-landmark)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    shift = rng.uniform(0, 8)
    if label == -1:
        small = rng.integers(0, 256, (4, 4, 3)).astype(np.uint8)
        image = np.asarray(Image.fromarray(small).resize((size, size), Image.BILINEAR), np.float32)
    else:
        patterns = {
            0: (((y + shift) // 5) % 2, (220, 40, 40)),  # red horizontal stripes
            1: (((x + shift) // 5) % 2, (40, 200, 60)),  # green vertical stripes
            2: ((((x + shift) // 10) + ((y + shift) // 10)) % 2, (50, 70, 230)),  # blue checks
            3: ((np.hypot(x - size / 2, y - size / 2) + shift) // 6 % 2, (230, 210, 40)),  # rings
        }
        mask, colour = patterns[label]
        image = mask[..., None] * np.asarray(colour, np.float32) + (1 - mask[..., None]) * 30.0
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


def jpeg_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_dataset(folder, split: str, per_class, non_landmarks: int, seed: int,
                  num_shards: int = 2, schema_version: int = SCHEMA_VERSION,
                  label_offset: int = 0) -> str:
    """Writes ``{folder}/{split}-*.tfrecord``; returns the glob. ``per_class``: images of
    every class, or a sequence of ``NUM_CLASSES`` counts."""
    rng = np.random.default_rng(seed)
    counts = [per_class] * NUM_CLASSES if np.isscalar(per_class) else list(per_class)
    labels = [label for label in range(NUM_CLASSES) for _ in range(counts[label])]
    labels += [-1] * non_landmarks
    rng.shuffle(labels)
    records = []
    for index, label in enumerate(labels):
        pixels = synthetic_pixels(int(label), rng)
        stored = int(label) + label_offset if label >= 0 else -1
        records.append(image_record.ImageRecord(
            image_id=f"{split}-{index:05d}",
            jpeg_bytes=jpeg_bytes(pixels),
            label=stored,
            height=pixels.shape[0],
            width=pixels.shape[1],
            landmark_id=LANDMARK_IDS[label] if label >= 0 else -1,
            schema_version=schema_version,
        ))
    image_record.write_shards(records, os.path.join(folder, split), num_shards=num_shards)
    return os.path.join(folder, f"{split}-*.tfrecord")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("records")
    train = write_dataset(str(folder), "train", per_class=24, non_landmarks=16, seed=0)
    dev = write_dataset(str(folder), "dev", per_class=8, non_landmarks=8, seed=1)
    label_map = os.path.join(str(folder), "label_map.csv")
    label_map_lib.write_label_map(label_map_lib.LabelMap(LANDMARK_IDS), label_map)
    return {"train": train, "dev": dev, "label_map": label_map, "folder": str(folder)}


def cli_args(dataset_dir, model_dir, *extra, dev=True):
    args = ["--train_data", dataset_dir["train"], "--label_map", dataset_dir["label_map"],
            "--model_dir", str(model_dir)]
    if dev:
        args += ["--dev_data", dataset_dir["dev"]]
    return args + list(QUICK) + list(extra)


def run_cli(args, timeout=600, **kwargs):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "trainer.train", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO, env=env, **kwargs)


def read_history(model_dir):
    with open(os.path.join(model_dir, "history.csv")) as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------
# Config.


def test_config_flags_override_preset_and_defaults_are_the_recipe():
    full = config_lib.config_from_args(
        ["--train_data", "a", "--label_map", "b", "--model_dir", "c"])
    head, finetune, deep = full.phases
    assert (head.trainable_from, head.batch_size, head.learning_rate) == (None, 128, 1e-3)
    assert (finetune.trainable_from, finetune.batch_size, finetune.learning_rate) == (85, 48, 1e-4)
    assert (deep.trainable_from, deep.final_learning_rate) == (25, 3e-7)
    assert full.data.image_size == 299 and full.model.dropout == 0.05 and full.model.gem_p == 3.0
    quick = config_lib.config_from_args(
        ["--train_data", "a", "--label_map", "b", "--model_dir", "c", "--preset", "quick",
         "--image_size", "112", "--finetune_final_learning_rate", "none"])
    assert quick.data.image_size == 112  # flag beats preset
    assert quick.phases[0].batch_size == 8  # preset beats default
    assert quick.phases[1].final_learning_rate is None  # explicit "none"
    assert json.loads(quick.to_json())["data"]["image_size"] == 112


def test_learning_rate_decays_geometrically_within_a_phase():
    phase = config_lib.PhaseConfig("finetune", 85, epochs=5, batch_size=4, learning_rate=1e-4,
                                   final_learning_rate=1e-6)
    rates = [phase.learning_rate_at(epoch) for epoch in range(5)]
    np.testing.assert_allclose(rates, [1e-4, 10 ** -4.5, 1e-5, 10 ** -5.5, 1e-6], rtol=1e-9)


@pytest.mark.parametrize("flags, message", [
    (["--image_size", "64"], "image_size"),
    (["--head_batch_size", "0"], "head_batch_size"),
    (["--mixed_precision", "float8"], "mixed_precision"),
    (["--head_epochs", "0", "--finetune_epochs", "0", "--deep_epochs", "0"], "nothing to train"),
])
def test_bad_config_raises_value_error(flags, message):
    with pytest.raises(ValueError, match=message):
        config_lib.config_from_args(["--train_data", "a", "--label_map", "b", "--model_dir", "c",
                                     *flags])


def test_phase_epoch_ranges_are_continuous_and_skip_empty_phases():
    config = config_lib.config_from_args(
        ["--train_data", "a", "--label_map", "b", "--model_dir", "c", "--head_epochs", "2",
         "--finetune_epochs", "0", "--deep_epochs", "3"])
    ranges = [(index, phase.name, first, end)
              for index, phase, first, end in train_lib.phase_epoch_ranges(config)]
    assert ranges == [(0, "head", 0, 2), (2, "deep", 2, 5)]


# ---------------------------------------------------------------------------------------------
# Distribution: one step on 2 replicas == one step on 1 device.


def _mirrored(devices):
    """A fresh MirroredStrategy with its own collective keys (see test_losses.two_cpu_strategy:
    strategies of one process otherwise share keys, and a key first used by another kind of
    collective, e.g. a gather of the rank loss before the ArcFace BatchNorm's all-reduce,
    fails with "Collective instance ... expected type ...")."""
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    strategy = tf.distribute.MirroredStrategy(devices)
    tf.distribute.MirroredStrategy._collective_key_base += 100000
    return strategy


def _one_step(strategy, initial_weights, images, labels, global_batch, config,
              class_counts=None):
    """One training step of the finetune phase with ``config``'s head; the updated weights
    (of the classifier, head included) and the logged loss."""
    with strategy.scope():
        model = model_lib.build_model(NUM_CLASSES, image_size=images.shape[1],
                                      backbone_weights="none", dropout=0.0,
                                      head=heads.make_head(config.model))
    model.set_weights(initial_weights)
    training = train_lib.compile_for_phase(model, config.phases[1], config, strategy,
                                           class_counts=class_counts)

    def per_replica(batch_size, input_context):
        return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)

    dataset = distribute.distribute_dataset(strategy, global_batch, per_replica)
    history = training.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, shuffle=False)
    return model.get_weights(), history.history["loss"][0]


def _spread_out_head(model, images, rng):
    """Initial weights whose top-1 confidences differ between images, without amplifying
    round-off.

    A randomly initialised Xception with BatchNorm left at its initial statistics maps every
    image to nearly the same features (equal to ~7 digits); a head that separated them would
    multiply float32 round-off by ~1e7, and which device count "wins" a rank would be decided
    by the last bit (this failed on another CPU). BatchNorm is calibrated on the batch first,
    as the trainer does for a random backbone, so features are of order 1 and differ per image;
    the Dense layer then standardises them into logits of order 1.
    """
    train_lib.calibrate_batchnorm(model, tf.constant(images))
    model.get_layer("gem").p.assign(1.0)
    features = model_lib.embedding_model(model)(images, training=False).numpy()  # [B, 2048]
    mean, spread = features.mean(axis=0), features.std(axis=0)
    # Only features that vary across images carry the ranking; the others get no weight.
    varying = spread > 1e-3 * np.abs(features).max()
    assert varying.sum() > 100, "calibrated features should differ between images"
    kernel = np.zeros((features.shape[1], NUM_CLASSES), np.float32)
    kernel[varying] = (rng.normal(0, 1, (int(varying.sum()), NUM_CLASSES))
                       / spread[varying, None] / np.sqrt(varying.sum()))
    model.get_layer("logits").set_weights([kernel, -mean @ kernel])
    return model.get_weights()


@pytest.mark.slow
def test_one_step_on_two_replicas_equals_one_step_on_one_device():
    """Same initial weights, same global batch of 8, no augmentation, dropout 0: the update of
    every weight (backbone from layer 115, GeM p, head) agrees between 1 and 2 replicas, which
    holds only if the loss divides by the global batch and ranks over the global batch.

    Tolerance, measured here: two replicas sum the batch's gradients in another order than one
    device does; so does one device given the same 8 images in another order (the loss is
    invariant to the order: it ranks by value). The one-device step on two reorderings of the
    batch gives the spread that summation order alone causes on this machine, per tensor (it
    is large where a gradient is near Adam's epsilon, whose first step ``lr * g / (|g| + eps)``
    is most sensitive there). Two replicas must stay within twice that spread: the split
    into two halves is one more summation order, and a factor 2 covers the spread of a sample of
    two reorderings (it failed by 10% over a fixed 1e-5 on another CPU).
    """
    config = config_lib.config_from_args(
        ["--train_data", "a", "--label_map", "b", "--model_dir", "c", "--preset", "quick",
         "--image_size", "71", "--dropout", "0", "--finetune_learning_rate", "1e-3",
         "--finetune_trainable_from", "115"])
    rng = np.random.default_rng(0)
    global_batch = 8
    images = rng.uniform(-1, 1, (global_batch, 71, 71, 3)).astype(np.float32)
    labels = np.array([0, 1, -1, 2, 3, 0, -1, 1], np.int64)
    keras.utils.set_random_seed(0)
    reference = model_lib.build_model(NUM_CLASSES, image_size=71, backbone_weights="none",
                                      dropout=0.0)
    initial = _spread_out_head(reference, images, rng)
    top = reference(images, training=False).numpy().max(axis=1)
    assert np.min(np.diff(np.sort(top))) > 1e-3, "top-1 confidences must not tie"

    one = _mirrored(["/cpu:0"])
    two = _mirrored(["/cpu:0", "/cpu:1"])
    assert two.num_replicas_in_sync == 2
    weights_one, loss_one = _one_step(one, initial, images, labels, global_batch, config)
    weights_two, loss_two = _one_step(two, initial, images, labels, global_batch, config)
    reordered = []
    for order in (np.arange(global_batch)[::-1], rng.permutation(global_batch)):
        reordered.append(_one_step(one, initial, images[order], labels[order], global_batch,
                                   config))

    changed = [not np.allclose(a, b) for a, b in zip(initial, weights_one)]
    assert sum(changed) > 10, "the step should update backbone and head weights"
    loss_spread = max(abs(loss - loss_one) for _, loss in reordered)
    assert abs(loss_two - loss_one) <= 2 * loss_spread + 2 * np.spacing(np.float32(loss_one))
    for index, (a, b) in enumerate(zip(weights_one, weights_two)):
        spread = max(float(np.max(np.abs(weights[index] - a))) for weights, _ in reordered)
        floor = 2 * float(np.max(np.spacing(np.abs(a).astype(np.float32))))  # last bits of w
        difference = float(np.max(np.abs(b - a)))
        assert difference <= 2 * spread + floor, (index, a.shape, difference, spread)


def _spread_out_projection(model, images, rng):
    """The ArcFace heads' counterpart of :func:`_spread_out_head`: backbone (and head)
    BatchNorm calibrated on the batch, then a projection that standardises the features that
    vary between images, so the head's (synchronized, training-mode) BatchNorm sees inputs of
    order 1 and its statistics E[x^2] - E[x]^2 do not cancel digits. The class centres keep
    their random initialisation (cosines of order 0.05, softmax(30 cos) far from saturated)."""
    train_lib.calibrate_batchnorm(model, tf.constant(images))
    model.get_layer("gem").p.assign(1.0)
    features = model_lib.embedding_model(model)(images, training=False).numpy()  # [B, 2048]
    mean, spread = features.mean(axis=0), features.std(axis=0)
    varying = spread > 1e-3 * np.abs(features).max()
    assert varying.sum() > 100, "calibrated features should differ between images"
    projection = model.get_layer("projection")
    width = projection.kernel.shape[1]
    kernel = np.zeros((features.shape[1], width), np.float32)
    kernel[varying] = (rng.normal(0, 1, (int(varying.sum()), width))
                       / spread[varying, None] / np.sqrt(varying.sum()))
    projection.set_weights([kernel, -mean @ kernel])
    train_lib.calibrate_batchnorm(model, tf.constant(images))  # the head's BN on the new inputs
    return model.get_weights()


@pytest.mark.slow
# subcenter_arcface only: plain arcface is its K = 1, fixed-margin case (same layer, same loss,
# both checked against numpy in tests/test_heads.py); one run keeps the suite under 15 minutes.
@pytest.mark.parametrize("head", ["subcenter_arcface"])
def test_one_step_on_two_replicas_equals_one_step_on_one_device_for_arcface_heads(head):
    """As the sigmoid test above, for the ArcFace heads: the loss divides by the landmark
    images of the GLOBAL batch (here 6 of 8, split 3 + 3 over the replicas), and the head's
    BatchNorm, in training mode, normalises with the global batch's statistics (synchronized),
    so every weight (backbone from layer 115, GeM p, projection, BatchNorm and its moving
    statistics, class centres) gets the one-device update. Tolerance measured the same way,
    from reorderings of the batch on one device."""
    config = config_lib.config_from_args(
        ["--train_data", "a", "--label_map", "b", "--model_dir", "c", "--preset", "quick",
         "--image_size", "71", "--dropout", "0", "--finetune_learning_rate", "1e-3",
         "--finetune_trainable_from", "115", "--head", head, "--embedding_dim", "64"])
    class_counts = [40, 9, 3, 1]  # dynamic margins 0.05 .. 0.5 for subcenter_arcface
    rng = np.random.default_rng(0)
    global_batch = 8
    images = rng.uniform(-1, 1, (global_batch, 71, 71, 3)).astype(np.float32)
    labels = np.array([0, 1, -1, 2, 3, 0, -1, 1], np.int64)
    keras.utils.set_random_seed(0)
    reference = model_lib.build_model(NUM_CLASSES, image_size=71, backbone_weights="none",
                                      dropout=0.0, head=heads.make_head(config.model))
    initial = _spread_out_projection(reference, images, rng)

    one = _mirrored(["/cpu:0"])
    two = _mirrored(["/cpu:0", "/cpu:1"])
    step = (images, labels, global_batch, config, class_counts)
    weights_one, loss_one = _one_step(one, initial, *step)
    weights_two, loss_two = _one_step(two, initial, *step)
    reordered = []
    for order in (np.arange(global_batch)[::-1], rng.permutation(global_batch)):
        reordered.append(_one_step(one, initial, images[order], labels[order], global_batch,
                                   config, class_counts))

    changed = [not np.allclose(a, b) for a, b in zip(initial, weights_one)]
    assert sum(changed) > 10, "the step should update backbone and head weights"
    assert np.isfinite(loss_one) and loss_one > 0
    loss_spread = max(abs(loss - loss_one) for _, loss in reordered)
    assert abs(loss_two - loss_one) <= 2 * loss_spread + 2 * np.spacing(np.float32(loss_one))
    for index, (a, b) in enumerate(zip(weights_one, weights_two)):
        spread = max(float(np.max(np.abs(weights[index] - a))) for weights, _ in reordered)
        floor = 2 * float(np.max(np.spacing(np.abs(a).astype(np.float32))))  # last bits of w
        difference = float(np.max(np.abs(b - a)))
        assert difference <= 2 * spread + floor, (index, a.shape, difference, spread)


# ---------------------------------------------------------------------------------------------
# CLI errors.


def _assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("landmarks-train: error:")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


def test_cli_error_when_no_files_match(dataset_dir, tmp_path):
    args = cli_args(dataset_dir, tmp_path / "m", dev=False)
    args[1] = os.path.join(dataset_dir["folder"], "nothing-*.tfrecord")
    _assert_one_line_error(run_cli(args, timeout=300), "no TFRecord files match", "nothing-*")


def test_cli_error_when_label_map_does_not_match_records(dataset_dir, tmp_path):
    small_map = tmp_path / "label_map.csv"
    label_map_lib.write_label_map(label_map_lib.LabelMap(LANDMARK_IDS[:2]), str(small_map))
    args = cli_args(dataset_dir, tmp_path / "m", dev=False)
    args[3] = str(small_map)
    _assert_one_line_error(run_cli(args, timeout=300), "label map does not match")
    assert not (tmp_path / "m" / "_SUCCESS").exists()


def test_cli_error_on_schema_version_mismatch(dataset_dir, tmp_path):
    old = write_dataset(str(tmp_path), "old", per_class=1, non_landmarks=1, seed=3,
                        num_shards=1, schema_version=SCHEMA_VERSION + 1)
    args = cli_args(dataset_dir, tmp_path / "m", dev=False)
    args[1] = old
    _assert_one_line_error(run_cli(args, timeout=300), "schema version")


def test_cli_error_on_a_corrupt_record_names_the_file(dataset_dir, tmp_path):
    pattern = write_dataset(str(tmp_path), "bad", per_class=2, non_landmarks=1, seed=4,
                            num_shards=1)
    path = str(tmp_path / "bad-00000-of-00001.tfrecord")
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + 64] = bytes(64)  # zeroed bytes: a record's CRC no longer matches
    open(path, "wb").write(bytes(data))
    args = cli_args(dataset_dir, tmp_path / "m", dev=False)
    args[1] = pattern
    _assert_one_line_error(run_cli(args, timeout=300), "bad-00000-of-00001.tfrecord")


def test_main_in_process_returns_2_for_a_bad_flag(capsys):
    assert train_lib.main(["--preset", "nope"]) == 2
    assert capsys.readouterr().err.startswith("landmarks-train: error:")


# ---------------------------------------------------------------------------------------------
# Callbacks.


def test_history_csv_keeps_one_row_per_epoch(tmp_path):
    path = str(tmp_path / "history.csv")
    callbacks_lib.write_history(path, {0: {"epoch": 0, "phase": "init", "dev_gap": "0.1"}})
    rows = callbacks_lib.read_history(path)
    rows[1] = {"epoch": 1, "phase": "head", "loss": "2.5"}
    rows[1] = {"epoch": 1, "phase": "head", "loss": "2.4"}  # the same epoch again (resume)
    callbacks_lib.write_history(path, rows)
    again = callbacks_lib.read_history(path)
    assert sorted(again) == [0, 1] and again[1]["loss"] == "2.4" and again[0]["dev_gap"] == "0.1"


# ---------------------------------------------------------------------------------------------
# Whole runs through the CLI (subprocesses, as a user runs them).


@pytest.fixture(scope="module")
def trained_model_dir(demo_run):
    """A quick-preset run with dev data: the demo's model (fixture ``demo_run``, shared with
    test_demo.py and test_query.py; training it again here would add ~40 s to the suite). The
    CLI as a subprocess is exercised by the kill-and-rerun and NaN tests below."""
    assert demo_run.exit_code == 0
    return os.path.join(demo_run.run_dir, "model")


def demo_train_args(demo_run):
    """The landmarks-train command line the demo trained its model with."""
    from beam_pipelines import demo, stages

    defaults = demo.DemoConfig()
    return stages.train_argv(demo_run.run_dir, defaults.train_preset, defaults.image_size,
                             defaults.seed, demo.DEMO_TRAIN_FLAGS)


def label_map_size(model_dir) -> int:
    with open(os.path.join(model_dir, "label_map.csv")) as handle:
        return label_map_lib.LabelMap.from_csv_text(handle.read()).num_classes


@pytest.mark.slow
def test_quick_preset_learns_and_writes_the_model_dir(trained_model_dir):
    names = set(os.listdir(trained_model_dir))
    assert {"model.keras", "embedding.keras", "config.json", "label_map.csv", "history.csv",
            "summary.json", "checkpoints", "logs", "_SUCCESS"} <= names
    assert "backup" not in names and "class_counts.json" not in names  # sigmoid: no counts
    summary = json.load(open(os.path.join(trained_model_dir, "summary.json")))
    assert (summary["head"], summary["embedding_dim"]) == ("sigmoid", 2048)
    history = read_history(trained_model_dir)
    config = json.load(open(os.path.join(trained_model_dir, "config.json")))
    total = sum(phase["epochs"] for phase in config["phases"])
    assert [int(row["epoch"]) for row in history] == list(range(total + 1))
    assert history[0]["phase"] == "init"
    assert summary["dev_gap_initial"] == pytest.approx(float(history[0]["dev_gap"]))
    assert summary["dev_gap_final"] == pytest.approx(float(history[-1]["dev_gap"]))
    print("dev GAP initial %.4f final %.4f best %.4f" % (
        summary["dev_gap_initial"], summary["dev_gap_final"], summary["dev_gap_best"]))
    assert summary["dev_gap_best"] > summary["dev_gap_initial"] + 0.2
    assert all(float(row["images_per_second"]) > 0 for row in history[1:])


_PREDICT_IN_FRESH_PROCESS = """
import sys, numpy as np, keras
import trainer.layers  # registers the project's layers (landmarks>...), as a Beam worker would
images = np.load(sys.argv[1])
for index, path in enumerate(sys.argv[2:]):
    model = keras.saving.load_model(path)
    np.save(f"{sys.argv[1]}.{index}.npy", model.predict(images, verbose=0))
"""


def predict_in_fresh_process(model_paths, images, tmp_path):
    """The ``.keras`` files ``model_paths`` loaded in one new Python process (only
    ``trainer.layers`` imported, as a Beam worker does) and run on ``images``; their outputs."""
    inputs = tmp_path / "fresh_process_images.npy"
    np.save(inputs, images)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    result = subprocess.run(
        [sys.executable, "-c", _PREDICT_IN_FRESH_PROCESS, str(inputs), *map(str, model_paths)],
        capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [np.load(f"{inputs}.{index}.npy") for index in range(len(model_paths))]


def probe_images(size: int) -> np.ndarray:
    """One image of each class and a non-landmark, in [-1, 1]."""
    rng = np.random.default_rng(5)
    pixels = np.stack([synthetic_pixels(label, rng, size) for label in (0, 1, 2, 3, -1)])
    return pixels.astype(np.float32) / 127.5 - 1.0


@pytest.mark.slow
def test_saved_model_loads_in_a_fresh_process_with_the_same_predictions(trained_model_dir,
                                                                       tmp_path):
    config = json.load(open(os.path.join(trained_model_dir, "config.json")))
    size = config["data"]["image_size"]
    images = probe_images(size)
    loaded, embeddings = predict_in_fresh_process(
        [os.path.join(trained_model_dir, name) for name in ("model.keras", "embedding.keras")],
        images, tmp_path)
    # Independent path: the architecture rebuilt here + the exported (best) checkpoint.
    classes = label_map_size(trained_model_dir)
    rebuilt = model_lib.build_model(classes, image_size=size, backbone_weights="none")
    keras.saving.load_weights(rebuilt, os.path.join(trained_model_dir, "checkpoints",
                                                    "best.weights.h5"))
    expected = rebuilt.predict(images, verbose=0)
    assert loaded.shape == (5, classes)
    np.testing.assert_allclose(loaded, expected, rtol=1e-4, atol=1e-6)
    size_mb = os.path.getsize(os.path.join(trained_model_dir, "model.keras")) / 2**20
    checkpoint_mb = os.path.getsize(os.path.join(trained_model_dir, "checkpoints",
                                                 "last.weights.h5")) / 2**20
    assert size_mb < checkpoint_mb * 1.2  # no optimizer state inside

    # embedding.keras: the L2-normalised GeM output of model.keras, rows of unit norm.
    assert embeddings.shape == (5, 2048) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    classifier = keras.saving.load_model(os.path.join(trained_model_dir, "model.keras"))
    gem = model_lib.embedding_model(classifier).predict(images, verbose=0).astype(np.float64)
    np.testing.assert_allclose(embeddings, gem / np.linalg.norm(gem, axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-6)


def _backup_epoch(metadata) -> int:
    """Epoch recorded by a BackupAndRestore metadata file (0 if absent or being written)."""
    try:
        return int(json.loads(metadata.read_text()).get("epoch", 0))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.slow
def test_kill_and_rerun_resumes_from_the_backup(dataset_dir, tmp_path):
    model_dir = tmp_path / "model"
    args = cli_args(dataset_dir, model_dir, "--image_size", "71", "--steps_per_epoch", "3",
                    "--head_epochs", "4", "--finetune_epochs", "1", dev=False)
    killed_after = _run_killed_after_first_epoch(args, model_dir)
    assert 1 <= killed_after < 4
    assert not (model_dir / "_SUCCESS").exists()

    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"phase head: resuming after epoch {killed_after}" in result.stderr
    trained = [line for line in result.stderr.splitlines() if "(head): loss" in line]
    assert trained and all(not line.split("epoch ")[1].startswith("1 ") for line in trained)
    assert len(trained) == 4 - killed_after  # only the epochs not backed up are trained again
    assert [int(row["epoch"]) for row in read_history(model_dir)] == [1, 2, 3, 4, 5]
    assert (model_dir / "_SUCCESS").exists() and (model_dir / "model.keras").exists()


def _run_killed_after_first_epoch(args, model_dir) -> int:
    """Starts ``landmarks-train args``, SIGKILLs it once the head phase's backup records an
    epoch; returns the epochs that backup holds."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO)
    metadata = model_dir / "backup" / "0-head" / "training_metadata.json"
    process = subprocess.Popen([sys.executable, "-m", "trainer.train", *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and process.poll() is None:
            if _backup_epoch(metadata) >= 1:
                break
            time.sleep(0.2)
        assert process.poll() is None, "the first run ended before it could be killed"
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    return json.loads(metadata.read_text())["epoch"]


@pytest.mark.slow
def test_subcenter_arcface_head_trains_resumes_and_exports(dataset_dir, tmp_path):
    """The whole CLI with ``--head subcenter_arcface`` on imbalanced classes (20, 10, 5, 2
    images and 6 non-landmarks): the dynamic margins built from the class counts are stored;
    model.keras gives class probabilities (rows sum to 1) and embedding.keras unit-norm 64-d
    embeddings, the classifier's own, both loading in a fresh process. (Resuming is the same
    code for every head: test_kill_and_rerun_resumes_from_the_backup covers it.)"""
    train = write_dataset(str(tmp_path), "train", per_class=(20, 10, 5, 2), non_landmarks=6,
                          seed=7)
    model_dir = tmp_path / "model"
    args = cli_args(dataset_dir, model_dir, "--head", "subcenter_arcface", "--embedding_dim",
                    "64", "--image_size", "71", "--steps_per_epoch", "3", "--head_epochs", "3",
                    "--finetune_epochs", "1", "--max_dev_images", "16")
    args[1] = train
    result = run_cli(args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert [int(row["epoch"]) for row in read_history(model_dir)] == [0, 1, 2, 3, 4]

    counts = json.loads((model_dir / "class_counts.json").read_text())
    assert counts["images_per_class"] == [20, 10, 5, 2] and counts["non_landmark_images"] == 6
    np.testing.assert_allclose(counts["margins"], heads.dynamic_margins([20, 10, 5, 2]),
                               atol=1e-6)
    assert counts["margins"][0] == pytest.approx(0.05) and counts["margins"][3] == 0.5
    summary = json.loads((model_dir / "summary.json").read_text())
    assert (summary["head"], summary["embedding_dim"]) == ("subcenter_arcface", 64)
    assert summary["dev_gap_final"] is not None

    images = probe_images(71)
    probabilities, embeddings = predict_in_fresh_process(
        [model_dir / "model.keras", model_dir / "embedding.keras"], images, tmp_path)
    assert probabilities.shape == (5, NUM_CLASSES)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert embeddings.shape == (5, 64) and embeddings.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    classifier = keras.saving.load_model(str(model_dir / "model.keras"))
    assert classifier.get_layer("cosine").subcenters == 3
    own = keras.Model(classifier.inputs, classifier.get_layer("embedding").output)
    np.testing.assert_allclose(embeddings, own.predict(images, verbose=0), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(dataset_dir, tmp_path):
    model_dir = tmp_path / "model"
    # A legitimate but absurd learning rate in the second phase: the head phase ends well.
    args = cli_args(dataset_dir, model_dir, "--image_size", "71", "--steps_per_epoch", "2",
                    "--head_epochs", "1", "--finetune_epochs", "2",
                    "--finetune_learning_rate", "1e38", dev=False)
    result = run_cli(args)
    assert result.returncode == 3, result.stderr[-4000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines()
              if line.startswith("landmarks-train: error:")]
    assert len(errors) == 1 and "diverged" in errors[0] and "finetune" in errors[0]
    assert not (model_dir / "_SUCCESS").exists() and not (model_dir / "model.keras").exists()
    checkpoint = model_dir / "checkpoints" / "last.weights.h5"
    model = model_lib.build_model(NUM_CLASSES, image_size=71, backbone_weights="none")
    keras.saving.load_weights(model, str(checkpoint))
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())
    assert [row["phase"] for row in read_history(model_dir)] == ["head"]  # no NaN row
    head_backup = json.loads((model_dir / "backup" / "0-head" / "training_metadata.json")
                             .read_text())
    assert head_backup["epoch"] == 1
    assert not (model_dir / "backup" / "1-finetune" / "training_metadata.json").exists()


@pytest.mark.slow
def test_rerun_of_a_finished_run_is_a_no_op_and_another_config_is_refused(
        trained_model_dir, demo_run, capsys):
    args = demo_train_args(demo_run)
    assert args[args.index("--model_dir") + 1] == trained_model_dir
    before = os.path.getmtime(os.path.join(trained_model_dir, "model.keras"))
    assert train_lib.main(args) == 0  # returns before building anything
    assert os.path.getmtime(os.path.join(trained_model_dir, "model.keras")) == before
    assert train_lib.main(args + ["--head_epochs", "5"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("landmarks-train: error:") and "another config" in error
