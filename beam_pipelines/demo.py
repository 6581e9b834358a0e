"""``landmarks-demo``: the whole method, end to end, on the built-in toy data.

Stages (each one is the real job, called in this process with the flags a user would type)::

    1 toy data   landmarks-toy-data  -> <run_dir>/toy_data/
    2 ingest     landmarks-ingest    -> <run_dir>/ingest_train/ (train + dev, with distractors)
    3 ingest     landmarks-ingest    -> <run_dir>/ingest_test/  (test manifest, no labels)
    4 train      landmarks-train     -> <run_dir>/model/        (--preset quick)
    5 predict    landmarks-predict   -> <run_dir>/predict/      (crop voting + rescoring)
    6 evaluate   landmarks-evaluate  -> <run_dir>/evaluation/   (report.json, PNG plots)

With ``--compare true`` (the default) two more predict + evaluate pairs run on the same test set
and the same reference-feature cache (``<run_dir>/reference_features``, so local features are
not recomputed): the classifier on one view (``--crops 1`` -> ``predict_1view/``,
``evaluation_1view/``) and the kNN recognizer (``--recognizer knn`` -> ``predict_knn/``,
``evaluation_knn/``). The summary then compares five recognizers side by side: classifier on
one view, with crop voting, with crop voting + rescoring, kNN, kNN + rescoring.

The stage functions live in :mod:`beam_pipelines.stages`, shared with ``landmarks-benchmark``.

The run folder holds one run only: a rerun into a folder that an earlier demo wrote replaces it
(a folder that is not a demo run folder is refused, so nothing else is ever deleted). The
summary (``demo.json``, and a table on stdout) gives GAP with and without rescoring, top-1
accuracy, time per stage and where every output is.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from typing import Optional, Sequence

from beam_pipelines import cli, stages as stage_lib, toy_data
from tfrecords_schema import InputError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_LOG = logging.getLogger("landmarks-demo")
DEMO_MARKER = "demo.json"

# On top of the quick preset (3 x 15 head steps, 1 finetune epoch): 3 more finetune epochs of
# 15 steps cost ~10 s here and lift the toy dev GAP from ~0.5 to ~0.8, so that the demo shows
# rescoring on top of a classifier that works. Flags given to landmarks-demo come later and win.
# (The demo adds them under either preset.)
DEMO_TRAIN_FLAGS = stage_lib.QUICK_TRAIN_FLAGS


_TOY_DEFAULTS = toy_data.ToyDataConfig(output_dir="unused")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """What the demo runs. The defaults finish in a few minutes on 2 CPU cores."""

    run_dir: str = "runs/demo"
    # The toy set's size: landmarks-toy-data's own defaults, not a second copy of them.
    seed: int = _TOY_DEFAULTS.seed
    num_classes: int = _TOY_DEFAULTS.num_classes
    train_per_class: int = _TOY_DEFAULTS.train_per_class
    test_per_class: int = _TOY_DEFAULTS.test_per_class
    num_train_distractors: int = _TOY_DEFAULTS.num_train_distractors
    num_test_distractors: int = _TOY_DEFAULTS.num_test_distractors
    image_size: int = 96
    local_features: str = "default"
    crops: int = 22
    references_per_class: int = 32
    train_preset: str = "quick"
    compare: bool = True
    extra_train_flags: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.run_dir:
            raise InputError("--run_dir must not be empty")
        if self.image_size < 71:
            raise InputError(
                f"--image_size must be >= 71 (Xception's minimum), got {self.image_size}")
        for name in ("num_classes", "train_per_class", "test_per_class"):
            if getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1")


def build_parser() -> argparse.ArgumentParser:
    """The demo's own flags; defaults come from :class:`DemoConfig`."""
    defaults = DemoConfig()
    parser = cli.ErrorRaisingArgumentParser(
        prog="landmarks-demo", description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags not listed above go to landmarks-train (checked before the first stage; "
               "any other\nflag is refused), e.g. landmarks-demo --run_dir runs/demo "
               "--head_epochs 1 "
               "--finetune_epochs 0.\nThe Beam stages run locally with --runner=FnApiRunner.")
    default = " (default: %(default)s)"
    add = parser.add_argument
    add("--run_dir", default=defaults.run_dir,
        help="folder for every output; an earlier demo run there is replaced" + default)
    add("--seed", type=int, default=defaults.seed,
        help="seed of the toy data and of training" + default)
    helps = {
        "num_classes": "toy landmark classes (landmarks-toy-data --num_classes)",
        "train_per_class": "toy training views per class",
        **stage_lib.JOB_FLAG_HELP,
    }
    for name in ("num_classes", "train_per_class", "test_per_class", "num_train_distractors",
                 "num_test_distractors", "image_size", "crops", "references_per_class"):
        add(f"--{name}", type=int, default=getattr(defaults, name), help=helps[name] + default)
    add("--local_features", default=defaults.local_features,
        help=helps["local_features"] + default)
    add("--train_preset", default=defaults.train_preset, choices=("quick", "full"),
        help="landmarks-train --preset; full is the recipe and takes hours on a CPU" + default)
    add("--compare", type=cli.parse_bool, default=defaults.compare, metavar="true|false",
        help="also run predict + evaluate with one view and with --recognizer knn, and compare "
             "the five recognizers in a table" + " (default: true)")
    return parser



def parse_args(argv: Optional[Sequence[str]]) -> DemoConfig:
    """Command line -> :class:`DemoConfig`; the flags that are not the demo's are kept for
    ``landmarks-train`` and checked now, before any stage runs (:func:`check_train_flags`).

    Raises:
      InputError: a bad demo flag, or a flag that neither the demo nor landmarks-train knows.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    check_train_flags(extra, own_flags=cli.option_strings(parser), preset=args.train_preset)
    return DemoConfig(**{**vars(args), "extra_train_flags": tuple(extra)})


def check_train_flags(
    train_flags: Sequence[str], own_flags: Sequence[str] = (), preset: str = "quick"
) -> None:
    """Checks flags meant for ``landmarks-train`` as its parser and config would, under the
    demo's ``preset`` and with placeholder paths (nothing is read): unknown flags (suggestion
    from the demo's and the trainer's flags), bad values, values that do not fit together
    (:func:`beam_pipelines.stages.check_train_flags` after :data:`DEMO_TRAIN_FLAGS`).

    Raises:
      InputError: one line naming the problem.
    """
    stage_lib.check_train_flags(train_flags, own_flags, preset, base_flags=DEMO_TRAIN_FLAGS)


def _prepare_run_dir(run_dir: str) -> None:
    """Empties a folder an earlier demo wrote; refuses any other non-empty folder."""
    if os.path.isdir(run_dir) and os.listdir(run_dir):
        if not os.path.exists(os.path.join(run_dir, DEMO_MARKER)):
            raise InputError(
                f"{run_dir} is not empty and was not written by landmarks-demo; "
                "choose another --run_dir"
            )
        _LOG.info("replacing the earlier demo run in %s", run_dir)
        shutil.rmtree(run_dir)
    os.makedirs(run_dir, exist_ok=True)


_Stage = stage_lib.Stage


def _run_stage(stages: list, number: int, name: str, action, total: int = 6):
    return stage_lib.run_stage(stages, f"[{number}/{total}]", name, action, logger=_LOG)


_OUTPUT_FOLDERS = ("toy_data", "ingest_train", "ingest_test", "model", "predict", "evaluation",
                   "predict_1view", "evaluation_1view", "predict_knn", "evaluation_knn",
                   "reference_features")


def run(config: DemoConfig) -> dict:
    """Runs the six stages (ten with ``compare``); returns the summary written to ``demo.json``."""
    _prepare_run_dir(config.run_dir)
    paths = {name: os.path.join(config.run_dir, name) for name in _OUTPUT_FOLDERS}
    # Marks the folder as a demo folder from the start, so a crashed demo can be rerun in place.
    _write_marker(config.run_dir, {"status": "running", "config": dataclasses.asdict(config)})
    stages: list[_Stage] = []
    total_start = time.perf_counter()
    steps = _DemoStages(config, stages, total=10 if config.compare else 6)
    train_summary, report = steps.main_stages()
    views = predict_views_per_image(paths["predict"])
    comparison = steps.comparison(report, views, paths) if config.compare else None
    summary = {
        "status": "done",
        "config": dataclasses.asdict(config),
        **_figures(report, train_summary),
        "views_per_image": views,
        "comparison": comparison,
        "seconds_total": round(time.perf_counter() - total_start, 1),
        "stages": [dataclasses.asdict(stage) for stage in stages],
        "outputs": _outputs(paths, report, config.compare),
    }
    _write_marker(config.run_dir, summary, sort_keys=True)
    return summary


class _DemoStages:
    """The demo's stages as the user would run them, numbered ``[n/total]`` in ``stages``."""

    def __init__(self, config: DemoConfig, stages: list, total: int):
        self.config, self.stages, self.total = config, stages, total
        self.root = config.run_dir

    def main_stages(self) -> tuple[dict, dict]:
        """Stages 1-6, toy data to evaluation; ``(train summary, evaluation report)``."""
        self._run(1, "toy data", self.make_toy_data)
        self._run(2, "ingest train", lambda: stage_lib.ingest_train(self.root))
        self._run(3, "ingest test", lambda: stage_lib.ingest_test(self.root))
        train_summary = self._run(4, "train", self.train_model)
        self._run(5, "predict", self.predict_test)
        report = self._run(6, "evaluate", self.evaluate_submission)
        return train_summary, report

    def comparison(self, report: dict, views: int, paths: dict) -> list:
        """Stages 7-10: one view, then the kNN recognizer; the five recognizers' rows."""
        self._run(7, "predict 1 view", lambda: self.predict_test("predict_1view", crops=1))
        one_view_report = self._run(
            8, "evaluate 1 view",
            lambda: self.evaluate_submission("predict_1view", "evaluation_1view"))
        self._run(9, "predict knn",
                  lambda: self.predict_test("predict_knn", extra=("--recognizer", "knn")))
        knn_report = self._run(
            10, "evaluate knn", lambda: self.evaluate_submission("predict_knn", "evaluation_knn"))
        knn_k = _recorded_config(paths["predict_knn"], "knn_k")
        return comparison_rows(report, one_view_report, knn_report, views, knn_k)

    def make_toy_data(self):
        config = self.config
        return stage_lib.make_toy_data(self.root, config.seed, [
            "--num_classes", str(config.num_classes),
            "--train_per_class", str(config.train_per_class),
            "--test_per_class", str(config.test_per_class),
            "--num_train_distractors", str(config.num_train_distractors),
            "--num_test_distractors", str(config.num_test_distractors),
        ])

    def train_model(self):
        config = self.config
        return stage_lib.train_model(
            self.root, config.train_preset, config.image_size, config.seed,
            [*DEMO_TRAIN_FLAGS, *config.extra_train_flags])

    def predict_test(self, output: str = "predict", extra: Sequence[str] = (), crops: int = 0):
        config = self.config
        return stage_lib.predict_test(self.root, output, config.local_features,
                                      config.references_per_class, crops or config.crops, extra)

    def evaluate_submission(self, predicted: str = "predict", output: str = "evaluation"):
        return stage_lib.evaluate_submission(self.root, predicted, output)

    def _run(self, number: int, name: str, action):
        return _run_stage(self.stages, number, name, action, self.total)


