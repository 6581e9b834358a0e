"""The repository stands on its own: no pointers outside it, and docs/METHOD.md matches the code.

Users get this repository only, so no tracked text file may send them to notes kept outside it
(the method is described in ``docs/METHOD.md``). METHOD.md's table "The numbers at a glance" is
compared, row by row, with the defaults the code really uses, so the document cannot drift.
"""

from __future__ import annotations

import math
import os
import pathlib
import re
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
METHOD = ROOT / "docs" / "METHOD.md"

# Built from pieces so that this file does not match its own patterns.
FORBIDDEN = ("../" + "shared", "shared/" + "RECIPE", "RECIPE" + ".md", "PIT" + "FALLS")
TEXT_SUFFIXES = {".py", ".md", ".txt", ".cfg", ".ini", ".in", ".toml", ".yml", ".yaml"}
TEXT_NAMES = {"Makefile"}
_SKIPPED_DIRS = {".git", ".venv", "runs", "__pycache__", ".pytest_cache", "build", "dist"}


def _repository_files() -> list[pathlib.Path]:
    """Tracked files plus new ones not ignored (``git ls-files``); a tree walk without git."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, text=True, check=True, timeout=60,
        ).stdout
        return [ROOT / line for line in listing.splitlines() if line]
    except (OSError, subprocess.SubprocessError):
        files = []
        for folder, dirs, names in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in _SKIPPED_DIRS and not d.endswith(".egg-info")]
            files += [pathlib.Path(folder) / name for name in names]
        return files


def _text_files() -> list[pathlib.Path]:
    return [
        path for path in _repository_files()
        if path.is_file() and (path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES)
    ]


def test_no_text_file_points_outside_the_repository():
    files = _text_files()
    assert any(path.name == "README.md" for path in files)  # the listing works
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for pattern in FORBIDDEN:
                if pattern in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{number}: {pattern}")
    assert not offenders, "pointers outside the repository (use docs/METHOD.md):\n" + "\n".join(
        offenders)


def test_readme_links_the_method_document_in_its_opening():
    readme = (ROOT / "README.md").read_text()
    opening = readme.split("\n## ", 1)[0]
    assert "(docs/METHOD.md)" in opening
    assert METHOD.is_file()


# ---- docs/METHOD.md ---------------------------------------------------------------------------


def _method_text() -> str:
    return METHOD.read_text()


def _section(title: str) -> str:
    text = _method_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


@pytest.mark.parametrize(
    "what, keywords",
    [
        ("BatchNorm frozen", ("BatchNorm", "inference mode")),
        ("augmentation per image", ("per image", "per batch")),
        ("fixed references", ("fixed", "32", "48")),
        ("ORB offline default", ("ORB", "TF-Hub", "internet", "bench/bench_verification.py")),
        ("geometric learning rate", ("geometric", "by hand")),
        ("rounded crop sizes", ("round((1 + c) * S)", "truncat")),
        ("sigmoid, not softmax", ("sigmoid", "softmax")),
        ("true ranks", ("top_k", "true ranks")),
        ("batch GAP", ("Batch GAP", "class 0")),
    ],
)
def test_method_doc_names_each_deviation(what, keywords):
    deviations = _section("Deviations from the original write-up")
    missing = [word for word in keywords if word not in deviations]
    assert not missing, f"deviation {what!r}: METHOD.md's deviations lack {missing}"


def test_method_doc_says_where_the_code_lives():
    where = _section("Where each part lives in the code")
    for module in re.findall(r"`((?:trainer|rescoring|beam_pipelines|tfrecords_schema)/[\w/.]*)`",
                             where):
        assert (ROOT / module).exists(), f"METHOD.md names {module}, which does not exist"


def _code_defaults() -> dict[str, list]:
    """METHOD.md's table label -> the code default(s) it must equal (several places: all)."""
    from beam_pipelines.predict import config as predict_config
    from rescoring import ann, crops, local_features, retrieval, scores, verification
    from trainer import augment, layers, losses
    from trainer import config as train_config

    train = train_config.config_from_args(["--train_data", "t", "--label_map", "l",
                                           "--model_dir", "m"])
    phases = {phase.name: phase for phase in train.phases}
    predict, _ = predict_config.parse_args(["--model", "m/model.keras", "--test_data", "t",
                                            "--reference_data", "r", "--output_dir", "o/p"])
    aug = augment.AugmentParams()
    extractor = local_features.ExtractorParams()
    ransac = verification.VerificationParams()
    values = {
        "input size S, pixels": [train.data.image_size],
        "GeM exponent p, initial value": [train.model.gem_p],
        "GeM epsilon": [layers.DEFAULT_EPSILON],
        "dropout rate": [train.model.dropout],
        "loss rank weight": [train.model.rank_weight],
        "loss epsilon": [losses.DEFAULT_EPSILON],
        "augmentation: crop branch probability": [aug.crop_probability],
        "augmentation: crop extra c offset": [aug.crop_extra_offset],
        "augmentation: crop extra c span": [aug.crop_extra_span],
        "crop branch: rotation, degrees": [aug.crop_branch.rotation_degrees],
        "crop branch: shear, degrees": [aug.crop_branch.shear_degrees],
        "crop branch: zoom range": [aug.crop_branch.zoom_range],
        "crop branch: channel shift": [aug.crop_branch.channel_shift],
        "whole branch: rotation, degrees": [aug.whole_branch.rotation_degrees],
        "whole branch: shear, degrees": [aug.whole_branch.shear_degrees],
        "whole branch: zoom range": [aug.whole_branch.zoom_range],
        "whole branch: width and height shift": [aug.whole_branch.width_shift,
                                                 aug.whole_branch.height_shift],
        "whole branch: channel shift": [aug.whole_branch.channel_shift],
        "test-time views per image": [crops.CropSpec().num_views, predict.crops],
        "test-time crop fractions c": [crops.CropSpec().crop_fractions],
        "DELF input size, pixels": [extractor.delf_image_size],
        "DELF score threshold": [extractor.delf_score_threshold],
        "DELF image scales": [extractor.delf_image_scales],
        "local features per image, at most": [extractor.max_features],
        "matching distance (DELF)": [local_features.MAX_DESCRIPTOR_DISTANCE["delf"],
                                     ransac.max_descriptor_distance],
        "matching distance (ORB)": [local_features.MAX_DESCRIPTOR_DISTANCE["orb"]],
        "matching distance (SIFT)": [local_features.MAX_DESCRIPTOR_DISTANCE["sift"]],
        "RANSAC points per sample": [ransac.min_samples],
        "RANSAC residual threshold, pixels": [ransac.residual_threshold],
        "RANSAC trials": [ransac.max_trials],
        "references per class K": [predict.references_per_class,
                                   predict_config.DEFAULT_REFERENCES_PER_CLASS],
        "blend weight w of the classifier": [scores.BlendParams().nn_weight, predict.blend_weight],
        "candidates of the crop vote verified per test image": [
            predict.rerank_top, predict_config.DEFAULT_RERANK_TOP],
        "ArcFace heads: embedding width D": [train.model.embedding_dim],
        "ArcFace heads: scale s": [train.model.arcface_scale],
        "arcface head: margin m, radians": [train.model.arcface_margin],
        "subcenter_arcface head: sub-centers K per class": [train.model.subcenters],
        "subcenter_arcface head: margin of the largest class": [train.model.margin_min],
        "subcenter_arcface head: margin of the smallest class": [train.model.margin_max],
        "subcenter_arcface head: margin exponent lambda": [train.model.margin_power],
        "retrieval: nearest references that vote k": [retrieval.AggregationParams().k],
        "retrieval: inlier count worth a full vote": [retrieval.INLIER_CAP],
        "retrieval: non-landmark images averaged for the penalty": [
            retrieval.DEFAULT_NON_LANDMARK_K],
        "retrieval: exact search, index rows per block": [retrieval.DEFAULT_BLOCK_ROWS],
        "approximate search: cells probed per query": [ann.DEFAULT_NUM_PROBES],
    }
    for name, phase in phases.items():
        values[f"{name} phase: epochs"] = [phase.epochs]
        values[f"{name} phase: global batch"] = [phase.batch_size]
        if phase.final_learning_rate is None:
            values[f"{name} phase: learning rate"] = [phase.learning_rate]
        else:
            values[f"{name} phase: learning rate, first epoch"] = [phase.learning_rate]
            values[f"{name} phase: learning rate, last epoch"] = [phase.final_learning_rate]
        if phase.trainable_from is None:
            values[f"{name} phase: trainable from"] = [None]
        else:
            values[f"{name} phase: trainable from layer"] = [phase.trainable_from]
    return values


