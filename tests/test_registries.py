"""Objectives and gates are registered in one place and selected by name from a config: a new objective
defined here trains a student through the real trainer, the model's width and the config checks read the
same registry, a name is registered once, and unknown names (or a misspelt `cascade` field) are refused
with their close matches."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import digits_config

from titans import config as config_lib
from titans import data, losses, models, runs, train
from titans.cascade import config as cascade_config
from titans.cascade import gates

TRACED: list[str] = []  # the objectives whose loss the trainer traced, in order


class ConfidenceSquared(losses.Objective):
    """Standard distillation weighted by the teacher's max probability squared."""

    def loss(self, logits, teacher_logits, labels, step):
        TRACED.append("confidence_squared")
        confidence = jnp.max(jax.nn.softmax(teacher_logits.astype(jnp.float32)), -1)
        return self.distillation(logits, teacher_logits, labels), confidence**2


class IgnoreAll(losses.Objective):
    """Every example weighted 0: a step that follows this objective changes no parameter."""

    def loss(self, logits, teacher_logits, labels, step):
        TRACED.append("ignore_all")
        return self.distillation(logits, teacher_logits, labels), jnp.zeros(labels.shape, jnp.float32)


class WithAbstain(losses.Objective):
    """An objective whose student has one extra output (like learning to defer)."""

    extra_outputs = 1

    def validate(self, where):
        super().validate(where)
        if self.distill.alpha == 0.0:
            raise config_lib.ConfigError(f"{where}: with_abstain needs distill.alpha > 0.")

    def loss(self, logits, teacher_logits, labels, step):
        return losses.cross_entropy(logits[:, :-1], labels), jnp.ones(labels.shape, jnp.float32)


@pytest.fixture(scope="module", autouse=True)
def plugins():
    """The test's objectives and gate, registered for this module only (each one decorator call)."""
    for name, cls in (
        ("confidence_squared", ConfidenceSquared),
        ("ignore_all", IgnoreAll),
        ("with_abstain", WithAbstain),
    ):
        losses.OBJECTIVES.register(name)(cls)
    gates.GATES.register("max_logit")(lambda logits, num_classes=None: -jnp.max(logits[:num_classes]))
    yield
    for name in ("confidence_squared", "ignore_all", "with_abstain"):
        losses.OBJECTIVES.unregister(name)
    gates.GATES.unregister("max_logit")


@pytest.fixture(scope="module")
def teacher_dir(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("registries") / "teacher")
    train.train_and_evaluate(digits_config(data_dir, total_steps=60), workdir)
    return workdir


def _student(data_dir, teacher_dir, objective, **overrides):
    c = digits_config(data_dir, **overrides)
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_dir
    c.distill.objective = objective
    return c


def test_the_config_selects_the_registered_objectives_loss():
    """objective_loss looks the config's name up: the weights are ConfidenceSquared's (numpy reference)."""
    c = _student("unused", "teacher", "confidence_squared")
    teacher = jax.random.normal(jax.random.key(0), (6, 10)) * 3
    logits, labels = jnp.zeros((6, 10)), jnp.arange(6)
    per_example, weights = train.objective_loss(c)(logits, None, teacher, {"label": labels}, None, 0)
    t = np.exp(np.asarray(teacher, np.float64))
    np.testing.assert_allclose(np.asarray(weights), (t / t.sum(-1, keepdims=True)).max(-1) ** 2, rtol=1e-5)
    want = losses.distillation_loss(logits, teacher, labels, kind="kd", alpha=c.distill.alpha, temperature=4.0)
    np.testing.assert_allclose(np.asarray(per_example), np.asarray(want), rtol=1e-6)


def test_a_new_objective_trains_a_student_by_name(data_dir, teacher_dir, tmp_path):
    """distill.objective="confidence_squared" (registered above, nowhere else) trains through
    train_and_evaluate: the trainer traced that objective's loss, and the run records its name."""
    TRACED.clear()
    result = train.train_and_evaluate(
        _student(data_dir, teacher_dir, "confidence_squared", total_steps=30), str(tmp_path)
    )
    assert "confidence_squared" in TRACED
    assert result["objective"] == "confidence_squared" and result["accuracy"] > 0.5


def _params(workdir):
    return jax.tree.leaves(jax.device_get(runs.RunDir(workdir).load_model().params))


@pytest.mark.parametrize("objective, moves", [("ignore_all", False), ("standard", True)])
def test_the_step_optimises_the_registered_objectives_weights(data_dir, teacher_dir, tmp_path, objective, moves):
    """With IgnoreAll's zero weights the parameters stay at their initial values (so the step used the
    registered loss, not a default one); the standard objective moves them (the check can fail)."""
    c = _student(data_dir, teacher_dir, objective, total_steps=10, **{"optimizer.weight_decay": 0.0})
    c.checkpoint.every_steps = 10
    train.train_and_evaluate(c, str(tmp_path))
    init = models.build_model(c.model, data.dataset_info(c.dataset.name), seed=c.seed)
    init_params = jax.tree.leaves(jax.device_get(nnx.split(init, nnx.Param, ...)[1]))
    same = all(np.array_equal(a, b) for a, b in zip(_params(str(tmp_path)), init_params))
    assert same is not moves


