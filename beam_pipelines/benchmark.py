"""``landmarks-benchmark``: which recognizer is better on data like mine? Mean ± sd over seeds.

Usage::

    landmarks-benchmark --output_dir runs/bench [--seeds 0,1,2]
        [--recognizers classifier,knn,knn+classifier] [--rerank_top 1,3,5]
        [--difficulty hard|standard]
        [--scenes_dir DIR] [toy-data size flags] [--image_size 96] [--crops 22]
        [--train_preset quick] [--overwrite] [landmarks-train flags]

For each seed S, the real jobs run in this process with the flags a user would type (the stage
functions of :mod:`beam_pipelines.stages`; the Beam stages on the local ``FnApiRunner``)::

    toy data   landmarks-toy-data --seed S      -> seed_S/toy_data/
    ingest     landmarks-ingest                 -> seed_S/ingest_train/ (train + dev, distractors)
    ingest     landmarks-ingest                 -> seed_S/ingest_test/
    train      landmarks-train --seed S         -> seed_S/model/        (once per seed)
    then for each recognizer R (folder name: R with "+" as "_"; the classifier once per K of
    --rerank_top, folder classifier_topK for K > 1):
    predict    landmarks-predict --recognizer R [--rerank_top K] -> seed_S/predict_R/
    evaluate   landmarks-evaluate               -> seed_S/evaluation_R/ (report.json)

All predict runs of a seed share one reference-feature cache, ``seed_S/reference_features``.

Methods (the rows of the table), two per recognizer, read from its ``report.json``
(:class:`Method`): its answer before local-feature rescoring ("R (no rescoring)": the
classifier's crop voting, ``gap_nn_only``...; the kNN recognizers' neighbour vote,
``gap_knn_only``...) and its final answer ("R + rescoring": ``gap``...). The classifier with
``--rerank_top K > 1`` adds one row, its final answer ("classifier, top K verified +
rescoring"); its answer before rescoring is the crop vote, the row of K = 1. Columns: GAP, top-1
accuracy and GAP over landmark images only, each as mean ± sample sd (ddof=1; "n/a" with one
seed) over the seeds, and the number of seeds. A figure that evaluate does not give is "n/a".

Outputs in ``--output_dir``: ``seed_S/`` (every stage's folder), ``benchmark.json`` (config,
per-seed metrics and stage timings, the table), ``table.md`` (ready to paste, with the exact
command), ``table.csv``, ``benchmark.png`` (mean GAP bars with sd error bars, one dot per
seed), and ``_SUCCESS``, written last. ``benchmark.json`` is written first (status
``running``): it marks the folder as a benchmark folder, which ``--overwrite`` may replace; any
other non-empty folder is refused, so nothing else is ever deleted.

Exit codes: 0 done; 2 bad flags or input (one ``landmarks-benchmark: error:`` line); the code
of a stage that failed for a known reason (3 training diverged, 4 a job did not do its work),
with a line naming the seed and the stage; 1 a bug (traceback logged). No ``_SUCCESS`` unless
every stage of every seed ran.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import shlex
import shutil
import sys
import time
from typing import Mapping, Optional, Sequence

from beam_pipelines import cli, stages as stage_lib, toy_data
from beam_pipelines.predict.config import DEFAULT_RERANK_TOP
from beam_pipelines.predict.elements import RECOGNIZERS
from tfrecords_schema import InputError
from trainer.cli import CommandFailure, first_line, flag_name, is_input_error

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROG = "landmarks-benchmark"
_LOG = logging.getLogger(PROG)

MARKER = "benchmark.json"
WRITTEN_BY = PROG  # the marker's "written_by": what makes a folder ours
TABLE_MD = "table.md"
TABLE_CSV = "table.csv"
PLOT = "benchmark.png"
SUCCESS = "_SUCCESS"

DIFFICULTIES = tuple(toy_data.DIFFICULTIES)  # landmarks-toy-data --difficulty

# Metrics of a row: report.json key of the final answer, and the column's title.
METRICS = (("gap", "GAP"), ("top1_accuracy", "top-1 accuracy"),
           ("gap_landmarks_only", "GAP landmarks only"))

# Whose answer a recognizer gives before rescoring, as evaluate names it (gap_<name>_only...):
# the classifier's crop voting (nn_label, nn_confidence); the kNN recognizers' neighbour vote
# (knn_label, knn_score; for knn+classifier the votes weighted by the classifier).
STAGE1_ANSWER = {"classifier": "nn", "knn": "knn", "knn+classifier": "knn"}

# Flags of landmarks-train that the benchmark sets itself (per seed, from its own flags).
TRAIN_FLAGS_SET_HERE = {
    "--seed": "it is each seed of --seeds", "--image_size": "use the benchmark's --image_size",
    "--preset": "use --train_preset", "--train_data": "the benchmark's ingest writes it",
    "--dev_data": "the benchmark's ingest writes it", "--label_map": "the benchmark's ingest "
    "writes it", "--model_dir": "it is seed_S/model",
}

_TOY_DEFAULTS = toy_data.ToyDataConfig(output_dir="unused")  # the sizes without a preset
TOY_SIZE_FIELDS = ("num_classes", "train_per_class", "test_per_class", "num_train_distractors",
                   "num_test_distractors", "min_size", "max_size")


@dataclasses.dataclass(frozen=True)
class BenchmarkConfig:
    """What the benchmark runs (written to ``benchmark.json``; :meth:`from_json_dict` reads it)."""

    output_dir: str
    seeds: tuple[int, ...] = (0, 1, 2)
    recognizers: tuple[str, ...] = RECOGNIZERS
    rerank_top: tuple[int, ...] = tuple(dict.fromkeys((1, DEFAULT_RERANK_TOP)))
    difficulty: str = "hard"
    scenes_dir: Optional[str] = None
    # The toy set's size: landmarks-toy-data's own defaults, not a second copy of them. None:
    # not passed, landmarks-toy-data decides (6 classes, or all of --scenes_dir's; the training
    # views per class of --difficulty).
    num_classes: Optional[int] = None
    train_per_class: Optional[int] = None
    test_per_class: int = _TOY_DEFAULTS.test_per_class
    num_train_distractors: int = _TOY_DEFAULTS.num_train_distractors
    num_test_distractors: int = _TOY_DEFAULTS.num_test_distractors
    min_size: int = _TOY_DEFAULTS.min_size
    max_size: int = _TOY_DEFAULTS.max_size
    image_size: int = 96
    crops: int = 22
    references_per_class: int = 32
    local_features: str = "default"
    train_preset: str = "quick"
    overwrite: bool = False
    extra_train_flags: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.output_dir:
            raise InputError("--output_dir must not be empty")
        if "://" in self.output_dir:
            raise InputError(f"--output_dir must be a local folder, got {self.output_dir}")
        if not self.seeds:
            raise InputError("--seeds needs at least one seed")
        negative = [seed for seed in self.seeds if seed < 0]
        if negative:
            raise InputError(f"--seeds must be >= 0, got {negative[0]}")
        repeated = sorted({seed for seed in self.seeds if self.seeds.count(seed) > 1})
        if repeated:
            raise InputError(f"--seeds must be unique, {repeated[0]} is given twice")
        if not self.recognizers:
            raise InputError("--recognizers needs at least one recognizer")
        for recognizer in self.recognizers:
            if recognizer not in RECOGNIZERS:
                raise InputError(f"--recognizers: unknown recognizer {recognizer!r} (known: "
                                 f"{', '.join(RECOGNIZERS)})")
            if self.recognizers.count(recognizer) > 1:
                raise InputError(f"--recognizers must be unique, {recognizer} is given twice")
        if not self.rerank_top:
            raise InputError("--rerank_top needs at least one K")
        for k in self.rerank_top:
            if k < 1:
                raise InputError(f"--rerank_top must be >= 1, got {k}")
            if self.rerank_top.count(k) > 1:
                raise InputError(f"--rerank_top must be unique, {k} is given twice")
        if self.difficulty not in DIFFICULTIES:
            raise InputError(f"--difficulty must be one of {', '.join(DIFFICULTIES)}, got "
                             f"{self.difficulty!r}")
        if self.image_size < 71:
            raise InputError(
                f"--image_size must be >= 71 (Xception's minimum), got {self.image_size}")
        for name in ("num_classes", "train_per_class", "test_per_class"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise InputError(f"--{name} must be >= 1")
        if self.scenes_dir is not None and _inside(self.scenes_dir, self.output_dir):
            raise InputError("--scenes_dir lies inside --output_dir, which --overwrite empties; "
                             "keep inputs elsewhere")

    @classmethod
    def from_json_dict(cls, values: Mapping) -> "BenchmarkConfig":
        """The config from its ``dataclasses.asdict`` form, as read back from JSON."""
        values = dict(values)
        values.setdefault("rerank_top", (1,))  # a benchmark.json written before the flag
        for name in ("seeds", "recognizers", "rerank_top", "extra_train_flags"):
            values[name] = tuple(values[name])
        return cls(**values)


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


# ---------------------------------------------------------------------------------------------
# Flags.


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)`` (for ``type=``; range and uniqueness: the config)."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        return tuple(int(part) for part in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, e.g. 0,1,2, got {text!r}") from None


def parse_recognizers(text: str) -> tuple[str, ...]:
    """``"classifier,knn"`` -> ``("classifier", "knn")`` (checked by the config)."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's own flags; defaults come from :class:`BenchmarkConfig`."""
    defaults = BenchmarkConfig(output_dir="unused")
    parser = cli.ErrorRaisingArgumentParser(
        prog=PROG, description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Flags not listed above go to landmarks-train (checked before the first stage; "
               "any other\nflag is refused), e.g. landmarks-benchmark --output_dir runs/bench "
               "--head_epochs 1.\nThe Beam stages run locally with --runner=FnApiRunner.\n"
               "exit status: 0 done, 2 bad flags or input, 3 training diverged, 4 a job did not "
               "do its work,\n1 internal error (a bug: traceback logged).")
    default = " (default: %(default)s)"
    add = parser.add_argument
    add("--output_dir", required=True,
        help="folder for every output; an earlier benchmark there is replaced only with "
             "--overwrite, any other non-empty folder is refused (required)")
    add("--seeds", type=parse_seeds, default=",".join(map(str, defaults.seeds)),
        help="comma-separated seeds, unique, >= 0: each gives its own toy data and its own "
             "trained model" + default)
    add("--recognizers", type=parse_recognizers, default=",".join(defaults.recognizers),
        help=f"comma-separated recognizers of landmarks-predict to compare, from "
             f"{', '.join(RECOGNIZERS)}" + default)
    add("--rerank_top", type=parse_seeds, default=",".join(map(str, defaults.rerank_top)),
        help="comma-separated K of landmarks-predict --rerank_top for the classifier "
             "recognizer, each a row (1 = the recipe, the baseline)" + default)
    add("--difficulty", default=defaults.difficulty, choices=DIFFICULTIES,
        help="landmarks-toy-data --difficulty" + default)
    add("--scenes_dir", default=defaults.scenes_dir,
        help="landmarks-toy-data --scenes_dir: your own photos as the landmark scenes "
             "(default: the scikit-image photos)")
    add("--num_classes", type=int, default=None,
        help="toy landmark classes (landmarks-toy-data --num_classes) (default: "
             f"{toy_data.DEFAULT_NUM_CLASSES}; with --scenes_dir: all of its classes)")
    add("--train_per_class", type=int, default=None,
        help="toy training views per class (default: that of --difficulty: " + ", ".join(
            f"{name} {preset.train_per_class}" for name, preset in toy_data.DIFFICULTIES.items())
        + ")")
    helps = {
        "min_size": "smallest long side of a toy image, pixels",
        "max_size": "largest long side of a toy image, pixels",
        **{name: text for name, text in stage_lib.JOB_FLAG_HELP.items()
           if name != "local_features"},
    }
    for name in ("test_per_class", "num_train_distractors", "num_test_distractors",
                 "min_size", "max_size", "image_size", "crops", "references_per_class"):
        add(f"--{name}", type=int, default=getattr(defaults, name),
            help=helps[name] + default)
    add("--local_features", default=defaults.local_features,
        help=stage_lib.JOB_FLAG_HELP["local_features"] + default)
    add("--train_preset", default=defaults.train_preset, choices=("quick", "full"),
        help="landmarks-train --preset; full is the recipe and takes hours on a CPU per seed"
             + default)
    add("--overwrite", action="store_true",
        help="replace an earlier benchmark in --output_dir (default: off, it is refused)")
    return parser


def parse_args(argv: Optional[Sequence[str]]) -> BenchmarkConfig:
    """Command line -> :class:`BenchmarkConfig`. Everything is checked now, before any stage
    runs: the benchmark's flags, the toy-data and predict values they become, and the flags
    that are not the benchmark's (for ``landmarks-train``, :func:`check_train_flags`).

    Raises:
      InputError: one line naming the problem.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(None if argv is None else list(argv))
    config = BenchmarkConfig(**{**vars(args), "extra_train_flags": tuple(extra)})
    check_train_flags(extra, own_flags=cli.option_strings(parser), preset=config.train_preset,
                      image_size=config.image_size)
    check_job_values(config)
    return config


def train_base_flags(preset: str) -> tuple[str, ...]:
    """What the benchmark adds to ``landmarks-train`` before the user's flags: the demo's extra
    finetuning under the quick preset (:data:`beam_pipelines.stages.QUICK_TRAIN_FLAGS`), so
    that rescoring is measured on a classifier that works; nothing under the full recipe."""
    return stage_lib.QUICK_TRAIN_FLAGS if preset == "quick" else ()


def check_train_flags(train_flags: Sequence[str], own_flags: Sequence[str] = (),
                      preset: str = "quick", image_size: int = 96) -> None:
    """Checks the flags meant for ``landmarks-train`` (as the demo does), and refuses those the
    benchmark sets itself (:data:`TRAIN_FLAGS_SET_HERE`).

    Raises:
      InputError: one line naming the problem.
    """
    for argument in train_flags:
        name = flag_name(argument) if argument.startswith("--") else None
        if name in TRAIN_FLAGS_SET_HERE:
            raise InputError(f"{name} is set by {PROG}: {TRAIN_FLAGS_SET_HERE[name]}")
    stage_lib.check_train_flags(
        train_flags, own_flags, preset,
        base_flags=("--image_size", str(image_size), *train_base_flags(preset)))


def toy_flags(config: BenchmarkConfig) -> list[str]:
    """The flags of ``landmarks-toy-data`` (all but ``--output_dir`` and ``--seed``)."""
    flags = []
    for name in TOY_SIZE_FIELDS:
        if getattr(config, name) is not None:
            flags += [f"--{name}", str(getattr(config, name))]
    flags += ["--difficulty", config.difficulty]
    if config.scenes_dir:
        flags += ["--scenes_dir", config.scenes_dir]
    return flags


def predict_flags(recognizer: str, rerank_top: int = 1) -> tuple[str, ...]:
    """What a recognizer's predict run adds to the shared predict flags (the classifier's K
    always explicit, so that K = 1 is the recipe whatever the default)."""
    if recognizer == "classifier":
        return ("--recognizer", recognizer, "--rerank_top", str(rerank_top))
    return ("--recognizer", recognizer)


@dataclasses.dataclass(frozen=True)
class Variant:
    """One predict run of a seed: a recognizer, and the classifier's ``--rerank_top``."""

    recognizer: str
    rerank_top: int = 1

    @property
    def folder(self) -> str:
        """``classifier``, ``classifier_top3``, ``knn``, ``knn_classifier``."""
        suffix = f"_top{self.rerank_top}" if self.rerank_top > 1 else ""
        return recognizer_dir(self.recognizer) + suffix

    @property
    def label(self) -> str:
        return (f"{self.recognizer} (--rerank_top {self.rerank_top})"
                if self.recognizer == "classifier" else self.recognizer)


