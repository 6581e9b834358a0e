"""The tf.data pipeline on small records the tests write: values, labels, sharding, balance, errors.

Records hold flat grey JPEGs whose level encodes the record's index (``10 + 4 * i``), so the
eval-mode output tells which record each image came from.
"""

import logging

import numpy as np
import pytest
import tensorflow as tf

from tfrecords_schema import image_record
from trainer import augment
from trainer import data
from trainer.augment import AugmentParams
from trainer.preprocessing import ImageContract

CONTRACT = ImageContract(40)


def _label(index):
    return index % 5 - 1  # -1 (non-landmark), 0, 1, 2, 3


def _flat_records(count, **overrides):
    for index in range(count):
        image = np.full((32 + index % 3 * 8, 48, 3), 10 + 4 * index, np.uint8)
        fields = dict(image_id=f"id{index:03d}", jpeg_bytes=tf.io.encode_jpeg(image).numpy(),
                      label=_label(index), height=image.shape[0], width=48)
        fields.update(overrides)
        yield image_record.ImageRecord(**fields)


def _textured_records(count):
    rng = np.random.default_rng(0)
    for index in range(count):
        image = rng.integers(0, 256, (8, 12, 3)).astype(np.uint8)
        image = tf.image.resize(image, (48, 64)).numpy().astype(np.uint8)  # smooth blobs
        yield image_record.ImageRecord(image_id=f"t{index}", jpeg_bytes=tf.io.encode_jpeg(image).numpy(),
                                       label=_label(index), height=48, width=64)


@pytest.fixture
def flat_shards(tmp_path):
    image_record.write_shards(_flat_records(40), str(tmp_path / "train"), num_shards=4)
    return str(tmp_path / "train-*.tfrecord")


def _indices(images):
    """Record index of each eval-mode image from its grey level."""
    levels = (images.mean(axis=(1, 2, 3)) + 1) * 127.5
    return np.round((levels - 10) / 4).astype(int).tolist()


def _collect(dataset):
    indices, labels = [], []
    for images, batch_labels in dataset.as_numpy_iterator():
        indices += _indices(images)
        labels += batch_labels.tolist()
    return indices, labels


def test_list_files_sorted_and_clear_error(tmp_path, flat_shards):
    files = data.list_files(flat_shards)
    assert [f.rsplit("/", 1)[1] for f in files] == [f"train-0000{i}-of-00004.tfrecord" for i in range(4)]
    with pytest.raises(FileNotFoundError, match="no TFRecord files match"):
        data.list_files(str(tmp_path / "nothing-*.tfrecord"))
    with pytest.raises(FileNotFoundError, match="no TFRecord files match"):
        data.make_dataset(str(tmp_path / "nothing-*"), contract=CONTRACT, batch_size=2, training=True)


def test_count_labels_reconciles_with_written_records(flat_shards):
    assert data.count_labels(flat_shards) == {-1: 8, 0: 8, 1: 8, 2: 8, 3: 8}
    data.check_labels({-1: 8, 0: 8, 3: 8}, num_classes=4)
    with pytest.raises(data.DataError, match="label map does not match"):
        data.check_labels({-1: 8, 0: 8, 3: 8}, num_classes=3)


def test_eval_pipeline_passes_labels_and_scales_to_range(flat_shards):
    dataset = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=6, training=False)
    assert dataset.element_spec[0].shape.as_list() == [None, 40, 40, 3]
    assert dataset.element_spec[1].dtype == tf.int64
    indices, labels = _collect(dataset)
    assert sorted(indices) == list(range(40))  # every record exactly once, last batch kept
    assert labels == [_label(i) for i in indices]  # labels travel with their images, -1 included
    for images, _ in dataset.take(1):
        assert -1.0 <= float(tf.reduce_min(images)) and float(tf.reduce_max(images)) <= 1.0


def test_training_with_augmentation_changes_images_finite_in_range(tmp_path):
    image_record.write_shards(_textured_records(12), str(tmp_path / "tex"), num_shards=2)
    pattern = str(tmp_path / "tex-*.tfrecord")
    kwargs = dict(contract=CONTRACT, batch_size=12, seed=7, deterministic=True)
    (plain, plain_labels), = data.make_dataset(pattern, training=False, **kwargs).as_numpy_iterator()
    (augmented, labels), = data.make_dataset(pattern, training=True, augment=AugmentParams(),
                                             augment_on_device=False, **kwargs).as_numpy_iterator()
    assert np.isfinite(augmented).all() and augmented.min() >= -1 and augmented.max() <= 1
    assert sorted(labels.tolist()) == sorted(plain_labels.tolist())
    # Shuffled, so compare each augmented image with its closest plain image: none identical.
    distances = np.abs(augmented[:, None] - plain[None]).mean(axis=(2, 3, 4))
    assert distances.min(axis=1).min() > 0.005


