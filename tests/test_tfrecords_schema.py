"""Round trips through the record contract: several shards, Python and tf.data parsers."""

import numpy as np
import pytest
import tensorflow as tf

import tfrecords_schema
from tfrecords_schema import image_record, label_map, local_features


def _records(count):
    rng = np.random.default_rng(0)
    for index in range(count):
        yield image_record.ImageRecord(
            image_id=f"img{index:03d}",
            jpeg_bytes=rng.bytes(20 + index),
            label=index % 4 - 1,
            height=10 + index,
            width=20 + index,
            landmark_id=(index % 4 - 1) * 100 if index % 4 else -1,
            source_format="PNG" if index % 2 else "JPEG",
        )


def test_round_trip_over_several_shards_python_and_tf_data(tmp_path):
    written = list(_records(11))
    paths = image_record.write_shards(written, str(tmp_path / "train"), num_shards=3)
    assert [p.rsplit("/", 1)[1] for p in paths] == [
        "train-00000-of-00003.tfrecord",
        "train-00001-of-00003.tfrecord",
        "train-00002-of-00003.tfrecord",
    ]
    read_back = list(image_record.read_records(str(tmp_path / "*.tfrecord")))
    assert sorted(read_back, key=lambda r: r.image_id) == written

    dataset = tf.data.TFRecordDataset(sorted(paths)).map(image_record.parse_tensors)
    from_tf = {
        row["image_id"].decode(): row for row in dataset.as_numpy_iterator()
    }
    assert len(from_tf) == len(written)
    for record in written:
        row = from_tf[record.image_id]
        assert row["jpeg_bytes"] == record.jpeg_bytes
        assert row["label"] == record.label
        assert (row["height"], row["width"]) == (record.height, record.width)
        assert row["landmark_id"] == record.landmark_id


def test_other_schema_version_is_refused_on_both_read_paths(tmp_path):
    record = next(_records(1))
    old = image_record.ImageRecord(**{**record.__dict__, "schema_version": 0})
    path = image_record.write_shards([old], str(tmp_path / "old"))[0]
    with pytest.raises(tfrecords_schema.SchemaError, match="schema version 0"):
        list(image_record.read_records(path))
    dataset = tf.data.TFRecordDataset([path]).map(image_record.parse_tensors)
    with pytest.raises(tf.errors.InvalidArgumentError, match="schema version mismatch.*has.*0"):
        list(dataset)


def test_missing_key_and_garbage_are_schema_errors():
    example = image_record.make_example(next(_records(1)))
    del example.features.feature[image_record.KEY_LABEL]
    with pytest.raises(tfrecords_schema.SchemaError, match="image/class/label"):
        image_record.parse_record(example.SerializeToString())
    with pytest.raises(tfrecords_schema.SchemaError):
        image_record.parse_record(b"\xff\x00 definitely not a proto")


def test_label_map_is_sorted_stable_and_round_trips(tmp_path):
    a = label_map.LabelMap.from_landmark_ids([100, 7, 12, 7])
    b = label_map.LabelMap.from_landmark_ids([12, 100, 7])
    assert a == b and a.landmark_ids == (7, 12, 100)
    assert [a.class_index(i) for i in (7, 12, 100)] == [0, 1, 2]
    assert a.landmark_id(2) == 100
    with pytest.raises(KeyError):
        a.class_index(8)
    path = str(tmp_path / label_map.LABEL_MAP_FILENAME)
    label_map.write_label_map(a, path)
    assert label_map.read_label_map(path) == a
    assert label_map.LabelMap.from_csv_text(a.to_csv_text()) == a


@pytest.mark.parametrize(
    "text, message",
    [
        ("landmark_id,class_index\n7,0\n12,2\n", "0..n-1"),
        ("landmark_id,class_index\n7,0\n7,1\n", "unique"),
        ("id,index\n7,0\n", "header"),
        ("landmark_id,class_index\nseven,0\n", "bad row"),
    ],
)
def test_label_map_rejects_bad_files(text, message):
    with pytest.raises(tfrecords_schema.SchemaError, match=message):
        label_map.LabelMap.from_csv_text(text)


def test_feature_record_round_trip_including_empty():
    rng = np.random.default_rng(1)
    descriptors = rng.normal(size=(5, 40)).astype(np.float32)
    full = local_features.FeatureRecord("a", 3, "orb", rng.uniform(0, 99, (5, 2)), descriptors)
    empty = local_features.FeatureRecord("b", -1, "orb", np.zeros((0, 2)), np.zeros((0, 40)))
    bits = rng.integers(0, 256, (7, 32), dtype=np.uint8)  # ORB: 256 bits packed in 32 bytes
    packed = local_features.FeatureRecord("c", 0, "orb", rng.uniform(0, 99, (7, 2)), bits)
    empty_packed = local_features.FeatureRecord("d", 0, "orb", np.zeros((0, 2)),
                                                np.zeros((0, 32), np.uint8))
    for record in (full, empty, packed, empty_packed):
        back = local_features.parse_features(local_features.serialize_features(record))
        assert (back.image_id, back.label, back.extractor) == (
            record.image_id,
            record.label,
            record.extractor,
        )
        np.testing.assert_array_equal(back.locations, record.locations)
        np.testing.assert_array_equal(back.descriptors, record.descriptors)
        assert back.descriptors.shape == record.descriptors.shape
        assert back.descriptors.dtype == record.descriptors.dtype
        assert back.descriptor_dim == record.descriptor_dim


def test_packed_descriptors_are_stored_at_their_real_size():
    """A 1000-keypoint ORB record holds 32 KB of descriptors, not 1 MB of floats (the record
    is at most the packed bytes + the locations + a small overhead)."""
    rng = np.random.default_rng(2)
    record = local_features.FeatureRecord(
        "a", 0, "orb", rng.uniform(0, 99, (1000, 2)),
        rng.integers(0, 256, (1000, 32), dtype=np.uint8))
    size = len(local_features.serialize_features(record))
    assert size < 1000 * 32 + 1000 * 2 * 4 + 1024
    assert local_features.parse_features(local_features.serialize_features(record)).packed


def _key_order(serialized, keys):
    """The feature keys of a serialised Example, in the order their map entries appear."""
    entry = {key: serialized.index(b"\n" + bytes([len(key)]) + key.encode()) for key in keys}
    return sorted(keys, key=entry.get)


def test_serialised_records_are_the_same_bytes_in_every_process():
    # A proto map serialises in an order that changes between processes unless asked to be
    # deterministic (sorted keys): then one record gives the same shard bytes on any worker.
    record = image_record.ImageRecord(image_id="a", jpeg_bytes=b"x", label=1, height=2,
                                      width=3, landmark_id=4)
    keys = [key for key, _, _ in image_record.FIELDS]
    assert _key_order(image_record.serialize_record(record), keys) == sorted(keys)
    features = local_features.FeatureRecord("a", 3, "orb", np.zeros((1, 2)), np.zeros((1, 4)))
    serialized = local_features.serialize_features(features)
    parsed = tf.train.Example.FromString(serialized)
    keys = list(parsed.features.feature)
    assert len(keys) > 3 and _key_order(serialized, keys) == sorted(keys)
