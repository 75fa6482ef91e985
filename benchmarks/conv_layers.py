"""Per-layer convolution speed on XLA:CPU: which formulation of a 3x3 'same' convolution wins, layer by layer.

The layers are those of the Fashion-MNIST models (batch 128): the teacher's 1->32 at 28x28 and 32->64 at
14x14, the student's 1->8 at 28x28 and 8->16 at 14x14 (and the tiny student's 1->4, 4->8). For each, three
formulations computing the same function, and PyTorch's eager conv2d as a reference:

* conv      `lax.conv_general_dilated`, NHWC / HWIO (what `nnx.Conv` runs),
* conv_ynn  the same convolution compiled with jax 0.10's default YNNPACK fusion types (`YNN_DEFAULTS`,
            which hand the convolution to YNNPACK); `conv` is compiled under the process's
            `titans.xla_cpu` setting, which takes YNNPACK's convolutions out (Eigen's kernels run it),
* nchw      the same convolution in NCHW / OIHW layout,
* patches   `titans.models.layers.im2col_conv` (what `PatchConv` runs above 4 input channels): the 9
            shifted views of the padded input stacked on the channel axis, then one
            (B*H*W, 9*C_in) x (9*C_in, C_out) matmul,
* small_cin `titans.models.layers.small_cin_conv` (what `PatchConv` runs for at most 4 input channels):
            the forward pass as 9*C_in shifted views times kernel rows (elementwise, fused), the
            gradient as im2col's.

Timed: the forward pass, forward + backward for the input and the kernel (an inner layer), and forward +
backward for the kernel only (a first layer, whose input needs no gradient), each jitted,
median of `--repeats` runs of `--iters` calls, interleaved. Ratios are formulation time / conv time (< 1:
faster than conv). Outputs and gradients are checked equal to conv's (float32, 1e-4 relative).

    python benchmarks/conv_layers.py --repeats 7 --iters 20
    python benchmarks/conv_layers.py --layers 1x8@28,8x16@14 --threads 1

`conv_ynn`'s option list is jax 0.10's default, found by compiling the quickstart teacher's training step
with XLA's defaults and with each subset of the fusion types as compiler options and comparing the HLO.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from machine_load import banner, other_cpu_load

# XLA:CPU's default YNN fusion types in jax 0.10 (see the docstring), as a per-executable compiler option.
YNN_DEFAULTS = (
    "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"
)
DEFAULT_LAYERS = "1x32@28,32x64@14,1x8@28,8x16@14,1x4@28,4x8@14"
PASSES = ("fwd", "bwd", "kernel")
PASS_LABELS = {"fwd": "forward", "bwd": "fwd + bwd (input, kernel)", "kernel": "fwd + bwd (kernel only)"}


def parse_layers(spec: str) -> list[tuple[int, int, int]]:
    """'1x32@28,...' -> [(c_in, c_out, size), ...]."""
    out = []
    for part in spec.split(","):
        chans, _, size = part.partition("@")
        c_in, _, c_out = chans.partition("x")
        out.append((int(c_in), int(c_out), int(size)))
    return out


def formulations():
    import jax
    import jax.numpy as jnp
    from jax import lax

    from titans.models import layers

    def conv(x, k):  # x (B, H, W, C), k (3, 3, C, O)
        return lax.conv_general_dilated(x, k, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def nchw(x, k):
        y = lax.conv_general_dilated(
            jnp.transpose(x, (0, 3, 1, 2)),
            jnp.transpose(k, (3, 2, 0, 1)),
            (1, 1),
            ((1, 1), (1, 1)),
            dimension_numbers=("NCHW", "OIHW", "NCHW"),
        )
        return jnp.transpose(y, (0, 2, 3, 1))

    # patches: what PatchConv runs for more than PATCHES_MAX_IN_CHANNELS input channels; small_cin: what
    # it runs for fewer (shifted products forward, im2col's gradient)
    fns = {
        "conv": (conv, None),
        "conv_ynn": (conv, {"xla_cpu_experimental_ynn_fusion_type": YNN_DEFAULTS}),
        "nchw": (nchw, None),
        "patches": (layers.im2col_conv, None),
        "small_cin": (layers.small_cin_conv, None),
    }
    compiled = {}
    for name, (f, options) in fns.items():
        jit = lambda g, options=options: jax.jit(g, compiler_options=options)
        fwd = jit(f)
        bwd = jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) ** 2), argnums=(0, 1)))
        # A network's first layer needs no gradient for its input (the images): the kernel's alone.
        kernel_only = jit(jax.grad(lambda x, k, f=f: jnp.sum(f(x, k) ** 2), argnums=1))
        compiled[name] = (fwd, bwd, kernel_only)
    return compiled


def time_calls(fn, args, iters: int) -> float:
    import jax

    jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def torch_times(c_in, c_out, size, batch, iters, threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    x = torch.randn(batch, c_in, size, size, requires_grad=True)
    conv = torch.nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)

    def fwd():
        with torch.no_grad():
            return conv(x)

    def bwd():
        x.grad = None
        conv.weight.grad = None
        (conv(x) ** 2).sum().backward()

    out = {}
    for name, f in (("fwd", fwd), ("bwd", bwd)):
        f()
        t0 = time.perf_counter()
        for _ in range(iters):
            f()
        out[name] = (time.perf_counter() - t0) / iters
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--layers", default=DEFAULT_LAYERS, help="c_in x c_out @ size, comma-separated")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="pin to this many cores (0 = all)")
    a = p.parse_args(argv)
    if a.threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: a.threads])
    threads = len(os.sched_getaffinity(0))
    from titans import logs

    settings = logs.process_setup()
    import jax
    import jax.numpy as jnp

    load_before = other_cpu_load()
    fns = formulations()
    rng = np.random.default_rng(0)
    rows = []
    for c_in, c_out, size in parse_layers(a.layers):
        x = jnp.asarray(rng.normal(size=(a.batch, size, size, c_in)).astype(np.float32))
        k = jnp.asarray(rng.normal(size=(3, 3, c_in, c_out)).astype(np.float32) * 0.1)
        ref_y, ref_g = fns["conv"][0](x, k), fns["conv"][1](x, k)
        for fwd, bwd, _ in fns.values():
            np.testing.assert_allclose(fwd(x, k), ref_y, rtol=1e-4, atol=1e-4)
            for got, want in zip(bwd(x, k), ref_g):
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
        times = {(n, kind): [] for n in fns for kind in PASSES}
        for _ in range(a.repeats):
            for name, calls in fns.items():
                for kind, fn in zip(PASSES, calls):
                    times[(name, kind)].append(time_calls(fn, (x, k), a.iters))
        med = {key: statistics.median(v) for key, v in times.items()}
        rows.append(((c_in, c_out, size), med, torch_times(c_in, c_out, size, a.batch, a.iters, threads)))
    load_after = other_cpu_load()

    warning = banner([load_before, load_after], threads)
    if warning:
        print(warning)
    print(f"\n## 3x3 convolutions on XLA:CPU, batch {a.batch}, float32, {threads} threads, jax {jax.__version__}\n")
    print(f"- other processes' CPU load (cores): before {load_before}, after {load_after}")
    print(f"- titans.xla_cpu (what `conv` runs under): {settings['xla_cpu']}")
    print("- times in ms per call (median of repeats); ratios: formulation / conv (< 1 is faster than conv)\n")
    print(
        "| layer | pass | conv | conv_ynn | nchw | patches | small_cin | conv_ynn / conv | nchw / conv "
        "| patches / conv | small_cin / conv | torch eager | torch / conv |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for (c_in, c_out, size), med, t in rows:
        for kind, label in PASS_LABELS.items():
            c, cy, n, pt, sc = (
                1e3 * med[(name, kind)] for name in ("conv", "conv_ynn", "nchw", "patches", "small_cin")
            )
            torch_cells = f"{1e3 * t[kind]:.2f} | {1e3 * t[kind] / c:.2f}" if t and kind in t else "— | —"
            print(
                f"| {c_in}->{c_out} @ {size}x{size} | {label} | {c:.2f} | {cy:.2f} | {n:.2f} | {pt:.2f} | {sc:.2f} | "
                f"{cy / c:.2f} | {n / c:.2f} | {pt / c:.2f} | {sc / c:.2f} | {torch_cells} |"
            )


if __name__ == "__main__":
    main()
