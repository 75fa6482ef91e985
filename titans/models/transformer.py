"""Transformer encoders: a text classifier over tokens (``transformer``, ``transformer_small``) and a
Vision Transformer over image patches (``vit``), on the same pre-LayerNorm blocks.

A block is ``x + Attention(LN(x))`` then ``x + MLP(LN(x))`` (GELU, ``mlp_ratio * width`` hidden), and the
encoder ends with a LayerNorm. Attention is ``jax.nn.dot_product_attention`` with
``implementation=None``, so JAX picks its kernel per backend; text attends only to real tokens (the key
mask ``tokens != 0``). Numerics follow ``titans.models.layers``: parameters float32, matmuls in the
compute ``dtype``; the residual stream, LayerNorms, softmax (inside ``dot_product_attention``) and pooling
stay float32. Positions are learned embeddings: ``max_tokens`` of them for text (so a batch may be any
length up to it), one per patch for the ViT. ``pool`` is ``"mean"`` (masked mean of the final tokens) or
``"cls"`` (a learned token prepended, read out at the end). acts: ``block1``... (the residual stream after
each block, in the compute dtype), ``tokens`` (the final token states after the LayerNorm, float32),
``features`` (the pooled vector the classifier reads).

Dropout (``dropout > 0``, training only) acts on the embeddings and on each block's attention and MLP
outputs. Its keys come from a ``DropoutRng``: a seed drawn from ``rngs`` at construction (after every
parameter, so a model with dropout has the parameters of the same model without) and a step count, kept as
plain integers among the model's non-parameter state (like BatchNorm statistics), so the trainer casts,
selects and checkpoints that state as any other (a typed PRNG key could not be cast); every training call
folds the count into the seed and advances it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import layers as L
from titans.models.text import TextClassifier, check_text_shape, embedding, masked_mean

POOLS = ("mean", "cls")

_dense_init = nnx.initializers.xavier_uniform()
_embed_init = nnx.initializers.normal(0.02)


class DropoutState(nnx.Variable):
    """A dropout stream's integer state (seed or step count): not a parameter, updated in training."""


class DropoutRng(nnx.Module):
    """Per-call dropout keys from an int32 seed and a uint32 step count (see the module docstring)."""

    def __init__(self, rngs: nnx.Rngs):
        self.seed = DropoutState(jax.random.randint(rngs.dropout(), (), 0, jnp.iinfo(jnp.int32).max, jnp.int32))
        self.step = DropoutState(jnp.zeros((), jnp.uint32))

    def next_key(self) -> jax.Array:
        step = self.step.get_value()
        self.step.set_value(step + 1)
        return jax.random.fold_in(jax.random.key(self.seed.get_value()), step)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    """Inverted dropout of ``x`` with ``key``; the identity when ``key`` is None (eval) or ``rate`` is 0."""
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _linear(a: int, b: int, *, rngs: nnx.Rngs, dtype) -> nnx.Linear:
    return nnx.Linear(a, b, dtype=dtype, param_dtype=jnp.float32, kernel_init=_dense_init, rngs=rngs)


def _layer_norm(width: int, *, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=1e-6, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)


class Attention(nnx.Module):
    """Multi-head self-attention: one (width -> 3 * width) projection to queries, keys and values,
    ``jax.nn.dot_product_attention``, an output projection."""

    def __init__(self, width: int, heads: int, *, rngs: nnx.Rngs, dtype):
        self.heads = int(heads)
        self.qkv = _linear(width, 3 * width, rngs=rngs, dtype=dtype)
        self.out = _linear(width, width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        q, k, v = jnp.split(self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads), 3, axis=2)
        key_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S): attend to real tokens only
        y = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], mask=key_mask, implementation=None)
        return self.out(y.reshape(b, t, d))


class EncoderBlock(nnx.Module):
    """Pre-LayerNorm block: ``x + drop(Attention(LN(x)))``, then ``x + drop(MLP(LN(x)))``."""

    def __init__(self, width: int, heads: int, mlp_dim: int, rate: float, *, rngs: nnx.Rngs, dtype):
        self.dtype, self.rate = dtype, float(rate)
        self.norm1 = _layer_norm(width, rngs=rngs)
        self.attn = Attention(width, heads, rngs=rngs, dtype=dtype)
        self.norm2 = _layer_norm(width, rngs=rngs)
        self.fc1 = _linear(width, mlp_dim, rngs=rngs, dtype=dtype)
        self.fc2 = _linear(mlp_dim, width, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None, key: jax.Array | None) -> jax.Array:
        keys = (None, None) if key is None else jax.random.split(key)
        y = self.attn(self.norm1(x).astype(self.dtype), mask)
        x = x + dropout(y, self.rate, keys[0]).astype(jnp.float32)
        y = self.fc2(jax.nn.gelu(self.fc1(self.norm2(x).astype(self.dtype))))
        return x + dropout(y, self.rate, keys[1]).astype(jnp.float32)