def variants_for(config: BenchmarkConfig) -> list[Variant]:
    """The predict runs of a seed, in order: per recognizer, the classifier once per K."""
    return [Variant(recognizer, k) for recognizer in config.recognizers
            for k in (config.rerank_top if recognizer == "classifier" else (1,))]


def check_job_values(config: BenchmarkConfig) -> None:
    """Checks the values the benchmark hands to landmarks-toy-data and landmarks-predict as
    their own configs would, with placeholder paths (nothing is read or written).

    Raises:
      InputError: one line naming the problem.
    """
    from beam_pipelines.predict import config as predict_config

    if config.scenes_dir is not None and not os.path.isdir(config.scenes_dir):
        raise InputError(f"--scenes_dir {config.scenes_dir} is not a folder")
    try:
        toy_data.parse_args(["--output_dir", "unused", "--seed", str(config.seeds[0]),
                             *toy_flags(config)])
    except InputError as error:
        raise InputError(f"toy data: {first_line(error)}") from error
    for recognizer in config.recognizers:
        try:
            predict_config.PredictConfig(
                model=os.path.join("unused", "model", "model.keras"), test_data="unused",
                reference_data="unused", output_dir=os.path.join("unused", "predict"),
                local_features=config.local_features,
                references_per_class=config.references_per_class, crops=config.crops,
                recognizer=recognizer,
                rerank_top=max(config.rerank_top) if recognizer == "classifier" else 0)
        except InputError as error:
            raise InputError(f"predict: {first_line(error)}") from error


