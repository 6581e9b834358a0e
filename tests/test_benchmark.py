"""landmarks-benchmark: flags, the output folder, the table's arithmetic and formats (fast, no
pipeline), and one tiny run of every stage for two seeds through the CLI (~1 min)."""

import csv
import dataclasses
import glob
import io
import json
import os
import shlex

import numpy as np
import pytest

from beam_pipelines import benchmark, evaluate, stages
from tfrecords_schema import InputError
from trainer.cli import CommandFailure


def _stderr_lines(capsys):
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------
# Flags: one line, exit code 2, nothing written.


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0,1,0"], "--seeds must be unique, 0 is given twice"),
    (["--seeds", "0,x"], "argument --seeds: expected comma-separated integers"),
    (["--seeds=-1,2"], "--seeds must be >= 0, got -1"),
    (["--seeds", ","], "--seeds needs at least one seed"),
    (["--recognizers", "knn,nearest"], "unknown recognizer 'nearest'"),
    (["--recognizers", ","], "--recognizers needs at least one recognizer"),
    (["--recognizers", "knn,knn"], "--recognizers must be unique"),
    (["--crop", "1"], "unknown flag --crop (did you mean --crops?)"),
    (["--head_epochz", "1"], "unknown flag --head_epochz (did you mean --head_epochs?)"),
    (["--seed", "3"], "--seed is set by landmarks-benchmark"),
    (["--head_epochs", "-1"], "--head_epochs must be >= 0"),
    (["--image_size", "32"], "--image_size must be >= 71"),
    (["--crops", "5"], "predict: --crops must be one of"),
    (["--num_classes", "40"], "toy data: num_classes must be in"),
    (["--difficulty", "easy"], "argument --difficulty: invalid choice"),
])
def test_bad_flags_exit_2_with_one_line(tmp_path, capsys, flags, message):
    output_dir = tmp_path / "bench"
    assert benchmark.main(["--output_dir", str(output_dir), *flags]) == 2
    lines = _stderr_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith("landmarks-benchmark: error: "), lines
    assert message in lines[0]
    assert not output_dir.exists()


def test_missing_scenes_dir_is_refused_before_any_stage(tmp_path, capsys):
    argv = ["--output_dir", str(tmp_path / "bench"), "--scenes_dir", str(tmp_path / "nope")]
    assert benchmark.main(argv) == 2
    assert _stderr_lines(capsys) == [
        f"landmarks-benchmark: error: --scenes_dir {tmp_path / 'nope'} is not a folder"]
    assert not (tmp_path / "bench").exists()


def test_toy_data_flags_follow_the_difficulty_unless_given():
    config = benchmark.parse_args(["--output_dir", "b"])
    assert config.difficulty == "hard" and config.num_classes is None
    flags = benchmark.toy_flags(config)
    assert "--train_per_class" not in flags and "--num_classes" not in flags
    assert flags[-2:] == ["--difficulty", "hard"]
    config = benchmark.parse_args(["--output_dir", "b", "--train_per_class", "5",
                                   "--difficulty", "standard"])
    flags = benchmark.toy_flags(config)
    assert flags[flags.index("--train_per_class") + 1] == "5"
    assert flags[-2:] == ["--difficulty", "standard"]


def test_command_line_reproduces_the_config():
    argv = ["--output_dir", "runs/b c", "--seeds", "3,1", "--recognizers", "knn+classifier",
            "--num_classes", "4", "--crops", "12", "--head_epochs", "1", "--overwrite"]
    config = benchmark.parse_args(argv)
    assert config.seeds == (3, 1) and config.recognizers == ("knn+classifier",)
    assert config.extra_train_flags == ("--head_epochs", "1")
    words = shlex.split(benchmark.command_text(config))
    assert words[0] == "landmarks-benchmark"
    assert benchmark.parse_args(words[1:]) == dataclasses.replace(config, overwrite=False)
    assert benchmark.BenchmarkConfig.from_json_dict(
        json.loads(json.dumps(dataclasses.asdict(config)))) == config


# ---------------------------------------------------------------------------------------------
# The output folder: never delete what is not ours.


def test_a_folder_that_is_not_a_benchmark_is_refused_even_with_overwrite(tmp_path, capsys):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    (foreign / benchmark.MARKER).write_text('{"results": [1, 2]}')  # a file of the same name
    for extra in ([], ["--overwrite"]):
        assert benchmark.main(["--output_dir", str(foreign), "--seeds", "0", *extra]) == 2
        lines = _stderr_lines(capsys)
        assert len(lines) == 1 and "was not written by landmarks-benchmark" in lines[0]
    assert (foreign / "thesis.tex").read_text() == "precious"

    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(InputError, match="is a file"):
        benchmark.prepare_output_dir(str(a_file), overwrite=True)


