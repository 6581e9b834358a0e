"""``landmarks-ingest --input_tfrecords``, failing runs (exit code 4), and foreign-layout errors.

- Pure parts: :func:`tfrecord_input.convert_record` on every kind of record, the layout
  detection of ``tfrecords_schema``, and ``stats``' aggregation of rejection reasons.
- Two conversion runs on Beam's FnApiRunner, shared by module-scoped fixtures: DELF-layout
  shards written here (``train-00000-of-00002``, ...) with labelled, unlabelled, bad and
  duplicated records; then this project's own layout (the first run's output plus a shard
  written here).
- Two failing manifest runs through ``main``: every row rejected, and a rejected share above
  ``--max_rejected_fraction``.
- Readers meeting DELF records: trainer.data and the predict job's reader name the layout and
  the conversion command.
"""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from beam_pipelines import io_utils
from beam_pipelines.ingest import pipeline, split, stats as stats_lib, tfrecord_input
from beam_pipelines.ingest.manifest import ORIGIN_TFRECORD, ManifestRow, keep_first
from beam_pipelines.ingest.normalise import NormaliseParams, normalise_image
from beam_pipelines.predict import transforms as predict_transforms
import tfrecords_schema
from tfrecords_schema import image_record
from tfrecords_schema.image_record import ImageRecord, read_records
from tfrecords_schema.label_map import LabelMap, read_label_map
from trainer import data as train_data
from trainer.preprocessing import ImageContract
from test_ingest_normalise import encode, photo_like

RUNNER = "--runner=FnApiRunner"
MAX_SIDE = 48


# ------------------------------------------------------------------------------------------
# Records in DELF's layout (keys and types of build_image_dataset.py's _convert_to_example)
# ------------------------------------------------------------------------------------------


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def delf_example(image_id: str, image: bytes | None, label=None, height=40, width=60,
                 **extra) -> bytes:
    """A serialised record as DELF writes it (``label`` None: a test record, no label key)."""
    features = {
        "image/height": _int(height), "image/width": _int(width),
        "image/colorspace": _bytes(b"RGB"), "image/channels": _int(3),
        "image/format": _bytes(b"JPEG"), "image/id": _bytes(image_id.encode()),
    }
    if image is not None:
        features["image/encoded"] = _bytes(image)
    if label is not None:
        if not isinstance(label, tf.train.Feature):
            label = _int(label)
        features["image/class/label"] = label
    features.update(extra)
    return tf.train.Example(features=tf.train.Features(feature=features)).SerializeToString()


def write_tfrecord(path, records) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for record in records:
            writer.write(record)


def jpeg(seed: int, width: int = 60, height: int = 40) -> bytes:
    return encode(photo_like(width, height, seed), "JPEG", quality=92)


def decode(image_bytes: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(image_bytes)).convert("RGB"), dtype=np.float64)


def read_rejected(path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def records_of(folder, split_name: str) -> dict[str, ImageRecord]:
    paths = sorted(folder.glob(f"{split_name}-*.tfrecord"))
    return {r.image_id: r for path in paths for r in read_records(str(path))}


# ------------------------------------------------------------------------------------------
# Pure: convert_record
# ------------------------------------------------------------------------------------------


def test_convert_delf_training_and_test_records():
    image = jpeg(1)
    converted = tfrecord_input.convert_record(delf_example("abc123", image, label=138982))
    assert converted == tfrecord_input.ConvertedRecord("abc123", 138982, image,
                                                       image_record.LAYOUT_DELF)
    assert converted.image_bytes == image
    unlabelled = tfrecord_input.convert_record(delf_example("t1", image))
    assert (unlabelled.image_id, unlabelled.landmark_id, unlabelled.layout) == (
        "t1", None, image_record.LAYOUT_DELF)
    # DELF's docstring names the id key image/filename: accepted too.
    legacy = tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": _bytes(image), "image/filename": _bytes(b"f1"),
        "image/class/label": _int(3)})).SerializeToString()
    assert tfrecord_input.convert_record(legacy).image_id == "f1"


