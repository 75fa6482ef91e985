"""2x2 max-pool forms on XLA, side by side in one run, for training and for eval.

Training (forward + backward, the CNN teacher's two pooled activations, batch 128): XLA's reduce_window
form (nnx.max_pool, whose backward is select-and-scatter) against the reshape-and-max form Titans trains
with (titans.models.layers.max_pool_2x2(train=True)).

Eval (forward only, ``--eval``; batch 512 as in benchmarks/cascade_speed.py):

* the pool alone after BatchNorm + ReLU: reshape-and-max against reduce_window (what
  ``max_pool_2x2(train=False)`` runs);
* a first stage, conv 1 -> C + BatchNorm + ReLU + pool, C = 8 (the tiny student) and 32 (the teacher):
  XLA's convolution, the shifted products of `small_cin_conv` followed by the pool, and the four-phase
  form of `layers.conv_pooled`;
* the whole CNN teacher (32-64/128) and student (8-16/32) eval forward, with ``conv_impl`` "xla" and
  "auto", as Titans runs them and with one part changed: every stage in its training form (what eval
  ran before the eval forms), the eval pool always the training reshape or always reduce_window (Titans
  picks by channel count), and (auto) no `fusion_fence` after the four-phase stage.

    python benchmarks/pool_speed.py [--repeats 20]
    python benchmarks/pool_speed.py --eval --out benchmarks/results/pool_speed_eval_DATE.json
    python benchmarks/pool_speed.py --device gpu --out /tmp/pool_speed_gpu.json

The training table also compares what XLA compiled for the two forms, on the backend it runs on (issue 16
asks that the CPU form is not worse on GPU/TPU): the FLOPs and bytes of XLA's cost analysis, and the
kernels of the optimized program (its top-level instructions that do work: each fusion, library call or
unfused op is one launch on a GPU). It does so for the pool alone and for the CNN teacher's whole
forward + backward in training mode (batch 128, BatchNorm on batch statistics), with the teacher's pools
swapped for reduce_window at trace time.

Prints Markdown tables of milliseconds per call (medians over repeats, every form timed once per repeat,
in a random order each repeat) and the other processes' CPU load before and after (a loaded machine's numbers are not
results).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from machine_load import banner, is_contaminated, other_cpu_load

from titans import logs as titans_logs
from titans import models
from titans.models import layers


def reduce_window(v):
    return nnx.max_pool(v, (2, 2), strides=(2, 2), padding="VALID")


def reshape_max(v):
    return layers.max_pool_2x2(v, train=True)


# Top-level instructions of an optimized HLO module that launch no work of their own.
NO_WORK_OPS = frozenset({"parameter", "constant", "tuple", "get-tuple-element", "bitcast", "opt-barrier"})


def entry_ops(hlo_text: str) -> dict[str, int]:
    """Opcode counts of the ENTRY computation of an optimized HLO module's text (fusions are counted as one
    instruction each, whatever they contain)."""
    counts: dict[str, int] = {}
    in_entry = False
    for line in hlo_text.splitlines():
        if line.startswith("ENTRY "):
            in_entry = True
            continue
        if in_entry:
            if line.startswith("}"):
                break
            _, sep, rhs = line.partition(" = ")
            match = re.search(r"\s([a-z][a-z0-9-]*)\(", " " + rhs) if sep else None
            if match:
                counts[match.group(1)] = counts.get(match.group(1), 0) + 1
    if not in_entry:
        raise ValueError("no ENTRY computation in this HLO text")
    return counts


def compiled_summary(compiled) -> dict:
    """What XLA compiled: its cost analysis's FLOPs and bytes, and the kernels (top-level instructions that do
    work) with their opcodes."""
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):  # older jax: one dict per program
        cost = cost[0]
    ops = entry_ops(compiled.as_text())
    work = {k: v for k, v in sorted(ops.items()) if k not in NO_WORK_OPS}
    return {
        "flops": float(cost.get("flops", float("nan"))),
        "bytes_accessed": float(cost.get("bytes accessed", float("nan"))),
        "kernels": sum(work.values()),
        "ops": work,
    }


def interleaved(fns: dict, args: dict, repeats: int) -> dict:
    """Median milliseconds per call of each jitted fn on its args, every fn once per repeat, in a new
    (seeded) random order each repeat: a call right after a slow one finds colder caches, and a fixed
    order would charge that to the same fn every time (it did: 40% on one model)."""
    for k, fn in fns.items():
        jax.block_until_ready(fn(*args[k]))  # compile
    samples = {k: [] for k in fns}
    order = np.random.default_rng(0)
    for _ in range(repeats):
        for k in order.permutation(list(fns)):
            t0 = time.perf_counter()
            jax.block_until_ready(fns[k](*args[k]))
            samples[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def training_table(batch: int, repeats: int) -> list[dict]:
    """The pool alone (forward + backward after a ReLU) on the teacher's two pooled activations, and the
    teacher's whole training forward + backward with each pool form."""
    rows = []
    for shape in [(batch, 28, 28, 32), (batch, 14, 14, 64)]:
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        fns = {
            name: jax.jit(jax.grad(lambda v, pool=pool: jnp.sum(pool(jax.nn.relu(v)) ** 2))).lower(x).compile()
            for name, pool in (("reduce_window", reduce_window), ("reshape_max", reshape_max))
        }
        ms = interleaved(fns, dict.fromkeys(fns, (x,)), repeats)
        hlo = {name: compiled_summary(fn) for name, fn in fns.items()}
        rows.append({"activation": list(shape), **ms, "hlo": hlo})
    rows.append(teacher_training_row(batch, repeats))
    return rows


