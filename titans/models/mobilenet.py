"""MobileNetV2 (Sandler et al. 2018): inverted residual blocks with linear bottlenecks.

Blocks are ``1x1 expand (x6) - BN - ReLU6 - 3x3 depthwise - BN - ReLU6 - 1x1 project - BN``
with an identity shortcut when stride is 1 and the channel count is unchanged; the first
group uses expansion 1 and so has no expand conv. Channel counts are scaled by ``width_mult``
and rounded to multiples of 8; the last 1x1 conv has 1280 channels (scaled only when
``width_mult > 1``). Depthwise convs use ``feature_group_count = channels``.

Stride rule: for inputs with ``min(H, W) >= 64`` the ImageNet layout (stem stride 2, overall
stride 32). For smaller inputs (CIFAR, MNIST, digits) the stem and the second block group
(24 channels) use stride 1, so the overall stride is 8 (32 px -> 4x4 final map, 8 px -> 1x1).
Optional ``dropout`` before the classifier (torchvision uses 0.2 on ImageNet) draws from the
``'dropout'`` stream and is only active with ``train=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import layers as L

# (expansion t, output channels c, blocks n, first stride s), Table 2 of the paper.
_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
SMALL_INPUT_PX = 64


def make_divisible(v: float, divisor: int = 8) -> int:
    """Round to a multiple of ``divisor``, never dropping more than 10% (the reference rule)."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new < 0.9 * v:
        new += divisor
    return new


class InvertedResidual(nnx.Module):
    def __init__(self, in_ch, out_ch, stride, expansion, *, rngs, dtype):
        hidden = in_ch * expansion
        self.expand = self.expand_bn = nnx.data(None)
        if expansion != 1:
            self.expand = L.conv(in_ch, hidden, 1, rngs=rngs, dtype=dtype)
            self.expand_bn = L.batch_norm(hidden, rngs=rngs, dtype=dtype)
        self.dw = L.conv(hidden, hidden, 3, stride, groups=hidden, rngs=rngs, dtype=dtype)
        self.dw_bn = L.batch_norm(hidden, rngs=rngs, dtype=dtype)
        self.project = L.conv(hidden, out_ch, 1, rngs=rngs, dtype=dtype)
        self.project_bn = L.batch_norm(out_ch, rngs=rngs, dtype=dtype)
        self.residual = stride == 1 and in_ch == out_ch

    def __call__(self, x, train):
        ura = not train
        y = x
        if self.expand is not None:
            y = jax.nn.relu6(self.expand_bn(self.expand(y), use_running_average=ura))
        y = jax.nn.relu6(self.dw_bn(self.dw(y), use_running_average=ura))
        y = self.project_bn(self.project(y), use_running_average=ura)
        return x + y if self.residual else y


class MobileNetV2(L.Classifier):
    """See the module docstring. acts: ``stage1``..``stage7`` (one per block group),
    ``features`` (pooled output of the last 1x1 conv)."""

    def __init__(
        self, *, num_classes, input_shape, rngs, dtype=jnp.float32, width_mult: float = 1.0, dropout: float = 0.0
    ):
        self.input_shape = L.check_input_shape(input_shape)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.small_input = min(self.input_shape[:2]) < SMALL_INPUT_PX
        stem_ch = make_divisible(32 * width_mult)
        self.stem = L.conv(self.input_shape[2], stem_ch, 3, 1 if self.small_input else 2, rngs=rngs, dtype=dtype)
        self.stem_bn = L.batch_norm(stem_ch, rngs=rngs, dtype=dtype)
        stages, in_ch = [], stem_ch
        for g, (t, c, n, s) in enumerate(_CONFIG):
            if self.small_input and g == 1:
                s = 1
            out_ch = make_divisible(c * width_mult)
            blocks = []
            for b in range(n):
                blocks.append(InvertedResidual(in_ch, out_ch, s if b == 0 else 1, t, rngs=rngs, dtype=dtype))
                in_ch = out_ch
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        last_ch = make_divisible(1280 * width_mult) if width_mult > 1.0 else 1280
        self.last = L.conv(in_ch, last_ch, 1, rngs=rngs, dtype=dtype)
        self.last_bn = L.batch_norm(last_ch, rngs=rngs, dtype=dtype)
        self.drop = nnx.data(nnx.Dropout(float(dropout), rngs=rngs) if dropout > 0 else None)
        self.classifier = L.head(last_ch, self.num_classes, rngs=rngs)

    def forward(self, x, train):
        ura = not train
        x = jax.nn.relu6(self.stem_bn(self.stem(x), use_running_average=ura))
        acts = {}
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, train)
            acts[f"stage{i + 1}"] = x
        x = jax.nn.relu6(self.last_bn(self.last(x), use_running_average=ura))
        feats = L.global_avg_pool(x)
        acts["features"] = feats
        if self.drop is not None:
            feats = self.drop(feats, deterministic=not train)
        return self.classifier(feats), acts