def command_line(config: BenchmarkConfig) -> list[str]:
    """The flags that reproduce ``config`` (every value explicit; ``--overwrite`` left out)."""
    argv = ["--output_dir", config.output_dir, "--seeds", ",".join(map(str, config.seeds)),
            "--recognizers", ",".join(config.recognizers),
            "--rerank_top", ",".join(map(str, config.rerank_top)),
            "--difficulty", config.difficulty]
    if config.scenes_dir:
        argv += ["--scenes_dir", config.scenes_dir]
    for name in (*TOY_SIZE_FIELDS, "image_size", "crops", "references_per_class"):
        if getattr(config, name) is not None:
            argv += [f"--{name}", str(getattr(config, name))]
    argv += ["--local_features", config.local_features, "--train_preset", config.train_preset,
             *config.extra_train_flags]
    return argv


def command_text(config: BenchmarkConfig) -> str:
    """``landmarks-benchmark <flags>``, quoted for a POSIX shell."""
    return shlex.join([PROG, *command_line(config)])


# ---------------------------------------------------------------------------------------------
# Methods and their figures.


@dataclasses.dataclass(frozen=True)
class Method:
    """One row of the table: a recognizer's answer before rescoring, or its final answer."""

    recognizer: str
    rescoring: bool
    rerank_top: int = 1

    @property
    def name(self) -> str:
        if self.rerank_top > 1:
            return f"{self.recognizer}, top {self.rerank_top} verified + rescoring"
        return f"{self.recognizer} + rescoring" if self.rescoring else (
            f"{self.recognizer} (no rescoring)")

    def report_key(self, metric: str) -> str:
        """The key of ``report.json`` that holds ``metric`` (a key of :data:`METRICS`) for this
        method: ``gap`` for the final answer, ``gap_nn_only`` / ``gap_knn_only`` before
        rescoring (``..._only_landmarks_only``, ``top1_accuracy_..._only`` likewise)."""
        if self.rescoring:
            return metric
        only = f"{STAGE1_ANSWER[self.recognizer]}_only"
        if metric == "gap_landmarks_only":
            return f"gap_{only}_landmarks_only"
        return f"{metric}_{only}"


