"""`landmarks-evaluate`: GAP of a submission against a GLDv2 solution, mAP@100 of a retrieval.

    landmarks-evaluate --submission submission.csv --solution test_solution.csv \\
        --output_dir eval/ [--scores scores.csv]
    landmarks-evaluate --retrieval retrieval.csv --retrieval_solution retrieval_solution_v2.1.csv \\
        --output_dir eval/

Either task or both in one run (``--submission`` with ``--solution``; ``--retrieval`` with
``--retrieval_solution``).

Writes ``report.json``, ``precision_at_rank.png`` and ``score_histograms.png`` to
``--output_dir`` and prints a short table. Inputs and outputs go through Beam's FileSystems
(:mod:`beam_pipelines.io_utils`), so ``gs://`` paths work.

Metrics (all over the solution's non-``Ignored`` rows, as the official scorer does):

- ``gap``: global average precision of the submission (:mod:`rescoring.gap`);
  ``gap_landmarks_only``: the same with predictions on non-landmark images left out.
- ``top1_accuracy``: among test images that show a landmark, the fraction whose predicted label
  is one of their true landmarks; an image without a prediction counts as wrong. It ignores
  scores and non-landmark images entirely.
- With ``--scores`` (the predict job's ``scores.csv``: ``id,nn_label,nn_confidence,local_max,
  local_mean,local_best_half,final_score,label``): ``gap_nn_only``, ``gap_nn_only_landmarks_only``
  and ``top1_accuracy_nn_only``: the classifier's own answer ``(nn_label, nn_confidence)``
  before rescoring, to compare with the rescored ``gap``. When ``scores.csv`` comes from a
  retrieval recognizer (it has the ``knn_label`` and ``knn_score`` columns of
  ``--recognizer knn`` / ``knn+classifier``), also ``gap_knn_only``,
  ``gap_knn_only_landmarks_only`` and ``top1_accuracy_knn_only``: the kNN's answer
  ``(knn_label, knn_score)`` before verification; the ``nn_only`` metrics are then given only if
  the classifier ran (``knn+classifier``).
- ``by_usage``: the same metrics per Usage (``Public``/``Private``), each with its own M.
- ``counts``: images, landmark images, predictions (on landmark / non-landmark images), correct
  predictions, ignored rows, test ids without a submission row.

A GAP is ``null`` when the images it covers include no landmark (M = 0, undefined).

Retrieval (``--retrieval``, the predict job's ``retrieval.csv``: ``id,images``, the index ids
nearest first): ``retrieval.map_at_100`` over every scored query of the solution (a query
without a row scores 0; ``None`` / ``Ignored`` queries left out), ``retrieval.by_usage`` the
same for ``Public`` and ``Private``, ``retrieval.counts`` (:mod:`rescoring.retrieval_metrics`,
GLDv2's definition).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import logging
import math
import sys
from typing import Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from beam_pipelines import cli
from beam_pipelines import io_utils
from rescoring import gap as gap_lib
from rescoring import retrieval_metrics
from rescoring import submission as submission_lib
from tfrecords_schema import InputError

logger = logging.getLogger(__name__)

REPORT_FILENAME = "report.json"
PRECISION_PLOT_FILENAME = "precision_at_rank.png"
HISTOGRAM_PLOT_FILENAME = "score_histograms.png"
SCORES_COLUMNS = ("id", "nn_label", "nn_confidence", "local_max", "local_mean", "local_best_half",
                  "final_score", "label")
KNN_SCORES_COLUMNS = ("knn_label", "knn_score")  # with a retrieval recognizer
USAGE_ORDER = ("Public", "Private")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Paths of one evaluation (local or ``gs://``): recognition (``submission`` + ``solution``),
    retrieval (``retrieval`` + ``retrieval_solution``), or both."""

    submission: Optional[str] = None
    solution: Optional[str] = None
    output_dir: str = ""
    scores: Optional[str] = None
    retrieval: Optional[str] = None
    retrieval_solution: Optional[str] = None

    def __post_init__(self):
        if not self.output_dir:
            raise InputError("--output_dir is required")
        for first, second in (("submission", "solution"), ("retrieval", "retrieval_solution")):
            if bool(getattr(self, first)) != bool(getattr(self, second)):
                given, missing = (first, second) if getattr(self, first) else (second, first)
                raise InputError(f"--{given} needs --{missing}")
        if not self.submission and not self.retrieval:
            raise InputError("--submission and --solution are required (recognition), or "
                             "--retrieval and --retrieval_solution (retrieval), or all four")
        if self.scores and not self.submission:
            raise InputError("--scores goes with --submission and --solution")


