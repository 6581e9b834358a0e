"""The trainer with a label map far larger than the toy data's classes (issue: scale).

GLDv2's label map has 203,094 classes; bench/bench_many_classes.py measures that size
(docs/SCALE.md, "Training with many classes"). Here, at small size: the closed-form parameter
counts the projections rest on equal the built models', and ``landmarks-train`` runs, counts,
exports and evaluates with 5,000 classes of which only a handful have images.
"""

from __future__ import annotations

import json
import os
import weakref

import keras
import numpy as np
import pytest

from tfrecords_schema import image_record
from tfrecords_schema import label_map as label_map_lib
from trainer import callbacks as callbacks_lib
from trainer import heads
from trainer import model as model_lib
from trainer import train as train_lib

from test_train import jpeg_bytes, read_history, synthetic_pixels

IMAGE_SIZE = 71  # Xception's smallest input: the cheapest build


def _count(weights) -> int:
    return int(sum(np.prod(weight.shape) for weight in weights))


HEADS = [heads.SigmoidHead(), heads.ArcFaceHead(dimension=24),
         heads.SubCenterArcFaceHead(dimension=16, subcenters=3)]


@pytest.mark.parametrize("head", HEADS, ids=lambda head: head.name)
@pytest.mark.parametrize("num_classes", [1, 37, 1000])
def test_closed_form_head_parameter_counts_equal_the_built_heads(head, num_classes):
    features = keras.Input((model_lib.EMBEDDING_WIDTH,))
    built = keras.Model(features, head.build(features, num_classes))
    head_all, head_trainable = head.parameter_counts(num_classes)
    assert built.count_params() == head_all
    assert _count(built.trainable_weights) == head_trainable
    # Linear in the classes with the slope of one class's weights: what the projection to
    # 203,094 classes extrapolates.
    per_class = head.parameter_counts(num_classes + 1)[0] - head_all
    expected = (model_lib.EMBEDDING_WIDTH + 1 if isinstance(head, heads.SigmoidHead)
                else head.dimension * head.subcenters_per_class)
    assert per_class == expected


@pytest.mark.parametrize("head", HEADS[::2], ids=lambda head: head.name)
def test_closed_form_parameter_count_equals_the_built_classifier(head):
    model = model_lib.build_model(37, image_size=IMAGE_SIZE, head=head)
    assert model.count_params() == model_lib.parameter_count(37, head)
    backbone = model.get_layer(model_lib.BACKBONE_NAME)
    assert backbone.count_params() == model_lib.XCEPTION_NO_TOP_PARAMS
    # Backbone frozen (the head phase): what trains is the head and GeM's p.
    assert _count(model.trainable_weights) == head.parameter_counts(37)[1] + 1


def test_divergence_guard_finds_a_non_finite_weight_on_the_device():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4), keras.layers.Dense(2)])
    guard = callbacks_lib.DivergenceGuard()
    guard.set_model(model)
    guard.on_epoch_end(0, {"loss": 1.0})
    assert not guard.diverged
    kernel = model.layers[1].kernel
    values = keras.ops.convert_to_numpy(kernel.value).copy()
    values[1, 0] = np.inf
    kernel.assign(values)
    guard.on_epoch_end(1, {"loss": 1.0})
    assert guard.diverged and kernel.path in guard.where and "epoch 2" in guard.where


MANY = 5_000
PRESENT = (0, 1, 2_499, 4_998, 4_999)  # spread over the range, both ends included
PER_CLASS = (4, 3, 2, 2, 1)


def _write_records(folder, split, per_class, non_landmarks, seed):
    rng = np.random.default_rng(seed)
    labels = [label for label, count in zip(PRESENT, per_class) for _ in range(count)]
    labels += [-1] * non_landmarks
    records = []
    for index, label in enumerate(labels):
        pixels = synthetic_pixels(PRESENT.index(label) % 4 if label >= 0 else -1, rng, 72)
        records.append(image_record.ImageRecord(
            image_id=f"{split}-{index:04d}", jpeg_bytes=jpeg_bytes(pixels), label=label,
            height=72, width=72, landmark_id=3 * label + 11 if label >= 0 else -1))
    image_record.write_shards(records, os.path.join(folder, split), num_shards=2)
    return os.path.join(folder, f"{split}-*.tfrecord")


