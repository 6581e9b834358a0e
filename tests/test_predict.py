"""landmarks-predict end to end on the local runners, over data the tests make themselves.

The data (built once per module, see :func:`build_data`): three "landmarks" (original ids 11,
22, 33 -> classes 0, 1, 2) are three photographs bundled with scikit-image. References
(training records) exist for classes 0 and 1 only, so a test image predicted as class 2 takes
the "no references" path. The model is an untrained Xception at 71 px whose last Dense layer is
set by hand as a nearest-centroid classifier on the GeM embeddings of the test images' views, so
that each readable test image is predicted as its own landmark's class (checked by the builder
with ``rescoring.voting.vote``, independently of the pipeline). The test shards also hold an
undecodable JPEG, a record of another schema version (both must still get a row) and one
record that is not a ``tf.train.Example`` at all (counted; it has no id to give a row to).

Runners: ``FnApiRunner`` (in-process) for most runs, and one run on
``DirectRunner --direct_running_mode=multi_processing`` to prove the model loads in separate
worker processes: there a model with custom layers loads only when ``custom_objects`` are keyed
by the layer's registered name (``"landmarks>GeMPooling"``), which in-process runners hide.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import forward_effects

from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import outputs, pipeline, reference_cache
from beam_pipelines.predict.elements import FinalRow

IMAGE_SIZE = 71
LANDMARK_IDS = (11, 22, 33)


def _jpeg(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    return np.asarray(Image.fromarray(image).resize((width, height), Image.BILINEAR))


def _scenes() -> list[np.ndarray]:
    import skimage.data

    return [skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea()]


def _view(scene: np.ndarray, top: float, left: float, keep: float, side: int = 112) -> np.ndarray:
    """A crop covering ``keep`` of each side, starting at fractions (top, left), resized."""
    height, width = scene.shape[:2]
    crop_h, crop_w = int(height * keep), int(width * keep)
    y0, x0 = int((height - crop_h) * top), int((width - crop_w) * left)
    return _resized(scene[y0 : y0 + crop_h, x0 : x0 + crop_w], side, side)


@dataclasses.dataclass
class PredictData:
    root: Path
    model_path: Path
    label_map_path: Path
    test_glob: str
    reference_glob: str
    readable_test_ids: tuple[str, ...]
    all_test_ids: tuple[str, ...]  # every id that must get a row
    target_class: dict  # readable test id -> class index the model was set up to predict
    test_images: dict  # readable test id -> decoded uint8 image (as the pipeline decodes it)
    embedding_path: Path = None  # embedding.keras beside model.keras (the kNN recognizers')


def _decode(jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def build_data(root: Path, crops: int = 2) -> PredictData:
    """Writes model.keras + label_map.csv, test shards and reference shards under ``root``."""
    import keras

    from rescoring import crops as crops_lib
    from rescoring import voting
    from tfrecords_schema import image_record
    from tfrecords_schema.label_map import LabelMap
    from trainer import heads as heads_lib
    from trainer import model as model_lib
    from trainer.preprocessing import ImageContract
    from trainer.train import calibrate_batchnorm

    root.mkdir(parents=True, exist_ok=True)
    scenes = _scenes()

    # --- records -----------------------------------------------------------------------------
    def record(image_id, jpeg, label, landmark_id=-1, **kwargs):
        return image_record.ImageRecord(
            image_id=image_id, jpeg_bytes=jpeg, label=label, height=112, width=112,
            landmark_id=landmark_id, **kwargs,
        )

    references = []
    for class_index in (0, 1):  # class 2 deliberately has no references
        for index, (top, left) in enumerate(((0.0, 0.0), (0.5, 0.5), (1.0, 1.0))):
            references.append(record(
                f"ref{class_index}_{index}", _jpeg(_view(scenes[class_index], top, left, 0.8)),
                class_index, LANDMARK_IDS[class_index],
            ))
    references.append(record("distractor", _jpeg(_view(scenes[2], 0.5, 0.5, 0.5)), -1))
    reference_dir = root / "references"
    reference_dir.mkdir()
    image_record.write_shards(references, str(reference_dir / "train"), num_shards=2)

    test_jpegs = {
        "test_a": _jpeg(_view(scenes[0], 0.3, 0.4, 0.85)),
        "test_b": _jpeg(_view(scenes[1], 0.6, 0.2, 0.85)),
        "test_c": _jpeg(_view(scenes[2], 0.4, 0.4, 0.85)),
    }
    targets = {"test_a": 0, "test_b": 1, "test_c": 2}
    # A flat grey image: readable, predicted as some class, but no local features at all.
    test_jpegs["test_blank"] = _jpeg(np.full([112, 112, 3], 128, np.uint8))
    tests = [record(image_id, jpeg, -1) for image_id, jpeg in test_jpegs.items()]
    tests.append(record("test_corrupt_jpeg", b"\xff\xd8 definitely not a jpeg", -1))
    tests.append(record("test_old_schema", test_jpegs["test_a"], -1, schema_version=99))
    test_dir = root / "test"
    test_dir.mkdir()
    image_record.write_shards(tests, str(test_dir / "test"), num_shards=2)
    # A record that is not even a tf.train.Example: counted, cannot get a row (no id).
    with tf.io.TFRecordWriter(str(test_dir / "test-garbage.tfrecord")) as writer:
        writer.write(b"\x0a\xff\xff\xff garbage")

    # --- model: nearest-centroid head on the GeM embeddings of each test image's views ----------
    keras.utils.set_random_seed(1)
    model = model_lib.build_model(len(LANDMARK_IDS), IMAGE_SIZE, backbone_weights="none")
    embedder = model_lib.embedding_model(model)
    contract = ImageContract(IMAGE_SIZE)
    spec = crops_lib.CropSpec.for_num_views(crops)
    decoded = {image_id: _decode(jpeg) for image_id, jpeg in test_jpegs.items()}
    views = {
        image_id: contract.scale(crops_lib.make_views(image, IMAGE_SIZE, spec))
        for image_id, image in decoded.items()
    }
    # Without this every image has the same embedding to 7 digits, and the head below would
    # amplify float32 round-off into visible differences (see tests/forward_effects.py).
    calibrate_batchnorm(model, np.concatenate(list(views.values())))
    embeddings = {
        image_id: np.maximum(np.asarray(embedder.predict_on_batch(batch), np.float64), 0.0)
        for image_id, batch in views.items()
    }
    gain = forward_effects.head_gain(np.concatenate(list(embeddings.values())))
    if gain > 100:  # round-off of 1e-7 must stay far below the 1e-5 the checks can see
        raise RuntimeError(f"fixture model is ill-conditioned: head gain {gain:.3g}")
    centre = np.mean([embeddings[image_id].mean(axis=0) for image_id in targets], axis=0)
    kernel = np.zeros([centre.shape[0], len(LANDMARK_IDS)], np.float64)
    for image_id, class_index in targets.items():
        direction = embeddings[image_id].mean(axis=0) - centre
        kernel[:, class_index] = direction / np.linalg.norm(direction)
    # Bias centres each class's logit on the test set; scale makes sigmoid outputs spread out.
    logits = {image_id: (embeddings[image_id] - centre) @ kernel for image_id in targets}
    spread = max(np.abs(value).max() for value in logits.values())
    scale = 4.0 / spread
    bias = -centre @ kernel * scale
    model.get_layer("logits").set_weights(
        [(kernel * scale).astype(np.float32), bias.astype(np.float32)]
    )
    for image_id, class_index in targets.items():
        predicted, _ = voting.vote(np.asarray(model.predict_on_batch(views[image_id])))
        if predicted != class_index:
            raise RuntimeError(f"fixture model predicts {predicted} for {image_id}, want {class_index}")

    model_dir = root / "model"
    model_dir.mkdir()
    model_path = model_dir / "model.keras"
    model.save(str(model_path))
    # embedding.keras as landmarks-train writes it (trainer.train.export_model): the head's
    # embedding model on the same weights, here the sigmoid head's L2-normalised GeM output.
    embedding_path = model_dir / "embedding.keras"
    heads_lib.SigmoidHead().embedding_model(model).save(str(embedding_path))
    label_map_path = model_dir / "label_map.csv"
    label_map_path.write_text(LabelMap.from_landmark_ids(LANDMARK_IDS).to_csv_text())

    return PredictData(
        root=root,
        model_path=model_path,
        label_map_path=label_map_path,
        test_glob=str(test_dir / "test-*.tfrecord"),
        reference_glob=str(reference_dir / "train-*.tfrecord"),
        readable_test_ids=tuple(sorted(test_jpegs)),
        all_test_ids=tuple(sorted(list(test_jpegs) + ["test_corrupt_jpeg", "test_old_schema"])),
        target_class=targets,
        test_images=decoded,
        embedding_path=embedding_path,
    )


# ---- helpers ----------------------------------------------------------------------------------

BLEND_WEIGHT = 0.15
REFERENCES_PER_CLASS = 2  # of the 3 candidates per class: the sampling must choose


def _args(data: PredictData, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--model", str(data.model_path),
        "--test_data", data.test_glob,
        "--reference_data", data.reference_glob,
        "--output_dir", str(output_dir),
        "--references_per_class", str(REFERENCES_PER_CLASS),
        "--blend_weight", str(BLEND_WEIGHT),
        # The classifier recognizer as the recipe: only the crop vote's class is verified
        # (several candidates: test_candidates.py).
        *(() if "--recognizer" in extra else ("--rerank_top", "1")),
        *extra,
    ]


def _read_scores(output_dir: Path) -> dict[str, dict]:
    with open(output_dir / "scores.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["id"] for row in rows] == sorted(row["id"] for row in rows)
    return {row["id"]: row for row in rows}


def _direct_votes(data: PredictData, num_views: int) -> dict[str, tuple[int, float]]:
    """Crop voting computed without Beam: views -> scale -> the saved model -> vote."""
    from rescoring import voting

    model = _saved_model(data)
    return {image_id: voting.vote(np.asarray(model.predict_on_batch(views)))
            for image_id, views in _scaled_views(data, num_views).items()}


def _saved_model(data: PredictData):
    from beam_pipelines.predict import model_handler

    return model_handler.load_keras_model(str(data.model_path))


def _scaled_views(data: PredictData, num_views: int) -> dict[str, np.ndarray]:
    from rescoring import crops
    from trainer.preprocessing import ImageContract

    spec = crops.CropSpec.for_num_views(num_views)
    contract = ImageContract(IMAGE_SIZE)
    return {image_id: contract.scale(crops.make_views(image, IMAGE_SIZE, spec))
            for image_id, image in data.test_images.items()}


def _batching_spread(data: PredictData, num_views: int, batch_images: int) -> float:
    """How far batching moves the voted confidences on this machine (forward_effects.py)."""
    return forward_effects.batching_spread(
        _saved_model(data), _scaled_views(data, num_views), batch_images)


def _check_consistency(data: PredictData, output_dir: Path) -> dict[str, dict]:
    """Checks that hold for every run: rows, labels, blend formula, submission == scores."""
    from rescoring import submission

    predictions = submission.check_submission(
        (output_dir / "submission.csv").read_text(), data.all_test_ids
    )
    assert sorted(predictions) == sorted(data.all_test_ids)  # every id exactly once
    scores = _read_scores(output_dir)
    assert sorted(scores) == sorted(data.all_test_ids)
    readable = [scores[image_id] for image_id in data.readable_test_ids]
    local_max_top = max(float(row["local_max"]) for row in readable)
    for image_id in data.readable_test_ids:
        row = scores[image_id]
        assert int(row["label"]) == int(row["nn_label"]) and int(row["label"]) in LANDMARK_IDS
        normalised = float(row["local_max"]) / local_max_top if local_max_top > 0 else 0.0
        expected = (1 - BLEND_WEIGHT) * normalised + BLEND_WEIGHT * float(row["nn_confidence"])
        assert float(row["final_score"]) == pytest.approx(expected, rel=1e-12, abs=1e-15)
        assert predictions[image_id] == (int(row["label"]), float(row["final_score"]))
        assert 0 <= float(row["local_mean"]) <= float(row["local_best_half"]) <= float(row["local_max"])
    for image_id in ("test_corrupt_jpeg", "test_old_schema"):
        assert predictions[image_id] is None
        assert scores[image_id]["label"] == "" and float(scores[image_id]["final_score"]) == 0.0
    assert (output_dir / "_SUCCESS").exists()
    return scores


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> PredictData:
    return build_data(tmp_path_factory.mktemp("predict") / "data", crops=2)


@pytest.fixture(scope="module")
def first_run(data) -> dict:
    """The whole job once, in process (FnApiRunner), 2 views per image."""
    output_dir = data.root / "runs" / "first"
    summary = pipeline.run(_args(data, output_dir, "--crops", "2", "--runner=FnApiRunner"))
    return {"summary": summary, "output_dir": output_dir}


# ---- end to end -------------------------------------------------------------------------------


@pytest.mark.slow
def test_whole_job_rows_labels_and_scores(data, first_run):
    output_dir = first_run["output_dir"]
    scores = _check_consistency(data, output_dir)
    # Each readable image predicted as its landmark, reported with the ORIGINAL landmark id.
    for image_id, class_index in data.target_class.items():
        assert int(scores[image_id]["label"]) == LANDMARK_IDS[class_index]
    # test_a shows the astronaut scene its class's references show: geometric matches.
    assert float(scores["test_a"]["local_max"]) > 0
    # Class 2 has no references: local scores 0, classifier confidence kept and blended.
    row_c = scores["test_c"]
    assert [float(row_c[key]) for key in ("local_max", "local_mean", "local_best_half")] == [0, 0, 0]
    direct = _direct_votes(data, 2)
    spread = _batching_spread(data, 2, config_lib.DEFAULT_BATCH_IMAGES)
    forward_effects.assert_close_to_measured(
        float(row_c["nn_confidence"]), direct["test_c"][1], spread)
    assert float(row_c["final_score"]) == pytest.approx(BLEND_WEIGHT * float(row_c["nn_confidence"]))
    # The featureless image: local scores 0, its own classifier confidence kept.
    row_blank = scores["test_blank"]
    assert float(row_blank["local_max"]) == 0.0
    forward_effects.assert_close_to_measured(
        float(row_blank["nn_confidence"]), direct["test_blank"][1], spread)
    assert int(row_blank["nn_label"]) == LANDMARK_IDS[direct["test_blank"][0]]

    stats = json.loads((output_dir / "stats.json").read_text())
    assert stats["test_images"] == 6 == stats["predicted"] + stats["unreadable"]
    assert (stats["predicted"], stats["unreadable"]) == (4, 2)
    assert stats["predicted"] == (
        stats["with_references"] + stats["without_references"] + stats["without_features"])
    assert stats["without_features"] == 1
    assert stats["unparseable_test_records"] == 1
    assert stats["features_per_image"]["images"] == 4
    assert (stats["features_per_image"]["min"], stats["features_per_image"]["zero"]) == (0, 1)
    assert stats["reference_features"]["reused"] is False
    assert stats["reference_features"]["num_images"] == 2 * REFERENCES_PER_CLASS
    recorded = json.loads((output_dir / "config.json").read_text())
    resolved = recorded["config"]
    assert (resolved["image_size"], resolved["num_classes"]) == (IMAGE_SIZE, 3)
    assert recorded["beam_args"] == ["--runner=FnApiRunner"]  # the Beam flags that were passed
    assert first_run["summary"]["test_images"] == 6


@pytest.mark.slow
def test_reference_sample_is_k_smallest_sha1_per_class(data, first_run):
    from tfrecords_schema.local_features import parse_features

    config = json.loads((first_run["output_dir"] / "config.json").read_text())["config"]
    directory = Path(config["reference_features"])
    assert directory.parent == first_run["output_dir"].parent  # beside the run, not inside
    records = [
        parse_features(serialized)
        for path in sorted(directory.glob("features-*.tfrecord"))
        for serialized in tf.data.TFRecordDataset(str(path)).as_numpy_iterator()
    ]
    chosen = {(record.label, record.image_id) for record in records}
    expected = set()
    for class_index in (0, 1):
        ids = [f"ref{class_index}_{index}" for index in range(3)]
        ids.sort(key=lambda image_id: hashlib.sha1(image_id.encode()).hexdigest())
        expected |= {(class_index, image_id) for image_id in ids[:REFERENCES_PER_CLASS]}
    assert chosen == expected  # the distractor (label -1) and class 2 (none) are absent
    assert all(record.extractor == "orb" and record.num_features > 0 for record in records)
    metadata = json.loads((directory / "metadata.json").read_text())
    assert (metadata["extractor"], metadata["references_per_class"]) == ("orb", REFERENCES_PER_CLASS)


@pytest.mark.slow
def test_pipeline_voting_equals_rescoring_vote(data, first_run):
    """nn_label / nn_confidence from RunInference batches == vote() on per-view outputs."""
    scores = _read_scores(first_run["output_dir"])
    spread = _batching_spread(data, 2, config_lib.DEFAULT_BATCH_IMAGES)
    for image_id, (class_index, confidence) in _direct_votes(data, 2).items():
        assert int(scores[image_id]["nn_label"]) == LANDMARK_IDS[class_index]
        forward_effects.assert_close_to_measured(
            float(scores[image_id]["nn_confidence"]), confidence, spread)


@pytest.mark.slow
def test_second_run_reuses_reference_features_with_22_crops(data, first_run):
    output_dir = data.root / "runs" / "second"
    output_dir.mkdir(parents=True)
    (output_dir / "stale.txt").write_text("from an older run")
    summary = pipeline.run(
        _args(data, output_dir, "--crops", "22", "--batch_images", "2", "--overwrite",
              "--runner=FnApiRunner")
    )
    assert not (output_dir / "stale.txt").exists()
    assert summary["reference_features"]["reused"] is True
    assert "match" in summary["reference_features"]["reason"]
    scores = _check_consistency(data, output_dir)
    spread = _batching_spread(data, 22, 2)
    for image_id, (class_index, confidence) in _direct_votes(data, 22).items():
        assert int(scores[image_id]["nn_label"]) == LANDMARK_IDS[class_index]
        forward_effects.assert_close_to_measured(
            float(scores[image_id]["nn_confidence"]), confidence, spread)


@pytest.mark.slow
def test_separate_worker_processes_load_the_model(data, first_run):
    """multi_processing: RunInference loads model.keras (custom GeM layer) in worker processes."""
    output_dir = data.root / "runs" / "multiprocess"
    pipeline.run(
        _args(data, output_dir, "--crops", "2", "--runner=DirectRunner",
              "--direct_running_mode=multi_processing", "--direct_num_workers=2")
    )
    _check_consistency(data, output_dir)
    assert _read_scores(output_dir) == _read_scores(first_run["output_dir"])


# ---- bad input: one-line errors, exit 2, before any pipeline ----------------------------------


def _main_error(capsys, argv) -> str:
    assert pipeline.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("landmarks-predict: error:") and "\n" not in error
    return error


@pytest.mark.slow
def test_bad_inputs_exit_2_with_one_line(data, tmp_path, capsys):
    missing = _args(data, tmp_path / "out_missing")
    missing[missing.index("--model") + 1] = str(tmp_path / "nowhere" / "model.keras")
    assert "model not found" in _main_error(capsys, missing + ["--label_map", str(data.label_map_path)])

    bad_map = tmp_path / "label_map.csv"
    from tfrecords_schema.label_map import LabelMap

    bad_map.write_text(LabelMap.from_landmark_ids([1, 2, 3, 4]).to_csv_text())
    error = _main_error(capsys, _args(data, tmp_path / "out_map", "--label_map", str(bad_map)))
    assert "3 classes" in error and "4 landmark ids" in error

    no_tests = _args(data, tmp_path / "out_none")
    no_tests[no_tests.index("--test_data") + 1] = str(tmp_path / "nothing-*.tfrecord")
    assert "no test files match" in _main_error(capsys, no_tests)

    assert "--crops" in _main_error(capsys, _args(data, tmp_path / "out_crops", "--crops", "5"))

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert "--overwrite" in _main_error(capsys, _args(data, busy))
    assert (busy / "keep.txt").exists()


# ---- pure parts -------------------------------------------------------------------------------


def test_default_reference_features_folder_is_beside_the_output(tmp_path):
    config = config_lib.PredictConfig(
        model=str(tmp_path / "m" / "model.keras"), test_data="t", reference_data="r",
        output_dir=str(tmp_path / "runs" / "one"),
    )
    assert config.reference_features == str(tmp_path / "runs" / "reference_features")
    assert config.label_map == str(tmp_path / "m" / "label_map.csv")
    gcs = config_lib.PredictConfig(model="gs://b/m/model.keras", test_data="t",
                                   reference_data="r", output_dir="gs://b/runs/one/")
    assert gcs.reference_features == "gs://b/runs/reference_features"
    with pytest.raises(ValueError, match="--references_per_class"):
        dataclasses.replace(config, references_per_class=0)
    with pytest.raises(ValueError, match="--test_data lies inside --output_dir"):
        dataclasses.replace(config, test_data=str(tmp_path / "runs" / "one" / "test-*.tfrecord"))
    with pytest.raises(ValueError, match="outside --output_dir"):
        dataclasses.replace(config, reference_features=str(tmp_path / "runs" / "one" / "refs"))


def _row(image_id, status, score, label=11):
    return FinalRow(image_id, status, label, 0.5, 1.0, 1.0, 1.0, score, label, 10, 2)


def test_one_row_per_id_prefers_readable_then_higher_score():
    rows = [
        _row("b", "unreadable", 0.0, None),
        _row("a", "scored", 0.2),
        _row("b", "no_references", 0.1),
        _row("a", "scored", 0.7, 22),
    ]
    kept, duplicates = outputs.one_row_per_id(rows)
    assert duplicates == 2
    assert [(row.image_id, row.final_score, row.label) for row in kept] == [
        ("a", 0.7, 22), ("b", 0.1, 11)]
    text = outputs.scores_csv(kept)
    assert text.splitlines()[0] == ",".join(outputs.SCORES_HEADER)
    assert text.splitlines()[1] == "a,22,0.5,1.0,1.0,1.0,0.7,22"


def test_reference_cache_reused_only_when_everything_matches(tmp_path):
    from beam_pipelines import io_utils

    shard = tmp_path / "train-00000-of-00001.tfrecord"
    shard.write_bytes(b"x" * 10)
    pattern = str(tmp_path / "train-*.tfrecord")
    directory = tmp_path / "reference_features"
    directory.mkdir()
    wanted = reference_cache.cache_metadata("orb", 32, 3, pattern)
    assert reference_cache.reuse_decision(str(directory), wanted)[0] is False  # no _SUCCESS
    (directory / "features-00000-of-00001.tfrecord").write_bytes(b"")
    reference_cache.finish(str(directory), wanted, 0)
    assert reference_cache.reuse_decision(str(directory), wanted) == (
        True, "extractor, K, classes and reference files match")
    other_k = reference_cache.cache_metadata("orb", 16, 3, pattern)
    reuse, reason = reference_cache.reuse_decision(str(directory), other_k)
    assert not reuse and "references_per_class" in reason
    shard.write_bytes(b"x" * 11)  # the reference data changed size
    reuse, reason = reference_cache.reuse_decision(str(directory), reference_cache.cache_metadata(
        "orb", 32, 3, pattern))
    assert not reuse and "reference-data files" in reason
    # A folder that is not a cache is never emptied.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="refusing"):
        reference_cache.clear_for_recompute(str(foreign))
    assert io_utils.exists(str(foreign / "thesis.tex"))