# ----------------------------------------------------------------------------- pure core

def parse_scores(text: str, known_ids: Optional[set] = None) -> pd.DataFrame:
    """The predict job's ``scores.csv`` text -> DataFrame indexed by ``id``.

    ``nn_label``/``label`` (and ``knn_label`` when present) become nullable integers
    (``<NA>`` = no prediction); the score columns (and ``knn_score``) floats. Other columns
    (a retrieval recognizer's ``recognizer``, ``neighbour_*``, ...) stay text.

    Raises:
      InputError: missing columns, unparsable numbers, repeated ids, or ids outside
        ``known_ids``.
    """
    try:
        frame = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise InputError("scores: empty file") from None
    missing = [column for column in SCORES_COLUMNS if column not in frame.columns]
    if missing:
        raise InputError(f"scores: missing columns {', '.join(missing)} (has "
                         f"{', '.join(frame.columns)})")
    duplicated = frame["id"][frame["id"].duplicated()]
    if len(duplicated):
        raise InputError(f"scores: image id {duplicated.iloc[0]!r} repeated")
    if known_ids is not None:
        unknown = sorted(set(frame["id"]) - known_ids)
        if unknown:
            raise InputError(f"scores: {len(unknown)} ids are not in the solution, "
                             f"e.g. {unknown[0]!r}")
    has_knn = all(column in frame.columns for column in KNN_SCORES_COLUMNS)
    for column in ("nn_label", "label") + (("knn_label",) if has_knn else ()):
        try:
            frame[column] = pd.array([int(v) if v.strip() else None for v in frame[column]],
                                     dtype="Int64")
        except ValueError:
            raise InputError(f"scores: column {column} holds a non-integer label") from None
    for column in (("nn_confidence", "local_max", "local_mean", "local_best_half", "final_score")
                   + (("knn_score",) if has_knn else ())):
        try:
            frame[column] = np.array([float(v) if v.strip() else math.nan for v in frame[column]],
                                     np.float64)
        except ValueError:
            raise InputError(f"scores: column {column} holds a non-number") from None
    return frame.set_index("id")


def nn_predictions(scores: pd.DataFrame, label_column: str = "nn_label",
                   score_column: str = "nn_confidence") -> dict[str, gap_lib.Prediction]:
    """``{id: (nn_label, nn_confidence) | None}`` from :func:`parse_scores`' frame (or another
    pair of label and score columns, e.g. ``knn_label``, ``knn_score``)."""
    predictions = {}
    columns = zip(scores.index, scores[label_column], scores[score_column])
    for image_id, label, confidence in columns:
        if pd.isna(label) or not math.isfinite(confidence):
            predictions[image_id] = None
        else:
            predictions[image_id] = (int(label), float(confidence))
    return predictions


def has_knn_columns(scores: pd.DataFrame) -> bool:
    """Whether :func:`parse_scores`' frame comes from a retrieval recognizer."""
    return all(column in scores.columns for column in KNN_SCORES_COLUMNS)


def has_classifier_columns(scores: pd.DataFrame) -> bool:
    """Whether the classifier ran: always for the classifier recognizer's file (no
    ``recognizer`` column), for a retrieval recognizer's only with ``knn+classifier``."""
    if "recognizer" not in scores.columns:
        return True
    return any(value in ("classifier", "knn+classifier") for value in scores["recognizer"])


