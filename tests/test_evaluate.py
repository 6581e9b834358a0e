"""landmarks-evaluate on hand-made files: values checked by hand, outputs written, bad inputs."""

import json
import pathlib

import pytest
from PIL import Image

from beam_pipelines import evaluate, toy_data
from rescoring import submission

# The recipe's worked example, with Usage and one Ignored row added.
SOLUTION = ("id,landmarks,Usage\n"
            "a,0 12,Public\n"
            "b,100 200 300,Private\n"
            "c,1,Public\n"
            "d,,Private\n"
            "e,,Public\n"
            "f,5,Ignored\n")
SUBMISSION = ("id,landmarks\n"
              "b,0 0.01\n"
              "c,1 10\n"
              "d,150 15\n"
              "a,\n"
              "f,5 99\n")  # on an Ignored row: not scored
# The classifier alone: right on a (0.9) and c (0.2), wrong on b (0.5), a distractor hit on
# d (0.95) ranked first. Order d(x) a(v) b(x) c(v): GAP = (1/2 + 2/4) / 3 = 1/3.
SCORES = ("id,nn_label,nn_confidence,local_max,local_mean,local_best_half,final_score,label\n"
          "a,0,0.9,0,0,0,,\n"
          "b,7,0.5,1,1,1,0.01,0\n"
          "c,1,0.2,3,2,2,10,1\n"
          "d,150,0.95,9,9,9,15,150\n"
          "e,,,,,,,\n")


def _write(folder, name, text):
    path = folder / name
    path.write_text(text)
    return str(path)


@pytest.fixture
def files(tmp_path):
    return {
        "submission": _write(tmp_path, "submission.csv", SUBMISSION),
        "solution": _write(tmp_path, "solution.csv", SOLUTION),
        "scores": _write(tmp_path, "scores.csv", SCORES),
        "output_dir": str(tmp_path / "eval"),
    }


def _argv(files, with_scores=True):
    argv = ["--submission", files["submission"], "--solution", files["solution"],
            "--output_dir", files["output_dir"]]
    return argv + (["--scores", files["scores"]] if with_scores else [])


def test_report_values_checked_by_hand(files):
    report = evaluate.run(_argv(files))
    assert report["gap"] == pytest.approx(1 / 6)
    assert report["gap_landmarks_only"] == pytest.approx(1 / 3)
    assert report["top1_accuracy"] == pytest.approx(1 / 3)  # only c right among a, b, c
    assert report["gap_nn_only"] == pytest.approx(1 / 3)
    # Without d: a(v) b(x) c(v) -> (1 + 2/3) / 3.
    assert report["gap_nn_only_landmarks_only"] == pytest.approx(5 / 9)
    assert report["top1_accuracy_nn_only"] == pytest.approx(2 / 3)
    public, private = report["by_usage"]["Public"], report["by_usage"]["Private"]
    # Public: a (no prediction), c (right, only prediction), e -> M = 2, GAP = 1/2.
    assert public["gap"] == pytest.approx(0.5)
    assert (public["images"], public["landmark_images"], public["predictions"]) == (3, 2, 1)
    # Private: b wrong, d on a distractor -> 0; nn: d(x, .95) b(x, .5) -> 0.
    assert private["gap"] == 0.0 and private["gap_nn_only"] == 0.0
    # nn on Public: a(v, .9) c(v, .2) -> (1 + 1) / 2.
    assert public["gap_nn_only"] == pytest.approx(1.0)
    assert report["counts"] == {
        "images": 5, "landmark_images": 3, "non_landmark_images": 2, "ignored_images": 1,
        "predictions": 3, "predictions_on_landmark_images": 2,
        "predictions_on_non_landmark_images": 1, "correct_predictions": 1, "missing_rows": 1}
    assert report["submission_problems"] == ["1 test ids have no row: e"]