def test_convert_this_projects_layout():
    image = jpeg(2)
    own = ImageRecord(image_id="o1", jpeg_bytes=image, label=4, height=40, width=60,
                      landmark_id=777)
    converted = tfrecord_input.convert_record(image_record.serialize_record(own))
    assert (converted.image_id, converted.landmark_id, converted.layout) == (
        "o1", 777, image_record.LAYOUT_LANDMARKS)  # the landmark id, not the class index
    distractor = ImageRecord(image_id="d1", jpeg_bytes=image, label=-1, height=40, width=60)
    converted = tfrecord_input.convert_record(image_record.serialize_record(distractor))
    assert converted.landmark_id == -1
    other = ImageRecord(image_id="v2", jpeg_bytes=image, label=1, height=40, width=60,
                        landmark_id=5, schema_version=2)
    rejected = tfrecord_input.convert_record(image_record.serialize_record(other))
    assert (rejected.reason, rejected.image_id) == ("schema_version", "v2")
    assert "version 2" in rejected.detail


@pytest.mark.parametrize("serialized, reason, detail", [
    (b"\xff\x00 definitely not a proto", "not_an_example", "not a tf.train.Example"),
    (b"", "not_an_example", "without any feature"),
    (delf_example("x1", None, label=5), "missing_key", "'image/encoded' absent; record in "
     "the layout of DELF's build_image_dataset.py"),
    (tf.train.Example(features=tf.train.Features(feature={
        "image/encoded": _bytes(b"x"), "image/class/label": _int(5)})).SerializeToString(),
     "missing_key", "no 'image/id' key"),
    (delf_example("../evil", b"x", label=5), "unsafe_id", "id must match"),
    (delf_example("", b"x", label=5), "empty_id", "empty 'image/id'"),
    (delf_example("n1", b"x", label=-3), "bad_label", "is -3, below 0"),
    (delf_example("n2", b"x", label=_bytes(b"12")), "bad_label", "holds bytes values"),
    (delf_example("n3", b"x", label=tf.train.Feature(int64_list=tf.train.Int64List(value=[1, 2]))),
     "bad_label", "holds 2 values"),
])
def test_convert_rejects_with_a_reason(serialized, reason, detail):
    rejected = tfrecord_input.convert_record(serialized)
    assert isinstance(rejected, tfrecord_input.RecordRejected)
    assert rejected.reason == reason and detail in rejected.detail, rejected
    assert rejected.reason in tfrecord_input.REASONS | {"unsafe_id", "empty_id", "bad_label"}


def test_layout_detection_and_description():
    delf_train = ["image/encoded", "image/id", "image/class/label", "image/height"]
    delf_test = ["image/encoded", "image/id", "image/colorspace", "image/channels"]
    own = [key for key, _, _ in image_record.FIELDS]
    assert image_record.detect_layout(delf_train) == image_record.LAYOUT_DELF
    assert image_record.detect_layout(delf_test) == image_record.LAYOUT_DELF
    assert image_record.detect_layout(own) == image_record.LAYOUT_LANDMARKS
    assert image_record.detect_layout(["foo", "image/id"]) == image_record.LAYOUT_UNKNOWN
    assert image_record.describe_layout(delf_train) == (
        "the layout of DELF's build_image_dataset.py (no schema/version key)")
    unknown = image_record.describe_layout(["image/id", "foo"])
    assert "unknown layout (keys: foo, image/id" in unknown
    assert image_record.conversion_hint("g/train-*") == (
        "convert it with: landmarks-ingest --input_tfrecords 'g/train-*' --output_dir DIR")


def test_keep_first_among_tfrecord_rows_is_deterministic():
    rows = [ManifestRow("a", f"in/f{index % 2}", 5, 0, ORIGIN_TFRECORD, data=bytes([index]))
            for index in range(4)]
    kept, rejected = keep_first(rows)
    assert keep_first(list(reversed(rows)))[0] == kept
    assert kept.url == "in/f0" and len(rejected) == 3
    assert {r.reason for r in rejected} == {"duplicate_id"}
    assert rejected[0].detail == "id already used at a record in in/f0"