def _figures(report: dict, train_summary: dict) -> dict:
    """The summary's figures: GAP and top-1 from evaluate, dev GAP from training."""
    return {
        "gap": report.get("gap"),
        "gap_nn_only": report.get("gap_nn_only"),
        "gap_landmarks_only": report.get("gap_landmarks_only"),
        "top1_accuracy": report.get("top1_accuracy"),
        "top1_accuracy_nn_only": report.get("top1_accuracy_nn_only"),
        "dev_gap_initial": train_summary.get("dev_gap_initial"),
        "dev_gap_final": train_summary.get("dev_gap_final"),
    }


def _outputs(paths: dict, report: dict, compare: bool) -> dict:
    """Where the summary's outputs are (the comparison's too with ``compare``)."""
    outputs = {
        "report": os.path.join(paths["evaluation"], "report.json"),
        "plots": [os.path.join(paths["evaluation"], name) for name in report.get("plots", [])],
        "submission": os.path.join(paths["predict"], "submission.csv"),
        "scores": os.path.join(paths["predict"], "scores.csv"),
        "model": os.path.join(paths["model"], "model.keras"),
        "train_records": paths["ingest_train"],
        "test_records": paths["ingest_test"],
        "toy_data": paths["toy_data"],
    }
    if compare:
        outputs.update({"report_1view": os.path.join(paths["evaluation_1view"], "report.json"),
                        "report_knn": os.path.join(paths["evaluation_knn"], "report.json"),
                        "ref_features": paths["reference_features"]})
    return outputs


