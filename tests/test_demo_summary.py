"""The demo's report, on small fake inputs (fast: no pipeline runs).

The table names the crop voting that predict really ran, and the ingest lines read the keys that
``landmarks-ingest`` really writes into ``stats.json``; a missing key fails loudly.
"""

import inspect
import json

import pytest

from beam_pipelines import demo
from beam_pipelines.ingest import pipeline as ingest_pipeline
from beam_pipelines.ingest import stats as ingest_stats
from beam_pipelines.predict import config as predict_config


def _summary(views_per_image):
    return {
        "status": "done",
        "gap": 0.875, "gap_nn_only": 0.8417, "gap_landmarks_only": 0.875,
        "top1_accuracy": 0.875, "dev_gap_initial": 0.0632, "dev_gap_final": 0.8387,
        "views_per_image": views_per_image,
        "seconds_total": 1.5,
        "stages": [{"name": "predict", "seconds": 1.5, "detail": ""}],
        "outputs": {"report": "runs/demo/evaluation/report.json", "plots": []},
    }


@pytest.mark.parametrize("views, text", [
    (22, "GAP, classifier alone (22-crop voting) : 0.8417"),
    (12, "GAP, classifier alone (12-crop voting) : 0.8417"),
    (2, "GAP, classifier alone (2-crop voting)"),
    (1, "GAP, classifier alone (1 view, no voting) : 0.8417"),
])
def test_table_names_the_crop_count_that_was_run(views, text):
    table = demo.format_table(_summary(views))
    assert text in table
    if views != 22:
        assert "22-crop" not in table
    # The value column stays aligned whatever the label's length.
    columns = {line.index(" : ") for line in table.splitlines() if " : " in line}
    assert len(columns) == 1


def _reports():
    """Three report.json of evaluate, reduced to the keys the comparison reads."""
    main = {"gap": 0.875, "gap_landmarks_only": 0.9, "top1_accuracy": 0.8, "gap_nn_only": 0.8417,
            "gap_nn_only_landmarks_only": 0.85, "top1_accuracy_nn_only": 0.75}
    one_view = {"gap": 0.6, "gap_nn_only": 0.7, "gap_nn_only_landmarks_only": None,
                "top1_accuracy_nn_only": 0.625}
    knn = {"gap": 0.95, "gap_landmarks_only": 0.96, "top1_accuracy": 0.9,
           "gap_knn_only": 0.9, "gap_knn_only_landmarks_only": 0.91,
           "top1_accuracy_knn_only": 0.875}
    return main, one_view, knn


def test_comparison_table_lists_the_five_recognizers_and_the_winner():
    rows = demo.comparison_rows(*_reports(), views=22, knn_k=3)
    table = demo.format_table({**_summary(22), "comparison": rows})
    lines = table.splitlines()
    start = lines.index("recognizers compared on the same test set")
    assert lines[start + 1:start + 8] == [
        "  recognizer                              GAP     GAP landmarks  top-1",
        "  classifier, 1 view                      0.7000  -              0.6250",
        "  classifier, 22-crop voting              0.8417  0.8500         0.7500",
        "  classifier, 22-crop voting + rescoring  0.8750  0.9000         0.8000",
        "  knn (k=3)                               0.9000  0.9100         0.8750",
        "  knn + rescoring                         0.9500  0.9600         0.9000",
        "  best GAP on this run: knn + rescoring (0.9500)",
    ]
    # The first table's lines stay as they were.
    assert "GAP, classifier alone (22-crop voting) : 0.8417" in table


def test_comparison_names_the_real_crop_count_and_k_and_ties():
    main, one_view, knn = _reports()
    knn["gap"], knn["gap_knn_only"] = main["gap"], 0.5
    rows = demo.comparison_rows(main, one_view, knn, views=12, knn_k=5)
    assert [row["recognizer"] for row in rows] == [
        "classifier, 1 view", "classifier, 12-crop voting",
        "classifier, 12-crop voting + rescoring", "knn (k=5)", "knn + rescoring"]
    lines = demo.format_comparison(rows)
    assert lines[-1] == ("  best GAP on this run: classifier, 12-crop voting + rescoring = "
                         "knn + rescoring (0.8750)")


def test_without_compare_there_is_no_comparison_table():
    for comparison in (None, []):
        table = demo.format_table({**_summary(22), "comparison": comparison})
        assert "recognizers compared" not in table
    assert "recognizers compared" not in demo.format_table(_summary(22))


@pytest.mark.parametrize("text, value", [("true", True), ("false", False), ("FALSE", False)])
def test_compare_flag(text, value):
    assert demo.parse_args(["--compare", text]).compare is value
    assert demo.parse_args([]).compare is True


def test_table_without_the_crop_count_fails_loudly():
    summary = _summary(22)
    del summary["views_per_image"]
    with pytest.raises(RuntimeError, match="views_per_image"):
        demo.format_table(summary)


def test_views_per_image_come_from_the_predict_run_config(tmp_path):
    # The keys as landmarks-predict writes them: {"config": PredictConfig.to_json_dict(), ...}.
    config, _ = predict_config.parse_args([
        "--model", str(tmp_path / "m" / "model.keras"), "--test_data", "t", "--reference_data",
        "r", "--output_dir", str(tmp_path / "predict"), "--crops", "12"])
    (tmp_path / "config.json").write_text(json.dumps({"config": config.to_json_dict()}))
    assert demo.predict_views_per_image(str(tmp_path)) == 12

    (tmp_path / "config.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(RuntimeError, match="crops"):
        demo.predict_views_per_image(str(tmp_path))


def _ingest_stats():
    """``stats.json`` as landmarks-ingest writes it: the counting part plus the launcher's timing."""
    counts = ingest_stats.Counts()
    for outcome in [ingest_stats.Outcome(ingest_stats.ROW_IN)] * 5 + [
        ingest_stats.Outcome(ingest_stats.WRITTEN, "train", 0),
        ingest_stats.Outcome(ingest_stats.WRITTEN, "train", 1),
        ingest_stats.Outcome(ingest_stats.WRITTEN, "train", -1),
        ingest_stats.Outcome(ingest_stats.WRITTEN, "dev", 1),
        ingest_stats.Outcome(ingest_stats.REJECTED, "missing_file"),
    ]:
        counts.add(outcome)
    return {**ingest_stats.summarise(counts), "seconds": 2.0, "images_per_second": 2.0}


def test_ingest_line_reads_the_keys_the_ingest_job_writes():
    written_by_ingest = set(ingest_stats.summarise(ingest_stats.Counts()))
    # The launcher adds its timing keys to the counting part before writing stats.json.
    launcher = inspect.getsource(ingest_pipeline.run)
    written_by_ingest |= {key for key in demo.INGEST_STATS_KEYS if f'"{key}"' in launcher}
    assert set(demo.INGEST_STATS_KEYS) <= written_by_ingest

    line = demo._ingest_detail(_ingest_stats())
    assert line == "5 rows -> 4 written (dev 1, train 3), 1 rejected, 2.0 img/s"
    assert "None" not in line


@pytest.mark.parametrize("key", demo.INGEST_STATS_KEYS)
def test_ingest_line_fails_loudly_on_a_missing_key(key):
    stats = _ingest_stats()
    del stats[key]
    with pytest.raises(RuntimeError, match=key):
        demo._ingest_detail(stats)
