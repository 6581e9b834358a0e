"""``landmarks-query``: what landmark is in this photo, and why the model thinks so.

Usage::

    landmarks-query --model_dir runs/demo/model --references runs/demo/reference_features \\
        [--recognizer classifier|knn|knn+classifier] [--crops 22] [--top 5] \\
        [--output_dir query] [--overwrite] PHOTO [PHOTO ...]

``--references`` is either the reference cache a ``landmarks-predict`` run wrote (its
``--reference_features`` folder; the extractor and references per class are the cache's), or a
glob of reference TFRecords, featurised once into ``--reference_features`` (default: beside
``--output_dir``, as predict does) and reused by later queries. Photos are JPEG, PNG, WebP,
GIF or BMP files, local paths, ``gs://`` or ``http(s)://`` URLs.

For each photo it prints the top ``--top`` landmarks with their score, the classifier's
confidence, the inlier count and the best-matching references, and writes to ``--output_dir``:

* ``pictures/<id>.jpg``: the photo beside its best references, verified inlier matches drawn as
  lines, the scores in the caption; ``index.html`` shows them all;
* ``scores.csv``: the job's columns (``landmarks-predict``'s ``scores.csv``) for these photos;
* ``answers.json``: every candidate with its evidence, and seconds per photo;
* ``config.json``; ``_SUCCESS`` last, only when every photo was answered.

The scores are the prediction job's (:mod:`beam_pipelines.query.session`). The final score
blends the max inlier count divided by a normaliser with the classifier's confidence; the job
divides by the largest max inlier count of its test set. ``--local_max_top N`` divides by N,
e.g. the largest ``local_max`` of a predict run's ``scores.csv``: the scores are then that
run's. Without it the query divides by the largest inlier count of any reference it compared
for these photos (candidates included), so that one photo's weak answer does not score as if
its few inliers were the best evidence there is.

Exit codes: 0 every photo answered; 2 bad flags or inputs (model, label map, references,
extractor, a truncated record file), one line; 4 some photo could not be read (one line per
photo; the others are still answered and written, without ``_SUCCESS``), or, as
``landmarks-predict``, the local-feature extractor failed on more than
``--max_failed_fraction`` of the images (counters in ``answers.json``: ``extraction``);
5 a remote input or output cannot be reached; 1 a bug (traceback).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from typing import Optional, Sequence

from beam_pipelines import cli, io_utils
from beam_pipelines.predict import config as config_lib
from beam_pipelines.predict import outputs
from beam_pipelines.query import render, session as session_lib
from tfrecords_schema import InputError
from trainer.cli import CommandFailure, report_error

_LOG = logging.getLogger("landmarks-query")
EXIT_SOME_PHOTOS_FAILED = 4
PICTURES_DIRNAME = "pictures"


class SomePhotosFailed(CommandFailure):
    exit_code = EXIT_SOME_PHOTOS_FAILED


def extraction_stats(session, max_failed_fraction: float) -> dict:
    """The prediction job's extraction counters for this query (``answers.json``).

    ``failed_fraction`` = (photo + reference extraction failures) / (photos + references given
    to the extractor), the job's rule: references featurised in this run (a reused cache had
    none fail) and those featurised on demand count as references. ``extraction_errors``
    holds the job's cause summaries (causes grouped as the job groups them).
    """
    from beam_pipelines.predict import completeness

    featurised = session.references if not session.references.get("reused") else {}

    def summary(causes: list) -> dict:
        return {"count": len(causes), "causes": [[cause, 1] for cause in causes]}

    reference_failed = (int(featurised.get("extraction_failures") or 0)
                        + len(session.extraction_failures["reference"]))
    reference_attempts = (int(featurised.get("num_images") or 0)
                          + session.extraction_attempts["reference"])
    test_failed = len(session.extraction_failures["test"])
    test_attempts = session.extraction_attempts["test"]
    attempts, failed = test_attempts + reference_attempts, test_failed + reference_failed
    return {
        "test_extraction_failures": test_failed,
        "reference_extraction_failures": reference_failed,
        "extraction_attempts": {"test": test_attempts, "reference": reference_attempts},
        "failed_fraction": round(failed / attempts, 6) if attempts else 0.0,
        "max_failed_fraction": max_failed_fraction,
        "extraction_errors": {
            "test": completeness.merge_error_summaries(
                summary(session.extraction_failures["test"])),
            "reference": completeness.merge_error_summaries(
                featurised.get("errors"), summary(session.extraction_failures["reference"]))},
    }


def extraction_problem(stats: dict, spec: str) -> Optional[str]:
    """The job's one line when extraction failed on too many images (exit code 4), or None."""
    from beam_pipelines.predict import completeness

    if stats["failed_fraction"] <= stats["max_failed_fraction"]:
        return None
    attempts = stats["extraction_attempts"]
    failed = stats["test_extraction_failures"] + stats["reference_extraction_failures"]
    errors = stats["extraction_errors"]
    dominant = completeness.dominant_cause(errors.get("test"), errors.get("reference"))
    cause = f"; most frequent cause ({dominant[1]} images): {dominant[0]}" if dominant else ""
    return (f"local-feature extraction ({spec}) failed on {failed} of "
            f"{attempts['test'] + attempts['reference']} images "
            f"({stats['failed_fraction']:.1%} > --max_failed_fraction "
            f"{stats['max_failed_fraction']:g}): photos {stats['test_extraction_failures']} of "
            f"{attempts['test']}, reference {stats['reference_extraction_failures']} of "
            f"{attempts['reference']}{cause}")


