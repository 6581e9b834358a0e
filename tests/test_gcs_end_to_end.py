"""landmarks-ingest then landmarks-predict with every file on ``gs://`` (storage emulator).

Manifests, images, the ingested TFRecords, the model folder, the reference features and the
prediction outputs all live in one bucket of ``gcp-storage-emulator`` on 127.0.0.1 (fixture
``gcs_emulator`` in ``tests/remote_servers.py``). Every read and write of the two jobs goes
through Beam's FileSystems, which reach the emulator; ``model.keras`` is copied to a local
temporary file through FileSystems before Keras opens it (``model_handler.load_keras_model``),
so it can live on ``gs://`` too. Only this test's own checks copy shards to a local folder to
parse them (TensorFlow's file layer, ``tf.io.gfile``, has a fixed GCS endpoint and cannot be
pointed at an emulator).

Data: three "landmarks" are three photographs bundled with scikit-image (helpers from
``test_predict``); the train manifest holds three views of each plus a missing file, the test
manifest four new views plus a missing file. The model is an untrained Xception at 71 px with
the ingested label map beside it, as ``landmarks-train`` leaves it: the checks are about
plumbing (every id once, counts that reconcile, markers) plus the classifier part of each row
recomputed without Beam from the records read back.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

import forward_effects
from beam_pipelines import io_utils
from beam_pipelines.ingest import pipeline as ingest
from beam_pipelines.predict import pipeline as predict
from beam_pipelines.predict.config import DEFAULT_BLEND_WEIGHT
from test_predict import IMAGE_SIZE, _jpeg, _scenes, _view

RUNNER = "--runner=FnApiRunner"  # in-process; the default runner looks for a binary online
LANDMARK_IDS = (101, 202, 303)
TRAIN_VIEWS = ((0.0, 0.0), (0.5, 0.5), (1.0, 1.0))  # (top, left) of each reference view
TEST_VIEWS = {"q0": (0, 0.3, 0.4), "q1": (1, 0.6, 0.2), "q2": (2, 0.4, 0.4), "q3": (0, 0.8, 0.1)}
REFERENCES_PER_CLASS = 2


def _copy_local(gcs_pattern: str, folder: Path) -> str:
    """Copies the files matching a ``gs://`` glob into ``folder``; returns a local glob."""
    folder.mkdir(parents=True)
    paths = io_utils.match(gcs_pattern)
    assert paths, gcs_pattern
    for path in paths:
        (folder / path.rsplit("/", 1)[1]).write_bytes(io_utils.read_bytes(path))
    return str(folder / "*")


def _upload_dataset(gcs) -> tuple[str, str, list[np.ndarray]]:
    """Images and the two manifests on the emulator.

    Returns (train manifest, test manifest, the test images as uint8 RGB arrays).
    """
    scenes = _scenes()
    train_lines = ["id,url,landmark_id"]
    for class_index, landmark_id in enumerate(LANDMARK_IDS):
        for view_index, (top, left) in enumerate(TRAIN_VIEWS):
            name = f"images/train_{class_index}_{view_index}.jpg"
            gcs.upload(f"data/{name}", _jpeg(_view(scenes[class_index], top, left, 0.8)))
            train_lines.append(f"t{class_index}_{view_index},{name},{landmark_id}")
    train_lines.append("t_missing,images/nowhere.jpg,101")
    test_lines, test_images = ["id,url"], []
    for image_id, (scene_index, top, left) in TEST_VIEWS.items():
        name = f"images/{image_id}.jpg"
        test_images.append(_view(scenes[scene_index], top, left, 0.85))
        gcs.upload(f"data/{name}", _jpeg(test_images[-1]))
        test_lines.append(f"{image_id},{name}")
    test_lines.append("q_missing,images/nowhere.jpg")
    return (gcs.upload("data/train.csv", "\n".join(train_lines) + "\n"),
            gcs.upload("data/test.csv", "\n".join(test_lines) + "\n"), test_images)


def _ingest(manifest: str, output_dir: str) -> dict:
    stats = ingest.run(["--manifest", manifest, "--output_dir", output_dir, "--num_shards", "2",
                        "--max_side", "112", "--no_tfds_metadata", RUNNER])
    assert io_utils.has_success_marker(output_dir)
    written = json.loads(io_utils.read_text(io_utils.join(output_dir, "stats.json")))
    assert written["rows_in"] == written["written"] + written["rejected"]
    assert written["rejected_per_reason"] == {"missing_file": 1}
    return stats