def knn_predictions(scores: pd.DataFrame) -> Optional[dict[str, gap_lib.Prediction]]:
    """``{id: (knn_label, knn_score) | None}``, or None without the kNN columns."""
    if not has_knn_columns(scores):
        return None
    return nn_predictions(scores, "knn_label", "knn_score")


def _gap_or_none(predictions, solution, landmarks_only: bool = False) -> Optional[float]:
    if gap_lib.num_landmark_images(solution) == 0:
        return None
    return gap_lib.global_average_precision(predictions, solution, landmarks_only=landmarks_only)


def top1_accuracy(predictions: Mapping[str, gap_lib.Prediction],
                  solution: Mapping[str, Sequence[int]]) -> Optional[float]:
    """Fraction of landmark images (non-empty solution) whose predicted label is a true one.

    Images without a prediction count as wrong; non-landmark images are not counted. ``None``
    when there is no landmark image.
    """
    landmark_ids = [image_id for image_id, truth in solution.items() if truth]
    if not landmark_ids:
        return None
    correct = 0
    for image_id in landmark_ids:
        prediction = predictions.get(image_id)
        if prediction is not None and prediction[0] in set(solution[image_id]):
            correct += 1
    return correct / len(landmark_ids)


def _only_metrics(name: str, answers, solution) -> dict:
    """``gap_<name>_only``, ``gap_<name>_only_landmarks_only``, ``top1_accuracy_<name>_only``."""
    predicted = {i: p for i, p in answers.items() if p is not None and i in solution}
    return {f"gap_{name}_only": _gap_or_none(predicted, solution),
            f"gap_{name}_only_landmarks_only": _gap_or_none(predicted, solution,
                                                            landmarks_only=True),
            f"top1_accuracy_{name}_only": top1_accuracy(predicted, solution)}


def _subset_metrics(predictions, nn, solution, knn=None) -> dict:
    predicted = {i: p for i, p in predictions.items() if p is not None and i in solution}
    metrics = {
        "gap": _gap_or_none(predicted, solution),
        "gap_landmarks_only": _gap_or_none(predicted, solution, landmarks_only=True),
        "top1_accuracy": top1_accuracy(predicted, solution),
        "images": len(solution),
        "landmark_images": gap_lib.num_landmark_images(solution),
        "predictions": len(predicted),
    }
    if nn is not None:
        metrics.update(_only_metrics("nn", nn, solution))
    if knn is not None:
        metrics.update(_only_metrics("knn", knn, solution))
    return metrics


def evaluate(submission_text: str, solution_text: str, scores_text: Optional[str] = None) -> dict:
    """The report (see the module docstring) from the three files' text.

    Raises:
      InputError: a malformed file, a repeated id, or a submission/scores id that is not in the
        solution.
    """
    full_solution = submission_lib.parse_solution(solution_text)
    usage = submission_lib.parse_solution_usage(solution_text)
    predictions = submission_lib.parse_submission(submission_text)
    unknown = [image_id for image_id in predictions if image_id not in full_solution]
    if unknown:
        raise InputError(f"submission: {len(unknown)} ids are not in the solution, "
                         f"e.g. {unknown[0]!r}")
    problems = submission_lib.validate_submission(submission_text, list(full_solution))

    scored = {i: labels for i, labels in full_solution.items() if usage[i] != "Ignored"}
    nn = knn = None
    if scores_text is not None:
        scores = parse_scores(scores_text, known_ids=set(full_solution))
        nn = nn_predictions(scores) if has_classifier_columns(scores) else None
        knn = knn_predictions(scores)

    report = _subset_metrics(predictions, nn, scored, knn)
    counts = {key: report.pop(key) for key in ("images", "landmark_images", "predictions")}
    predicted = [i for i, p in predictions.items() if p is not None and i in scored]
    counts.update({
        "non_landmark_images": counts["images"] - counts["landmark_images"],
        "ignored_images": len(full_solution) - len(scored),
        "predictions_on_landmark_images": sum(1 for i in predicted if scored[i]),
        "predictions_on_non_landmark_images": sum(1 for i in predicted if not scored[i]),
        "correct_predictions": sum(1 for i in predicted if predictions[i][0] in set(scored[i])),
        "missing_rows": sum(1 for i in full_solution if i not in predictions),
    })
    report["counts"] = counts
    report["by_usage"] = {}
    for usage_name in USAGE_ORDER:
        subset = {i: labels for i, labels in scored.items() if usage[i] == usage_name}
        if subset:
            report["by_usage"][usage_name] = _subset_metrics(predictions, nn, subset, knn)
    report["submission_problems"] = problems
    return report


