"""The scale ladder: the real jobs on synthetic data of growing size, and how their cost grows.

Run: ``make bench-scale`` (rungs 1000,4000,16000), ``make bench-scale RUNGS=1000,4000``
(more flags: ``SCALE_ARGS="--hot_compare none"``, folder: ``SCALE_DIR=runs/scale``), or
``.venv/bin/python bench/bench_scale.py --rungs 1000,4000 [--output_dir runs/scale]``. Every
job runs as its own process (so its memory is measured alone), with ``PYTHONPATH`` set to this
repository. Run it on a machine with nothing else to do, or under ``nice``. Other flags:
``--hot_compare top|none|N,N``, ``--hot_class true|false``, ``--train_steps 10``,
``--recognizers classifier,knn+classifier``, ``--workers 2``, ``--running_mode
multi_processing|multi_threading|in_memory``, ``--min_available_gb 1.5``, ``--seed 0``
(``--help`` for all). Time here (2 shared cores): N = 1000 about 13 minutes, N = 4000 about
15 minutes plus 10 for its no-hot-class runs; a job's start-up (TensorFlow and Beam imports,
worker processes) is 20-60 s of every stage, so small rungs measure mostly start-up.

A rung of N training images (``bench/scale_data.py``): N/8 classes, N/8 training distractors,
N/8 test images of which half are non-landmarks and, by default, 20 % show one "hot" class;
images 96-128 pixels on the long side. Stages of each rung, each the real command::

    generate                 bench/scale_data.py                        (seconds)
    ingest train             landmarks-ingest train.csv + distractors, 20 % dev split
    ingest test              landmarks-ingest test.csv
    train                    landmarks-train --preset quick --image_size 71, a fixed
                             2 x --train_steps steps (1 head epoch + 1 finetune epoch)
    predict classifier       landmarks-predict --recognizer classifier --crops 1
    evaluate classifier      landmarks-evaluate
    predict knn+classifier   landmarks-predict --recognizer knn+classifier --crops 1
    evaluate knn+classifier  landmarks-evaluate

Both predict runs rescore with the default local features (ORB) and each has its own
reference-feature cache, so each pays its whole cost. With ``--hot_compare`` (default: the top
rung) the rung's test set is made again without the hot class (same training data and model)
and ingested and predicted again: rows "... (no hot class)".

Beam jobs run on the local FnApiRunner with ``--direct_num_workers=2
--direct_running_mode=multi_processing`` (two SDK worker processes; ``--running_mode`` to change
it). Measured per stage (``bench/scale_measure.py``): wall seconds, seconds per image (images =
the rows the stage handles: training images + distractors for ingest train and train, test
images for the others), peak resident memory of the whole process tree sampled every 0.2 s
(RSS summed over the job and its workers; shared library pages count once per process; and
the largest single process), CPU seconds of the tree, bytes written (the stage's output folder;
predict: with its reference-feature cache), and the bytes that went through the local runner's
GroupByKey buffers ("shuffle"), side-input buffers and its other inter-stage buffers
(``bench/scale_job.py``); stages without a Beam pipeline say "n/a". A job is killed when the
machine's available memory drops below ``--min_available_gb`` while it holds a quarter of the
memory in use (recorded in the table; larger rungs are then skipped).

Outputs in ``--output_dir``: ``table.md``, ``table.csv`` (one row per rung and stage),
``scale.png`` (log-log wall time, CPU time and memory against N per stage), ``scale.json``
(everything, including the growth exponent per stage = least-squares slope of log y on log N,
predict's memory growth per test image between the two largest rungs, time per image at the top
rung over the 4000 rung, the hot-class comparison, and the exact commands), and ``n<N>/`` per
rung (data, outputs, ``logs/<stage>.log``).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from typing import Optional, Sequence

import psutil

import scale_data
import scale_measure

_LOG = logging.getLogger("bench_scale")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "bench")
MARKER = ".bench_scale"
REFERENCE_RUNG = 4000  # time-per-image ratios compare the top rung with this one
RECOGNIZERS = ("classifier", "knn+classifier")
MB = 1024 * 1024
NO_HOT = " (no hot class)"


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """One ladder run. Sizes in images; ``train_steps`` per epoch (2 epochs)."""

    rungs: tuple[int, ...] = (1000, 4000, 16000)
    output_dir: str = "runs/scale"
    seed: int = 0
    hot_class: bool = True
    hot_compare: tuple[int, ...] = ()  # rungs also run without the hot class
    train_steps: int = 10
    image_size: int = 71
    workers: int = 2
    running_mode: str = "multi_processing"
    min_available_gb: float = 1.5
    recognizers: tuple[str, ...] = RECOGNIZERS

    def __post_init__(self):
        if not self.rungs or any(n < 16 for n in self.rungs):
            raise ValueError(f"rungs must be >= 16 images each, got {self.rungs}")
        if sorted(set(self.rungs)) != list(self.rungs):
            raise ValueError(f"rungs must be increasing and distinct, got {self.rungs}")
        if not set(self.hot_compare) <= set(self.rungs):
            raise ValueError(f"--hot_compare {self.hot_compare} must be among the rungs")
        if not self.recognizers or not set(self.recognizers) <= set(RECOGNIZERS):
            raise ValueError(f"recognizers must be among {RECOGNIZERS}, got {self.recognizers}")
        if self.train_steps < 1 or self.workers < 1 or self.image_size < 71:
            raise ValueError("train_steps and workers must be >= 1, image_size >= 71")


# ---------------------------------------------------------------------------------------------
# The commands of one rung.


def beam_flags(config: ScaleConfig) -> list[str]:
    return ["--runner=FnApiRunner", f"--direct_num_workers={config.workers}",
            f"--direct_running_mode={config.running_mode}"]


def _job(stats_path: str, module: str, argv: Sequence[str]) -> list[str]:
    return [sys.executable, os.path.join(BENCH, "scale_job.py"), stats_path, module, *argv]


@dataclasses.dataclass
class StageSpec:
    """A stage to run: its name, images handled, command, output folder(s), what it needs."""

    name: str
    images: int
    command: list[str]
    output: str | tuple[str, ...]
    needs: tuple[str, ...] = ()
    beam: bool = False
    stats_path: Optional[str] = None


def rung_stages(config: ScaleConfig, n: int, root: str, hot: bool, suffix: str = "",
                train: bool = True) -> list[StageSpec]:
    """The stages of rung ``n`` in folder ``root``; ``suffix`` names a second test set (the
    rung's model and training records are reused when ``train`` is False)."""
    counts = scale_data.sizes(n, hot)
    data = os.path.join(root, "data" + suffix)
    logs = os.path.join(root, "logs")
    records_train = os.path.join(root, "ingest_train")
    records_test = os.path.join(root, "ingest_test" + suffix)
    model = os.path.join(root, "model")
    test_images = counts["test_images"]
    stages = [StageSpec("generate" + (NO_HOT if suffix else ""),
                        n + counts["train_distractors"] + test_images,
                        [sys.executable, os.path.join(BENCH, "scale_data.py"), "--output_dir",
                         data, "--num_train", str(n), "--seed", str(config.seed), "--hot_class",
                         str(hot).lower()], data)]
    if train:
        stats = os.path.join(logs, "ingest_train.bytes.json")
        stages.append(StageSpec(
            "ingest train", n + counts["train_distractors"], _job(stats,
            "beam_pipelines.ingest.pipeline", [
                "--manifest", os.path.join(data, "train.csv"), "--distractor_dir",
                os.path.join(data, "distractors"), "--output_dir", records_train,
                "--dev_fraction", "0.2", "--num_shards", "2", *beam_flags(config)]),
            records_train, ("generate",), beam=True, stats_path=stats))
    stats = os.path.join(logs, f"ingest_test{suffix}.bytes.json")
    name = "ingest test" + (NO_HOT if suffix else "")
    stages.append(StageSpec(
        name, test_images, _job(stats, "beam_pipelines.ingest.pipeline", [
            "--manifest", os.path.join(data, "test.csv"), "--output_dir", records_test,
            "--num_shards", "2", *beam_flags(config)]),
        records_test, (stages[0].name,), beam=True, stats_path=stats))
    ingest_test_name = name
    if train:
        stats = os.path.join(logs, "train.bytes.json")
        stages.append(StageSpec(
            "train", n + counts["train_distractors"], _job(stats, "trainer.train", [
                "--train_data", os.path.join(records_train, "train-*.tfrecord"),
                "--dev_data", os.path.join(records_train, "dev-*.tfrecord"),
                "--label_map", os.path.join(records_train, "label_map.csv"),
                "--model_dir", model, "--preset", "quick", "--image_size",
                str(config.image_size), "--seed", str(config.seed), "--steps_per_epoch",
                str(config.train_steps), "--head_epochs", "1", "--finetune_epochs", "1",
                "--verbose", "2"]),
            model, ("ingest train",), stats_path=stats))
    for recognizer in config.recognizers:
        slug = recognizer.replace("+", "_") + suffix
        predicted = os.path.join(root, f"predict_{slug}")
        stats = os.path.join(logs, f"predict_{slug}.bytes.json")
        predict_name = f"predict {recognizer}" + (NO_HOT if suffix else "")
        stages.append(StageSpec(
            predict_name, test_images, _job(stats, "beam_pipelines.predict.pipeline", [
                "--model", os.path.join(model, "model.keras"),
                "--test_data", os.path.join(records_test, "test-*.tfrecord"),
                "--reference_data", os.path.join(records_train, "train-*.tfrecord"),
                "--output_dir", predicted,
                "--reference_features", os.path.join(root, f"reference_features_{slug}"),
                "--recognizer", recognizer, "--crops", "1", "--local_features", "default",
                *beam_flags(config)]),
            (predicted, os.path.join(root, f"reference_features_{slug}")),
            ("train", ingest_test_name), beam=True, stats_path=stats))
        if not suffix:
            evaluated = os.path.join(root, f"evaluate_{slug}")
            stats = os.path.join(logs, f"evaluate_{slug}.bytes.json")
            stages.append(StageSpec(
                f"evaluate {recognizer}", test_images, _job(stats, "beam_pipelines.evaluate", [
                    "--submission", os.path.join(predicted, "submission.csv"),
                    "--solution", os.path.join(data, "test_solution.csv"),
                    "--scores", os.path.join(predicted, "scores.csv"),
                    "--output_dir", evaluated]),
                evaluated, (predict_name,), stats_path=stats))
    return stages


# ---------------------------------------------------------------------------------------------
# Running a rung.


def run_stage(spec: StageSpec, n: int, logs: str, env: dict, config: ScaleConfig) -> dict:
    """Runs one stage, measured; returns its row."""
    slug = spec.name.replace(" ", "_").replace("+", "_").replace("(", "").replace(")", "")
    log_path = os.path.join(logs, f"{slug}.log")
    _LOG.info("N=%d %s ...", n, spec.name)
    measured = scale_measure.run_measured(
        spec.command, log_path, env=env, min_available_bytes=int(config.min_available_gb * 2**30))
    row = {
        "n": n, "stage": spec.name, "images": spec.images,
        "seconds": round(measured.seconds, 3),
        "seconds_per_image": measured.seconds / spec.images,
        "cpu_seconds": round(measured.cpu_seconds, 3),
        "load_average": round(measured.load_average, 2),
        "peak_rss_bytes": measured.peak_rss_bytes,
        "peak_process_rss_bytes": measured.peak_process_rss_bytes,
        "output_bytes": sum(scale_measure.folder_bytes(folder) for folder in (
            (spec.output,) if isinstance(spec.output, str) else spec.output)),
        "shuffle_bytes": None, "side_input_bytes": None, "runner_list_bytes": None,
        "returncode": measured.returncode, "stopped": measured.stopped,
        "status": "ok" if measured.returncode == 0 and not measured.stopped else "failed",
        "command": shlex.join(spec.command), "log": log_path,
    }
    if spec.stats_path and os.path.exists(spec.stats_path):
        with open(spec.stats_path) as handle:
            moved = json.load(handle)
        if moved.get("pipelines"):
            row["shuffle_bytes"] = moved["shuffle_bytes"]
            row["side_input_bytes"] = moved["side_input_bytes"]
            row["runner_list_bytes"] = moved["runner_list_bytes"]
    if row["status"] != "ok":
        row["status"] = measured.stopped or f"exit code {measured.returncode}"
    _LOG.info("N=%d %s: %s in %.1f s, peak %.0f MB, wrote %.1f MB", n, spec.name, row["status"],
              row["seconds"], row["peak_rss_bytes"] / MB, row["output_bytes"] / MB)
    return row


def run_rung(config: ScaleConfig, n: int, env: dict) -> list[dict]:
    """Runs every stage of rung ``n`` (and its no-hot test set if asked); a stage whose inputs
    failed is skipped (a row with status ``skipped``)."""
    root = os.path.join(config.output_dir, f"n{n}")
    if os.path.exists(root):
        shutil.rmtree(root)
    logs = os.path.join(root, "logs")
    os.makedirs(logs)
    specs = rung_stages(config, n, root, config.hot_class)
    if n in config.hot_compare:
        specs += rung_stages(config, n, root, hot=not config.hot_class, suffix="_nohot",
                             train=False)
    rows, failed = [], set()
    for spec in specs:
        missing = [need for need in spec.needs if need in failed]
        if missing:
            failed.add(spec.name)
            rows.append({"n": n, "stage": spec.name, "images": spec.images,
                         "status": f"skipped ({missing[0]} failed)",
                         "command": shlex.join(spec.command)})
            continue
        row = run_stage(spec, n, logs, env, config)
        rows.append(row)
        if row["status"] != "ok":
            failed.add(spec.name)
    return rows


# ---------------------------------------------------------------------------------------------
# The figures (pure functions of the rows).


def _ok(rows: list[dict], stage: str) -> list[dict]:
    return sorted((r for r in rows if r["stage"] == stage and r.get("status") == "ok"),
                  key=lambda r: r["n"])


def stage_names(rows: list[dict]) -> list[str]:
    names: list[str] = []
    for row in rows:
        if row["stage"] not in names:
            names.append(row["stage"])
    return names


def exponents(rows: list[dict]) -> dict:
    """Stage -> {"time", "memory", "rungs"}: slopes of log seconds and log peak RSS on log N
    over the stage's successful rungs (``None`` with fewer than two)."""
    result = {}
    for stage in stage_names(rows):
        ok = _ok(rows, stage)
        result[stage] = {
            "time": scale_measure.fit_exponent([r["n"] for r in ok], [r["seconds"] for r in ok]),
            "cpu": scale_measure.fit_exponent([r["n"] for r in ok],
                                              [r.get("cpu_seconds") for r in ok]),
            "memory": scale_measure.fit_exponent([r["n"] for r in ok],
                                                 [r["peak_rss_bytes"] for r in ok]),
            "rungs": [r["n"] for r in ok],
        }
    return result


def predict_memory_growth(rows: list[dict]) -> dict:
    """Predict stage -> peak RSS growth in MB per test image between its two largest rungs."""
    result = {}
    for stage in stage_names(rows):
        ok = _ok(rows, stage)
        if not stage.startswith("predict") or len(ok) < 2:
            continue
        small, large = ok[-2], ok[-1]
        growth = scale_measure.growth_per_item(small["images"], small["peak_rss_bytes"],
                                               large["images"], large["peak_rss_bytes"])
        result[stage] = {"rungs": [small["n"], large["n"]],
                         "test_images": [small["images"], large["images"]],
                         "mb_per_test_image": None if growth is None else growth / MB}
    return result


def time_per_image_ratios(rows: list[dict], reference: int = REFERENCE_RUNG) -> dict:
    """Stage -> time per image at its top rung over that at ``reference`` (or, without that
    rung, the one below the top)."""
    result = {}
    for stage in stage_names(rows):
        ok = _ok(rows, stage)
        if len(ok) < 2:
            continue
        top = ok[-1]
        below = [r for r in ok if r["n"] == reference and r is not top] or [ok[-2]]
        base = below[0]
        cpu = (top["cpu_seconds"] / top["images"]) / (base["cpu_seconds"] / base["images"]) if (
            top.get("cpu_seconds") and base.get("cpu_seconds")) else None
        result[stage] = {"rungs": [base["n"], top["n"]],
                         "ratio": top["seconds_per_image"] / base["seconds_per_image"],
                         "cpu_ratio": cpu}
    return result


def hot_comparison(rows: list[dict]) -> list[dict]:
    """Per rung and recognizer run both ways: peak RSS with and without the hot class."""
    result = []
    for row in rows:
        if not row["stage"].endswith(NO_HOT) or row.get("status") != "ok":
            continue
        base = row["stage"][:-len(NO_HOT)]
        hot = [r for r in rows if r["stage"] == base and r["n"] == row["n"]
               and r.get("status") == "ok"]
        if hot:
            result.append({"n": row["n"], "stage": base,
                           "peak_rss_mb_hot": hot[0]["peak_rss_bytes"] / MB,
                           "peak_rss_mb_no_hot": row["peak_rss_bytes"] / MB,
                           "difference_mb": (hot[0]["peak_rss_bytes"]
                                             - row["peak_rss_bytes"]) / MB,
                           "seconds_hot": hot[0]["seconds"], "seconds_no_hot": row["seconds"]})
    return result


# ---------------------------------------------------------------------------------------------
# Writing the table, the plot and the json.

CSV_FIELDS = ("n", "stage", "status", "images", "seconds", "seconds_per_image", "cpu_seconds",
              "load_average", "peak_rss_bytes", "peak_process_rss_bytes", "output_bytes",
              "shuffle_bytes", "side_input_bytes", "runner_list_bytes")


def table_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    return out.getvalue()


def _mb(value, missing: str = "n/a") -> str:
    return missing if value is None else f"{value / MB:,.1f}"


def _num(value, pattern: str = "{:.2f}") -> str:
    return "n/a" if value is None else pattern.format(value)


def table_md(rows: list[dict], summary: dict) -> str:
    lines = [
        "# Scale ladder", "",
        f"Machine: {summary['machine']['cpus']} CPUs, "
        f"{summary['machine']['memory_gb']:.1f} GB; Beam: {' '.join(summary['beam_flags'])}; "
        f"train: {summary['config']['train_steps']} steps x 2 epochs at "
        f"{summary['config']['image_size']} px. Commit {summary['commit']}.", "",
        "Shuffle / side input / runner lists: bytes through the local runner's GroupByKey, "
        "side-input and other inter-stage buffers (all held in the launcher process until "
        "consumed); n/a = no Beam pipeline in the stage.", "",
        "CPU s: user + system seconds of the whole process tree (robust to a shared machine, "
        "unlike wall time); load: the machine's 1-minute load average when the stage ended.", "",
        "Peak RSS: of the whole process tree (job + Beam workers); largest: the largest single "
        "process of the tree at its own peak.", "",
        "| N | stage | status | images | wall s | ms / image | CPU s | load | peak RSS MB "
        "| largest MB | written MB | shuffle MB | side input MB | runner lists MB |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        if row.get("status") != "ok" and "seconds" not in row:
            lines.append(f"| {row['n']} | {row['stage']} | {row['status']} | {row['images']} "
                         "| | | | | | | | | | |")
            continue
        lines.append(
            f"| {row['n']} | {row['stage']} | {row['status']} | {row['images']} "
            f"| {row['seconds']:.1f} | {1000 * row['seconds_per_image']:.1f} "
            f"| {_num(row.get('cpu_seconds'), '{:.1f}')} "
            f"| {_num(row.get('load_average'), '{:.1f}')} "
            f"| {row['peak_rss_bytes'] / MB:,.0f} "
            f"| {_mb(row.get('peak_process_rss_bytes'), '')} | {_mb(row.get('output_bytes'))} "
            f"| {_mb(row.get('shuffle_bytes'))} | {_mb(row.get('side_input_bytes'))} "
            f"| {_mb(row.get('runner_list_bytes'))} |")
    lines += ["", "## Growth exponents (slope of log y on log N)", "",
              "| stage | wall time | CPU time | peak memory | rungs |", "|---|---:|---:|---:|---|"]
    for stage, fit in summary["exponents"].items():
        lines.append(f"| {stage} | {_num(fit['time'])} | {_num(fit.get('cpu'))} "
                     f"| {_num(fit['memory'])} "
                     f"| {', '.join(str(n) for n in fit['rungs'])} |")
    lines += ["", "## Predict: peak memory growth per test image (two largest rungs)", "",
              "| stage | rungs | test images | MB per test image |", "|---|---|---|---:|"]
    for stage, growth in summary["predict_memory_growth"].items():
        lines.append(f"| {stage} | {growth['rungs'][0]} -> {growth['rungs'][1]} "
                     f"| {growth['test_images'][0]} -> {growth['test_images'][1]} "
                     f"| {_num(growth['mb_per_test_image'])} |")
    lines += ["", "## Time per image, top rung over the reference rung", "",
              "| stage | rungs | wall time ratio | CPU time ratio |", "|---|---|---:|---:|"]
    for stage, ratio in summary["time_per_image_ratios"].items():
        lines.append(f"| {stage} | {ratio['rungs'][1]} / {ratio['rungs'][0]} "
                     f"| {ratio['ratio']:.2f} | {_num(ratio.get('cpu_ratio'))} |")
    if summary["hot_comparison"]:
        lines += ["", "## Hot class: each stage run with and without it, same rung and model", "",
                  "| N | stage | peak MB with | peak MB without | difference MB | s with "
                  "| s without |", "|---:|---|---:|---:|---:|---:|---:|"]
        for item in summary["hot_comparison"]:
            lines.append(f"| {item['n']} | {item['stage']} | {item['peak_rss_mb_hot']:,.0f} "
                         f"| {item['peak_rss_mb_no_hot']:,.0f} | {item['difference_mb']:+,.0f} "
                         f"| {item['seconds_hot']:.1f} | {item['seconds_no_hot']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> bool:
    """Log-log wall time, CPU time and peak memory against N, one line per stage (squares: the
    runs without the hot class); False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _LOG.warning("matplotlib not installed: no plot")
        return False
    panels = (("seconds", 1, "wall time, s"), ("cpu_seconds", 1, "CPU time of the tree, s"),
              ("peak_rss_bytes", MB, "peak RSS of the tree, MB"))
    figure, axes = plt.subplots(1, len(panels), figsize=(18, 5.5))
    colours = plt.get_cmap("tab20").colors
    for number, stage in enumerate(stage_names(rows)):
        ok = [r for r in _ok(rows, stage) if all(r.get(key) for key, _, _ in panels)]
        if not ok:
            continue
        no_hot = stage.endswith(NO_HOT)
        for axis, (key, unit, _) in zip(axes, panels):
            axis.plot([r["n"] for r in ok], [r[key] / unit for r in ok], "--" if no_hot else "-",
                      marker="s" if no_hot else "o", color=colours[number % len(colours)],
                      label=stage)
    ns = sorted({r["n"] for r in rows if r.get("status") == "ok"})
    for axis, (_, _, label) in zip(axes, panels):
        if len(ns) > 1 and axis.get_lines():  # slope 1 (proportional to N), median first point
            lowest = sorted(line.get_ydata()[0] for line in axis.get_lines())
            anchor = lowest[len(lowest) // 2]
            axis.plot(ns, [anchor * n / ns[0] for n in ns], ":", color="grey",
                      label="proportional to N")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("N, training images (classes N/8, test images N/8)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    if axes[-1].get_lines():
        axes[-1].legend(fontsize=7, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def git_commit() -> str:
    """The repository's HEAD commit (short), ``-dirty`` with uncommitted changes."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, text=True,
                                capture_output=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO, text=True, capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (commit or "unknown") + ("-dirty" if dirty.strip() else "")


def summarise(rows: list[dict], config: ScaleConfig, commit: str) -> dict:
    """Everything ``scale.json`` holds; ``commit``: the code that ran (taken at the start)."""
    return {
        "config": dataclasses.asdict(config),
        "commit": commit,
        "machine": {"cpus": os.cpu_count(), "memory_gb": psutil.virtual_memory().total / 2**30,
                    "python": platform.python_version()},
        "beam_flags": beam_flags(config),
        "environment": {"PYTHONPATH": REPO},
        "rows": rows,
        "exponents": exponents(rows),
        "predict_memory_growth": predict_memory_growth(rows),
        "time_per_image_ratios": time_per_image_ratios(rows),
        "hot_comparison": hot_comparison(rows),
    }


def write_outputs(rows: list[dict], config: ScaleConfig, commit: str) -> dict:
    summary = summarise(rows, config, commit)
    out = config.output_dir
    with open(os.path.join(out, "table.csv"), "w") as handle:
        handle.write(table_csv(rows))
    with open(os.path.join(out, "table.md"), "w") as handle:
        handle.write(table_md(rows, summary))
    with open(os.path.join(out, "scale.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    plot(rows, os.path.join(out, "scale.png"))
    return summary


# ---------------------------------------------------------------------------------------------
# Command line.


def _ints(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers like 1000,4000, got {text!r}")


def parse_args(argv: Optional[Sequence[str]]) -> ScaleConfig:
    defaults = ScaleConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rungs", type=_ints, default=defaults.rungs,
                        help="N of each rung, increasing (default: 1000,4000,16000)")
    parser.add_argument("--output_dir", default=defaults.output_dir)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--hot_class", type=scale_data._parse_bool, default=True,
                        metavar="true|false", help="20 %% of test images from one class")
    parser.add_argument("--hot_compare", default="top",
                        help="rungs also run without the hot class: top, none or N,N "
                             "(default: top)")
    parser.add_argument("--train_steps", type=int, default=defaults.train_steps,
                        help="landmarks-train steps per epoch (2 epochs) (default: 10)")
    parser.add_argument("--image_size", type=int, default=defaults.image_size)
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="Beam --direct_num_workers (default: 2)")
    parser.add_argument("--running_mode", default=defaults.running_mode,
                        choices=("in_memory", "multi_threading", "multi_processing"))
    parser.add_argument("--recognizers", default=",".join(RECOGNIZERS),
                        help="landmarks-predict --recognizer values to run (default: "
                             "classifier,knn+classifier)")
    parser.add_argument("--min_available_gb", type=float, default=defaults.min_available_gb,
                        help="kill a job whose tree holds >= 1/4 of the memory in use when the "
                             "available memory falls below this, GB (default: 1.5)")
    args = parser.parse_args(argv)
    hot_compare = (args.rungs[-1:] if args.hot_compare == "top" and args.rungs
                   else _ints(args.hot_compare))
    try:
        return ScaleConfig(rungs=args.rungs, output_dir=args.output_dir, seed=args.seed,
                           hot_class=args.hot_class, hot_compare=hot_compare,
                           train_steps=args.train_steps, image_size=args.image_size,
                           workers=args.workers, running_mode=args.running_mode,
                           min_available_gb=args.min_available_gb,
                           recognizers=tuple(args.recognizers.split(",")))
    except ValueError as error:
        parser.error(str(error))


def prepare_output_dir(path: str) -> None:
    """Creates ``path``; a non-empty folder that this script did not make is refused."""
    if os.path.isdir(path) and os.listdir(path) and not os.path.exists(
            os.path.join(path, MARKER)):
        raise SystemExit(f"bench_scale: {path} is not empty and was not written by this script")
    os.makedirs(path, exist_ok=True)
    open(os.path.join(path, MARKER), "w").close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    config = parse_args(argv)
    config = dataclasses.replace(config, output_dir=os.path.abspath(config.output_dir))
    prepare_output_dir(config.output_dir)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    rows: list[dict] = []
    commit = git_commit()
    start = time.monotonic()
    for n in config.rungs:
        rung_rows = run_rung(config, n, env)
        rows += rung_rows
        write_outputs(rows, config, commit)  # after every rung: a stopped ladder keeps its figures
        if any(str(r.get("status", "")).startswith("killed") for r in rung_rows):
            _LOG.warning("N=%d: a job was killed for memory; larger rungs skipped", n)
            break
    summary = write_outputs(rows, config, commit)
    _LOG.info("ladder done in %.0f s; table in %s", time.monotonic() - start,
              os.path.join(config.output_dir, "table.md"))
    print(table_md(rows, summary))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