class ExtractionFailed(CommandFailure):
    """The extractor failed on more than ``--max_failed_fraction`` of the images (exit 4)."""

    exit_code = EXIT_SOME_PHOTOS_FAILED


@dataclasses.dataclass(frozen=True)
class QueryConfig(session_lib.SessionSettings):
    """The command line, resolved (written to ``config.json``): the session's settings plus
    the photos and what only the command uses."""

    output_dir: str = "query"
    photos: tuple = ()
    local_max_top: float = 0.0
    overwrite: bool = False
    max_failed_fraction: float = config_lib.DEFAULT_MAX_FAILED_FRACTION

    def __post_init__(self):
        if not self.photos:
            raise InputError("give at least one PHOTO")
        if not self.model_dir or not self.references:
            raise InputError("--model_dir and --references are required")
        if self.recognizer not in config_lib.RECOGNIZER_CHOICES:
            raise InputError(f"--recognizer must be one of "
                             f"{', '.join(config_lib.RECOGNIZER_CHOICES)}, got {self.recognizer!r}")
        if self.crops not in config_lib.CROP_CHOICES:
            raise InputError(f"--crops must be one of {config_lib.CROP_CHOICES}, got {self.crops}")
        if self.top < 1:
            raise InputError(f"--top must be >= 1, got {self.top}")
        if self.local_max_top < 0:
            raise InputError(f"--local_max_top must be >= 0, got {self.local_max_top}")
        if self.knn_k < 0 or (self.knn_k and self.recognizer == "classifier"):
            raise InputError("--knn_k must be >= 1 and needs --recognizer knn or knn+classifier")
        if self.rerank_top < 0 or (self.rerank_top and self.recognizer != "classifier"):
            raise InputError("--rerank_top must be >= 1 and needs --recognizer classifier")
        if self.max_side < 32:
            raise InputError(f"--max_side must be >= 32, got {self.max_side}")
        if not 0.0 <= self.max_failed_fraction <= 1.0:
            raise InputError(
                f"--max_failed_fraction must lie in [0, 1], got {self.max_failed_fraction}")

    def settings(self) -> session_lib.SessionSettings:
        return session_lib.SessionSettings(**{
            field.name: getattr(self, field.name)
            for field in dataclasses.fields(session_lib.SessionSettings)})