# ------------------------------------------------------------------------------------------
# Pure: aggregating rejection reasons, deciding failure
# ------------------------------------------------------------------------------------------


def test_counts_keep_one_example_per_reason_whatever_the_merge_order():
    events = [stats_lib.Outcome(stats_lib.ROW_IN) for _ in range(4)] + [
        stats_lib.Outcome(stats_lib.REJECTED, "missing_file", image_id=i, detail=f"no file {i}")
        for i in ("c", "a", "b")] + [stats_lib.Outcome(stats_lib.WRITTEN, "train", 0)]
    whole = stats_lib.Counts()
    for event in events:
        whole.add(event)
    left, right = stats_lib.Counts(), stats_lib.Counts()
    for index, event in enumerate(events):
        (left if index % 2 else right).add(event)
    summary = stats_lib.summarise(right.merge(left))
    assert summary == stats_lib.summarise(whole)
    assert summary["rejected_examples"] == {"missing_file": {"id": "a", "detail": "no file a"}}


def test_dominant_reasons_and_their_description():
    per_reason = {"http_404": 2, "missing_file": 5, "timeout": 2, "empty": 1}
    examples = {"missing_file": {"id": "m1", "detail": "file not found: /data/" + "x" * 200},
                "http_404": {"id": "h1", "detail": "HTTP 404"}, "timeout": {"id": "", "detail": ""}}
    top = stats_lib.dominant_reasons(per_reason, examples, top=2)
    assert [(reason, count) for reason, count, _ in top] == [("missing_file", 5), ("http_404", 2)]
    assert top[0][2].startswith("m1: file not found: /data/x") and top[0][2].endswith("...")
    assert len(top[0][2]) <= len("m1: ") + stats_lib.EXAMPLE_CHARS
    text = stats_lib.describe_rejections(per_reason, examples, top=2)
    assert text.startswith("5 missing_file (e.g. m1: file not found: /data/xx")
    assert text.endswith(", 2 http_404 (e.g. h1: HTTP 404); 2 more reasons (3 rows)")
    assert stats_lib.describe_rejections({}, {}) == "none"


def _summary(rows_in, written, rejected_per_reason, balanced=True):
    rejected = sum(rejected_per_reason.values())
    return {"rows_in": rows_in, "written": written, "rejected": rejected,
            "rejected_per_reason": rejected_per_reason, "balanced": balanced,
            "rejected_examples": {reason: {"id": "i", "detail": reason.upper()}
                                  for reason in rejected_per_reason}}


def test_assess_decides_failure_and_words_it():
    ok = stats_lib.assess(_summary(4, 2, {"timeout": 2}), 0.5)
    assert ok == {"status": "ok", "rejected_fraction": 0.5, "max_rejected_fraction": 0.5,
                  "failure": None}  # exactly at the threshold is still fine
    over = stats_lib.assess(_summary(3, 1, {"timeout": 2}), 0.5)
    assert over["status"] == "failed" and over["failure"]["kind"] == "too_many_rejected"
    assert over["failure"]["message"] == (
        "2 of 3 rows rejected (66.7% > --max_rejected_fraction 0.5): 2 timeout (e.g. i: TIMEOUT)")
    nothing = stats_lib.assess(_summary(3, 0, {"missing_file": 3}), 1.0)
    assert nothing["failure"]["kind"] == "nothing_written"
    assert nothing["failure"]["message"] == (
        "3 of 3 rows rejected (100%), nothing written: 3 missing_file (e.g. i: MISSING_FILE)")
    empty = stats_lib.assess(_summary(0, 0, {}), 0.5, noun="records", source="--input_tfrecords")
    assert empty["failure"]["message"] == "--input_tfrecords holds no records: nothing written"
    assert empty["rejected_fraction"] == 0.0
    unbalanced = stats_lib.assess(_summary(3, 1, {"timeout": 1}, balanced=False), 0.5)
    assert unbalanced["failure"]["kind"] == "unbalanced"