def test_files_written_and_pngs_valid(files):
    evaluate.run(_argv(files))
    out = files["output_dir"]
    written = json.loads(open(f"{out}/report.json").read())
    assert written["gap"] == pytest.approx(1 / 6)
    assert written["inputs"]["scores"] == files["scores"]
    for name in ("precision_at_rank.png", "score_histograms.png"):
        assert name in written["plots"]
        with open(f"{out}/{name}", "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
        with Image.open(f"{out}/{name}") as image:
            image.verify()
        with Image.open(f"{out}/{name}") as image:
            assert image.size[0] > 400 and image.size[1] > 200


def test_without_scores_has_no_nn_metrics(files):
    report = evaluate.run(_argv(files, with_scores=False))
    assert "gap_nn_only" not in report
    assert report["gap"] == pytest.approx(1 / 6)
    assert "gap_nn_only" not in evaluate.format_table(report)


def _knn_scores(recognizer: str) -> str:
    """SCORES with the columns of a retrieval recognizer (landmarks-predict --recognizer ...).

    The kNN alone: a right (2.5), c wrong (1.5), b right (1.0), d on a distractor (-0.5), e
    none. Order a(v) c(x) b(v) d(x): GAP = (1/1 + 2/3) / 3 = 5/9, with or without d.
    """
    knn = {"a": "0,2.5", "b": "200,1.0", "c": "3,1.5", "d": "150,-0.5", "e": ","}
    lines = SCORES.splitlines()
    rows = [lines[0] + ",recognizer,knn_label,knn_score,neighbour_ids"]
    for line in lines[1:]:
        if recognizer == "knn":  # no classifier: its columns are empty
            parts = line.split(",")
            line = ",".join([parts[0], "", ""] + parts[3:])
        rows.append(f"{line},{recognizer},{knn[line.split(',')[0]]},r1 r2")
    return "\n".join(rows) + "\n"


@pytest.mark.parametrize("recognizer", ["knn", "knn+classifier"])
def test_knn_columns_give_gap_knn_only(files, recognizer, capsys):
    pathlib.Path(files["scores"]).write_text(_knn_scores(recognizer))
    report = evaluate.run(_argv(files))
    assert report["gap"] == pytest.approx(1 / 6)  # the submission's, unchanged
    assert report["gap_knn_only"] == pytest.approx(5 / 9)
    assert report["gap_knn_only_landmarks_only"] == pytest.approx(5 / 9)
    assert report["top1_accuracy_knn_only"] == pytest.approx(2 / 3)
    # Public: a(v, 2.5) c(x, 1.5) -> M = 2 (a, c): 1/2.
    assert report["by_usage"]["Public"]["gap_knn_only"] == pytest.approx(0.5)
    if recognizer == "knn":
        assert "gap_nn_only" not in report  # the classifier did not run
    else:
        assert report["gap_nn_only"] == pytest.approx(1 / 3)
    assert evaluate.main(_argv(files)) == 0
    assert "gap_knn_only" in capsys.readouterr().out


def test_main_prints_table(files, capsys):
    assert evaluate.main(_argv(files)) == 0
    out = capsys.readouterr().out
    gap_line = next(line for line in out.splitlines() if line.startswith("gap "))
    assert gap_line.split() == ["gap", "0.1667", "0.5000", "0.0000"]


def test_gap_is_null_without_landmarks(tmp_path):
    files = {
        "submission": _write(tmp_path, "s.csv", "id,landmarks\nx,3 0.5\n"),
        "solution": _write(tmp_path, "t.csv", "id,landmarks,Usage\nx,,Public\ny,,Private\n"),
        "output_dir": str(tmp_path / "out"),
    }
    report = evaluate.run(_argv(files, with_scores=False))
    assert report["gap"] is None and report["top1_accuracy"] is None
    assert report["counts"]["predictions_on_non_landmark_images"] == 1


@pytest.mark.parametrize("name, text, message", [
    ("submission", "id,landmarks\na,1 0.5\nb,1 0.5 9\n", "line 3"),
    ("submission", "id,landmarks\nzzz,1 0.5\n", "not in the solution"),
    ("submission", "id,landmarks\na,1 0.5\na,1 0.5\n", "repeated"),
    ("solution", "id,landmarks,Usage\na,1,Secret\n", "Usage 'Secret'"),
    ("scores", "id,nn_label\na,1\n", "missing columns"),
    ("scores", SCORES.replace("a,0,0.9", "a,0,high"), "non-number"),
    ("scores", SCORES.replace("e,,,", "q,,,"), "not in the solution"),
])
def test_bad_input_gives_one_line_error(files, capsys, name, text, message):
    pathlib.Path(files[name]).write_text(text)
    assert evaluate.main(_argv(files)) == 2
    captured = capsys.readouterr()
    error_lines = captured.err.strip().splitlines()
    assert len(error_lines) == 1 and "Traceback" not in captured.err
    assert message in error_lines[0] and error_lines[0].startswith("landmarks-evaluate: error:")


def test_missing_file_is_an_error(files, capsys):
    files["solution"] += ".missing"
    assert evaluate.main(_argv(files)) == 2
    assert "does not exist" in capsys.readouterr().err


def test_top1_accuracy_definition():
    solution = {"a": [1, 2], "b": [3], "c": []}
    assert evaluate.top1_accuracy({"a": (2, 0.1), "b": None, "c": (5, 0.9)}, solution) == 0.5
    assert evaluate.top1_accuracy({}, {"c": []}) is None


def test_oracle_submission_on_toy_data_scores_one(tmp_path):
    # Cross-checks the formats of landmarks-toy-data, rescoring.submission and this job.
    toy_data.generate(toy_data.ToyDataConfig(
        output_dir=str(tmp_path / "toy"), num_classes=2, train_per_class=1, test_per_class=2,
        num_train_distractors=0, num_test_distractors=3, min_size=48, max_size=64))
    solution = submission.parse_solution((tmp_path / "toy" / "test_solution.csv").read_text())
    # Right label for every landmark image, above a low-scored guess on every distractor.
    rows = {i: (labels[0], 0.9) if labels else (1, 0.1) for i, labels in solution.items()}
    (tmp_path / "sub.csv").write_text(submission.format_submission(rows))
    report = evaluate.run(["--submission", str(tmp_path / "sub.csv"), "--solution",
                           str(tmp_path / "toy" / "test_solution.csv"), "--output_dir",
                           str(tmp_path / "eval")])
    assert report["gap"] == 1.0 and report["top1_accuracy"] == 1.0
    assert report["counts"]["landmark_images"] == 4 and report["counts"]["images"] == 7