def build_parser() -> argparse.ArgumentParser:
    defaults = QueryConfig(photos=("x",), model_dir="m", references="r")
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-query", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n  landmarks-query --model_dir runs/demo/model "
               "--references runs/demo/reference_features photo1.jpg photo2.png\n"
               "Beam flags (e.g. --runner) apply to the one-off featurisation of reference "
               "records.")
    default = " (default: %(default)s)"
    add = parser.add_argument
    add("photos", nargs="*", metavar="PHOTO",
        help="photos to recognise: JPEG, PNG, WebP, GIF or BMP; paths, gs:// or http(s):// "
             "URLs (required)")
    add("--model_dir", required=True,
        help="the training run's folder: model.keras, label_map.csv (embedding.keras for kNN) "
             "(required)")
    add("--references", required=True,
        help="a reference cache folder written by landmarks-predict, or a glob of reference "
             "TFRecords (featurised once into --reference_features) (required)")
    add("--output_dir", default=defaults.output_dir,
        help="folder for pictures, index.html, scores.csv, answers.json" + default)
    add("--recognizer", default=defaults.recognizer, choices=config_lib.RECOGNIZER_CHOICES,
        help="as landmarks-predict --recognizer" + default)
    add("--crops", type=int, default=defaults.crops,
        help=f"views per photo, one of {config_lib.CROP_CHOICES}" + default)
    add("--top", type=int, default=defaults.top, help="candidates listed per photo" + default)
    add("--local_max_top", type=float, default=defaults.local_max_top,
        help="divide max inlier counts by this, e.g. the largest local_max of a predict run "
             "(0: by the largest inlier count compared for these photos)" + default)
    add("--reference_features", default=defaults.reference_features,
        help="cache folder for reference records (default: reference_features beside "
             "--output_dir)")
    add("--local_features", default=defaults.local_features,
        help="extractor for reference records (a cache folder names its own)" + default)
    add("--references_per_class", type=int, default=defaults.references_per_class,
        help="references per class for reference records" + default)
    add("--knn_k", type=int, default=defaults.knn_k,
        help="kNN neighbours (0: the recognizer's default)" + default)
    add("--rerank_top", type=int, default=defaults.rerank_top,
        help="classifier: candidates verified for the answer, as landmarks-predict "
             f"--rerank_top (0: its default, {config_lib.DEFAULT_RERANK_TOP})" + default)
    add("--blend_weight", type=float, default=defaults.blend_weight,
        help="weight of the classifier's confidence in the final score" + default)
    add("--max_side", type=int, default=defaults.max_side,
        help="longer side a photo is normalised to, as landmarks-ingest --max_side" + default)
    add("--max_failed_fraction", type=float, default=defaults.max_failed_fraction,
        help="exit code 4 (no _SUCCESS) when the local-feature extractor fails on more than "
             "this fraction of the images it is given (photos, references), as "
             "landmarks-predict" + default)
    add("--overwrite", action="store_true",
        help="replace a non-empty --output_dir (default: off, a non-empty folder is refused)")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> tuple[QueryConfig, list[str]]:
    known, beam_args = cli.parse_job_args(build_parser(), argv)
    values = vars(known)
    values["photos"] = tuple(values["photos"])
    return QueryConfig(**values), beam_args


def candidate_json(candidate) -> dict:
    return {
        "landmark_id": candidate.landmark_id, "score": candidate.score,
        "confidence": candidate.confidence, "classifier_share": candidate.classifier_share,
        "stage1_score": candidate.stage1_score, "inliers": candidate.inliers,
        "rank": candidate.rank, "eligible": candidate.eligible, "decisive": candidate.decisive,
        "references": [{"id": e.reference_id, "inliers": e.inliers}
                       for e in candidate.evidence],
    }


def format_answer(answer) -> str:
    """The printed block of one photo."""
    row = answer.row
    if row is None or row.label is None:
        head = f"{answer.photo}: no landmark ({row.status if row else answer.scored.status})"
    else:
        head = f"{answer.photo}: landmark {row.label} (score {row.final_score:.3f})"
    # The column that ranks the candidates: the final score of the classifier's verified
    # candidates (answer.verified), the re-ranked class score of the kNN recognizers.
    title = "score" if answer.verified else "knn score"
    lines = [head, f"  rank  landmark  {title:>9}  classifier  inliers  best references (inliers)"]
    for rank, candidate in enumerate(answer.candidates, 1):
        share = ("n/a" if candidate.classifier_share is None
                 else f"{candidate.classifier_share:.3f}")
        best = ", ".join(f"{e.reference_id} ({e.inliers})" for e in candidate.evidence[:3])
        lines.append(f"  {rank:>4}  {candidate.landmark_id:>8}  "
                     f"{render.decisive_text(candidate):>9}  "
                     f"{share:>10}  {candidate.inliers:>7}  {best or '-'}")
    for candidate in render.stronger_beyond(answer):
        lines.append(f"  landmark {candidate.landmark_id} has more inliers than the answer but was "
                     f"not verified for it: --rerank_top {candidate.rank + 1} would")
    return "\n".join(lines)


