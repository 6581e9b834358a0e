"""Errors told apart by their cause (issue 11, point 3), for every command.

Bad input (``InputError`` and its subclasses, ``FileNotFoundError``) is one line
``landmarks-<cmd>: error: ...`` and exit code 2. Any other exception is a bug: its traceback is
logged, one ``landmarks-<cmd>: internal error: <Type>: <msg> -- this is a bug, ...`` line follows,
exit code 1. A failure with its own meaning keeps its code (training diverged: 3).
"""

from __future__ import annotations

import logging

import pytest
import tensorflow as tf

from beam_pipelines import demo, evaluate, revisited, toy_data
from beam_pipelines.ingest import pipeline as ingest
from beam_pipelines.predict import pipeline as predict
from tfrecords_schema import InputError
from trainer import cli
from trainer import data as data_lib
from trainer import train as train_lib


def _stderr_lines(capsys) -> list[str]:
    return capsys.readouterr().err.strip().splitlines()


def _assert_input_error(capsys, name: str, fragment: str) -> None:
    lines = _stderr_lines(capsys)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{name}: error: ") and fragment in lines[0], lines[0]


def _assert_bug_reported(capsys, caplog, name: str, type_name: str, message: str) -> None:
    """Exit code checked by the caller; here: the traceback in the log, then the bug line."""
    records = [record for record in caplog.records if record.exc_info]
    assert records and records[-1].name == name, caplog.text
    assert "Traceback (most recent call last)" in caplog.text and message in caplog.text
    lines = [line for line in _stderr_lines(capsys) if line.startswith(f"{name}: ")]
    assert lines == [f"{name}: internal error: {type_name}: {message} -- {cli.BUG_HINT}"], lines


def _raise(error: BaseException):
    def fail(*args, **kwargs):
        raise error

    return fail


# ---------------------------------------------------------------------------------------------
# One input error and one bug per command.


def test_toy_data(tmp_path, capsys, caplog, monkeypatch):
    assert toy_data.main(["--output_dir", str(tmp_path / "toy"), "--num_classes", "99"]) == 2
    _assert_input_error(capsys, "landmarks-toy-data", "num_classes")

    monkeypatch.setattr(toy_data, "generate", _raise(RuntimeError("boom")))
    assert toy_data.main(["--output_dir", str(tmp_path / "toy")]) == 1
    _assert_bug_reported(capsys, caplog, "landmarks-toy-data", "RuntimeError", "boom")


def test_ingest(tmp_path, capsys, caplog, monkeypatch):
    argv = ["--manifest", str(tmp_path / "missing.csv"), "--output_dir", str(tmp_path / "out")]
    assert ingest.main(argv) == 2
    _assert_input_error(capsys, "landmarks-ingest", "manifest not found")

    # A plain ValueError is not the user's input any more: it is a bug.
    monkeypatch.setattr(ingest, "run", _raise(ValueError("boom")))
    assert ingest.main(argv) == 1
    _assert_bug_reported(capsys, caplog, "landmarks-ingest", "ValueError", "boom")


def test_train(tmp_path, capsys, caplog, monkeypatch):
    assert train_lib.main(["--train_data", "t", "--label_map", "l", "--model_dir",
                           str(tmp_path / "m"), "--dropout", "1.5"]) == 2
    _assert_input_error(capsys, "landmarks-train", "--dropout")

    argv = ["--train_data", "t", "--label_map", "l", "--model_dir", str(tmp_path / "m")]
    monkeypatch.setattr(train_lib, "train", _raise(ValueError("boom")))
    assert train_lib.main(argv) == 1
    _assert_bug_reported(capsys, caplog, "landmarks-train", "ValueError", "boom")


def test_predict(tmp_path, capsys, caplog, monkeypatch):
    argv = ["--model", str(tmp_path / "model.keras"), "--test_data", str(tmp_path / "t-*"),
            "--reference_data", str(tmp_path / "r-*"), "--output_dir", str(tmp_path / "out")]
    assert predict.main(argv) == 2
    _assert_input_error(capsys, "landmarks-predict", "no test files match")

    monkeypatch.setattr(predict, "run", _raise(KeyError("boom")))
    assert predict.main(argv) == 1
    _assert_bug_reported(capsys, caplog, "landmarks-predict", "KeyError", "'boom'")


def test_evaluate(tmp_path, capsys, caplog, monkeypatch):
    (tmp_path / "s.csv").write_text("id,landmarks\na,1 0.5\n")
    (tmp_path / "t.csv").write_text("id,landmarks,Usage\na,1,Public\n")
    argv = ["--submission", str(tmp_path / "s.csv"), "--solution", str(tmp_path / "t.csv"),
            "--output_dir", str(tmp_path / "eval")]
    assert evaluate.main(argv[:3] + [str(tmp_path / "missing.csv")] + argv[4:]) == 2
    _assert_input_error(capsys, "landmarks-evaluate", "does not exist")

    monkeypatch.setattr(evaluate, "evaluate", _raise(ValueError("boom")))
    assert evaluate.main(argv) == 1
    _assert_bug_reported(capsys, caplog, "landmarks-evaluate", "ValueError", "boom")


