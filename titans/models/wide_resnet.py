"""Wide residual networks WRN-d-k (Zagoruyko & Komodakis 2016).

A 16-channel 3x3 stem, three groups of ``n = (d - 4) / 6`` pre-activation basic blocks with
``16k, 32k, 64k`` channels (strides 1, 2, 2), a final BN-ReLU, global average pooling and a
linear classifier. Blocks are ``BN-ReLU-conv3x3-BN-ReLU-dropout-conv3x3``; where the shape
changes the shortcut is a 1x1 conv applied to the pre-activated input, as in the authors' code.
Dropout (``dropout > 0``) draws from the ``'dropout'`` stream of the ``rngs`` given at
construction and is only active with ``train=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import layers as L


class PreActBlock(nnx.Module):
    def __init__(self, in_ch, out_ch, stride, dropout, *, rngs, dtype):
        self.bn1 = L.batch_norm(in_ch, rngs=rngs, dtype=dtype)
        self.conv1 = L.conv(in_ch, out_ch, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = L.batch_norm(out_ch, rngs=rngs, dtype=dtype)
        self.conv2 = L.conv(out_ch, out_ch, 3, rngs=rngs, dtype=dtype)
        self.drop = nnx.data(nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None)
        self.shortcut = nnx.data(None)
        if stride != 1 or in_ch != out_ch:
            self.shortcut = L.conv(in_ch, out_ch, 1, stride, rngs=rngs, dtype=dtype)

    def __call__(self, x, train):
        ura = not train
        pre = jax.nn.relu(self.bn1(x, use_running_average=ura))
        y = self.conv1(pre)
        y = jax.nn.relu(self.bn2(y, use_running_average=ura))
        if self.drop is not None:
            y = self.drop(y, deterministic=not train)
        y = self.conv2(y)
        skip = x if self.shortcut is None else self.shortcut(pre)
        return skip + y


class WideResNet(L.Classifier):
    """See the module docstring. acts: ``stage1``..``stage3`` (group outputs, before the
    next pre-activation), ``features`` (pooled after the final BN-ReLU)."""

    def __init__(
        self,
        *,
        num_classes,
        input_shape,
        rngs,
        dtype=jnp.float32,
        depth: int = 28,
        widen: int = 10,
        dropout: float = 0.0,
    ):
        self.input_shape = L.check_input_shape(input_shape)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        if depth < 10 or (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1, got {depth}")
        if widen < 1:
            raise ValueError(f"widen must be >= 1, got {widen}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        n = (depth - 4) // 6
        self.stem = L.conv(self.input_shape[2], 16, 3, rngs=rngs, dtype=dtype)
        stages, in_ch = [], 16
        for s, base in enumerate((16, 32, 64)):
            width = base * int(widen)
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(PreActBlock(in_ch, width, stride, float(dropout), rngs=rngs, dtype=dtype))
                in_ch = width
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.final_bn = L.batch_norm(in_ch, rngs=rngs, dtype=dtype)
        self.classifier = L.head(in_ch, self.num_classes, rngs=rngs)

    def forward(self, x, train):
        x = self.stem(x)
        acts = {}
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, train)
            acts[f"stage{i + 1}"] = x
        x = jax.nn.relu(self.final_bn(x, use_running_average=not train))
        feats = L.global_avg_pool(x)
        acts["features"] = feats
        return self.classifier(feats), acts
