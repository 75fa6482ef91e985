"""Shared building blocks of the model zoo.

Every model is a :class:`Classifier`: it is called as ``model(x, train=False, capture=False)``
and returns float32 logits (plus a dict of named activations when ``capture=True``). The
factories here fix the conventions all models share, so they are stated once:

* Convolutions have no bias when a BatchNorm follows, and use explicit symmetric padding
  ``k // 2`` (PyTorch's alignment, so stride-2 layers sample the same pixels as the reference
  implementations; output sizes equal ``ceil(size / stride)`` exactly as with ``'SAME'``).
* Convolution kernels are He-normal in **fan_out** mode, counted per group as PyTorch's
  ``kaiming_normal_(mode='fan_out')`` does, i.e. variance ``2 / (k*k*out/groups)``.
* Hidden dense layers are He-normal (fan_in); the classifier keeps Flax's LeCun-normal default.
* BatchNorm uses momentum 0.9 (PyTorch's 0.1) and epsilon 1e-5; it is :class:`BatchNorm`, an
  ``nnx.BatchNorm`` subclass that avoids quadratic tracing time (see its docstring).
* Parameters are float32; ``dtype`` is the compute dtype. The classifier head always runs in
  float32: it is tiny, and distillation losses read the logits at temperature. Captured
  stage activations are in the compute dtype; ``acts['features']`` is always float32.
"""

from __future__ import annotations

from collections import OrderedDict

import jax
import jax.numpy as jnp
from flax import nnx

# Flax's default 0.99 makes running statistics lag far behind the weights in short runs
# (a few epochs of a student), so eval accuracy would trail train accuracy for no reason.
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

he_normal_fan_in = nnx.initializers.variance_scaling(2.0, "fan_in", "normal")


def conv_init(groups: int = 1):
    """He-normal fan_out initialiser with PyTorch's per-group fan_out.

    JAX counts fan_out of a grouped kernel as ``k*k*out``; PyTorch counts ``k*k*out/groups``.
    Scaling the variance by ``groups`` makes the two agree; without it a depthwise kernel
    would start ``channels`` times too small.
    """
    return nnx.initializers.variance_scaling(2.0 * groups, "fan_out", "normal")


CONV_IMPLS = ("xla", "patches", "auto")
PATCHES_MAX_IN_CHANNELS = 4  # "auto": im2col for layers with at most this many input channels (the first)


