"""Transformer encoder, text students and the ViT (titans/models/transformer.py, titans/models/text.py):
padding invariance, masks, bfloat16 compute, dropout state, cost at real lengths, data parallelism."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from titans import models, parallel, train
from titans.config import base_config
from titans.data.info import DatasetInfo
from titans.models import transformer as T

WORDNET = DatasetInfo(
    name="wordnet",
    num_classes=45,
    image_shape=(128,),
    mean=(),
    std=(),
    splits={"train": 1000, "test": 100},
    augment="none",
    modality="text",
    vocab_size=8000,
)
TINY = {"depth": 2, "width": 16, "heads": 2}  # a transformer small enough to compile in a moment
ONE = {**TINY, "depth": 1}
TEXT_MODELS = [
    ("text_bag", {"embed_dim": 16, "hidden": (16,)}),
    ("text_cnn", {"embed_dim": 16, "channels": (16, 16), "kernel": 3, "dense": 16}),
    ("transformer_small", {}),
    ("transformer", TINY),
    ("transformer", {**TINY, "pool": "cls"}),
]


def build(name, info=WORDNET, seed=0, dtype=jnp.float32, **kwargs):
    cfg = ml_collections.ConfigDict({"name": name, "kwargs": kwargs})
    return models.build_model(cfg, info, seed=seed, dtype=dtype)


@functools.cache
def built(name, **kwargs):
    """`build` (for wordnet, or for Fashion-MNIST for the ViT), shared by the tests that only read the model."""
    return build(name, _fmnist() if name == "vit" else WORDNET, **kwargs)


def sequences(lengths, vocab=WORDNET.vocab_size, seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=n).astype(np.int32) for n in lengths]


def padded(seqs, length) -> np.ndarray:
    out = np.zeros((len(seqs), length), np.int32)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out


@pytest.mark.parametrize("name,kwargs", TEXT_MODELS, ids=lambda v: str(v) if isinstance(v, str) else "")
def test_padding_changes_nothing(name, kwargs):
    """A sequence's logits are the same whatever padding follows it (0, 5 or 100 extra tokens), and the
    padding mask is what makes them so: without it (every position real) the extra padding moves them."""
    model = built(name, **kwargs)
    seqs = sequences([3, 11, 17])
    forward = jax.jit(lambda m, t: m(t))
    unmasked = jax.jit(lambda m, t: m.forward(t, jnp.ones(t.shape, bool), False)[0])
    base = np.asarray(forward(model, padded(seqs, 17)))
    assert base.shape == (3, 45) and np.all(np.isfinite(base))
    for extra in (5, 100):
        np.testing.assert_allclose(forward(model, padded(seqs, 17 + extra)), base, rtol=1e-5, atol=1e-5)
    # The same check fails for the model without its mask (the shortest sequence gains 14 + 100 pads).
    ref = np.asarray(unmasked(model, padded(seqs, 17)))
    assert np.max(np.abs(np.asarray(unmasked(model, padded(seqs, 117))) - ref)) > 1e-3
    # A row of padding only (an eval batch's filler row) gives finite logits.
    assert np.all(np.isfinite(np.asarray(forward(model, np.zeros((2, 8), np.int32)))))


def test_transformer_masks_keys_and_pooling_separately():
    """The key mask and the masked mean each matter: with either one dropped, padding moves the logits."""
    model = built("transformer", **TINY)
    seqs = sequences([4, 9])
    short, long = padded(seqs, 9), padded(seqs, 40)

    @functools.partial(jax.jit, static_argnums=(1, 2))
    def logits(tokens, attn_mask: bool, pool_mask: bool):
        mask = jnp.asarray(tokens != 0)
        x = model.encoder.pos[: tokens.shape[1]] + model.embed(tokens).astype(jnp.float32)
        for block in model.encoder.blocks:  # the encoder's own loop, with either mask left out
            x = block(x, mask if attn_mask else None, None)
        x = model.encoder.norm(x)
        pooled = T.masked_mean(x, mask) if pool_mask else jnp.mean(x, axis=1)
        return model.classifier(pooled)

    np.testing.assert_allclose(logits(long, True, True), jax.jit(model)(short), rtol=1e-5, atol=1e-5)
    for attn_mask, pool_mask in ((False, True), (True, False)):
        assert (
            np.max(np.abs(np.asarray(logits(long, attn_mask, pool_mask) - logits(short, attn_mask, pool_mask)))) > 1e-3
        )


def test_attention_matches_a_numpy_reference():
    """Heads split the width in order, scores are scaled by 1/sqrt(head dim), masked keys get no weight."""
    width, heads = 8, 2
    attn = T.Attention(width, heads, rngs=nnx.Rngs(0), dtype=jnp.float32)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, width)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    qkv = x @ np.asarray(attn.qkv.kernel[...]) + np.asarray(attn.qkv.bias[...])
    q, k, v = np.split(qkv, 3, axis=-1)
    dh = width // heads
    out = np.zeros_like(x)
    for h in range(heads):
        sl = slice(h * dh, (h + 1) * dh)
        scores = np.einsum("btd,bsd->bts", q[..., sl], k[..., sl]) / np.sqrt(dh)
        scores = np.where(mask[:, None, :], scores, -np.inf)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        out[..., sl] = np.einsum("bts,bsd->btd", w / w.sum(-1, keepdims=True), v[..., sl])
    expected = out @ np.asarray(attn.out.kernel[...]) + np.asarray(attn.out.bias[...])
    np.testing.assert_allclose(attn(jnp.asarray(x), jnp.asarray(mask)), expected, rtol=1e-5, atol=1e-5)


def _eqns(fn, *args) -> list:
    """Every equation of ``fn``'s jaxpr, nested jaxprs included."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            found.append(eqn)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def _dot_dtypes(fn, *args) -> list[str]:
    """The operand dtypes of every dot_general in ``fn``."""
    eqns = [e for e in _eqns(fn, *args) if e.primitive.name == "dot_general"]
    return ["/".join(str(v.aval.dtype) for v in e.invars) for e in eqns]


