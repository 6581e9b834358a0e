"""Manifest parsing, duplicate handling, the dev split, outcome counting and the config (pure)."""

from __future__ import annotations

import json

import pytest

from beam_pipelines.ingest import manifest, split, stats
from beam_pipelines.ingest.config import IngestConfig, parse_args
from beam_pipelines.ingest.manifest import ManifestRow, Rejection, parse_header, parse_line

TRAIN = parse_header("id,url,landmark_id")
TEST = parse_header("id,url")


def test_headers():
    assert TRAIN.labelled and not TEST.labelled
    reordered = parse_header("\ufefflandmark_id, URL ,id,extra")
    row = parse_line("7,http://x/a.jpg,abc,whatever", 2, reordered)
    assert row == ManifestRow("abc", "http://x/a.jpg", 7, 2)
    for bad in ("image,url", "id,path,landmark_id", "id,url,url", ""):
        with pytest.raises(ValueError, match="manifest"):
            parse_header(bad)


def test_valid_rows():
    assert parse_line("abc123,http://h/a.jpg,42", 5, TRAIN) == ManifestRow(
        "abc123", "http://h/a.jpg", 42, 5)
    assert parse_line("t.1_x-2,gs://b/a.jpg", 3, TEST) == ManifestRow(
        "t.1_x-2", "gs://b/a.jpg", -1, 3)
    assert parse_line('q,"images/a,b.jpg",1', 9, TRAIN).url == "images/a,b.jpg"


@pytest.mark.parametrize(
    "text, reason",
    [
        ("abc,http://h/a.jpg", "missing_column"),
        ("abc", "missing_column"),
        ("abc,http://h/a.jpg,1,extra", "malformed_row"),
        ('abc,"http://h/a.jpg,1', "malformed_row"),
        (",http://h/a.jpg,1", "empty_id"),
        ("abc,,1", "empty_url"),
        ("abc,http://h/a.jpg,", "bad_label"),
        ("abc,http://h/a.jpg,x7", "bad_label"),
        ("abc,http://h/a.jpg,1.5", "bad_label"),
        ("abc,http://h/a.jpg,-3", "bad_label"),
        ("../../evil,http://h/a.jpg,1", "unsafe_id"),
        ("a/b,http://h/a.jpg,1", "unsafe_id"),
        (".hidden,http://h/a.jpg,1", "unsafe_id"),
        ("has space,http://h/a.jpg,1", "unsafe_id"),
        ("x" * 129 + ",http://h/a.jpg,1", "unsafe_id"),
    ],
)
def test_rejected_rows(text, reason):
    result = parse_line(text, 17, TRAIN)
    assert isinstance(result, Rejection)
    assert (result.reason, result.line) == (reason, 17)
    assert result.reason in manifest.REASONS


def test_keep_first_keeps_the_lowest_line_and_manifest_before_distractors():
    rows = [
        ManifestRow("a", "u9", 1, 9),
        ManifestRow("a", "d1", -1, 1, manifest.ORIGIN_DISTRACTOR),
        ManifestRow("a", "u3", 1, 3),
    ]
    kept, rejected = manifest.keep_first(rows)
    assert kept.url == "u3"
    assert [(r.url, r.reason) for r in rejected] == [("u9", "duplicate_id"), ("d1", "duplicate_id")]
    assert "line 3" in rejected[0].detail


def test_sanitise_id():
    assert manifest.sanitise_id("my photo (1)", "distractor_") == "distractor_my_photo__1_"
    assert manifest.is_safe_id(manifest.sanitise_id("../../x"))
    assert len(manifest.sanitise_id("y" * 300, "distractor_")) == 128


def test_dev_split_is_deterministic_stratified_and_keeps_train():
    classes = {label: [f"img{label}_{i}" for i in range(size)]
               for label, size in [(0, 1), (1, 2), (2, 10), (3, 33)]}
    chosen = {label: split.dev_ids(ids, 0.2) for label, ids in classes.items()}
    assert [len(chosen[label]) for label in classes] == [0, 0, 2, 7]  # round(0.2 n)
    # Independent of input order, and exactly the smallest sha1 hashes.
    for label, ids in classes.items():
        assert split.dev_ids(list(reversed(ids)), 0.2) == chosen[label]
        by_hash = sorted(ids, key=split.id_hash)
        assert chosen[label] == set(by_hash[: len(chosen[label])])
    # A class of 2 never loses its only train image, even at a high fraction.
    assert len(split.dev_ids(classes[1], 0.9)) == 1
    assert split.num_dev(1, 0.9) == 1  # a lone image may go to dev only if f rounds it up
    with pytest.raises(ValueError):
        split.dev_ids(["a"], 1.0)


def test_counts_add_merge_and_summarise():
    events = ([stats.Outcome(stats.ROW_IN)] * 6
              + [stats.Outcome(stats.WRITTEN, "train", 0, 100, 50)] * 2
              + [stats.Outcome(stats.WRITTEN, "train", 1, 10, 5),
                 stats.Outcome(stats.WRITTEN, "dev", 1, 10, 5),
                 stats.Outcome(stats.WRITTEN, "train", -1, 10, 5),
                 stats.Outcome(stats.REJECTED, "http_404")])
    whole = stats.Counts()
    for event in events:
        whole.add(event)
    left, right = stats.Counts(), stats.Counts()
    for index, event in enumerate(events):
        (left if index % 2 else right).add(event)
    merged = left.merge(right)
    summary = stats.summarise(merged)
    assert summary == stats.summarise(whole)
    assert summary["balanced"] and summary["rows_in"] == 6
    assert summary["written_per_split"] == {"dev": 1, "train": 4}
    assert summary["rejected_per_reason"] == {"http_404": 1}
    assert summary["class_histogram"] == {"num_classes": 2, "min": 2, "median": 2, "max": 2,
                                          "non_landmark_images": 1}
    assert summary["bytes_written"] == 2 * 50 + 3 * 5
    assert summary["bytes_fetched"] == 2 * 100 + 3 * 10


def test_config_from_flags_and_validation():
    config, beam_args = parse_args(["--manifest", "m.csv", "--output_dir", "out", "--dev_fraction",
                                    "0.25", "--num_shards", "8", "--runner=FnApiRunner"])
    assert beam_args == ["--runner=FnApiRunner"]
    assert config.shards_per_split(labelled=True) == {"train": 8, "dev": 2}
    assert config.main_split(labelled=False) == "test"
    assert IngestConfig(**json.loads(json.dumps(config.to_dict()))) == config
    for bad in (dict(num_shards=0), dict(dev_fraction=1.0), dict(split_name="../x"),
                dict(max_side=0), dict(max_attempts=0), dict(manifest="")):
        with pytest.raises(ValueError):
            IngestConfig(**{"manifest": "m.csv", "output_dir": "out", **bad})
