"""2x2 max-pool forms on XLA, side by side in one run, for training and for eval."""

from __future__ import annotations

import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.harness import Arg, Comparison, Plan, register
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


def training_fns(batch: int) -> dict:
    """{side: (compiled fn, its args)}: the pool alone (forward + backward after a ReLU) on the teacher's two
    pooled activations in both forms, and the teacher's whole training forward + backward with each."""
    fns = {}
    for shape in [(batch, 28, 28, 32), (batch, 14, 14, 64)]:
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        for name, pool in (("reduce_window", reduce_window), ("reshape_max", reshape_max)):
            grad = jax.jit(jax.grad(lambda v, pool=pool: jnp.sum(pool(jax.nn.relu(v)) ** 2)))
            fns[f"{name} {shape}"] = (grad.lower(x).compile(), (x,))
    fns.update(teacher_training_fns(batch))
    return fns


def teacher_training_fns(batch: int) -> dict:
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
            fns[f"{name} teacher"] = (jax.jit(jax.grad(loss)).lower(params, rest, x, y).compile(), (params, rest, x, y))
        finally:
            layers.max_pool_2x2 = real_pool
    return fns


def _bn_relu(c, rng):
    scale = jnp.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32))
    shift = jnp.asarray(rng.standard_normal(c).astype(np.float32))
    return lambda y: jax.nn.relu(y * scale + shift)


