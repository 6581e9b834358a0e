"""GAP against the recipe's worked example, a brute-force reference and edge cases."""

import itertools
import random

import pytest

from rescoring import gap

WORKED_SOLUTION = {"a": [0, 12], "b": [100, 200, 300], "c": [1], "d": [], "e": []}
WORKED_PREDICTIONS = {"b": (0, 0.01), "c": (1, 10.0), "d": (150, 15.0)}


def test_worked_example_from_recipe():
    assert gap.global_average_precision(WORKED_PREDICTIONS, WORKED_SOLUTION) == pytest.approx(1 / 6)
    assert gap.global_average_precision(
        WORKED_PREDICTIONS, WORKED_SOLUTION, landmarks_only=True) == pytest.approx(1 / 3)


def _brute_force_gap(predictions, solution, landmarks_only=False):
    """Independent reference: average over correct predictions of precision at their rank.

    Written as the definition reads, with quadratic work: for each correct prediction, count
    the predictions ranked at or before it (score higher, or equal score and smaller id).
    """
    kept = {i: p for i, p in predictions.items()
            if p is not None and not (landmarks_only and not solution[i])}
    m = sum(1 for labels in solution.values() if labels)

    def before_or_same(j, i):
        return (kept[j][1], _neg(j)) >= (kept[i][1], _neg(i))

    total = 0.0
    for i, (label, _) in kept.items():
        if label in solution[i]:
            rank = sum(1 for j in kept if before_or_same(j, i))
            correct_up_to = sum(1 for j in kept
                                if before_or_same(j, i) and kept[j][0] in solution[j])
            total += correct_up_to / rank
    return total / m


def _neg(image_id):
    # Smaller ids come first on ties: compare negated code points.
    return tuple(-ord(c) for c in image_id) + (0,)


@pytest.mark.parametrize("seed", range(30))
def test_matches_brute_force_on_random_data(seed):
    rng = random.Random(seed)
    ids = [f"{rng.getrandbits(24):06x}" for _ in range(rng.randint(1, 40))]
    ids = list(dict.fromkeys(ids))
    solution = {i: (rng.sample(range(6), rng.randint(1, 2)) if rng.random() < 0.6 else [])
                for i in ids}
    if not any(solution.values()):
        solution[ids[0]] = [0]
    # Coarse scores force ties, which the id order must break.
    predictions = {i: (rng.randrange(6), rng.choice([0.1, 0.2, 0.3, 0.5, 0.9]))
                   for i in ids if rng.random() < 0.8}
    for landmarks_only in (False, True):
        assert gap.global_average_precision(predictions, solution, landmarks_only) == pytest.approx(
            _brute_force_gap(predictions, solution, landmarks_only), abs=1e-12)


def test_ties_are_broken_by_image_id():
    solution = {"a": [1], "b": [2]}
    # Same score: "a" (wrong) ranks before "b" (right) -> 1/2 / 2.
    value = gap.global_average_precision({"a": (9, 0.5), "b": (2, 0.5)}, solution)
    assert value == pytest.approx(0.25)
    # Swap which one is right: the right one is first -> 1 / 2.
    value = gap.global_average_precision({"a": (1, 0.5), "b": (9, 0.5)}, solution)
    assert value == pytest.approx(0.5)


def test_perfect_and_order_of_insertion_irrelevant():
    solution = {"x": [3], "y": [4], "z": []}
    predictions = {"x": (3, 0.9), "y": (4, 0.8), "z": (5, 0.1)}
    assert gap.global_average_precision(predictions, solution) == 1.0
    for perm in itertools.permutations(predictions):
        assert gap.global_average_precision({k: predictions[k] for k in perm}, solution) == 1.0
    # A confident wrong answer on a distractor costs; leaving it out does not.
    predictions["z"] = (5, 0.95)
    assert gap.global_average_precision(predictions, solution) == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert gap.global_average_precision(predictions, solution, landmarks_only=True) == 1.0


def test_empty_and_none_predictions_give_zero():
    assert gap.global_average_precision({}, WORKED_SOLUTION) == 0.0
    assert gap.global_average_precision({"a": None, "b": None}, WORKED_SOLUTION) == 0.0


def test_no_landmark_in_solution_is_an_error():
    with pytest.raises(ValueError, match="undefined"):
        gap.global_average_precision({"d": (1, 0.5)}, {"d": [], "e": []})


def test_unknown_id_and_nan_score_are_errors():
    with pytest.raises(ValueError, match="not in the solution"):
        gap.global_average_precision({"zz": (1, 0.5)}, WORKED_SOLUTION)
    with pytest.raises(ValueError, match="non-finite"):
        gap.global_average_precision({"a": (0, float("nan"))}, WORKED_SOLUTION)


def test_ranked_predictions_and_precision_at_ranks():
    ranked = gap.ranked_predictions(WORKED_PREDICTIONS, WORKED_SOLUTION)
    assert [(r[0], r[3]) for r in ranked] == [("d", False), ("c", True), ("b", False)]
    assert gap.precision_at_ranks([r[3] for r in ranked]) == pytest.approx([0.0, 0.5, 1 / 3])
    assert gap.num_landmark_images(WORKED_SOLUTION) == 3