def test_demo(tmp_path, capsys, caplog, monkeypatch):
    assert demo.main(["--run_dir", str(tmp_path / "d"), "--image_size", "32"]) == 2
    _assert_input_error(capsys, "landmarks-demo", "--image_size")

    monkeypatch.setattr(demo, "run", _raise(RuntimeError("stage exploded")))
    assert demo.main(["--run_dir", str(tmp_path / "d")]) == 1
    _assert_bug_reported(capsys, caplog, "landmarks-demo", "RuntimeError", "stage exploded")


def test_revisited(tmp_path, capsys, caplog, monkeypatch):
    argv = ["--model_dir", str(tmp_path / "model"), "--data_root", str(tmp_path / "data"),
            "--dataset", "roxford5k", "--output_dir", str(tmp_path / "out")]
    assert revisited.main(argv) == 2
    _assert_input_error(capsys, "landmarks-revisited", "no ground truth")
    (tmp_path / "data" / "roxford5k").mkdir(parents=True)
    (tmp_path / "data" / "roxford5k" / "gnd_roxford5k.pkl").write_bytes(b"garbage")
    assert revisited.main(argv) == 2
    _assert_input_error(capsys, "landmarks-revisited", "not a readable pickle")

    monkeypatch.setattr(revisited, "run", _raise(IndexError("boom")))
    assert revisited.main(argv) == 1
    _assert_bug_reported(capsys, caplog, "landmarks-revisited", "IndexError", "boom")


# ---------------------------------------------------------------------------------------------
# Codes with their own meaning, and which TensorFlow errors count as the user's data.


def test_diverged_training_keeps_exit_code_3(tmp_path, capsys, monkeypatch):
    argv = ["--train_data", "t", "--label_map", "l", "--model_dir", str(tmp_path / "m")]
    monkeypatch.setattr(train_lib, "train", _raise(train_lib.TrainingDiverged("loss is nan")))
    assert train_lib.main(argv) == 3
    assert _stderr_lines(capsys) == ["landmarks-train: error: loss is nan"]

    monkeypatch.setattr(demo, "run", _raise(train_lib.TrainingDiverged("loss is nan")))
    assert demo.main(["--run_dir", str(tmp_path / "d")]) == 3
    assert _stderr_lines(capsys) == ["landmarks-demo: error: loss is nan"]


@pytest.mark.parametrize("error, code", [
    (tf.errors.DataLossError(None, None, "corrupted record at 12"), 2),
    (tf.errors.NotFoundError(None, None, "/data/t-1.tfrecord; No such file or directory"), 2),
    (tf.errors.InvalidArgumentError(
        None, None, "the label map does not match the records: a label is >= num_classes (3)"), 2),
    (tf.errors.InvalidArgumentError(None, None, "Incompatible shapes: [8,10] vs. [8,12]"), 1),
    (tf.errors.ResourceExhaustedError(None, None, "OOM when allocating tensor"), 1),
    (tf.errors.InternalError(None, None, "collective ops failed"), 1),
])
def test_only_tensorflow_errors_about_the_records_are_input_errors(
        tmp_path, capsys, monkeypatch, error, code):
    (tmp_path / "t-0.tfrecord").write_bytes(b"")  # explain_data_error looks for the bad record
    argv = ["--train_data", str(tmp_path / "t-*.tfrecord"), "--label_map", "l",
            "--model_dir", str(tmp_path / "m")]
    monkeypatch.setattr(train_lib, "train", _raise(error))
    assert train_lib.main(argv) == code
    lines = [line for line in _stderr_lines(capsys) if line.startswith("landmarks-train: ")]
    assert len(lines) == 1
    kind = "error" if code == 2 else "internal error"
    assert lines[0].startswith(f"landmarks-train: {kind}: "), lines[0]
    assert data_lib.is_data_error(error) == (code == 2)
    if isinstance(error, tf.errors.DataLossError):
        assert "corrupt or truncated TFRecord data" in lines[0]


def test_run_command_sorts_exceptions_by_cause(capsys, caplog):
    class Exhausted(cli.CommandFailure):
        exit_code = 4

    def body(error):
        return lambda: _raise(error)()

    assert cli.run_command("p", lambda: 0) == 0
    assert cli.run_command("p", body(InputError("bad flag\nsecond line"))) == 2
    assert _stderr_lines(capsys) == ["p: error: bad flag"]
    assert cli.run_command("p", body(FileNotFoundError("no such file: x"))) == 2
    assert _stderr_lines(capsys) == ["p: error: no such file: x"]
    assert cli.run_command("p", body(Exhausted("nothing left"))) == 4
    assert _stderr_lines(capsys) == ["p: error: nothing left"]
    with caplog.at_level(logging.ERROR):
        assert cli.run_command("p", body(ZeroDivisionError("division by zero"))) == 1
    assert "Traceback" in caplog.text
    with pytest.raises(KeyboardInterrupt):
        cli.run_command("p", body(KeyboardInterrupt()))