def _write_marker(run_dir: str, content: dict, sort_keys: bool = False) -> None:
    """``demo.json``: the demo's marker (a run in progress) and, at the end, its summary."""
    with open(os.path.join(run_dir, DEMO_MARKER), "w") as handle:
        json.dump(content, handle, indent=2, sort_keys=sort_keys)


# Shared with landmarks-benchmark (beam_pipelines.stages); kept under their names here.
INGEST_STATS_KEYS = stage_lib.INGEST_STATS_KEYS
predict_views_per_image = stage_lib.predict_views_per_image
_fmt = stage_lib.fmt
_required = stage_lib.required
_ingest_detail = stage_lib.ingest_detail
_recorded_config = stage_lib.recorded_config


def comparison_rows(report: dict, one_view: dict, knn: dict, views: int, knn_k: int) -> list:
    """The five recognizers on the same test set, from three ``report.json`` of evaluate:
    ``{"recognizer", "gap", "gap_landmarks_only", "top1_accuracy"}`` per row (None where a
    report lacks the figure)."""
    voting = voting_label(views)

    def infix(prefix):
        return f"_{prefix}_only" if prefix else ""

    rows = [("classifier, 1 view", one_view, "nn"), (f"classifier, {voting}", report, "nn"),
            (f"classifier, {voting} + rescoring", report, ""), (f"knn (k={knn_k})", knn, "knn"),
            ("knn + rescoring", knn, "")]
    return [{"recognizer": label, "gap": source.get(f"gap{infix(prefix)}"),
             "gap_landmarks_only": source.get(f"gap{infix(prefix)}_landmarks_only"),
             "top1_accuracy": source.get(f"top1_accuracy{infix(prefix)}")}
            for label, source, prefix in rows]