def run(config: QueryConfig, beam_args: Sequence[str] = ()) -> dict:
    """Loads the session, answers every photo, writes the outputs; returns the summary.

    Raises:
      InputError: bad inputs (exit code 2).
      SomePhotosFailed: after writing everything else, when a photo could not be answered.
    """
    start = time.monotonic()
    io_utils.check_access({"--model_dir": config.model_dir, "--references": config.references,
                           "--reference_features": config.reference_features,
                           "--output_dir": config.output_dir})
    io_utils.prepare_output_dir(config.output_dir, config.overwrite)
    session = session_lib.QuerySession(config.settings(), beam_args)
    answers, failures = [], []
    for position, (photo, image_id) in enumerate(
            zip(config.photos, session_lib.photo_ids(config.photos))):
        try:
            answers.append(session.answer(photo, image_id))
        except session_lib.PhotoError as error:
            failures.append((photo, str(error)))
            report_error("landmarks-query", f"photo {photo}: {error}")
        else:
            _LOG.info("photo %d/%d answered in %.2f s", position + 1, len(config.photos),
                      answers[-1].seconds)
    answers, maxima = session.finish(answers, config.local_max_top)
    pictures = []
    for answer in answers:
        name = f"{PICTURES_DIRNAME}/{answer.image_id}.jpg"  # ids are safe file names
        picture = render.evidence_picture(answer, session.reference_image)
        io_utils.write_bytes(io_utils.join(config.output_dir, name), _jpeg(picture))
        pictures.append(name)
        print(format_answer(answer))
    io_utils.write_text(io_utils.join(config.output_dir, "index.html"), render.index_html(
        answers, pictures, failures, f"landmarks-query: {len(answers)} photos"))
    io_utils.write_text(io_utils.join(config.output_dir, "scores.csv"), outputs.scores_csv(
        [answer.row for answer in answers], config.recognizer))
    seconds = [answer.seconds for answer in answers]
    extraction = extraction_stats(session, config.max_failed_fraction)
    summary = {
        "photos": len(config.photos), "answered": len(answers), "failed": len(failures),
        "failures": [{"photo": photo, "reason": reason} for photo, reason in failures],
        "local_max_top": maxima[0],
        "extraction": extraction,
        "seconds": {"load": round(session.load_seconds, 3),
                    "per_photo_mean": round(sum(seconds) / len(seconds), 3) if seconds else None,
                    "total": round(time.monotonic() - start, 3)},
        "answers": [{"photo": a.photo, "id": a.image_id, "status": a.row.status,
                     "landmark_id": a.row.label, "final_score": a.row.final_score,
                     "num_features": a.num_features, "seconds": round(a.seconds, 3),
                     "picture": picture,
                     "candidates": [candidate_json(c) for c in a.candidates]}
                    for a, picture in zip(answers, pictures)],
    }
    io_utils.write_json(io_utils.join(config.output_dir, "answers.json"), summary)
    io_utils.write_json(io_utils.join(config.output_dir, "config.json"), {
        "job": "landmarks-query", "config": dataclasses.asdict(config),
        "beam_args": list(beam_args), "extractor_spec": session.extractor.spec,
        "reference_features": session.config.reference_features,
        "predict_config": session.config.to_json_dict()})
    print(f"{len(answers)} of {len(config.photos)} photos answered; load "
          f"{session.load_seconds:.1f} s, {summary['seconds']['per_photo_mean']} s per photo; "
          f"pictures and index.html in {config.output_dir}")
    problem = extraction_problem(extraction, session.extractor.spec)
    if problem is not None:
        raise ExtractionFailed(f"{problem}; no _SUCCESS in {config.output_dir}")
    if failures:
        raise SomePhotosFailed(f"{len(failures)} of {len(config.photos)} photos could not be "
                               f"answered (see above); no _SUCCESS in {config.output_dir}")
    io_utils.write_success_marker(config.output_dir)
    return summary


def _jpeg(pixels) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return cli.run_command("landmarks-query", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    config, beam_args = parse_args(argv)
    run(config, beam_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
