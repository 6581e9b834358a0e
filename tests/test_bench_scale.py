"""The scale ladder (bench/bench_scale.py): its arithmetic, its data, its memory sampler, and
one tiny real rung.

The growth figures are checked on numbers made from known power laws; the data generator's
counts against the sizes the issue asks for; the memory sampler against a grandchild process
that holds a known amount of memory; the real rung (slow) only for the shape of its table.
"""

from __future__ import annotations

import csv
import math
import os
import pathlib
import json
import subprocess
import sys
import textwrap

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import bench_scale  # noqa: E402
import scale_data  # noqa: E402
import scale_measure  # noqa: E402

MB = 1024 * 1024


# ---- the arithmetic ---------------------------------------------------------------------------


@pytest.mark.parametrize("exponent", [0.0, 0.5, 1.0, 1.7])
def test_fit_exponent_recovers_a_power_law(exponent):
    xs = [1000, 4000, 16000, 32000]
    ys = [3.0 * x ** exponent for x in xs]
    assert scale_measure.fit_exponent(xs, ys) == pytest.approx(exponent, abs=1e-9)


def test_fit_exponent_is_the_least_squares_slope_of_the_logs():
    xs, ys = [1, 2, 4], [1.0, 4.0, 8.0]  # log2 points (0,0) (1,2) (2,3): slope 1.5 in log2
    assert scale_measure.fit_exponent(xs, ys) == pytest.approx(1.5)
    assert scale_measure.fit_exponent([1000], [5.0]) is None
    assert scale_measure.fit_exponent([1000, 1000], [5.0, 6.0]) is None
    assert scale_measure.fit_exponent([1000, 4000, 16000], [0.0, 2.0, 8.0]) == pytest.approx(1.0)


def _row(n, stage, seconds, rss_mb, images):
    return {"n": n, "stage": stage, "status": "ok", "images": images, "seconds": seconds,
            "seconds_per_image": seconds / images, "cpu_seconds": 1.5 * seconds,
            "peak_rss_bytes": int(rss_mb * MB)}


def test_growth_figures_from_rows():
    rows = []
    for n in (1000, 4000, 16000):
        test_images = n // 8
        rows.append(_row(n, "ingest train", 10 + 0.01 * n, 2000, n))
        # 500 MB fixed + 3 MB per test image; time grows as n^2
        rows.append(_row(n, "predict classifier", (n / 1000) ** 2, 500 + 3 * test_images,
                         test_images))
    rows.append({"n": 16000, "stage": "predict classifier (no hot class)", "status": "ok",
                 "images": 2000, "seconds": 200.0, "seconds_per_image": 0.1,
                 "peak_rss_bytes": (500 + 3 * 2000 - 150) * MB})
    fits = bench_scale.exponents(rows)
    assert fits["predict classifier"]["time"] == pytest.approx(2.0)
    assert fits["ingest train"]["memory"] == pytest.approx(0.0)
    growth = bench_scale.predict_memory_growth(rows)["predict classifier"]
    assert growth["rungs"] == [4000, 16000]
    assert growth["mb_per_test_image"] == pytest.approx(3.0, rel=1e-6)
    ratios = bench_scale.time_per_image_ratios(rows)
    # n^2 total time over n/8 images: time per image grows as n, 16000 / 4000 = 4
    assert ratios["predict classifier"] == {"rungs": [4000, 16000], "ratio": pytest.approx(4.0),
                                            "cpu_ratio": pytest.approx(4.0)}
    assert fits["predict classifier"]["cpu"] == pytest.approx(2.0)
    (hot,) = bench_scale.hot_comparison(rows)
    assert hot["stage"] == "predict classifier" and hot["difference_mb"] == pytest.approx(150)
    text = bench_scale.table_md(rows, {
        **bench_scale.summarise(rows, bench_scale.ScaleConfig(rungs=(1000, 4000, 16000)),
                                "test")})
    assert "| predict classifier | 4000 -> 16000 | 500 -> 2000 | 3.00 |" in text


# ---- the data ---------------------------------------------------------------------------------