def test_the_models_width_and_the_checks_come_from_the_registry():
    """runs.num_outputs adds the objective's extra outputs; config.validate runs its own validate."""
    info = data.dataset_info("digits")
    c = _student("unused", "teacher", "with_abstain")
    assert runs.num_outputs(c, info) == info.num_classes + 1
    assert runs.num_outputs(_student("unused", "teacher", "defer"), info) == info.num_classes + 1
    assert runs.num_outputs(_student("unused", "teacher", "easy_weighted"), info) == info.num_classes
    config_lib.validate(c)
    c.distill.alpha = 0.0
    with pytest.raises(config_lib.ConfigError, match="with_abstain needs distill.alpha > 0"):
        config_lib.validate(c, where="stage 'x'")
    c.distill.teacher_workdir = ""
    with pytest.raises(config_lib.ConfigError, match="'with_abstain' needs a teacher"):
        config_lib.validate(c)


def test_a_name_is_registered_once():
    with pytest.raises(ValueError, match="objective 'defer' is already registered"):
        losses.OBJECTIVES.register("defer")(WithAbstain)
    with pytest.raises(ValueError, match="gate 'msp' is already registered"):
        gates.GATES.register("msp")(gates.margin)
    assert losses.OBJECTIVES["defer"] is losses.Defer and gates.GATES["msp"] is gates.msp


def test_an_unknown_objective_is_refused_with_close_matches():
    c = _student("unused", "teacher", "easy_weigted")
    with pytest.raises(config_lib.ConfigError, match=r"distill.objective='easy_weigted'.*Did you mean: easy_weighted"):
        config_lib.validate(c)
    with pytest.raises(config_lib.ConfigError, match="Did you mean: easy_weighted"):
        train.objective_loss(c)
    with pytest.raises(config_lib.ConfigError, match="Did you mean: easy_weighted"):
        runs.num_outputs(c, data.dataset_info("digits"))


def _cascade(**fields):
    c = ml_collections.ConfigDict()
    c.stage_order = ("teacher", "tiny")
    c.stages = ml_collections.ConfigDict(dict(teacher=config_lib.base_config(), tiny=config_lib.base_config()))
    c.cascade = ml_collections.ConfigDict({"students": ("tiny",), **fields})
    return c


def test_cascade_section_refuses_a_misspelt_field_with_its_close_match():
    with pytest.raises(config_lib.ConfigError, match=r"'cascade.runner_gate'.*Did you mean: cascade.runner_gates\?"):
        cascade_config.validate(_cascade(runner_gate=("msp",)))


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(gates=("msp", "entropie")), r"cascade.gates='entropie' is not a registered gate. Did you mean: entropy"),
        (dict(gates=("msp",), runner_gates=("lerned",)), r"cascade.gates='lerned'.*Did you mean: learned"),
        (dict(gates=("msp",), runner_gates=("margin",)), r"runner_gates names 'margin', which is not in \['msp'\]"),
        (dict(students=("tiyn",)), r"cascade.students names 'tiyn', which is neither a stage"),
        (dict(baselines=("small",)), r"cascade.baselines names 'small'"),
        (dict(num_thresholds=1), r"cascade.num_thresholds=1 must be an integer >= 2"),
        (dict(target_deferral_rates=(0.2, 1.5)), r"target_deferral_rates.* rates in \[0, 1\]"),
        (dict(gates="msp"), r"cascade.gates='msp' must be a tuple of names"),
    ],
)
def test_cascade_section_checks_its_values(fields, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        cascade_config.validate(_cascade(**fields))


def test_cascade_section_defaults_and_a_registered_gate():
    """Absent fields take their defaults (runner_gates: the config's gates); a gate registered with one
    decorator is a valid `cascade.gates` name and is what get_gate returns."""
    c = _cascade(gates=("msp", "max_logit", "learned"), teacher="/runs/teacher")
    full = cascade_config.section(c)
    assert full.runner_gates == ("msp", "max_logit", "learned") and full.num_thresholds == 201
    assert full.teacher == "/runs/teacher"  # a run directory, not a stage
    row = jnp.array([0.0, 3.0, 1.0])
    assert float(gates.get_gate("max_logit", num_classes=3)(row)) == -3.0
    assert gates.supports("defer_output", 1) and not gates.supports("defer_output", 0) and gates.supports("learned", 0)