def methods_for(recognizers: Sequence[str], rerank_top: Sequence[int] = (1,)) -> list[Method]:
    """The rows, in order: per recognizer, without then with rescoring; the classifier's final
    answer once per K of ``rerank_top`` (its answer before rescoring, the crop vote, once)."""
    return [method for recognizer in recognizers
            for method in variant_methods(recognizer, rerank_top)]


def variant_methods(recognizer: str, rerank_top: Sequence[int] = (1,),
                    first: bool = True) -> list[Method]:
    """The rows of one recognizer (every K of ``rerank_top``, the classifier), or with one
    K of it: the row "(no rescoring)" only for the ``first`` K."""
    if recognizer != "classifier":
        return [Method(recognizer, False), Method(recognizer, True)]
    rows = [Method(recognizer, False)] if first else []
    return rows + [Method(recognizer, True, int(k)) for k in rerank_top]


def method_metrics(report: Mapping, method: Method) -> dict[str, Optional[float]]:
    """``{metric: value}`` of ``method`` from one ``report.json``; None where the report does
    not give it (never filled in from another key)."""
    return {metric: report.get(method.report_key(metric)) for metric, _ in METRICS}


def mean_sd(values: Sequence[Optional[float]]) -> dict:
    """``{"mean", "sd", "n", "values"}`` over seeds; ``sd`` is the sample standard deviation
    (ddof=1), None for one value; both None when a value is missing (None)."""
    import numpy as np

    values = list(values)
    mean = sd = None
    if values and all(value is not None for value in values):
        array = np.asarray(values, np.float64)
        mean = float(array.mean())
        sd = float(array.std(ddof=1)) if len(array) > 1 else None
    return {"mean": mean, "sd": sd, "n": len(values), "values": values}