def test_seeded_deterministic_runs_are_identical_and_seeds_matter(tmp_path):
    image_record.write_shards(_textured_records(12), str(tmp_path / "tex"), num_shards=3)
    pattern = str(tmp_path / "tex-*.tfrecord")

    def run(seed):
        dataset = data.make_dataset(pattern, contract=CONTRACT, batch_size=4, training=True,
                                    augment=AugmentParams(), seed=seed, deterministic=True,
                                    shuffle_buffer=12, augment_on_device=False)
        return list(dataset.as_numpy_iterator())

    first, second, other = run(3), run(3), run(4)
    assert len(first) == 3  # 12 images, drop_remainder in training
    for (images_a, labels_a), (images_b, labels_b) in zip(first, second):
        np.testing.assert_array_equal(images_a, images_b)
        np.testing.assert_array_equal(labels_a, labels_b)
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, other))


def test_each_iteration_is_a_new_epoch_reproducibly(flat_shards):
    dataset = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=40, training=True,
                                seed=5, deterministic=True)
    epoch_1, _ = _collect(dataset)
    epoch_2, _ = _collect(dataset)
    assert sorted(epoch_1) == sorted(epoch_2) == list(range(40))
    assert epoch_1 != epoch_2  # reshuffled
    fresh = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=40, training=True,
                              seed=5, deterministic=True)
    assert _collect(fresh)[0] == epoch_1


def test_file_sharding_gives_disjoint_pipelines_covering_everything(flat_shards):
    seen = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        files, by_record = data.shard_files(data.list_files(flat_shards), context)
        assert not by_record and len(files) == 2
        dataset = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=5, training=True,
                                    input_context=context, seed=1)
        seen.append(set(_collect(dataset)[0]))
    assert seen[0].isdisjoint(seen[1])
    assert seen[0] | seen[1] == set(range(40))
    # Files 0 and 2 hold records 0, 2, 4, ... (round-robin writer): pipeline 0 got whole files.
    assert seen[0] == set(range(0, 40, 2))


def test_fewer_files_than_pipelines_falls_back_to_record_sharding(tmp_path, caplog):
    image_record.write_shards(_flat_records(9), str(tmp_path / "one"), num_shards=1)
    pattern = str(tmp_path / "one-*.tfrecord")
    seen = []
    with caplog.at_level(logging.WARNING, logger="trainer.data"):
        for pipeline in range(2):
            context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
            dataset = data.make_dataset(pattern, contract=CONTRACT, batch_size=2, training=True,
                                        drop_remainder=False, input_context=context, seed=1)
            seen.append(_collect(dataset)[0])
    assert "sharding by record" in caplog.text
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(9))


def test_balanced_thresholds_against_numpy_reference():
    rng = np.random.default_rng(1)
    labels = rng.integers(-1, 6, 500)
    keys = rng.permutation(10**6)[:500].astype(np.int64)  # distinct keys
    thresholds = data.balanced_thresholds(tf.constant(labels, tf.int64), tf.constant(keys),
                                          max_per_class=20, num_slots=7).numpy()
    kept = keys <= thresholds[labels + 1]
    for label in range(-1, 6):
        members = labels == label
        smallest = np.sort(keys[members])[:20]
        assert set(keys[members & kept]) == set(smallest)


def test_class_balanced_epochs_cap_every_class_and_change_between_epochs(flat_shards):
    dataset = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=7, training=True,
                                drop_remainder=False, max_images_per_class=3, seed=2)
    epochs = []
    for _ in range(3):
        indices, labels = _collect(dataset)
        assert labels == [_label(i) for i in indices]
        counts = {label: labels.count(label) for label in set(labels)}
        assert counts == {-1: 3, 0: 3, 1: 3, 2: 3, 3: 3}  # 8 each available: exactly K kept
        assert len(set(indices)) == 15
        epochs.append(set(indices))
    assert len({frozenset(e) for e in epochs}) == 3  # a different selection each epoch
    # Classes smaller than K keep all their images.
    small = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=40, training=False,
                              max_images_per_class=10, seed=2)
    assert sorted(_collect(small)[0]) == list(range(40))


