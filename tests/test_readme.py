"""The documentation says what the code does: every rejection reason a user can meet is
explained in docs/TROUBLESHOOTING.md, and the README names the two commands."""

import pathlib

from beam_pipelines.ingest import fetch, gldv2, manifest, normalise, tfrecord_input

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
TROUBLESHOOTING = (ROOT / "docs" / "TROUBLESHOOTING.md").read_text()


def test_every_rejection_reason_is_explained_in_the_troubleshooting_guide():
    reasons = set(fetch.REASONS) | set(manifest.REASONS) | set(normalise.REASONS)
    reasons |= set(tfrecord_input.REASONS) | set(gldv2.REASONS)
    reasons |= {"duplicate_id", "unknown_landmark", "http_404"}
    assert len(reasons) >= 25  # the code's lists were read
    table = TROUBLESHOOTING.split("\n## You see", 1)[1]
    missing = sorted(reason for reason in reasons if f"`{reason}`" not in table)
    assert not missing, f"docs/TROUBLESHOOTING.md's table lacks {missing}"


def test_readme_names_the_two_commands():
    assert "make demo" in README and "make test" in README