# ------------------------------------------------------------------------------------------
# Conversion runs
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def delf_run(tmp_path_factory):
    """DELF-layout shards -> ``landmarks-ingest --input_tfrecords``; returns what the test needs."""
    root = tmp_path_factory.mktemp("delf")
    source = root / "gldv2"
    source.mkdir()
    images = {f"a{index}": jpeg(index) for index in range(6)}
    images["big"] = jpeg(10, 150, 100)  # shrunk to MAX_SIDE
    images["png"] = encode(photo_like(30, 20, 11), "PNG")
    landmarks = {"a0": 1000, "a1": 1000, "a2": 2000, "a3": 2000, "a4": 2000, "a5": 3000,
                 "big": 3000, "png": 1000}
    labelled = [delf_example(i, images[i], landmarks[i]) for i in landmarks]
    bad = {
        "undecodable": delf_example("undecodable", b"\x00\x01 these bytes are no image", 1000),
        "no_image": delf_example("no_image", None, 2000),
        "negative": delf_example("negative", images["a0"], -7),
    }
    write_tfrecord(source / "train-00000-of-00002", labelled[:5] + [bad["undecodable"]])
    write_tfrecord(source / "train-00001-of-00002",
                   labelled[5:] + [bad["no_image"], bad["negative"], b"garbage, not an Example",
                                   delf_example("a1", jpeg(99), 2000)])  # a1 again
    test_images = {"t0": jpeg(20), "t1": jpeg(21)}
    write_tfrecord(source / "test-00000-of-00001",
                   [delf_example(i, image) for i, image in test_images.items()])
    out = root / "out"
    glob = str(source / "*-of-*")
    code = pipeline.main(["--input_tfrecords", glob, "--output_dir", str(out), "--num_shards",
                          "2", "--dev_fraction", "0.3", "--max_side", str(MAX_SIDE),
                          "--max_rejected_fraction", "0.5", RUNNER])
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    return dict(source=source, glob=glob, out=out, stats=stats, images=images,
                landmarks=landmarks, test_images=test_images)


def test_delf_records_are_all_written_or_rejected(delf_run):
    out, stats = delf_run["out"], delf_run["stats"]
    records_in = 8 + 3 + 1 + 1 + 2  # labelled, bad, garbage, duplicate, test
    assert stats["rows_in"] == records_in == stats["written"] + stats["rejected"]
    assert stats["balanced"] and stats["status"] == "ok" and stats["failure"] is None
    assert stats["input"] == "tfrecords" and stats["labelled"] is True
    assert stats["rejected_per_reason"] == {"bad_label": 1, "duplicate_id": 1, "missing_key": 1,
                                            "not_an_example": 1, "not_an_image": 1}
    assert stats["rejected_fraction"] == pytest.approx(5 / records_in, abs=1e-6)
    rejected = read_rejected(out / "rejected.csv")
    assert len(rejected) == stats["rejected"]
    by_reason = {row["reason"]: row for row in rejected}
    assert by_reason["missing_key"]["id"] == "no_image"
    assert "'image/encoded'" in by_reason["missing_key"]["detail"]
    assert "DELF" in by_reason["missing_key"]["detail"]
    assert by_reason["not_an_image"]["id"] == "undecodable"
    assert by_reason["bad_label"]["id"] == "negative"
    assert by_reason["not_an_example"]["url"].endswith("train-00001-of-00002")
    assert by_reason["duplicate_id"]["id"] == "a1"
    assert all(row["line"] == "" and row["url"].startswith(str(delf_run["source"]))
               for row in rejected)
    assert sorted(os.listdir(out)) == [
        "_SUCCESS", "config.json", "dataset_info.json", "dev-00000-of-00001.tfrecord",
        "features.json", "label_map.csv", "rejected.csv", "stats.json",
        "test-00000-of-00002.tfrecord", "test-00001-of-00002.tfrecord",
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
    ]
    assert json.loads((out / "config.json").read_text())["input_tfrecords"] == delf_run["glob"]


