"""Selection speed: pool size vs time for the active-distillation strategies (titans/active/selection.py).

    python benchmarks/selection_speed.py                                  # pools 1e4, 1e5, 1e6; k-center to 1e5
    python benchmarks/selection_speed.py --pools 10000,100000,1000000 --kcenter_max 1000000 --out sel.json

Each strategy selects b points (default 1,000) from a synthetic pool: softmax probabilities over
10 classes (random logits) and, for k-center, `--dim`-wide embeddings with `--centres` labelled
centres. The timed call is the whole selection from the student's outputs: scoring (margin,
entropy, informativeness), the robust game's probabilities and DepRound, or the k-center greedy
loop, up to the chosen indices on the host. "first" is the first call (includes XLA compilation),
"warm" the median of `--repeats` later calls with fresh random keys. k-center's cost grows as
b * pool * dim; it is run only up to `--kcenter_max`, and its growth factor per 10x pool is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from titans.active import selection


def _timed(fn, repeats: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    jax.block_until_ready(fn(0))
    first = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(r + 1))
        times.append(time.perf_counter() - t0)
    return first, float(np.median(times))


def run(pools, b, dim, centres, kcenter_max, repeats, m_fraction):
    rows = []
    for n in pools:
        rng = np.random.default_rng(n)
        logits = rng.normal(size=(n, 10)).astype(np.float32) * 2
        probs = jax.nn.softmax(jnp.asarray(logits))
        available = jnp.asarray(rng.random(n) > 0.05)
        m = m_fraction * b
        cases = {
            "random": lambda r: np.asarray(
                selection.select("random", key=jax.random.key(r), probs=probs, available=available, b=b)[0]
            ),
            "margin": lambda r: np.asarray(
                selection.select("margin", key=jax.random.key(r), probs=probs, available=available, b=b)[0]
            ),
            "entropy": lambda r: np.asarray(
                selection.select("entropy", key=jax.random.key(r), probs=probs, available=available, b=b)[0]
            ),
            "robust": lambda r: np.asarray(
                selection.select("robust", key=jax.random.key(r), probs=probs, available=available, b=b, m=m)[0]
            ),
        }
        if n <= kcenter_max:
            emb = jnp.asarray(rng.normal(size=(n, dim)).astype(np.float32))
            cen = jnp.asarray(rng.normal(size=(centres, dim)).astype(np.float32))
            cases["kcenter"] = lambda r: np.asarray(
                selection.select(
                    "kcenter", key=jax.random.key(r), probs=probs, available=available, b=b, embeddings=emb, centres=cen
                )[0]
            )
        for name, fn in cases.items():
            reps = repeats if name != "kcenter" or n < 1_000_000 else 1
            first, warm = _timed(fn, reps)
            rows.append({"strategy": name, "pool": n, "b": b, "first_s": first, "warm_s": warm})
            print(f"  {name:>8} pool {n:>9,}: first {first:8.3f} s, warm {warm:8.3f} s", file=sys.stderr, flush=True)
    return rows


def table(rows, pools) -> str:
    names = ["random", "margin", "entropy", "robust", "kcenter"]
    head = "| strategy | " + " | ".join(f"pool {n:,}: warm (first) s" for n in pools) + " | warm time per 10x pool |"
    lines = [head, "|" + "---|" * (len(pools) + 2)]
    for name in names:
        cells, warms = [], []
        for n in pools:
            r = next((r for r in rows if r["strategy"] == name and r["pool"] == n), None)
            cells.append(f"{r['warm_s']:.3f} ({r['first_s']:.2f})" if r else "not run")
            if r:
                warms.append(r["warm_s"])
        growth = ", ".join(f"x{b_ / a_:.1f}" for a_, b_ in zip(warms, warms[1:]))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {growth} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pools", default="10000,100000,1000000")
    ap.add_argument("--b", type=int, default=1000)
    ap.add_argument("--dim", type=int, default=128, help="embedding width for k-center")
    ap.add_argument("--centres", type=int, default=1000, help="labelled + bought points for k-center")
    ap.add_argument("--kcenter_max", type=int, default=100000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--m_fraction", type=float, default=0.1, help="robust: m = m_fraction * b")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    pools = [int(float(p)) for p in args.pools.split(",")]
    rows = run(pools, args.b, args.dim, args.centres, args.kcenter_max, args.repeats, args.m_fraction)
    dev = jax.devices()[0]
    print(
        f"Selection of b={args.b} points; k-center: dim {args.dim}, {args.centres} centres. "
        f"Device: {dev.platform} ({dev.device_kind}), {len(jax.devices())} device(s); "
        f"jax {jax.__version__}, Python {platform.python_version()}."
    )
    print(f"Command: python benchmarks/selection_speed.py {' '.join(sys.argv[1:])}".rstrip())
    print()
    print(table(rows, pools))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