def ranked_correctness(predictions, solution) -> tuple[np.ndarray, np.ndarray]:
    """``(scores [N], correct [N] bool)`` in GAP order (non-ignored rows only)."""
    ranked = gap_lib.ranked_predictions(
        {i: p for i, p in predictions.items() if i in solution}, solution)
    return (np.array([row[2] for row in ranked], np.float64),
            np.array([row[3] for row in ranked], bool))


# ----------------------------------------------------------------------------- plots

def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def precision_plot(curves: Mapping[str, tuple[np.ndarray, np.ndarray]],
                   num_landmark_images: int) -> bytes:
    """PNG: precision and recall against rank, and precision against score threshold.

    ``curves``: name -> ``(scores [N], correct [N])`` in GAP order.
    """
    from matplotlib.figure import Figure  # Agg canvas; no pyplot global state.

    figure = Figure(figsize=(11, 4.2))
    by_rank, by_score = figure.subplots(1, 2)
    for (name, (scores, correct)), colour in zip(curves.items(),
                                                 ("tab:blue", "tab:orange", "tab:purple")):
        if len(scores) == 0:
            continue
        ranks = np.arange(1, len(scores) + 1)
        hits = np.cumsum(correct)
        precision = hits / ranks
        by_rank.plot(ranks, precision, color=colour, label=f"{name}: precision")
        by_rank.plot(ranks, hits / max(num_landmark_images, 1), color=colour, linestyle="--",
                     label=f"{name}: recall (/M)")
        by_score.plot(scores, precision, color=colour, label=name)
    by_rank.set(xlabel="rank (predictions sorted by score)", ylabel="fraction",
                title=f"Precision and recall at rank (M = {num_landmark_images})", ylim=(0, 1.05))
    by_rank.legend(fontsize=8)
    by_score.set(xlabel="score threshold (predictions with score >= t)", ylabel="precision",
                 title="Precision against score", ylim=(0, 1.05))
    by_score.invert_xaxis()
    by_score.legend(fontsize=8)
    for axes in (by_rank, by_score):
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def histogram_plot(panels: Mapping[str, Mapping[str, np.ndarray]]) -> bytes:
    """PNG: one panel per score; in each, histograms of that score per group.

    ``panels``: panel title -> group name -> scores ``[n]``.
    """
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5 * len(panels), 4.2))
    axes_list = np.atleast_1d(figure.subplots(1, len(panels)))
    colours = {"correct (landmark)": "tab:green", "wrong label (landmark)": "tab:orange",
               "non-landmark": "tab:red"}
    for axes, (title, groups) in zip(axes_list, panels.items()):
        values = [v for v in groups.values() if len(v)]
        if values:
            everything = np.concatenate(values)
            low, high = float(everything.min()), float(everything.max())
            bins = np.linspace(low, high if high > low else low + 1.0, 25)
            for name, scores in groups.items():
                if len(scores):
                    # Outlined, lightly filled: overlapping groups stay readable.
                    axes.hist(scores, bins=bins, histtype="stepfilled", alpha=0.25,
                              color=colours.get(name))
                    axes.hist(scores, bins=bins, histtype="step", linewidth=1.8,
                              color=colours.get(name), label=f"{name} (n={len(scores)})")
            axes.legend(fontsize=8)
        axes.set(title=title, xlabel="score", ylabel="predictions")
        axes.grid(alpha=0.3)
    figure.tight_layout()
    return _png(figure)


