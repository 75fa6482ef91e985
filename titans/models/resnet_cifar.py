"""CIFAR ResNets (He et al. 2016, section 4.2) and the 4x-wide variants of the distillation
literature.

Layout: a 3x3 stem conv, then ``len(widths)`` stages of ``n`` basic blocks each (the first
block of every stage after the first has stride 2), global average pooling and a linear
classifier, so ``depth = 2 * len(widths) * n + 2`` (``6n + 2`` for the usual three stages).

Shortcuts: ``shortcut='projection'`` (default) uses a 1x1 conv + BN wherever the shape changes
(He et al.'s option B), as the CRD / knowledge-distillation code base does, so the parameter
counts match the numbers quoted there (resnet20 0.27M, resnet56 0.86M, resnet110 1.73M,
resnet8x4 1.23M, resnet32x4 7.43M at 100 classes). ``shortcut='pad'`` is the original CIFAR
option A: stride-2 subsampling and zero channel padding, parameter-free.

``resnet8x4`` / ``resnet32x4`` follow CRD's reading: a 32-channel stem and stages of 64, 128
and 256 channels (``stem_width=32, widths=(64, 128, 256)``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import layers as L


class BasicBlock(nnx.Module):
    """``conv3x3-BN-ReLU-conv3x3-BN`` plus shortcut, then ReLU (post-activation)."""

    def __init__(self, in_ch, out_ch, stride, *, shortcut, zero_init_residual, rngs, dtype):
        self.conv1 = L.conv(in_ch, out_ch, 3, stride, rngs=rngs, dtype=dtype)
        self.bn1 = L.batch_norm(out_ch, rngs=rngs, dtype=dtype)
        self.conv2 = L.conv(out_ch, out_ch, 3, rngs=rngs, dtype=dtype)
        self.bn2 = L.batch_norm(out_ch, rngs=rngs, dtype=dtype, zero_scale=zero_init_residual)
        self.stride = stride
        self.pad_channels = 0
        self.proj_conv = nnx.data(None)
        self.proj_bn = nnx.data(None)
        if stride != 1 or in_ch != out_ch:
            if shortcut == "projection":
                self.proj_conv = L.conv(in_ch, out_ch, 1, stride, rngs=rngs, dtype=dtype)
                self.proj_bn = L.batch_norm(out_ch, rngs=rngs, dtype=dtype)
            elif out_ch < in_ch:
                raise ValueError("shortcut='pad' cannot reduce the channel count")
            else:
                self.pad_channels = out_ch - in_ch

    def __call__(self, x, train):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        if self.proj_conv is not None:
            x = self.proj_bn(self.proj_conv(x), use_running_average=ura)
        else:
            if self.stride != 1:
                x = x[:, :: self.stride, :: self.stride, :]
            if self.pad_channels:
                # Split the zero channels evenly on both sides, as option A is usually written.
                lo = self.pad_channels // 2
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (lo, self.pad_channels - lo)))
        return jax.nn.relu(x + y)


class CifarResNet(L.Classifier):
    """See the module docstring. acts: ``stage1``... (output of each stage), ``features``."""

    def __init__(
        self,
        *,
        num_classes,
        input_shape,
        rngs,
        dtype=jnp.float32,
        depth: int = 20,
        widths: Sequence[int] = (16, 32, 64),
        stem_width: int | None = None,
        shortcut: str = "projection",
        zero_init_residual: bool = False,
    ):
        self.input_shape = L.check_input_shape(input_shape)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        widths = tuple(int(w) for w in widths)
        if not widths:
            raise ValueError("widths must not be empty")
        per_block = 2 * len(widths)
        if depth < per_block + 2 or (depth - 2) % per_block:
            raise ValueError(f"depth must be {per_block}n+2 with n >= 1 for {len(widths)} stages, got {depth}")
        if shortcut not in ("projection", "pad"):
            raise ValueError(f"shortcut must be 'projection' or 'pad', got {shortcut!r}")
        n = (depth - 2) // per_block
        stem = int(stem_width) if stem_width is not None else widths[0]
        self.stem_conv = L.conv(self.input_shape[2], stem, 3, rngs=rngs, dtype=dtype)
        self.stem_bn = L.batch_norm(stem, rngs=rngs, dtype=dtype)
        stages, in_ch = [], stem
        for s, width in enumerate(widths):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(
                    BasicBlock(
                        in_ch,
                        width,
                        stride,
                        shortcut=shortcut,
                        zero_init_residual=zero_init_residual,
                        rngs=rngs,
                        dtype=dtype,
                    )
                )
                in_ch = width
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.classifier = L.head(in_ch, self.num_classes, rngs=rngs)

    def forward(self, x, train):
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x), use_running_average=not train))
        acts = {}
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, train)
            acts[f"stage{i + 1}"] = x
        feats = L.global_avg_pool(x)
        acts["features"] = feats
        return self.classifier(feats), acts