def test_an_earlier_benchmark_is_replaced_only_with_overwrite(tmp_path):
    earlier = tmp_path / "bench"
    (earlier / "seed_0").mkdir(parents=True)
    (earlier / "seed_0" / "stale.csv").write_text("old")
    (earlier / benchmark.MARKER).write_text(json.dumps(
        {"written_by": "landmarks-benchmark", "status": "failed"}))
    with pytest.raises(InputError, match="pass --overwrite"):
        benchmark.prepare_output_dir(str(earlier), overwrite=False)
    assert (earlier / "seed_0" / "stale.csv").exists()
    benchmark.prepare_output_dir(str(earlier), overwrite=True)
    assert os.listdir(earlier) == []
    benchmark.prepare_output_dir(str(tmp_path / "new" / "bench"), overwrite=False)
    assert (tmp_path / "new" / "bench").is_dir()


# ---------------------------------------------------------------------------------------------
# A failing stage: one line naming the seed and the stage, its exit code, no _SUCCESS.


class _Incomplete(CommandFailure):
    exit_code = 4


def _fake_toy_data(root, seed, flags):
    return {"counts": {}}, "fake"


@pytest.mark.parametrize("error, code, line", [
    (InputError("no photo in scenes"), 2,
     "landmarks-benchmark: error: seed 7 (1/1), stage 2/6 ingest train failed: no photo in "
     "scenes"),
    (_Incomplete("no test image was readable"), 4,
     "landmarks-benchmark: error: seed 7 (1/1), stage 2/6 ingest train failed: no test image "
     "was readable"),
])
def test_a_failing_stage_stops_the_run(tmp_path, capsys, monkeypatch, error, code, line):
    def fail(root):
        raise error

    monkeypatch.setattr(stages, "make_toy_data", _fake_toy_data)
    monkeypatch.setattr(stages, "ingest_train", fail)
    output_dir = tmp_path / "bench"
    argv = ["--output_dir", str(output_dir), "--seeds", "7", "--recognizers", "knn"]
    assert benchmark.main(argv) == code
    assert _stderr_lines(capsys) == [line]
    assert not (output_dir / benchmark.SUCCESS).exists()
    record = json.loads((output_dir / benchmark.MARKER).read_text())
    assert record["status"] == "failed" and record["failure"]["stage"] == "ingest train"
    assert record["failure"]["seed"] == 7
    # The folder is ours: a rerun with --overwrite may replace it.
    assert benchmark.is_benchmark_dir(str(output_dir))


def test_a_bug_in_a_stage_is_reported_as_one(tmp_path, capsys, monkeypatch):
    def fail(root):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(stages, "make_toy_data", _fake_toy_data)
    monkeypatch.setattr(stages, "ingest_train", fail)
    output_dir = tmp_path / "bench"
    assert benchmark.main(["--output_dir", str(output_dir), "--seeds", "0"]) == 1
    lines = _stderr_lines(capsys)
    assert lines[-1].startswith("landmarks-benchmark: internal error: ZeroDivisionError: boom")
    assert json.loads((output_dir / benchmark.MARKER).read_text())["status"] == "failed"
    assert not (output_dir / benchmark.SUCCESS).exists()


# ---------------------------------------------------------------------------------------------
# Methods: each row reads the keys evaluate writes for its recognizer, and nothing else.

_SOLUTION = "id,landmarks,Usage\na,1,Public\nb,2,Private\nc,,Public\n"
_SUBMISSION = "id,landmarks\na,1 0.9\nb,1 0.4\nc,2 0.2\n"
_SCORES = ("id,nn_label,nn_confidence,local_max,local_mean,local_best_half,final_score,label"
           "{knn_header}\n"
           "a,1,0.8,30,10,20,0.9,1{knn_a}\n"
           "b,2,0.7,2,1,1,0.4,1{knn_b}\n"
           "c,2,0.6,1,1,1,0.2,2{knn_c}\n")


def _scores(recognizer):
    if recognizer == "classifier":
        return _SCORES.format(knn_header="", knn_a="", knn_b="", knn_c="")
    return _SCORES.format(knn_header=",knn_label,knn_score,recognizer",
                          knn_a=f",1,0.9,{recognizer}", knn_b=f",2,0.5,{recognizer}",
                          knn_c=f",2,0.3,{recognizer}")


