"""Every failure told truly (issue 18), through the commands' ``main(argv)`` or a subprocess.

- A missing folder or bucket is exit 2 with the path and the storage service's own message,
  never "no files" or "0 distractor files".
- A storage service, bucket host or download that cannot be reached is one line naming it and
  the cause, exit code 5 (``EXIT_UNREACHABLE``), found before any pipeline or strategy is built.
  Offline: the storage emulator of ``tests/remote_servers.py``, and a closed 127.0.0.1 port as
  the unreachable endpoint (or proxy).
- Every failed ingest ends the same way: one line, its exit code, no shard under its usual name.
- A split with no record gets no shards; an empty or corrupt ``--dev_data`` is an error that
  names ``--dev_data`` and its file.
- ``--backbone_weights imagenet`` without internet is exit 5, and the model dir it leaves is not
  locked: the retry with other weights trains there.

Most cases stop before any heavy work; two ingest runs (3 images) and one ``landmarks-train``
subprocess (building Xception at 71 px) are the expensive ones.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest

from beam_pipelines import cli
from beam_pipelines.ingest import pipeline as ingest
from beam_pipelines.ingest import stats as stats_lib
from beam_pipelines.predict import pipeline as predict
from beam_pipelines.query import main as query
from remote_servers import free_port
from test_ingest_pipeline import jpeg, write_manifest
from test_train import LANDMARK_IDS, write_dataset
from tfrecords_schema import label_map as label_map_lib
from trainer import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = "--runner=FnApiRunner"
TINY_TRAIN = ("--preset", "quick", "--image_size", "71", "--seed", "3", "--verbose", "0",
              "--calibrate_batchnorm_images", "8", "--check_labels", "false")


def _error_line(capsys, prog: str) -> str:
    """The one ``<prog>: ...`` line on stderr (every failure ends in exactly one)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1, lines
    return lines[0]


def _manifest(tmp_path, rows: int = 3):
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    lines = ["id,url,landmark_id"]
    for index in range(rows):
        (images / f"{index}.jpg").write_bytes(jpeg(index))
        lines.append(f"i{index},images/{index}.jpg,{10 + index}")
    write_manifest(tmp_path / "m.csv", lines)
    return str(tmp_path / "m.csv")


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("failure_records"))
    train = write_dataset(folder, "train", per_class=2, non_landmarks=2, seed=0)
    label_map = os.path.join(folder, "label_map.csv")
    label_map_lib.write_label_map(label_map_lib.LabelMap(LANDMARK_IDS), label_map)
    return {"folder": folder, "train": train, "label_map": label_map}


# ---------------------------------------------------------------------------------------------
# Missing folders and buckets: exit 2 with the path and the storage service's message.


def test_a_missing_or_empty_distractor_folder_is_exit_2_naming_it(tmp_path, capsys):
    manifest = _manifest(tmp_path, rows=1)
    argv = ["--manifest", manifest, "--output_dir", str(tmp_path / "out"), RUNNER]
    assert ingest.main(argv + ["--distractor_dir", "/no/such/folder"]) == 2
    line = _error_line(capsys, "landmarks-ingest")
    assert line == ("landmarks-ingest: error: --distractor_dir /no/such/folder: "
                    "No such file or directory")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    assert ingest.main(argv + ["--distractor_dir", str(tmp_path / "empty")]) == 2
    assert "holds no image file" in _error_line(capsys, "landmarks-ingest")
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_a_bucket_that_cannot_be_listed_is_not_reported_as_no_files(gcs_emulator, tmp_path,
                                                                    capsys):
    """Beam raises BeamIOError only when a listing fails; a pattern matching nothing is []."""
    missing = "gs://no-such-bucket-18/shards/train-*.tfrecord"
    assert ingest.main(["--input_tfrecords", missing, "--output_dir", str(tmp_path / "out"),
                        RUNNER]) == 2
    line = _error_line(capsys, "landmarks-ingest")
    assert missing in line and "gs://no-such-bucket-18" in line and "NotFound" in line
    assert "no files match" not in line and "quote" not in line
    # The same bucket, reached: a glob that matches nothing is still "no files match".
    empty = gcs_emulator.path("shards", "train-*.tfrecord")
    assert ingest.main(["--input_tfrecords", empty, "--output_dir", str(tmp_path / "out"),
                        RUNNER]) == 2
    line = _error_line(capsys, "landmarks-ingest")
    assert "no files match --input_tfrecords" in line and "quote" not in line

    assert predict.main(["--model", str(tmp_path / "model.keras"), "--test_data", missing,
                         "--reference_data", empty, "--output_dir", str(tmp_path / "p"),
                         RUNNER]) == 2
    line = _error_line(capsys, "landmarks-predict")
    assert "--test_data" in line and "NotFound" in line and "no test files" not in line