def _score_groups(predictions, solution) -> dict[str, np.ndarray]:
    groups = {"correct (landmark)": [], "wrong label (landmark)": [], "non-landmark": []}
    for image_id, prediction in predictions.items():
        if prediction is None or image_id not in solution:
            continue
        truth = solution[image_id]
        if not truth:
            groups["non-landmark"].append(prediction[1])
        elif prediction[0] in set(truth):
            groups["correct (landmark)"].append(prediction[1])
        else:
            groups["wrong label (landmark)"].append(prediction[1])
    return {name: np.array(values, np.float64) for name, values in groups.items()}


# ----------------------------------------------------------------------------- CLI

def _format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def format_table(report: dict) -> str:
    """A short text table: metrics (rows) for all images and per Usage (columns)."""
    columns = [("all", {**report, **report["counts"]})] + list(report["by_usage"].items())
    names = ["gap", "gap_landmarks_only", "gap_nn_only", "gap_nn_only_landmarks_only",
             "gap_knn_only", "gap_knn_only_landmarks_only", "top1_accuracy",
             "top1_accuracy_nn_only", "top1_accuracy_knn_only", "images", "landmark_images",
             "predictions"]
    names = [name for name in names if name in columns[0][1]]
    width = max(len(name) for name in names) + 2
    lines = ["metric".ljust(width) + "".join(title.rjust(10) for title, _ in columns)]
    for name in names:
        lines.append(name.ljust(width)
                     + "".join(_format_value(values.get(name)).rjust(10) for _, values in columns))
    return "\n".join(lines)


