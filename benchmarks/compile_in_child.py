"""A first run with its steps compiled in a child process (`TITANS_COMPILE_IN_CHILD=on`) against the same run
compiling them itself: does moving the compile out of the training process pay for the child?

`benchmarks/compile_after_effect.py` found that a process that compiled its train step ran it more slowly
than a process that loaded it from the compilation cache. `titans.train.precompile` compiles each stage's
train and eval steps in a child, so that the run only loads them, at the price of starting that child. This
script runs `python -m titans.main --config=CONFIG` with an empty compilation cache both ways, in pairs
whose order alternates (even pairs: off first), and reports per pair the wall time of the whole command,
the CPU time the hypervisor gave other virtual machines meanwhile (`stolen s`: a host shared with other
guests slows a run without any process here showing it), and each stage's `train_examples_per_s` (compilation of the first step left out), with each accuracy to
show that both ways trained the same programs; then the paired ratios on/off with their 95% intervals
(`titans.stats.time_ratio`).

    python benchmarks/compile_in_child.py --pairs 4 --out benchmarks/results/compile_in_child_DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_load import banner, is_contaminated, other_cpu_load, steal_s, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from titans.stats import time_ratio

MODES = ("off", "on")


def run_once(args, mode: str, scratch: str, tag: str) -> dict:
    workdir = os.path.join(scratch, f"run_{tag}")
    env = {
        **os.environ,
        "TITANS_COMPILE_IN_CHILD": mode,
        "TITANS_COMPILATION_CACHE": os.path.join(scratch, f"cache_{tag}"),  # new and empty
        "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p),
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "titans.main", f"--config={args.config}", f"--workdir={workdir}"]
    command += [f"--config.{setting}" for setting in args.set]
    t0, steal0 = time.perf_counter(), steal_s()
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False, cwd=ROOT)
    wall, steal1 = time.perf_counter() - t0, steal_s()
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(command)} ({mode}) failed:\n{out.stderr[-3000:]}")
    stages = {}
    for name in ["", *sorted(os.listdir(workdir))]:  # a single run's results.json, or each stage's
        path = os.path.join(workdir, name, "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)
            stages[name or "run"] = {k: r[k] for k in ("train_time_s", "train_examples_per_s", "accuracy")}
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(env["TITANS_COMPILATION_CACHE"], ignore_errors=True)
    stolen = None if steal0 is None else steal1 - steal0
    # The trainer logs one line per stage whose steps a child compiled (titans.train.precompile).
    children = out.stderr.count("steps compiled in a child")
    return {"mode": mode, "wall_s": wall, "steal_s": stolen, "children_compiled": children, "stages": stages}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.py:0.3")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a --config.FIELD=VALUE")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.pairs < 1:
        raise SystemExit("--pairs must be at least 1")
    load_before = other_cpu_load()
    scratch = tempfile.mkdtemp(prefix="titans_compile_in_child_")
    pairs = []
    try:
        for i in range(args.pairs):
            order = MODES if i % 2 == 0 else MODES[::-1]
            runs = {mode: run_once(args, mode, scratch, f"{i}_{mode}") for mode in order}
            pairs.append({"order": list(order), **runs})
            print(f"pair {i}: " + ", ".join(f"{m} {runs[m]['wall_s']:.1f} s" for m in order), file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loads = [load_before, other_cpu_load()]
    threads = len(os.sched_getaffinity(0))
    wall = time_ratio([q["on"]["wall_s"] for q in pairs], [q["off"]["wall_s"] for q in pairs])
    per_example = {
        stage: time_ratio(
            [1 / q["on"]["stages"][stage]["train_examples_per_s"] for q in pairs],
            [1 / q["off"]["stages"][stage]["train_examples_per_s"] for q in pairs],
        )
        for stage in pairs[0]["off"]["stages"]
    }
    print(banner(loads, threads), end="")
    print(f"\n## {args.config}, a cold cache: steps compiled in a child (on) or in the run (off), {args.pairs} pairs\n")
    print(f"- other processes' CPU load (cores): before {loads[0]}, after {loads[1]}\n")
    stages = list(per_example)
    print("| pair | mode | wall s | stolen s | " + " | ".join(f"{s} ex/s | {s} acc" for s in stages) + " |")
    print("|---:|---|---:|---:|" + "---:|---:|" * len(stages))
    for i, q in enumerate(pairs):
        for mode in q["order"]:
            r = q[mode]
            cells = " | ".join(
                f"{r['stages'][s]['train_examples_per_s']:,.0f} | {r['stages'][s]['accuracy']:.4f}" for s in stages
            )
            stolen = "-" if r["steal_s"] is None else f"{r['steal_s']:.1f}"
            print(f"| {i} | {mode} | {r['wall_s']:.1f} | {stolen} | {cells} |")
    print(f"\non / off, wall time: {wall.describe('on', 'off')}")
    for stage, r in per_example.items():
        print(f"on / off, {stage} time per example: {r.describe('on', 'off')}")
    if args.out:
        write_result(
            args.out,
            {
                "command": "python benchmarks/compile_in_child.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "config": args.config,
                "threads": threads,
                "other_load_cores": loads,
                "contaminated": is_contaminated(loads, threads),
                "pairs": pairs,
                "on_over_off": {
                    "wall": wall.as_dict("on", "off"),
                    **{f"{s}_time_per_example": r.as_dict("on", "off") for s, r in per_example.items()},
                },
            },
        )


if __name__ == "__main__":
    main()
