"""The toy dataset generator: determinism, layout, CSV formats, decodable images in bounds."""

import csv
import hashlib
import io
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from beam_pipelines import toy_data

TINY = dict(num_classes=3, train_per_class=3, test_per_class=2, num_train_distractors=3,
            num_test_distractors=4, min_size=64, max_size=200)


def _generate(path, **overrides):
    options = {**TINY, **overrides}
    return toy_data.generate(toy_data.ToyDataConfig(output_dir=str(path), **options))


def _tree_digest(root):
    digests = {}
    for folder, _, names in os.walk(root):
        for name in names:
            full = os.path.join(folder, name)
            with open(full, "rb") as handle:
                digests[os.path.relpath(full, root)] = hashlib.sha256(handle.read()).hexdigest()
    return digests


def _read_csv(path):
    with open(path, newline="") as handle:
        text = handle.read()
    reader = csv.reader(io.StringIO(text))
    header = next(reader)
    return header, [row for row in reader]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("toy")
    summary = _generate(root)
    return root, summary


def test_same_seed_gives_identical_files_and_other_seed_differs(dataset, tmp_path):
    root, _ = dataset
    _generate(tmp_path / "again")
    first, second = _tree_digest(root), _tree_digest(tmp_path / "again")
    assert first == second
    assert len(first) == 3 * 3 + 3 * 2 + 3 + 4 + 6  # images + 3 CSVs, json, README, _SUCCESS
    _generate(tmp_path / "other", seed=1)
    other = _tree_digest(tmp_path / "other")
    assert other["train.csv"] != first["train.csv"]
    assert not set(first.values()) & set(other.values()) - {first["README.txt"], first["_SUCCESS"]}


def test_csv_headers_counts_and_ids(dataset):
    root, summary = dataset
    train_header, train_rows = _read_csv(root / "train.csv")
    test_header, test_rows = _read_csv(root / "test.csv")
    solution_header, solution_rows = _read_csv(root / "test_solution.csv")
    assert train_header == ["id", "url", "landmark_id"]
    assert test_header == ["id", "url"]
    assert solution_header == ["id", "landmarks", "Usage"]
    assert len(train_rows) == 3 * 3
    assert len(test_rows) == 3 * 2 + 4
    assert [row[0] for row in test_rows] == [row[0] for row in solution_rows]
    distractor_files = sorted(os.listdir(root / "distractors"))
    assert len(distractor_files) == 3
    all_ids = ([row[0] for row in train_rows] + [row[0] for row in test_rows]
               + [name[:-4] for name in distractor_files])
    assert len(set(all_ids)) == len(all_ids)
    assert all(re.fullmatch(r"[0-9a-f]{16}", image_id) for image_id in all_ids)

    class_ids = {entry["landmark_id"] for entry in summary["classes"]}
    assert len(class_ids) == 3 and class_ids != {0, 1, 2}
    train_counts = {}
    for _, _, landmark_id in train_rows:
        train_counts[int(landmark_id)] = train_counts.get(int(landmark_id), 0) + 1
    assert train_counts == {landmark_id: 3 for landmark_id in class_ids}
    solution_labels = [row[1] for row in solution_rows]
    assert sum(1 for label in solution_labels if label == "") == 4
    assert {int(label) for label in solution_labels if label} == class_ids
    assert all(solution_labels.count(str(c)) == 2 for c in class_ids)
    assert {row[2] for row in solution_rows} == {"Public", "Private"}

    written = json.loads((root / "toy_data.json").read_text())
    assert written["counts"] == summary["counts"]
    assert written["counts"]["test_distractors"] == 4
    assert written["config"]["seed"] == 0 and "output_dir" not in written["config"]
    assert (root / "_SUCCESS").exists()


def test_every_url_exists_decodes_and_has_size_in_bounds(dataset):
    root, _ = dataset
    urls = [row[1] for row in _read_csv(root / "train.csv")[1]]
    urls += [row[1] for row in _read_csv(root / "test.csv")[1]]
    urls += [f"distractors/{name}" for name in os.listdir(root / "distractors")]
    assert all(not os.path.isabs(url) for url in urls)
    for url in urls:
        with Image.open(root / url) as image:
            assert image.format == "JPEG"
            assert image.mode == "RGB"
            assert 64 <= max(image.size) <= 200
            pixels = np.asarray(image)
        assert pixels.std() > 1.0  # not a blank frame


def test_landmark_views_of_a_class_resemble_each_other_more_than_distractors(dataset):
    # A weak realism check: colour histograms of one class's views are closer to each other
    # than to the distractors' on average.
    root, _ = dataset
    _, train_rows = _read_csv(root / "train.csv")

    def histogram(path):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB").resize((64, 64)), np.float32)
        hist = np.concatenate([np.histogram(pixels[..., c], bins=8, range=(0, 255))[0]
                               for c in range(3)]).astype(np.float32)
        return hist / hist.sum()

    by_class = {}
    for _, url, landmark_id in train_rows:
        by_class.setdefault(landmark_id, []).append(histogram(root / url))
    distractors = [histogram(root / "distractors" / name)
                   for name in os.listdir(root / "distractors")]
    within, against = [], []
    for views in by_class.values():
        for i, a in enumerate(views):
            within += [np.abs(a - b).sum() for b in views[i + 1:]]
            against += [np.abs(a - d).sum() for d in distractors]
    assert np.mean(within) < np.mean(against)


def test_homography_maps_the_four_points():
    rng = np.random.default_rng(3)
    source = rng.uniform(0, 100, size=(4, 2))
    target = source + rng.uniform(-10, 10, size=(4, 2))
    matrix = toy_data.homography(source, target)
    mapped = np.c_[source, np.ones(4)] @ matrix.T
    np.testing.assert_allclose(mapped[:, :2] / mapped[:, 2:], target, atol=1e-9)


def test_refuses_non_empty_folder_unless_overwrite(tmp_path):
    _generate(tmp_path, num_classes=1, train_per_class=1, test_per_class=0, num_train_distractors=0,
              num_test_distractors=1)
    with pytest.raises(ValueError, match="--overwrite"):
        _generate(tmp_path, num_classes=1)
    summary = _generate(tmp_path, num_classes=1, train_per_class=2, test_per_class=0,
                        num_train_distractors=0, num_test_distractors=1, overwrite=True)
    assert summary["counts"]["train_images"] == 2
    assert len(os.listdir(tmp_path / "images" / "train")) == 2  # old files are gone


@pytest.mark.parametrize("overrides, message", [
    (dict(num_classes=0), "num_classes"),
    (dict(num_classes=99), "num_classes"),
    (dict(min_size=300, max_size=200), "min_size"),
    (dict(test_per_class=-1), "test_per_class"),
])
def test_config_validation(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        toy_data.ToyDataConfig(output_dir=str(tmp_path), **{**TINY, **overrides})


def test_main_cli(tmp_path, capsys):
    args = ["--output_dir", str(tmp_path / "cli"), "--num_classes", "1", "--train_per_class", "1",
            "--test_per_class", "1", "--num_train_distractors", "1", "--num_test_distractors", "1",
            "--min_size", "64", "--max_size", "96", "--seed", "7"]
    assert toy_data.main(args) == 0
    assert "1 landmarks" in capsys.readouterr().out
    assert toy_data.main(args) == 2  # folder not empty
    assert "--overwrite" in capsys.readouterr().err
    assert toy_data.main(args + ["--overwrite"]) == 0