def test_delf_labels_splits_and_label_map(delf_run):
    out, landmarks = delf_run["out"], delf_run["landmarks"]
    label_map = read_label_map(str(out / "label_map.csv"))
    assert label_map.landmark_ids == (1000, 2000, 3000)
    train, dev, test = (records_of(out, name) for name in ("train", "dev", "test"))
    assert set(train) | set(dev) == set(landmarks) and not set(train) & set(dev)
    # a1: the first file's record was kept (landmark 1000), the later duplicate rejected.
    for image_id, record in {**train, **dev}.items():
        assert record.landmark_id == landmarks[image_id]
        assert record.label == label_map.class_index(landmarks[image_id])
    # Dev split: per class, the hash-chosen ids, as for a manifest.
    classes = {}
    for image_id, landmark in landmarks.items():
        classes.setdefault(landmark, []).append(image_id)
    assert set(dev) == set().union(*(split.dev_ids(ids, 0.3) for ids in classes.values()))
    # Unlabelled records: split test, label -1, never in dev.
    assert set(test) == set(delf_run["test_images"])
    assert {(r.label, r.landmark_id) for r in test.values()} == {(-1, -1)}
    assert delf_run["stats"]["written_per_split"] == {"dev": len(dev), "test": 2,
                                                      "train": len(train)}
    assert delf_run["stats"]["shards_per_split"] == {"dev": 1, "test": 2, "train": 2}


def test_delf_images_round_trip_through_the_normaliser(delf_run):
    out = delf_run["out"]
    records = {**records_of(out, "train"), **records_of(out, "dev"), **records_of(out, "test")}
    originals = {**delf_run["images"], **delf_run["test_images"]}
    params = NormaliseParams(max_side=MAX_SIDE)
    for image_id, record in records.items():
        expected = normalise_image(originals[image_id], params)
        assert record.jpeg_bytes == expected.jpeg_bytes  # the very same normalisation
        assert (record.height, record.width) == (expected.height, expected.width)
        assert max(record.height, record.width) <= MAX_SIDE
        stored = decode(record.jpeg_bytes)
        original = Image.open(io.BytesIO(originals[image_id])).convert("RGB")
        if original.size != (record.width, record.height):
            original = original.resize((record.width, record.height), Image.Resampling.BICUBIC)
        original = np.asarray(original, dtype=np.float64)
        # Tolerance derived from the normaliser itself: the error of re-encoding this image.
        tolerance = np.abs(decode(expected.jpeg_bytes) - original).mean()
        assert np.abs(stored - original).mean() <= tolerance + 1e-9
        assert tolerance < 8  # and that error is JPEG-sized, not a different picture
    assert records["png"].source_format == "PNG"
    assert (records["big"].width, records["big"].height) == (48, 32)


def test_delf_output_is_read_by_the_projects_readers(delf_run):
    out = delf_run["out"]
    train_glob = str(out / "train-*.tfrecord")
    label_map = read_label_map(str(out / "label_map.csv"))
    counts = train_data.count_labels(train_glob)
    train_data.check_labels(counts, label_map.num_classes)
    assert sum(counts.values()) == delf_run["stats"]["written_per_split"]["train"]
    dataset = train_data.make_dataset(train_glob, contract=ImageContract(32), batch_size=64,
                                      training=False, num_classes=label_map.num_classes)
    images, labels = next(iter(dataset))
    assert images.shape[1:] == (32, 32, 3) and sorted(labels.numpy().tolist()) == sorted(
        label for label, count in counts.items() for _ in range(count))
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out))
    assert builder.info.splits["test"].num_examples == 2


