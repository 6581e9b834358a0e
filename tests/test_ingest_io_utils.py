"""``beam_pipelines.io_utils`` on a local folder and on ``gs://`` (storage emulator)."""

from __future__ import annotations

import json

import pytest

from beam_pipelines import io_utils


@pytest.fixture(params=["local", "gcs"])
def root(request, tmp_path):
    """A base folder: a local temp dir, or a prefix in an emulator bucket."""
    if request.param == "local":
        return str(tmp_path / "root")
    emulator = request.getfixturevalue("gcs_emulator")
    return emulator.path("root")


def test_write_read_match_and_exists(root):
    first = io_utils.join(root, "b", "x.txt")
    second = io_utils.join(root, "a.bin")
    io_utils.write_text(first, "héllo\n")
    io_utils.write_bytes(second, b"\x00\xff")
    io_utils.write_json(io_utils.join(root, "c.json"), {"z": 1, "a": [1, 2]})
    assert io_utils.read_text(first) == "héllo\n"
    assert io_utils.read_bytes(second) == b"\x00\xff"
    text = io_utils.read_text(io_utils.join(root, "c.json"))
    assert text == json.dumps({"a": [1, 2], "z": 1}, indent=2, sort_keys=True) + "\n"
    assert io_utils.exists(first) and not io_utils.exists(io_utils.join(root, "nope"))
    # Sorted, and no temporary files left behind by the write-then-rename.
    assert io_utils.match(io_utils.join(root, "**")) == sorted(
        [second, first, io_utils.join(root, "c.json")])
    assert io_utils.match(io_utils.join(root, "*.json")) == [io_utils.join(root, "c.json")]
    assert io_utils.match(io_utils.join(root, "nothing*")) == []
    io_utils.write_text(first, "replaced")
    assert io_utils.read_text(first) == "replaced"


def test_prepare_output_dir_refuses_then_overwrites(root):
    out = io_utils.join(root, "run")
    io_utils.prepare_output_dir(out, overwrite=False)  # new folder: fine
    io_utils.prepare_output_dir(out, overwrite=False)  # empty folder: fine
    io_utils.write_text(io_utils.join(out, "train-00000-of-00009.tfrecord"), "stale")
    io_utils.write_text(io_utils.join(out, "sub", "deep.txt"), "stale")
    io_utils.write_text(io_utils.join(root, "sibling.txt"), "keep me")
    with pytest.raises(ValueError, match="--overwrite"):
        io_utils.prepare_output_dir(out, overwrite=False)
    io_utils.prepare_output_dir(out, overwrite=True)
    assert io_utils.match(io_utils.join(out, "**")) == []
    assert io_utils.read_text(io_utils.join(root, "sibling.txt")) == "keep me"


def test_success_marker(root):
    out = io_utils.join(root, "run")
    io_utils.prepare_output_dir(out, overwrite=False)
    assert not io_utils.has_success_marker(out)
    io_utils.write_success_marker(out)
    assert io_utils.has_success_marker(out)
    assert io_utils.match(io_utils.join(out, "*")) == [io_utils.join(out, "_SUCCESS")]


def test_output_path_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        io_utils.prepare_output_dir(str(tmp_path / "file"), overwrite=True)