def baseline_method(methods: Sequence[Method]) -> Method:
    """The row the others are compared with, seed by seed: the recipe ("classifier +
    rescoring") when it is in the table, else the first row."""
    recipe = Method("classifier", True)
    return recipe if recipe in methods else methods[0]


def paired_gap_difference(per_seed, method: Method, baseline: Method) -> dict:
    """``mean_sd`` of ``GAP(method) - GAP(baseline)`` over the seeds (each seed's pair shares
    its data and model, so the seed-to-seed spread of the data cancels), plus ``wins``: the
    seeds where ``method`` has the higher GAP (None when a value is missing)."""
    values = []
    for seed in per_seed:
        mine, theirs = seed[method.name]["gap"], seed[baseline.name]["gap"]
        values.append(None if mine is None or theirs is None else mine - theirs)
    summary = mean_sd(values)
    summary["wins"] = (None if any(value is None for value in values)
                       else sum(1 for value in values if value > 0))
    return summary


def aggregate(per_seed: Sequence[Mapping[str, Mapping[str, Optional[float]]]],
              methods: Sequence[Method]) -> list[dict]:
    """The table: one row per method, ``{"method", "recognizer", "rescoring", "n_seeds",
    <metric>: mean_sd(...), "gap_vs_baseline": paired_gap_difference(...), "baseline"}``,
    from each seed's ``{method name: {metric: value}}``."""
    rows = []
    baseline = baseline_method(methods)
    for method in methods:
        row = {"method": method.name, "recognizer": method.recognizer,
               "rescoring": method.rescoring, "n_seeds": len(per_seed)}
        for metric, _ in METRICS:
            row[metric] = mean_sd([seed[method.name][metric] for seed in per_seed])
        row["baseline"] = baseline.name
        row["gap_vs_baseline"] = paired_gap_difference(per_seed, method, baseline)
        rows.append(row)
    return rows


def format_paired(summary: Mapping, is_baseline: bool, digits: int = 4) -> str:
    """``+0.1470 ± 0.0529 (3/3)``: mean ± sd of the paired GAP difference and the seeds won."""
    if is_baseline:
        return "(baseline)"
    if summary["mean"] is None:
        return "n/a"
    sd = "n/a" if summary["sd"] is None else f"{summary['sd']:.{digits}f}"
    return f"{summary['mean']:+.{digits}f} ± {sd} ({summary['wins']}/{summary['n']})"


def format_mean_sd(summary: Mapping, digits: int = 4) -> str:
    """``0.8123 ± 0.0210``; ``0.8123 ± n/a`` with one seed; ``n/a`` without a mean."""
    if summary["mean"] is None:
        return "n/a"
    sd = "n/a" if summary["sd"] is None else f"{summary['sd']:.{digits}f}"
    return f"{summary['mean']:.{digits}f} ± {sd}"


def markdown_table(rows: Sequence[Mapping]) -> list[str]:
    """The table in Markdown, columns padded so that it also reads as plain text."""
    baseline = rows[0]["baseline"] if rows else ""
    header = ["method", *(title for _, title in METRICS), f"GAP - {baseline}, paired (wins)",
              "seeds"]
    body = [[row["method"], *(format_mean_sd(row[metric]) for metric, _ in METRICS),
             format_paired(row["gap_vs_baseline"], row["method"] == row["baseline"]),
             str(row["n_seeds"])] for row in rows]
    widths = [max(len(line[column]) for line in [header, *body]) for column in range(len(header))]

    def line(cells):
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    rule = "|" + "|".join(
        ":" + "-" * (width + 1) if column == 0 else "-" * (width + 1) + ":"
        for column, width in enumerate(widths)) + "|"
    return [line(header), rule, *(line(cells) for cells in body)]


def stage1_description(recognizer: str, views: int, knn_k: Optional[int]) -> str:
    """What a recognizer's "(no rescoring)" row is."""
    k = f"k={knn_k}" if knn_k else "k"
    if recognizer == "classifier":
        return ("classifier: " + ("one view, no voting" if views == 1
                                  else f"{views}-crop voting"))
    if recognizer == "knn":
        return f"knn: vote of the {k} nearest reference images"
    return f"knn+classifier: {k} neighbours' votes weighted by the classifier"


