"""The few-input-channel layer's kernel gradient, XLA's convolution gradient against im2col's matmul, on the
student's real training steps: a paired A/B in one process.

`layers.small_cin_conv` (the CNNs' first layer with `conv_impl="auto"`) takes its kernel gradient from XLA's
convolution when the layer has at most `SMALL_CIN_CONV_KERNEL_GRAD_MAX_OUT` output channels, else from
im2col's matmul. This script compiles the student's CE step and the online-KD step both ways (the constant
set to its value, then to 0, while tracing) and times the two back to back in every repeat, alternating
which goes first. Reported: median ms of each and XLA-conv time / im2col time as the geometric mean over
repeats with its 95% t-interval, and a verdict ("unresolved" when the interval spans 1).

    python benchmarks/small_cin_kernel_grad.py --repeats 12
    python benchmarks/small_cin_kernel_grad.py --repeats 12 --cpu_cores 1 --out /tmp/kgrad_1t.json
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
from machine_load import banner, is_contaminated, other_cpu_load, write_result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=12)
    p.add_argument("--inner", type=int, default=15, help="steps per timing")
    p.add_argument("--cpu_cores", type=int, default=0, help="pin to this many cores (0 = all)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)
    if args.cpu_cores:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.cpu_cores])
    from titans import logs

    process = logs.process_setup()
    import jax
    import step_speed

    from titans import stats
    from titans.models import layers

    side = step_speed.TitansSide(
        step_speed.parse_args(
            [
                "--teacher_kwargs",
                json.dumps({"channels": [32, 64], "dense": 128, "conv_impl": "auto"}),
                "--student_kwargs",
                json.dumps({"channels": [8, 16], "dense": 32, "conv_impl": "auto"}),
            ]
        ),
        total_steps=10_000,
    )
    rng = np.random.default_rng(0)
    batches = side.batches(
        [rng.integers(0, 256, (128, 28, 28, 1)).astype(np.uint8) for _ in range(3)],
        [rng.integers(0, 10, 128).astype(np.int32) for _ in range(3)],
    )
    forms = {"xla_conv": layers.SMALL_CIN_CONV_KERNEL_GRAD_MAX_OUT, "im2col": 0}
    load_before = other_cpu_load()
    rows = {}
    for kind in ("student", "kd"):
        runs = {}
        for name, max_out in forms.items():
            layers.SMALL_CIN_CONV_KERNEL_GRAD_MAX_OUT = max_out  # read while tracing
            step, state, teacher = side.make(kind)
            step = step.lower(state, batches[0], teacher).compile()
            for i in range(3):
                state = step(state, batches[i % 3], teacher)[0]
            jax.block_until_ready(state)
            runs[name] = {"step": step, "state": state, "teacher": teacher}
        layers.SMALL_CIN_CONV_KERNEL_GRAD_MAX_OUT = forms["xla_conv"]
        times = {name: [] for name in forms}
        for rep in range(args.repeats):
            for name in list(forms) if rep % 2 == 0 else list(forms)[::-1]:
                r = runs[name]
                t0 = time.perf_counter()
                for i in range(args.inner):
                    r["state"] = r["step"](r["state"], batches[i % 3], r["teacher"])[0]
                jax.block_until_ready(r["state"])
                times[name].append((time.perf_counter() - t0) / args.inner)
        ratio = stats.time_ratio(times["xla_conv"], times["im2col"])
        rows[kind] = {
            "xla_conv_ms": [1e3 * t for t in times["xla_conv"]],
            "im2col_ms": [1e3 * t for t in times["im2col"]],
            "xla_conv_over_im2col_geomean": ratio.geomean,
            "xla_conv_over_im2col_ci95": [ratio.low, ratio.high],
            "verdict": ratio.faster("XLA conv", "im2col"),
        }
    loads = [load_before, other_cpu_load()]
    threads = len(os.sched_getaffinity(0))
    print(banner(loads, threads), end="")
    print(f"\n## First-layer kernel gradient on the student's steps: {threads} threads, jax {jax.__version__}\n")
    print(f"- other processes' CPU load (cores): before {loads[0]}, after {loads[1]}; process setup {process}")
    print(f"- {args.repeats} repeats x {args.inner} steps, the order alternating; batch 128, conv_impl auto\n")
    print("| step | XLA conv ms | im2col ms | XLA conv / im2col [95% CI] | verdict |\n|---|---:|---:|---:|---|")
    for kind, r in rows.items():
        lo, hi = r["xla_conv_over_im2col_ci95"]
        print(
            f"| {kind} | {statistics.median(r['xla_conv_ms']):.2f} | {statistics.median(r['im2col_ms']):.2f} | "
            f"{r['xla_conv_over_im2col_geomean']:.3f} [{lo:.3f}, {hi:.3f}] | {r['verdict']} |"
        )
    if args.out:
        result = {
            "command": "python benchmarks/small_cin_kernel_grad.py " + " ".join(argv or sys.argv[1:]),
            "jax_version": jax.__version__,
            "threads": threads,
            "process_setup": process,
            "kernel_grad_max_out": forms["xla_conv"],
            "repeats": args.repeats,
            "inner": args.inner,
            "other_load_cores": loads,
            "contaminated": is_contaminated(loads, threads),
            "rows": rows,
        }
        write_result(args.out, result)


if __name__ == "__main__":
    main()
