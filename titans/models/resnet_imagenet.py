"""ImageNet ResNets (He et al. 2016): resnet18 / resnet34 (basic blocks) and resnet50
(bottleneck blocks, stride on the 3x3 conv as in torchvision's "v1.5").

Stem rule: inputs with ``min(H, W) >= 64`` get the ImageNet stem (7x7 stride-2 conv, BN,
ReLU, 3x3 stride-2 max-pool); smaller inputs get a 3x3 stride-1 conv and no max-pool, the
usual CIFAR adaptation. Then four stages of ``width * (1, 2, 4, 8)`` channels (times 4 at
the output of bottleneck blocks) with strides 1, 2, 2, 2, global average pooling and a linear
classifier. Projection shortcuts (1x1 conv + BN) wherever the shape changes.
``zero_init_residual=True`` starts the last BN scale of every block at zero (Goyal et al.).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import layers as L

SMALL_INPUT_PX = 64
_LAYOUTS = {
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


class _Projection(nnx.Module):
    def __init__(self, in_ch, out_ch, stride, *, rngs, dtype):
        self.conv = L.conv(in_ch, out_ch, 1, stride, rngs=rngs, dtype=dtype)
        self.bn = L.batch_norm(out_ch, rngs=rngs, dtype=dtype)

    def __call__(self, x, train):
        return self.bn(self.conv(x), use_running_average=not train)


class Basic(nnx.Module):
    expansion = 1

    def __init__(self, in_ch, width, stride, *, zero_init_residual, rngs, dtype):
        out_ch = width
        self.conv1 = L.conv(in_ch, width, 3, stride, rngs=rngs, dtype=dtype)
        self.bn1 = L.batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv2 = L.conv(width, out_ch, 3, rngs=rngs, dtype=dtype)
        self.bn2 = L.batch_norm(out_ch, rngs=rngs, dtype=dtype, zero_scale=zero_init_residual)
        self.proj = nnx.data(None)
        if stride != 1 or in_ch != out_ch:
            self.proj = _Projection(in_ch, out_ch, stride, rngs=rngs, dtype=dtype)

    def __call__(self, x, train):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = self.bn2(self.conv2(y), use_running_average=ura)
        skip = x if self.proj is None else self.proj(x, train)
        return jax.nn.relu(skip + y)


class Bottleneck(nnx.Module):
    expansion = 4

    def __init__(self, in_ch, width, stride, *, zero_init_residual, rngs, dtype):
        out_ch = width * self.expansion
        self.conv1 = L.conv(in_ch, width, 1, rngs=rngs, dtype=dtype)
        self.bn1 = L.batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv2 = L.conv(width, width, 3, stride, rngs=rngs, dtype=dtype)
        self.bn2 = L.batch_norm(width, rngs=rngs, dtype=dtype)
        self.conv3 = L.conv(width, out_ch, 1, rngs=rngs, dtype=dtype)
        self.bn3 = L.batch_norm(out_ch, rngs=rngs, dtype=dtype, zero_scale=zero_init_residual)
        self.proj = nnx.data(None)
        if stride != 1 or in_ch != out_ch:
            self.proj = _Projection(in_ch, out_ch, stride, rngs=rngs, dtype=dtype)

    def __call__(self, x, train):
        ura = not train
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=ura))
        y = jax.nn.relu(self.bn2(self.conv2(y), use_running_average=ura))
        y = self.bn3(self.conv3(y), use_running_average=ura)
        skip = x if self.proj is None else self.proj(x, train)
        return jax.nn.relu(skip + y)


class ImageNetResNet(L.Classifier):
    """See the module docstring. ``arch`` is one of ``resnet18``, ``resnet34``, ``resnet50``.
    acts: ``stage1``..``stage4``, ``features``."""

    def __init__(
        self,
        *,
        arch: str,
        num_classes,
        input_shape,
        rngs,
        dtype=jnp.float32,
        width: int = 64,
        zero_init_residual: bool = False,
    ):
        self.input_shape = L.check_input_shape(input_shape)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        block_kind, counts = _LAYOUTS[arch]
        block_cls = Basic if block_kind == "basic" else Bottleneck
        width = int(width)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.small_input = min(self.input_shape[:2]) < SMALL_INPUT_PX
        in_c = self.input_shape[2]
        if self.small_input:
            self.stem = L.conv(in_c, width, 3, 1, rngs=rngs, dtype=dtype)
        else:
            self.stem = L.conv(in_c, width, 7, 2, rngs=rngs, dtype=dtype)
        self.stem_bn = L.batch_norm(width, rngs=rngs, dtype=dtype)
        stages, in_ch = [], width
        for s, n in enumerate(counts):
            w = width * 2**s
            blocks = []
            for b in range(n):
                stride = 2 if (s > 0 and b == 0) else 1
                blocks.append(
                    block_cls(in_ch, w, stride, zero_init_residual=zero_init_residual, rngs=rngs, dtype=dtype)
                )
                in_ch = w * block_cls.expansion
            stages.append(nnx.List(blocks))
        self.stages = nnx.List(stages)
        self.classifier = L.head(in_ch, self.num_classes, rngs=rngs)

    def forward(self, x, train):
        x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        if not self.small_input:
            x = nnx.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        acts = {}
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, train)
            acts[f"stage{i + 1}"] = x
        feats = L.global_avg_pool(x)
        acts["features"] = feats
        return self.classifier(feats), acts
