"""Runs one job's ``main`` (e.g. ``beam_pipelines.ingest.pipeline``) and records the bytes its
Beam pipelines moved through the local runner's grouping and side-input buffers.

Usage: ``python bench/scale_job.py STATS_JSON MODULE [job flags ...]``; the exit code is the
job's. ``STATS_JSON`` gets ``{"returncode", "shuffle_bytes", "side_input_bytes",
"pipelines"}``.

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
import sys

from apache_beam.runners.portability.fn_api_runner import execution, fn_runner

_COUNTS = {"shuffle_bytes": 0, "side_input_bytes": 0, "pipelines": 0}


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
    fn_runner.FnApiRunner.run_pipeline = _counting_runs(fn_runner.FnApiRunner.run_pipeline)


def main(argv: list[str]) -> int:
    stats_path, module_name, *job_argv = argv
    install()
    module = importlib.import_module(module_name)
    returncode = 1
    try:
        returncode = int(module.main(job_argv) or 0)
    finally:
        with open(stats_path, "w") as handle:
            json.dump({"returncode": returncode, **_COUNTS}, handle, indent=2)
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
