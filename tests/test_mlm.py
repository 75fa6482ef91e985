"""Masked-LM pre-training (titans/models/mlm.py, titans/train/pretrain.py) and `init_from`: which tokens are
chosen and how they are corrupted, that the loss reads only them, that a pipeline's fine-tuning stage starts
from the pre-trained encoder, and the runs `init_from` refuses."""

import json
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from titans import experiment, models, runs
from titans.config import ConfigError, base_config, validate
from titans.data import text
from titans.models import mlm
from titans.train import pretrain


def _tokens(lengths, width, vocab=50, seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        out[i, :n] = rng.integers(1, vocab, n)
    return jnp.asarray(out)


def test_choose_takes_rate_of_each_rows_real_tokens_uniformly_and_never_padding():
    """Each row gets ceil(rate * length) distinct real positions (at least one); over many keys every real
    position is chosen about `rate` of the time and padding never; the actions are 80/10/10."""
    tokens = _tokens([20, 7, 1, 0, 3], 24)
    rate, keys = 0.15, 600
    counts = np.zeros(tokens.shape)
    actions = []
    for i in range(keys):
        positions, chosen, action = mlm.choose(tokens, rate, jax.random.key(i))
        positions, chosen, action = map(np.asarray, (positions, chosen, action))
        assert positions.shape[1] == math.ceil(rate * 24)
        for r, n in enumerate([20, 7, 1, 0, 3]):
            picked = positions[r][chosen[r]]
            assert len(picked) == (0 if n == 0 else max(1, math.ceil(rate * n)))
            assert len(set(picked)) == len(picked) and all(p < n for p in picked)
            counts[r, picked] += 1
        actions.append(action[chosen])
        assert (action[~chosen] == mlm.KEEP).all()
    freq = counts / keys
    np.testing.assert_allclose(freq[0, :20], 3 / 20, atol=0.06)  # ceil(0.15 * 20) = 3 of 20
    np.testing.assert_allclose(freq[1, :7], 2 / 7, atol=0.08)
    assert (freq[0, 20:] == 0).all() and (freq[1, 7:] == 0).all() and (freq[3] == 0).all()
    share = np.bincount(np.concatenate(actions), minlength=3) / len(np.concatenate(actions))
    np.testing.assert_allclose(share[[mlm.MASK, mlm.RANDOM, mlm.KEEP]], [0.8, 0.1, 0.1], atol=0.03)


def _masked_lm(seed=0, rate=0.3):
    backbone = models.create_model(
        "transformer", num_classes=5, input_shape=(16,), rngs=nnx.Rngs(seed), vocab_size=50, depth=1, width=16, heads=2
    )
    return mlm.MaskedLM(backbone, rate=rate, rngs=nnx.Rngs(seed + 1))


def test_masked_lm_predicts_the_original_ids_from_corrupted_inputs():
    """Targets are the tokens at the chosen positions; the mask vector reaches the encoder (changing it changes
    the predictions); training calls draw new corruptions, evaluation always the same one."""
    model = _masked_lm()
    tokens = _tokens([16, 9, 4], 16)
    logits, targets, chosen = model(tokens, train=False)
    assert logits.shape == (3, math.ceil(0.3 * 16), 50)
    positions, _, _ = mlm.choose(tokens, 0.3, jax.random.split(jax.random.key(mlm.EVAL_KEY))[0])
    np.testing.assert_array_equal(targets, np.take_along_axis(np.asarray(tokens), np.asarray(positions), 1))
    again = model(tokens, train=False)[0]
    np.testing.assert_array_equal(logits, again)
    model.head.mask.set_value(jnp.full_like(model.head.mask[...], 3.0))
    assert not np.allclose(model(tokens, train=False)[0], logits, atol=1e-4)
    first, second = model(tokens, train=True)[1], model(tokens, train=True)[1]
    assert not np.array_equal(first, second)


def test_mlm_loss_reads_only_the_chosen_tokens():
    """A row's loss is the mean cross-entropy of its chosen tokens; unchosen slots and empty rows weigh 0."""
    logits = jax.random.normal(jax.random.key(0), (2, 3, 10))
    targets = jnp.asarray([[1, 2, 3], [4, 5, 6]])
    chosen = jnp.asarray([[True, True, False], [False, False, False]])
    loss, weight = pretrain._loss(logits, {"targets": targets, "chosen": chosen}, None, None, None, 0)
    ce = -jax.nn.log_softmax(logits)[0, jnp.arange(2), targets[0, :2]]
    np.testing.assert_allclose(loss[0], ce.mean(), rtol=1e-5)
    np.testing.assert_array_equal(weight, [1.0, 0.0])
    flipped = logits.at[0, 2].set(100.0)  # an unchosen slot's logits change nothing
    np.testing.assert_allclose(
        pretrain._loss(flipped, {"targets": targets, "chosen": chosen}, None, None, None, 0)[0], loss
    )


def test_mlm_config_refuses_a_teacher_and_bad_rates():
    c = base_config()
    c.total_steps = 1
    c.mlm.enabled = True
    c.mlm.mask_rate = 1.0
    with pytest.raises(ConfigError, match="mask_rate"):
        validate(c)
    c.mlm.mask_rate = 0.15
    c.distill.teacher_workdir = "/somewhere"
    with pytest.raises(ConfigError, match="teacher"):
        validate(c)


def _stage(data_dir, *, enabled: bool, steps: int = 20, **kwargs):
    c = base_config()
    c.name = "mlm" if enabled else "fine"
    c.dataset.name = "wordnet"
    c.dataset.data_dir = data_dir
    c.dataset.train_split = "train[:1000]"
    c.dataset.eval_split = "validation[:300]"
    c.model.name = "transformer_small"
    c.model.kwargs = ml_collections.ConfigDict(kwargs)
    c.batch_size = 64
    c.eval_batch_size = 256
    c.total_steps = steps
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 3e-3
    c.log_every_steps = 10
    c.checkpoint.every_steps = 10
    c.mlm.enabled = enabled
    return c


def _flat_params(module):
    return pretrain._flat(jax.device_get(nnx.to_pure_dict(nnx.state(module, nnx.Param))))


@pytest.mark.slow
def test_pipeline_pretrains_then_fine_tunes_from_the_pretrained_encoder(data_dir, tmp_path):
    """A masked-LM stage learns (its masked-token accuracy beats chance by far); the fine-tuning stage built
    with the same seed starts from the pre-trained encoder, not from its own initialisation (its step-0
    parameters equal the pre-trained backbone's, the classifier excepted), and its results name the source."""
    if not text.wordnet_available():
        pytest.skip("needs `apt-get install wordnet-base`")
    fine = _stage(data_dir, enabled=False, steps=1)
    fine.init_from = "@pretrain"
    fine.optimizer.learning_rate = 1e-12  # one step that moves nothing: the parameters are the start's
    fine.optimizer.weight_decay = 0.0
    config = ml_collections.ConfigDict(
        {"stages": {"pretrain": _stage(data_dir, enabled=True, steps=40), "teacher": fine}}
    )
    config.stage_order = ("pretrain", "teacher")
    out = experiment.run_experiment(config, str(tmp_path))
    pre = out["stages"]["pretrain"]
    assert pre["mlm_accuracy"] > 20 / 8192 and pre["masked_tokens"] > 300
    assert out["stages"]["teacher"]["init_from"]["workdir"] == str(tmp_path / "pretrain")
    source = pretrain._flat(nnx.to_pure_dict(runs.RunDir(tmp_path / "pretrain").load_model().params))
    tuned = pretrain._flat(nnx.to_pure_dict(runs.RunDir(tmp_path / "teacher").load_model().params))
    fresh = _flat_params(
        runs.build_run_model(
            runs.RunDir(tmp_path / "teacher").config, runs.RunDir(tmp_path / "teacher").info, seed=0, dtype=jnp.float32
        )
    )
    for path, value in tuned.items():
        if path[0] == "classifier":
            continue
        np.testing.assert_allclose(value, source[("backbone", *path)], atol=1e-6, err_msg=str(path))
        assert not np.allclose(value, fresh[path]) or np.all(value == 0) or np.all(value == 1), path
    json.dumps(out["stages"]["teacher"]["init_from"])

    # init_from refuses another model, an unfinished run and another dataset.
    other = _stage(data_dir, enabled=False, steps=1, mlp_ratio=2.0)
    other.init_from = str(tmp_path / "pretrain")
    with pytest.raises(pretrain.InitFromError, match="does not hold this model's parameters"):
        experiment.run_experiment(other, str(tmp_path / "other"))
    (tmp_path / "pretrain" / "results.json").rename(tmp_path / "pretrain" / "results.kept")
    again = _stage(data_dir, enabled=False, steps=1)
    again.init_from = str(tmp_path / "pretrain")
    with pytest.raises(pretrain.InitFromError, match="has not finished"):
        experiment.run_experiment(again, str(tmp_path / "again"))
    (tmp_path / "pretrain" / "results.kept").rename(tmp_path / "pretrain" / "results.json")
    images = base_config()
    images.total_steps = 1
    images.init_from = str(tmp_path / "pretrain")
    images.model.name = "mlp"
    images.dataset.name = "digits"
    with pytest.raises(pretrain.InitFromError, match="was trained on 'wordnet'"):
        experiment.run_experiment(images, str(tmp_path / "images"))