def test_rerank_top_rows_and_variants():
    config = benchmark.parse_args(["--output_dir", "b", "--recognizers", "knn,classifier",
                                   "--rerank_top", "1,3,5"])
    assert [(v.recognizer, v.rerank_top, v.folder) for v in benchmark.variants_for(config)] == [
        ("knn", 1, "knn"), ("classifier", 1, "classifier"), ("classifier", 3, "classifier_top3"),
        ("classifier", 5, "classifier_top5")]
    methods = benchmark.methods_for(config.recognizers, config.rerank_top)
    assert [method.name for method in methods] == [
        "knn (no rescoring)", "knn + rescoring", "classifier (no rescoring)",
        "classifier + rescoring", "classifier, top 3 verified + rescoring",
        "classifier, top 5 verified + rescoring"]
    assert benchmark.baseline_method(methods) == benchmark.Method("classifier", True, 1)
    assert benchmark.predict_flags("classifier", 1) == (
        "--recognizer", "classifier", "--rerank_top", "1")
    assert benchmark.predict_flags("knn", 1) == ("--recognizer", "knn")
    for bad, message in (("1,1", "must be unique"), ("0", "must be >= 1"), (",", "at least one")):
        with pytest.raises(InputError, match=message):
            benchmark.parse_args(["--output_dir", "b", "--rerank_top", bad])


def test_rows_and_their_report_keys():
    methods = benchmark.methods_for(["classifier", "knn", "knn+classifier"])
    assert [method.name for method in methods] == [
        "classifier (no rescoring)", "classifier + rescoring", "knn (no rescoring)",
        "knn + rescoring", "knn+classifier (no rescoring)", "knn+classifier + rescoring"]
    keys = {method.name: [method.report_key(metric) for metric, _ in benchmark.METRICS]
            for method in methods}
    assert keys["classifier (no rescoring)"] == [
        "gap_nn_only", "top1_accuracy_nn_only", "gap_nn_only_landmarks_only"]
    assert keys["knn (no rescoring)"] == keys["knn+classifier (no rescoring)"] == [
        "gap_knn_only", "top1_accuracy_knn_only", "gap_knn_only_landmarks_only"]
    assert keys["knn + rescoring"] == ["gap", "top1_accuracy", "gap_landmarks_only"]

    for method in methods:
        report = evaluate.evaluate(_SUBMISSION, _SOLUTION, _scores(method.recognizer))
        values = benchmark.method_metrics(report, method)
        assert all(value is not None for value in values.values()), (method, values)
    # The knn recognizer has no classifier answer: a row that asked for it would get n/a, not
    # another figure.
    knn_report = evaluate.evaluate(_SUBMISSION, _SOLUTION, _scores("knn"))
    assert "gap_nn_only" not in knn_report
    classifier_row = benchmark.Method("classifier", rescoring=False)
    assert benchmark.method_metrics(knn_report, classifier_row) == {
        "gap": None, "top1_accuracy": None, "gap_landmarks_only": None}


# ---------------------------------------------------------------------------------------------
# Aggregation and formats, on hand-made numbers.


def _per_seed(values):
    """Per seed: {method: {metric: value}} with the same value for every metric."""
    return [{"knn (no rescoring)": {"gap": v, "top1_accuracy": v, "gap_landmarks_only": v},
             "knn + rescoring": {"gap": v + 0.1, "top1_accuracy": None,
                                 "gap_landmarks_only": v}} for v in values]


def test_mean_and_sample_sd():
    summary = benchmark.mean_sd([0.5, 0.7, 0.9])
    assert summary["mean"] == pytest.approx(0.7) and summary["sd"] == pytest.approx(0.2)
    assert summary["n"] == 3 and summary["values"] == [0.5, 0.7, 0.9]
    assert benchmark.format_mean_sd(summary) == "0.7000 ± 0.2000"
    one = benchmark.mean_sd([0.5])
    assert one["sd"] is None and benchmark.format_mean_sd(one) == "0.5000 ± n/a"
    missing = benchmark.mean_sd([0.5, None])
    assert missing["mean"] is None and benchmark.format_mean_sd(missing) == "n/a"


