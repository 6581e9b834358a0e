"""The documentation says what the code does: every rejection reason a user can meet is
explained in docs/TROUBLESHOOTING.md, and the README names the two commands."""

import pathlib
import re

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


def _demo_block() -> list[str]:
    """The README's block of what `make demo` printed."""
    start = README.index("```text\nlandmarks-demo: results on the toy test set\n") + len("```text\n")
    return README[start:README.index("\n```", start)].splitlines()


def test_the_readme_shows_the_demo_output_as_the_demo_prints_it():
    """The printed block, re-rendered by the demo's own formatter from the numbers it shows,
    is the same text (labels, order, columns), up to the stage table's total."""
    from beam_pipelines import demo

    lines = _demo_block()
    first = dict((part.strip() for part in line.split(" : ")) for line in lines[1:6])
    views = int(re.search(r"\((\d+)-crop voting\)", lines[1]).group(1))
    dev_initial, dev_final = first["dev GAP at init -> after training"].split(" -> ")
    header = lines.index("recognizers compared on the same test set")
    rows = []
    for line in lines[header + 2:]:
        match = re.match(r"^  (.+?)\s{2,}(\S+)\s+(\S+)\s+(\S+)$", line)
        if not match or line.startswith("  best GAP"):
            break
        label, *values = match.groups()
        rows.append(dict(zip(("recognizer", "gap", "gap_landmarks_only", "top1_accuracy"),
                             [label, *(None if v == "-" else float(v) for v in values)])))
    stages_at = lines.index("  stage            seconds")
    stages = [{"name": line[2:18].strip(), "seconds": float(line[18:])}
              for line in lines[stages_at + 1:] if not line.startswith("  total")]
    summary = {
        "views_per_image": views,
        "gap_nn_only": float(first[f"GAP, classifier alone ({views}-crop voting)"]),
        "gap": float(first["GAP, after local-feature rescoring"]),
        "gap_landmarks_only": float(first["GAP over landmark images only"]),
        "top1_accuracy": float(first["top-1 accuracy (landmark images)"]),
        "dev_gap_initial": float(dev_initial), "dev_gap_final": float(dev_final),
        "comparison": rows, "stages": stages, "outputs": {},
        "seconds_total": float(lines[-1].split()[-1]),
    }
    assert len(rows) == 5
    # The stages a demo run has (tests/test_demo.py asserts the same list of a real run).
    assert [stage["name"] for stage in stages] == [
        "toy data", "ingest train", "ingest test", "train", "predict", "evaluate",
        "predict 1 view", "evaluate 1 view", "predict knn", "evaluate knn"]
    rendered = demo.format_table(summary).splitlines()
    assert rendered[1:len(lines) + 1] == lines