def table_markdown(rows: Sequence[Mapping], config: BenchmarkConfig,
                   descriptions: Sequence[str], toy_counts: Mapping) -> str:
    """``table.md``: a title, the table, what the figures are, and the exact command.

    ``toy_counts``: the ``counts`` of a seed's ``toy_data.json`` (the sizes as generated)."""
    seeds = ", ".join(map(str, config.seeds))
    n = len(config.seeds)
    spread = ("sd is the sample standard deviation (ddof=1) over the seeds" if n > 1
              else "sd is n/a with one seed")
    data = f"toy data, difficulty {config.difficulty}" + (
        f", scenes from {config.scenes_dir}" if config.scenes_dir else "")
    lines = [
        f"### Recognizers on {data}: mean ± sd over {n} seed{'s' if n > 1 else ''}",
        "",
        *markdown_table(rows),
        "",
        f"Mean ± sd over {'seeds' if n > 1 else 'seed'} {seeds}; {spread}. Each seed has its "
        "own toy data "
        f"({_count(toy_counts, 'classes')} classes; training: "
        f"{_count(toy_counts, 'train_images')} landmark views, "
        f"{_count(toy_counts, 'train_distractors')} distractors; test: "
        f"{_count(toy_counts, 'test_landmark_images')} landmark views, "
        f"{_count(toy_counts, 'test_distractors')} distractors) and its own model "
        f"({config.train_preset} preset, {config.image_size} px); the recognizers of a seed "
        "share them. "
        "\"(no rescoring)\": the recognizer's answer before local-feature rescoring ("
        + "; ".join(descriptions) + "); \"+ rescoring\": its final answer. GAP landmarks only: "
        "GAP with the predictions on non-landmark images left out. Paired: each seed's GAP "
        "minus the baseline's on the same seed (same data, same model), mean ± sd, and on how "
        "many seeds the method scored higher; the seed-to-seed spread of the data cancels in "
        "it, so it tells methods apart better than the GAP columns. n/a: not measured.",
        "",
        "Command:",
        "",
        "```",
        command_text(config),
        "```",
    ]
    return "\n".join(lines) + "\n"


def _count(counts: Mapping, key: str) -> str:
    return "?" if counts.get(key) is None else str(counts[key])