def test_table_formats_from_hand_made_numbers(tmp_path):
    methods = benchmark.methods_for(["knn"])
    rows = benchmark.aggregate(_per_seed([0.5, 0.7, 0.9]), methods)
    assert [row["method"] for row in rows] == ["knn (no rescoring)", "knn + rescoring"]
    assert rows[1]["gap"]["mean"] == pytest.approx(0.8)
    assert rows[1]["top1_accuracy"]["mean"] is None
    lines = benchmark.markdown_table(rows)
    assert [cell.strip() for cell in lines[0].strip("|").split("|")] == [
        "method", "GAP", "top-1 accuracy", "GAP landmarks only",
        "GAP - knn (no rescoring), paired (wins)", "seeds"]
    assert [cell.strip() for cell in lines[2].strip("|").split("|")][4] == "(baseline)"
    # Paired: every seed's rescored GAP is 0.1 above its own stage-1 GAP -> +0.1, sd 0, 3 wins,
    # although the unpaired sd of either row is 0.2.
    assert [cell.strip() for cell in lines[3].strip("|").split("|")] == [
        "knn + rescoring", "0.8000 ± 0.2000", "n/a", "0.7000 ± 0.2000",
        "+0.1000 ± 0.0000 (3/3)", "3"]
    assert len({len(line) for line in lines}) == 1  # aligned

    table = list(csv.DictReader(io.StringIO(benchmark.table_csv(rows))))
    assert table[1]["method"] == "knn + rescoring" and table[1]["n_seeds"] == "3"
    assert float(table[1]["gap_mean"]) == pytest.approx(0.8)
    assert float(table[1]["gap_sd"]) == pytest.approx(0.2)
    assert table[1]["top1_accuracy_mean"] == table[1]["top1_accuracy_sd"] == "n/a"
    assert table[1]["baseline"] == "knn (no rescoring)"
    assert float(table[1]["gap_vs_baseline_mean"]) == pytest.approx(0.1)
    assert table[1]["gap_vs_baseline_wins"] == "3"


    config = benchmark.parse_args(["--output_dir", str(tmp_path / "b"), "--seeds", "4"])
    one_seed = benchmark.aggregate(_per_seed([0.5]), methods)
    text = benchmark.table_markdown(one_seed, config, ["knn: ..."], {"classes": 6})
    assert "| 0.6000 ± n/a" in text and "sd is n/a with one seed" in text
    assert benchmark.command_text(config) in text

    png = benchmark.plot_png(rows, 3)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_recipe_is_the_baseline_of_the_paired_column():
    methods = benchmark.methods_for(["knn", "classifier"])
    assert benchmark.baseline_method(methods) == benchmark.Method("classifier", True)
    per_seed = [{method.name: {"gap": gap + offset, "top1_accuracy": 0.0,
                               "gap_landmarks_only": 0.0}
                 for method, offset in zip(methods, (0.0, 0.3, -0.1, 0.2))}
                for gap in (0.2, 0.6)]
    per_seed[1]["knn + rescoring"]["gap"] = 0.7  # 0.6 + 0.1: below the recipe's 0.8 there
    rows = {row["method"]: row for row in benchmark.aggregate(per_seed, methods)}
    paired = rows["knn + rescoring"]["gap_vs_baseline"]
    assert paired["values"] == pytest.approx([0.1, -0.1]) and paired["wins"] == 1
    assert paired["mean"] == pytest.approx(0.0)
    assert paired["sd"] == pytest.approx(np.std([0.1, -0.1], ddof=1))


# ---------------------------------------------------------------------------------------------
# The whole thing, tiny: 2 seeds, the classifier recognizer, every stage real (~45 s).

# One recognizer keeps the suite's time down: the kNN rows' report keys are checked on real
# evaluate output in test_rows_and_their_report_keys, the kNN predict path in test_predict_knn.
TINY = ["--seeds", "0,1", "--recognizers", "classifier", "--rerank_top", "1,3",
        "--num_classes", "3",
        "--train_per_class", "4", "--test_per_class", "2", "--num_train_distractors", "3",
        "--num_test_distractors", "3", "--min_size", "96", "--max_size", "160",
        "--image_size", "71", "--crops", "1", "--references_per_class", "4",
        # landmarks-train: one step of the head, no finetuning.
        "--head_epochs", "1", "--finetune_epochs", "0", "--steps_per_epoch", "1",
        "--head_batch_size", "4", "--calibrate_batchnorm_images", "8"]

# The rows, and where the test itself (not the benchmark's code) finds each one's figures.
EXPECTED_ROWS = {
    "classifier (no rescoring)": ("classifier", "gap_nn_only", "top1_accuracy_nn_only",
                                  "gap_nn_only_landmarks_only"),
    "classifier + rescoring": ("classifier", "gap", "top1_accuracy", "gap_landmarks_only"),
    "classifier, top 3 verified + rescoring": ("classifier_top3", "gap", "top1_accuracy",
                                               "gap_landmarks_only"),
}