@pytest.mark.slow
def test_train_with_a_label_map_much_larger_than_the_classes_present(tmp_path, monkeypatch,
                                                                    capsys):
    """``landmarks-train --head subcenter_arcface`` (the head that counts images per class)
    with a 5,000-class label map and 5 classes present: the counts and margins cover every
    class of the map, absent classes count 0 with the largest margin, model.keras gives 5,000
    probabilities per image, and the trained network and its optimizer state are gone before
    the export builds its copy (at 203,094 classes they are 5.2 GB). In-process (``main``) so
    that the export can be watched; the CLI as a subprocess is tested in test_train.py."""
    label_map = label_map_lib.LabelMap(tuple(3 * index + 11 for index in range(MANY)))
    label_map_path = str(tmp_path / "label_map.csv")
    label_map_lib.write_label_map(label_map, label_map_path)
    train = _write_records(str(tmp_path), "train", PER_CLASS, non_landmarks=3, seed=0)
    dev = _write_records(str(tmp_path), "dev", (1,) * len(PRESENT), non_landmarks=1, seed=1)
    model_dir = tmp_path / "model"

    trained, alive_at_export = [], []
    build_models, compile_for_phase = train_lib._build_models, train_lib.compile_for_phase
    export_model = train_lib.export_model

    def watched_build(run):
        build_models(run)
        trained.extend([weakref.ref(run.model), weakref.ref(run.training_model)])

    def watched_compile(*args, **kwargs):
        compiled = compile_for_phase(*args, **kwargs)
        trained.append(weakref.ref(compiled.optimizer))  # Adam: the slots
        return compiled

    def watched_export(*args, **kwargs):
        alive_at_export.extend(ref() is not None for ref in trained)
        return export_model(*args, **kwargs)

    monkeypatch.setattr(train_lib, "_build_models", watched_build)
    monkeypatch.setattr(train_lib, "compile_for_phase", watched_compile)
    monkeypatch.setattr(train_lib, "export_model", watched_export)
    exit_code = train_lib.main([
        "--train_data", train, "--dev_data", dev, "--label_map", label_map_path,
        "--model_dir", str(model_dir), "--preset", "quick", "--verbose", "0", "--seed", "1",
        "--head", "subcenter_arcface", "--embedding_dim", "32", "--image_size", str(IMAGE_SIZE),
        "--steps_per_epoch", "1", "--head_epochs", "1", "--finetune_epochs", "0",
        "--calibrate_batchnorm_images", "8",
    ])
    assert exit_code == 0, capsys.readouterr().err[-4000:]
    assert len(alive_at_export) == 3 and not any(alive_at_export)  # 2 models and Adam
    assert (model_dir / "_SUCCESS").exists() and not (model_dir / "backup").exists()
    assert [int(row["epoch"]) for row in read_history(model_dir)] == [0, 1]

    counts = json.loads((model_dir / "class_counts.json").read_text())
    expected = np.zeros(MANY, np.int64)
    expected[list(PRESENT)] = PER_CLASS
    assert counts["num_classes"] == MANY and counts["non_landmark_images"] == 3
    assert counts["images_per_class"] == expected.tolist()
    np.testing.assert_allclose(counts["margins"], heads.dynamic_margins(expected), atol=1e-6)
    absent = np.ones(MANY, bool)
    absent[list(PRESENT)] = False
    assert set(np.asarray(counts["margins"])[absent]) == {0.5}
    assert counts["margins"][0] == pytest.approx(0.05)  # the largest class

    summary = json.loads((model_dir / "summary.json").read_text())
    assert summary["num_classes"] == MANY and summary["train_images"] == sum(PER_CLASS) + 3
    assert summary["dev_gap_final"] is not None
    with open(model_dir / "label_map.csv") as handle:
        assert label_map_lib.LabelMap.from_csv_text(handle.read()) == label_map
    classifier = keras.saving.load_model(str(model_dir / "model.keras"))
    images = np.zeros((2, IMAGE_SIZE, IMAGE_SIZE, 3), np.float32)
    probabilities = classifier.predict(images, verbose=0)
    assert probabilities.shape == (2, MANY)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    assert classifier.count_params() == model_lib.parameter_count(
        MANY, heads.SubCenterArcFaceHead(dimension=32))
    embedder = keras.saving.load_model(str(model_dir / "embedding.keras"))
    assert embedder.output_shape == (None, 32)
