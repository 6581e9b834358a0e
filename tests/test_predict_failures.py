"""landmarks-predict never fails silently (issue 8, point 2).

- An extractor spec that does not work is refused before any pipeline runs: one line, exit 2.
- Extraction failures on some images are counted in ``stats.json``; above
  ``--max_failed_fraction`` the run exits 4 without ``_SUCCESS``, and a reference cache with
  failures is never marked complete, so the next run recomputes it.
- Other silent paths (no reference with a label, no test record, ...) exit 4 the same way.

The failing extractor is the DELF stand-in of ``tests/delf_standin.py`` saved with
``fail_when_blue_below=0.28``: it raises for the coffee photograph (class 1's references and
``test_b``), never for the astronaut probe image. The data and model are
``test_predict.build_data``'s (built once for this module; no training).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from beam_pipelines import io_utils
from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import completeness, input_checks, pipeline, reference_cache, transforms
from delf_standin import save_delf_standin
from test_predict import REFERENCES_PER_CLASS, _args, build_data

BLUE_THRESHOLD = 0.28  # coffee ~0.19, chelsea ~0.32, astronaut ~0.38 (the probe), grey 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return build_data(tmp_path_factory.mktemp("predict_failures") / "data", crops=2)


@pytest.fixture(scope="module")
def flaky_delf(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("flaky_delf") / "module"
    return "delf:" + save_delf_standin(folder, fail_when_blue_below=BLUE_THRESHOLD)


def _main_error(capsys, argv, code: int) -> str:
    assert pipeline.main(argv) == code
    error = capsys.readouterr().err.strip()
    assert error.startswith("landmarks-predict: error:") and "\n" not in error, error
    return error


# ---- the extractor is tried before any Beam work ----------------------------------------------


def test_a_spec_that_does_not_load_exits_2_before_any_pipeline(data, tmp_path, capsys):
    output_dir = tmp_path / "runs" / "out"
    argv = _args(data, output_dir, "--local_features", "delf:/no/such/module",
                 "--runner=FnApiRunner")
    error = _main_error(capsys, argv, 2)
    assert "--local_features delf:/no/such/module does not load: OSError:" in error
    # Refused before the output folder or the reference cache were touched.
    assert not output_dir.exists() and not (tmp_path / "runs" / "reference_features").exists()


def test_a_module_url_out_of_reach_exits_5_before_any_pipeline(data, tmp_path, capsys):
    from remote_servers import free_port

    url = f"https://127.0.0.1:{free_port()}/google/delf/1"
    output_dir = tmp_path / "out"
    argv = _args(data, output_dir, "--local_features", f"delf:{url}", "--runner=FnApiRunner")
    error = _main_error(capsys, argv, 5)
    assert error.startswith(f"landmarks-predict: error: --local_features {url}: cannot reach "
                            "127.0.0.1:")
    assert "ConnectionRefusedError" in error and not output_dir.exists()


def test_the_probe_names_the_spec_and_the_cause(tmp_path):
    always = "delf:" + save_delf_standin(tmp_path / "always", fail_when_blue_below=2.0)
    with pytest.raises(pipeline.PredictError, match=(
            r"fails on a test photograph: InvalidArgumentError: .*stand-in failure")):
        input_checks.probe_extractor(always)

    class OtherSignature(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.float32)])
        def serve(self, image):
            return {"out": tf.reduce_mean(image)}

    module = OtherSignature()
    tf.saved_model.save(module, str(tmp_path / "other"),
                        signatures={"serving_default": module.serve})
    with pytest.raises(pipeline.PredictError, match=r"does not load: KeyError: 'default'"):
        input_checks.probe_extractor(f"delf:{tmp_path / 'other'}")
    with pytest.raises(pipeline.PredictError, match="bad --local_features surf"):
        input_checks.probe_extractor("surf")
    extractor, num_features = input_checks.probe_extractor("default")
    assert extractor.spec == "orb" and num_features > 100


def test_unusable_extractor_output_is_refused():
    good = (np.zeros([3, 2]), np.ones([3, 40]))
    locations, descriptors = transforms.check_features(good)
    assert locations.dtype == descriptors.dtype == np.float32
    assert transforms.check_features((np.zeros([0, 2]), np.zeros([0, 1])))[0].shape == (0, 2)
    for bad, message in [
        (None, "not \\(locations, descriptors\\)"),
        ((np.zeros([3, 3]), np.ones([3, 40])), "locations must be"),
        ((np.zeros([3, 2]), np.ones([4, 40])), "descriptors must be"),
        ((np.zeros([3, 2]), np.ones([3, 0])), "0 dimensions"),
        ((np.zeros([1, 2]), np.full([1, 4], np.nan)), "NaN"),
    ]:
        with pytest.raises(ValueError, match=message):
            transforms.check_features(bad)


def test_error_summary_is_one_line_with_the_cause():
    graph_error = tf.errors.InvalidArgumentError(
        None, None,
        "Graph execution error:\n\nDetected at node Assert defined at (most recent call last):\n"
        "<stack traces unavailable>\nassertion failed: [too blue]\n\t [[{{node Assert}}]] "
        "[Op:__inference_signature_wrapper_default_159]")
    assert transforms.error_summary(graph_error) == (
        "InvalidArgumentError: assertion failed: [too blue]")
    assert transforms.error_summary(OSError("x does not exist.\nmore")) == (
        "OSError: x does not exist.")
    assert transforms.error_summary(KeyError("default")) == "KeyError: 'default'"
    assert len(transforms.error_summary(ValueError("y" * 1000))) == transforms.MAX_CAUSE_CHARS

    combine = transforms.ErrorSummaryFn()
    accumulators = []
    for causes in (["b", "a", "b"], ["a", "c", "a"]):
        accumulator = combine.create_accumulator()
        for cause in causes:
            accumulator = combine.add_input(accumulator, cause)
        accumulators.append(accumulator)
    summary = combine.extract_output(combine.merge_accumulators(accumulators))
    assert summary == {"count": 6, "causes": [["a", 3], ["b", 2], ["c", 1]]}
    # Messages that differ only in numbers (a pixel value, a shape) are one cause.
    accumulator = combine.create_accumulator()
    for cause in ("E: mean 0.19 < 0.28", "E: size 3x4", "E: mean 0.18 < 0.28"):
        accumulator = combine.add_input(accumulator, cause)
    assert combine.extract_output(accumulator)["causes"] == [
        ["E: mean 0.18 < 0.28", 2], ["E: size 3x4", 1]]


# ---- what counts as a run that did not do its work ---------------------------------------------


def _stats(**changes) -> dict:
    stats = {
        "test_images": 10, "predicted": 9, "unparseable_test_records": 0,
        "undecodable_test_images": 1,
        "features_per_image": {"images": 9, "zero": 1},
        "test_extraction_failures": 0, "reference_extraction_failures": 0,
        "extraction_attempts": {"test": 9, "reference": 6}, "failed_fraction": 0.0,
        "extraction_errors": {"test": {"count": 0, "causes": []},
                              "reference": {"count": 0, "causes": []}},
    }
    stats.update(changes)
    return stats


def test_completeness_problems():
    config = config_lib.PredictConfig(model="m/model.keras", test_data="t-*", reference_data="r",
                                      output_dir="runs/x", max_failed_fraction=0.1)
    assert completeness.completeness_problem(_stats(), config) is None
    assert "no test images" in completeness.completeness_problem(
        _stats(test_images=0, predicted=0, unparseable_test_records=3), config)
    assert "none of the 10 test images is readable" in completeness.completeness_problem(
        _stats(predicted=0), config)
    # At the threshold is fine, above it is not; the message gives counts and the main cause.
    errors = {"test": {"count": 1, "causes": [["E: x", 1]]},
              "reference": {"count": 2, "causes": [["E: y", 2]]}}
    at_limit = _stats(test_extraction_failures=1, failed_fraction=0.1)
    assert completeness.completeness_problem(at_limit, config) is None
    above = _stats(test_extraction_failures=1, reference_extraction_failures=2,
                   failed_fraction=0.2, extraction_errors=errors)
    assert completeness.completeness_problem(above, config) == (
        "local-feature extraction (default) failed on 3 of 15 images (20.0% > "
        "--max_failed_fraction 0.1): test 1 of 9, reference 2 of 6; most frequent cause "
        "(2 images): E: y")
    featureless = _stats(features_per_image={"images": 9, "zero": 9})
    assert "no readable test image gave local features" in completeness.completeness_problem(
        featureless, config)
    with pytest.raises(ValueError, match="--max_failed_fraction"):
        config_lib.PredictConfig(model="m", test_data="t", reference_data="r", output_dir="o",
                                 max_failed_fraction=1.5)


def test_reference_cache_is_keyed_by_extractor_and_never_completed_with_failures(tmp_path):
    shard = tmp_path / "train-00000-of-00001.tfrecord"
    shard.write_bytes(b"x" * 10)
    pattern = str(tmp_path / "train-*.tfrecord")
    directory = tmp_path / "reference_features"
    directory.mkdir()
    (directory / "features-00000-of-00001.tfrecord").write_bytes(b"")
    orb = reference_cache.cache_metadata("orb", 2, 3, pattern)
    assert reference_cache.finish(str(directory), orb, 4, extraction_failures=1,
                                  with_features=3) is False
    assert not io_utils.has_success_marker(str(directory))
    assert json.loads((directory / "metadata.json").read_text())["complete"] is False
    assert reference_cache.reuse_decision(str(directory), orb)[0] is False
    assert reference_cache.finish(str(directory), orb, 4, with_features=0) is False  # none usable
    assert reference_cache.finish(str(directory), orb, 4, with_features=4) is True
    assert reference_cache.reuse_decision(str(directory), orb)[0] is True
    reuse, reason = reference_cache.reuse_decision(
        str(directory), reference_cache.cache_metadata("sift", 2, 3, pattern))
    assert not reuse and "extractor" in reason
    other_params = dict(orb, extractor_params=dict(orb["extractor_params"], max_features=10))
    reuse, reason = reference_cache.reuse_decision(str(directory), other_params)
    assert not reuse and "extractor_params" in reason


# ---- whole runs --------------------------------------------------------------------------------


@pytest.mark.slow
def test_extraction_failures_fail_the_run_and_the_cache_is_recomputed(data, flaky_delf, capsys):
    runs = data.root / "runs"
    first = runs / "flaky_strict"
    error = _main_error(capsys, _args(data, first, "--local_features", flaky_delf, "--crops", "2",
                                      "--runner=FnApiRunner"), pipeline.EXIT_INCOMPLETE)
    # test_b (coffee) and class 1's two sampled references (coffee) fail; 4 + 4 were tried.
    assert (f"local-feature extraction ({flaky_delf}) failed on 3 of 8 images (37.5% > "
            "--max_failed_fraction 0.01): test 1 of 4, reference 2 of 4; most frequent cause "
            "(3 images): InvalidArgumentError: assertion failed: [delf stand-in failure") in error
    assert not (first / "_SUCCESS").exists()
    stats = json.loads((first / "stats.json").read_text())
    assert (stats["test_extraction_failures"], stats["reference_extraction_failures"]) == (1, 2)
    assert stats["extraction_attempts"] == {"test": 4, "reference": 2 * REFERENCES_PER_CLASS}
    assert stats["failed_fraction"] == pytest.approx(3 / 8)
    assert (stats["undecodable_test_images"], stats["undecodable_reference_images"]) == (1, 0)
    assert stats["extraction_errors"]["test"]["count"] == 1
    assert stats["extraction_errors"]["reference"]["count"] == 2
    assert "stand-in failure" in stats["extraction_errors"]["reference"]["causes"][0][0]
    assert stats["complete"] is False and stats["problem"] in error
    assert stats["without_features"] >= 1  # test_b kept its classifier score, as a row
    assert (first / "scores.csv").exists()

    cache = Path(json.loads((first / "config.json").read_text())["config"]["reference_features"])
    assert not (cache / "_SUCCESS").exists()
    metadata = json.loads((cache / "metadata.json").read_text())
    assert (metadata["complete"], metadata["extraction_failures"]) == (False, 2)
    assert metadata["extractor"] == flaky_delf
    assert json.loads((cache / reference_cache.ERRORS_FILENAME).read_text())["count"] == 2

    # A tolerant threshold lets the same extractor finish; the unfinished cache is recomputed.
    second = runs / "flaky_tolerant"
    summary = pipeline.run(_args(data, second, "--local_features", flaky_delf, "--crops", "2",
                                 "--max_failed_fraction", "0.5", "--runner=FnApiRunner"))
    references = summary["reference_features"]
    assert references["reused"] is False
    assert "no finished reference features" in references["reason"]
    assert (references["extraction_failures"], references["complete"]) == (2, False)
    assert (summary["test_extraction_failures"], summary["complete"]) == (1, True)
    assert (second / "_SUCCESS").exists()
    assert not (cache / "_SUCCESS").exists()  # still made with failures: still not reusable


@pytest.mark.slow
def test_no_labelled_reference_exits_4_before_prediction(data, capsys):
    output_dir = data.root / "refless" / "run"
    argv = _args(data, output_dir, "--crops", "1", "--runner=FnApiRunner")
    argv[argv.index("--reference_data") + 1] = data.test_glob  # test records: all label -1
    error = _main_error(capsys, argv, pipeline.EXIT_INCOMPLETE)
    assert "no reference images: no record of --reference_data" in error
    stats = json.loads((output_dir / "stats.json").read_text())
    assert stats["complete"] is False and stats["reference_features"]["num_images"] == 0
    assert not (output_dir / "_SUCCESS").exists() and not (output_dir / "scores.csv").exists()
    assert not (data.root / "refless" / "reference_features" / "_SUCCESS").exists()


# ---- landmarks-query: the job's rule, and its inputs' mistakes (issue 18) -----------------------


def _photo_files(data, folder: Path, ids) -> list[str]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id in ids:
        path = folder / f"{image_id}.png"
        Image.fromarray(data.test_images[image_id]).save(path)
        paths.append(str(path))
    return paths


def _query_args(data, tmp_path: Path, cache: Path, *extra) -> list[str]:
    return ["--model_dir", str(data.model_path.parent), "--references", data.reference_glob,
            "--reference_features", str(cache), "--references_per_class",
            str(REFERENCES_PER_CLASS), "--crops", "2", "--output_dir", str(tmp_path / "query"),
            "--runner=FnApiRunner", *extra]


def _query_error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines()
             if line.startswith("landmarks-query")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.slow
def test_query_applies_the_jobs_extraction_failure_rule(data, flaky_delf, tmp_path, capsys):
    """As the prediction job: the extractor failed on test_b (coffee) and on class 1's two
    sampled references (coffee), 3 of 6 images > 1%: exit 4, no _SUCCESS, the counters in
    answers.json; the photos are still answered (test_b by its classifier score)."""
    from beam_pipelines.query import main as query

    photos = _photo_files(data, tmp_path / "photos", ["test_a", "test_b"])
    argv = _query_args(data, tmp_path, tmp_path / "cache", "--local_features", flaky_delf,
                       *photos)
    assert query.main(argv) == 4
    assert _query_error(capsys).startswith(
        f"landmarks-query: error: local-feature extraction ({flaky_delf}) failed on 3 of 6 "
        "images (50.0% > --max_failed_fraction 0.01): photos 1 of 2, reference 2 of 4; most "
        "frequent cause (3 images): InvalidArgumentError: assertion failed: [delf stand-in "
        "failure")
    output = tmp_path / "query"
    assert not (output / "_SUCCESS").exists()
    answers = json.loads((output / "answers.json").read_text())
    extraction = answers["extraction"]
    assert (extraction["test_extraction_failures"],
            extraction["reference_extraction_failures"]) == (1, 2)
    assert extraction["extraction_attempts"] == {"test": 2, "reference": 4}
    assert extraction["failed_fraction"] == pytest.approx(0.5)
    assert [answer["id"] for answer in answers["answers"]] == ["test_a", "test_b"]
    assert query.extraction_problem(dict(extraction, max_failed_fraction=0.5), "x") is None


@pytest.mark.slow
def test_query_and_predict_tell_a_bad_reference_folder_or_shard_as_input(data, tmp_path,
                                                                         capsys):
    from beam_pipelines.query import main as query

    # --reference_features naming a folder that is not a reference cache: never emptied.
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    argv = _args(data, tmp_path / "out", "--reference_features", str(foreign), "--crops", "2",
                 "--runner=FnApiRunner")
    error = _main_error(capsys, argv, 2)
    assert f"--reference_features {foreign} holds files but no metadata.json" in error
    assert (foreign / "thesis.tex").read_text() == "precious"

    # A cache whose features shard was truncated after it was written.
    photos = _photo_files(data, tmp_path / "photos", ["test_a"])
    cache = tmp_path / "cache"
    assert query.main(_query_args(data, tmp_path, cache, *photos)) == 0
    capsys.readouterr()
    shard = sorted(cache.glob("features-*.tfrecord"), key=lambda path: path.stat().st_size)[-1]
    shard.write_bytes(shard.read_bytes()[:-7])
    assert query.main(_query_args(data, tmp_path, cache, "--overwrite", *photos)) == 2
    line = _query_error(capsys)
    assert line.startswith(f"landmarks-query: error: {shard}: truncated record at byte ")
    assert "re-run the job that wrote it" in line
    # The same shard replaced by random bytes: its length field says up to 2**64 bytes, which
    # is never read (the length's own checksum does not match).
    shard.write_bytes(random.Random(0).randbytes(4096))
    assert query.main(_query_args(data, tmp_path, cache, "--overwrite", *photos)) == 2
    line = _query_error(capsys)
    assert line.startswith(f"landmarks-query: error: {shard}: no valid record header at byte 0")

    # A truncated reference-data shard: the featurisation (the job's reader) names it.
    references = tmp_path / "references"
    references.mkdir()
    for path in sorted(Path(data.reference_glob).parent.glob("train-*.tfrecord")):
        (references / path.name).write_bytes(path.read_bytes())
    damaged = sorted(references.iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:-7])
    argv = _query_args(data, tmp_path, tmp_path / "cache2", "--overwrite", *photos)
    argv[argv.index("--references") + 1] = str(references / "train-*.tfrecord")
    assert query.main(argv) == 2
    assert _query_error(capsys).startswith(
        f"landmarks-query: error: --reference_data {references / 'train-*.tfrecord'}: "
        f"{damaged}: truncated record at byte ")