@pytest.fixture(scope="module")
def own_layout_run(delf_run, tmp_path_factory):
    """This project's layout as input: the DELF run's train shards plus a shard written here
    holding a non-landmark image, a record of another schema version and a new landmark."""
    root = tmp_path_factory.mktemp("own")
    extra = [
        ImageRecord(image_id="distractor_x", jpeg_bytes=jpeg(30), label=-1, height=40, width=60),
        ImageRecord(image_id="new", jpeg_bytes=jpeg(31), label=0, height=40, width=60,
                    landmark_id=4000),
        ImageRecord(image_id="future", jpeg_bytes=jpeg(32), label=0, height=40, width=60,
                    landmark_id=4000, schema_version=tfrecords_schema.SCHEMA_VERSION + 1),
    ]
    image_record.write_shards(extra, str(root / "extra"))
    for path in delf_run["out"].glob("train-*.tfrecord"):
        (root / path.name).write_bytes(path.read_bytes())
    out = root / "out"
    stats = pipeline.run(["--input_tfrecords", str(root / "*.tfrecord"), "--output_dir",
                          str(out), "--num_shards", "1", "--max_side", str(MAX_SIDE), RUNNER])
    return dict(out=out, stats=stats, delf_train=records_of(delf_run["out"], "train"))


def test_own_layout_converts_with_landmark_ids_and_non_landmarks(own_layout_run):
    out, stats = own_layout_run["out"], own_layout_run["stats"]
    delf_train = own_layout_run["delf_train"]
    assert stats["rows_in"] == len(delf_train) + 3 and stats["balanced"]
    assert stats["rejected_per_reason"] == {"schema_version": 1}
    # A labelled input: its non-landmark stays in train (label -1); no empty test shards.
    assert sorted(name for name in os.listdir(out) if name.endswith(".tfrecord")) == [
        "train-00000-of-00001.tfrecord"]
    assert stats["shards_per_split"] == {"train": 1}
    records = records_of(out, "train")
    assert set(records) == set(delf_train) | {"distractor_x", "new"}
    label_map = read_label_map(str(out / "label_map.csv"))
    assert label_map.landmark_ids == tuple(sorted(
        {r.landmark_id for r in delf_train.values()} | {4000}))
    assert (records["distractor_x"].label, records["distractor_x"].landmark_id) == (-1, -1)
    for image_id, record in delf_train.items():
        converted = records[image_id]
        assert converted.landmark_id == record.landmark_id
        assert converted.label == label_map.class_index(record.landmark_id)
        # Normalised again (a second JPEG generation): the same size, nearly the same pixels.
        assert (converted.height, converted.width) == (record.height, record.width)
        assert np.abs(decode(converted.jpeg_bytes) - decode(record.jpeg_bytes)).mean() < 4


# ------------------------------------------------------------------------------------------
# Failing runs: exit code 4, no _SUCCESS, the reasons named
# ------------------------------------------------------------------------------------------


def _error_line(capsys) -> str:
    error = capsys.readouterr().err.strip()
    assert error.startswith("landmarks-ingest: error: ") and "\n" not in error, error
    return error


def test_all_rows_rejected_exits_4_and_names_the_reason(tmp_path, capsys):
    (tmp_path / "m.csv").write_text("id,url,landmark_id\n" + "".join(
        f"m{index},images/missing{index}.jpg,5\n" for index in range(3)))
    out = tmp_path / "out"
    code = pipeline.main(["--manifest", str(tmp_path / "m.csv"), "--output_dir", str(out),
                          "--num_shards", "1", RUNNER])
    assert code == pipeline.EXIT_INCOMPLETE == 4
    error = _error_line(capsys)
    assert "3 of 3 rows rejected (100% > --max_rejected_fraction 0.5), nothing written: " \
           "3 missing_file (e.g. m0: " in error
    assert "missing0.jpg" in error and f"outputs in {out} are incomplete (no _SUCCESS;" in error
    assert not io_utils.has_success_marker(str(out))
    assert not list(out.glob("*.tfrecord"))  # a reader's glob finds no shard of a failed run
    assert sorted(path.name for path in out.glob("*.tfrecord.incomplete")) == [
        "train-00000-of-00001.tfrecord.incomplete"]
    assert not (out / "dataset_info.json").exists()  # TFDS would take the folder for complete
    assert len(read_rejected(out / "rejected.csv")) == 3
    stats = json.loads((out / "stats.json").read_text())
    assert stats["status"] == "failed" and stats["failure"]["kind"] == "nothing_written"
    assert stats["rejected_per_reason"] == {"missing_file": 3}
    assert stats["rejected_fraction"] == 1.0 and stats["max_rejected_fraction"] == 0.5
    assert stats["failure"]["message"] in error


