"""XLA:CPU's convolution kernels, YNNPACK against Eigen, on Titans' real steps: a paired A/B in one process.

jax 0.10's XLA:CPU hands each convolution to YNNPACK; `titans.xla_cpu` (applied by every console script)
takes them back to XLA's own Eigen kernels. This script compiles each step twice in the same process, with
the fusion types as per-executable compiler options (`YNN_DEFAULTS` from conv_layers.py: jax 0.10's
defaults; and the same without "individual_convolution", what `titans.xla_cpu` leaves), and times the two
back to back in every repeat, alternating which goes first. Steps: the teacher's and the student's
cross-entropy training steps and the online-KD step (`train.make_train_step`, jitted with the state
donated, as step_speed.py builds them; batch `--batch`), and both models' eval forwards (batch
`--eval_batch`). Reported per step: median ms of each, the paired ratio Eigen / YNNPACK (median, min-max
over repeats) and the 95% t-interval of the mean log ratio, with a verdict ("Eigen faster", "YNNPACK
faster", or "unresolved" when the interval spans 1), and how many convolutions each compiled program runs inside
YNNPACK fusions (`titans.xla_cpu.ynn_convolutions`).

    python benchmarks/conv_kernels.py --repeats 10
    python benchmarks/conv_kernels.py --repeats 10 --cpu_cores 1 --out /tmp/conv_kernels_1t.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from conv_layers import YNN_DEFAULTS
from machine_load import banner, is_contaminated, other_cpu_load, write_result

KERNELS = {
    "ynn": {"xla_cpu_experimental_ynn_fusion_type": YNN_DEFAULTS},
    "eigen": {
        "xla_cpu_experimental_ynn_fusion_type": ",".join(
            t for t in YNN_DEFAULTS.split(",") if t != "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
        )
    },
}
STEPS = ("teacher", "student", "kd", "teacher_eval", "student_eval")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated, of {', '.join(STEPS)}")
    p.add_argument("--conv_impl", default="auto", help="both CNNs' conv_impl")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--eval_batch", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--inner", type=int, default=15, help="calls per timing")
    p.add_argument("--cpu_cores", type=int, default=0, help="pin to this many cores (0 = all)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"--steps: unknown {sorted(unknown)}; choose from {', '.join(STEPS)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpu_cores])
    os.environ["TITANS_XLA_CPU"] = "default"  # the per-executable options below choose, not the process flag
    from titans import logs

    process = logs.process_setup()
    import jax
    import step_speed
    from cascade_speed import build

    from titans import stats, xla_cpu

    step_args = step_speed.parse_args(
        [
            "--batch_size",
            str(args.batch),
            "--teacher_kwargs",
            json.dumps({"channels": [32, 64], "dense": 128, "conv_impl": args.conv_impl}),
            "--student_kwargs",
            json.dumps({"channels": [8, 16], "dense": 32, "conv_impl": args.conv_impl}),
        ]
    )
    side = step_speed.TitansSide(step_args, total_steps=10_000)
    rng = np.random.default_rng(0)
    shape = tuple(side.info.image_shape)
    batches = side.batches(
        [rng.integers(0, 256, (args.batch, *shape)).astype(np.uint8) for _ in range(3)],
        [rng.integers(0, side.info.num_classes, args.batch).astype(np.int32) for _ in range(3)],
    )
    eval_x = jax.device_put(rng.standard_normal((args.eval_batch, *shape)).astype(np.float32))
    load_before = other_cpu_load()

    def train_runner(kind, options):
        step, state, teacher = side.make(kind, compiler_options=options)
        step = step.lower(state, batches[0], teacher).compile()
        box = {"state": state, "i": 0}

        def run(n):
            for _ in range(n):
                box["state"] = step(box["state"], batches[box["i"] % 3], teacher)[0]
                box["i"] += 1
            jax.block_until_ready(box["state"])

        return run, xla_cpu.ynn_convolutions(step.as_text())

    def eval_runner(kind, options):
        role = kind.removesuffix("_eval")
        name, kwargs = side.specs[role]
        model = build(name, kwargs, shape, side.info.num_classes, seed=0)
        apply = jax.jit(lambda m, x: m.apply(x), compiler_options=options).lower(model, eval_x).compile()

        def run(n):
            for _ in range(n):
                out = apply(model, eval_x)
            jax.block_until_ready(out)

        return run, xla_cpu.ynn_convolutions(apply.as_text())

    rows = {}
    for kind in args.steps.split(","):
        make = eval_runner if kind.endswith("_eval") else train_runner
        made = {name: make(kind, options) for name, options in KERNELS.items()}
        runners = {name: run for name, (run, _) in made.items()}
        # what each compiled step really runs: convolutions inside YNNPACK fusions
        ynn_convs = {name: count for name, (_, count) in made.items()}
        # Without "individual_convolution" a convolution can still sit in a YNNPACK *reduce* fusion as its
        # producer (the teacher's 64 -> 32 input gradient with the pool's backward; in eval, the 32 -> 64
        # convolution with its BatchNorm, ReLU and pool): fewer, maybe not none, never more.
        if ynn_convs["eigen"] > ynn_convs["ynn"]:
            raise SystemExit(f"{kind}: the compiler options did not take effect (YNNPACK convolutions {ynn_convs})")
        for run in runners.values():
            run(3)  # compile + warm up
        times = {name: [] for name in KERNELS}
        for rep in range(args.repeats):
            order = list(KERNELS) if rep % 2 == 0 else list(KERNELS)[::-1]
            for name in order:
                t0 = time.perf_counter()
                runners[name](args.inner)
                times[name].append((time.perf_counter() - t0) / args.inner)
        ratio = stats.time_ratio(times["eigen"], times["ynn"])
        ratios = [e / y for e, y in zip(times["eigen"], times["ynn"], strict=True)]
        rows[kind] = {
            "ynn_ms": [1e3 * t for t in times["ynn"]],
            "eigen_ms": [1e3 * t for t in times["eigen"]],
            "eigen_over_ynn_median": statistics.median(ratios),
            "eigen_over_ynn_range": [min(ratios), max(ratios)],
            "eigen_over_ynn_geomean": ratio.geomean,
            "eigen_over_ynn_ci95": [ratio.low, ratio.high],
            "verdict": ratio.faster("Eigen", "YNNPACK")
            if ynn_convs["eigen"] < ynn_convs["ynn"]
            else "the same convolution kernels in both",
            "ynn_convolutions": ynn_convs,
        }
        print(f"{kind}: {json.dumps({k: v for k, v in rows[kind].items() if not k.endswith('_ms')})}", flush=True)
    loads = [load_before, other_cpu_load()]
    threads = len(os.sched_getaffinity(0))
    result = {
        "command": "python benchmarks/conv_kernels.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "jax_version": jax.__version__,
        "threads": threads,
        "cpu": step_speed.cpu_name(),
        "kernels": KERNELS,
        "process_setup": process,
        "batch": args.batch,
        "eval_batch": args.eval_batch,
        "repeats": args.repeats,
        "inner": args.inner,
        "conv_impl": args.conv_impl,
        "other_load_cores": loads,
        "contaminated": is_contaminated(loads, threads),
        "rows": rows,
    }
    print(banner(loads, threads), end="")
    print(f"\n## XLA:CPU convolution kernels, paired in one process: {threads} threads, jax {jax.__version__}\n")
    print(f"- other processes' CPU load (cores): before {loads[0]}, after {loads[1]}")
    print(f"- conv_impl {args.conv_impl}; training steps batch {args.batch}, eval forwards batch {args.eval_batch}")
    print(f"- {args.repeats} repeats x {args.inner} calls, the order alternating\n")
    print("| step | YNNPACK ms | Eigen ms | Eigen / YNNPACK, median (min-max) | geometric mean [95% CI] | verdict |")
    print("|---|---:|---:|---:|---:|---|")
    for kind, r in rows.items():
        lo, hi = r["eigen_over_ynn_range"]
        c_lo, c_hi = r["eigen_over_ynn_ci95"]
        print(
            f"| {kind} | {statistics.median(r['ynn_ms']):.2f} | {statistics.median(r['eigen_ms']):.2f} | "
            f"{r['eigen_over_ynn_median']:.3f} ({lo:.3f}-{hi:.3f}) | {r['eigen_over_ynn_geomean']:.3f} "
            f"[{c_lo:.3f}, {c_hi:.3f}] | {r['verdict']} |"
        )
    if args.out:
        write_result(args.out, result)


if __name__ == "__main__":
    main()