def _read(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_generated_rung_has_the_asked_sizes_and_a_hot_class(tmp_path):
    hot = scale_data.generate(str(tmp_path / "hot"), 160, seed=3)
    cold = scale_data.generate(str(tmp_path / "cold"), 160, seed=3, hot_class=False)
    assert hot["counts"] == {"classes": 20, "train_images": 160, "train_distractors": 20,
                             "test_images": 20, "test_landmarks": 10, "test_non_landmarks": 10,
                             "test_hot_class": 4}
    train = _read(tmp_path / "hot" / "train.csv")
    per_class = {}
    for row in train:
        per_class[row["landmark_id"]] = per_class.get(row["landmark_id"], 0) + 1
    assert len(per_class) == 20 and set(per_class.values()) == {8}
    assert len(list((tmp_path / "hot" / "distractors").iterdir())) == 20
    solution = _read(tmp_path / "hot" / "test_solution.csv")
    labels = [row["landmarks"] for row in solution]
    assert labels.count("") == 10
    assert labels.count(str(hot["hot_landmark_id"])) == 4
    cold_labels = [row["landmarks"] for row in _read(tmp_path / "cold" / "test_solution.csv")]
    assert max(cold_labels.count(label) for label in set(cold_labels) - {""}) == 1
    # the training set does not depend on the hot class: one model serves both test sets
    assert (tmp_path / "hot" / "train.csv").read_bytes() == (
        tmp_path / "cold" / "train.csv").read_bytes()
    first = train[0]["url"]
    assert (tmp_path / "hot" / first).read_bytes() == (tmp_path / "cold" / first).read_bytes()
    from PIL import Image
    with Image.open(tmp_path / "hot" / first) as image:
        assert image.format == "JPEG" and 96 <= max(image.size) <= 128


# ---- the memory sampler -----------------------------------------------------------------------


def test_peak_memory_includes_grandchildren(tmp_path):
    """A child starts a grandchild that holds 300 MB for 1.5 s: the tree's peak sees it."""
    grandchild = "import time; b = bytearray(300 * 1024 * 1024); time.sleep(1.5)"
    child = textwrap.dedent(f"""
        import subprocess, sys
        sys.exit(subprocess.call([sys.executable, "-c", {grandchild!r}]))
    """)
    measured = scale_measure.run_measured([sys.executable, "-c", child],
                                          str(tmp_path / "log.txt"))
    assert measured.returncode == 0 and measured.stopped is None
    assert measured.peak_rss_bytes >= 300 * MB
    alone = scale_measure.run_measured([sys.executable, "-c", "pass"], str(tmp_path / "l2.txt"))
    assert alone.peak_rss_bytes < 300 * MB


# ---- one tiny real rung -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LANDMARKS_BENCH_TESTS") != "1",
                    reason="5 job start-ups (~2 min): set LANDMARKS_BENCH_TESTS=1 to run it")
def test_one_tiny_rung_gives_one_row_per_stage(tmp_path):
    """Every stage of a 64-image rung runs and is measured (Beam in_memory, 2 training steps,
    the classifier only: the ladder's plumbing, not its figures; 5 job start-ups)."""
    output = tmp_path / "scale"
    result = subprocess.run(
        [sys.executable, str(BENCH / "bench_scale.py"), "--rungs", "64", "--train_steps", "1",
         "--hot_compare", "none", "--running_mode", "in_memory", "--recognizers", "classifier",
         "--output_dir", str(output)],
        capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = _read(output / "table.csv")
    assert [row["stage"] for row in rows] == [
        "generate", "ingest train", "ingest test", "train", "predict classifier",
        "evaluate classifier"]
    for row in rows:
        assert row["status"] == "ok" and row["n"] == "64"
        for field in ("images", "seconds", "seconds_per_image", "peak_rss_bytes",
                      "output_bytes"):
            assert float(row[field]) > 0, (row["stage"], field)
        beam = row["stage"].startswith(("ingest", "predict"))
        assert (row["shuffle_bytes"] != "") == beam, row["stage"]
        if beam:
            assert int(row["shuffle_bytes"]) > 0
    table_lines = (output / "table.md").read_text().splitlines()
    assert sum(line.startswith("| 64 | ") for line in table_lines) == 6
    assert (output / "scale.png").stat().st_size > 0
    assert math.isfinite(float(rows[0]["seconds"]))


def test_many_classes_tables_keep_a_skipped_configuration(tmp_path):
    """A sweep that skipped a configuration for lack of memory still writes all three tables,
    with the skipped row's reason and empty measured columns."""
    import bench_many_classes

    skipped = {"head": "sigmoid", "classes": 203094, "skipped": "MemAvailable 9.1 GiB"}
    bench_many_classes.write_tables([skipped], [], str(tmp_path), "bench_many_classes.py")
    csv_lines = (tmp_path / "many_classes.csv").read_text().splitlines()
    assert csv_lines[1].startswith("sigmoid,203094,") and csv_lines[1].endswith(",,,")
    assert "skipped: MemAvailable 9.1 GiB" in (tmp_path / "many_classes.md").read_text()
    assert json.loads((tmp_path / "many_classes.json").read_text())["configurations"] == [skipped]
