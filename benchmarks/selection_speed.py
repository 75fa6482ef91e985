"""Active selection time against pool size (titans/active/selection.py)."""

from __future__ import annotations

import time

import numpy as np

from benchmarks.harness import Arg, Comparison, Plan, register

STRATEGIES = ("random", "margin", "entropy", "robust", "kcenter")


def selector(name: str, n: int, args):
    """A call selecting `args.b` points with strategy `name` from a synthetic pool of `n` (a fresh key per
    call), returning the chosen indices on the host."""
    import jax
    import jax.numpy as jnp

    from titans.active import selection

    rng = np.random.default_rng(n)
    probs = jax.nn.softmax(jnp.asarray(rng.normal(size=(n, 10)).astype(np.float32) * 2))
    extra = {"available": jnp.asarray(rng.random(n) > 0.05), "b": args.b}
    if name == "robust":
        extra["m"] = args.m_fraction * args.b
    if name == "kcenter":
        extra["embeddings"] = jnp.asarray(rng.normal(size=(n, args.dim)).astype(np.float32))
        extra["centres"] = jnp.asarray(rng.normal(size=(args.centres, args.dim)).astype(np.float32))
    calls = [0]

    def call():
        calls[0] += 1
        t0 = time.perf_counter()
        np.asarray(selection.select(name, key=jax.random.key(calls[0]), probs=probs, **extra)[0])
        return time.perf_counter() - t0

    return call


@register(
    "selection_speed",
    Arg("pools", "10000,100000,1000000", "comma-separated pool sizes"),
    Arg("b", 1000, "points selected per call", int),
    Arg("dim", 128, "k-center: embedding width", int),
    Arg("centres", 1000, "k-center: labelled + bought points", int),
    Arg("kcenter_max", 100000, "k-center runs on pools up to this size (its cost grows as b * pool * dim)", int),
    Arg("m_fraction", 0.1, "robust: m = m_fraction * b", float),
)
def selection_speed(args) -> Plan:
    """Active selection: time of one selection of b points against the pool size, per strategy.

    Each strategy selects b = 1,000 points from synthetic pools: softmax outputs over 10 classes, plus
    128-wide embeddings and 1,000 labelled centres for k-center. A timed call is the whole selection from the
    student's outputs to the chosen indices on the host: scoring, and for `robust` the game's inclusion
    probabilities (sort, prefix sums, bisection) and DepRound; for k-center the greedy loop (b sequential
    picks, each a distance pass over the pool). The first call of each (XLA compilation, paid once per run:
    the pool size is fixed during a run) is in the record's facts. The ratios give each strategy's time growth
    from one pool size to the next (10x pool: about 10 for a linear cost)."""
    pools = [int(float(p)) for p in args.pools.split(",")]
    sides, first = {}, {}
    for n in pools:
        for name in STRATEGIES:
            if name == "kcenter" and n > args.kcenter_max:
                continue
            side = f"{name} @ {n:,}"
            sides[side] = selector(name, n, args)
            first[side] = sides[side]()
    comparisons = [
        Comparison(f"{name}: pool {b:,} / pool {a:,}", (f"{name} @ {b:,}",), (f"{name} @ {a:,}",))
        for name in STRATEGIES
        for a, b in zip(pools, pools[1:])
        if f"{name} @ {b:,}" in sides
    ]
    return Plan(sides, comparisons, facts={"first_call_s": first, "show_sides": True})
