"""Measuring one command of the scale ladder, and the pure arithmetic of its table.

:func:`run_measured` runs a command as a child process and samples the resident memory of its
whole process tree (the job and every descendant, e.g. Beam's worker processes) every
``interval`` seconds; :func:`folder_bytes` is the size of what a stage wrote; :func:`fit_exponent`
and :func:`growth_per_item` are the growth figures of the table (pure functions).
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import subprocess
import time
from typing import Optional, Sequence

import psutil


@dataclasses.dataclass
class Measured:
    """One command as it ran: wall seconds, CPU seconds (user + system) of the tree, peak RSS
    of the tree in bytes, exit code, why it was stopped (``None``: it ended by itself), and the
    machine's 1-minute load average at the end (the machine may be shared)."""

    seconds: float
    cpu_seconds: float
    peak_rss_bytes: int
    returncode: int
    stopped: Optional[str] = None
    load_average: float = 0.0
    peak_process_rss_bytes: int = 0  # the largest single process of the tree, at its peak


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's reaped descendants (each level of the tree
    waits for its own children, so a finished job's workers are included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_rss(process: psutil.Process) -> tuple[int, int]:
    """(sum, largest) resident bytes over ``process`` and all its descendants (processes that
    vanish while being read count 0). Shared pages count once per process that maps them."""
    sizes = []
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0
    for member in members:
        try:
            sizes.append(member.memory_info().rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return sum(sizes), max(sizes, default=0)


def _stop_tree(process: psutil.Process) -> None:
    try:
        members = [*process.children(recursive=True), process]
    except psutil.NoSuchProcess:
        return
    for member in members:
        try:
            member.kill()
        except psutil.NoSuchProcess:
            continue
    psutil.wait_procs(members, timeout=30)


def run_measured(command: Sequence[str], log_path: str, env: Optional[dict] = None,
                 interval: float = 0.2, min_available_bytes: int = 0,
                 timeout_seconds: Optional[float] = None) -> Measured:
    """Runs ``command`` (stdout and stderr to ``log_path``) and samples its tree's RSS.

    The tree is killed, and ``stopped`` says why, when the machine's available memory falls
    below ``min_available_bytes`` while the tree holds at least a quarter of the memory in use
    (a guard for a shared machine), or after ``timeout_seconds``.
    """
    with open(log_path, "wb") as log:
        cpu_before = _children_cpu_seconds()
        start = time.perf_counter()
        process = psutil.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env)
        peak = peak_process = 0
        stopped = None
        while process.poll() is None:
            total, largest = tree_rss(process)
            peak, peak_process = max(peak, total), max(peak_process, largest)
            memory = psutil.virtual_memory()
            # Only a tree that holds a quarter of the memory in use is stopped: on a shared
            # machine another user's spike is not this job's doing.
            if (min_available_bytes and memory.available < min_available_bytes
                    and total >= 0.25 * (memory.total - memory.available)):
                stopped = (f"killed: available memory below {min_available_bytes / 2**30:.1f} GB "
                           f"(tree at {total / 2**30:.2f} GB)")
            elif timeout_seconds and time.perf_counter() - start > timeout_seconds:
                stopped = f"killed: over {timeout_seconds:.0f} s"
            if stopped:
                _stop_tree(process)
                break
            time.sleep(interval)
        returncode = process.wait()
        seconds = time.perf_counter() - start
    return Measured(seconds, _children_cpu_seconds() - cpu_before, peak, returncode, stopped,
                    os.getloadavg()[0], peak_process)


def folder_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (0 if it does not exist)."""
    total = 0
    for folder, _, names in os.walk(path):
        for name in names:
            file_path = os.path.join(folder, name)
            if os.path.isfile(file_path) and not os.path.islink(file_path):
                total += os.path.getsize(file_path)
    return total


def fit_exponent(xs: Sequence[float], ys: Sequence[float]) -> Optional[float]:
    """Least-squares slope of log y against log x: y ~ x^slope. ``None`` with fewer than two
    points with x > 0 and y > 0, or when all x are equal."""
    points = [(math.log(x), math.log(y)) for x, y in zip(xs, ys)
              if x is not None and y is not None and x > 0 and y > 0]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    if spread == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / spread


def growth_per_item(x_small: float, y_small: float, x_large: float,
                    y_large: float) -> Optional[float]:
    """(y_large - y_small) / (x_large - x_small); ``None`` when the x are equal."""
    if x_large == x_small:
        return None
    return (y_large - y_small) / (x_large - x_small)