def teacher_training_row(batch: int, repeats: int) -> dict:
    """The CNN teacher's training forward + backward (cross-entropy, BatchNorm on batch statistics), compiled
    as Titans runs it and with its pools swapped for reduce_window at trace time."""
    shape = (28, 28, 1)
    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((batch, *shape)).astype(np.float32))
    y = jax.device_put(rng.integers(0, 10, batch).astype(np.int32))
    model = models.create_model(
        "cnn", num_classes=10, input_shape=shape, rngs=nnx.Rngs(0), channels=(32, 64), dense=128, conv_impl="auto"
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p, r, v, labels):
        logits = nnx.merge(graphdef, p, jax.tree.map(lambda a: a, r))(v, train=True)  # as train/steps.py
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], axis=1))

    real_pool = layers.max_pool_2x2
    fns = {}
    for name, pool in (("reduce_window", lambda v, train=True: reduce_window(v)), ("reshape_max", real_pool)):
        layers.max_pool_2x2 = pool
        try:
            fns[name] = jax.jit(jax.grad(loss)).lower(params, rest, x, y).compile()
        finally:
            layers.max_pool_2x2 = real_pool
    ms = interleaved(fns, dict.fromkeys(fns, (params, rest, x, y)), repeats)
    return {
        "activation": "CNN teacher, training fwd+bwd",
        **ms,
        "hlo": {k: compiled_summary(f) for k, f in fns.items()},
    }


def _bn_relu(c, rng):
    scale = jnp.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32))
    shift = jnp.asarray(rng.standard_normal(c).astype(np.float32))
    return lambda y: jax.nn.relu(y * scale + shift)


def stage_tables(batch: int, repeats: int) -> tuple[list[dict], list[dict]]:
    rng = np.random.default_rng(0)
    pools = []
    for shape in [(batch, 28, 28, 32), (batch, 14, 14, 64), (batch, 28, 28, 8), (batch, 14, 14, 16)]:
        x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        post = _bn_relu(shape[-1], rng)
        fns = {
            "reshape_max": jax.jit(lambda v, post=post: reshape_max(post(v))),
            "reduce_window": jax.jit(lambda v, post=post: reduce_window(post(v))),
        }
        pools.append({"activation": list(shape), **interleaved(fns, dict.fromkeys(fns, (x,)), repeats)})
    stages = []
    x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1)).astype(np.float32))
    for c in (8, 32):
        conv = layers.conv(1, c, 3, rngs=nnx.Rngs(0), dtype=jnp.float32, impl="patches")
        kernel = conv.kernel[...]
        post = _bn_relu(c, rng)

        def xla_conv(v, kernel=kernel):
            return jax.lax.conv_general_dilated(v, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        fns = {
            "xla conv + reduce_window": jax.jit(lambda v, f=xla_conv, post=post: reduce_window(post(f(v)))),
            "shifted products + reduce_window": jax.jit(
                lambda v, kernel=kernel, post=post: reduce_window(post(layers.small_cin_conv(v, kernel)))
            ),
            "four phases (conv_pooled)": jax.jit(
                lambda v, conv=conv, post=post: layers.conv_pooled(conv, v, post, train=False)
            ),
        }
        stages.append({"conv": f"1 -> {c}", **interleaved(fns, dict.fromkeys(fns, (x,)), repeats)})
    return pools, stages


def model_table(batch: int, repeats: int) -> list[dict]:
    """Whole-model eval forwards, each variant compiled with one part swapped out at trace time."""
    shape = (28, 28, 1)
    x = jax.device_put(np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32))
    real_pool, real_fence, real_conv_pooled = layers.max_pool_2x2, layers.fusion_fence, layers.conv_pooled
    variants = {
        "as run": {},
        "training forms (before the eval forms)": {
            "conv_pooled": lambda conv, v, post, train: real_pool(post(conv(v)), train=True)
        },
        "eval pool always the training reshape": {"max_pool_2x2": lambda v, train=True: real_pool(v, train=True)},
        "eval pool always reduce_window": {"max_pool_2x2": lambda v, train=True: reduce_window(v)},
        "no fusion_fence": {"fusion_fence": lambda v: v},
    }
    fns, args = {}, {}
    for role, kw in (
        ("teacher", {"channels": (32, 64), "dense": 128}),
        ("student", {"channels": (8, 16), "dense": 32}),
    ):
        for impl in ("xla", "auto"):
            model = models.create_model(
                "cnn", num_classes=10, input_shape=shape, rngs=nnx.Rngs(0), conv_impl=impl, **kw
            )
            model.eval()
            graphdef, state = nnx.split(model)
            for variant, patch in variants.items():
                if variant == "no fusion_fence" and impl == "xla":
                    continue  # no four-phase stage to fence
                for name, fn in patch.items():
                    setattr(layers, name, fn)
                try:
                    fn = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(v)).lower(state, x).compile()
                finally:
                    layers.max_pool_2x2, layers.fusion_fence = real_pool, real_fence
                    layers.conv_pooled = real_conv_pooled
                key = f"{role}|{impl}|{variant}"
                fns[key], args[key] = fn, (state, x)
    ms = interleaved(fns, args, repeats)
    return [dict(zip(("model", "conv_impl", "variant"), k.split("|")), ms=v) for k, v in ms.items()]


