"""Run one command and measure it as a whole: wall time and the peak resident memory of its process tree.

A Flower simulation spreads over the driver, Ray's raylet/GCS and one worker per actor, so the memory
that matters is the sum over every descendant, sampled often enough (every ``interval`` s) to catch the
peak while Ray workers come and go. ``/usr/bin/time`` would see only the driver.
"""

from __future__ import annotations

import os
import resource
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_mb: float
    """Largest sum of RSS over the command's process tree seen at any sample."""
    returncode: int
    cpu_s: float
    """User + system CPU seconds of the tree's processes that were waited for (Ray's daemons and workers
    included): far less sensitive to other jobs on the machine than the wall time."""
    load_before: float
    load_after: float
    """1-minute load average when the command started and ended: what else the machine was doing."""


def _tree_rss(root: psutil.Process) -> int:
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


def run_measured(argv: list[str], *, env: dict[str, str] | None = None, cwd: Path | None = None,
                 log: Path | None = None, interval: float = 0.2) -> Measured:
    """Run ``argv`` to completion (its output to ``log`` if given) while polling the tree's memory."""
    load_before = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    sink = open(log, "w") if log is not None else subprocess.DEVNULL
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        root, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            try:
                peak = max(peak, _tree_rss(root))
            except psutil.NoSuchProcess:
                break
            time.sleep(interval)
        code = proc.wait()
        wall = time.perf_counter() - start
    finally:
        if log is not None:
            sink.close()  # type: ignore[union-attr]
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(wall, peak / 2**20, code, cpu, load_before, os.getloadavg()[0])
