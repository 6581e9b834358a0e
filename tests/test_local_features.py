"""Local feature extractors: DELF's real loading path on a stand-in SavedModel, offline ones."""

import cv2
import numpy as np
import pytest
import skimage.data
import tensorflow as tf
import tensorflow_hub as hub

from rescoring import descriptors as rescoring_descriptors
from rescoring import local_features
from tests.delf_standin import save_delf_standin

GRID = 8


@pytest.fixture(scope="module")
def delf_folder(tmp_path_factory):
    return save_delf_standin(tmp_path_factory.mktemp("delf") / "standin", grid=GRID)


@pytest.fixture(scope="module")
def astronaut():
    return np.ascontiguousarray(skimage.data.astronaut())


# --- DELF through tensorflow_hub --------------------------------------------------------------


def test_delf_spec_loads_through_hub_and_reports_input_pixel_locations(delf_folder, astronaut):
    image = cv2.resize(astronaut, (300, 200), interpolation=cv2.INTER_AREA)  # H 200, W 300
    extractor = local_features.make_extractor("delf:" + delf_folder)
    assert extractor.spec == "delf:" + delf_folder
    assert extractor.max_descriptor_distance == 0.8
    locations, descriptors = extractor.extract(image)
    assert locations.dtype == np.float32 and descriptors.dtype == np.float32
    assert descriptors.shape == (GRID * GRID, 40)
    np.testing.assert_allclose(np.linalg.norm(descriptors, axis=1), 1.0, atol=1e-5)
    # The stand-in puts a feature at each cell centre of the 384 x 384 image it receives; the
    # extractor maps them back to the 200 x 300 input.
    centres = (np.arange(GRID) + 0.5) / GRID
    want_y, want_x = np.meshgrid(centres * 200, centres * 300, indexing="ij")
    np.testing.assert_allclose(locations, np.stack([want_y.ravel(), want_x.ravel()], axis=1), atol=1e-3)


def test_delf_gets_the_recipe_inputs(delf_folder, astronaut):
    """The descriptors equal a direct call of the signature with the recipe's inputs: image
    resized to 384 x 384 with RGB in [0, 1], score threshold 100, the seven scales, 1000."""
    image = cv2.resize(astronaut, (250, 180), interpolation=cv2.INTER_AREA)
    _, descriptors = local_features.make_extractor("delf:" + delf_folder).extract(image)
    signature = hub.load(delf_folder).signatures["default"]
    direct = signature(
        image=tf.image.resize(tf.constant(image, tf.float32) / 255.0, [384, 384], antialias=True),
        score_threshold=tf.constant(100.0),
        image_scales=tf.constant([0.25, 0.3536, 0.5, 0.7071, 1.0, 1.4142, 2.0]),
        max_feature_num=tf.constant(1000),
    )
    np.testing.assert_allclose(descriptors, direct["descriptors"].numpy(), atol=1e-5)
    # And the content matters: another image gives other descriptors.
    _, other = local_features.make_extractor("delf:" + delf_folder).extract(image[::-1].copy())
    assert np.abs(other - descriptors).max() > 0.1


def test_delf_max_features_and_file_url(delf_folder, astronaut):
    params = local_features.ExtractorParams(max_features=10)
    extractor = local_features.make_extractor("delf:file://" + delf_folder, params)
    locations, descriptors = extractor.extract(astronaut[:100, :120])
    assert locations.shape == (10, 2) and descriptors.shape == (10, 40)


# --- offline extractors ---------------------------------------------------------------------


def test_default_is_orb_and_specs_are_checked():
    extractor = local_features.make_extractor("default")
    assert extractor.spec == "orb"  # resolved: stored features name what made them
    assert extractor.max_descriptor_distance == 0.8
    assert local_features.make_extractor("sift").max_descriptor_distance == 0.5
    with pytest.raises(ValueError):
        local_features.make_extractor("surf")
    with pytest.raises(ValueError):
        local_features.make_extractor("delf:")
    with pytest.raises(ValueError):
        local_features.ExtractorParams(max_features=0)