def _label(row: dict) -> str:
    a = row["activation"]
    return a if isinstance(a, str) else str(tuple(a))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=0, help="default: 128 for training, 512 for --eval")
    p.add_argument("--eval", action="store_true", help="time the eval forms (pool, first stage, whole models)")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu", help="the backend XLA compiles for")
    p.add_argument("--out", default="", help="write the results as JSON here")
    args = p.parse_args(argv)
    process = titans_logs.process_setup()  # as the console scripts run (before the backend starts)
    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else "cpu")
    cores = os.cpu_count() or 1
    load_before = other_cpu_load()
    result = {
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "machine": platform.processor() or platform.machine(),
        "process_setup": process,
    }
    if args.eval:
        batch = args.batch or 512
        result["pool_after_bn_relu"], result["first_stage"] = stage_tables(batch, args.repeats)
        result["models"] = model_table(batch, args.repeats)
    else:
        batch = args.batch or 128
        result["training"] = training_table(batch, args.repeats)
    loads = [load_before, other_cpu_load()]
    result.update(batch=batch, repeats=args.repeats, other_cpu_load=loads, contaminated=is_contaminated(loads, cores))
    print(banner(loads, cores), end="")
    print(
        f"backend {result['backend']}, jax {result['jax']}, batch {batch}, {cores} CPUs; other processes' load {loads}"
    )
    print(f"process settings (titans.logs.process_setup): {process}")
    if args.eval:
        print(
            "\n| pool after BN+ReLU (eval) | reshape + max ms | reduce_window ms | reshape / reduce_window |\n|---|---:|---:|---:|"
        )
        for r in result["pool_after_bn_relu"]:
            print(
                f"| {tuple(r['activation'])} | {r['reshape_max']:.2f} | {r['reduce_window']:.2f} | {r['reshape_max'] / r['reduce_window']:.2f} |"
            )
        names = [k for k in result["first_stage"][0] if k != "conv"]
        print("\n| first stage (eval) | " + " | ".join(f"{n} ms" for n in names) + " |\n|---|" + "---:|" * len(names))
        for r in result["first_stage"]:
            print(f"| {r['conv']} | " + " | ".join(f"{r[n]:.2f}" for n in names) + " |")
        print("\n| model (eval forward) | conv_impl | variant | ms |\n|---|---|---|---:|")
        for r in result["models"]:
            print(f"| {r['model']} | {r['conv_impl']} | {r['variant']} | {r['ms']:.2f} |")
    else:
        print(
            "\n| activation (fwd+bwd) | reduce_window ms | reshape + max ms | reduce_window / reshape |\n|---|---:|---:|---:|"
        )
        for r in result["training"]:
            print(
                f"| {_label(r)} | {r['reduce_window']:.2f} | {r['reshape_max']:.2f} | {r['reduce_window'] / r['reshape_max']:.2f} |"
            )
        print("\n| compiled (fwd+bwd) | form | GFLOP | MB accessed | kernels | opcodes |\n|---|---|---:|---:|---:|---|")
        for r in result["training"]:
            for form in ("reduce_window", "reshape_max"):
                h = r["hlo"][form]
                ops = ", ".join(f"{k} {v}" for k, v in h["ops"].items())
                print(
                    f"| {_label(r)} | {form} | {h['flops'] / 1e9:.3f} | {h['bytes_accessed'] / 1e6:.1f} | {h['kernels']} | {ops} |"
                )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