def format_comparison(rows: Sequence[dict]) -> list[str]:
    """The comparison table's lines ("-" where evaluate gives no figure) and the winner line."""
    width = max(len("recognizer"), *(len(row["recognizer"]) for row in rows))

    def cell(value):
        return "-" if value is None else f"{value:.4f}"

    lines = [f"  {'recognizer':<{width}}  {'GAP':<6}  {'GAP landmarks':<13}  top-1"]
    lines += [f"  {row['recognizer']:<{width}}  {cell(row['gap']):<6}  "
              f"{cell(row['gap_landmarks_only']):<13}  {cell(row['top1_accuracy'])}"
              for row in rows]
    scored = [row for row in rows if row["gap"] is not None]
    if scored:
        best = max(row["gap"] for row in scored)
        winners = [row["recognizer"] for row in scored if row["gap"] == best]
        lines.append(f"  best GAP on this run: {' = '.join(winners)} ({best:.4f})")
    return lines


def voting_label(views: int) -> str:
    """How the classifier-only GAP was voted: ``"22-crop voting"``, or one view without voting."""
    return "1 view, no voting" if views == 1 else f"{views}-crop voting"


def format_table(summary: dict) -> str:
    """The final table shown to the user."""
    voting = voting_label(_required(summary, "views_per_image", "the demo summary"))
    results = [
        (f"GAP, classifier alone ({voting})", _fmt(summary["gap_nn_only"])),
        ("GAP, after local-feature rescoring", _fmt(summary["gap"])),
        ("GAP over landmark images only", _fmt(summary["gap_landmarks_only"])),
        ("top-1 accuracy (landmark images)", _fmt(summary["top1_accuracy"])),
        ("dev GAP at init -> after training",
         f"{_fmt(summary['dev_gap_initial'])} -> {_fmt(summary['dev_gap_final'])}"),
    ]
    width = max(len(label) for label, _ in results)
    lines = [
        "",
        "landmarks-demo: results on the toy test set",
        *(f"  {label:<{width}} : {value}" for label, value in results),
    ]
    if summary.get("comparison"):
        lines += ["", "recognizers compared on the same test set", *format_comparison(
            summary["comparison"])]
    lines += [
        "",
        "  stage            seconds",
    ]
    lines += [f"  {stage['name']:<16} {stage['seconds']:7.1f}" for stage in summary["stages"]]
    lines += [f"  {'total':<16} {summary['seconds_total']:7.1f}", "", "  outputs:"]
    for name, path in summary["outputs"].items():
        if isinstance(path, list):
            lines += [f"    {'plot':<14} {item}" for item in path]
        elif path:
            lines.append(f"    {name:<14} {path}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: prints the results table; returns the exit code.

    0 done; 2 bad flags or input (one ``landmarks-demo: error:`` line); 3 training diverged;
    1 an internal error, a stage that failed for another reason included (a bug: traceback
    logged). See :func:`beam_pipelines.cli.run_command`.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return cli.run_command("landmarks-demo", lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    """Parses, runs the stages (see :func:`run`), prints the tables; returns 0."""
    summary = run(parse_args(argv))
    print(format_table(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