def test_class_balance_holds_across_file_sharded_pipelines(flat_shards):
    per_pipeline = []
    for pipeline in range(2):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline)
        dataset = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=40, training=False,
                                    max_images_per_class=3, seed=9, input_context=context)
        per_pipeline.append(_collect(dataset)[1])
    labels = per_pipeline[0] + per_pipeline[1]
    assert {label: labels.count(label) for label in set(labels)} == {l: 3 for l in range(-1, 4)}


def test_label_beyond_num_classes_fails_with_one_line(flat_shards):
    dataset = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=8, training=False,
                                num_classes=3)
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        list(dataset)
    message = data.explain_data_error(caught.value, flat_shards)
    assert "label map does not match the records" in message and "num_classes (3)" in message
    assert "(label 3)" in message and "Condition" not in message
    assert "\n" not in message and "function_node" not in message


def test_schema_version_mismatch_is_a_clear_error(tmp_path):
    old = str(tmp_path / "old")
    image_record.write_shards(_flat_records(4, schema_version=0), old)
    with pytest.raises(data.DataError, match="schema version 0.*re-run landmarks-ingest"):
        data.make_dataset(old + "-*", contract=CONTRACT, batch_size=2, training=False)
    # A later file with another version surfaces in-graph; the helper names it in one line.
    image_record.write_shards(_flat_records(4), str(tmp_path / "a"))
    image_record.write_shards(_flat_records(4, schema_version=2), str(tmp_path / "b"))
    pattern = str(tmp_path / "[ab]-*.tfrecord")
    dataset = data.make_dataset(pattern, contract=CONTRACT, batch_size=2, training=False)
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        list(dataset)
    message = data.explain_data_error(caught.value, pattern)
    assert "another schema version" in message and "\n" not in message
    assert message.startswith(str(tmp_path / "b-00000-of-00001.tfrecord") + ", record #0")


def test_truncated_shard_fails_naming_file_and_record(tmp_path):
    """Policy: a corrupt record is not skipped; the error names its file and position."""
    good, bad = (image_record.write_shards(_flat_records(6), str(tmp_path / name))[0]
                 for name in ("a", "b"))
    content = open(bad, "rb").read()
    open(bad, "wb").write(content[: len(content) - 40])  # cuts into the last record
    pattern = str(tmp_path / "*.tfrecord")
    dataset = data.make_dataset(pattern, contract=CONTRACT, batch_size=4, training=False)
    with pytest.raises(tf.errors.DataLossError) as caught:
        list(dataset)
    message = data.explain_data_error(caught.value, pattern)
    assert message.startswith("corrupt or truncated TFRecord data: ")
    assert f"{bad}, record #5" in message and "\n" not in message
    assert data.locate_bad_record(good) is None


def test_undecodable_jpeg_fails_naming_file_and_record(tmp_path):
    records = list(_flat_records(5))
    records[3] = image_record.ImageRecord(**{**records[3].__dict__, "jpeg_bytes": b"\xff\xd8garbage"})
    path = image_record.write_shards(records, str(tmp_path / "c"))[0]
    dataset = data.make_dataset(path, contract=CONTRACT, batch_size=5, training=False)
    with pytest.raises(tf.errors.InvalidArgumentError) as caught:
        list(dataset)
    message = data.explain_data_error(caught.value, path)
    assert message.startswith("an image that cannot be decoded: ") and f"{path}, record #3" in message


def test_garbage_file_is_refused_before_training(tmp_path):
    path = tmp_path / "junk-00000-of-00001.tfrecord"
    path.write_bytes(b"this is not a TFRecord file at all" * 3)
    with pytest.raises(data.DataError, match="not a readable TFRecord file"):
        data.make_dataset(str(path), contract=CONTRACT, batch_size=2, training=False)


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(num_classes=0), dict(max_images_per_class=0)])
def test_bad_arguments_are_value_errors(flat_shards, bad):
    kwargs = {**dict(contract=CONTRACT, batch_size=2, training=True), **bad}
    with pytest.raises(ValueError):
        data.make_dataset(flat_shards, **kwargs)


