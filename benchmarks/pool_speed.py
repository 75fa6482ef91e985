"""2x2 max-pool forward+backward: XLA's reduce_window form (nnx.max_pool, whose backward is
select-and-scatter) against the reshape-and-max form Titans uses (titans.models.layers.max_pool_2x2).
Side by side in one run, on the CNN teacher's two pooled activations (batch 128, float32).

    python benchmarks/pool_speed.py [--repeats 20]

Prints a Markdown table: milliseconds per call (median of repeats) and the ratio old / new, plus the
machine's load average (a loaded machine's numbers are not results) and the jax backend.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from titans.models import layers


def _time(fn, x, repeats):
    jax.block_until_ready(fn(x))  # compile
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(x))
        out.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(out)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--batch", type=int, default=128)
    args = p.parse_args()
    forms = {
        "reduce_window (nnx.max_pool)": lambda v: nnx.max_pool(v, (2, 2), strides=(2, 2), padding="VALID"),
        "reshape + max (Titans)": layers.max_pool_2x2,
    }
    print(f"backend {jax.default_backend()}, load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("| activation | " + " | ".join(f"{k} ms" for k in forms) + " | old / new |")
    print("|---|" + "---:|" * (len(forms) + 1))
    for shape in [(args.batch, 28, 28, 32), (args.batch, 14, 14, 64)]:
        x = jnp.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))
        ms = []
        for pool in forms.values():
            step = jax.jit(jax.grad(lambda v, pool=pool: jnp.sum(pool(jax.nn.relu(v)) ** 2)))
            ms.append(_time(step, x, args.repeats))
        print(f"| {shape} fwd+bwd | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {ms[0] / ms[1]:.2f} |")


if __name__ == "__main__":
    main()
