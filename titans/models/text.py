"""Text classifiers over token ids: the shared base and two cheap students.

A text model is called as ``model(tokens, train=False, capture=False)`` with int32 token ids of shape
(B, L), 0 = padding, and returns float32 logits (B, classes), plus named activations with
``capture=True`` (``features`` last, float32), like the image models of ``titans.models.layers``.
``L`` may be any length up to the ``max_tokens`` of ``input_shape = (max_tokens,)``: the loaders hand
out length buckets. The padding mask is ``tokens != 0``, derived here; every model gives the same
logits for a sequence whatever padding follows it (``tests/test_transformer.py`` checks each one).
Embeddings have ``vocab_size`` rows (``DatasetInfo.vocab_size``); an id outside them reads NaN (``jnp.take``'s
fill), which the trainer's NaN guard stops, rather than some other token's row.

* ``TextBag`` (``text_bag``): embedding, masked mean, a ReLU MLP, the classifier.
* ``TextCNN`` (``text_cnn``): embedding, 1-D 'same' convolutions over tokens with ReLU (padding
  positions zeroed before every convolution, so a sequence's last tokens see zeros whether or not
  padding follows), masked max and mean pooling side by side, a dense layer, the classifier.

The Transformer encoder is in ``titans.models.transformer``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import layers as L


def check_text_shape(input_shape, vocab_size) -> tuple[int]:
    """``(max_tokens,)`` from ``input_shape``, after checking it and the vocabulary size."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 1 or shape[0] < 1:
        raise ValueError(
            f"a text model's input_shape must be (max_tokens,) (DatasetInfo.image_shape of a text dataset), "
            f"got {input_shape!r}"
        )
    if int(vocab_size) < 2:
        raise ValueError(f"a text model needs vocab_size >= 2 (DatasetInfo.vocab_size), got {vocab_size}")
    return shape


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of (B, L, D) ``x`` over the positions where (B, L) ``mask`` is True, in float32; 0 where none."""
    m = mask[..., None].astype(jnp.float32)
    total = jnp.sum(x.astype(jnp.float32) * m, axis=1)
    return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def masked_max(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Maximum of (B, L, D) ``x`` over the positions where ``mask`` is True, in float32; 0 where none."""
    xf = jnp.where(mask[..., None], x.astype(jnp.float32), -jnp.inf)
    return jnp.where(jnp.any(mask, axis=1)[:, None], jnp.max(xf, axis=1), 0.0)


def embedding(vocab_size: int, dim: int, *, rngs: nnx.Rngs, dtype, init=None) -> nnx.Embed:
    """Token embedding: float32 table, rows handed out in the compute dtype."""
    kwargs = {} if init is None else {"embedding_init": init}
    return nnx.Embed(int(vocab_size), int(dim), dtype=dtype, param_dtype=jnp.float32, rngs=rngs, **kwargs)


