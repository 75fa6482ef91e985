"""Model cost: parameter counts and XLA's FLOP estimate of one eval-mode forward pass."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx


def param_count(model: nnx.Module) -> int:
    """Number of scalars held in ``nnx.Param`` variables (BatchNorm statistics excluded).

    Works on abstract models too (``nnx.eval_shape(lambda: create_model(...))``), so counting
    a large model does not require initialising it.
    """
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return int(sum(math.prod(leaf.shape) for leaf in leaves))


def flops_per_example(model: nnx.Module, input_shape, batch_size: int = 8) -> float:
    """FLOPs of one example in eval mode (``train=False``), as XLA's cost analysis counts them.

    The forward pass is lowered and compiled for a float32 batch of ``batch_size`` examples
    (int32 token ids for a text model, ``model.modality == "text"``, with ``input_shape = (L,)``: the
    cost at that length, since attention and convolutions over tokens grow with it) on the default
    backend and the total is divided by ``batch_size``. XLA counts a
    multiply-add as 2 FLOPs, skips the taps of a convolution that fall on zero padding (so a
    padded 3x3 conv on a 32x32 map counts ~4% less than the textbook ``2*H*W*9*Cin*Cout``),
    and includes elementwise work (BatchNorm, activations, pooling); a dense layer costs
    ``2 * in * out`` plus its bias. Only shapes are used: nothing is executed.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    graphdef, state = nnx.split(model)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x, train=False)

    abstract_state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    input_dtype = jnp.int32 if getattr(model, "modality", "image") == "text" else jnp.float32
    x = jax.ShapeDtypeStruct((batch_size, *tuple(input_shape)), input_dtype)
    cost = jax.jit(forward).lower(abstract_state, x).compile().cost_analysis()
    # Older jax versions return one dict per computation.
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    flops = cost.get("flops") if cost else None
    if flops is None:
        raise RuntimeError("XLA's cost analysis reported no 'flops' for this backend")
    return float(flops) / batch_size
