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


# ---------------------------------------------------------------------------------------------
# Standard mode is frozen: --scenes_dir and --difficulty must not change a byte of it.

GOLDEN_OPTIONS = dict(num_classes=2, train_per_class=2, test_per_class=1, num_train_distractors=2,
                      num_test_distractors=3, min_size=64, max_size=160, seed=5)


def _combined_digest(root):
    combined = hashlib.sha256()
    for path, digest in sorted(_tree_digest(root).items()):
        combined.update(path.encode() + b"\0" + bytes.fromhex(digest))
    return len(_tree_digest(root)), combined.hexdigest()


def test_standard_settings_spelt_out_change_nothing(tmp_path):
    # No hard-coded digest: JPEG and warp outputs may differ in the last bits between library
    # versions and CPUs. Standard-mode output was checked against the generator before
    # --scenes_dir/--difficulty existed when they were added.
    toy_data.generate(toy_data.ToyDataConfig(output_dir=str(tmp_path / "api"), **GOLDEN_OPTIONS))
    expected = _combined_digest(tmp_path / "api")
    assert expected[0] == 17
    # The same through the CLI with every new setting spelt out at its standard value.
    argv = ["--output_dir", str(tmp_path / "cli")]
    for name, value in GOLDEN_OPTIONS.items():
        argv += [f"--{name}", str(value)]
    argv += ["--difficulty", "standard", "--perspective", "0.12", "--rotation", "15",
             "--scale_range", "0.4,1.2", "--partial_fraction", "0", "--occluder_fraction", "0",
             "--hard_distractor_fraction", "0"]
    assert toy_data.main(argv) == 0
    assert _combined_digest(tmp_path / "cli") == expected


def test_new_settings_do_not_shift_the_standard_streams(dataset, tmp_path):
    # Occluders and hard distractors change test images and distractors only; training views
    # (and the ids) come from the same streams as in standard mode.
    root, _ = dataset
    _generate(tmp_path, occluder_fraction=1.0, hard_distractor_fraction=0.5)
    standard, changed = _tree_digest(root), _tree_digest(tmp_path)
    train = [path for path in standard if path.startswith(os.path.join("images", "train"))]
    assert train and all(standard[path] == changed[path] for path in train)
    assert standard["train.csv"] == changed["train.csv"]
    assert standard["test.csv"] == changed["test.csv"]
    test_images = [path for path in standard if path.startswith(os.path.join("images", "test"))]
    assert all(standard[path] != changed[path] for path in test_images)  # all occluded


# ---------------------------------------------------------------------------------------------
# --scenes_dir.