@pytest.mark.parametrize("spec", ["orb", "sift"])
def test_locations_are_in_input_pixels_for_large_images(spec, astronaut):
    """A 2x enlarged image is shrunk back to 512 px inside: its keypoints land at twice the
    512 px image's keypoint coordinates (checked for the nearest counterpart of each)."""
    extractor = local_features.make_extractor(spec)
    small_locations, small_descriptors = extractor.extract(astronaut)
    large = cv2.resize(astronaut, (1024, 1024), interpolation=cv2.INTER_CUBIC)
    large_locations, large_descriptors = extractor.extract(large)
    assert len(small_locations) == 1000 and len(large_locations) == 1000
    assert large_locations.min() >= -0.5 and large_locations.max() <= 1023.5
    # Pixel centres: input y = (y_512 + 0.5) * 2 - 0.5.
    expected = (small_locations + 0.5) * 2 - 0.5
    distances = np.linalg.norm(large_locations[:, None] - expected[None], axis=2).min(axis=1)
    assert np.mean(distances < 2.0) > 0.8
    for descriptors in (small_descriptors, large_descriptors):
        unit = rescoring_descriptors.unit_descriptors(descriptors)
        np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, atol=1e-5)


def test_small_images_are_enlarged_and_still_get_features(astronaut):
    tiny = cv2.resize(astronaut, (64, 48), interpolation=cv2.INTER_AREA)
    locations, descriptors = local_features.make_extractor("orb").extract(tiny)
    assert len(locations) > 50
    assert locations[:, 0].min() >= -0.5 and locations[:, 0].max() <= 47.5
    assert locations[:, 1].min() >= -0.5 and locations[:, 1].max() <= 63.5


def test_orb_descriptors_are_packed_and_unpack_to_hamming_distance(astronaut):
    """ORB keeps OpenCV's packed bits (32 bytes a keypoint, not 1 KB of floats); unpacked to
    unit rows, squared distances are Hamming distances / 64, counted here bit by bit."""
    _, packed = local_features.make_extractor("orb").extract(astronaut)
    assert packed.shape == (1000, 32) and packed.dtype == np.uint8
    assert rescoring_descriptors.descriptor_dim(packed) == 256
    descriptors = rescoring_descriptors.unit_descriptors(packed)
    assert descriptors.shape == (1000, 256) and descriptors.dtype == np.float32
    np.testing.assert_allclose(np.abs(descriptors), 1.0 / 16.0)
    hamming = np.array([[bin(int.from_bytes(a.tobytes(), "big") ^ int.from_bytes(
        b.tobytes(), "big")).count("1") for b in packed[:50]] for a in packed[:50]])
    squared = ((descriptors[:50, None, :] - descriptors[None, :50, :]) ** 2).sum(axis=2)
    np.testing.assert_allclose(squared, hamming / 64.0, atol=1e-5)


def test_featureless_image_gives_empty_arrays():
    grey = np.full((120, 160, 3), 128, np.uint8)
    for spec, shape, dtype in (("orb", (0, 32), np.uint8), ("sift", (0, 128), np.float32)):
        locations, descriptors = local_features.make_extractor(spec).extract(grey)
        assert locations.shape == (0, 2) and descriptors.shape == shape
        assert locations.dtype == np.float32 and descriptors.dtype == dtype


def test_bad_images_raise():
    extractor = local_features.make_extractor("orb")
    with pytest.raises(ValueError):
        extractor.extract(np.zeros((10, 10), np.uint8))
    with pytest.raises(ValueError):
        extractor.extract(np.zeros((10, 10, 3), np.float32))


def test_extractors_survive_pickling_without_their_models(delf_folder, astronaut):
    """Beam ships DoFns (with their extractor) by pickling; models are rebuilt on first use."""
    import pickle  # only to prove the objects cross process boundaries; never for data

    for spec in ("orb", "delf:" + delf_folder):
        extractor = local_features.make_extractor(spec)
        before = extractor.extract(astronaut[:128, :128])
        copy = pickle.loads(pickle.dumps(extractor))
        after = copy.extract(astronaut[:128, :128])
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
