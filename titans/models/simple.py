"""Small models for small images: a flattening MLP and a plain CNN.

The CNN is the Fashion-MNIST workhorse: ``channels=(32, 64), dense=128`` is the teacher and
``channels=(8, 16), dense=32`` a tiny student, so everything scales with those three numbers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import layers as L


class MLP(L.Classifier):
    """Flatten, then ``Dense-ReLU`` per entry of ``hidden``, then the classifier.

    ``hidden=()`` is a single dense layer (logistic regression). acts: ``hidden1``...,
    ``features`` (the last hidden activation, or the flattened input when there is none).
    """

    flatten_input = True

    def __init__(self, *, num_classes, input_shape, rngs, dtype=jnp.float32, hidden: Sequence[int] = (256, 256)):
        self.input_shape = L.check_input_shape(input_shape)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        widths = [math.prod(self.input_shape), *(int(h) for h in hidden)]
        self.hidden = nnx.List([L.dense(a, b, rngs=rngs, dtype=dtype) for a, b in zip(widths[:-1], widths[1:])])
        self.classifier = L.head(widths[-1], self.num_classes, rngs=rngs)

    def forward(self, x, train):
        del train
        x = x.reshape(x.shape[0], -1)
        acts = {}
        for i, layer in enumerate(self.hidden):
            x = jax.nn.relu(layer(x))
            acts[f"hidden{i + 1}"] = x
        acts["features"] = x
        return self.classifier(x), acts


class CNN(L.Classifier):
    """Per stage ``conv3x3-BN-ReLU`` and a 2x2 max-pool; then flatten, ``Dense-ReLU``, classifier.

    The pool is skipped in a stage whose input is already smaller than 2 pixels, so 8x8 inputs
    work with up to three stages. With ``batch_norm=False`` the convs get a bias instead.
    ``conv_impl="patches"`` computes the convolutions as im2col + matmul (``layers.PatchConv``; same
    parameters, same function; a few-channel first layer's forward as shifted products);
    ``"auto"`` (the default) does so for the first, few-channel layer on the CPU backend (faster to train
    and to run on XLA:CPU), and is ``"xla"`` on GPU and TPU; ``"xla"`` is XLA's convolution everywhere.
    In eval, a few-channel ``PatchConv`` first stage (conv, BatchNorm, ReLU, pool) runs as
    ``layers.conv_pooled``'s four phases.
    acts: ``stage1``... (after the pool), ``features`` (the dense layer's output).
    """

    flatten_input = True

    def __init__(
        self,
        *,
        num_classes,
        input_shape,
        rngs,
        dtype=jnp.float32,
        channels: Sequence[int] = (32, 64),
        dense: int = 128,
        batch_norm: bool = True,
        conv_impl: str = "auto",
    ):
        self.input_shape = L.check_input_shape(input_shape)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.use_bn = bool(batch_norm)
        h, w, c = self.input_shape
        convs, norms, pools = [], [], []
        for ch in channels:
            ch = int(ch)
            convs.append(L.conv(c, ch, 3, rngs=rngs, dtype=dtype, use_bias=not self.use_bn, impl=conv_impl))
            if self.use_bn:
                norms.append(L.batch_norm(ch, rngs=rngs, dtype=dtype))
            pool = h >= 2 and w >= 2
            pools.append(pool)
            if pool:
                h, w = h // 2, w // 2
            c = ch
        self.convs = nnx.List(convs)
        self.norms = nnx.List(norms)
        self.pools = tuple(pools)
        self.dense = L.dense(h * w * c, int(dense), rngs=rngs, dtype=dtype)
        self.classifier = L.head(int(dense), self.num_classes, rngs=rngs)

    def forward(self, x, train):
        acts = {}
        for i, (cv, pool) in enumerate(zip(self.convs, self.pools)):

            def post(y, i=i):
                if self.use_bn:
                    y = self.norms[i](y, use_running_average=not train)
                return jax.nn.relu(y)

            x = L.conv_pooled(cv, x, post, train=train) if pool else post(cv(x))
            acts[f"stage{i + 1}"] = x
        x = jax.nn.relu(self.dense(x.reshape(x.shape[0], -1)))
        acts["features"] = x
        return self.classifier(x), acts