def im2col_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 'same' convolution of NHWC `x` with an odd square HWIO `kernel`, as im2col + one matmul:
    the k*k shifted views of the padded input stacked on the channel axis, times the kernel reshaped to
    (k*k*C_in, C_out)."""
    kh, kw, c, _ = kernel.shape
    b, h, w, _ = x.shape
    p = kh // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    cols = jnp.concatenate([xp[:, i : i + h, j : j + w, :] for i in range(kh) for j in range(kw)], axis=-1)
    return (cols.reshape(b * h * w, kh * kw * c) @ kernel.reshape(kh * kw * c, -1)).reshape(b, h, w, -1)


def _taps_conv(x: jax.Array, kernel: jax.Array, phase: tuple[int, int] | None = None) -> jax.Array:
    """The same convolution as a sum of k*k*C_in shifted views, each times one row of the kernel: an
    elementwise loop that XLA fuses into one pass over the output. Fast only for few input channels.

    With ``phase=(a, b)``: only the outputs at rows ``a, a+2, ...`` and columns ``b, b+2, ...`` (``h // 2``
    by ``w // 2`` of them, the positions of that phase a 2x2 VALID pool reads), from strided views, the
    taps summed in the same order."""
    kh, kw, c, _ = kernel.shape
    _, h, w, _ = x.shape
    p = kh // 2
    (a, b), step = (0, 0) if phase is None else phase, 1 if phase is None else 2
    rows, cols = (h, w) if phase is None else (h // 2, w // 2)
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    y = None
    for i in range(kh):
        for j in range(kw):
            r, q = a + i, b + j
            view = xp[:, r : r + step * (rows - 1) + 1 : step, q : q + step * (cols - 1) + 1 : step]
            for ch in range(c):
                term = view[..., ch : ch + 1] * kernel[i, j, ch]
                y = term if y is None else y + term
    return y


@jax.custom_vjp
def small_cin_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """A stride-1 'same' convolution for layers with few input channels (a network's first layer):
    the forward pass as shifted elementwise products (`_taps_conv`, 0.3 ms against XLA:CPU's 2.7 ms for
    1->8 at 28x28, batch 128), the backward pass as im2col + matmul (`im2col_conv`'s gradient; the
    shifted products' own gradient is slower), except the kernel gradient of a layer with at most
    SMALL_CIN_CONV_KERNEL_GRAD_MAX_OUT output channels, which is XLA's convolution gradient. Same function
    as `im2col_conv`; the one-off benchmarks/conv_layers.py timed both (in git before b2b70dd)."""
    return _taps_conv(x, kernel)


def _small_cin_fwd(x, kernel):
    return _taps_conv(x, kernel), (x, kernel)


# A few-input-channel layer with at most this many output channels takes its kernel gradient from XLA's own
# convolution, above it from im2col's matmul. Kernel gradient alone, batch 128, ms (2 threads, XLA:CPU with
# titans.xla_cpu / with XLA's defaults): 1->8 at 28x28 0.76 / 0.89 against im2col's 1.67 / 1.21, 4->8 at
# 14x14 0.63 / 0.48 against 1.38 / 1.10, 1->4 0.86 / 0.73 against 1.42 / 1.58; 1->32 2.72 / 6.23 against
# 2.65 / 1.93. The input gradient stays im2col's everywhere (XLA's: 2-3x slower).
SMALL_CIN_CONV_KERNEL_GRAD_MAX_OUT = 16


def _xla_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _small_cin_bwd(residuals, g):
    x, kernel = residuals
    dx = jax.vjp(lambda v: im2col_conv(v, kernel), x)[1](g)[0]
    kernel_form = _xla_conv if kernel.shape[-1] <= SMALL_CIN_CONV_KERNEL_GRAD_MAX_OUT else im2col_conv
    dk = jax.vjp(lambda k: kernel_form(x, k), kernel)[1](g)[0]
    return dx, dk


small_cin_conv.defvjp(_small_cin_fwd, _small_cin_bwd)


class PatchConv(nnx.Conv):
    """``nnx.Conv`` with the same parameters, computed as im2col + one matmul for a stride-1 'same'
    convolution without groups: the k*k shifted views of the padded input are stacked on the channel
    axis and multiplied by the kernel reshaped to (k*k*C_in, C_out); with at most PATCHES_MAX_IN_CHANNELS
    input channels the forward pass is `small_cin_conv`'s shifted products instead (same gradient), and
    in eval, followed by a 2x2 pool, `conv_pooled` computes the convolution, BatchNorm, ReLU and pool as
    one elementwise pass over four phases.
    XLA:CPU runs convolutions with few input channels far below its matmul speed
    (benchmarks/pool_speed.py measures the pool forms; the one-off conv_layers.py, in git before b2b70dd,
    measured the convolutions); this form's gradient is slices and matmuls too. Any other configuration falls back to ``nnx.Conv``.
    Checkpoints are interchangeable with ``nnx.Conv``'s (same kernel layout, HWIO)."""

    def form_applies(self, inputs) -> bool:
        """Whether this form applies: a stride-1 'same' convolution of an odd square kernel, NHWC, no groups."""
        kh, kw = self.kernel_size
        pads = self.padding
        same = kh == kw and kh % 2 == 1 and pads == ((kh // 2, kh // 2), (kw // 2, kw // 2))
        return inputs.ndim == 4 and self.strides in (1, (1, 1)) and self.feature_group_count == 1 and same

    def small_cin_forward(self, inputs) -> bool:
        """Whether the forward pass is `small_cin_conv`'s shifted products (few input channels)."""
        return self.form_applies(inputs) and inputs.shape[-1] <= PATCHES_MAX_IN_CHANNELS

    def operands(self, inputs) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        """(inputs, kernel, bias or None), promoted to the compute dtype."""
        bias = self.bias[...] if self.bias is not None else None
        return self.promote_dtype((inputs, self.kernel[...], bias), dtype=self.dtype)

    def __call__(self, inputs, out_sharding=None):
        if not self.form_applies(inputs):
            return super().__call__(inputs, out_sharding)
        x, kernel, bias = self.operands(inputs)
        y = (small_cin_conv if self.small_cin_forward(inputs) else im2col_conv)(x, kernel)
        return y if bias is None else y + bias


def conv(
    in_ch: int,
    out_ch: int,
    kernel: int,
    stride: int = 1,
    *,
    rngs: nnx.Rngs,
    dtype,
    groups: int = 1,
    use_bias: bool = False,
    impl: str = "xla",
) -> nnx.Conv:
    """A k x k 'same' convolution; `impl` "patches" computes it as im2col + matmul (`PatchConv`), "auto"
    does so only for layers with at most PATCHES_MAX_IN_CHANNELS input channels and only on the CPU
    backend, where XLA's own convolution is slowest (the one-off benchmarks/conv_layers.py, in git before
    b2b70dd: 0.30-0.55x its time for such a layer's forward + backward; im2col is 1.4x slower for 32 -> 64). The forms were
    measured on XLA:CPU only, so on GPU and TPU "auto" is XLA's convolution (the backend is read when the
    layer is built)."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv impl {impl!r} is not one of {CONV_IMPLS}")
    if impl == "auto":
        small = in_ch <= PATCHES_MAX_IN_CHANNELS and groups == 1
        impl = "patches" if small and jax.default_backend() == "cpu" else "xla"
    pad = kernel // 2
    return (PatchConv if impl == "patches" else nnx.Conv)(
        in_ch,
        out_ch,
        (kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        feature_group_count=groups,
        use_bias=use_bias,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=conv_init(groups),
        rngs=rngs,
    )


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` (same variables, same maths, feature axis last) that traces in linear
    time.

    flax 0.12.8 writes the running statistics with ``self.mean[...] = new``, which compares
    ``new.sharding`` with the old value's; on a tracer that attribute raises an AttributeError
    whose message is built by walking the whole jaxpr traced so far. Every BatchNorm thus
    costs time proportional to the graph before it, and tracing a train step is quadratic in
    depth (measured on 2 busy cores, tracing a jitted grad step at batch 8: resnet56 2.6 s,
    resnet110 9.5 s; with this class 0.6 s and 1.3 s). ``Variable.set_value`` skips that
    comparison.
    """

    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        if mask is not None:
            raise NotImplementedError("masked batch statistics are not supported")
        if use_running_average is None:
            use_running_average = self.use_running_average
        if use_running_average is None:
            raise ValueError("pass use_running_average (True in eval, False in train)")
        if self.axis not in (-1, x.ndim - 1):
            raise NotImplementedError("only the last axis can be the feature axis")
        dtype = self.dtype if self.dtype is not None else jnp.result_type(x, jnp.float32)
        if use_running_average:
            mean, var = self.mean.get_value(), self.var.get_value()
        else:
            axes = tuple(range(x.ndim - 1))
            xf = x.astype(jnp.float32)  # statistics in float32 whatever the compute dtype
            mean = jnp.mean(xf, axes)
            mean_sq = jnp.mean(jnp.square(xf), axes)
            if self.axis_name is not None:
                mean, mean_sq = jax.lax.pmean((mean, mean_sq), self.axis_name, axis_index_groups=self.axis_index_groups)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
            m = self.momentum
            self.mean.set_value(jax.lax.stop_gradient(m * self.mean.get_value() + (1 - m) * mean))
            self.var.set_value(jax.lax.stop_gradient(m * self.var.get_value() + (1 - m) * var))
        mul = jax.lax.rsqrt(var + self.epsilon)
        if self.scale is not None:
            mul = mul * self.scale.get_value()
        y = (x.astype(dtype) - mean.astype(dtype)) * mul.astype(dtype)
        if self.bias is not None:
            y = y + self.bias.get_value().astype(dtype)
        return y


def batch_norm(ch: int, *, rngs: nnx.Rngs, dtype, zero_scale: bool = False) -> BatchNorm:
    return BatchNorm(
        ch,
        momentum=BN_MOMENTUM,
        epsilon=BN_EPSILON,
        dtype=dtype,
        param_dtype=jnp.float32,
        scale_init=nnx.initializers.zeros if zero_scale else nnx.initializers.ones,
        rngs=rngs,
    )


def dense(in_f: int, out_f: int, *, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    """Hidden (ReLU-followed) dense layer."""
    return nnx.Linear(in_f, out_f, dtype=dtype, param_dtype=jnp.float32, kernel_init=he_normal_fan_in, rngs=rngs)


def head(in_f: int, num_classes: int, *, rngs: nnx.Rngs) -> nnx.Linear:
    """Classifier layer; float32 compute regardless of the model's dtype."""
    return nnx.Linear(in_f, num_classes, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


EVAL_REDUCE_WINDOW_MIN_CHANNELS = 32  # eval pools of at least this many channels use reduce_window


def max_pool_2x2(x: jax.Array, *, train: bool = True) -> jax.Array:
    """2x2 max-pool, stride 2, VALID (an odd last row/column is dropped): nnx.max_pool's values in the
    form XLA:CPU runs fastest.

    Training, and eval with fewer than EVAL_REDUCE_WINDOW_MIN_CHANNELS channels: a reshape and a max.
    Its backward is an elementwise select instead of XLA:CPU's select-and-scatter, which took about half
    of the CNN teacher's step (benchmarks/pool_speed.py). Gradients differ from select-and-scatter's only
    where two inputs of a window tie for the maximum (split evenly here, all to the first there); after a
    ReLU such ties are zeros, whose gradient the ReLU stops anyway.

    Eval (``train=False``) with at least EVAL_REDUCE_WINDOW_MIN_CHANNELS channels: ``lax.reduce_window``
    (nnx.max_pool itself). Without a backward pass it is the faster form there: the CNN teacher's eval
    forward at batch 512 took 32.8 ms with it against 56.3 ms with the reshape, and its 32-channel pool
    alone 4.2 against 20.7 ms; at 8 and 16 channels the reshape took 0.78-0.99x reduce_window's time
    (benchmarks/pool_speed.py ``--eval``). The values are the same bits either way. On CPU a narrower
    eval pool's input passes a `fusion_fence` (see the comment below).
    """
    if not train and x.shape[-1] >= EVAL_REDUCE_WINDOW_MIN_CHANNELS:
        return nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
    if not train and jax.default_backend() == "cpu":
        # A narrow eval pool's input passes a fusion_fence, so XLA:CPU computes it (BatchNorm, ReLU) in its
        # own fusion rather than inside the pool's YNNPACK reduction with the layers after it: the tiny
        # student's eval forward at batch 512 took 4.9 against 6.6 ms (benchmarks/cascade_speed.py).
        x = fusion_fence(x)
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return jnp.max(x.reshape(b, h // 2, 2, w // 2, 2, c), axis=(2, 4))


def conv_pooled(conv: nnx.Conv, x: jax.Array, post, *, train: bool) -> jax.Array:
    """``max_pool_2x2(post(conv(x)))``, where ``post`` is elementwise per channel (eval BatchNorm, ReLU).

    In eval, a `PatchConv` with at most PATCHES_MAX_IN_CHANNELS input channels (a network's first layer)
    computes the whole stage without a reduction: the convolution is evaluated on each of the four
    stride-2 phases of the output grid (shifted products of strided input views, `_taps_conv`),
    ``post`` is applied to each, and the pool is the elementwise maximum of the four. Only the positions
    the pool reads are computed, so an odd last row/column costs nothing. On XLA:CPU the convolution,
    BatchNorm, ReLU and pool of the 1 -> 8 student layer at batch 512 took 15.0 ms as separate ops (jax
    0.10's YNNPACK fusion of the shifted products into the pool's reduce is slow) and 1.0 ms this way
    (benchmarks/pool_speed.py ``--eval``). Each output element sees the same operations in the same order
    as on the unfused path; XLA may contract them into fused multiply-adds differently, so the results
    agree to rounding, not bit for bit. The result passes a `fusion_fence`. Training, and every other
    convolution, take the unfused path.
    """
    if train or not (isinstance(conv, PatchConv) and conv.small_cin_forward(x)):
        return max_pool_2x2(post(conv(x)), train=train)
    x, kernel, bias = conv.operands(x)
    phases = []
    for phase in ((0, 0), (0, 1), (1, 0), (1, 1)):
        y = _taps_conv(x, kernel, phase)
        phases.append(post(y if bias is None else y + bias))
    pooled = jnp.maximum(jnp.maximum(phases[0], phases[1]), jnp.maximum(phases[2], phases[3]))
    return fusion_fence(pooled)


def fusion_fence(x: jax.Array) -> jax.Array:
    """The identity (a `reduce_precision` to ``x``'s own exponent and mantissa widths, which changes no
    value) that XLA:CPU's YNNPACK fusion does not take in. Without it, jax 0.10 on CPU pulled the shifted
    products of `conv_pooled` into the fusion of the next convolution and the dense layer, and the CNN
    teacher's eval forward with ``conv_impl="auto"`` took 105 ms at batch 512 instead of 28 ms
    (benchmarks/pool_speed.py ``--eval``). An optimization barrier or a bitcast round trip did not
    stop it."""
    info = jnp.finfo(x.dtype)
    return jax.lax.reduce_precision(x, exponent_bits=info.nexp, mantissa_bits=info.nmant)


def global_avg_pool(x: jax.Array) -> jax.Array:
    # Reduce in float32: a bf16 sum over a 56x56 map loses most of its mantissa.
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def check_input_shape(input_shape) -> tuple[int, int, int]:
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"input_shape must be (H, W, C) with positive sizes, got {input_shape!r}")
    return shape


class Classifier(nnx.Module):
    """Base class: input checks, dtype casting and the ``capture`` switch.

    Subclasses set ``self.input_shape``, ``self.num_classes``, ``self.dtype`` and
    ``self.flatten_input`` (True where the exact H and W matter) and implement
    ``forward(x, train) -> (logits, acts)``; ``acts`` is returned as an ``OrderedDict`` (a
    ``dict``) in forward order. It is built on every call: under ``jit`` the unused entries
    cost nothing, and a plain return keeps the module free of side state (no ``sow``).
    """

    input_shape: tuple[int, int, int]
    num_classes: int
    flatten_input: bool = False

    def __call__(self, x, train: bool = False, capture: bool = False):
        x = jnp.asarray(x)
        if x.ndim != 4:
            raise ValueError(f"expected input of shape (B, H, W, C), got {x.shape}")
        expected = self.input_shape if self.flatten_input else self.input_shape[2:]
        if tuple(x.shape[4 - len(expected) :]) != tuple(expected):
            raise ValueError(
                f"{type(self).__name__} was built for input_shape {self.input_shape}, got a batch of shape {x.shape}"
            )
        logits, acts = self.forward(x.astype(self.dtype), train)
        logits = logits.astype(jnp.float32)
        acts["features"] = acts["features"].astype(jnp.float32)
        # JAX flattens a plain dict with sorted keys, so one returned from a jitted function
        # would come back as 'features', 'stage1', ...; an OrderedDict keeps forward order.
        return (logits, OrderedDict(acts)) if capture else logits

    def forward(self, x, train: bool):  # pragma: no cover - abstract
        raise NotImplementedError
