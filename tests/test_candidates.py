"""Answers that follow their evidence: ``--rerank_top`` (several candidates verified, the best
final score answers) and the ``knn+classifier`` rule as its source defines it.

Pure functions against references written here from the rules; then the job's steps (Verify,
Blend, PickBestCandidate) on Beam's FnApiRunner with a case built so that the classifier's top
class is wrong and a lower candidate verifies strongly.
"""

import os

import numpy as np
import pytest
from apache_beam import Create
from apache_beam.ml.inference.base import PredictionResult
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that

from beam_pipelines.predict import knn, steps, transforms
from beam_pipelines.predict.elements import Candidacy, Neighbours, Vote
from rescoring import candidates, retrieval, scores, voting
from rescoring.verification import VerificationParams
from tfrecords_schema.local_features import FeatureRecord


def _pipeline() -> BeamTestPipeline:
    return BeamTestPipeline(runner="FnApiRunner")


# ---- the candidates and their confidences ------------------------------------------------------


def reference_candidates(probabilities, k):
    """The rule of rescoring.candidates, straight from its text, with loops: each view votes
    for its top-1 class (lowest index on ties) with that probability; shares = summed votes /
    V; the vote's class = largest share (lowest index on ties); order: the vote's class, then
    share, mean probability (descending), class index; confidence: the vote's share for it,
    min(mean probability, that share) for the others."""
    views, classes = probabilities.shape
    sums = [0.0] * classes
    for view in range(views):
        row = [float(value) for value in probabilities[view]]
        best = row.index(max(row))
        sums[best] += row[best]
    shares = [value / views for value in sums]
    winner = shares.index(max(shares))
    vote_confidence = float(np.float32(shares[winner]))
    means = [sum(float(probabilities[view][c]) for view in range(views)) / views
             for c in range(classes)]
    order = sorted(range(classes), key=lambda c: (
        c != winner, -float(np.float32(shares[c])) if sums[c] else 0.0, -means[c], c))
    return [(c, vote_confidence if c == winner else min(means[c], vote_confidence))
            for c in order[:k]]


def test_top_candidates_follow_the_rule_and_one_is_the_crop_vote_to_the_bit():
    rng = np.random.default_rng(19)
    for case in range(300):
        views, classes = int(rng.integers(1, 23)), int(rng.integers(2, 40))
        probabilities = rng.random((views, classes))
        if case % 3 == 0:  # a runner-up at 0.45 in every view, never anyone's top-1
            probabilities[:, 0] = 0.45
            probabilities[:, 1] = 0.9
        if case % 5 == 0:  # ties of probabilities and of shares
            probabilities = np.round(probabilities, 1)
        vote_class, vote_confidence = voting.vote(probabilities)
        one = candidates.top_candidates(probabilities, 1)
        assert one == ((vote_class, vote_confidence),)  # the same floats, not approximately
        for k in (2, 3, 5, classes + 3):
            got = candidates.top_candidates(probabilities, k)
            expected = reference_candidates(probabilities, k)
            assert [c for c, _ in got] == [c for c, _ in expected]
            # Means summed in another order: equal up to float64 rounding of V terms.
            np.testing.assert_allclose([conf for _, conf in got], [conf for _, conf in expected],
                                       rtol=0, atol=1e-15)
            assert got[0] == (vote_class, vote_confidence)
            assert all(conf <= vote_confidence for _, conf in got)
            assert len(got) == min(k, classes)


def test_pick_best_highest_score_then_earliest_candidate_streaming():
    rows = iter([("a", 0.5, 2), ("b", 0.7, 3), ("c", 0.7, 1), ("d", 0.1, 0)])
    best = candidates.pick_best(rows, lambda row: candidates.preference(row[1], row[2]))
    assert best == ("c", 0.7, 1)
    assert candidates.pick_best([], lambda row: row) is None
    with pytest.raises(ValueError):
        candidates.top_candidates(np.ones((2, 3)), 0)


# ---- the job: verify K candidates, pick the best ------------------------------------------------

# Eight points in general position; unit descriptors that match only themselves.
POINTS = np.array([[10, 20], [50, 80], [90, 30], [30, 60], [70, 10], [20, 90], [80, 70],
                   [60, 45]], np.float32)
BASIS = np.eye(16, dtype=np.float32)
LANDMARK_IDS = (100, 200, 300)


def _features(image_id, label, locations, descriptors):
    return FeatureRecord(image_id, label, "orb", np.asarray(locations, np.float32),
                         np.asarray(descriptors, np.float32))


