"""Config schema: unknown fields named with close matches, bad values refused, durations resolved."""

import os
import subprocess
import sys

import pytest
from helpers import REPO

from titans import config as config_lib


def _cfg(**kw):
    c = config_lib.base_config()
    c.total_steps = 10
    for k, v in kw.items():
        c[k] = v
    return c


def test_base_config_needs_a_duration():
    with pytest.raises(config_lib.ConfigError, match="exactly one of total_steps and total_epochs"):
        config_lib.validate(config_lib.base_config())


def test_unknown_field_names_close_matches():
    c = _cfg()
    c.optimizer.learnin_rate = 0.1
    with pytest.raises(config_lib.ConfigError, match=r"'optimizer.learnin_rate'.*optimizer.learning_rate"):
        config_lib.validate(c)


def test_unknown_override_suggests_by_leaf_name():
    with pytest.raises(config_lib.ConfigError, match=r"optimizer.lr.*optimizer.learning_rate"):
        config_lib.check_override(_cfg(), "optimizer.lr")
    config_lib.check_override(_cfg(), "optimizer.learning_rate")
    with pytest.raises(config_lib.ConfigError, match="model.kwargs.anything is not an argument of model"):
        config_lib.check_override(_cfg(), "model.kwargs.anything")  # named with the model's arguments


def test_bad_choice_is_refused():
    with pytest.raises(config_lib.ConfigError, match="optimizer.name='sgdd'"):
        config_lib.validate(_cfg(optimizer=dict(config_lib.base_config().optimizer.to_dict(), name="sgdd")))


def test_steps_from_epochs():
    c = _cfg(total_steps=0, total_epochs=2.0, batch_size=100)
    assert config_lib.steps(c, 1000) == 20
    assert config_lib.steps(_cfg(total_steps=7), 1000) == 7


@pytest.mark.slow
def test_cli_unknown_override_is_a_clear_error(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "titans.main",
            "--config=configs/digits.py",
            f"--workdir={tmp_path}",
            "--config.optimizer.lr=0.1",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0
    assert "Unknown config field 'optimizer.lr'" in proc.stderr
    assert "optimizer.learning_rate" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "spec",
    [
        "titans_fmnist.py",
        "titans_fmnist.py:objectives=easy_agree+easy_correct",
        "titans_cifar100.py",
        "titans_cifar100.py:teacher=wrn_40_2",
        "titans_imagenet.py",
    ],
)
def test_cascade_configs_validate_and_name_real_models(spec):
    """Every stage of the cascade configs passes validation and builds (abstractly) on its dataset."""
    import jax.numpy as jnp
    from flax import nnx

    from titans import data, models, runs

    c = config_lib.validate(config_lib.load_config_file(os.path.join(REPO, "configs", spec)))
    assert c.stage_order[0] == "teacher" and set(c.cascade.students) == set(c.stage_order[1:])
    for name in c.stage_order:
        stage = config_lib.validate(c.stages[name])
        info = data.dataset_info(stage.dataset.name)
        outputs = runs.num_outputs(stage, info)
        model = nnx.eval_shape(
            lambda: models.build_model(stage.model, info, seed=0, dtype=jnp.float32, outputs=outputs)
        )
        assert model.num_classes == info.num_classes + (stage.distill.objective == "defer")
    with pytest.raises(ValueError, match="Unknown argument 'seeds'"):
        config_lib.load_config_file(os.path.join(REPO, "configs", spec.split(":")[0]) + ":seeds=1")


def test_strong_regime_cascade_config_builds_valid_stages():
    """configs/titans_fmnist_strong.py: every stage is a valid cached-KD student of the shared teacher run
    (absolute path, no teacher stage), the baselines train with standard KD only, and the students span
    the linear model to the ResNet-8."""
    from titans.config import load_config_file, validate

    c = load_config_file(os.path.join(REPO, "configs", "titans_fmnist_strong.py") + ":teacher_dir=t,cache_dir=c")
    assert "teacher" not in c.stage_order and os.path.isabs(c.cascade.teacher)
    assert c.cascade.baselines == ("large_standard", "resnet8_standard")
    assert {n.split("_")[0] for n in c.stage_order} == {
        "linear",
        "mlp64",
        "tiny",
        "small",
        "medium",
        "large",
        "resnet8",
    }
    for name in c.stage_order:
        s = validate(c.stages[name])
        assert s.distill.teacher_mode == "cache" and s.distill.teacher_workdir == c.cascade.teacher
        assert os.path.isabs(s.distill.cache.dir) and not s.dataset.augmentation
    assert (
        c.stages.linear_flatten.distill.objective == "flatten" and c.stages.linear_defer_cost.distill.defer_cost == 0.1
    )


def test_cascade_pipeline_trains_baselines_with_standard_kd_only():
    """A baseline size gets one stage, standard KD, whatever the objectives; other sizes get every objective."""
    import ml_collections

    from titans.config_builders import cascade_pipeline

    def student():
        return ml_collections.ConfigDict(
            dict(distill=ml_collections.ConfigDict(dict(easy=ml_collections.ConfigDict())))
        )

    c = cascade_pipeline(
        ml_collections.ConfigDict(),
        {"tiny": student, "big": student},
        ["standard", "easy", "defer"],
        temperature=4.0,
        alpha=0.9,
        cascade={},
        baselines=("big",),
    )
    assert c.stage_order == ("teacher", "tiny_standard", "tiny_easy", "tiny_defer", "big_standard")
    assert c.cascade.baselines == ("big_standard",)
    with pytest.raises(ValueError, match="not student sizes"):
        cascade_pipeline(ml_collections.ConfigDict(), {}, [], temperature=4.0, alpha=0.9, cascade={}, baselines=("x",))


def test_cli_summary_of_a_pipeline_without_stages_is_empty():
    """A B-DISTIL or cascade config that reuses existing runs trains no stage: nothing to tabulate (it used
    to crash after its results were written, with exit code 1)."""
    from titans.experiment import final_summary

    assert final_summary({"preempted": False, "stages": {}, "ensemble": {"variants": {}}}, "bdistil") == ""
    run = {"model": "mlp", "accuracy": 0.9, "ece": 0.01, "flops_per_example": 2e6, "param_count": 10, "train_time_s": 3}
    assert "| solo | mlp | 0.9000 |" in final_summary(run, "solo")
    assert "| t | mlp |" in final_summary({"preempted": False, "stages": {"t": run}}, "pipe")