class TextClassifier(nnx.Module):
    """Base class of the text models: input checks, the padding mask and the ``capture`` switch.

    Subclasses set ``self.input_shape`` (``(max_tokens,)``), ``self.num_classes``, ``self.dtype`` and
    implement ``forward(tokens, mask, train) -> (logits, acts)``. ``modality`` tells
    ``titans.models.flops_per_example`` and ``build_model`` that the input is int32 tokens.
    """

    modality = "text"
    input_shape: tuple[int]
    num_classes: int

    def __call__(self, tokens, train: bool = False, capture: bool = False):
        tokens = jnp.asarray(tokens)
        name = type(self).__name__
        if tokens.ndim != 2:
            raise ValueError(f"{name} expects token ids of shape (B, L), got {tokens.shape}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise TypeError(f"{name} expects integer token ids (0 = padding), got dtype {tokens.dtype}")
        if tokens.shape[1] > self.input_shape[0]:
            raise ValueError(f"{name} was built for at most {self.input_shape[0]} tokens, got {tokens.shape[1]}")
        tokens = tokens.astype(jnp.int32)
        logits, acts = self.forward(tokens, tokens != 0, train)
        logits = logits.astype(jnp.float32)
        acts["features"] = acts["features"].astype(jnp.float32)
        return (logits, OrderedDict(acts)) if capture else logits

    def forward(self, tokens, mask, train: bool):  # pragma: no cover - abstract
        raise NotImplementedError


class TextBag(TextClassifier):
    """Bag of embeddings: ``embed_dim``-wide embedding, masked mean, ``Dense-ReLU`` per entry of
    ``hidden``, classifier. acts: ``pooled``, ``hidden1``..., ``features`` (the last hidden layer's
    output, or the pooled embedding when ``hidden=()``)."""

    def __init__(
        self,
        *,
        num_classes,
        input_shape,
        rngs,
        vocab_size: int,
        dtype=jnp.float32,
        embed_dim: int = 64,
        hidden: Sequence[int] = (64,),
    ):
        self.input_shape = check_text_shape(input_shape, vocab_size)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.embed = embedding(vocab_size, embed_dim, rngs=rngs, dtype=dtype)
        widths = [int(embed_dim), *(int(h) for h in hidden)]
        self.hidden = nnx.List([L.dense(a, b, rngs=rngs, dtype=dtype) for a, b in zip(widths[:-1], widths[1:])])
        self.classifier = L.head(widths[-1], self.num_classes, rngs=rngs)

    def forward(self, tokens, mask, train):
        del train
        x = masked_mean(self.embed(tokens), mask)
        acts = {"pooled": x}
        x = x.astype(self.dtype)
        for i, layer in enumerate(self.hidden):
            x = jax.nn.relu(layer(x))
            acts[f"hidden{i + 1}"] = x
        acts["features"] = x
        return self.classifier(x.astype(jnp.float32)), acts


class TextCNN(TextClassifier):
    """1-D convolutions over tokens: embedding, per entry of ``channels`` a ``kernel``-wide 'same'
    ``conv1d-ReLU`` (with bias, no normalisation; padding positions set to zero before each), then the
    masked max and masked mean over tokens concatenated, ``Dense-ReLU``, classifier.
    acts: ``stage1``... (each convolution's output, padding positions included), ``features``."""

    def __init__(
        self,
        *,
        num_classes,
        input_shape,
        rngs,
        vocab_size: int,
        dtype=jnp.float32,
        embed_dim: int = 64,
        channels: Sequence[int] = (128,),
        kernel: int = 5,
        dense: int = 64,
    ):
        self.input_shape = check_text_shape(input_shape, vocab_size)
        if int(kernel) < 1 or int(kernel) % 2 == 0:
            raise ValueError(f"text_cnn's kernel must be odd (a 'same' convolution centred on a token), got {kernel}")
        if not channels:
            raise ValueError("text_cnn needs at least one entry in channels")
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.embed = embedding(vocab_size, embed_dim, rngs=rngs, dtype=dtype)
        widths = [int(embed_dim), *(int(c) for c in channels)]
        pad = int(kernel) // 2
        self.convs = nnx.List(
            [
                nnx.Conv(
                    a,
                    b,
                    (int(kernel),),
                    padding=((pad, pad),),
                    use_bias=True,
                    dtype=dtype,
                    param_dtype=jnp.float32,
                    kernel_init=L.conv_init(),
                    rngs=rngs,
                )
                for a, b in zip(widths[:-1], widths[1:])
            ]
        )
        self.dense = L.dense(2 * widths[-1], int(dense), rngs=rngs, dtype=dtype)
        self.classifier = L.head(int(dense), self.num_classes, rngs=rngs)

    def forward(self, tokens, mask, train):
        del train
        x = self.embed(tokens)
        acts = {}
        for i, cv in enumerate(self.convs):
            # Zeros at padding positions, as beyond the end of an unpadded sequence.
            x = jax.nn.relu(cv(jnp.where(mask[..., None], x, 0)))
            acts[f"stage{i + 1}"] = x
        pooled = jnp.concatenate([masked_max(x, mask), masked_mean(x, mask)], axis=-1)
        x = jax.nn.relu(self.dense(pooled.astype(self.dtype)))
        acts["features"] = x
        return self.classifier(x.astype(jnp.float32)), acts