def _views(image: np.ndarray) -> np.ndarray:
    """The pipeline's 2 views of one uint8 image, scaled: float32 ``[2, 71, 71, 3]``."""
    from rescoring import crops
    from trainer.preprocessing import ImageContract

    spec = crops.CropSpec.for_num_views(2)
    return ImageContract(IMAGE_SIZE).scale(crops.make_views(image, IMAGE_SIZE, spec))


def _save_model(local_dir: Path, gcs, label_map_text: str, images: list[np.ndarray]) -> str:
    """Untrained 71 px model + the ingested label map in a ``gs://`` model folder.

    An untrained head says ~0.5 for every class of every image, which would make the
    per-image checks blind to rows swapped between images; the head is set to a seeded random
    projection of the GeM embeddings, scaled so that its outputs spread out on ``images``.
    """
    import keras

    from trainer import model as model_lib
    from trainer.train import calibrate_batchnorm

    keras.utils.set_random_seed(3)
    model = model_lib.build_model(len(LANDMARK_IDS), IMAGE_SIZE, backbone_weights="none")
    batch = np.concatenate([_views(image) for image in images])
    # A well-conditioned head: see tests/forward_effects.py.
    calibrate_batchnorm(model, batch)
    embeddings = np.asarray(model_lib.embedding_model(model).predict_on_batch(batch), np.float64)
    gain = forward_effects.head_gain(embeddings)
    assert gain < 100, f"fixture model is ill-conditioned: head gain {gain:.3g}"
    kernel = np.random.default_rng(3).normal(size=[embeddings.shape[1], len(LANDMARK_IDS)])
    logits = embeddings @ kernel
    centre = logits.mean(axis=0)
    scale = 3.0 / np.abs(logits - centre).max()
    model.get_layer("logits").set_weights(
        [(kernel * scale).astype(np.float32), (-centre * scale).astype(np.float32)])
    local_dir.mkdir()
    model.save(str(local_dir / "model.keras"))
    gcs.upload("models/m1/label_map.csv", label_map_text)
    return gcs.upload("models/m1/model.keras", (local_dir / "model.keras").read_bytes())


def _direct_votes(model_path: Path, records) -> tuple[dict[str, tuple[int, float]], float]:
    """Crop voting without Beam: decode -> 2 views -> scale -> model -> vote; and how far the
    job's batching (up to 4 images per forward pass) can move the votes on this machine."""
    from PIL import Image

    from beam_pipelines.predict import config as predict_config
    from beam_pipelines.predict import model_handler
    from rescoring import voting

    model = model_handler.load_keras_model(str(model_path))
    views = {record.image_id: _views(np.asarray(Image.open(io.BytesIO(record.jpeg_bytes))
                                                .convert("RGB")))
             for record in records}
    votes = {image_id: voting.vote(np.asarray(model.predict_on_batch(image_views)))
             for image_id, image_views in views.items()}
    spread = forward_effects.batching_spread(model, views, predict_config.DEFAULT_BATCH_IMAGES)
    return votes, spread


