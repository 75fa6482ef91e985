"""A model's initialisation on a fresh process: eager construction against `titans.models.initialise`.

Built eagerly, every parameter initialiser is its own small XLA program, compiled on first use in a process;
on XLA:CPU the random normals (threefry and an inverse-erf polynomial) took 0.3-1.5 s each to compile.
`titans.models.build_model` runs the whole constructor as one jitted program, at LLVM optimisation level 0
on CPU (`registry.INIT_COMPILER_OPTIONS_CPU`). This script times, for each model, the three ways in fresh
subprocesses (nothing compiled yet, JAX's persistent compilation cache off), interleaved per repeat in a
rotating order:

* ``eager``: ``create_model(...)`` op by op;
* ``jit``: one jitted program at XLA's default optimisation level;
* ``jit_o0``: what Titans runs (``initialise``).

The time is construction until every value is ready, the imports and backend start excluded. Reported:
medians over repeats and each way's time / eager's time per repeat.

    python benchmarks/init_speed.py --repeats 5 --out benchmarks/results/init_speed_DATE.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from machine_load import banner, is_contaminated, other_cpu_load, write_result

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {
    "cnn_teacher": ("cnn", (28, 28, 1), {"channels": [32, 64], "dense": 128, "conv_impl": "auto"}),
    "cnn_student": ("cnn", (28, 28, 1), {"channels": [8, 16], "dense": 32, "conv_impl": "auto"}),
    "resnet20": ("resnet20", (32, 32, 3), {}),
}
WAYS = ("eager", "jit", "jit_o0")

CHILD = r"""
import json, sys, time
sys.path.insert(0, {root!r})
from titans import logs
logs.process_setup()
import jax
from flax import nnx
from titans import models
from titans.models import registry
name, shape, kwargs, way = {name!r}, {shape!r}, {kwargs!r}, {way!r}
jax.block_until_ready(jax.numpy.zeros(()))  # start the backend before the clock
make = lambda: models.create_model(name, num_classes=10, input_shape=shape, rngs=nnx.Rngs(0), **kwargs)
t0 = time.perf_counter()
if way == "eager":
    model = make()
else:
    if way == "jit":
        registry.INIT_COMPILER_OPTIONS_CPU = None
    model = models.initialise(make)
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
print(json.dumps({{"seconds": time.perf_counter() - t0}}))
"""


def run_child(name: str, way: str) -> float:
    model, shape, kwargs = MODELS[name]
    code = CHILD.format(root=ROOT, name=model, shape=shape, kwargs=kwargs, way=way)
    env = {**os.environ, "TITANS_COMPILATION_CACHE": "off"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{name} {way} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    load_before = other_cpu_load()
    seconds = {n: {w: [] for w in WAYS} for n in names}
    for rep in range(args.repeats):
        for name in names:
            order = WAYS[rep % len(WAYS) :] + WAYS[: rep % len(WAYS)]
            for way in order:
                seconds[name][way].append(run_child(name, way))
    loads = [load_before, other_cpu_load()]
    threads = len(os.sched_getaffinity(0))
    rows = {}
    for name in names:
        s = seconds[name]
        rows[name] = {
            "seconds": s,
            "median_s": {w: statistics.median(s[w]) for w in WAYS},
            "over_eager_per_repeat": {w: [a / b for a, b in zip(s[w], s["eager"])] for w in WAYS if w != "eager"},
        }
    print(banner(loads, threads), end="")
    print(f"\n## Model initialisation in a fresh process, {threads} threads ({args.repeats} repeats)\n")
    print(f"- other processes' CPU load (cores): before {loads[0]}, after {loads[1]}\n")
    print("| model | eager s | jit s | jit at level 0 s (Titans) | jit / eager | level 0 / eager |")
    print("|---|---:|---:|---:|---|---|")
    for name, r in rows.items():
        m, o = r["median_s"], r["over_eager_per_repeat"]
        span = lambda v: f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})"
        print(
            f"| {name} | {m['eager']:.2f} | {m['jit']:.2f} | {m['jit_o0']:.2f} | {span(o['jit'])} | {span(o['jit_o0'])} |"
        )
    if args.out:
        result = {
            "command": "python benchmarks/init_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "threads": threads,
            "repeats": args.repeats,
            "other_load_cores": loads,
            "contaminated": is_contaminated(loads, threads),
            "rows": rows,
        }
        write_result(args.out, result)


if __name__ == "__main__":
    main()