def test_rejected_share_above_the_threshold_fails(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "ok.jpg").write_bytes(jpeg(1))
    (tmp_path / "m.csv").write_text("id,url,landmark_id\nok,images/ok.jpg,5\n"
                                    "gone,images/gone.jpg,5\nbad,images/ok.jpg,x\n"
                                    "ok,images/ok.jpg,6\n")
    out = tmp_path / "out"
    argv = ["--manifest", str(tmp_path / "m.csv"), "--output_dir", str(out), "--num_shards", "1",
            "--max_rejected_fraction", "0.7", RUNNER]
    assert pipeline.main(argv) == 4
    error = _error_line(capsys)
    assert error.startswith("landmarks-ingest: error: 3 of 4 rows rejected "
                            "(75% > --max_rejected_fraction 0.7): ")
    for part in ("1 bad_label (e.g. bad: landmark_id 'x' is not an integer)",
                 "1 duplicate_id (e.g. ok: id already used at line 2)", "1 missing_file"):
        assert part in error
    assert not io_utils.has_success_marker(str(out))
    assert (out / "rejected.csv").exists() and not (out / "dataset_info.json").exists()
    stats = json.loads((out / "stats.json").read_text())
    assert (stats["written"], stats["rejected"], stats["failure"]["kind"]) == (
        1, 3, "too_many_rejected")
    with pytest.raises(pipeline.IngestIncomplete) as caught:  # run() callers get an exception
        pipeline.run(argv + ["--overwrite"])
    assert caught.value.stats["status"] == "failed" and caught.value.exit_code == 4


def test_exactly_one_input_is_required(tmp_path):
    with pytest.raises(tfrecords_schema.InputError, match="exactly one input.*got both"):
        pipeline.run(["--manifest", "m.csv", "--input_tfrecords", "x/*", "--output_dir",
                      str(tmp_path / "o"), RUNNER])
    with pytest.raises(tfrecords_schema.InputError, match="--manifest.*--input_tfrecords"):
        pipeline.run(["--output_dir", str(tmp_path / "o"), RUNNER])
    with pytest.raises(tfrecords_schema.InputError, match="no files match --input_tfrecords"):
        pipeline.run(["--input_tfrecords", str(tmp_path / "none-*"), "--output_dir",
                      str(tmp_path / "o"), RUNNER])
    with pytest.raises(tfrecords_schema.InputError, match="--max_rejected_fraction"):
        pipeline.run(["--manifest", "m.csv", "--output_dir", str(tmp_path / "o"),
                      "--max_rejected_fraction", "1.5", RUNNER])
    assert not (tmp_path / "o").exists()


def test_a_truncated_input_file_is_an_input_error(tmp_path, capsys):
    source = tmp_path / "in"
    source.mkdir()
    write_tfrecord(source / "train-00000-of-00001", [delf_example("a", jpeg(1), 5)])
    content = (source / "train-00000-of-00001").read_bytes()
    (source / "train-00000-of-00001").write_bytes(content[:-20])
    code = pipeline.main(["--input_tfrecords", str(source / "*"), "--output_dir",
                          str(tmp_path / "out"), RUNNER])
    assert code == 2
    error = _error_line(capsys)
    assert "is not a TFRecord file or is truncated" in error and str(source / "*") in error
    assert not io_utils.has_success_marker(str(tmp_path / "out"))


# ------------------------------------------------------------------------------------------
# Readers meeting DELF's layout
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def delf_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("delf_only")
    write_tfrecord(root / "train-00000-of-00001",
                   [delf_example(f"d{index}", jpeg(index), 100 + index) for index in range(3)])
    return root


