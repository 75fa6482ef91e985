"""Where a training run's time goes outside the model: page faults, context switches, kernel CPU time.

Runs the same short training job (`titans-train`, a fresh workdir each time) under each variant, in a
child process, alternating the variants over `--repeats`, and reports the child's own resource usage
(os.wait4): minor page faults, voluntary and involuntary context switches, user and kernel CPU seconds,
wall time, and the run's `train_examples_per_s` (results.json: over the whole run, compilation
excluded). Counts (faults, voluntary switches) do not depend on what else runs on the machine; times do,
so the table carries the other processes' load and a loud banner when it was too high.

    python benchmarks/runtime_overhead.py --steps 300 --repeats 2 --out /tmp/overhead.json
    python benchmarks/runtime_overhead.py --config configs/fmnist_teacher.py:0 \
        --variant default:TITANS_HOST_MALLOC=default --variant reuse:TITANS_HOST_MALLOC=reuse

A variant is NAME:VAR=VALUE[,VAR=VALUE...] (environment variables set for the child only); the default
variants compare glibc's allocator settings with titans.host_malloc's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_load import banner, is_contaminated, other_cpu_load

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_VARIANTS = ("glibc_default:TITANS_HOST_MALLOC=default", "host_malloc_reuse:TITANS_HOST_MALLOC=reuse")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, sep, assignments = text.partition(":")
    if not sep or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ValueError(f"--variant {text!r}: expected NAME:VAR=VALUE[,VAR=VALUE...]")
    env = {}
    for item in filter(None, assignments.split(",")):
        key, eq, value = item.partition("=")
        if not eq or not _ENV_NAME.match(key):
            raise ValueError(f"--variant {text!r}: {item!r} is not VAR=VALUE with an upper-case variable name")
        env[key] = value
    return name, env


def run_once(args, env_extra: dict[str, str]) -> dict:
    workdir = tempfile.mkdtemp(prefix="titans_overhead_")
    cmd = [
        sys.executable,
        "-m",
        "titans.main",
        f"--config={args.config}",
        f"--config.total_steps={args.steps}",
        f"--config.checkpoint.every_steps={args.steps}",
        f"--workdir={workdir}",
    ]
    env = dict(os.environ, **env_extra)
    t0 = time.perf_counter()
    # stderr to a file, not a pipe: the run logs more than a pipe holds, and wait4 would wait forever.
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=log)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here: Popen must not wait again
        wall = time.perf_counter() - t0
        log.seek(0)
        err = log.read()
    try:
        code = proc.returncode
        if code != 0:
            raise RuntimeError(f"{shlex.join(cmd)} failed (exit {code}):\n{err[-3000:]}")
        results_path = os.path.join(workdir, "results.json")
        with open(results_path) as f:
            results = json.load(f)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "minor_faults": usage.ru_minflt,
        "voluntary_switches": usage.ru_nvcsw,
        "involuntary_switches": usage.ru_nivcsw,
        "user_s": usage.ru_utime,
        "system_s": usage.ru_stime,
        "wall_s": wall,
        "max_rss_mb": usage.ru_maxrss / 1024,
        "train_examples_per_s": results.get("train_examples_per_s"),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/fmnist_teacher.py:0", help="config[:arg] (total_steps is set)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--repeats", type=int, default=2, help="runs of every variant, alternated")
    p.add_argument("--variant", action="append", default=None, help="NAME:VAR=VALUE[,VAR=VALUE...]; repeatable")
    p.add_argument("--out", default="", help="write every run's numbers as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.repeats < 1:
        p.error("--steps and --repeats must be >= 1")
    try:
        variants = [parse_variant(v) for v in (args.variant or DEFAULT_VARIANTS)]
    except ValueError as e:
        p.error(str(e))

    load_before = other_cpu_load()
    runs: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for r in range(args.repeats):
        for name, env in variants:
            print(f"[overhead] repeat {r + 1}/{args.repeats}: {name}", file=sys.stderr, flush=True)
            runs[name].append(run_once(args, env))
    loads = (load_before, other_cpu_load())
    cores = len(os.sched_getaffinity(0))
    result = {
        "command": "python benchmarks/runtime_overhead.py " + shlex.join(sys.argv[1:] if argv is None else argv),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cores": cores,
        "other_load_cores": {"before": loads[0], "after": loads[1]},
        "contaminated": is_contaminated(loads, cores),
        "variants": dict(variants),
        "runs": runs,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    warning = banner(loads, cores)
    if warning:
        print(warning)
    print(f"\n## Runtime overhead: {args.steps} training steps of {args.config}\n")
    print(f"- command: `{result['command']}`; {result['date']}; {cores} cores; other processes' load {list(loads)}")
    print("- medians over repeats; faults and switches are per training step (whole run / steps)\n")
    cols = [
        ("minor_faults", "minor faults / step", "{:,.0f}", True),
        ("voluntary_switches", "voluntary switches / step", "{:,.1f}", True),
        ("involuntary_switches", "involuntary switches / step", "{:,.1f}", True),
        ("user_s", "user CPU s", "{:.1f}", False),
        ("system_s", "kernel CPU s", "{:.1f}", False),
        ("wall_s", "wall s", "{:.1f}", False),
        ("max_rss_mb", "peak RSS MB", "{:,.0f}", False),
        ("train_examples_per_s", "train examples/s", "{:,.0f}", False),
    ]
    print("| variant | " + " | ".join(c[1] for c in cols) + " |")
    print("|---|" + "---:|" * len(cols))
    for name, rs in runs.items():
        cells = []
        for key, _, fmt, per_step in cols:
            values = [x[key] for x in rs if x[key] is not None]
            v = statistics.median(values) if values else float("nan")
            cells.append(fmt.format(v / args.steps if per_step else v))
        print(f"| {name} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