def _case():
    """Test image "q": the classifier votes class 0 (share 0.5) before class 2 (its mean
    probability 0.3); class 0's references share 3 of q's 8 descriptors at scattered places
    (at most 3 affine inliers), class 2's the 8 of them translated (8 inliers). "z" has no
    features (no evidence anywhere)."""
    scattered = np.array([[5, 5], [95, 90], [40, 12]], np.float32)
    test_features = [("q", _features("q", -1, POINTS, BASIS[:8])),
                     ("z", _features("z", -1, np.zeros([0, 2]), np.zeros([0, 16])))]
    references = [
        (0, _features("r0", 0, scattered, BASIS[:3])),
        (1, _features("r1", 1, POINTS, BASIS[8:])),
        (2, _features("r2", 2, POINTS + [5.0, -3.0], BASIS[:8])),
    ]
    return test_features, references


def _vote(k):
    confidence = 0.5
    ranked = ((0, confidence), (2, 0.3), (1, 0.25))[:k]
    return Vote(0, confidence, (), ranked if k > 1 else ())


def _run(k, check, weight=0.25):
    """Verify -> Blend (-> PickBestCandidate with K > 1) on the case; ``check`` gets
    ``{image_id: FinalRow}`` (it runs inside the pipeline: a failed assert fails the run)."""
    test_features, references = _case()
    votes = [("q", _vote(k)), ("z", _vote(k))]

    def by_id(rows):
        assert len({row.image_id for row in rows}) == len(rows)  # one row per test image
        check({row.image_id: row for row in rows})

    with _pipeline() as p:
        scored = (
            {"votes": p | "Votes" >> Create(votes),
             "features": p | "Features" >> Create(test_features),
             "references": p | "References" >> Create(references)}
            | steps.Verify(VerificationParams())
        )
        rows = scored | steps.Blend(weight, LANDMARK_IDS)
        if k > 1:
            rows = rows | steps.PickBestCandidate()
        assert_that(rows, by_id)


def test_a_strongly_verified_runner_up_answers_with_rerank_top_and_not_without():
    def recipe(rows):
        # Class 0 (landmark 100), its own inliers (r0 shares 3 matches: at most 3), normalised
        # by the test set's largest local_max, blended with the vote's confidence.
        q = rows["q"]
        assert (q.label, q.nn_label, q.nn_confidence, q.candidate) == (100, 100, 0.5, None)
        assert q.local_max <= 3
        top = max(row.local_max for row in rows.values())
        assert q.final_score == scores.final_score(q.local_max, top, 0.5, 0.25)
        assert (rows["z"].label, rows["z"].status) == (100, "no_features")

    def reranked(rows):  # K = 5 > 3 classes: all 3 verified
        q = rows["q"]
        assert q.label == 300 and q.local_max == 8.0 and q.status == "scored"
        # The crop vote's columns stay the vote's; the answer's confidence is its own.
        assert (q.nn_label, q.nn_confidence, q.candidate_confidence) == (100, 0.5, 0.3)
        assert q.candidate == Candidacy(1, 3, 100, 0.5)
        # Normalised by the largest local_max of every candidate (8, q's class 2 itself).
        assert q.final_score == 0.75 * 8 / 8 + 0.25 * 0.3
        # No evidence anywhere: the vote's class stays the answer (equal local scores, and
        # no runner-up's confidence exceeds the vote's).
        z = rows["z"]
        assert (z.label, z.candidate.rank, z.final_score) == (100, 0, 0.25 * 0.5)
        assert len(rows) == 2

    _run(1, recipe)
    _run(5, reranked)


def test_rerank_top_one_takes_exactly_the_recipes_path():
    query = transforms.TestQuery("q", Vote(3, 0.5), POINTS, BASIS[:8])
    assert list(transforms.candidate_queries(query)) == [(3, query)]
    assert transforms.query_candidacy(query) is None
    assert transforms.query_confidence(query) == 0.5
    probabilities = np.random.default_rng(0).random((22, 7))
    _, vote = transforms.vote_keyed(("q", PredictionResult(None, probabilities)), False, 1)
    assert vote == Vote(*voting.vote(probabilities))  # no candidates: today's element


# ---- knn+classifier as its source defines it ---------------------------------------------------


def reference_glr2020_third(similarities, labels, view_probabilities):
    """The GLR-2020 3rd-place rule written from its description: the 5 nearest neighbours vote
    cos ** 9 (sign kept) times the classifier's probability of their landmark to the power
    10; the probability is the classifier's score of that landmark when it is among the
    classifier's top 5 (here the mean over the views), 1e-8 otherwise; the landmark with the
    largest sum wins."""
    mean = [sum(view[c] for view in view_probabilities) / len(view_probabilities)
            for c in range(len(view_probabilities[0]))]
    top5 = sorted(range(len(mean)), key=lambda c: (-mean[c], c))[:5]
    nearest = sorted(range(len(similarities)), key=lambda i: -similarities[i])[:5]
    totals = {}
    for i in nearest:
        factor = mean[labels[i]] if labels[i] in top5 else 1e-8
        totals[labels[i]] = totals.get(labels[i], 0.0) + similarities[i] ** 9 * factor ** 10
    return max(totals, key=totals.get), totals


