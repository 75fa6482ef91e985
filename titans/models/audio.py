"""Small 1-D convolutional students for keyword spotting (TFDS speech_commands).

The data layer hands speech out as (frames, mel bands, 1) uint8 log-mel "images"
(titans/data/speech.py); these models read them as a sequence over time with the mel bands as
channels: per stage a ``conv1d(k)-BN-ReLU`` over time with stride 2, then global average pooling
over time, a dense layer and the classifier. They follow the Classifier conventions of
titans.models (``model(x, train, capture) -> logits or (logits, acts)``; acts ``stage1``...,
``features``), so they can be ensemble members, connected or not.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import layers as L


class Conv1DNet(L.Classifier):
    flatten_input = True

    def __init__(
        self,
        *,
        num_classes,
        input_shape,
        rngs,
        dtype=jnp.float32,
        channels: Sequence[int] = (32, 32),
        kernel: int = 5,
        dense: int = 32,
    ):
        self.input_shape = L.check_input_shape(input_shape)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        _, bands, c = self.input_shape
        widths = [bands * c, *(int(ch) for ch in channels)]
        pad = kernel // 2
        self.convs = nnx.List(
            [
                nnx.Conv(
                    a,
                    b,
                    (kernel,),
                    strides=(2,),
                    padding=((pad, pad),),
                    use_bias=False,
                    dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=L.conv_init(),
                    rngs=rngs,
                )
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )
        self.norms = nnx.List([L.batch_norm(b, rngs=rngs, dtype=dtype) for b in widths[1:]])
        self.dense = L.dense(widths[-1], int(dense), rngs=rngs, dtype=dtype)
        self.classifier = L.head(int(dense), self.num_classes, rngs=rngs)

    def forward(self, x, train):
        b, t, f, c = x.shape
        x = x.reshape(b, t, f * c)  # time steps, with bands (x channels) as features
        acts = {}
        for i, (cv, bn) in enumerate(zip(self.convs, self.norms)):
            x = jax.nn.relu(bn(cv(x), use_running_average=not train))
            acts[f"stage{i + 1}"] = x
        x = jax.nn.relu(self.dense(jnp.mean(x.astype(jnp.float32), axis=1).astype(self.dtype)))
        acts["features"] = x
        return self.classifier(x), acts