class Encoder(nnx.Module):
    """Learned position embeddings (and an optional CLS token) added to the input tokens, embedding
    dropout, ``depth`` blocks, a final LayerNorm, pooling. Shared by the text Transformer and the ViT."""

    def __init__(self, positions, *, depth, width, heads, mlp_ratio, dropout, pool, rngs, dtype):
        width, heads, depth = int(width), int(heads), int(depth)
        if depth < 1 or width < 1 or heads < 1 or width % heads:
            raise ValueError(f"need depth >= 1 and width divisible by heads, got depth={depth} {width=} {heads=}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.dtype, self.pool, self.rate = dtype, pool, float(dropout)
        self.pos = nnx.Param(_embed_init(rngs.params(), (int(positions), width), jnp.float32))
        self.cls = nnx.data(nnx.Param(jnp.zeros((1, 1, width), jnp.float32)) if pool == "cls" else None)
        mlp_dim = int(round(float(mlp_ratio) * width))
        self.blocks = nnx.List(
            [EncoderBlock(width, heads, mlp_dim, self.rate, rngs=rngs, dtype=dtype) for _ in range(depth)]
        )
        self.norm = _layer_norm(width, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array | None, key: jax.Array | None):
        """(B, T, width) embedded tokens and their (B, T) mask (None: all real), a dropout key (None: no
        dropout) -> (pooled float32, acts)."""
        x = x.astype(jnp.float32) + self.pos[: x.shape[1]]
        if self.cls is not None:
            x = jnp.concatenate([jnp.broadcast_to(self.cls[...], (x.shape[0], 1, x.shape[2])), x], axis=1)
            mask = None if mask is None else jnp.concatenate([jnp.ones_like(mask[:, :1]), mask], axis=1)
        keys = [None] * (len(self.blocks) + 1) if key is None else list(jax.random.split(key, len(self.blocks) + 1))
        x = dropout(x, self.rate, keys[0])
        acts = {}
        for i, block in enumerate(self.blocks):
            x = block(x, mask, keys[i + 1])
            acts[f"block{i + 1}"] = x.astype(self.dtype)
        x = self.norm(x)
        acts["tokens"] = x  # the final token states (float32), e.g. for a masked-LM head
        if self.cls is not None:
            pooled = x[:, 0]
        else:
            pooled = masked_mean(x, mask) if mask is not None else jnp.mean(x, axis=1)
        acts["features"] = pooled
        return pooled, acts


def _attach_encoder(module, positions: int, *, width: int, rngs, dtype, **encoder_kwargs) -> None:
    """The encoder, the classifier and (with dropout) the dropout stream of a Transformer classifier, in
    this order, so a model with dropout has the same parameters as one without."""
    module.encoder = Encoder(positions, width=width, rngs=rngs, dtype=dtype, **encoder_kwargs)
    module.classifier = L.head(int(width), module.num_classes, rngs=rngs)
    module.rng = nnx.data(DropoutRng(rngs) if module.encoder.rate > 0 else None)


def _encode(module, x, mask, train: bool):
    """(pooled, acts) of `module.encoder` over embedded inputs, with a dropout key in training."""
    key = module.rng.next_key() if train and module.rng is not None else None
    return module.encoder(x, mask, key)


class TextTransformer(TextClassifier):
    """Transformer encoder over tokens: embedding (``width`` wide), the ``Encoder`` with ``max_tokens``
    learned positions, the classifier. Registered as ``transformer`` (defaults: the teacher, 4 x 256 x 4
    heads) and ``transformer_small`` (2 x 64 x 2 heads)."""

    def __init__(
        self,
        *,
        num_classes,
        input_shape,
        rngs,
        vocab_size: int,
        dtype=jnp.float32,
        depth: int = 4,
        width: int = 256,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: str = "mean",
    ):
        self.input_shape = check_text_shape(input_shape, vocab_size)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        self.embed = embedding(vocab_size, width, rngs=rngs, dtype=dtype, init=_embed_init)
        positions = self.input_shape[0] + (pool == "cls")
        _attach_encoder(
            self,
            positions,
            depth=depth,
            width=width,
            heads=heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            pool=pool,
            rngs=rngs,
            dtype=dtype,
        )

    def forward(self, tokens, mask, train):
        pooled, acts = _encode(self, self.embed(tokens), mask, train)
        return self.classifier(pooled), acts


def patchify(x: jax.Array, p: int) -> jax.Array:
    """(B, H, W, C) images -> (B, H/p * W/p, p * p * C): the p x p tiles in row-major order, each
    flattened as (row, column, channel)."""
    b, h, w, c = x.shape
    return x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, p * p * c)


class ViT(L.Classifier):
    """Vision Transformer: ``patch`` x ``patch`` patches (H and W must be multiples of it), flattened
    and projected to ``width``, then the ``Encoder`` with one learned position per patch, the classifier.
    Images arrive normalised, as every image model receives them. Registered as ``vit`` (defaults: 4x4
    patches, 49 tokens on 28x28 Fashion-MNIST, 4 x 128 x 4 heads)."""

    flatten_input = True

    def __init__(
        self,
        *,
        num_classes,
        input_shape,
        rngs,
        dtype=jnp.float32,
        patch: int = 4,
        depth: int = 4,
        width: int = 128,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        pool: str = "mean",
    ):
        self.input_shape = L.check_input_shape(input_shape)
        self.num_classes = int(num_classes)
        self.dtype = dtype
        h, w, c = self.input_shape
        self.patch = int(patch)
        if self.patch < 1 or h % self.patch or w % self.patch:
            raise ValueError(f"vit's patch ({patch}) must divide the image's height and width, got {h}x{w}")
        self.embed = _linear(self.patch * self.patch * c, int(width), rngs=rngs, dtype=dtype)
        positions = (h // self.patch) * (w // self.patch) + (pool == "cls")
        _attach_encoder(
            self,
            positions,
            depth=depth,
            width=width,
            heads=heads,
            mlp_ratio=mlp_ratio,
            dropout=dropout,
            pool=pool,
            rngs=rngs,
            dtype=dtype,
        )

    def forward(self, x, train):
        pooled, acts = _encode(self, self.embed(patchify(x, self.patch)), None, train)
        return self.classifier(pooled), acts
