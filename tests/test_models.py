"""Tests of the model zoo (titans.models): interface, BatchNorm modes, dtypes, cost helpers.

CPU time is dominated by XLA compiling each new op shape, so the per-name tests stay cheap:
shapes are checked by abstract evaluation (tracing, no compilation), models whose numbers
are not under test get their parameters from numpy instead of per-shape random kernels, and
only small models are compiled whole.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from titans import models

SMALL = (8, 8, 3)
BATCH = 2
FMNIST = (28, 28, 1)
STUDENT = {"channels": (8, 16), "dense": 32}  # the tiny Fashion-MNIST student

ALIASES = (
    ["mlp", "cnn", "conv1d", "cifar_resnet", "wide_resnet", "mobilenet_v2"]
    + [f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)]
    + ["resnet8x4", "resnet32x4"]
    + ["wrn_16_1", "wrn_16_2", "wrn_16_4", "wrn_28_10", "wrn_40_1", "wrn_40_2", "wrn_40_4"]
    + ["resnet18", "resnet34", "resnet50"]
)

# Expected stage keys, in forward order.
STAGES = {
    "mlp": ["hidden1", "hidden2"],
    "cnn": ["stage1", "stage2"],
    "conv1d": ["stage1", "stage2"],
    "mobilenet_v2": [f"stage{i}" for i in range(1, 8)],
}
for _n in ("resnet18", "resnet34", "resnet50"):
    STAGES[_n] = [f"stage{i}" for i in range(1, 5)]


def stages_of(name):
    return STAGES.get(name, ["stage1", "stage2", "stage3"])


@functools.cache
def _abstract_model(name, input_shape, num_classes, kwargs):
    return nnx.eval_shape(
        lambda: models.create_model(
            name, num_classes=num_classes, input_shape=input_shape, rngs=nnx.Rngs(0), **dict(kwargs)
        )
    )


def abstract_model(name, input_shape=SMALL, num_classes=10, **kwargs):
    """The model with ShapeDtypeStructs for arrays: built by tracing, nothing is computed.

    Cached: callers only split it, which leaves it unchanged."""
    return _abstract_model(name, tuple(input_shape), num_classes, tuple(sorted(kwargs.items())))


def numpy_filled(name, input_shape=SMALL, num_classes=10, seed=0, **kwargs):
    """A concrete model whose state comes from numpy (no per-shape XLA compiles)."""
    graphdef, state = nnx.split(abstract_model(name, input_shape, num_classes, **kwargs))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        # The last path entry is the Variable's `.value`; the one before names the variable.
        key = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)][-1]
        if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            return jax.random.key(seed)
        if key in ("scale", "var"):
            value = np.ones(leaf.shape, leaf.dtype)
        elif key in ("bias", "mean", "count"):
            value = np.zeros(leaf.shape, leaf.dtype)
        else:
            fan_in = math.prod(leaf.shape[:-1])
            value = rng.standard_normal(leaf.shape) * math.sqrt(2.0 / fan_in)
        # A jax array (device_put, no compile): a numpy value would be updated in place.
        return jnp.asarray(value.astype(leaf.dtype))

    state = jax.tree_util.tree_map_with_path(fill, state)
    return nnx.merge(graphdef, state)


def batch(input_shape=SMALL, seed=0, n=BATCH):
    return np.random.default_rng(seed).standard_normal((n, *input_shape)).astype(np.float32)


def test_registered_names():
    # The ViT and the text models are tested in tests/test_transformer.py.
    assert sorted(ALIASES + ["text_bag", "text_cnn", "transformer", "transformer_small", "vit"]) == models.MODEL_NAMES


def trace(name, train, input_shape=SMALL, **kwargs):
    """Trace ``model(x, train=train, capture=True)`` on a split model without compiling it.

    Returns the output shapes, plus for every BatchNorm statistic whether the function hands
    back its input unchanged (the jaxpr forwards the very same variable).
    """
    graphdef, params, stats = nnx.split(abstract_model(name, input_shape, **kwargs), nnx.Param, nnx.BatchStat)

    def run(params, stats, x):
        model = nnx.merge(graphdef, params, stats)
        return model(x, train=train, capture=True), nnx.state(model, nnx.BatchStat)

    x = jax.ShapeDtypeStruct((BATCH, *input_shape), jnp.float32)
    closed, (out, new_stats) = jax.make_jaxpr(run, return_shape=True)(params, stats, x)
    assert jax.tree.structure(new_stats) == jax.tree.structure(stats)
    n_params, n_stats = len(jax.tree.leaves(params)), len(jax.tree.leaves(stats))
    stat_in = closed.jaxpr.invars[n_params : n_params + n_stats]
    stat_out = closed.jaxpr.outvars[len(closed.jaxpr.outvars) - n_stats :]
    forwarded = [o is i for o, i in zip(stat_out, stat_in)]
    return out, forwarded


@pytest.mark.parametrize("name", ALIASES)
def test_interface_and_batchnorm_modes(name):
    for train in (False, True):
        (logits, acts), forwarded = trace(name, train)
        assert logits.shape == (BATCH, 10) and logits.dtype == jnp.float32
        # Stage order must survive tracing (JAX would sort a plain dict's keys).
        assert list(acts) == stages_of(name) + ["features"]
        assert acts["features"].ndim == 2 and acts["features"].shape[0] == BATCH
        assert all(a.shape[0] == BATCH for a in acts.values())
        if name == "mlp":
            assert forwarded == []
        elif train:
            # Every BN normalises with batch statistics and writes its running averages.
            assert forwarded and not any(forwarded), f"{forwarded.count(True)} BN stats untouched"
        else:
            assert forwarded and all(forwarded), "eval mode changed BatchNorm statistics"


@pytest.mark.parametrize(
    "name,input_shape,kwargs",
    [
        ("mlp", (8, 8, 1), {"hidden": ()}),
        ("cnn", (8, 8, 1), {"channels": (4, 4, 4, 4), "dense": 8, "batch_norm": False}),
        ("cnn", (28, 28, 1), {"channels": (8, 16), "dense": 32}),
        ("cifar_resnet", (8, 8, 3), {"depth": 10, "widths": (4, 8, 8, 16)}),
        ("cifar_resnet", (8, 8, 3), {"depth": 8, "widths": (8, 16, 16), "stem_width": 4, "shortcut": "pad"}),
        ("wide_resnet", (8, 8, 3), {"depth": 10, "widen": 1}),
        ("mobilenet_v2", (8, 8, 3), {"width_mult": 0.25, "dropout": 0.2}),
        ("resnet18", (64, 64, 3), {"width": 4}),
        # resnet50's bottleneck blocks are covered by tracing and the exact parameter count:
        # compiling its 53 convolutions here took 5-8 s on 2 cores, the slowest case.
    ],
)
def test_numerics_in_both_modes(name, input_shape, kwargs):
    model = numpy_filled(name, input_shape, **kwargs)
    graphdef, state = nnx.split(model)
    stats_before = nnx.state(model, nnx.BatchStat)

    @jax.jit
    def run(state, x):
        m = nnx.merge(graphdef, state)
        ev, ev_acts = m(x, train=False, capture=True)
        # Leaves, not the State: a State holds the live Variables the train call updates.
        stats_after_eval = jax.tree.leaves(nnx.state(m, nnx.BatchStat))
        train, acts = m(x, train=True, capture=True)
        stats = jax.tree.leaves(nnx.state(m, nnx.BatchStat))
        return train, acts, stats, ev, ev_acts, stats_after_eval

    x = batch(input_shape)
    train, acts, stats, ev, ev_acts, stats_after_eval = run(state, x)
    for out in (train, ev):
        assert out.shape == (BATCH, 10) and out.dtype == jnp.float32
        assert np.all(np.isfinite(out))
    stats_before = jax.tree.leaves(stats_before)
    assert len(stats) == len(stats_before) == len(stats_after_eval)
    for before, after in zip(stats_before, stats):
        assert not np.allclose(before, after)
    for before, after in zip(stats_before, stats_after_eval):
        np.testing.assert_array_equal(before, after)
    # 'features' is what the classifier reads; dropout (train mode only) sits in between.
    tol = {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(model.classifier(ev_acts["features"]), ev, **tol)
    if kwargs.get("dropout"):
        assert not np.allclose(model.classifier(acts["features"]), train, **tol)
    else:
        np.testing.assert_allclose(model.classifier(acts["features"]), train, **tol)
    # Eval uses running averages: an example's logits do not depend on the rest of its batch,
    # while in train mode (batch statistics) they do.
    x_alt = x.copy()
    x_alt[1] = batch(input_shape, seed=7)[0]
    train_alt, _, _, ev_alt, _, _ = run(state, x_alt)
    np.testing.assert_allclose(ev[0], ev_alt[0], rtol=2e-5, atol=2e-5)
    if kwargs.get("batch_norm", True) and name != "mlp":
        assert not np.allclose(train[0], train_alt[0], rtol=1e-4, atol=1e-4)


def test_dropout_only_in_train_mode():
    # Structural check on the jaxpr: compiling threefry for several dropout layers costs
    # seconds on CPU, so the numeric dropout check runs on mobilenet_v2's single layer.
    graphdef, state = nnx.split(abstract_model("wrn_16_1", dropout=0.3))
    x = jax.ShapeDtypeStruct((BATCH, *SMALL), jnp.float32)

    def count(jaxpr, primitive):
        n = 0
        for eqn in jaxpr.eqns:
            n += eqn.primitive.name == primitive
            for param in eqn.params.values():
                for sub in param if isinstance(param, (list, tuple)) else (param,):
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        n += count(sub, primitive)
        return n

    def count_random_bits(train):
        fn = lambda s, x: nnx.merge(graphdef, s)(x, train=train)
        return count(jax.make_jaxpr(fn)(state, x).jaxpr, "random_bits")

    assert count_random_bits(False) == 0
    assert count_random_bits(True) == 6  # one per block
    assert "wide_resnet" in models.MODEL_NAMES and "dropout" in models.model_kwargs("wrn_16_1")


def test_imagenet_stem_rule():
    def stage_shapes(name, hw):
        model = abstract_model(name, (hw, hw, 3))
        graphdef, state = nnx.split(model)
        x = jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32)
        _, acts = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, capture=True), state, x)
        return [acts[f"stage{i}"].shape[1] for i in range(1, 5)]

    assert stage_shapes("resnet18", 224) == [56, 28, 14, 7]  # 7x7/2 stem + max-pool
    assert stage_shapes("resnet18", 64) == [16, 8, 4, 2]
    assert stage_shapes("resnet18", 32) == [32, 16, 8, 4]  # 3x3/1 stem, no pool
    assert stage_shapes("resnet18", 8) == [8, 4, 2, 1]


def test_mobilenet_stride_rule():
    def final_map(hw):
        model = abstract_model("mobilenet_v2", (hw, hw, 3))
        graphdef, state = nnx.split(model)
        x = jax.ShapeDtypeStruct((1, hw, hw, 3), jnp.float32)
        _, acts = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x, capture=True), state, x)
        return acts["stage7"].shape[1:3]

    assert final_map(224) == (7, 7)
    assert final_map(64) == (2, 2)
    assert final_map(32) == (4, 4)
    assert final_map(8) == (1, 1)


# Published parameter counts (CIFAR ones from He et al. 2016 and the CRD repository,
# ImageNet ones from torchvision).
@pytest.mark.parametrize(
    "name,input_shape,num_classes,expected",
    [
        ("resnet20", (32, 32, 3), 10, 0.27e6),
        ("resnet56", (32, 32, 3), 10, 0.85e6),
        ("resnet110", (32, 32, 3), 10, 1.7e6),
        ("resnet8x4", (32, 32, 3), 100, 1.23e6),
        ("resnet32x4", (32, 32, 3), 100, 7.43e6),
        ("wrn_40_2", (32, 32, 3), 10, 2.2e6),
        ("wrn_16_2", (32, 32, 3), 100, 0.70e6),
        ("wrn_28_10", (32, 32, 3), 10, 36.5e6),
        ("resnet18", (224, 224, 3), 1000, 11_689_512),
        ("resnet34", (224, 224, 3), 1000, 21_797_672),
        ("resnet50", (224, 224, 3), 1000, 25_557_032),
        ("mobilenet_v2", (224, 224, 3), 1000, 3_504_872),
    ],
)
def test_param_counts_match_published(name, input_shape, num_classes, expected):
    count = models.param_count(abstract_model(name, input_shape, num_classes))
    assert abs(count - expected) / expected < 0.03, (name, count, expected)


def test_param_counts_exact_for_simple_models():
    count = models.param_count(abstract_model("mlp", (28, 28, 1), 10, hidden=(256, 256)))
    assert count == 784 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    # conv (no bias) + BN scale/shift per stage; two 2x2 pools take 28 to 7.
    count = models.param_count(abstract_model("cnn", (28, 28, 1), 10))
    assert count == (9 * 32 + 64) + (9 * 32 * 64 + 128) + (7 * 7 * 64 * 128 + 128) + (1290)


def test_flops_single_dense_matches_hand_formula():
    model = abstract_model("mlp", (28, 28, 1), 10, hidden=())
    flops = models.flops_per_example(model, (28, 28, 1))
    assert abs(flops - 2 * 784 * 10) / (2 * 784 * 10) < 0.05


def test_flops_grow_with_depth_and_width():
    def flops(name, input_shape=SMALL, **kw):
        f = models.flops_per_example(abstract_model(name, input_shape, **kw), input_shape)
        assert f > 0
        return f

    assert flops("cnn", FMNIST, **STUDENT) < flops("cnn", FMNIST)
    assert flops("resnet8") < flops("resnet20")
    assert flops("wrn_16_1") < flops("wrn_16_2")


def test_real_init_student_cnn():
    model = models.create_model("cnn", num_classes=10, input_shape=FMNIST, rngs=nnx.Rngs(0), **STUDENT)
    params = nnx.state(model, nnx.Param)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits, acts = model(batch(FMNIST), train=True, capture=True)
    assert logits.shape == (BATCH, 10) and np.all(np.isfinite(logits))
    assert acts["stage1"].shape == (BATCH, 14, 14, 8)
    assert acts["stage2"].shape == (BATCH, 7, 7, 16)
    assert acts["features"].shape == (BATCH, 32)
    same = models.create_model("cnn", num_classes=10, input_shape=FMNIST, rngs=nnx.Rngs(0), **STUDENT)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(nnx.state(same, nnx.Param))):
        np.testing.assert_array_equal(a, b)  # same seed, same weights
    count = models.param_count(model)
    assert count == models.param_count(abstract_model("cnn", FMNIST, **STUDENT))
    # BatchNorm statistics are not parameters.
    n_stats = sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.BatchStat)))
    assert count == sum(a.size for a in jax.tree.leaves(nnx.state(model))) - n_stats


def test_conv_init_is_he_normal_fan_out_per_group():
    from titans.models import layers

    rngs = nnx.Rngs(0)
    dense_kernel = layers.conv(64, 64, 3, rngs=rngs, dtype=jnp.float32).kernel[...]
    depthwise = layers.conv(256, 256, 3, groups=256, rngs=rngs, dtype=jnp.float32).kernel[...]
    assert depthwise.shape == (3, 3, 1, 256)
    np.testing.assert_allclose(np.std(dense_kernel), math.sqrt(2 / (9 * 64)), rtol=0.1)
    # PyTorch's fan_out of a depthwise kernel is 9, not 9 * channels.
    np.testing.assert_allclose(np.std(depthwise), math.sqrt(2 / 9), rtol=0.1)


def test_batchnorm_matches_flax_batchnorm():
    # layers.BatchNorm only changes how the running statistics are written.
    from titans.models import layers

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 5, 5, 6)) * 3 + 1).astype(np.float32)
    w = rng.standard_normal(x.shape).astype(np.float32)
    ours = layers.batch_norm(6, rngs=nnx.Rngs(0), dtype=jnp.float32)
    ref = nnx.BatchNorm(6, momentum=layers.BN_MOMENTUM, epsilon=layers.BN_EPSILON, rngs=nnx.Rngs(0))
    assert isinstance(ours, nnx.BatchNorm)
    for bn in (ours, ref):
        bn.scale.set_value(jnp.linspace(0.5, 2.0, 6))
        bn.bias.set_value(jnp.linspace(-1.0, 1.0, 6))
    for use_running_average in (False, True, False):
        np.testing.assert_allclose(
            ours(x, use_running_average=use_running_average),
            ref(x, use_running_average=use_running_average),
            rtol=1e-5,
            atol=1e-5,
        )
        np.testing.assert_allclose(ours.mean[...], ref.mean[...], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(ours.var[...], ref.var[...], rtol=1e-6, atol=1e-6)
    grads = []
    for bn in (ours, ref):
        graphdef, state = nnx.split(bn)
        loss = lambda x: jnp.sum(nnx.merge(graphdef, state, copy=True)(x, use_running_average=False) * w)
        grads.append(jax.grad(loss)(x))
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-4, atol=1e-5)


def test_bf16_compute_keeps_float32_params_and_logits():
    model = models.create_model(
        "cnn", num_classes=10, input_shape=FMNIST, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, **STUDENT
    )
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    logits, acts = model(batch(FMNIST), train=True, capture=True)
    assert logits.dtype == jnp.float32
    assert acts["stage1"].dtype == jnp.bfloat16  # the convolutions really ran in bf16
    stats = jax.tree.leaves(nnx.state(model, nnx.BatchStat))
    assert all(s.dtype == jnp.float32 for s in stats)
    assert np.all(np.isfinite(model(batch(FMNIST), train=False)))
    # The string spelling of the dtype works too.
    abstract = abstract_model("resnet8", dtype="bfloat16")
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def test_unknown_name_lists_close_matches():
    with pytest.raises(ValueError) as err:
        models.create_model("resnet2O", num_classes=10, input_shape=SMALL, rngs=nnx.Rngs(0))
    msg = str(err.value)
    assert "resnet2O" in msg and "'resnet20'" in msg and "wrn_28_10" in msg


def test_unknown_and_fixed_kwargs_rejected():
    with pytest.raises(TypeError, match="widht"):
        models.create_model("resnet18", num_classes=10, input_shape=SMALL, rngs=nnx.Rngs(0), widht=32)
    with pytest.raises(TypeError, match="depth"):
        models.create_model("resnet20", num_classes=10, input_shape=SMALL, rngs=nnx.Rngs(0), depth=56)
    with pytest.raises(ValueError, match="6n\\+2"):
        models.create_model("cifar_resnet", num_classes=10, input_shape=SMALL, rngs=nnx.Rngs(0), depth=21)


def test_wrong_input_shape_is_reported():
    model = numpy_filled("cnn", FMNIST)
    with pytest.raises(ValueError, match="input_shape"):
        model(batch((32, 32, 1)))
    with pytest.raises(ValueError, match="input_shape"):
        numpy_filled("resnet8")(batch((8, 8, 1)))  # channel count differs


def test_jitted_grad_through_split_merge():
    model = models.create_model("cnn", num_classes=10, input_shape=FMNIST, rngs=nnx.Rngs(0), **STUDENT)
    graphdef, params, rest = nnx.split(model, nnx.Param, nnx.BatchStat)
    x, y = batch(FMNIST, n=4), jnp.arange(4) % 10

    @jax.jit
    def step(params, rest, x, y):
        def loss_fn(params):
            # copy=True: merge otherwise reuses the Variables jit made for `rest`, and the
            # BatchNorm update inside grad then fails with a TraceContextError.
            m = nnx.merge(graphdef, params, rest, copy=True)
            logits = m(x, train=True)
            loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(y.shape[0]), y])
            return loss, nnx.state(m, nnx.BatchStat)

        (loss, new_rest), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        return loss, params, new_rest, grads

    loss0, params1, rest1, grads = step(params, rest, x, y)
    assert np.isfinite(loss0)
    assert jax.tree.structure(grads) == jax.tree.structure(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    assert all(np.any(g != 0) for g in jax.tree.leaves(grads))
    assert not np.allclose(jax.tree.leaves(rest1)[0], jax.tree.leaves(rest)[0])
    loss1, *_ = step(params1, rest1, x, y)
    assert loss1 < loss0


@pytest.mark.parametrize("shape", [(4, 28, 28, 8), (3, 7, 9, 5), (2, 2, 2, 1), (2, 9, 7, 32)])
def test_max_pool_2x2_equals_the_reduce_window_form(shape, monkeypatch):
    """Both modes of max_pool_2x2 give nnx.max_pool's values; the training form gives the same gradient
    after a ReLU (where the only ties, zeros, get no gradient either way). Eval pools of many channels
    are reduce_window itself, training pools and narrow eval pools the reshape."""
    from titans.models import layers

    x = jnp.asarray(np.random.default_rng(0).standard_normal(shape).astype(np.float32))

    def reference(v):
        return nnx.max_pool(v, (2, 2), strides=(2, 2), padding="VALID")

    for train in (True, False):
        np.testing.assert_array_equal(np.asarray(layers.max_pool_2x2(x, train=train)), np.asarray(reference(x)))
        jaxpr = str(jax.make_jaxpr(lambda v, train=train: layers.max_pool_2x2(v, train=train))(x))
        wide_eval = not train and shape[-1] >= layers.EVAL_REDUCE_WINDOW_MIN_CHANNELS
        assert ("reduce_window_max" in jaxpr) == wide_eval, jaxpr
        # A narrow eval pool's input passes the fusion fence on CPU (the only backend it was measured on).
        assert ("reduce_precision" in jaxpr) == (not train and not wide_eval), jaxpr
    weights = jnp.asarray(np.random.default_rng(1).standard_normal(reference(x).shape).astype(np.float32))
    g_new = jax.grad(lambda v: jnp.sum(layers.max_pool_2x2(jax.nn.relu(v)) * weights))(x)
    g_ref = jax.grad(lambda v: jnp.sum(reference(jax.nn.relu(v)) * weights))(x)
    np.testing.assert_array_equal(np.asarray(g_new), np.asarray(g_ref))
    monkeypatch.setattr(layers.jax, "default_backend", lambda: "gpu")
    assert "reduce_precision" not in str(jax.make_jaxpr(lambda v: layers.max_pool_2x2(v, train=False))(x))


@pytest.mark.parametrize(
    "c_in, c_out, kernel, use_bias, hw",
    [(1, 8, 3, False, (28, 28)), (3, 32, 3, True, (7, 9)), (2, 4, 5, False, (10, 5))],
)
def test_conv_pooled_four_phases_equal_the_unfused_stage(c_in, c_out, kernel, use_bias, hw):
    """In eval, conv_pooled computes a few-channel PatchConv + BatchNorm + ReLU + 2x2 pool as four
    phases with no reduction, and gives the unfused stage's values: odd sizes, a bias, and BatchNorm scales
    of both signs (applying the BatchNorm after the max instead of before would differ). Training, and a
    convolution that is not a few-channel PatchConv, take the unfused path."""
    from titans.models import layers

    rng = np.random.default_rng(0)
    conv = layers.conv(c_in, c_out, kernel, rngs=nnx.Rngs(0), dtype=jnp.float32, use_bias=use_bias, impl="patches")
    if use_bias:
        conv.bias[...] = jnp.asarray(rng.standard_normal(c_out).astype(np.float32))
    bn = layers.batch_norm(c_out, rngs=nnx.Rngs(1), dtype=jnp.float32)
    bn.mean.set_value(jnp.asarray(rng.standard_normal(c_out).astype(np.float32)))
    bn.var.set_value(jnp.asarray(rng.uniform(0.2, 2.0, c_out).astype(np.float32)))
    bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c_out) * rng.choice([-1, 1], c_out)).astype(jnp.float32)
    bn.bias[...] = jnp.asarray(rng.standard_normal(c_out).astype(np.float32))
    x = jnp.asarray(rng.standard_normal((3, *hw, c_in)).astype(np.float32))

    def post(y):
        return jax.nn.relu(bn(y, use_running_average=True))

    fused = jax.jit(lambda v: layers.conv_pooled(conv, v, post, train=False))
    unfused = jax.jit(lambda v: layers.max_pool_2x2(post(conv(v)), train=False))
    got, want = np.asarray(fused(x)), np.asarray(unfused(x))
    assert got.shape == (3, hw[0] // 2, hw[1] // 2, c_out)
    # The same operations per element; XLA contracts multiplies and adds into FMAs differently in the
    # two fusions, so rounding differs (4.8e-7 at most measured), not the function.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    jaxpr = str(jax.make_jaxpr(lambda v: layers.conv_pooled(conv, v, post, train=False))(x))
    assert "reduce_max" not in jaxpr and "reduce_window" not in jaxpr and "reduce_precision" in jaxpr

    # Training: the unfused stage (its BatchNorm needs batch statistics over every position).
    train_jaxpr = str(jax.make_jaxpr(lambda v: layers.conv_pooled(conv, v, jax.nn.relu, train=True))(x))
    assert "reduce_max" in train_jaxpr and "reduce_precision" not in train_jaxpr
    # A plain convolution, or more input channels than PATCHES_MAX_IN_CHANNELS, is not fused.
    for other, v in (
        (layers.conv(c_in, c_out, kernel, rngs=nnx.Rngs(0), dtype=jnp.float32, use_bias=use_bias), x),
        (
            layers.conv(5, c_out, kernel, rngs=nnx.Rngs(0), dtype=jnp.float32, use_bias=use_bias, impl="patches"),
            jnp.ones((3, *hw, 5)),
        ),
    ):
        jaxpr = str(jax.make_jaxpr(lambda u, other=other: layers.conv_pooled(other, u, post, train=False))(v))
        assert "reduce_max" in jaxpr or "reduce_window" in jaxpr  # the pool after the unfused stage


def test_fusion_fence_changes_no_bits():
    """fusion_fence is the identity, bit for bit, in float32, bfloat16 and float16, for normal, subnormal,
    infinite and NaN values."""
    from titans.models import layers

    rng = np.random.default_rng(0)
    values = rng.standard_normal(2000) * 10.0 ** rng.integers(-45, 38, 2000)
    values = np.concatenate([values, [np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45, 3e38, 6e-8, 1e-40]]).astype(np.float32)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        x = jnp.asarray(values).astype(dtype)
        y = jax.jit(layers.fusion_fence)(x)
        assert y.dtype == x.dtype
        np.testing.assert_array_equal(np.asarray(y).view(np.uint8), np.asarray(x).view(np.uint8))


@pytest.mark.parametrize(
    "c_in, c_out, kernel, use_bias", [(1, 8, 3, False), (8, 16, 3, True), (3, 4, 5, False), (1, 32, 3, True)]
)
def test_patch_conv_equals_nnx_conv(c_in, c_out, kernel, use_bias):
    """PatchConv (im2col + matmul) computes nnx.Conv's function with nnx.Conv's parameters: same outputs and
    the same gradients for the input and the kernel."""
    from titans.models import layers

    xla = layers.conv(c_in, c_out, kernel, rngs=nnx.Rngs(0), dtype=jnp.float32, use_bias=use_bias)
    patches = layers.conv(c_in, c_out, kernel, rngs=nnx.Rngs(0), dtype=jnp.float32, use_bias=use_bias, impl="patches")
    assert isinstance(patches, layers.PatchConv)
    if use_bias:
        for m in (xla, patches):
            m.bias[...] = jnp.arange(c_out, dtype=jnp.float32) / c_out
    np.testing.assert_array_equal(np.asarray(xla.kernel[...]), np.asarray(patches.kernel[...]))
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 11, 9, c_in)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(patches(x)), np.asarray(xla(x)), rtol=1e-5, atol=1e-5)

    def grads(m):
        g_m, g_x = nnx.grad(lambda mod, v: jnp.sum(jnp.sin(mod(v))), argnums=(0, 1))(m, x)
        return g_m["kernel"][...], g_x

    for got, want in zip(grads(patches), grads(xla)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    # Few input channels: the forward pass is shifted elementwise products (no matmul), its gradient
    # im2col's (a custom VJP); more channels: im2col's matmul both ways.
    forward = str(jax.make_jaxpr(lambda v: patches(v))(x))
    small = c_in <= layers.PATCHES_MAX_IN_CHANNELS
    assert ("dot_general" in forward) != small and ("custom_vjp" in forward) == small
    # ... and the kernel gradient of such a layer with few output channels is XLA's convolution gradient
    kernel_grad = str(jax.make_jaxpr(lambda m: nnx.grad(lambda mod: jnp.sum(jnp.sin(mod(x))))(m))(patches))
    conv_kernel_grad = small and c_out <= layers.SMALL_CIN_CONV_KERNEL_GRAD_MAX_OUT
    assert ("conv_general_dilated" in kernel_grad) == conv_kernel_grad
    with pytest.raises(ValueError, match="not one of"):
        layers.conv(1, 2, 3, rngs=nnx.Rngs(0), dtype=jnp.float32, impl="winograd")
    auto = [layers.conv(c, 8, 3, rngs=nnx.Rngs(0), dtype=jnp.float32, impl="auto") for c in (1, 4, 5, 32)]
    assert [isinstance(m, layers.PatchConv) for m in auto] == [True, True, False, False]


def test_auto_conv_is_the_cpu_form_only_on_cpu_and_the_cnn_default(monkeypatch):
    """conv_impl "auto" picks the few-channel CPU form only on the CPU backend (the forms were measured on
    XLA:CPU alone); it is the CNN's default, so the quickstart's CNNs get it without a config key."""
    from titans.models import layers

    build = lambda: [layers.conv(c, 8, 3, rngs=nnx.Rngs(0), dtype=jnp.float32, impl="auto") for c in (1, 32)]
    assert [type(m) for m in build()] == [layers.PatchConv, nnx.Conv]
    cnn = lambda: models.create_model("cnn", num_classes=10, input_shape=FMNIST, rngs=nnx.Rngs(0), **STUDENT)
    assert models.model_kwargs("cnn")["conv_impl"] == "auto"
    assert [type(c) for c in nnx.eval_shape(cnn).convs] == [layers.PatchConv, nnx.Conv]
    for backend in ("gpu", "tpu"):
        monkeypatch.setattr(layers.jax, "default_backend", lambda backend=backend: backend)
        assert [type(m) for m in build()] == [nnx.Conv, nnx.Conv]
        assert [type(c) for c in nnx.eval_shape(cnn).convs] == [nnx.Conv, nnx.Conv]


def test_cnn_with_patch_convs_equals_the_default_cnn():
    from titans import data

    info = data.dataset_info("fashion_mnist")
    cfg = lambda impl: ml_collections.ConfigDict(
        dict(name="cnn", kwargs=ml_collections.ConfigDict(dict(channels=(8, 16), dense=32, conv_impl=impl)))
    )
    a = models.build_model(cfg("xla"), info, seed=0, dtype=jnp.float32)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 255, (4, 28, 28, 1)).astype(np.float32) / 255)
    for impl in ("patches", "auto"):  # eval: the first stage as four phases
        b = models.build_model(cfg(impl), info, seed=0, dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(b(x)), np.asarray(a(x)), rtol=1e-4, atol=1e-4)


_COMPILES: list[str] = []
_COUNTING = [False]


def _count_backend_compiles(event, duration, **kwargs):
    if _COUNTING[0] and event == "/jax/core/compile/backend_compile_duration":
        _COMPILES.append(event)


jax.monitoring.register_event_duration_secs_listener(_count_backend_compiles)


def _compiles_during(fn):
    _COMPILES.clear()
    _COUNTING[0] = True
    try:
        out = fn()
    finally:
        _COUNTING[0] = False
    return out, len(_COMPILES)


def test_build_model_initialises_in_one_compiled_program(monkeypatch):
    """build_model runs every initialiser of a model as one jitted program (at LLVM level 0 on CPU), where the
    eager construction compiles one small program per initialiser and shape; the values are the eager ones to
    the last bit of the normal transform, and two builds are bit-identical. (Channel counts no other test
    uses, so no eager initialiser is already compiled.)"""
    from titans.models import registry

    cfg = ml_collections.ConfigDict({"name": "cnn", "kwargs": {"channels": [3, 5], "dense": 7}})
    info = type("Info", (), {"num_classes": 6, "image_shape": (12, 10, 2)})()
    options = []
    real_jit = jax.jit

    def spy_jit(fun, **kw):
        options.append(kw.get("compiler_options"))
        return real_jit(fun, **kw)

    monkeypatch.setattr(registry.jax, "jit", spy_jit)
    built, n_built = _compiles_during(lambda: models.build_model(cfg, info, seed=3))
    monkeypatch.undo()
    assert n_built == 1
    assert options == [registry.INIT_COMPILER_OPTIONS_CPU] == [{"xla_backend_optimization_level": 0}]

    def eager():
        m = models.create_model(
            "cnn", num_classes=6, input_shape=(12, 10, 2), rngs=nnx.Rngs(3), channels=[3, 5], dense=7
        )
        return jax.block_until_ready(m)

    reference, n_eager = _compiles_during(eager)
    assert n_eager > 3, n_eager  # what the one program replaces
    again = models.build_model(cfg, info, seed=3)
    got, want, twice = (jax.tree.leaves(nnx.state(m)) for m in (built, reference, again))
    assert jax.tree.structure(nnx.state(built)) == jax.tree.structure(nnx.state(reference))
    assert len(got) == len(want) > 0
    for a, b, c in zip(got, want, twice):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(c))
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    other = models.build_model(cfg, info, seed=4)
    assert not np.array_equal(np.asarray(nnx.state(other)["convs"][0]["kernel"][...]), np.asarray(got[0]))
    x = jnp.ones((2, 12, 10, 2))
    np.testing.assert_allclose(np.asarray(built(x)), np.asarray(reference(x)), rtol=1e-5, atol=1e-6)
    # Inside a trace the initialisers join the traced program (a nested jit may not carry compiler options).
    abstract, n_abstract = _compiles_during(lambda: nnx.eval_shape(lambda: models.build_model(cfg, info, seed=3)))
    assert n_abstract == 0 and jax.tree.structure(nnx.state(abstract)) == jax.tree.structure(nnx.state(built))
    logits = jax.jit(lambda v: models.build_model(cfg, info, seed=3)(v))(x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(built(x)), rtol=1e-5, atol=1e-6)
