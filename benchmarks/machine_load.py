"""What other processes are doing to the machine while a benchmark runs (a loaded machine's numbers are not
results). Imported by the benchmark scripts, which run with benchmarks/ on sys.path."""

from __future__ import annotations

import contextlib
import json
import os
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


def steal_s() -> float | None:
    """CPU seconds the hypervisor has given to other guests since boot (Linux's `steal`; None elsewhere).

    Other processes in this machine are what `other_cpu_load` sees; other virtual machines on the same host
    are not, but while they take this machine's cores its clock still runs. The difference of two readings
    over a benchmark says how much of its time was taken that way."""
    return getattr(psutil.cpu_times(), "steal", None)


MAX_STEAL_S = 5.0


def add_max_steal_flag(parser, unit: str, replaced: str) -> None:
    """`--max_steal`: a `unit` (pair or repeat of runs) in which any run lost more CPU seconds to the
    hypervisor than this is kept in the output but left out of the ratios, and `replaced` says what runs in
    its place; negative keeps every one."""
    parser.add_argument(
        "--max_steal",
        type=float,
        default=MAX_STEAL_S,
        help=f"a {unit} in which any run had more CPU seconds stolen by the hypervisor than this is kept in the "
        f"output but left out of the ratios, and {replaced}; negative: keep every {unit}",
    )


def within_steal(runs, max_steal: float) -> bool:
    """Whether each run's `steal_s` (None: not counted, taken as 0) is at most `max_steal` (negative: always)."""
    return max_steal < 0 or all((r["steal_s"] or 0.0) <= max_steal for r in runs)


def titans_settings(stderr: str) -> str | None:
    """What a Titans command's first stderr line (titans.logs.run_cli) says it runs with: its host allocator,
    XLA:CPU flags and compilation cache; None if it printed none. (Read here, not imported from titans.logs,
    which imports JAX, so that a benchmark's PyTorch side does not pay for it.)"""
    prefix = "titans process settings: "
    return next((line[len(prefix) :] for line in stderr.splitlines() if line.startswith(prefix)), None)


def stolen_since(before: float | None) -> float | None:
    """Seconds of steal since the `steal_s()` reading `before` (None where steal is not counted)."""
    after = steal_s()
    return None if before is None or after is None else after - before


def is_contaminated(loads, cores: int) -> bool:
    """True when other processes kept more than a quarter of the cores this benchmark uses busy."""
    return max(loads) > 0.25 * max(1, cores)


def banner(loads, cores: int) -> str:
    """The loud header a contaminated run prints above its table ('' when the machine was quiet)."""
    if not is_contaminated(loads, cores):
        return ""
    bar = "!" * 100
    return (
        f"{bar}\nNOT A RESULT: other processes kept {list(loads)} cores busy (before, after) while this ran on "
        f"{cores} cores.\nStop them (or pause them: kill -STOP PID) and measure again. Do not publish the table "
        f"below.\n{bar}"
    )


def write_result(path: str, result: dict, indent: int = 1) -> None:
    """Writes a benchmark's raw result as JSON to `path` (creating its folder) and says so."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=indent)
    print(f"\nwrote {path}")
