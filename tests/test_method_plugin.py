"""The Method plug-in: the worked example in docs/architecture.md runs as written, and what a Method
supplies (its loss weights, its frozen arrays, its forward) really reaches the trained model."""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import REPO, digits_config

from titans import data, losses, models, runs, train


def _doc_example() -> dict:
    with open(os.path.join(REPO, "docs", "architecture.md")) as f:
        text = f.read()
    section = text[text.index("### Worked example") :]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "docs/architecture.md", "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("plugin") / "teacher")
    train.train_and_evaluate(digits_config(data_dir, total_steps=60), workdir)
    return workdir


def test_doc_example_weights_follow_the_teacher():
    method = _doc_example()["teacher_right_kd"](digits_config("unused"))
    logits = jnp.zeros((3, 10))
    teacher = jnp.eye(10)[jnp.array([2, 5, 7])] * 5.0  # predicts 2, 5, 7
    batch = {"label": jnp.array([2, 4, 7])}
    per_example, weights = method.loss(logits, None, teacher, batch, None, 0)
    np.testing.assert_array_equal(np.asarray(weights), [1.0, 0.0, 1.0])
    assert per_example.shape == (3,) and bool(jnp.all(per_example > 0))


def test_doc_example_trains_a_student(data_dir, teacher_dir, tmp_path):
    c = digits_config(data_dir, total_steps=30)
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_dir
    result = _doc_example()["train_and_evaluate"](c, str(tmp_path), method=_doc_example()["teacher_right_kd"](c))
    assert result["accuracy"] > 0.5 and runs.RunDir(str(tmp_path)).finished


def _trained_and_initial_params(data_dir, workdir, method):
    c = digits_config(data_dir, total_steps=10, **{"checkpoint.every_steps": 10, "optimizer.weight_decay": 0.0})
    train.train_and_evaluate(c, workdir, method=method)
    trained = runs.RunDir(workdir).load_model()
    init = models.build_model(c.model, data.dataset_info(c.dataset.name), seed=c.seed)
    _, init_params, _ = nnx.split(init, nnx.Param, ...)
    return jax.tree.leaves(jax.device_get(trained.params)), jax.tree.leaves(jax.device_get(init_params))


def test_method_loss_weights_reach_the_update(data_dir, tmp_path):
    """Zero weights on every row leave the parameters at their initial values (no weight decay);
    unit weights move them. A trainer that ignored a Method's weights would move both."""
    base = train.objective_loss(digits_config(data_dir))

    def zero_weight_loss(logits, aux, teacher_logits, batch, frozen, step):
        per, w = base(logits, aux, teacher_logits, batch, frozen, step)
        return per, 0.0 * w

    moved, init = _trained_and_initial_params(data_dir, str(tmp_path / "ones"), train.Method(loss=base))
    still, init2 = _trained_and_initial_params(data_dir, str(tmp_path / "zeros"), train.Method(loss=zero_weight_loss))
    assert any(not np.allclose(a, b) for a, b in zip(moved, init))
    for a, b in zip(still, init2):
        np.testing.assert_array_equal(a, b)


def test_method_frozen_and_forward_reach_the_step(data_dir, tmp_path):
    """A forward that adds a frozen constant to the logits changes the trained model's evaluation."""

    def forward(model, images, frozen, is_train):
        return model(images, train=is_train) + frozen["bias"], None

    bias = jnp.zeros(10).at[3].set(1e6)  # every prediction becomes class 3, whatever 10 steps learn
    c = digits_config(data_dir, total_steps=10)
    result = train.train_and_evaluate(c, str(tmp_path), method=train.Method(frozen={"bias": bias}, forward=forward))
    assert result["accuracy"] == pytest.approx(0.1, abs=0.03)  # digits test classes are balanced