# ---------------------------------------------------------------------------------------------
# Unreachable storage: exit 5 in seconds, one line naming the resource and the cause.


@pytest.fixture
def unreachable_storage(monkeypatch):
    """``gs://`` paths lead to a 127.0.0.1 port where nothing listens."""
    port = free_port()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
    return f"127.0.0.1:{port}"


def test_unreachable_buckets_are_exit_5_for_every_job(unreachable_storage, tmp_path, capsys,
                                                      records):
    glob = "gs://bucket-18/shards/train-*.tfrecord"
    assert ingest.main(["--input_tfrecords", glob, "--output_dir", str(tmp_path / "i"),
                        RUNNER]) == cli.EXIT_UNREACHABLE
    line = _error_line(capsys, "landmarks-ingest")
    assert line.startswith(f"landmarks-ingest: error: --input_tfrecords {glob}: cannot reach "
                           f"{unreachable_storage} (ConnectionRefusedError")
    assert "quote" not in line

    # A Dataflow ingest whose temporary bucket cannot be reached (inputs and output local).
    manifest = _manifest(tmp_path, rows=1)
    assert ingest.main(["--manifest", manifest, "--output_dir", str(tmp_path / "i"), RUNNER,
                        "--temp_location", "gs://bucket-18/tmp"]) == cli.EXIT_UNREACHABLE
    assert "--temp_location gs://bucket-18/tmp: cannot reach" in _error_line(
        capsys, "landmarks-ingest")

    assert predict.main(["--model", str(tmp_path / "model.keras"), "--test_data", glob,
                         "--reference_data", glob, "--output_dir", str(tmp_path / "p"),
                         RUNNER]) == cli.EXIT_UNREACHABLE
    assert f"--test_data {glob}: cannot reach" in _error_line(capsys, "landmarks-predict")

    assert query.main(["--model_dir", str(tmp_path), "--references", glob, "--output_dir",
                       str(tmp_path / "q"), "photo.jpg"]) == cli.EXIT_UNREACHABLE
    assert f"--references {glob}: cannot reach" in _error_line(capsys, "landmarks-query")
    assert not any((tmp_path / name).exists() for name in ("i", "p", "q"))


def test_a_multi_worker_run_with_an_unreachable_gs_model_dir_is_exit_5(
        unreachable_storage, records, tmp_path, capsys, monkeypatch):
    # Two workers in TF_CONFIG: the check comes before the strategy (which would wait for the
    # other worker) and before TensorFlow's GCS client retries.
    monkeypatch.setenv("TF_CONFIG", json.dumps({
        "cluster": {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]},
        "task": {"type": "worker", "index": 0}}))
    assert train_lib.main(["--train_data", records["train"], "--label_map",
                           records["label_map"], "--model_dir", "gs://bucket-18/models/m1",
                           *TINY_TRAIN]) == cli.EXIT_UNREACHABLE
    line = _error_line(capsys, "landmarks-train")
    assert line.startswith("landmarks-train: error: --model_dir gs://bucket-18/models/m1: "
                           f"cannot reach {unreachable_storage} (ConnectionRefusedError")


# ---------------------------------------------------------------------------------------------
# Ingest: every failed run ends the same way; empty splits get no shards.


def test_counts_that_do_not_add_up_end_like_every_failed_ingest(tmp_path, capsys,
                                                                monkeypatch):
    real_assess = stats_lib.assess

    def one_row_lost(summary, *args, **kwargs):  # a bookkeeping bug: a row in, nowhere out
        return real_assess(dict(summary, rows_in=summary["rows_in"] + 1, balanced=False),
                           *args, **kwargs)

    monkeypatch.setattr(stats_lib, "assess", one_row_lost)
    out = tmp_path / "out"
    argv = ["--manifest", _manifest(tmp_path), "--output_dir", str(out), "--num_shards", "2",
            RUNNER]
    assert ingest.main(argv) == cli.EXIT_INTERNAL_ERROR
    line = _error_line(capsys, "landmarks-ingest")
    assert line.startswith("landmarks-ingest: error: the counts do not add up: rows in (4) != "
                           "written (3) + rejected (0)")
    assert "2 shard(s) renamed *.incomplete" in line and cli.BUG_HINT_NO_TRACEBACK in line
    names = sorted(path.name for path in out.iterdir())
    assert not [name for name in names if name.endswith(".tfrecord")], names
    assert [name for name in names if name.endswith(".tfrecord.incomplete")] == [
        "train-00000-of-00002.tfrecord.incomplete", "train-00001-of-00002.tfrecord.incomplete"]
    assert "_SUCCESS" not in names
    assert json.loads((out / "stats.json").read_text())["failure"]["kind"] == "unbalanced"