@pytest.mark.parametrize("name", ["transformer", "vit"])
def test_bfloat16_compute_keeps_float32_params(name, monkeypatch):
    """dtype=bfloat16: every parameter stays float32, every matmul but the classifier's runs on bfloat16
    operands (6 per block: qkv, scores, weighted values, output, two MLP layers), the residual stream (which
    the LayerNorms read) stays float32, logits are float32 and close to the float32 model's with the same
    parameters."""
    info = WORDNET if name == "transformer" else _fmnist()
    x = (
        padded(sequences([5, 12]), 12)
        if name == "transformer"
        else np.random.default_rng(0).standard_normal((2, 28, 28, 1)).astype(np.float32)
    )
    kwargs = TINY if name == "transformer" else {**TINY, "patch": 7}
    m16, m32 = build(name, info, dtype=jnp.bfloat16, **kwargs), build(name, info, **kwargs)
    params = jax.tree.leaves(nnx.state(m16, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    dots = _dot_dtypes(lambda t: m16(t), x)
    assert dots[:-1] == ["bfloat16/bfloat16"] * 6 * TINY["depth"] + ["bfloat16/bfloat16"] * (name == "vit")
    assert dots[-1] == "float32/float32"
    assert _dot_dtypes(lambda t: m32(t), x) == ["float32/float32"] * len(dots)
    # What each LayerNorm reads: the residual stream, float32 (2 per block and the final one).
    seen, layer_norm = [], nnx.LayerNorm.__call__
    monkeypatch.setattr(
        nnx.LayerNorm, "__call__", lambda self, v, **kw: seen.append(v.dtype) or layer_norm(self, v, **kw)
    )
    jax.eval_shape(lambda t: m16(t), x)
    assert seen == [jnp.float32] * (2 * TINY["depth"] + 1)
    monkeypatch.undo()
    logits, acts = m16(x, capture=True)
    assert logits.dtype == jnp.float32 and acts["block1"].dtype == jnp.bfloat16
    assert acts["features"].dtype == jnp.float32
    np.testing.assert_allclose(logits, m32(x), atol=0.1, rtol=0.1)


def _fmnist() -> DatasetInfo:
    return DatasetInfo(
        name="fashion_mnist",
        num_classes=10,
        image_shape=(28, 28, 1),
        mean=(72.9404,),
        std=(90.0212,),
        splits={"train": 60000, "test": 10000},
        augment="none",
    )


def test_models_build_from_a_config_and_refuse_the_wrong_modality():
    for name, kwargs in TEXT_MODELS:
        model = built(name, **kwargs)
        assert models.modality(name) == "text" and model.input_shape == (128,)
        assert model.embed.embedding.shape[0] == WORDNET.vocab_size  # the vocabulary came from the info
        assert "vocab_size" not in models.model_kwargs(name)  # the dataset's, never the config's
    vit = built("vit", patch=7, **TINY)
    logits, acts = vit(np.zeros((3, 28, 28, 1), np.float32), capture=True)
    assert logits.shape == (3, 10) and list(acts) == ["block1", "block2", "tokens", "features"]
    assert vit.encoder.pos.shape == (16, 16)  # (28 / 7)^2 patches
    assert models.modality("vit") == "image"
    with pytest.raises(ValueError, match="reads image inputs, but dataset 'wordnet' holds text"):
        build("cnn")
    with pytest.raises(ValueError, match="reads text inputs, but dataset 'fashion_mnist' holds image"):
        build("transformer", _fmnist())
    with pytest.raises(ValueError, match="patch"):
        build("vit", _fmnist(), patch=5)
    with pytest.raises(TypeError, match="fixes depth"):
        build("transformer_small", depth=3)
    bag = built(*TEXT_MODELS[0][:1], **TEXT_MODELS[0][1])
    with pytest.raises(TypeError, match="integer token ids"):
        bag(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="at most 128 tokens"):
        bag(np.zeros((1, 129), np.int32))


def test_vit_patches_are_the_image_tiles_in_row_major_order():
    x = np.random.default_rng(0).standard_normal((2, 8, 12, 3)).astype(np.float32)
    got = np.asarray(T.patchify(jnp.asarray(x), 4))
    expected = [
        [x[b, r : r + 4, c : c + 4].reshape(-1) for r in range(0, 8, 4) for c in range(0, 12, 4)] for b in (0, 1)
    ]
    np.testing.assert_array_equal(got, np.asarray(expected))


def test_text_flops_at_real_lengths_span_a_hundredfold():
    """XLA's count on an int32 token batch: the defaults span >= 100x from text_bag to the transformer, in
    order, at the bucket lengths; a longer bucket costs the transformer more than proportionally."""
    flops = {}
    for name in ("text_bag", "text_cnn", "transformer_small", "transformer"):
        model = nnx.eval_shape(
            lambda name=name: models.create_model(
                name, num_classes=45, input_shape=(128,), rngs=nnx.Rngs(0), vocab_size=8000
            )
        )
        flops[name] = models.flops_per_example(model, (32,))
    assert flops["text_bag"] < flops["text_cnn"] < flops["transformer_small"] < flops["transformer"]
    assert flops["transformer"] / flops["text_bag"] >= 100
    assert flops["transformer"] / flops["transformer_small"] >= 10
    small = built("transformer", **TINY)
    f16, f64 = (models.flops_per_example(small, (n,)) for n in (16, 64))
    assert f64 > 4 * f16


def test_dropout_state_is_plain_integers_and_advances():
    """Dropout draws from a seed and a step count kept as int arrays among the non-parameter state (the
    trainer casts that state to float32); each training call advances the step, so two calls differ; eval is
    deterministic and equals the model without dropout."""
    model = build("transformer", dropout=0.3, **ONE)
    no_drop = built("transformer", **ONE)
    _, _, rest = nnx.split(model, nnx.Param, ...)
    leaves = jax.tree.leaves(rest)
    assert leaves and all(jnp.issubdtype(x.dtype, jnp.integer) for x in leaves)
    jax.tree.map(lambda x: x.astype(jnp.float32), rest)  # what make_train_step does with model_state
    tokens = padded(sequences([6, 10]), 10)
    run = nnx.jit(lambda m, t, train: m(t, train=train), static_argnums=2)
    np.testing.assert_allclose(run(model, tokens, False), run(no_drop, tokens, False), rtol=1e-6, atol=1e-6)
    first, second = run(model, tokens, True), run(model, tokens, True)
    assert int(model.rng.step[...]) == 2
    assert np.max(np.abs(np.asarray(first) - np.asarray(second))) > 1e-3
    assert np.max(np.abs(np.asarray(first) - np.asarray(run(model, tokens, False)))) > 1e-3
    again = build("transformer", dropout=0.3, **ONE)
    np.testing.assert_array_equal(run(again, tokens, True), first)  # same seed, same masks


def _train_step_on(devices, config, batch):
    """One step of the trainer's own train step (titans.train.make_train_step: the config's objective,
    optimizer and NaN guard) on a data-parallel mesh over `devices`; (params, rest of the state, metrics)."""
    mesh = parallel.make_mesh(devices)
    model = models.build_model(config.model, WORDNET, seed=0, dtype=jnp.float32)
    tx, schedule = train.make_optimizer(config, 10, 1000)
    graphdef, state = train.TrainState.create(model, tx)
    state = parallel.replicate(state, mesh)
    step = jax.jit(train.make_train_step(graphdef, tx, train.resolve(None, config), WORDNET, jnp.float32, schedule))
    new_state, metrics = step(state, parallel.to_global(batch, mesh), None)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(new_state.params))
    params, rest = (jax.device_get(nnx.to_pure_dict(t)) for t in (new_state.params, new_state.model_state))
    return params, rest, jax.device_get(metrics)


def test_eight_devices_equal_one_device():
    """The trainer's step on a batch of 16 token rows sharded over 8 devices equals the step on one device:
    gradients over all rows and the same dropout masks (keys from the replicated state, bits independent of
    sharding). The default optimizer is SGD with momentum: Adam's first step, sign(g), would turn rounding
    noise of near-zero gradients into whole learning-rate steps."""
    assert jax.device_count() == 8
    config = base_config()
    config.model.name = "transformer"
    config.model.kwargs = ml_collections.ConfigDict({**ONE, "dropout": 0.1})
    config.optimizer.learning_rate = 0.5
    rng = np.random.default_rng(0)
    tokens = padded(sequences(rng.integers(1, 24, size=16)), 24)
    batch = {"image": tokens, "label": rng.integers(0, 45, size=16).astype(np.int32)}
    p8, r8, m8 = _train_step_on(jax.devices(), config, batch)
    p1, r1, m1 = _train_step_on(jax.devices()[:1], config, batch)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert jax.tree.leaves(r8) == jax.tree.leaves(r1)
    assert int(r8["rng"]["step"]) == 1  # the step drew dropout masks, and the NaN guard kept its state
    p0 = nnx.to_pure_dict(nnx.split(built("transformer", **ONE), nnx.Param, ...)[1])  # same parameters
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p0))) > 1e-3
