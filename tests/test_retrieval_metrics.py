"""mAP@100 of GLDv2's retrieval task (``rescoring.retrieval_metrics``) and its place in
``landmarks-evaluate``: hand-worked cases, random cases against an independent formulation, and
the CLI on small files (retrieval alone, and with recognition in the same report)."""

from __future__ import annotations

import json
import random

import pytest

from beam_pipelines import evaluate
from rescoring import retrieval_metrics as metrics
from tfrecords_schema import InputError


def reference_ap(predicted, relevant, k):
    """Independent formulation: the j-th distinct relevant image found, at rank r_j (1-based,
    within the first k, duplicates keeping their ranks), contributes j / r_j."""
    first_rank = {}
    for rank, image_id in enumerate(predicted[:k], start=1):
        first_rank.setdefault(image_id, rank)
    ranks = sorted(rank for image_id, rank in first_rank.items() if image_id in set(relevant))
    return sum(j / rank for j, rank in enumerate(ranks, start=1)) / min(len(set(relevant)), k)


def test_hand_worked_cases():
    assert metrics.average_precision(["a", "x", "b"], {"a", "b"}) == pytest.approx((1 + 2 / 3) / 2)
    # A repeated id earns nothing but keeps its rank: hits at ranks 2 and 4.
    assert metrics.average_precision(["x", "a", "a", "b"], {"a", "b"}) == pytest.approx(
        (1 / 2 + 2 / 4) / 2)
    # Only the first k count, and the denominator is min(|R|, k).
    assert metrics.average_precision(["x", "a", "b"], {"a", "b", "c"}, k=2) == pytest.approx(
        (1 / 2) / 2)
    many = [f"i{n}" for n in range(150)]
    assert metrics.average_precision(many[:100], set(many)) == 1.0
    assert metrics.average_precision(many[:100] + ["zz"], set(many[:100])) == 1.0
    assert metrics.average_precision([], {"a"}) == 0.0
    # A query without a prediction row scores 0 and still counts.
    assert metrics.mean_average_precision({"q1": ["a"]}, {"q1": {"a"}, "q2": {"b"}}) == 0.5
    with pytest.raises(ValueError):
        metrics.average_precision(["a"], set())
    with pytest.raises(ValueError):
        metrics.mean_average_precision({"q9": ["a"]}, {"q1": {"a"}})


def test_random_cases_match_the_independent_formulation():
    rng = random.Random(7)
    for case in range(300):
        pool = [f"i{n}" for n in range(rng.choice([5, 40, 300]))]
        k = rng.choice([1, 5, 100])
        relevant = set(rng.sample(pool, rng.randint(1, min(len(pool), 120))))
        predicted = [rng.choice(pool) for _ in range(rng.randint(0, 130))]
        assert metrics.average_precision(predicted, relevant, k) == pytest.approx(
            reference_ap(predicted, relevant, k), abs=1e-12), case
    solution = {f"q{n}": set(rng.sample(pool, 3)) for n in range(20)}
    predictions = {q: rng.sample(pool, 10) for q in list(solution)[:15]}
    expected = sum(reference_ap(predictions.get(q, []), r, 100) for q, r in solution.items()) / 20
    assert metrics.mean_average_precision(predictions, solution) == pytest.approx(expected)


SOLUTION = """id,images,Usage
q1,a b,Public
q2,c,Private
q3,None,Ignored
q4,d e f,Public
q5,g,Ignored
"""
PREDICTIONS = """id,images
q1,a x b
q2,x c
q3,a
q4,z
"""


def test_files_usage_and_ignored_queries():
    relevant, usage = metrics.parse_solution(SOLUTION)
    assert relevant == {"q1": ["a", "b"], "q2": ["c"], "q4": ["d", "e", "f"]}
    assert usage["q3"] == usage["q5"] == "Ignored"
    report = metrics.evaluate(PREDICTIONS, SOLUTION)
    q1, q2, q4 = (1 + 2 / 3) / 2, 1 / 2, 0.0
    assert report["map_at_100"] == pytest.approx((q1 + q2 + q4) / 3)
    assert report["by_usage"]["Public"]["map_at_100"] == pytest.approx((q1 + q4) / 2)
    assert report["by_usage"]["Private"]["map_at_100"] == pytest.approx(q2)
    assert report["counts"] == {"queries": 3, "ignored_queries": 2,
                                "queries_without_prediction": 0, "predictions_beyond_k": 0}
    with pytest.raises(InputError, match="not in the retrieval solution"):
        metrics.evaluate(PREDICTIONS + "q9,a\n", SOLUTION)
    with pytest.raises(InputError, match="header"):
        metrics.parse_predictions("id,landmarks\nq1,a\n")
    text = metrics.format_predictions([("q2", ["c", "x"]), ("q1", ["a"])])
    assert text == "id,images\nq1,a\nq2,c x\n"


def test_evaluate_cli_reports_map_alone_or_beside_gap(tmp_path, capsys):
    (tmp_path / "solution.csv").write_text(SOLUTION)
    (tmp_path / "retrieval.csv").write_text(PREDICTIONS)
    retrieval_flags = ["--retrieval", str(tmp_path / "retrieval.csv"),
                       "--retrieval_solution", str(tmp_path / "solution.csv")]
    assert evaluate.main([*retrieval_flags, "--output_dir", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["retrieval"] == metrics.evaluate(PREDICTIONS, SOLUTION)
    assert "map_at_100" in capsys.readouterr().out

    (tmp_path / "recognition.csv").write_text(
        "id,landmarks,Usage\nq1,7,Public\nq2,8,Private\nq3,,Public\n")
    (tmp_path / "submission.csv").write_text("id,landmarks\nq1,7 0.9\nq2,9 0.8\nq3,7 0.1\n")
    assert evaluate.main(["--submission", str(tmp_path / "submission.csv"), "--solution",
                          str(tmp_path / "recognition.csv"), *retrieval_flags,
                          "--output_dir", str(tmp_path / "both")]) == 0
    both = json.loads((tmp_path / "both" / "report.json").read_text())
    assert both["gap"] == pytest.approx(1 / 2)  # one landmark hit at rank 1 of M = 2
    assert both["by_usage"]["Public"]["gap"] == 1.0
    assert both["by_usage"]["Private"]["gap"] == 0.0
    assert both["retrieval"] == report["retrieval"]

    assert evaluate.main(["--retrieval", str(tmp_path / "retrieval.csv"),
                          "--output_dir", str(tmp_path / "x")]) == 2
    assert "--retrieval needs --retrieval_solution" in capsys.readouterr().err