def test_knn_classifier_is_the_reference_rule_with_negative_similarities_and_runner_ups():
    rng = np.random.default_rng(2020)
    params = knn.aggregation_params("knn+classifier", 5)
    cases = negative = runner_up_wins = 0
    for _ in range(1500):
        classes, views = int(rng.integers(3, 12)), int(rng.integers(1, 23))
        probabilities = rng.random((views, classes)) * 0.6
        runner_up = int(rng.integers(classes))
        probabilities[:, runner_up] = 0.45  # in the top 5, never a view's top-1
        probabilities[:, (runner_up + 1) % classes] = 0.6
        count = int(rng.integers(1, 9))
        similarities = [float(s) for s in rng.uniform(-0.9, 0.95, count)]
        labels = [int(c) for c in rng.integers(0, classes, count)]
        expected, totals = reference_glr2020_third(similarities, labels,
                                                   probabilities.tolist())
        # The job's path: the crop vote's element (vote_keyed) feeds score_neighbours.
        _, vote = transforms.vote_keyed(("t", PredictionResult(None, probabilities)), True)
        _, verdict = knn.score_neighbours(
            "t", Neighbours(tuple(f"r{i}" for i in range(count)), tuple(similarities),
                            tuple(labels)), vote, params, True)
        assert verdict.knn_class == expected
        assert verdict.knn_score == pytest.approx(totals[expected], rel=1e-9, abs=1e-300)
        cases += 1
        negative += any(s < 0 for s in sorted(similarities, reverse=True)[:5])
        runner_up_wins += expected == runner_up
    assert cases == 1500 and negative > 500 and runner_up_wins > 50


def test_a_negative_similarity_votes_against_its_class():
    # Class 7: neighbours at 0.9 and -0.85; class 3: one at 0.86. With the sign kept class 3
    # wins (0.86**9 = 0.257 > 0.9**9 - 0.85**9 = 0.387 - 0.232 = 0.156); with max(s, 0) class
    # 7 would (0.387).
    sims, labels = [0.9, 0.86, -0.85], [7, 3, 7]
    verdict = retrieval.class_scores_from_neighbours(
        sims, labels, retrieval.AggregationParams.glr2020_third())
    assert verdict.best_class == 3
    assert verdict.per_class[7] == pytest.approx(0.9 ** 9 + (-0.85) ** 9)


# ---- the recipe on the demo run: --rerank_top 1 is today's output ------------------------------


def _rows(path):
    import csv

    with open(path) as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_rerank_top_one_on_the_demo_is_the_recipes_output(demo_run, tmp_path):
    """``--rerank_top 1`` on the demo's data: the crop vote's class, its own inliers, the
    recipe's blend. Against the demo's own predict run: the same bytes when that run is the
    recipe (the default K = 1); with a default K > 1, the same vote columns, and the same
    local columns wherever the demo's answer is the vote's class (candidate 0)."""
    from beam_pipelines import stages
    from beam_pipelines.predict import config as predict_config
    from beam_pipelines.predict import outputs

    stages.predict_test(demo_run.run_dir, str(tmp_path / "recipe"), "default", 32, 22,
                        ("--rerank_top", "1"))
    demo = stages.path(demo_run.run_dir, "predict")
    recipe = tmp_path / "recipe"
    text = (recipe / "scores.csv").read_text()
    assert text.splitlines()[0] == ",".join(outputs.SCORES_HEADER)
    if predict_config.DEFAULT_RERANK_TOP == 1:
        for name in ("submission.csv", "scores.csv"):
            assert (recipe / name).read_bytes() == open(os.path.join(demo, name), "rb").read()
        return
    mine, theirs = _rows(recipe / "scores.csv"), _rows(os.path.join(demo, "scores.csv"))
    assert sorted(mine) == sorted(theirs)
    top = max(float(row["local_max"]) for row in mine.values())
    changed = 0
    for image_id, row in mine.items():
        other = theirs[image_id]
        assert row["label"] == row["nn_label"] == other["nn_label"]
        assert row["nn_confidence"] == other["nn_confidence"]
        assert float(row["final_score"]) == scores.final_score(
            float(row["local_max"]), top, float(row["nn_confidence"]), 0.15)
        if other["candidate_rank"] == "0":
            for column in ("label", "local_max", "local_mean", "local_best_half"):
                assert row[column] == other[column]
        else:
            changed += 1
            assert row["label"] != other["label"]
    assert changed < len(mine)