@pytest.mark.parametrize("rule", ["confidence", "margin", "correctness", "agreement"])
def test_easy_weights_reach_the_objective(rule):
    """The easy-weighted objective hands the trainer the easy weights of losses.easy_weights (not
    ones): with the loss-weights test above, they reach the update. Replacing them by ones fails here."""
    c = digits_config("unused")
    c.distill.teacher_workdir = "t"
    c.distill.objective = "easy_weighted"
    c.distill.easy.rule = rule
    rng = np.random.default_rng(0)
    logits, teacher = (jnp.asarray(rng.normal(size=(32, 10)).astype(np.float32) * 3) for _ in range(2))
    labels = jnp.asarray(rng.integers(0, 10, 32))
    per, weights = train.objective_loss(c)(logits, None, teacher, {"label": labels}, None, 10)
    want = losses.easy_weights(
        teacher, labels, logits, rule=rule, sharpness=c.distill.easy.sharpness, floor=c.distill.easy.floor
    )
    np.testing.assert_allclose(np.asarray(weights), np.asarray(want), rtol=1e-6)
    assert float(jnp.std(weights)) > 0.01 and per.shape == (32,)


def test_defer_objective_takes_temperature_and_cost_from_the_config():
    c = digits_config("unused")
    c.distill.teacher_workdir = "t"
    c.distill.objective = "defer"
    c.distill.temperature, c.distill.defer_cost = 3.0, 0.05
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(16, 11)).astype(np.float32))
    teacher = jnp.asarray(rng.normal(size=(16, 10)).astype(np.float32) * 3)
    labels = jnp.asarray(rng.integers(0, 10, 16))
    per, _ = train.objective_loss(c)(logits, None, teacher, {"label": labels}, None, 0)
    want = losses.defer_surrogate(
        logits,
        teacher,
        labels,
        alpha=c.distill.alpha,
        defer_weight=c.distill.defer_weight,
        temperature=3.0,
        defer_cost=0.05,
    )
    np.testing.assert_allclose(np.asarray(per), np.asarray(want), rtol=1e-6)


def test_flatten_objective_flattens_where_the_teacher_is_wrong():
    """The flatten objective's hardness is 1 - p_teacher(label) from the config's easiness rule: on rows
    where the teacher puts no mass on the label the target is uniform (zero gradient at a uniform
    student), on rows where it is sure of the label it is standard KD. Dropping the hardness fails here."""
    c = digits_config("unused")
    c.distill.teacher_workdir = "t"
    c.distill.objective = "flatten"
    c.distill.easy.update(rule="correctness", sharpness=1.0)
    labels = jnp.arange(8) % 10
    teacher = 40.0 * jax.nn.one_hot((labels + jnp.array([0, 0, 0, 0, 1, 1, 1, 1])) % 10, 10)  # rows 4-7 wrong
    loss = train.objective_loss(c)
    grad = jax.grad(lambda z: loss(z, None, teacher, {"label": labels}, None, 0)[0].sum())(jnp.zeros((8, 10)))
    assert float(jnp.abs(grad[4:]).max()) < 1e-5  # teacher wrong and sure: uniform target
    assert float(jnp.abs(grad[:4]).max()) > 0.1  # teacher right: pulled towards the label
    want = losses.flattened_distillation(
        jnp.zeros((8, 10)),
        teacher,
        labels,
        jnp.array([0.0] * 4 + [1.0] * 4),
        alpha=c.distill.alpha,
        temperature=c.distill.temperature,
    )
    np.testing.assert_allclose(loss(jnp.zeros((8, 10)), None, teacher, {"label": labels}, None, 0)[0], want, atol=1e-5)


def test_standard_objective_takes_the_kd_temperature_from_the_config():
    """The standard student's loss is Hinton KD at distill.temperature (with T^2): it equals the loss at that
    temperature and differs from the loss at another one."""
    c = digits_config("unused")
    c.distill.teacher_workdir = "t"
    c.distill.temperature = 3.0
    rng = np.random.default_rng(0)
    logits, teacher = (jnp.asarray(rng.normal(size=(16, 10)).astype(np.float32) * 3) for _ in range(2))
    labels = jnp.asarray(rng.integers(0, 10, 16))
    per, weights = train.objective_loss(c)(logits, None, teacher, {"label": labels}, None, 0)
    at = lambda t: losses.distillation_loss(logits, teacher, labels, alpha=c.distill.alpha, temperature=t)
    np.testing.assert_allclose(np.asarray(per), np.asarray(at(3.0)), rtol=1e-6)
    assert not np.allclose(np.asarray(per), np.asarray(at(4.0)), rtol=1e-3)
    np.testing.assert_array_equal(np.asarray(weights), np.ones(16))
