"""Run one command and measure it as a whole: wall time and the peak resident memory of its process tree.

A Flower simulation spreads over the driver, Ray's raylet/GCS and one worker per actor, so the memory
that matters is the sum over every descendant, sampled often enough (every ``interval`` s) to catch the
peak while Ray workers come and go. ``/usr/bin/time`` would see only the driver.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass(frozen=True)
class Measured:
    wall_s: float
    peak_mb: float
    """Largest sum of RSS over the command's process tree seen at any sample."""
    returncode: int
    cpu_s: float
    """User + system CPU seconds of every process seen in the tree (Ray's daemons and workers included, each
    as last sampled, so up to ``interval`` s of each one's end is missed): far less sensitive to other jobs on
    the machine than the wall time."""
    load_before: float
    load_after: float
    """1-minute load average when the command started and ended: what else the machine was doing."""
    peak_parts: dict[str, float]
    """The peak sample's RSS (MB) by process, named by its command line's head (Ray names its workers
    ``ray::<class>``): which part of the tree holds the memory."""
    processes: list[Trace] = field(default_factory=list)
    """Every process seen, with its own peak and its RSS at the end of each phase."""


@dataclass
class Trace:
    """One process of the tree: its name, its peak RSS (MB) and, per phase of the command (``phase``: e.g.
    rounds finished), the largest and the last RSS seen in it."""

    pid: int
    name: str
    peak_mb: float = 0.0
    phase_peak_mb: dict[int, float] = field(default_factory=dict)
    phase_last_mb: dict[int, float] = field(default_factory=dict)

    def see(self, phase: int, mb: float) -> None:
        self.peak_mb = max(self.peak_mb, mb)
        self.phase_peak_mb[phase] = max(self.phase_peak_mb.get(phase, 0.0), mb)
        self.phase_last_mb[phase] = mb


def _sample(
    root: psutil.Process, cpu: dict[tuple[int, float], float], traces: dict[int, Trace], phase: int
) -> dict[str, int]:
    """The tree's RSS now by process name (the command line's head); each live process's CPU seconds so
    far go into ``cpu`` (keyed by pid and start), its RSS into its ``traces`` entry under ``phase``."""
    parts: dict[str, int] = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            with proc.oneshot():
                name = " ".join(proc.cmdline()[:3])[:60] or proc.name()
                rss = proc.memory_info().rss
                parts[name] = parts.get(name, 0) + rss
                trace = traces.setdefault(proc.pid, Trace(proc.pid, name))
                trace.name = name  # a Ray worker starts as ray::IDLE and takes its actor's name later
                trace.see(phase, rss / 2**20)
                times = proc.cpu_times()
                cpu[(proc.pid, proc.create_time())] = times.user + times.system
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return parts


def run_measured(
    argv: list[str],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    log: Path | None = None,
    interval: float = 0.2,
    phase: Callable[[], int] = lambda: 0,
) -> Measured:
    """Run ``argv`` to completion (its output to ``log`` if given) while polling the tree's memory; each
    sample is filed under ``phase()`` (e.g. the rounds the run has finished)."""
    load_before = os.getloadavg()[0]
    cpu: dict[tuple[int, float], float] = {}
    traces: dict[int, Trace] = {}
    sink = open(log, "w") if log is not None else subprocess.DEVNULL  # noqa: SIM115  (closed in the finally below)
    try:
        start = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=sink, stderr=subprocess.STDOUT)
        root, peak, peak_parts = psutil.Process(proc.pid), 0, {}
        while proc.poll() is None:
            try:
                parts = _sample(root, cpu, traces, phase())
            except psutil.NoSuchProcess:
                break
            if sum(parts.values()) > peak:
                peak, peak_parts = sum(parts.values()), parts
            time.sleep(interval)
        code = proc.wait()
        wall = time.perf_counter() - start
    finally:
        if not isinstance(sink, int):  # a file we opened, not subprocess.DEVNULL
            sink.close()
    return Measured(
        wall,
        peak / 2**20,
        code,
        sum(cpu.values()),
        load_before,
        os.getloadavg()[0],
        {name: rss / 2**20 for name, rss in sorted(peak_parts.items(), key=lambda item: -item[1])},
        list(traces.values()),
    )
