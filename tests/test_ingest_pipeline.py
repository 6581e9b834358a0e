"""The whole ``landmarks-ingest`` job on Beam's local FnApiRunner (pinned in every run).

One run over a manifest mixing good rows with every kind of bad input (local + HTTP) checks
that rows in = written + rejected, each rejection reason, the records, the label map, the dev
split, stats.json, the success marker and that nothing is written outside the output folder.
Smaller runs cover refusing a non-empty folder, ``--overwrite``, unlabelled manifests with a
reused label map, and ``gs://`` input and output on the storage emulator.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from beam_pipelines import io_utils
from beam_pipelines.ingest import pipeline, split
from beam_pipelines.ingest.manifest import parse_header, parse_line, ManifestRow
from tfrecords_schema.image_record import read_records
from tfrecords_schema.label_map import LabelMap, read_label_map
from test_ingest_normalise import (
    animated_gif, cmyk_jpeg, encode, exif_rotated_jpeg, gray16_png, grayscale_png, marked,
    palette_png, photo_like, png_with_size, rgba_png, tiff_bytes, truncated_jpeg,
)

RUNNER = "--runner=FnApiRunner"
MAX_SIDE = 64
FAST_FETCH = ["--timeout_seconds", "0.5", "--max_attempts", "2", "--backoff_seconds", "0.01"]


def jpeg(seed: int, width: int = 120, height: int = 90) -> bytes:
    return encode(photo_like(width, height, seed), "JPEG", quality=90)


def all_files(root: Path, skip: Path) -> set[str]:
    return {str(path) for path in root.rglob("*") if skip not in path.parents and path != skip}


def read_rejected(path: str) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def write_manifest(path: Path, lines: list[str]) -> None:
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def mixed_dataset(tmp_path, http_server):
    """A manifest with good rows of every image kind and every kind of bad row.

    Returns (manifest path, distractor folder, expected: dict line -> reason or "ok",
    expected distractor outcomes: id -> reason or "ok").
    """
    data = tmp_path / "data"
    images = data / "images"
    images.mkdir(parents=True)
    local = {
        "p1.jpg": jpeg(1), "p2.jpg": jpeg(2), "p3.jpg": jpeg(3), "p4.jpg": jpeg(4, 300, 200),
        "cmyk.jpg": cmyk_jpeg(), "grey.png": grayscale_png(), "palette.png": palette_png(),
        "rgba.png": rgba_png(), "gray16.png": gray16_png(), "anim.gif": animated_gif(),
        "rotated.jpg": exif_rotated_jpeg(marked(96, 64), 6),
        "webp.webp": encode(photo_like(50, 40, 9), "WEBP"),
        "empty.jpg": b"", "truncated.jpg": truncated_jpeg(), "text.jpg": b"hello, not an image",
        "tiff.jpg": tiff_bytes(), "bomb.png": png_with_size(20000, 20000),
    }
    for name, content in local.items():
        (images / name).write_bytes(content)
    for name, content in {"h1.jpg": jpeg(11), "h2.png": encode(photo_like(70, 50, 12), "PNG"),
                          "h3.jpg": jpeg(13)}.items():
        (http_server.root / name).write_bytes(content)
    (http_server.root / "login.html").write_bytes(b"<!doctype html><html>log in</html>")

    # (id, url, landmark_id or raw label text, expected outcome); line numbers start at 2.
    rows = [
        ("p1", "images/p1.jpg", "100", "ok"),
        ("p2", str(images / "p2.jpg"), "100", "ok"),
        ("p3", (images / "p3.jpg").as_uri(), "100", "ok"),
        ("p4", "images/p4.jpg", "100", "ok"),
        ("cmyk", "images/cmyk.jpg", "100", "ok"),
        ("grey", "images/grey.png", "200", "ok"),
        ("palette", "images/palette.png", "200", "ok"),
        ("rgba", "images/rgba.png", "200", "ok"),
        ("gray16", "images/gray16.png", "200", "ok"),
        ("anim", "images/anim.gif", "7", "ok"),
        ("rotated", "images/rotated.jpg", "7", "ok"),
        ("webp", "images/webp.webp", "7", "ok"),
        ("h1", http_server.url("files/h1.jpg"), "300", "ok"),
        ("h2", http_server.url("files/h2.png"), "300", "ok"),
        ("h3", http_server.url("flaky/1/h3.jpg"), "300", "ok"),  # 500 once, then OK
        ("missing", "images/nope.jpg", "100", "missing_file"),
        ("h404", http_server.url("files/gone.jpg"), "100", "http_404"),
        ("h500", http_server.url("status/500"), "100", "http_500"),
        ("refused", http_server.refused_url(), "100", "connection_refused"),
        ("slow", http_server.url("slow/h1.jpg"), "100", "timeout"),
        ("empty", "images/empty.jpg", "100", "empty"),
        ("truncated", "images/truncated.jpg", "100", "truncated"),
        ("html", http_server.url("as_jpeg/login.html"), "100", "not_an_image"),
        ("text", "images/text.jpg", "100", "not_an_image"),
        ("tiff", "images/tiff.jpg", "100", "unsupported_format"),
        ("bomb", "images/bomb.png", "100", "pixel_limit"),
        ("ftp", "ftp://example.com/a.jpg", "100", "unsupported_scheme"),
        ("p1", "images/p2.jpg", "200", "duplicate_id"),  # p1 again: the first one is kept
        ("../../evil", "images/p1.jpg", "100", "unsafe_id"),
        ("..", "images/p1.jpg", "100", "unsafe_id"),
        ("", "images/p1.jpg", "100", "empty_id"),
        ("nourl", "", "100", "empty_url"),
        ("badlabel", "images/p1.jpg", "seven", "bad_label"),
        ("unknown999", "images/nope2.jpg", "999", "missing_file"),
    ]
    lines = ["id,url,landmark_id"]
    expected = {}
    for line_number, (image_id, url, label, outcome) in enumerate(rows, start=2):
        lines.append(f"{image_id},{url},{label}")
        expected[line_number] = outcome
    lines.append("onlyid")  # missing columns
    expected[len(lines)] = "missing_column"
    lines.append("a,b,1,extra")
    expected[len(lines)] = "malformed_row"
    write_manifest(data / "train.csv", lines)

    distractors = data / "distractors"
    distractors.mkdir()
    (distractors / "street view.jpg").write_bytes(jpeg(21))
    (distractors / "d2.png").write_bytes(encode(photo_like(40, 30, 22), "PNG"))
    (distractors / "broken.png").write_bytes(b"<html>oops</html>")
    (distractors / "notes.txt").write_text("not listed: not an image suffix")
    distractor_expected = {"distractor_street_view": "ok", "distractor_d2": "ok",
                           "distractor_broken": "not_an_image"}
    return data / "train.csv", distractors, expected, distractor_expected


def test_mixed_manifest_every_row_accounted_for(tmp_path, mixed_dataset):
    manifest_path, distractor_dir, expected, distractor_expected = mixed_dataset
    out = tmp_path / "out"
    before = all_files(tmp_path, out)
    stats = pipeline.run([
        "--manifest", str(manifest_path), "--output_dir", str(out),
        "--distractor_dir", str(distractor_dir), "--max_side", str(MAX_SIDE),
        "--num_shards", "2", "--dev_fraction", "0.3", *FAST_FETCH, RUNNER,
        "--max_rejected_fraction", "0.6",  # 22 of 39 rows are bad on purpose
    ])

    # Nothing written outside the output folder; exactly the documented files inside it.
    assert all_files(tmp_path, out) == before
    assert sorted(os.listdir(out)) == [
        "_SUCCESS", "config.json", "dataset_info.json", "dev-00000-of-00001.tfrecord",
        "features.json", "label_map.csv", "rejected.csv", "stats.json",
        "train-00000-of-00002.tfrecord",
        "train-00001-of-00002.tfrecord",
    ]

    # Rows in = written + rejected, and each row has its expected outcome.
    rows_in = len(expected) + len(distractor_expected)
    expected_ok = sum(v == "ok" for v in expected.values()) + sum(
        v == "ok" for v in distractor_expected.values())
    assert stats["rows_in"] == rows_in
    assert stats["written"] == expected_ok
    assert stats["written"] + stats["rejected"] == rows_in and stats["balanced"]
    rejected = read_rejected(out / "rejected.csv")
    assert len(rejected) == stats["rejected"]
    by_line = {int(row["line"]): row["reason"] for row in rejected if row["line"]}
    assert by_line == {line: reason for line, reason in expected.items() if reason != "ok"}
    by_distractor = {row["id"]: row["reason"] for row in rejected if not row["line"]}
    assert by_distractor == {i: r for i, r in distractor_expected.items() if r != "ok"}
    assert all(row["detail"] for row in rejected)
    reasons = [row["reason"] for row in rejected]
    assert stats["rejected_per_reason"] == {r: reasons.count(r) for r in set(reasons)}

    # Beam counters per outcome agree with the counts.
    counters = stats["counters"]
    assert counters["rows_in"] == rows_in
    assert {name[len("rejected_"):]: value for name, value in counters.items()
            if name.startswith("rejected_")} == stats["rejected_per_reason"]
    assert counters["written_train"] + counters["written_dev"] == stats["written"]

    # Label map: distinct landmark ids of valid, de-duplicated manifest rows.
    header = parse_header(manifest_path.read_text().splitlines()[0])
    parsed = [parse_line(text, number, header) for number, text in
              enumerate(manifest_path.read_text().splitlines(), start=1) if number > 1]
    valid = {}
    for row in parsed:
        if isinstance(row, ManifestRow) and row.image_id not in valid:
            valid[row.image_id] = row
    label_map = read_label_map(str(out / "label_map.csv"))
    assert label_map == LabelMap.from_landmark_ids(r.landmark_id for r in valid.values())
    assert label_map.landmark_ids == (7, 100, 200, 300, 999)  # 999: valid row, file missing

    # Records: the expected ids, labels, sizes; the first p1 (landmark 100) was kept.
    records = {}
    for split_name in ("train", "dev"):
        for record in read_records(str(out / f"{split_name}-*.tfrecord")):
            assert record.image_id not in records
            records[record.image_id] = (split_name, record)
    ok_ids = {valid_id for valid_id, row in valid.items() if expected[row.line] == "ok"}
    assert set(records) == ok_ids | {"distractor_street_view", "distractor_d2"}
    for image_id, (_, record) in records.items():
        assert max(record.height, record.width) <= MAX_SIDE
        if image_id.startswith("distractor_"):
            assert (record.label, record.landmark_id) == (-1, -1)
        else:
            assert record.landmark_id == valid[image_id].landmark_id
            assert record.label == label_map.class_index(record.landmark_id)
    assert records["p1"][1].landmark_id == 100
    assert (records["p4"][1].width, records["p4"][1].height) == (64, 43)  # 300x200, shrunk
    assert (records["grey"][1].width, records["grey"][1].height) == (40, 30)  # never enlarged
    assert records["anim"][1].source_format == "GIF"
    rotated = np.asarray(Image.open(io.BytesIO(records["rotated"][1].jpeg_bytes)))
    assert rotated.shape == (43, 64, 3)
    assert rotated[2, 2, 0] > 200 and rotated[2, 2, 2] < 60  # red marker stays top-left
    anim = np.asarray(Image.open(io.BytesIO(records["anim"][1].jpeg_bytes)))
    assert anim[10, 10, 0] > 200 and anim[10, 10, 2] < 60  # first frame (red)

    # Dev split: per class, exactly the hash-chosen ids among the valid rows.
    classes = {}
    for row in valid.values():
        classes.setdefault(row.landmark_id, []).append(row.image_id)
    classes[-1] = ["distractor_street_view", "distractor_d2", "distractor_broken"]
    want_dev = set().union(*(split.dev_ids(ids, 0.3) for ids in classes.values()))
    got_dev = {image_id for image_id, (name, _) in records.items() if name == "dev"}
    assert got_dev == want_dev & set(records)
    assert got_dev  # the fixture is built so that some images land in dev
    assert stats["written_per_split"] == {"dev": len(got_dev), "train": len(records) - len(got_dev)}

    # stats.json, config.json, success marker.
    assert json.loads((out / "stats.json").read_text()) == stats
    assert stats["class_histogram"]["num_classes"] == 4  # 999 had no image
    assert stats["class_histogram"]["non_landmark_images"] == 2
    assert stats["bytes_written"] == sum((out / name).stat().st_size for name in os.listdir(out)
                                         if name.endswith(".tfrecord")) - 16 * len(records)
    assert stats["status"] == "ok" and stats["failure"] is None
    assert stats["rejected_fraction"] == round(stats["rejected"] / rows_in, 6)
    config = json.loads((out / "config.json").read_text())
    assert config["max_side"] == MAX_SIDE and config["dev_fraction"] == 0.3
    assert config["beam_args"] == [RUNNER]  # the Beam flags that were passed
    assert io_utils.has_success_marker(str(out))


def test_refuses_a_non_empty_output_folder_and_overwrite_replaces_it(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg(1))
    write_manifest(tmp_path / "m.csv", ["id,url,landmark_id", "a,images/a.jpg,5"])
    out = tmp_path / "out"
    out.mkdir()
    stale = out / "train-00000-of-00009.tfrecord"
    stale.write_bytes(b"stale")
    argv = ["--manifest", str(tmp_path / "m.csv"), "--output_dir", str(out), RUNNER]
    with pytest.raises(ValueError, match="--overwrite"):
        pipeline.run(argv)
    assert pipeline.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("landmarks-ingest: error:") and "\n" not in error
    assert stale.exists()

    stats = pipeline.run(argv + ["--overwrite", "--num_shards", "1"])
    assert not stale.exists()
    assert stats["written"] == 1 and stats["balanced"]
    assert [r.image_id for r in read_records(str(out / "train-*.tfrecord"))] == ["a"]


def test_output_folder_holding_an_input_is_refused(tmp_path):
    write_manifest(tmp_path / "m.csv", ["id,url,landmark_id", "a,images/a.jpg,5"])
    with pytest.raises(ValueError, match="inside --output_dir"):
        pipeline.run(["--manifest", str(tmp_path / "m.csv"), "--output_dir", str(tmp_path),
                      "--overwrite", RUNNER])
    assert (tmp_path / "m.csv").exists()


def test_bad_header_is_a_one_line_error(tmp_path, capsys):
    write_manifest(tmp_path / "m.csv", ["image,path,label", "a,b,1"])
    code = pipeline.main(["--manifest", str(tmp_path / "m.csv"), "--output_dir",
                          str(tmp_path / "out"), RUNNER])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert "header" in error and "id,url,landmark_id" in error and "\n" not in error
    assert not (tmp_path / "out").exists()


def test_unlabelled_manifest_and_reused_label_map(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for index in range(3):
        (images / f"{index}.jpg").write_bytes(jpeg(index))
    given = LabelMap.from_landmark_ids([5, 9])
    (tmp_path / "train_map.csv").write_text(given.to_csv_text())

    write_manifest(tmp_path / "test.csv", ["id,url"] + [f"t{i},images/{i}.jpg" for i in range(3)])
    test_stats = pipeline.run(["--manifest", str(tmp_path / "test.csv"), "--output_dir",
                               str(tmp_path / "test_out"), "--num_shards", "1", RUNNER])
    assert test_stats["written_per_split"] == {"test": 3}
    records = list(read_records(str(tmp_path / "test_out" / "test-*.tfrecord")))
    assert sorted(r.image_id for r in records) == ["t0", "t1", "t2"]
    assert {(r.label, r.landmark_id) for r in records} == {(-1, -1)}

    write_manifest(tmp_path / "dev.csv", ["id,url,landmark_id", "d0,images/0.jpg,9",
                                          "d1,images/1.jpg,6", "d2,images/2.jpg,5"])
    dev_stats = pipeline.run(["--manifest", str(tmp_path / "dev.csv"), "--output_dir",
                              str(tmp_path / "dev_out"), "--label_map",
                              str(tmp_path / "train_map.csv"), "--split_name", "dev",
                              "--num_shards", "1", RUNNER])
    assert dev_stats["rejected_per_reason"] == {"unknown_landmark": 1}
    assert dev_stats["balanced"]
    labels = {r.image_id: r.label for r in read_records(str(tmp_path / "dev_out" / "dev-*"))}
    assert labels == {"d0": 1, "d2": 0}  # the given map: 5 -> 0, 9 -> 1
    assert read_label_map(str(tmp_path / "dev_out" / "label_map.csv")) == given


def test_gcs_input_and_output_on_the_emulator(gcs_emulator, tmp_path):
    for index in range(3):
        gcs_emulator.upload(f"set/images/{index}.jpg", jpeg(index))
    gcs_emulator.upload("set/images/bad.jpg", b"<html>no</html>")
    gcs_emulator.upload("set/distractors/x.jpg", jpeg(7))
    manifest_text = "\n".join([
        "id,url,landmark_id",
        "g0,images/0.jpg,1",  # relative to the manifest's gs:// folder
        f"g1,{gcs_emulator.path('set/images/1.jpg')},1",
        "g2,images/2.jpg,2",
        "gbad,images/bad.jpg,2",
        "gmissing,images/missing.jpg,2",
    ]) + "\n"
    manifest_path = gcs_emulator.upload("set/train.csv", manifest_text)
    out = gcs_emulator.path("runs/ingest1")

    stats = pipeline.run(["--manifest", manifest_path, "--output_dir", out, "--distractor_dir",
                          gcs_emulator.path("set/distractors"), "--num_shards", "2",
                          "--max_side", str(MAX_SIDE), RUNNER])
    assert (stats["rows_in"], stats["written"], stats["rejected"]) == (6, 4, 2)
    assert stats["rejected_per_reason"] == {"missing_file": 1, "not_an_image": 1}
    names = gcs_emulator.list_names("runs/ingest1/")
    # No TFDS metadata here: TFDS' tf.io.gfile cannot reach the emulator (skipped, logged).
    assert [name.rsplit("/", 1)[1] for name in names] == [
        "_SUCCESS", "config.json", "label_map.csv", "rejected.csv", "stats.json",
        "train-00000-of-00002.tfrecord", "train-00001-of-00002.tfrecord",
    ]
    assert io_utils.has_success_marker(out)

    # Records read back through Beam's FileSystems (copied locally for the TFRecord reader).
    local = tmp_path / "copy"
    local.mkdir()
    for path in io_utils.match(io_utils.join(out, "train-*.tfrecord")):
        (local / path.rsplit("/", 1)[1]).write_bytes(io_utils.read_bytes(path))
    records = {r.image_id: r for r in read_records(str(local / "*.tfrecord"))}
    assert set(records) == {"g0", "g1", "g2", "distractor_x"}
    assert {i: r.label for i, r in records.items()} == {"g0": 0, "g1": 0, "g2": 1,
                                                       "distractor_x": -1}
    label_map = LabelMap.from_csv_text(io_utils.read_text(io_utils.join(out, "label_map.csv")))
    assert label_map.landmark_ids == (1, 2)


@pytest.mark.slow
def test_cli_in_worker_processes(tmp_path):
    """``python -m`` + separate worker processes: the steps must not live in ``__main__``."""
    import subprocess
    import sys

    images = tmp_path / "images"
    images.mkdir()
    (images / "a.jpg").write_bytes(jpeg(1))
    write_manifest(tmp_path / "m.csv", ["id,url,landmark_id", "a,images/a.jpg,5",
                                        "b,images/missing.jpg,5"])
    completed = subprocess.run(
        [sys.executable, "-m", "beam_pipelines.ingest.pipeline", "--manifest",
         str(tmp_path / "m.csv"), "--output_dir", str(tmp_path / "out"), "--num_shards", "1",
         "--runner=DirectRunner", "--direct_running_mode=multi_processing",
         "--direct_num_workers=2"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "rows in 2: written 1 (train 1), rejected 1 (missing_file 1)" in completed.stdout
    assert io_utils.has_success_marker(str(tmp_path / "out"))
    assert [r.image_id for r in read_records(str(tmp_path / "out" / "train-*"))] == ["a"]