def _photo(seed, height=90, width=120):
    """Distinct content per seed: a colour gradient with a few rectangles."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    pixels = np.stack([xs * 255 // width, ys * 255 // height, np.full_like(xs, 40 * seed)], -1)
    for _ in range(6):
        y, x = rng.integers(0, height - 20), rng.integers(0, width - 20)
        pixels[y:y + 20, x:x + 20] = rng.integers(0, 256, size=3)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture()
def scenes(tmp_path):
    """alpha.png, Bravo.JPG (EXIF orientation 6), charlie/{one.jpg,two.png}, a broken photo,
    and files that are not photos."""
    folder = tmp_path / "scenes"
    (folder / "charlie").mkdir(parents=True)
    _photo(1).save(folder / "alpha.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    _photo(2, height=80, width=128).save(folder / "Bravo.JPG", exif=exif.tobytes())
    _photo(3).save(folder / "charlie" / "one.jpg")
    _photo(4).save(folder / "charlie" / "two.png")
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    (folder / "notes.txt").write_text("not a photo")
    (folder / "charlie" / ".hidden.jpg").write_bytes(b"ignored")
    (folder / "empty_folder").mkdir()
    return folder


SCENE_SIZES = dict(train_per_class=2, test_per_class=2, num_train_distractors=2,
                   num_test_distractors=2, min_size=64, max_size=160)


def test_scenes_dir_classes_counts_and_class_table(scenes, tmp_path, caplog):
    summary = toy_data.generate(toy_data.ToyDataConfig(
        output_dir=str(tmp_path / "out"), scenes_dir=str(scenes), **SCENE_SIZES))
    root = tmp_path / "out"
    table = {entry["name"]: entry for entry in summary["classes"]}
    assert set(table) == {"alpha", "Bravo", "charlie"}
    assert {name: (entry["source"], entry["photos"]) for name, entry in table.items()} == {
        "alpha": ("alpha.png", 1), "Bravo": ("Bravo.JPG", 1), "charlie": ("charlie/", 2)}
    # The unreadable photo is skipped with a warning, and counted.
    assert summary["counts"]["skipped_photos"] == 1
    assert summary["skipped_photos"][0]["source"] == "broken.jpg"
    assert "broken.jpg" in caplog.text
    # Counts reconcile with the CSVs.
    _, train_rows = _read_csv(root / "train.csv")
    _, test_rows = _read_csv(root / "test.csv")
    _, solution_rows = _read_csv(root / "test_solution.csv")
    ids = {entry["landmark_id"] for entry in summary["classes"]}
    assert summary["counts"]["classes"] == 3
    assert len(train_rows) == summary["counts"]["train_images"] == 3 * 2
    assert sorted(int(row[2]) for row in train_rows) == sorted(list(ids) * 2)
    assert len(test_rows) == len(solution_rows) == summary["counts"]["test_images"] == 3 * 2 + 2
    assert sorted(row[1] for row in solution_rows if row[1]) == sorted([str(i) for i in ids] * 2)
    assert len(os.listdir(root / "distractors")) == 2
    written = json.loads((root / "toy_data.json").read_text())
    assert written["config"]["scenes_dir"] == str(scenes)
    assert written["config"]["num_classes"] == 3
    assert written["config"]["num_classes_requested"] is None
    assert "--scenes_dir" in (root / "README.txt").read_text()
    for row in test_rows:
        with Image.open(root / row[1]) as image:
            assert 64 <= max(image.size) <= 160


def test_scenes_dir_num_classes_takes_the_first_by_name(scenes, tmp_path):
    summary = toy_data.generate(toy_data.ToyDataConfig(
        output_dir=str(tmp_path / "out"), scenes_dir=str(scenes), num_classes=2, **SCENE_SIZES))
    assert sorted(entry["name"] for entry in summary["classes"]) == ["Bravo", "alpha"]
    assert summary["counts"]["skipped_photos"] == 0  # broken.jpg sorts after: never opened


def test_load_scene_photo_applies_exif_orientation_and_downscales(scenes):
    upright = toy_data.load_scene_photo(str(scenes / "Bravo.JPG"))
    assert upright.shape == (128, 80, 3) and upright.dtype == np.uint8  # saved 128 x 80, turned
    small = toy_data.load_scene_photo(str(scenes / "alpha.png"), max_side=64)
    assert max(small.shape[:2]) == 64 and small.shape[2] == 3
    with pytest.raises(ValueError, match="broken.jpg"):
        toy_data.load_scene_photo(str(scenes / "broken.jpg"))


def _one_error(capsys):
    error = capsys.readouterr().err.strip()
    assert error.startswith("landmarks-toy-data: error:") and "\n" not in error, error
    return error


def test_scenes_dir_errors_exit_2_with_one_line(tmp_path, capsys):
    base = ["--output_dir", str(tmp_path / "out"), "--min_size", "64", "--max_size", "96"]
    assert toy_data.main(base + ["--scenes_dir", str(tmp_path / "missing")]) == 2
    assert "no such folder" in _one_error(capsys)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    assert toy_data.main(base + ["--scenes_dir", str(tmp_path / "empty")]) == 2
    assert "no photos" in _one_error(capsys)
    (tmp_path / "single" / "tower").mkdir(parents=True)
    _photo(1).save(tmp_path / "single" / "tower" / "a.jpg")
    _photo(2).save(tmp_path / "single" / "tower" / "b.jpg")
    assert toy_data.main(base + ["--scenes_dir", str(tmp_path / "single")]) == 2
    assert "at least 2" in _one_error(capsys)
    (tmp_path / "unreadable").mkdir()
    for name in ("a.jpg", "b.png"):
        (tmp_path / "unreadable" / name).write_bytes(b"junk")
    assert toy_data.main(base + ["--scenes_dir", str(tmp_path / "unreadable")]) == 2
    assert "no usable photos" in _one_error(capsys)
    (tmp_path / "clash" / "a").mkdir(parents=True)
    _photo(1).save(tmp_path / "clash" / "a.png")
    _photo(2).save(tmp_path / "clash" / "a" / "x.jpg")
    assert toy_data.main(base + ["--scenes_dir", str(tmp_path / "clash")]) == 2
    assert "named 'a'" in _one_error(capsys)
    assert not (tmp_path / "out").exists()  # checked before the output folder is touched


# ---------------------------------------------------------------------------------------------
# --difficulty hard and its settings.

def test_visible_source_fraction():
    shape = (100, 200)
    full = np.array([[0, 0], [200, 0], [200, 100], [0, 100]], np.float64)
    assert toy_data.visible_source_fraction(full, shape) == pytest.approx(1.0)
    assert toy_data.visible_source_fraction(full * [0.5, 1], shape) == pytest.approx(0.5)
    zoomed_out = (full - [100, 50]) * 3 + [100, 50]
    assert toy_data.visible_source_fraction(zoomed_out, shape) == pytest.approx(1.0)
    assert toy_data.visible_source_fraction(full + [400, 0], shape) == 0.0


def test_partial_views_show_a_smaller_share_of_the_source():
    shape = (400, 600)
    hard = toy_data.ToyDataConfig(output_dir="unused", difficulty="hard")
    standard, partial, areas = [], [], []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        out_size = toy_data.output_size(shape, rng, 300, 900)
        corners = toy_data.view_corners(shape, out_size, toy_data.TEST_VIEW, rng)
        standard.append(toy_data.visible_source_fraction(corners, shape))
        areas.append(rng.uniform(*toy_data.PARTIAL_AREA))
        corners = toy_data.view_corners(shape, out_size, hard.test_view, rng,
                                        area_fraction=areas[-1])
        partial.append(toy_data.visible_source_fraction(corners, shape))
    low, high = toy_data.PARTIAL_AREA
    assert low - 0.08 < min(partial) and max(partial) <= high + 1e-9
    assert np.mean(partial) < (low + high) / 2 + 0.01 < 0.5 < np.mean(standard)
    assert np.mean(np.abs(np.array(partial) - np.array(areas))) < 0.02  # mostly exact
    # Without tilt or rotation a partial region has exactly the requested area, inside.
    flat = toy_data.ViewParams(min_scale=1, max_scale=1, max_rotation=0, max_tilt=0)
    corners = toy_data.view_corners(shape, (300, 200), flat, np.random.default_rng(0),
                                    area_fraction=0.3)
    assert toy_data.visible_source_fraction(corners, shape) == pytest.approx(0.3)


def test_occluders_cover_their_share_of_the_view():
    photos = [toy_data.load_source("brick")]
    for seed in range(30):
        occluder = toy_data.draw_occluder(np.random.default_rng(seed), photos)
        mask = toy_data.occluder_mask(occluder, (320, 240))
        assert mask.shape == (240, 320)
        assert 0.09 <= mask.mean() <= 0.41
        assert mask.mean() == pytest.approx(occluder.area, abs=0.02)
    # Rendered: a white occluder over a black scene shows as bright pixels where the mask is.
    scene = np.zeros((300, 400, 3), np.uint8)
    occluder = toy_data.Occluder(box=(0.2, 0.3, 0.7, 0.8), shape="rectangle",
                                 colour=(255, 255, 255))
    frontal = toy_data.ViewParams(min_scale=0.6, max_scale=0.9, max_rotation=0, max_tilt=0)
    image = toy_data.render_view(scene, np.random.default_rng(1), frontal, 64, 160,
                                 toy_data.ViewExtras(occluder=occluder))
    bright = np.asarray(image.convert("L")) > 100
    expected = toy_data.occluder_mask(occluder, image.size)
    assert bright.mean() == pytest.approx(0.25, abs=0.03)
    assert (bright == expected).mean() > 0.97
    plain = toy_data.render_view(scene, np.random.default_rng(1), frontal, 64, 160)
    assert (np.asarray(plain.convert("L")) > 100).mean() < 0.01


def _joint_histogram(pixels, bins=8):
    index = pixels.reshape(-1, 3).astype(np.int64) * bins // 256
    counts = np.bincount((index[:, 0] * bins + index[:, 1]) * bins + index[:, 2],
                         minlength=bins ** 3)
    return counts / counts.sum()


def _channel_histograms(pixels, bins=16):
    return np.concatenate([np.histogram(pixels[..., c], bins=bins, range=(0, 256))[0]
                           for c in range(3)]) / (3 * pixels[..., 0].size)


def _intersection(first, second):
    return float(np.minimum(first, second).sum())


def test_hard_distractors_share_colour_with_their_landmark_plain_ones_do_not():
    photos = [toy_data.load_source(name) for name in toy_data.OTHER_SOURCES]
    for name in ("astronaut", "rocket"):
        landmark = toy_data.load_source(name)
        for seed in range(2):
            tiles = toy_data.shuffled_tiles(landmark, np.random.default_rng(seed))
            assert _intersection(_joint_histogram(tiles), _joint_histogram(landmark)) > 0.9
            # Same pixels, other places: geometry is broken.
            assert tiles.shape[0] * tiles.shape[1] > 0.8 * landmark.shape[0] * landmark.shape[1]
            crop = landmark[:tiles.shape[0], :tiles.shape[1]]
            assert np.mean(np.abs(tiles.astype(int) - crop.astype(int))) > 20
            recoloured = toy_data.hard_distractor_scene("recolour", np.random.default_rng(seed),
                                                        landmark, photos)
            assert _intersection(_channel_histograms(recoloured),
                                 _channel_histograms(landmark)) > 0.95
            for kind in ("photo_crop", "clouds", "shapes", "grating"):
                plain = toy_data.distractor_scene(kind, np.random.default_rng(seed), photos)
                assert _intersection(_joint_histogram(plain), _joint_histogram(landmark)) < 0.5
                assert _intersection(_channel_histograms(plain),
                                     _channel_histograms(landmark)) < 0.8


def test_hard_distractors_are_evenly_spread():
    assert [toy_data.is_hard_distractor(i, 0.5) for i in range(6)] == [False, True] * 3
    assert sum(toy_data.is_hard_distractor(i, 0.35) for i in range(20)) == 7
    assert not any(toy_data.is_hard_distractor(i, 0.0) for i in range(20))
    assert all(toy_data.is_hard_distractor(i, 1.0) for i in range(20))


def test_hard_preset_and_explicit_flags_override_it():
    hard = toy_data.ToyDataConfig(output_dir="x", difficulty="hard")
    assert (hard.train_per_class, hard.perspective, hard.rotation, hard.scale_range) == (
        4, 0.25, 30.0, (0.25, 2.0))
    assert (hard.partial_fraction, hard.occluder_fraction, hard.hard_distractor_fraction) == (
        0.35, 0.4, 0.5)
    assert not hard.legacy_output and toy_data.ToyDataConfig(output_dir="x").legacy_output
    standard = toy_data.ToyDataConfig(output_dir="x")
    assert (standard.num_classes, standard.train_per_class, standard.test_view) == (
        6, 16, toy_data.TEST_VIEW)
    parsed = toy_data.parse_args([
        "--output_dir", "x", "--difficulty", "hard", "--train_per_class", "9",
        "--scale_range", "0.5,1.5", "--partial_fraction", "0", "--perspective", "0.3"])
    assert (parsed.train_per_class, parsed.scale_range, parsed.partial_fraction,
            parsed.perspective) == (9, (0.5, 1.5), 0.0, 0.3)
    assert (parsed.rotation, parsed.occluder_fraction) == (30.0, 0.4)  # from the preset
    one_flag = toy_data.parse_args(["--output_dir", "x", "--occluder_fraction", "0.2"])
    assert one_flag.difficulty == "standard" and one_flag.occluder_fraction == 0.2
    assert not one_flag.legacy_output
    help_text = toy_data.build_parser().format_help()
    for flag in ("--scenes_dir", "--difficulty", "--perspective", "--rotation", "--scale_range",
                 "--partial_fraction", "--occluder_fraction", "--hard_distractor_fraction"):
        assert flag in help_text


@pytest.mark.parametrize("overrides, message", [
    (dict(difficulty="extreme"), "difficulty"),
    (dict(perspective=0.6), "perspective"),
    (dict(scale_range=(1.5, 0.5)), "scale_range"),
    (dict(occluder_fraction=1.5), "occluder_fraction"),
    (dict(scenes_dir="gs://bucket/photos"), "local"),
])
def test_new_settings_validation(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        toy_data.ToyDataConfig(output_dir=str(tmp_path), **{**TINY, **overrides})


def test_hard_dataset_records_its_settings_and_counts(tmp_path):
    options = dict(num_classes=2, test_per_class=3, num_train_distractors=4,
                   num_test_distractors=4, min_size=64, max_size=128, difficulty="hard")
    summary = toy_data.generate(toy_data.ToyDataConfig(output_dir=str(tmp_path / "a"), **options))
    root = tmp_path / "a"
    _, train_rows = _read_csv(root / "train.csv")
    assert len(train_rows) == 2 * 4  # the hard preset's training views per class
    written = json.loads((root / "toy_data.json").read_text())
    config = written["config"]
    assert config["difficulty"] == "hard" and config["train_per_class"] == 4
    assert (config["perspective"], config["rotation"], config["scale_range"]) == (
        0.25, 30.0, [0.25, 2.0])
    assert (config["partial_fraction"], config["occluder_fraction"],
            config["hard_distractor_fraction"]) == (0.35, 0.4, 0.5)
    for split in ("train", "test"):
        kinds = written["distractor_kinds"][split]
        assert kinds["tile_shuffle"] + kinds["recolour"] == 2  # floor(4 * 0.5)
        assert sum(kinds.values()) == 4
    views = written["hard_views"]
    assert 0 <= views["landmarks"]["partial"] <= 6 and 0 <= views["distractors"]["occluded"] <= 4
    assert written == {k: v for k, v in summary.items() if k != "seconds"}
    assert "Difficulty hard" in (root / "README.txt").read_text()
    toy_data.generate(toy_data.ToyDataConfig(output_dir=str(tmp_path / "b"), **options))
    assert _tree_digest(root) == _tree_digest(tmp_path / "b")


def test_method_doc_states_the_difficulty_presets_of_the_code():
    """docs/METHOD.md's table of the two presets, row by row, equals DIFFICULTIES."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "METHOD.md").read_text()
    section = text[text.index("## Comparing recognizers on harder data"):]
    rows = [line for line in section.splitlines() if line.startswith("| ")][1:8]

    def numbers(cell):
        return [float(value) for value in re.findall(r"\d+(?:\.\d+)?", cell)]

    order = ("train_per_class", "perspective", "rotation", "scale_range", "partial_fraction",
             "occluder_fraction", "hard_distractor_fraction")
    for name, row in zip(order, rows):
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        for preset, cell in zip(("standard", "hard"), cells[1:3]):
            value = getattr(toy_data.DIFFICULTIES[preset], name)
            expected = list(value) if isinstance(value, tuple) else [value]
            assert numbers(cell) == pytest.approx(expected), (name, preset, cell)


def test_package_modules_import_only_the_ones_listed_before_them():
    """The package docstring lists its modules so that each imports (at module level or inside
    a function) only modules listed above it: no import cycle, and the list is a reading order."""
    import ast
    import pathlib

    folder = pathlib.Path(toy_data.__file__).parent
    listing = toy_data.__doc__.split("one part per module", 1)[1]
    order = re.findall(r"^    (\w+)  ", listing, flags=re.MULTILINE)
    assert sorted(order) == sorted(
        path.stem for path in folder.glob("*.py") if not path.stem.startswith("__"))
    for position, module in enumerate(order):
        siblings = set()
        for node in ast.walk(ast.parse((folder / f"{module}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:  # from . import x, from .x import
                siblings.update([node.module.split(".")[0]] if node.module else [
                    alias.name for alias in node.names])
            elif isinstance(node, ast.ImportFrom) and node.module == toy_data.__name__:
                siblings.update(alias.name for alias in node.names)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [
                    alias.name for alias in node.names]
                siblings.update(name.split(".")[2] for name in names
                                if name.startswith(toy_data.__name__ + "."))
        assert siblings <= set(order[:position]), (module, siblings - set(order[:position]))
