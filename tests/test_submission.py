"""Submission and solution CSV text: format, parse, validate."""

import math
import random

import pytest

from rescoring import submission


def test_format_and_parse_round_trip_exact_scores():
    rng = random.Random(0)
    rows = [(f"{i:016x}", (rng.randrange(200000), rng.random() ** 7) if i % 3 else None)
            for i in range(50)]
    rows.append(("tiny", (5, 1e-300)))
    rows.append(("float32", (6, float(__import__("numpy").float32(0.1)))))
    text = submission.format_submission(rows)
    assert text.splitlines()[0] == "id,landmarks"
    assert text.splitlines()[1] == f"{0:016x},"
    parsed = submission.parse_submission(text)
    assert list(parsed) == [r[0] for r in rows]
    assert parsed == dict(rows)  # scores compare exactly, not approximately


def test_format_prediction():
    assert submission.format_prediction(None) == ""
    assert submission.format_prediction((8815, 0.25)) == "8815 0.25"
    assert submission.format_prediction((None, 0.25)) == ""
    with pytest.raises(ValueError, match="finite"):
        submission.format_prediction((1, math.nan))
    with pytest.raises(ValueError, match="integer"):
        submission.format_prediction((1.5, 0.2))


def test_format_submission_rejects_bad_ids():
    with pytest.raises(ValueError, match="twice"):
        submission.format_submission([("a", None), ("a", None)])
    with pytest.raises(ValueError, match="contains"):
        submission.format_submission({"a,b": None})


@pytest.mark.parametrize("text, message", [
    ("", "empty file"),
    ("id,label\na,1 0.5\n", "line 1: header"),
    ("id,landmarks\na,1 0.5\nb,1 0.5 7\n", "line 3: expected '<landmark_id> <score>'"),
    ("id,landmarks\na,x 0.5\n", "line 2: landmark id 'x' is not an integer"),
    ("id,landmarks\na,1 abc\n", "line 2: score 'abc' is not a number"),
    ("id,landmarks\na,1 nan\n", "line 2: score 'nan' is not finite"),
    ("id,landmarks\na,-3 0.5\n", "line 2: landmark id -3 is negative"),
    ("id,landmarks\na,1 0.5\na,2 0.5\n", "line 3: image id 'a' repeated"),
    ("id,landmarks\na,1 0.5,extra\n", "line 2: expected 2 fields"),
])
def test_parse_submission_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        submission.parse_submission(text)


def test_parse_submission_tolerates_bom_blank_lines_and_crlf():
    text = "\ufeffid,landmarks\r\na,3 0.5\r\n\r\nb,\r\n"
    assert submission.parse_submission(text) == {"a": (3, 0.5), "b": None}


def test_parse_solution_and_usage():
    text = "id,landmarks,Usage\na,0 12,Public\nb,100,Private\nd,,Public\ne,,Ignored\n"
    assert submission.parse_solution(text) == {"a": [0, 12], "b": [100], "d": [], "e": []}
    assert submission.parse_solution_usage(text) == {
        "a": "Public", "b": "Private", "d": "Public", "e": "Ignored"}
    # Usage column is optional.
    assert submission.parse_solution("id,landmarks\na,7\nb,\n") == {"a": [7], "b": []}
    assert submission.parse_solution_usage("id,landmarks\na,7\n") == {"a": ""}


@pytest.mark.parametrize("text, message", [
    ("id,landmarks,Usage\na,1,Secret\n", "line 2: Usage 'Secret'"),
    ("id,landmarks,Usage\na,1 x,Public\n", "line 2: landmarks '1 x'"),
    ("id,landmarks,Usage\na,1,Public\na,2,Public\n", "line 3: image id 'a' repeated"),
    ("id,landmarks,Usage\na,1\n", "line 2: expected 3 fields"),
    ("landmarks,id\n", "line 1: header"),
])
def test_parse_solution_errors(text, message):
    with pytest.raises(ValueError, match=message):
        submission.parse_solution(text)


def test_validate_submission_lists_every_problem():
    text = ("id,landmarks\n"
            "a,1 0.5\n"
            "a,2 0.5\n"        # duplicate
            "b,3 nan\n"        # bad score
            "zz,4 0.1\n"       # unknown id
            "c,5 0.2,9\n")     # wrong field count
    problems = submission.validate_submission(text, ["a", "b", "c", "d"])
    joined = "\n".join(problems)
    assert "line 3: duplicate id 'a'" in joined
    assert "line 4: score 'nan' is not finite" in joined
    assert "line 6: expected 2 fields" in joined
    assert "2 test ids have no row: c, d" in joined
    assert "1 ids are not test ids: zz" in joined
    assert len(problems) == 5
    with pytest.raises(ValueError, match="invalid submission"):
        submission.check_submission(text, ["a", "b", "c", "d"])


def test_validate_valid_submission_and_listing_limit():
    text = submission.format_submission({"a": (1, 0.5), "b": None})
    assert submission.validate_submission(text, ["a", "b"]) == []
    assert submission.check_submission(text, ["a", "b"]) == {"a": (1, 0.5), "b": None}
    problems = submission.validate_submission(text, ["a", "b"] + [f"m{i:02d}" for i in range(15)],
                                              max_listed=3)
    assert problems == ["15 test ids have no row: m00, m01, m02, ... (12 more)"]
    assert submission.validate_submission("nope\n", ["a"])[0].startswith("line 1: header")
