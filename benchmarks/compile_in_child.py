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
(`titans.stats.time_ratio`). A pair in which the hypervisor took more than `--max_steal` CPU seconds from
either run is reported but left out of the ratios, and another is run in its place.

    python benchmarks/compile_in_child.py --pairs 4 --out benchmarks/results/compile_in_child_DATE.json

`--compare jemalloc` runs the same pairs for another question: the run under jemalloc (on:
``TITANS_HOST_MALLOC=jemalloc``, which re-executes the command with `--jemalloc` preloaded and page decay
off, `titans.host_malloc`) against glibc with Titans' `reuse` settings (off); the child is off in both. With
`--compare child` both runs use the host allocator's default (``auto``).

    python benchmarks/compile_in_child.py --compare jemalloc --pairs 4 --out benchmarks/results/jemalloc_DATE.json

`--compare revision --old_rev REV` runs this checkout (on) against the `titans/` and `configs/` of an earlier
commit (off, extracted with `git archive` into a scratch directory), each with its own defaults: what a change
of the code bought a first run.

    python benchmarks/compile_in_child.py --compare revision --old_rev 848b6bc --config configs/quickstart.py:0.05
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_load import (
    add_max_steal_flag,
    banner,
    is_contaminated,
    other_cpu_load,
    steal_s,
    stolen_since,
    titans_settings,
    within_steal,
    write_result,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from titans import host_malloc
from titans.stats import time_ratio

MODES = ("off", "on")
ALLOCATOR_ENV = ("LD_PRELOAD", "MALLOC_CONF", "TITANS_HOST_MALLOC", "TITANS_JEMALLOC")
COMPARED = {
    "child": "steps compiled in a child (on) or in the run (off)",
    "jemalloc": "jemalloc (on) or glibc (off)",
    "revision": "this checkout (on) or --old_rev (off)",
}


def mode_env(args, mode: str) -> dict:
    """The environment that makes `mode` of the comparison."""
    if args.compare == "child":
        return {"TITANS_COMPILE_IN_CHILD": mode}
    if args.compare == "revision":
        return {}  # each side with its own defaults
    if mode == "on":
        return {"TITANS_COMPILE_IN_CHILD": "off", "TITANS_HOST_MALLOC": "jemalloc", "TITANS_JEMALLOC": args.jemalloc}
    return {"TITANS_COMPILE_IN_CHILD": "off", "TITANS_HOST_MALLOC": "reuse"}


def extract_revision(rev: str, into: str) -> str:
    """`titans/` and `configs/` of commit `rev` of this repository, extracted into `into`; its full hash."""
    found = subprocess.run(  # --end-of-options: a value starting with "-" is a revision, never an option
        ["git", "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if found.returncode != 0:
        raise SystemExit(f"--old_rev {rev!r}: not a commit of {ROOT}")
    commit = found.stdout.strip()
    with tempfile.TemporaryFile() as tar:
        subprocess.run(["git", "archive", commit, "titans", "configs"], cwd=ROOT, stdout=tar, check=True)
        tar.seek(0)
        with tarfile.open(fileobj=tar) as t:
            t.extractall(into, filter="data")
    return commit


def run_once(args, mode: str, scratch: str, tag: str) -> dict:
    workdir = os.path.join(scratch, f"run_{tag}")
    root = os.path.join(scratch, "old") if args.compare == "revision" and mode == "off" else ROOT
    env = {
        **{k: v for k, v in os.environ.items() if k not in (*ALLOCATOR_ENV, "TITANS_HOST_MALLOC_REEXECUTED")},
        **mode_env(args, mode),
        "TITANS_COMPILATION_CACHE": os.path.join(scratch, f"cache_{tag}"),  # new and empty
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
    }
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, "-m", "titans.main", f"--config={args.config}", f"--workdir={workdir}"]
    command += [f"--config.{setting}" for setting in args.set]
    with tempfile.TemporaryFile("w+") as err:
        t0, steal0 = time.perf_counter(), steal_s()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=root)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own resource use: peak memory, faults, switches
        wall, stolen = time.perf_counter() - t0, stolen_since(steal0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        stderr = err.read()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} ({mode}) failed:\n{stderr[-3000:]}")
    stages = {}
    for name in ["", *sorted(os.listdir(workdir))]:  # a single run's results.json, or each stage's
        path = os.path.join(workdir, name, "results.json")
        if os.path.isfile(path):
            with open(path) as f:
                r = json.load(f)
            stages[name or "run"] = {k: r[k] for k in ("train_time_s", "train_examples_per_s", "accuracy")}
    shutil.rmtree(workdir, ignore_errors=True)
    shutil.rmtree(env["TITANS_COMPILATION_CACHE"], ignore_errors=True)
    # The trainer logs one line per stage whose steps a child compiled (titans.train.precompile).
    children = stderr.count("steps compiled in a child")
    return {
        "mode": mode,
        "wall_s": wall,
        "steal_s": stolen,
        "children_compiled": children,
        "process_settings": titans_settings(stderr),  # the host allocator it ran with
        "peak_rss_mb": usage.ru_maxrss / 1024,  # KiB on Linux
        "minor_faults": usage.ru_minflt,
        "context_switches": usage.ru_nvcsw + usage.ru_nivcsw,
        "stages": stages,
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/quickstart.py:0.3")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="a --config.FIELD=VALUE")
    p.add_argument("--pairs", type=int, default=4, help="pairs to keep (see --max_steal)")
    add_max_steal_flag(p, "pair", "another pair is run in its place (at most --pairs more)")
    p.add_argument("--compare", choices=sorted(COMPARED), default="child", help="what on and off differ in")
    p.add_argument(
        "--jemalloc",
        default="",
        help="--compare jemalloc: the library (default: where titans.host_malloc finds it, or TITANS_JEMALLOC)",
    )
    p.add_argument("--old_rev", default="", help="--compare revision: the commit to run as off")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.pairs < 1:
        raise SystemExit("--pairs must be at least 1")
    if args.compare == "jemalloc":
        args.jemalloc = args.jemalloc or host_malloc.find_jemalloc() or ""
        if not os.path.isfile(args.jemalloc):
            raise SystemExit(
                f"--jemalloc {args.jemalloc!r}: no such file (Debian/Ubuntu: apt-get install libjemalloc2)"
            )
    if (args.compare == "revision") != bool(args.old_rev):
        raise SystemExit("--old_rev goes with --compare revision, and --compare revision needs it")
    load_before = other_cpu_load()
    scratch = tempfile.mkdtemp(prefix="titans_compile_in_child_")
    pairs = []
    try:
        old_commit = extract_revision(args.old_rev, os.path.join(scratch, "old")) if args.old_rev else None
        i = 0
        while sum(q["kept"] for q in pairs) < args.pairs and i < 2 * args.pairs:
            order = MODES if i % 2 == 0 else MODES[::-1]
            runs = {mode: run_once(args, mode, scratch, f"{i}_{mode}") for mode in order}
            kept = within_steal(runs.values(), args.max_steal)
            pairs.append({"order": list(order), "kept": kept, **runs})
            print(
                f"pair {i}: "
                + ", ".join(f"{m} {runs[m]['wall_s']:.1f} s" for m in order)
                + ("" if kept else " (stolen)"),
                file=sys.stderr,
            )
            i += 1
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    loads = [load_before, other_cpu_load()]
    threads = len(os.sched_getaffinity(0))
    kept = [q for q in pairs if q["kept"]]
    stages = list(pairs[0]["off"]["stages"])
    ratios = {}  # an interval needs two pairs
    if len(kept) >= 2:
        ratios["wall time"] = time_ratio([q["on"]["wall_s"] for q in kept], [q["off"]["wall_s"] for q in kept])
        for stage in stages:
            ratios[f"{stage} time per example"] = time_ratio(
                [1 / q["on"]["stages"][stage]["train_examples_per_s"] for q in kept],
                [1 / q["off"]["stages"][stage]["train_examples_per_s"] for q in kept],
            )
    print(banner(loads, threads), end="")
    print(f"\n## {args.config}, a cold cache: {COMPARED[args.compare]}, {len(kept)} pairs kept of {len(pairs)}\n")
    print(f"- other processes' CPU load (cores): before {loads[0]}, after {loads[1]}\n")
    print(
        "| pair | mode | wall s | stolen s | peak RSS MB | minor faults | switches | "
        + " | ".join(f"{s} ex/s | {s} acc" for s in stages)
        + " |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|" + "---:|---:|" * len(stages))
    for i, q in enumerate(pairs):
        tag = "" if q["kept"] else " (stolen: left out)"
        for mode in q["order"]:
            r = q[mode]
            cells = " | ".join(
                f"{r['stages'][s]['train_examples_per_s']:,.0f} | {r['stages'][s]['accuracy']:.4f}" for s in stages
            )
            stolen = "-" if r["steal_s"] is None else f"{r['steal_s']:.1f}"
            print(
                f"| {i}{tag} | {mode} | {r['wall_s']:.1f} | {stolen} | {r['peak_rss_mb']:,.0f} | {r['minor_faults']:,} | "
                f"{r['context_switches']:,} | {cells} |"
            )
    print()
    for name, r in ratios.items():
        print(f"on / off, {name}: {r.describe('on', 'off')}")
    if not ratios:
        print(f"{len(kept)} of {len(pairs)} pairs kept (at most {args.max_steal} s stolen): too few for a ratio")
    if args.out:
        write_result(
            args.out,
            {
                "command": "python benchmarks/compile_in_child.py "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "config": args.config,
                "compare": args.compare,
                "on_env": mode_env(args, "on"),
                "old_commit": old_commit,
                "threads": threads,
                "other_load_cores": loads,
                "contaminated": is_contaminated(loads, threads),
                "max_steal_s": args.max_steal,
                "pairs": pairs,
                # keys: wall, STAGE_time_per_example
                "on_over_off": {
                    name.removesuffix(" time").replace(" ", "_"): r.as_dict("on", "off") for name, r in ratios.items()
                }
                or None,
            },
        )


if __name__ == "__main__":
    main()