def test_a_split_that_received_no_record_gets_no_shards(tmp_path, caplog):
    # 3 classes of one image each: round(0.02 * 1) = 0 images of each go to dev.
    out = tmp_path / "out"
    with caplog.at_level(logging.WARNING):
        assert ingest.main(["--manifest", _manifest(tmp_path), "--output_dir", str(out),
                            "--dev_fraction", "0.02", "--num_shards", "60", RUNNER]) == 0
    names = sorted(path.name for path in out.iterdir())
    assert not [name for name in names if name.startswith("dev-")], names
    assert len([name for name in names if name.startswith("train-")]) == 60
    assert "split dev received no record: no dev shards written" in caplog.text
    stats = json.loads((out / "stats.json").read_text())
    assert stats["shards_per_split"] == {"train": 60} and "_SUCCESS" in names


# ---------------------------------------------------------------------------------------------
# Training: --dev_data errors name --dev_data; ImageNet weights out of reach.


def test_a_corrupt_dev_shard_is_reported_against_dev_data(records, tmp_path, capsys):
    dev = write_dataset(str(tmp_path), "dev", per_class=2, non_landmarks=1, seed=4)
    damaged = tmp_path / "dev-00001-of-00002.tfrecord"
    damaged.write_bytes(damaged.read_bytes()[:-40])  # cut inside its last record
    assert train_lib.main(["--train_data", records["train"], "--label_map",
                           records["label_map"], "--dev_data", dev, "--model_dir",
                           str(tmp_path / "m"), "--preset", "quick"]) == 2
    line = _error_line(capsys, "landmarks-train")
    assert line.startswith(f"landmarks-train: error: --dev_data {dev}: corrupt or truncated "
                           f"TFRecord data: {damaged}, record #")
    assert records["train"] not in line


def test_an_empty_dev_set_is_an_error_where_one_was_asked_for(records, tmp_path, capsys):
    (tmp_path / "dev-00000-of-00001.tfrecord").write_bytes(b"")  # an empty split's shard
    dev = str(tmp_path / "dev-*.tfrecord")
    base = ["--train_data", records["train"], "--label_map", records["label_map"],
            "--model_dir", str(tmp_path / "m"), *TINY_TRAIN]
    assert train_lib.main(base + ["--dev_data", dev]) == 2
    assert _error_line(capsys, "landmarks-train") == (
        f"landmarks-train: error: --dev_data {dev}: its 1 file(s) hold no record; a dev set "
        "was asked for (an ingest whose dev split received no record writes no dev shards): "
        "pass other files or leave --dev_data out")
    assert train_lib.main(base + ["--dev_data", str(tmp_path / "none-*.tfrecord")]) == 2
    assert "--dev_data" in _error_line(capsys, "landmarks-train")
    assert not (tmp_path / "m").exists()


def test_imagenet_weights_out_of_reach_are_exit_5_and_leave_the_model_dir_free(
        records, tmp_path, capsys):
    model_dir = tmp_path / "model"
    base = ["--train_data", records["train"], "--label_map", records["label_map"],
            "--model_dir", str(model_dir), *TINY_TRAIN]
    # Every HTTPS request goes to a proxy port where nothing listens: the download fails the
    # way it does offline, on any machine; an empty KERAS_HOME holds no cached weights.
    env = dict(os.environ, PYTHONPATH=REPO, HTTPS_PROXY=f"http://127.0.0.1:{free_port()}",
               KERAS_HOME=str(tmp_path / "keras_home"), TF_CPP_MIN_LOG_LEVEL="2")
    env.pop("https_proxy", None)
    done = subprocess.run(
        [sys.executable, "-m", "trainer.train", *base, "--backbone_weights", "imagenet"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("landmarks-train")]
    assert done.returncode == cli.EXIT_UNREACHABLE, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(
        "landmarks-train: error: --backbone_weights imagenet: the ImageNet weights cannot be "
        "downloaded (URL fetch failure on https://storage.googleapis.com/"), lines
    assert "Traceback" not in done.stderr and "this is a bug" not in done.stderr
    assert json.loads((model_dir / "config.json").read_text())["model"][
        "backbone_weights"] == "imagenet"

    # The failed run saved no checkpoint: the same folder takes a run with other weights. It
    # gets past the model-dir check and stops at the next one (an empty dev set, below), not
    # at "holds a run with another config".
    (tmp_path / "dev-00000-of-00001.tfrecord").write_bytes(b"")
    assert train_lib.main(base + ["--backbone_weights", "none", "--dev_data",
                                  str(tmp_path / "dev-*.tfrecord")]) == 2
    line = _error_line(capsys, "landmarks-train")
    assert "--dev_data" in line and "another config" not in line