def _numbers_table() -> dict[str, str]:
    """METHOD.md's "numbers at a glance" table: label -> value as written."""
    rows = {}
    for line in _section("The numbers at a glance").splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("quantity", "---"):
            rows[cells[0]] = cells[1]
    return rows


def _parse(text: str):
    if text == "none":
        return None
    parts = [float(part) for part in text.split(",")]
    return tuple(parts) if "," in text else parts[0]


def _equal(documented, actual) -> bool:
    if documented is None or actual is None:
        return documented is None and actual is None
    if isinstance(documented, tuple) or isinstance(actual, tuple):
        return (isinstance(documented, tuple) and isinstance(actual, tuple)
                and len(documented) == len(actual)
                and all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(documented, actual)))
    return math.isclose(documented, float(actual), rel_tol=1e-9)


def test_method_doc_numbers_equal_the_code_defaults():
    table = _numbers_table()
    expected = _code_defaults()
    assert set(table) == set(expected), (
        f"rows without a check: {sorted(set(table) - set(expected))}; "
        f"checks without a row: {sorted(set(expected) - set(table))}")
    wrong = [
        f"{label}: METHOD.md says {table[label]}, the code uses {value!r}"
        for label, values in expected.items() for value in values
        if not _equal(_parse(table[label]), value)
    ]
    assert not wrong, "\n".join(wrong)


def test_method_doc_prose_states_the_key_defaults():
    """The headline numbers in the running text, rendered from the code defaults."""
    from beam_pipelines.predict import config as predict_config
    from rescoring import crops, local_features, scores
    from trainer import config as train_config

    text = " ".join(_method_text().split())  # line breaks do not matter
    rendered = [
        f"**w = {scores.BlendParams().nn_weight:g}**",
        f"starts at {train_config.ModelConfig().gem_p:.1f}",
        f"distance is below {local_features.MAX_DESCRIPTOR_DISTANCE['delf']:g}",
        f"K = {predict_config.DEFAULT_REFERENCES_PER_CLASS} reference images",
        f"Each test image gives {crops.CropSpec().num_views} views",
    ]
    missing = [phrase for phrase in rendered if phrase not in text]
    assert not missing, f"METHOD.md's text lacks {missing}"
