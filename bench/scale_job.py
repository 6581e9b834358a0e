"""Runs one job's ``main`` (e.g. ``beam_pipelines.ingest.pipeline``) and records the bytes its
Beam pipelines moved through the local runner's grouping and side-input buffers.

Usage: ``python bench/scale_job.py STATS_JSON MODULE [job flags ...]``; the exit code is the
job's. ``STATS_JSON`` gets ``{"returncode", "shuffle_bytes", "side_input_bytes",
"runner_list_bytes", "pipelines"}``; ``runner_list_bytes`` are the other bytes handed between
fused stages through the runner's ``ListBuffer`` s (held in the launcher until consumed).

Diagnosis: with ``SCALE_JOB_TRACEMALLOC=SECONDS`` set, the launcher traces its Python
allocations and, every SECONDS, keeps the snapshot with the most traced memory; its 15 largest
allocation sites (file:line, MB) are added as ``tracemalloc_top`` (slow: for diagnosis only).

On the FnApiRunner every GroupByKey / CoGroupByKey input passes, encoded, through one
``GroupingBuffer`` in the launcher process (whatever ``--direct_running_mode``), and every
side input through a ``WindowGroupingBuffer``: counting the bytes appended to them is the
local equivalent of Dataflow's "shuffle bytes" (and of the side-input bytes). The counting
wraps ``append`` and changes nothing else. A job that runs no pipeline reports 0 pipelines, and
the ladder reports its shuffle as not applicable.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import tracemalloc

from apache_beam.runners.portability.fn_api_runner import execution, fn_runner

_COUNTS = {"shuffle_bytes": 0, "side_input_bytes": 0, "runner_list_bytes": 0, "pipelines": 0}


def _counting(method, key):
    def append(self, data):
        _COUNTS[key] += len(data)
        return method(self, data)
    return append


def _counting_runs(method):
    def run_pipeline(self, pipeline, options):
        _COUNTS["pipelines"] += 1
        return method(self, pipeline, options)
    return run_pipeline


def install() -> None:
    """Wraps the runner's buffers and ``run_pipeline`` with byte / run counters."""
    execution.GroupingBuffer.append = _counting(execution.GroupingBuffer.append, "shuffle_bytes")
    execution.WindowGroupingBuffer.append = _counting(
        execution.WindowGroupingBuffer.append, "side_input_bytes")
    execution.ListBuffer.append = _counting(execution.ListBuffer.append, "runner_list_bytes")
    fn_runner.FnApiRunner.run_pipeline = _counting_runs(fn_runner.FnApiRunner.run_pipeline)


class _PeakSnapshots(threading.Thread):
    """Every ``interval`` s, a tracemalloc snapshot; keeps the top sites of the largest one."""

    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self._interval = interval
        self.peak_mb = 0.0
        self.top: list[str] = []

    def run(self):
        while True:
            time.sleep(self._interval)
            traced, _ = tracemalloc.get_traced_memory()
            if traced / 2**20 <= self.peak_mb:
                continue
            self.peak_mb = traced / 2**20
            stats = tracemalloc.take_snapshot().statistics("lineno")[:15]
            self.top = [f"{stat.traceback[0].filename}:{stat.traceback[0].lineno} "
                        f"{stat.size / 2**20:.1f} MB ({stat.count} blocks)" for stat in stats]


def main(argv: list[str]) -> int:
    stats_path, module_name, *job_argv = argv
    install()
    tracer = None
    if os.environ.get("SCALE_JOB_TRACEMALLOC"):
        tracemalloc.start()
        tracer = _PeakSnapshots(float(os.environ["SCALE_JOB_TRACEMALLOC"]))
        tracer.start()
    module = importlib.import_module(module_name)
    returncode = 1
    try:
        returncode = int(module.main(job_argv) or 0)
    finally:
        extra = {} if tracer is None else {"tracemalloc_peak_mb": tracer.peak_mb,
                                           "tracemalloc_top": tracer.top}
        with open(stats_path, "w") as handle:
            json.dump({"returncode": returncode, **_COUNTS, **extra}, handle, indent=2)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
