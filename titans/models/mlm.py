"""Masked language modelling over a text Transformer: the model a pre-training run trains.

``MaskedLM`` holds the classifier it pre-trains (``backbone``, a ``TextTransformer`` exactly as the
fine-tuning run builds it, so its parameters carry over by name) and a ``head``: a learned mask vector, a
LayerNorm and a (width -> vocab_size) projection. ``choose`` picks, for each row, ``rate`` of its real
tokens (rounded up, at least one; never padding) uniformly at random, and the call corrupts them BERT's way: 80%
replaced by the mask vector, 10% by a random token's embedding, 10% left as they are. The head predicts the
original ids at the chosen positions from the encoder's final token states; only those K positions
(K = ceil(rate * L), static for a bucket of length L) are projected onto the vocabulary, so the head costs
K / L of a full projection. The classifier's own head is built and saved but never trained here.

Keys: training draws from the model's own ``mask_rng`` stream (a ``DropoutRng``: state saved with the
checkpoint, so a resumed run masks as the uninterrupted one would); evaluation uses one fixed key, so a
split is always scored on the same corruption.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from titans.models import registry
from titans.models.transformer import DropoutRng, TextTransformer, _dense_init, _encode, _layer_norm

KEEP, MASK, RANDOM = 0, 1, 2  # what happens to a chosen token
EVAL_KEY = 0


def chosen_count(lengths: jax.Array, rate: float, width: int) -> jax.Array:
    """How many tokens of each row are chosen: ceil(rate * length), at least one for a non-empty row, at most
    ``width`` (the K of the bucket); 0 for an empty row."""
    n = jnp.ceil(rate * lengths.astype(jnp.float32)).astype(jnp.int32)
    return jnp.where(lengths > 0, jnp.clip(n, 1, width), 0)


def choose(tokens: jax.Array, rate: float, key: jax.Array):
    """(positions (B, K), chosen (B, K) bool, action (B, K) int): the tokens to corrupt and how.

    Positions are the top K of uniform scores over the real tokens (padding scores below every real
    token), so each row's first `chosen_count` positions are distinct real tokens drawn uniformly."""
    b, length = tokens.shape
    width = max(1, math.ceil(rate * length))
    real = tokens != 0
    k_pos, k_act = jax.random.split(key)
    scores = jnp.where(real, jax.random.uniform(k_pos, (b, length)), -1.0)
    _, positions = jax.lax.top_k(scores, width)
    count = chosen_count(real.sum(axis=1), rate, width)
    chosen = jnp.arange(width)[None, :] < count[:, None]
    u = jax.random.uniform(k_act, (b, width))
    action = jnp.where(u < 0.8, MASK, jnp.where(u < 0.9, RANDOM, KEEP))
    return positions, chosen, jnp.where(chosen, action, KEEP)


class MLMHead(nnx.Module):
    """The mask vector and the vocabulary projection of the final token states."""

    def __init__(self, width: int, vocab_size: int, *, rngs: nnx.Rngs, dtype):
        self.dtype = dtype
        self.mask = nnx.Param(jnp.zeros((int(width),), jnp.float32))
        self.norm = _layer_norm(int(width), rngs=rngs)
        self.out = nnx.Linear(
            int(width), int(vocab_size), dtype=dtype, param_dtype=jnp.float32, kernel_init=_dense_init, rngs=rngs
        )

    def __call__(self, states: jax.Array) -> jax.Array:
        return self.out(self.norm(states).astype(self.dtype)).astype(jnp.float32)


class MaskedLM(nnx.Module):
    """A ``TextTransformer`` (``backbone``) trained to recover corrupted tokens (see the module docstring).

    ``__call__(tokens, train)`` -> (logits (B, K, vocab_size) float32, targets (B, K) int32, chosen (B, K)
    bool)."""

    modality = "text"

    def __init__(self, backbone: TextTransformer, *, rate: float, rngs: nnx.Rngs):
        if not isinstance(backbone, TextTransformer):
            raise ValueError(
                f"masked-LM pre-training needs a Transformer text model (transformer, transformer_small), "
                f"got {type(backbone).__name__}"
            )
        if not 0.0 < float(rate) < 1.0:
            raise ValueError(f"mlm.mask_rate must be in (0, 1), got {rate}")
        self.rate = float(rate)
        self.backbone = backbone
        width, vocab = backbone.embed.embedding.shape[1], backbone.embed.num_embeddings
        self.vocab_size = int(vocab)
        self.head = MLMHead(width, vocab, rngs=rngs, dtype=backbone.dtype)
        self.mask_rng = DropoutRng(rngs)

    @property
    def input_shape(self):
        return self.backbone.input_shape

    @property
    def num_classes(self):
        return self.backbone.num_classes

    def __call__(self, tokens, train: bool = False):
        tokens = jnp.asarray(tokens).astype(jnp.int32)
        key = self.mask_rng.next_key() if train else jax.random.key(EVAL_KEY)
        k_choose, k_random = jax.random.split(key)
        positions, chosen, action = choose(tokens, self.rate, k_choose)
        rows = jnp.arange(tokens.shape[0])[:, None]
        targets = tokens[rows, positions]
        embed = self.backbone.embed
        x = embed(tokens)
        random_ids = jax.random.randint(k_random, targets.shape, 1, self.vocab_size)  # any id but padding
        new = jnp.where(
            (action == MASK)[..., None],
            self.head.mask[...].astype(x.dtype),
            jnp.where((action == RANDOM)[..., None], embed(random_ids), x[rows, positions]),
        )
        x = x.at[rows, positions].set(new)
        _, acts = _encode(self.backbone, x, tokens != 0, train)
        states = acts["tokens"][rows, positions]
        return self.head(states), targets, chosen


def build_masked_lm(model_cfg, info, *, seed: int, rate: float, dtype=jnp.float32) -> MaskedLM:
    """The ``MaskedLM`` over the text Transformer a config's `model` section names, initialised from `seed`."""

    def make():
        rngs = nnx.Rngs(seed)
        return MaskedLM(registry.create_from_config(model_cfg, info, rngs=rngs, dtype=dtype), rate=rate, rngs=rngs)

    return registry.initialise(make)
