"""What other processes are doing to the machine while a benchmark runs (a loaded machine's numbers are not
results). Imported by the benchmark scripts, which run with benchmarks/ on sys.path."""

from __future__ import annotations

import contextlib
import time

import psutil


def other_cpu_load(interval_s: float = 1.0) -> float:
    """Cores kept busy by processes other than this one (and its children), measured over an interval."""
    me = psutil.Process()
    skip = {me.pid, *(c.pid for c in me.children(recursive=True))}
    procs = [p for p in psutil.process_iter() if p.pid not in skip]
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.cpu_percent(None)
    time.sleep(interval_s)
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.cpu_percent(None)
    return round(total / 100.0, 2)