def format_retrieval_table(retrieval: dict) -> str:
    """mAP@100 and the query counts, for all scored queries and per Usage."""
    columns = [("all", {**retrieval, "queries": retrieval["counts"]["queries"]})]
    columns += list(retrieval["by_usage"].items())
    lines = ["retrieval".ljust(12) + "".join(title.rjust(10) for title, _ in columns)]
    for name in ("map_at_100", "queries"):
        lines.append(name.ljust(12) + "".join(_format_value(values.get(name)).rjust(10)
                                             for _, values in columns))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The ``landmarks-evaluate`` argument parser."""
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-evaluate", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example:\n"
               "  landmarks-evaluate --submission predict/submission.csv \\\n"
               "      --solution toy/test_solution.csv --scores predict/scores.csv "
               "--output_dir eval/\n"
               f"writes {REPORT_FILENAME}, {PRECISION_PLOT_FILENAME} and "
               f"{HISTOGRAM_PLOT_FILENAME}; all paths may be gs:// URLs.")
    parser.add_argument("--submission", default=None,
                        help="submission CSV id,landmarks as written by landmarks-predict "
                             "(default: none; required with --solution, and unless --retrieval "
                             "is given)")
    parser.add_argument("--solution", default=None,
                        help="solution CSV id,landmarks,Usage (GLDv2 form, e.g. "
                             "recognition_solution_v2.1.csv; empty landmarks = non-landmark) "
                             "(default: none; required with --submission)")
    parser.add_argument("--output_dir", required=True,
                        help=f"folder for {REPORT_FILENAME} and the plots (required)")
    parser.add_argument("--scores", default=None,
                        help="scores.csv of landmarks-predict: adds the classifier-only "
                             "metrics, and the kNN-only ones for a retrieval recognizer "
                             "(default: none)")
    parser.add_argument("--retrieval", default=None,
                        help="retrieval.csv of landmarks-predict --retrieval_index (id,images: "
                             "index ids, nearest first): reports mAP@100 (default: none; "
                             "required with --retrieval_solution)")
    parser.add_argument("--retrieval_solution", default=None,
                        help="GLDv2 retrieval solution CSV id,images,Usage (e.g. "
                             "retrieval_solution_v2.1.csv; images None = ignored query) "
                             "(default: none; required with --retrieval)")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> EvaluateConfig:
    """Command line -> :class:`EvaluateConfig` (``InputError`` for bad or unknown flags)."""
    return EvaluateConfig(**vars(build_parser().parse_args(argv)))


def _read(path: str, what: str) -> str:
    if not io_utils.exists(path):
        raise InputError(f"{what} file {path} does not exist")
    return io_utils.read_text(path)


def run(argv: Optional[Sequence[str]] = None) -> dict:
    """Reads the files, writes ``report.json`` and the plots, returns the report.

    Raises:
      InputError: bad or unknown flags, or a missing or malformed input (one-line message).
    """
    config = parse_args(argv)
    retrieval = None
    if config.retrieval:
        retrieval = retrieval_metrics.evaluate(_read(config.retrieval, "retrieval"),
                                               _read(config.retrieval_solution,
                                                     "retrieval solution"))
    if not config.submission:
        report = {"retrieval": retrieval, "inputs": dataclasses.asdict(config)}
        io_utils.write_json(io_utils.join(config.output_dir, REPORT_FILENAME), report)
        return report
    submission_text = _read(config.submission, "submission")
    solution_text = _read(config.solution, "solution")
    scores_text = _read(config.scores, "scores") if config.scores else None
    report = evaluate(submission_text, solution_text, scores_text)

    full_solution = submission_lib.parse_solution(solution_text)
    usage = submission_lib.parse_solution_usage(solution_text)
    solution = {i: labels for i, labels in full_solution.items() if usage[i] != "Ignored"}
    predictions = submission_lib.parse_submission(submission_text)
    curves = {"submission": ranked_correctness(predictions, solution)}
    panels = {"submission score": _score_groups(predictions, solution)}
    if scores_text is not None:
        scores = parse_scores(scores_text)
        if has_classifier_columns(scores):
            nn = nn_predictions(scores)
            curves["classifier only"] = ranked_correctness(nn, solution)
            panels["classifier confidence (nn_confidence)"] = _score_groups(nn, solution)
        knn = knn_predictions(scores)
        if knn is not None:
            curves["kNN only"] = ranked_correctness(knn, solution)
            panels["kNN score (knn_score)"] = _score_groups(knn, solution)

    io_utils.write_bytes(io_utils.join(config.output_dir, PRECISION_PLOT_FILENAME),
                         precision_plot(curves, report["counts"]["landmark_images"]))
    io_utils.write_bytes(io_utils.join(config.output_dir, HISTOGRAM_PLOT_FILENAME),
                         histogram_plot(panels))
    report["plots"] = [PRECISION_PLOT_FILENAME, HISTOGRAM_PLOT_FILENAME]
    if retrieval is not None:
        report["retrieval"] = retrieval
    report["inputs"] = dataclasses.asdict(config)
    io_utils.write_json(io_utils.join(config.output_dir, REPORT_FILENAME), report)
    for problem in report["submission_problems"]:
        logger.warning("submission: %s", problem)
    return report


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: prints the table; returns the exit code.

    0 done; 2 bad flags or input (one ``landmarks-evaluate: error:`` line); 1 an internal error
    (a bug: traceback logged), see :func:`beam_pipelines.cli.run_command`.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return cli.run_command("landmarks-evaluate", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    """Runs the evaluation and prints its table; the exit code of a run that got to its end."""
    report = run(argv)
    if "counts" in report:
        print(format_table(report))
    if report.get("retrieval") is not None:
        print(format_retrieval_table(report["retrieval"]))
    print(f"report: {io_utils.join(report['inputs']['output_dir'], REPORT_FILENAME)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