def test_feeds_a_two_replica_mirrored_strategy(flat_shards):
    """distribute_datasets_from_function: each replica gets its per-replica batch, labels intact."""
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    global_batch = 8

    def dataset_fn(context):
        return data.make_dataset(flat_shards, contract=CONTRACT, training=True, seed=1,
                                 batch_size=context.get_per_replica_batch_size(global_batch),
                                 input_context=context)

    distributed = strategy.distribute_datasets_from_function(dataset_fn)
    seen = []
    for images, labels in distributed:
        local_images = strategy.experimental_local_results(images)
        local_labels = strategy.experimental_local_results(labels)
        assert [t.shape[0] for t in local_images] == [4, 4]
        for image_batch, label_batch in zip(local_images, local_labels):
            indices = _indices(image_batch.numpy())
            assert label_batch.numpy().tolist() == [_label(i) for i in indices]
            seen += indices
    assert sorted(seen) == list(range(40))


def test_balanced_epochs_repeat_forever(flat_shards):
    dataset = data.make_dataset(flat_shards, contract=CONTRACT, batch_size=15, training=False,
                                max_images_per_class=3, seed=4, repeat=True)
    batches = list(dataset.take(3).as_numpy_iterator())  # 3 epochs of exactly 15 images
    for _, labels in batches:
        assert sorted(labels.tolist()) == sorted([-1, 0, 1, 2, 3] * 3)


def test_split_mode_yields_device_inputs_that_reproduce_host_mode(tmp_path):
    """augment_on_device=True: host part + DeviceAugmentation == the host-only path, same seed."""
    image_record.write_shards(_textured_records(12), str(tmp_path / "tex"), num_shards=2)
    pattern = str(tmp_path / "tex-*.tfrecord")
    kwargs = dict(contract=CONTRACT, batch_size=12, training=True, augment=AugmentParams(),
                  seed=11, deterministic=True)
    split = data.make_dataset(pattern, augment_on_device=True, **kwargs)
    features_spec, label_spec = split.element_spec
    assert set(features_spec) == {augment.IMAGES, augment.CROP_BRANCH, augment.NOISE}
    assert features_spec[augment.IMAGES].shape.as_list() == [12, 40, 40, 3]
    assert features_spec[augment.CROP_BRANCH].dtype == tf.float32
    assert features_spec[augment.NOISE].shape.as_list() == [12, augment.NOISE_SIZE]
    assert label_spec.dtype == tf.int64
    (features, labels), = split.as_numpy_iterator()
    (host_images, host_labels), = data.make_dataset(
        pattern, augment_on_device=False, **kwargs).as_numpy_iterator()
    np.testing.assert_array_equal(labels, host_labels)
    assert set(features[augment.CROP_BRANCH].tolist()) == {0.0, 1.0}
    assert np.abs(features[augment.IMAGES]).max() <= 1 + 1e-5  # float rounding of the resize
    device = augment.DeviceAugmentation(AugmentParams())(features, training=True).numpy()
    np.testing.assert_allclose(device, host_images, atol=2e-4)
    # Before the device step the images are only resized: closer to plain than to augmented.
    assert np.abs(features[augment.IMAGES] - host_images).mean() > 0.01


def test_split_mode_trains_a_wrapped_model_on_two_replicas(flat_shards):
    """distribute_datasets_from_function -> with_device_augmentation -> fit, on 2 replicas."""
    import keras

    from trainer import losses

    tf.distribute.MirroredStrategy._collective_key_base += 100000  # as in test_losses.py
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    tf.distribute.MirroredStrategy._collective_key_base += 100000

    def dataset_fn(context):
        return data.make_dataset(flat_shards, contract=CONTRACT, training=True, seed=1,
                                 augment=AugmentParams(), repeat=True, input_context=context,
                                 batch_size=context.get_per_replica_batch_size(8))

    with strategy.scope():
        model = keras.Sequential([keras.Input((40, 40, 3)), keras.layers.Conv2D(2, 3),
                                  keras.layers.GlobalAveragePooling2D(),
                                  keras.layers.Dense(4, activation="sigmoid")], name="tiny")
        trainer_model = augment.with_device_augmentation(model, AugmentParams())
        trainer_model.compile(optimizer=keras.optimizers.SGD(0.1), loss=losses.RankWeightedBCE())
    before = [weight.numpy() for weight in model.weights]
    history = trainer_model.fit(strategy.distribute_datasets_from_function(dataset_fn),
                                epochs=1, steps_per_epoch=3, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.allclose(a, b.numpy()) for a, b in zip(before, model.weights))
    # The exported model is the plain one: images in, no augmentation layer.
    assert "device_augmentation" not in [layer.name for layer in model.layers]
    eval_batch = next(iter(data.make_dataset(flat_shards, contract=CONTRACT, batch_size=4,
                                             training=False)))
    assert model(eval_batch[0]).shape == (4, 4)