@pytest.mark.slow
def test_ingest_and_predict_with_everything_on_gcs(gcs_emulator, tmp_path):
    from rescoring import submission
    from tfrecords_schema.image_record import read_records
    from tfrecords_schema.label_map import LabelMap
    from tfrecords_schema.local_features import parse_features

    gcs = gcs_emulator
    train_manifest, test_manifest, test_images = _upload_dataset(gcs)

    # --- ingest, twice -------------------------------------------------------------------------
    train_dir, test_dir = gcs.path("records/train"), gcs.path("records/test")
    train_stats = _ingest(train_manifest, train_dir)
    assert (train_stats["rows_in"], train_stats["written"]) == (10, 9)
    test_stats = _ingest(test_manifest, test_dir)
    assert (test_stats["rows_in"], test_stats["written"]) == (5, 4)
    assert test_stats["written_per_split"] == {"test": 4}
    label_map_text = io_utils.read_text(io_utils.join(train_dir, "label_map.csv"))
    assert LabelMap.from_csv_text(label_map_text).landmark_ids == LANDMARK_IDS

    # --- predict: model, data, reference features and outputs on gs:// ------------------------
    model_path = _save_model(tmp_path / "model", gcs, label_map_text, test_images)
    output_dir = gcs.path("predict/run1")
    features_dir = gcs.path("predict/reference_features")

    def predict_run(run_dir: str) -> dict:
        return predict.run([
            "--model", model_path,  # label_map.csv beside it (the default)
            "--test_data", io_utils.join(test_dir, "test-*.tfrecord"),
            "--reference_data", io_utils.join(train_dir, "train-*.tfrecord"),
            "--reference_features", features_dir,
            "--output_dir", run_dir,
            "--references_per_class", str(REFERENCES_PER_CLASS),
            "--crops", "2", "--rerank_top", "1", RUNNER,  # the recipe: its blend is checked below
        ])

    summary = predict_run(output_dir)

    test_ids = sorted(TEST_VIEWS)
    predictions = submission.check_submission(
        io_utils.read_text(io_utils.join(output_dir, "submission.csv")), test_ids)
    assert sorted(predictions) == test_ids  # every test id exactly once
    scores_rows = list(csv.DictReader(io.StringIO(
        io_utils.read_text(io_utils.join(output_dir, "scores.csv")))))
    assert [row["id"] for row in scores_rows] == test_ids  # once each, sorted
    scores = {row["id"]: row for row in scores_rows}

    # The classifier half of every row, recomputed without Beam from the records on gs://.
    test_records = list(read_records(_copy_local(io_utils.join(test_dir, "test-*.tfrecord"),
                                                 tmp_path / "test_copy")))
    assert sorted(record.image_id for record in test_records) == test_ids
    votes, spread = _direct_votes(tmp_path / "model" / "model.keras", test_records)
    assert len({round(confidence, 4) for _, confidence in votes.values()}) == len(test_ids)
    for image_id, (class_index, confidence) in votes.items():
        row = scores[image_id]
        assert int(row["nn_label"]) == LANDMARK_IDS[class_index]
        forward_effects.assert_close_to_measured(float(row["nn_confidence"]), confidence, spread)
        assert predictions[image_id] == (int(row["label"]), float(row["final_score"]))
    # The blend over the whole test set: final = (1 - w) * local_max / top local_max + w * nn.
    top_local = max(float(row["local_max"]) for row in scores_rows)
    assert top_local > 0  # some test views matched their references geometrically
    for row in scores_rows:
        expected = ((1 - DEFAULT_BLEND_WEIGHT) * float(row["local_max"]) / top_local
                    + DEFAULT_BLEND_WEIGHT * float(row["nn_confidence"]))
        assert float(row["final_score"]) == pytest.approx(expected, rel=1e-9)

    stats = json.loads(io_utils.read_text(io_utils.join(output_dir, "stats.json")))
    assert stats["test_images"] == 4 == stats["predicted"] + stats["unreadable"]
    assert stats["unreadable"] == 0
    assert stats["predicted"] == (
        stats["with_references"] + stats["without_references"] + stats["without_features"])
    assert stats["without_references"] == 0  # every class has references
    assert stats["reference_features"]["reused"] is False
    assert stats["reference_features"]["num_images"] == REFERENCES_PER_CLASS * len(LANDMARK_IDS)
    assert summary["test_images"] == 4
    config = json.loads(io_utils.read_text(io_utils.join(output_dir, "config.json")))["config"]
    assert config["reference_features"] == features_dir
    assert config["label_map"] == gcs.path("models/m1/label_map.csv")

    # Reference features: on gs://, complete (marker), K per class, from training records.
    assert io_utils.has_success_marker(features_dir)
    local_features = _copy_local(io_utils.join(features_dir, "features-*.tfrecord"),
                                 tmp_path / "features_copy")
    feature_records = [
        parse_features(serialized)
        for serialized in tf.data.TFRecordDataset(tf.io.gfile.glob(local_features))
        .as_numpy_iterator()
    ]
    per_class = {}
    for record in feature_records:
        assert record.image_id.startswith(f"t{record.label}_")
        per_class[record.label] = per_class.get(record.label, 0) + 1
    assert per_class == {0: REFERENCES_PER_CLASS, 1: REFERENCES_PER_CLASS, 2: REFERENCES_PER_CLASS}

    # Success markers written last in every run folder; nothing else left in the bucket.
    for folder in (train_dir, test_dir, output_dir, features_dir):
        assert io_utils.has_success_marker(folder), folder
    names = gcs.list_names("predict/run1/")
    assert sorted(name.rsplit("/", 1)[1] for name in names) == [
        "_SUCCESS", "config.json", "scores.csv", "stats.json", "submission.csv"]
    assert not [name for name in gcs.list_names() if "beam-temp" in name]
    # Nothing landed in a local folder named after a URL (os.makedirs("gs://...") makes "gs:").
    assert not Path("gs:").exists() and not list(tmp_path.rglob("gs:*"))

    # A second run finds the cached reference features on gs:// (metadata and the reference
    # shards' sizes are read through FileSystems) and reproduces the first run's scores.
    second = predict_run(gcs.path("predict/run2"))
    assert second["reference_features"]["reused"] is True
    assert io_utils.read_text(gcs.path("predict/run2/scores.csv")) == io_utils.read_text(
        io_utils.join(output_dir, "scores.csv"))
    assert io_utils.has_success_marker(gcs.path("predict/run2"))
