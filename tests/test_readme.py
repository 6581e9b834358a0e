"""The README documents what the code does: every rejection reason a user can meet."""

import pathlib

from beam_pipelines.ingest import fetch, gldv2, manifest, normalise, tfrecord_input

README = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_rejection_reason_is_explained_in_the_readme():
    reasons = set(fetch.REASONS) | set(manifest.REASONS) | set(normalise.REASONS)
    reasons |= set(tfrecord_input.REASONS) | set(gldv2.REASONS)
    reasons |= {"duplicate_id", "unknown_landmark", "http_404"}
    missing = sorted(reason for reason in reasons if f"`{reason}`" not in README)
    assert not missing, f"README's troubleshooting table lacks {missing}"


def test_readme_names_the_two_commands():
    assert "make demo" in README and "make test" in README
