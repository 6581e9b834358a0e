"""The shared resize/scale contract: numpy and TF agree, and the eval pipeline matches it."""

import numpy as np
import pytest
import tensorflow as tf

from tfrecords_schema import image_record
from trainer import data
from trainer.preprocessing import ImageContract


def _textured(height, width, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = 127 + 100 * np.sin(x / 5.0 + seed)[..., None] * np.cos(y / 7.0)[..., None]
    noise = rng.normal(0, 10, (height, width, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def test_scale_maps_0_255_to_minus_one_one_same_for_numpy_and_tensors():
    contract = ImageContract(64)
    pixels = np.array([0, 1, 127, 128, 200, 255], np.uint8)
    expected = np.array([-1.0, 1 / 127.5 - 1, 127 / 127.5 - 1, 128 / 127.5 - 1, 200 / 127.5 - 1, 1.0])
    from_numpy = contract.scale(pixels)
    from_tensor = contract.scale(tf.constant(pixels))
    assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float32
    assert tf.is_tensor(from_tensor) and from_tensor.dtype == tf.float32
    np.testing.assert_allclose(from_numpy, expected, atol=1e-6)
    np.testing.assert_array_equal(from_numpy, from_tensor.numpy())  # bit for bit
    # float input in [0, 255] too, and inside a tf.function (graph) as well.
    image = _textured(20, 30, 0).astype(np.float32)
    graph_scaled = tf.function(contract.scale)(tf.constant(image)).numpy()
    np.testing.assert_array_equal(contract.scale(image), graph_scaled)


def test_resize_keeps_kind_and_constant_images_and_antialiases():
    contract = ImageContract(32)
    flat = np.full((50, 70, 3), 200, np.uint8)
    resized = contract.resize(flat)
    assert isinstance(resized, np.ndarray) and resized.shape == (32, 32, 3)
    np.testing.assert_allclose(resized, 200.0, atol=1e-3)
    assert tf.is_tensor(contract.resize(tf.constant(flat)))
    assert contract.resize(flat, (10, 20)).shape == (10, 20, 3)
    # A one-pixel checkerboard halved: antialiasing averages it to grey; plain bilinear would
    # hit exact pixels and keep black/white.
    checker = ((np.indices((64, 64)).sum(axis=0) % 2) * 255).astype(np.uint8)
    checker = np.repeat(checker[..., None], 3, axis=2)
    halved = contract.resize(checker)
    assert np.abs(halved[2:-2, 2:-2] - 127.5).max() < 40
    assert halved.min() >= 0 and halved.max() <= 255


@pytest.mark.parametrize("size", [0, 16, 299.0, True])
def test_contract_validates_image_size(size):
    with pytest.raises(ValueError):
        ImageContract(size)


def test_eval_pipeline_equals_contract_applied_eagerly(tmp_path):
    """Parity: training's eval path == what inference computes with the same contract."""
    contract = ImageContract(64)
    images = [_textured(40 + 8 * i, 96 - 8 * i, i) for i in range(6)]
    records = [
        image_record.ImageRecord(
            image_id=f"im{i}", jpeg_bytes=tf.io.encode_jpeg(img, quality=90).numpy(),
            label=i - 1, height=img.shape[0], width=img.shape[1])
        for i, img in enumerate(images)
    ]
    image_record.write_shards(records, str(tmp_path / "eval"), num_shards=2)
    dataset = data.make_dataset(str(tmp_path / "eval-*.tfrecord"), contract=contract,
                                batch_size=6, training=False, deterministic=True)
    (batch, labels), = list(dataset.as_numpy_iterator())
    assert sorted(labels.tolist()) == [-1, 0, 1, 2, 3, 4]
    for image, label in zip(batch, labels):
        record = records[label + 1]
        decoded = tf.io.decode_jpeg(record.jpeg_bytes, channels=3).numpy()  # eager, outside tf.data
        expected = contract.scale(contract.resize(decoded))  # numpy path
        np.testing.assert_allclose(image, expected, atol=1e-5)
        assert image.min() >= -1.0 and image.max() <= 1.0