def stage_fns(batch: int) -> dict:
    """The eval pool alone after BatchNorm + ReLU in both forms, and a first stage (conv 1 -> C + BatchNorm +
    ReLU + pool, C = 8 and 32) as XLA conv, shifted products (`small_cin_conv`) and four phases (`conv_pooled`)."""
    rng = np.random.default_rng(0)
    fns = {}
    for shape in [(batch, 28, 28, 32), (batch, 14, 14, 64), (batch, 28, 28, 8), (batch, 14, 14, 16)]:
        x = jnp.asarray(rng.standard_normal(shape).astype(np.float32))
        post = _bn_relu(shape[-1], rng)
        fns[f"eval pool reshape_max {shape}"] = (jax.jit(lambda v, post=post: reshape_max(post(v))), (x,))
        fns[f"eval pool reduce_window {shape}"] = (jax.jit(lambda v, post=post: reduce_window(post(v))), (x,))
    x = jnp.asarray(rng.standard_normal((batch, 28, 28, 1)).astype(np.float32))
    for c in (8, 32):
        conv = layers.conv(1, c, 3, rngs=nnx.Rngs(0), dtype=jnp.float32, impl="patches")
        kernel, post = conv.kernel[...], _bn_relu(c, rng)

        def xla_conv(v, kernel=kernel):
            return jax.lax.conv_general_dilated(v, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

        forms = {
            "xla conv + reduce_window": lambda v, f=xla_conv, post=post: reduce_window(post(f(v))),
            "shifted products + reduce_window": lambda v, k=kernel, post=post: reduce_window(
                post(layers.small_cin_conv(v, k))
            ),
            "four phases": lambda v, conv=conv, post=post: layers.conv_pooled(conv, v, post, train=False),
        }
        fns.update({f"stage 1 -> {c}: {name}": (jax.jit(fn), (x,)) for name, fn in forms.items()})
    return fns


def model_variants(real_pool) -> dict:
    return {
        "as run": {},
        "training forms": {"conv_pooled": lambda conv, v, post, train: real_pool(post(conv(v)), train=True)},
        "eval pool always reshape": {"max_pool_2x2": lambda v, train=True: real_pool(v, train=True)},
        "eval pool always reduce_window": {"max_pool_2x2": lambda v, train=True: reduce_window(v)},
        "no fusion_fence": {"fusion_fence": lambda v: v},
    }


def model_fns(batch: int) -> dict:
    """Whole CNN eval forwards (teacher 32-64/128, student 8-16/32; conv_impl xla and auto), as Titans runs
    them and with one part swapped at trace time: every stage in its training form, the eval pool always the
    training reshape or always reduce_window, no `fusion_fence` after the four-phase stage."""
    shape = (28, 28, 1)
    x = jax.device_put(np.random.default_rng(0).standard_normal((batch, *shape)).astype(np.float32))
    real = layers.max_pool_2x2, layers.fusion_fence, layers.conv_pooled
    fns = {}
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
            for variant, patch in model_variants(real[0]).items():
                if variant == "no fusion_fence" and impl == "xla":
                    continue  # no four-phase stage to fence
                for name, fn in patch.items():
                    setattr(layers, name, fn)
                try:
                    fn = jax.jit(lambda s, v, g=graphdef: nnx.merge(g, s)(v)).lower(state, x).compile()
                finally:
                    layers.max_pool_2x2, layers.fusion_fence, layers.conv_pooled = real
                fns[f"{role} {impl}: {variant}"] = (fn, (state, x))
    return fns


def timer(fn, args):
    def run():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        return time.perf_counter() - t0

    return run


def pool_comparisons(sides, evaluation: bool) -> list[Comparison]:
    if not evaluation:
        return [
            Comparison(f"reduce_window / reshape_max, {s[len('reduce_window ') :]}", (s,), ("reshape_max" + s[13:],))
            for s in sides
            if s.startswith("reduce_window ")
        ]
    out = [
        Comparison(
            f"eval pool reshape_max / reduce_window, {s[len('eval pool reshape_max ') :]}",
            (s,),
            (s.replace("reshape_max", "reduce_window"),),
        )
        for s in sides
        if s.startswith("eval pool reshape_max")
    ]
    for s in sides:
        if s.startswith("stage") and not s.endswith("xla conv + reduce_window"):
            out.append(
                Comparison(f"{s} / xla conv + reduce_window", (s,), (s.split(":")[0] + ": xla conv + reduce_window",))
            )
        if ": " in s and not s.startswith("stage") and not s.endswith("as run"):
            out.append(Comparison(f"{s} / as run", (s,), (s.split(":")[0] + ": as run",)))
    return out


@register(
    "pool_speed",
    Arg("batch", 0, "rows per call; 0: 128 for training, 512 for --eval", int),
    Arg("eval", False, "time the eval forms (pool, first stage, whole models) instead of the training forms", bool),
    Arg("device", "cpu", "the backend XLA compiles for", str, ("cpu", "gpu")),
)
def pool_speed(args) -> Plan:
    """The 2x2 max-pool forms on XLA, for training and (`--eval`) for eval.

    Training (forward + backward, batch 128): XLA's reduce_window form (`nnx.max_pool`, whose backward is
    select-and-scatter) against the reshape-and-max form Titans trains with (`layers.max_pool_2x2(train=True)`),
    on the CNN teacher's two pooled activations and in the teacher's whole training pass; the record's facts
    also hold what XLA compiled for each (FLOPs, bytes, kernels: issue 16 asks that the CPU form is not worse
    on a GPU). Eval (forward only, batch 512 as in cascade_speed): the pool after BatchNorm + ReLU in both
    forms; a first stage as XLA conv, shifted products or four phases (`layers.conv_pooled`); and whole CNN
    eval forwards as Titans runs them against each with one part changed. Every side is compiled before
    timing; the order of the sides is shuffled in every round (a call right after a slow one finds colder
    caches, and a fixed order would charge that to the same side every time)."""
    jax.config.update("jax_platforms", "cuda" if args.device == "gpu" else "cpu")
    batch = args.batch or (512 if args.eval else 128)
    fns = {**stage_fns(batch), **model_fns(batch)} if args.eval else training_fns(batch)
    for fn, fn_args in fns.values():
        jax.block_until_ready(fn(*fn_args))  # compile
    facts = {"batch": batch}
    if not args.eval:
        facts["compiled"] = {side: compiled_summary(fn) for side, (fn, _) in fns.items()}
    sides = {side: timer(fn, fn_args) for side, (fn, fn_args) in fns.items()}
    device = None if args.device == "cpu" else jax.devices()[0].device_kind
    return Plan(
        sides, pool_comparisons(sides, args.eval), facts, device, shuffle=True, variant="eval" if args.eval else ""
    )