def table_csv(rows: Sequence[Mapping]) -> str:
    """``table.csv``: one row per method, mean and sd of each metric (``n/a`` when missing)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["method", "recognizer", "rescoring", "n_seeds",
                     *(f"{metric}_{part}" for metric, _ in METRICS for part in ("mean", "sd")),
                     "baseline", "gap_vs_baseline_mean", "gap_vs_baseline_sd",
                     "gap_vs_baseline_wins"])
    for row in rows:
        cells = []
        for metric, _ in METRICS:
            cells += ["n/a" if row[metric][part] is None else repr(row[metric][part])
                      for part in ("mean", "sd")]
        paired = row["gap_vs_baseline"]
        cells += [row["baseline"], *("n/a" if paired[part] is None else repr(paired[part])
                                     for part in ("mean", "sd", "wins"))]
        writer.writerow([row["method"], row["recognizer"], str(row["rescoring"]).lower(),
                         row["n_seeds"], *cells])
    return buffer.getvalue()


def plot_png(rows: Sequence[Mapping], n_seeds: int) -> bytes:
    """PNG: per method, the mean GAP as a bar with the sd as its error bar, and each seed's GAP
    as a dot (matplotlib's Agg canvas, no pyplot state)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(6.0, 1.4 * len(rows) + 2.0), 4.6))
    axes = figure.subplots()
    colours = {"classifier": "tab:blue", "knn": "tab:orange", "knn+classifier": "tab:green"}
    for position, row in enumerate(rows):
        gap = row["gap"]
        colour = colours.get(row["recognizer"], "tab:gray")
        if gap["mean"] is not None:
            axes.bar(position, gap["mean"], width=0.6, color=colour,
                     alpha=0.9 if row["rescoring"] else 0.45, edgecolor="black", linewidth=0.6,
                     label="mean" if position == 0 else None)
            if gap["sd"] is not None:
                axes.errorbar(position, gap["mean"], yerr=gap["sd"], color="black", capsize=6,
                              linewidth=1.2, label="± sd" if position == 0 else None)
        seeds = [value for value in gap["values"] if value is not None]
        offsets = [0.0] if len(seeds) == 1 else [
            -0.15 + 0.3 * i / (len(seeds) - 1) for i in range(len(seeds))]
        axes.scatter([position + offset for offset in offsets], seeds, color="black", s=18,
                     zorder=3, label="one seed" if position == 0 else None)
    axes.set_xticks(range(len(rows)))
    axes.set_xticklabels([row["method"] for row in rows], rotation=20, ha="right")
    title = (f"GAP over {n_seeds} seeds: bar = mean, error bar = sample sd (ddof=1), "
             "dot = one seed" if n_seeds > 1 else "GAP on 1 seed (no sd)")
    axes.set(ylabel="GAP", ylim=(0, 1.05), title=title)
    axes.grid(axis="y", alpha=0.3)
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------
# The run.


class StageFailed(CommandFailure):
    """A stage of one seed failed for a known reason: one line naming the seed and the stage,
    with the stage's own exit code (2 bad input, 3 training diverged, 4 a job did not do its
    work)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def prepare_output_dir(output_dir: str, overwrite: bool) -> None:
    """Creates ``output_dir``, or empties it when it holds an earlier benchmark and
    ``overwrite``; refuses anything else that is not an empty folder."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise InputError(f"--output_dir {output_dir} is a file; choose a folder")
    if os.path.isdir(output_dir) and os.listdir(output_dir):
        if not is_benchmark_dir(output_dir):
            raise InputError(f"{output_dir} is not empty and was not written by {PROG}; "
                             "choose another --output_dir")
        if not overwrite:
            raise InputError(f"{output_dir} holds an earlier benchmark; pass --overwrite to "
                             "replace it, or choose another --output_dir")
        _LOG.info("replacing the earlier benchmark in %s", output_dir)
        shutil.rmtree(output_dir)
    os.makedirs(output_dir, exist_ok=True)


def is_benchmark_dir(folder: str) -> bool:
    """Whether ``folder`` holds the marker that :func:`run` writes first."""
    try:
        with open(os.path.join(folder, MARKER)) as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("written_by") == WRITTEN_BY


def recognizer_dir(recognizer: str) -> str:
    """The folder-name form of a recognizer: ``knn+classifier`` -> ``knn_classifier``."""
    return recognizer.replace("+", "_")


def _stage_runner(seed: int, index: int, n_seeds: int, total: int, stages: list,
                  failure: dict):
    """A function ``run(number, name, action)`` that runs one stage of one seed, logged as
    ``=== seed S (i/n) [k/total] name ...``; a failing stage is recorded in ``failure`` and
    turned into :class:`StageFailed` (input errors, known failures) or re-raised (a bug)."""

    def run(number: int, name: str, action):
        where = f"seed {seed} ({index}/{n_seeds}), stage {number}/{total} {name}"
        try:
            return stage_lib.run_stage(stages, f"seed {seed} ({index}/{n_seeds}) "
                                       f"[{number}/{total}]", name, action, logger=_LOG)
        except Exception as error:  # noqa: BLE001 - sorted by cause; a bug is re-raised
            failure.update({"seed": seed, "stage": name,
                            "error": f"{type(error).__name__}: {first_line(error)}"})
            if is_input_error(error):
                raise StageFailed(f"{where} failed: {first_line(error)}",
                                  cli.EXIT_BAD_INPUT) from error
            if isinstance(error, CommandFailure):
                raise StageFailed(f"{where} failed: {first_line(error)}",
                                  error.exit_code) from error
            _LOG.error("%s failed", where)
            raise

    return run


def run_seed(config: BenchmarkConfig, seed: int, index: int, failure: dict) -> dict:
    """Every stage of one seed into ``<output_dir>/seed_<seed>``; returns its record for
    ``benchmark.json``: stages and timings, dev GAP, each recognizer's report and metrics."""
    root = os.path.join(config.output_dir, f"seed_{seed}")
    stages: list[stage_lib.Stage] = []
    variants = variants_for(config)
    total = 4 + 2 * len(variants)
    run = _stage_runner(seed, index, len(config.seeds), total, stages, failure)
    start = time.perf_counter()
    toy_summary = run(1, "toy data",
                      lambda: stage_lib.make_toy_data(root, seed, toy_flags(config)))
    run(2, "ingest train", lambda: stage_lib.ingest_train(root))
    run(3, "ingest test", lambda: stage_lib.ingest_test(root))
    train_summary = run(4, "train", lambda: stage_lib.train_model(
        root, config.train_preset, config.image_size, seed,
        [*train_base_flags(config.train_preset), *config.extra_train_flags]))
    metrics, reports, knn_k = {}, {}, {}
    views = None
    seen: set = set()
    for position, variant in enumerate(variants):
        recognizer = variant.recognizer
        predicted = f"predict_{variant.folder}"
        evaluated = f"evaluation_{variant.folder}"
        number = 5 + 2 * position
        run(number, f"predict {variant.label}", lambda: stage_lib.predict_test(
            root, predicted, config.local_features, config.references_per_class, config.crops,
            predict_flags(recognizer, variant.rerank_top)))
        report = run(number + 1, f"evaluate {variant.label}",
                     lambda: stage_lib.evaluate_submission(root, predicted, evaluated))
        reports[variant.folder] = os.path.join(root, evaluated, "report.json")
        predict_dir = stage_lib.path(root, predicted)
        views = stage_lib.predict_views_per_image(predict_dir)
        if recognizer != "classifier":
            knn_k[recognizer] = stage_lib.recorded_config(predict_dir, "knn_k")
        for method in variant_methods(recognizer, (variant.rerank_top,),
                                      first=recognizer not in seen):
            metrics[method.name] = method_metrics(report, method)
        seen.add(recognizer)
    return {
        "seed": seed,
        "dir": root,
        "seconds": round(time.perf_counter() - start, 1),
        "stages": [dataclasses.asdict(stage) for stage in stages],
        "dev_gap_initial": train_summary.get("dev_gap_initial"),
        "dev_gap_final": train_summary.get("dev_gap_final"),
        "toy_counts": toy_summary.get("counts", {}),
        "views_per_image": views,
        "knn_k": knn_k,
        "reports": reports,
        "metrics": metrics,
    }


def _write_json(path: str, record: dict) -> None:
    with open(path, "w") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _write_text(path: str, text: str, mode: str = "w") -> None:
    with open(path, mode) as handle:
        handle.write(text)


def run(config: BenchmarkConfig, argv: Optional[Sequence[str]] = None) -> dict:
    """Runs every seed, then writes the table, the plot and ``_SUCCESS``; returns the record
    written to ``benchmark.json``. ``argv`` (the command as typed) is recorded as given.

    Raises:
      InputError: the output folder is refused.
      StageFailed: a stage failed for a known reason (``benchmark.json`` says which, status
        ``failed``; no ``_SUCCESS``).
    """
    prepare_output_dir(config.output_dir, config.overwrite)
    marker = os.path.join(config.output_dir, MARKER)
    record = {
        "written_by": WRITTEN_BY,
        "status": "running",
        "config": dataclasses.asdict(config),
        "command": command_text(config),
        "argv": None if argv is None else list(argv),
        "seeds": [],
    }
    # Marks the folder as ours from the start, so a crashed benchmark can be replaced.
    _write_json(marker, record)
    start = time.perf_counter()
    failure: dict = {}
    try:
        for index, seed in enumerate(config.seeds, 1):
            _LOG.info("=== seed %d (%d/%d): %s", seed, index, len(config.seeds),
                      os.path.join(config.output_dir, f"seed_{seed}"))
            record["seeds"].append(run_seed(config, seed, index, failure))
            _write_json(marker, record)  # the seeds done so far survive a later failure
    except BaseException as error:
        record.update({"status": "interrupted" if isinstance(error, KeyboardInterrupt)
                       else "failed", "failure": failure or {
                           "error": f"{type(error).__name__}: {first_line(error)}"},
                       "seconds_total": round(time.perf_counter() - start, 1)})
        _write_json(marker, record)
        raise

    methods = methods_for(config.recognizers, config.rerank_top)
    rows = aggregate([seed["metrics"] for seed in record["seeds"]], methods)
    first = record["seeds"][0]
    descriptions = [stage1_description(recognizer, first["views_per_image"],
                                       first["knn_k"].get(recognizer))
                    for recognizer in config.recognizers]
    markdown = table_markdown(rows, config, descriptions, first["toy_counts"])
    outputs = {name: os.path.join(config.output_dir, name)
               for name in (MARKER, TABLE_MD, TABLE_CSV, PLOT)}
    _write_text(outputs[TABLE_MD], markdown)
    _write_text(outputs[TABLE_CSV], table_csv(rows))
    _write_text(outputs[PLOT], plot_png(rows, len(config.seeds)), mode="wb")
    stage_seconds: dict[str, list[float]] = {}
    for seed in record["seeds"]:
        for stage in seed["stages"]:
            stage_seconds.setdefault(stage["name"], []).append(stage["seconds"])
    record.update({
        "status": "done",
        "methods": [method.name for method in methods],
        "metrics": {metric: title for metric, title in METRICS},
        "report_keys": {method.name: {metric: method.report_key(metric) for metric, _ in METRICS}
                        for method in methods},
        "sd": "sample standard deviation over seeds (ddof=1); null with one seed",
        "table": rows,
        "seconds_per_stage_mean": {name: round(sum(values) / len(values), 1)
                                   for name, values in stage_seconds.items()},
        "seconds_total": round(time.perf_counter() - start, 1),
        "outputs": outputs,
    })
    _write_json(marker, record)
    _write_text(os.path.join(config.output_dir, SUCCESS), "")
    return record


def format_summary(record: dict) -> str:
    """What is printed at the end: the table, where the outputs are, and the time taken."""
    with open(record["outputs"][TABLE_MD]) as handle:
        table = handle.read()
    lines = ["", table.rstrip("\n"), "", "outputs:"]
    lines += [f"  {name:<15} {path}" for name, path in record["outputs"].items()]
    lines += [f"  {'seed folders':<15} " + ", ".join(seed["dir"] for seed in record["seeds"]),
              f"total {record['seconds_total']:.0f} s over {len(record['seeds'])} seed(s)"]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """CLI entry point: runs the benchmark, prints the table; returns the exit code.

    0 done; 2 bad flags or input (one ``landmarks-benchmark: error:`` line); 3 or 4 a stage's
    own failure (one line naming the seed and the stage); 1 an internal error (a bug:
    traceback logged). See :func:`beam_pipelines.cli.run_command`.
    """
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("apache_beam", "absl", "tensorflow"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return cli.run_command(PROG, lambda: _main(argv))


def _main(argv: Optional[Sequence[str]]) -> int:
    """Parses, runs every seed (see :func:`run`), prints the table; returns 0."""
    argv = sys.argv[1:] if argv is None else list(argv)
    record = run(parse_args(argv), argv)
    print(format_summary(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