@pytest.mark.slow
def test_benchmark_end_to_end(tmp_path, capsys):
    output_dir = tmp_path / "bench"
    argv = ["--output_dir", str(output_dir), *TINY]
    assert benchmark.main(argv) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(output_dir)) == [
        "_SUCCESS", "benchmark.json", "benchmark.png", "seed_0", "seed_1", "table.csv",
        "table.md"]
    record = json.loads((output_dir / "benchmark.json").read_text())
    assert record["status"] == "done"
    assert benchmark.BenchmarkConfig.from_json_dict(record["config"]) == benchmark.parse_args(argv)

    # Each seed's evaluations, read here, recomputed with numpy.
    reports = {}
    for path in sorted(glob.glob(str(output_dir / "seed_*" / "evaluation*" / "report.json"))):
        seed = int(path.split(os.sep)[-3].split("_")[1])
        recognizer = path.split(os.sep)[-2][len("evaluation_"):]
        reports.setdefault(recognizer, {})[seed] = json.loads(open(path).read())
    assert {recognizer: sorted(by_seed) for recognizer, by_seed in reports.items()} == {
        "classifier": [0, 1], "classifier_top3": [0, 1]}

    table = record["table"]
    assert [row["method"] for row in table] == list(EXPECTED_ROWS)
    markdown = (output_dir / "table.md").read_text()
    md_rows = {cells[0]: cells[1:] for cells in (
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in markdown.splitlines() if line.startswith("| ") and "---" not in line)}
    assert list(md_rows) == ["method", *EXPECTED_ROWS]
    csv_rows = list(csv.DictReader(io.StringIO((output_dir / "table.csv").read_text())))
    assert [row["method"] for row in csv_rows] == list(EXPECTED_ROWS)
    for row, csv_row in zip(table, csv_rows):
        recognizer, *keys = EXPECTED_ROWS[row["method"]]
        cells = []
        for metric, key in zip(("gap", "top1_accuracy", "gap_landmarks_only"), keys):
            values = np.array([reports[recognizer][seed][key] for seed in (0, 1)], np.float64)
            mean, sd = values.mean(), values.std(ddof=1)
            assert row[metric]["mean"] == pytest.approx(mean, abs=1e-12), (row["method"], metric)
            assert row[metric]["sd"] == pytest.approx(sd, abs=1e-12), (row["method"], metric)
            assert float(csv_row[f"{metric}_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(csv_row[f"{metric}_sd"]) == pytest.approx(sd, abs=1e-12)
            cells.append(f"{mean:.4f} ± {sd:.4f}")
        recipe = np.array([reports["classifier"][seed]["gap"] for seed in (0, 1)])
        paired = np.array([reports[recognizer][seed][keys[0]] for seed in (0, 1)]) - recipe
        expected_paired = ("(baseline)" if row["method"] == "classifier + rescoring" else
                           f"{paired.mean():+.4f} ± {paired.std(ddof=1):.4f} "
                           f"({int((paired > 0).sum())}/2)")
        assert md_rows[row["method"]] == [*cells, expected_paired, "2"]
        assert row["n_seeds"] == 2
    assert "sample standard deviation (ddof=1)" in markdown
    command = markdown.split("```\n")[1].strip()
    assert benchmark.parse_args(shlex.split(command)[1:]) == benchmark.parse_args(argv)

    # Each seed: all stages, timed; both predicts shared one reference-feature cache.
    for seed_record in record["seeds"]:
        assert [stage["name"] for stage in seed_record["stages"]] == [
            "toy data", "ingest train", "ingest test", "train",
            "predict classifier (--rerank_top 1)", "evaluate classifier (--rerank_top 1)",
            "predict classifier (--rerank_top 3)", "evaluate classifier (--rerank_top 3)"]
        assert all(stage["seconds"] > 0 for stage in seed_record["stages"])
        seed_dir = output_dir / f"seed_{seed_record['seed']}"
        for folder, k in (("predict_classifier", 1), ("predict_classifier_top3", 3)):
            predict_config = json.loads((seed_dir / folder / "config.json").read_text())
            assert predict_config["config"]["reference_features"] == str(
                seed_dir / "reference_features")
            assert predict_config["config"]["rerank_top"] == k

    with open(output_dir / "benchmark.png", "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert markdown.strip().splitlines()[4] in printed  # the table's first row, on stdout
    assert "benchmark.png" in printed