def test_trainer_names_the_delf_layout_and_the_conversion(delf_shards):
    glob = str(delf_shards / "train-*")
    expected = ("is in the layout of DELF's build_image_dataset.py (no schema/version key)"
                f", not this project's image-record layout; convert it with: landmarks-ingest "
                f"--input_tfrecords '{glob}' --output_dir DIR")
    for call in (lambda: train_data.count_labels(glob),
                 lambda: train_data.make_dataset(glob, contract=ImageContract(32), batch_size=2,
                                                 training=False)):
        with pytest.raises(train_data.DataError) as caught:
            call()
        assert expected in str(caught.value) and "\n" not in str(caught.value)
        assert str(caught.value).startswith(str(delf_shards / "train-00000-of-00001"))
        assert "lacks the key 'image/class/landmark_id'" in str(caught.value)


def test_trainer_explains_a_missing_key_as_a_missing_key_not_a_bad_image(delf_shards, tmp_path):
    """A later file in DELF's layout fails in-graph; the one-line explanation names the key,
    the record and its layout (before the fix it said "an image that cannot be decoded")."""
    good = image_record.write_shards(
        [ImageRecord(image_id="g", jpeg_bytes=jpeg(1), label=0, height=40, width=60,
                     landmark_id=3)], str(tmp_path / "a"))[0]
    delf_copy = tmp_path / "b-00000-of-00001.tfrecord"
    delf_copy.write_bytes((delf_shards / "train-00000-of-00001").read_bytes())
    pattern = str(tmp_path / "*.tfrecord")
    dataset = train_data.make_dataset(pattern, contract=ImageContract(32), batch_size=4,
                                      training=False)
    assert train_data._files(pattern)[0] == good
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        list(dataset)
    assert train_data.is_data_error(caught.value)
    message = train_data.explain_data_error(caught.value, pattern)
    assert "cannot be decoded" not in message and "\n" not in message
    assert message == (
        f"{delf_copy}, record #0 (0-based) lacks the key 'image/class/landmark_id': it is in the "
        "layout of DELF's build_image_dataset.py (no schema/version key), not this project's "
        f"image-record layout; convert it with: landmarks-ingest --input_tfrecords '{pattern}' "
        "--output_dir DIR")


def test_undecodable_image_is_still_reported_as_a_decode_failure(tmp_path):
    path = image_record.write_shards(
        [ImageRecord(image_id="u", jpeg_bytes=b"\xff\xd8garbage", label=0, height=4, width=4)],
        str(tmp_path / "u"))[0]
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        list(train_data.make_dataset(path, contract=ImageContract(32), batch_size=1,
                                     training=False))
    message = train_data.explain_data_error(caught.value, path)
    assert message.startswith("an image that cannot be decoded: ")
    assert f"{path}, record #0" in message


def test_predict_reader_and_schema_parser_name_the_delf_layout(delf_shards):
    record = next(iter(tf.data.TFRecordDataset(str(delf_shards / "train-00000-of-00001"))
                       .as_numpy_iterator()))
    with pytest.raises(tfrecords_schema.SchemaError, match=(
            r"lacks the key 'image/class/landmark_id': it is in the layout of DELF's "
            r"build_image_dataset.py \(no schema/version key\).*--input_tfrecords 'GLOB'")):
        image_record.parse_record(record)
    reader = predict_transforms.ParseAndDecode("test", "gs://bucket/gldv2/test-*")
    outputs = list(reader.process(record))
    assert len(outputs) == 1 and outputs[0].tag == predict_transforms.TAG_UNREADABLE
    unreadable = outputs[0].value
    assert unreadable.image_id == "d0"
    assert "DELF's build_image_dataset.py" in unreadable.reason
    assert "landmarks-ingest --input_tfrecords 'gs://bucket/gldv2/test-*' --output_dir DIR" in (
        unreadable.reason)
