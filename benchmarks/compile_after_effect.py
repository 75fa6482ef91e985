"""Does compiling in a process slow that process's training steps down? A step compiled here against the same
step loaded from JAX's persistent compilation cache, each in a fresh process.

The quickstart's first run (empty compilation cache) took 20-30 s longer than a warm one, but only about 12 s
of that was logged compilation (docs/benchmarks.md, "Why a first run is slower than its compile time"). This script isolates the rest:
each child process builds the quickstart teacher's (or student's, or the online-KD) train step with Titans'
process settings (`titans.logs.process_setup`: host allocator, XLA:CPU flags, compilation cache), makes the
first call, and then times `--rounds` rounds of `--steps` steps. The only difference between the two kinds
of child is the cache directory:

* ``compiled``: a new, empty cache directory, so the first call compiles the step (and the model's
  initialiser) in this process;
* ``loaded``: the directory the ``compiled`` child of the same pair filled, so nothing is compiled here.

Each child counts its persistent-cache hits and misses (JAX's monitoring events), so the JSON shows that
the ``compiled`` child compiled and the ``loaded`` one did not. Per child: the median milliseconds per step over the rounds, and per step the voluntary context switches,
user CPU milliseconds and minor page faults of the whole process (getrusage). The pair's order alternates
(even pairs compile first; odd pairs load the previous pair's cache first and then compile), and the ratio
compiled / loaded is reported as a geometric mean with its 95% interval (`titans.stats.time_ratio`).
`--host_malloc default` runs both with glibc's allocator defaults (`TITANS_HOST_MALLOC=default`).

    python benchmarks/compile_after_effect.py --pairs 4 --out benchmarks/results/compile_after_effect_DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_load import banner, is_contaminated, other_cpu_load, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from titans.stats import time_ratio

KINDS = ("teacher", "student", "kd")

CHILD = r"""
import json, os, resource, sys, time
sys.path[:0] = [{bench!r}, {root!r}]
from titans import logs
settings = logs.process_setup()
import jax
import numpy as np
import step_speed
cache = {{"hits": 0, "misses": 0}}
def count(event, **kwargs):
    for key in cache:
        if event == "/jax/compilation_cache/cache_" + key:
            cache[key] += 1
jax.monitoring.register_event_listener(count)
kind, steps, rounds = {kind!r}, {steps!r}, {rounds!r}
args = step_speed.parse_args(["--steps", str(steps)])
side = step_speed.TitansSide(args, 10_000)
step, state, teacher = side.make(kind)
rng = np.random.default_rng(0)
batches = side.batches(rng.integers(0, 256, (4, 128, 28, 28, 1), dtype=np.uint8), rng.integers(0, 10, (4, 128)))
t0 = time.perf_counter()
state, metrics = step(state, batches[0], teacher)
jax.block_until_ready((state, metrics))
first_s = time.perf_counter() - t0
ms = []
before = resource.getrusage(resource.RUSAGE_SELF)
for r in range(rounds):
    t0 = time.perf_counter()
    for i in range(steps):
        state, metrics = step(state, batches[i % len(batches)], teacher)
    jax.block_until_ready((state, metrics))
    ms.append((time.perf_counter() - t0) / steps * 1e3)
after = resource.getrusage(resource.RUSAGE_SELF)
n = rounds * steps
per_step = lambda field: (getattr(after, field) - getattr(before, field)) / n
print(json.dumps({{
    "first_call_s": first_s,
    "ms_per_step": ms,
    "voluntary_switches_per_step": per_step("ru_nvcsw"),
    "user_cpu_ms_per_step": per_step("ru_utime") * 1e3,
    "minor_faults_per_step": per_step("ru_minflt"),
    "threads": len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else None,
    "host_malloc": settings["host_malloc"],
    "cache_hits": cache["hits"],
    "cache_misses": cache["misses"],
}}))
"""


def run_child(args, cache_dir: str) -> dict:
    code = CHILD.format(
        bench=os.path.dirname(os.path.abspath(__file__)),
        root=ROOT,
        kind=args.kind,
        steps=args.steps,
        rounds=args.rounds,
    )
    env = {**os.environ, "TITANS_COMPILATION_CACHE": cache_dir, "TITANS_HOST_MALLOC": args.host_malloc}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # it would override the directory given here
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"child ({cache_dir}) failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["median_ms"] = statistics.median(result["ms_per_step"])
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kind", choices=KINDS, default="teacher", help="which train step (step_speed.py's kinds)")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--steps", type=int, default=60, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--host_malloc", choices=("reuse", "default"), default="reuse", help="TITANS_HOST_MALLOC")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.steps < 1 or args.rounds < 1:
        raise SystemExit("--pairs, --steps and --rounds must be at least 1")
    load_before = other_cpu_load()
    scratch = tempfile.mkdtemp(prefix="titans_compile_after_")
    pairs = []
    try:
        previous = None  # the cache directory an earlier pair filled
        for i in range(args.pairs):
            fresh = os.path.join(scratch, f"cache{i}")
            if i % 2 == 1 and previous is not None:
                loaded = run_child(args, previous)
                compiled = run_child(args, fresh)
                order = "loaded first"
            else:
                compiled = run_child(args, fresh)
                loaded = run_child(args, fresh)
                order = "compiled first"
            previous = fresh
            pairs.append({"order": order, "compiled": compiled, "loaded": loaded})
            print(
                f"pair {i}: compiled {compiled['median_ms']:.1f} ms, loaded {loaded['median_ms']:.1f} ms ({order})",
                file=sys.stderr,
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loads = [load_before, other_cpu_load()]
    threads = len(os.sched_getaffinity(0))
    ratio = time_ratio([q["compiled"]["median_ms"] for q in pairs], [q["loaded"]["median_ms"] for q in pairs])
    med = lambda side, key: statistics.median(q[side][key] for q in pairs)
    print(banner(loads, threads), end="")
    print(
        f"\n## The {args.kind} step in a process that compiled it against one that loaded it "
        f"({args.pairs} pairs, host_malloc={args.host_malloc}, {threads} threads)\n"
    )
    print(f"- other processes' CPU load (cores): before {loads[0]}, after {loads[1]}\n")
    print("| process | ms / step | voluntary switches / step | user CPU ms / step | minor faults / step | threads |")
    print("|---|---:|---:|---:|---:|---:|")
    for side in ("compiled", "loaded"):
        print(
            f"| {side} | {med(side, 'median_ms'):.1f} | {med(side, 'voluntary_switches_per_step'):.0f} | "
            f"{med(side, 'user_cpu_ms_per_step'):.1f} | {med(side, 'minor_faults_per_step'):.0f} | "
            f"{med(side, 'threads'):.0f} |"
        )
    print(f"\ncompiled / loaded time per step: {ratio.describe('compiled', 'loaded')}")
    if args.out:
        write_result(
            args.out,
            {
                "command": "python benchmarks/compile_after_effect.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "kind": args.kind,
                "host_malloc": args.host_malloc,
                "threads": threads,
                "steps": args.steps,
                "rounds": args.rounds,
                "other_load_cores": loads,
                "contaminated": is_contaminated(loads, threads),
                "pairs": pairs,
                "compiled_over_loaded": ratio.as_dict("compiled", "loaded"),
            },
        )


if __name__ == "__main__":
    main()
