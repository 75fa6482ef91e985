"""The trainer: data-parallel equivalence, distillation, resume, SIGTERM, NaN, and refused inputs."""

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import REPO, digits_config

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import data, models, parallel, runs, train


def _step_on(devices, config, info, batch):
    """One train step of a BatchNorm CNN on a mesh over `devices`; returns the new params and statistics."""
    mesh = parallel.make_mesh(devices)
    model = models.build_model(config.model, info, seed=0, dtype=jnp.float32)
    tx, schedule = train.make_optimizer(config, 10, 1000)
    graphdef, state = train.TrainState.create(model, tx)
    state = parallel.replicate(state, mesh)
    step = jax.jit(train.make_train_step(graphdef, tx, train.resolve(None, config), info, jnp.float32, schedule))
    new_state, metrics = step(state, parallel.to_global(batch, mesh), None)
    assert all(x.sharding.is_fully_replicated for x in jax.tree.leaves(new_state.params))
    return jax.device_get(nnx.to_pure_dict(new_state.params)), jax.device_get(nnx.to_pure_dict(new_state.model_state))


def _kink_margin(model, images) -> float:
    """How close the CNN's forward on `images` (training mode, one device) comes to a point where its gradient
    jumps: the smallest |ReLU input| (after each BatchNorm, and the dense layer's) and the smallest gap between
    a pool window's maximum and a smaller value of the same window (exact ties are kept by both programs)."""
    x, gaps = images, []
    for conv, norm in zip(model.convs, model.norms):
        y = np.asarray(norm(conv(x), use_running_average=False))
        gaps.append(np.abs(y).min())
        r = np.maximum(y, 0.0)
        n, h, w, c = r.shape
        win = r[:, : h // 2 * 2, : w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
        below = win.max(axis=(2, 4), keepdims=True) - win
        gaps.append(below[below > 0].min(initial=np.inf))
        x = jnp.asarray(win.max(axis=(2, 4)))
    gaps.append(np.abs(np.asarray(model.dense(x.reshape(x.shape[0], -1)))).min())
    return float(min(gaps))


def test_eight_devices_equal_one_device(data_dir):
    """The data-parallel step over 8 devices is the single-device step on the global batch (BatchNorm's batch
    statistics and the gradient over all 64 rows).

    The two programs sum the BatchNorm statistics in different orders, so their activations differ by up to
    about 2e-6. A ReLU input (or a pool window's runner-up) that close to its kink can fall on the other side in
    one program, and the whole gradient then jumps by about 1%. With the first batch, one of the 2,048 dense
    pre-activations was 2.4e-7 on one device and -4.8e-8 on two (2026-12-04, an Intel Xeon machine;
    docs/reliability.md). So the test steps on the first loader batch whose kinks are all at least 1e-5
    away, a margin no rounding difference between the programs crosses."""
    assert jax.device_count() == 8
    config = digits_config(data_dir)
    config.model.name = "cnn"
    config.model.kwargs = ml_collections.ConfigDict(dict(channels=(8, 16), dense=32))  # has BatchNorm
    info = data.dataset_info("digits")
    src = data.get_source("digits", "train", data_dir=data_dir)
    loader = data.TrainLoader(src, info, global_batch_size=64, seed=0, process_index=0, process_count=1)
    model = models.build_model(config.model, info, seed=0, dtype=jnp.float32)
    margins = []
    for _ in range(20):
        batch = next(loader)
        margins.append(_kink_margin(model, data.normalize(jnp.asarray(batch["image"]), info, jnp.float32)))
        if margins[-1] >= 1e-5:
            break
    assert margins[-1] >= 1e-5, f"no batch of the first 20 keeps its kinks 1e-5 away: {margins}"
    p8, s8 = _step_on(jax.devices(), config, info, batch)
    p1, s1 = _step_on(jax.devices()[:1], config, info, batch)
    for a, b in zip(jax.tree.leaves(p8) + jax.tree.leaves(s8), jax.tree.leaves(p1) + jax.tree.leaves(s1)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    # The step really moved the parameters (otherwise equality would prove nothing).
    p0 = nnx.to_pure_dict(nnx.split(model, nnx.Param, ...)[1])
    assert max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p0))) > 1e-3


@pytest.fixture(scope="module")
def teacher_run(data_dir, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("teacher"))
    c = digits_config(data_dir, total_steps=150)
    result = train.train_and_evaluate(c, workdir)
    return workdir, result


def test_teacher_run_outputs(teacher_run):
    workdir, result = teacher_run
    assert result["accuracy"] > 0.85, result
    for name in ("config.json", "results.json", "metrics.jsonl"):
        assert os.path.getsize(os.path.join(workdir, name)) > 0
    assert any(f.startswith("events") for f in os.listdir(os.path.join(workdir, "tensorboard")))
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [10 * i for i in range(1, 16)]
    assert train_rows[-1]["train/loss"] < train_rows[0]["train/loss"]
    assert 0.0 <= result["ece"] <= 1.0 and result["flops_per_example"] > 0
    assert ckpt_lib.Checkpointer(workdir, read_only=True).all_steps()[-1] == 150


def test_distillation_freezes_and_does_not_save_teacher(teacher_run, data_dir, tmp_path):
    teacher_dir, teacher_result = teacher_run
    before = _tree_digest(os.path.join(teacher_dir, "checkpoints"))
    c = digits_config(data_dir, total_steps=60)
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_dir
    result = train.train_and_evaluate(c, str(tmp_path))
    assert result["teacher_accuracy"] == pytest.approx(teacher_result["accuracy"], abs=1e-6)
    assert result["teacher_agreement"] > 0.7
    assert _tree_digest(os.path.join(teacher_dir, "checkpoints")) == before
    # The student's checkpoint holds the student's variables only.
    info = data.dataset_info("digits")
    student = models.build_model(c.model, info, seed=0, dtype=jnp.float32)
    _, params, rest = nnx.split(student, nnx.Param, ...)
    like = {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}
    saved = ckpt_lib.Checkpointer(str(tmp_path), read_only=True)
    restored = saved.restore_model(saved.latest_step(), like)
    assert sum(x.size for x in jax.tree.leaves(restored)) == sum(x.size for x in jax.tree.leaves(like))
    item_dir = os.path.join(str(tmp_path), "checkpoints", str(saved.latest_step()))
    assert {d for d in os.listdir(item_dir) if os.path.isdir(os.path.join(item_dir, d))} == set(ckpt_lib.ITEMS)


def test_hard_label_distillation_runs(teacher_run, data_dir, tmp_path):
    c = digits_config(data_dir, total_steps=30)
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_run[0]
    c.distill.loss = "hard"
    assert train.train_and_evaluate(c, str(tmp_path))["accuracy"] > 0.3


def _final_params(workdir):
    ck = ckpt_lib.Checkpointer(workdir, read_only=True)
    cfg = ml_collections.ConfigDict(json.load(open(os.path.join(workdir, "config.json"))))
    info = data.dataset_info(cfg.dataset.name)
    _, params, rest = nnx.split(models.build_model(cfg.model, info, seed=0, dtype=jnp.float32), nnx.Param, ...)
    return ck.latest_step(), ck.restore_model(
        ck.latest_step(), {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)}
    )


@pytest.mark.slow
def test_sigterm_saves_and_resume_equals_uninterrupted(data_dir, tmp_path):
    """A real SIGTERM mid-run, a resume, and the same parameters as a run never interrupted."""
    interrupted, straight = str(tmp_path / "interrupted"), str(tmp_path / "straight")
    common = [
        "--config=configs/digits.py",
        f"--config.dataset.data_dir={data_dir}",
        "--config.schedule.name=constant",
        "--config.log_every_steps=20",
        "--config.checkpoint.every_steps=1000000",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "titans.main", f"--workdir={interrupted}", *common, "--config.total_steps=1000000"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "step 40/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(lines) + proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out
    assert "stopped by SIGTERM at step" in out, out
    stopped_at, _ = _final_params(interrupted)
    assert 40 <= stopped_at < 1000000
    total = stopped_at + 60
    outputs = {}
    for workdir in (interrupted, straight):
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "titans.main",
                f"--workdir={workdir}",
                *common,
                f"--config.total_steps={total}",
                "--config.checkpoint.allow_changes=total_steps",  # the interrupted run ran "forever"
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        outputs[workdir] = r.stdout
    assert f"resumed from checkpoint step {stopped_at}" in outputs[interrupted]
    assert "resumed" not in outputs[straight]
    step_a, a = _final_params(interrupted)
    step_b, b = _final_params(straight)
    assert step_a == step_b == total
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


def test_nan_stops_with_step_and_keeps_last_good_checkpoint(data_dir, tmp_path):
    # Learning rate warms up to 1e8: fine for the first steps, then the loss overflows.
    c = digits_config(data_dir, total_steps=200)
    c.optimizer.learning_rate = 1e8
    c.optimizer.weight_decay = 0.0
    c.schedule.name = "constant"
    c.schedule.warmup_steps = 200
    c.checkpoint.every_steps = 2
    c.log_every_steps = 2
    with pytest.raises(train.NonFiniteLossError, match=r"at step (\d+).*last good checkpoint \(step (\d+)\)") as e:
        train.train_and_evaluate(c, str(tmp_path))
    import re

    bad, kept = map(int, re.search(r"at step (\d+).*step (\d+)\)", str(e.value)).groups())
    assert kept <= bad
    step, variables = _final_params(str(tmp_path))
    assert step == kept
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(variables))


def _tree_digest(path):
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for f in sorted(files):
            h.update(os.path.relpath(os.path.join(root, f), path).encode())
            h.update(open(os.path.join(root, f), "rb").read())
    return h.hexdigest()


def test_incompatible_checkpoint_refused_and_untouched(teacher_run, data_dir):
    workdir, _ = teacher_run
    before = _tree_digest(os.path.join(workdir, "checkpoints"))
    c = digits_config(data_dir, total_steps=200)
    c.model.kwargs.hidden = (32,)
    with pytest.raises(ckpt_lib.IncompatibleCheckpointError, match="model.kwargs"):
        train.train_and_evaluate(c, workdir)
    assert _tree_digest(os.path.join(workdir, "checkpoints")) == before


def test_corrupt_checkpoint_refused_and_untouched(data_dir, tmp_path):
    c = digits_config(data_dir, total_steps=20)
    train.train_and_evaluate(c, str(tmp_path))
    step_dir = os.path.join(str(tmp_path), "checkpoints", "20", "model")
    victims = [
        os.path.join(r, f) for r, _, fs in os.walk(step_dir) for f in fs if os.path.getsize(os.path.join(r, f)) > 64
    ]
    for v in victims:
        with open(v, "r+b") as f:
            f.write(b"\x00garbage\xff" * 8)
    before = _tree_digest(os.path.join(str(tmp_path), "checkpoints"))
    c.total_steps = 40
    c.checkpoint.allow_changes = "total_steps"
    with pytest.raises(ckpt_lib.CorruptCheckpointError, match="step 20"):
        train.train_and_evaluate(c, str(tmp_path))
    assert _tree_digest(os.path.join(str(tmp_path), "checkpoints")) == before


def test_teacher_with_other_input_shape_refused(teacher_run, data_dir, tmp_path):
    c = config_lib.load_config_file(os.path.join(REPO, "configs", "fmnist_student.py") + ":" + teacher_run[0])
    c.dataset.data_dir = data_dir
    with pytest.raises(runs.TeacherMismatchError, match="digits.*fashion_mnist|fashion_mnist.*digits"):
        train.train_and_evaluate(c, str(tmp_path))


def test_missing_dataset_names_prepare_command(tmp_path):
    c = digits_config(str(tmp_path / "empty"))
    c.dataset.name = "cifar10"
    with pytest.raises(data.DatasetNotFoundError, match="python -m titans.data.prepare cifar10"):
        train.train_and_evaluate(c, str(tmp_path / "run"))


def test_pipeline_runs_stages_and_skips_finished(data_dir, tmp_path, caplog):
    from titans import experiment

    caplog.set_level(logging.INFO)
    c = ml_collections.ConfigDict()
    c.stage_order = ("teacher", "student")
    c.stages = ml_collections.ConfigDict()
    c.stages.teacher = digits_config(data_dir, total_steps=30)
    c.stages.student = digits_config(data_dir, total_steps=20)
    c.stages.student.distill.teacher_workdir = "@teacher"
    out = experiment.run_experiment(c, str(tmp_path))
    assert set(out["stages"]) == {"teacher", "student"}
    table = open(tmp_path / "summary.md").read()
    assert "| teacher |" in table and "| student |" in table
    out2 = experiment.run_experiment(c, str(tmp_path))
    assert "already finished" in caplog.text
    assert out2["stages"]["student"]["accuracy"] == out["stages"]["student"]["accuracy"]


@pytest.mark.parametrize("objective", ["easy_weighted", "defer"])
def test_cascade_objectives_train(teacher_run, data_dir, tmp_path, objective):
    c = digits_config(data_dir, total_steps=60)
    c.model.kwargs.hidden = (16,)
    c.distill.teacher_workdir = teacher_run[0]
    c.distill.objective = objective
    c.distill.easy.rule = "margin"
    c.distill.allow_in_sample_teacher = True  # defer reads the teacher's correctness on its own training rows
    result = train.train_and_evaluate(c, str(tmp_path))
    assert result["accuracy"] > 0.6 and result["objective"] == objective
    outputs = 11 if objective == "defer" else 10
    meta = ckpt_lib.Checkpointer(str(tmp_path), read_only=True).read_meta(60)
    assert meta["fields"]["num_outputs"] == outputs


def test_objective_without_teacher_is_refused(data_dir, tmp_path):
    c = digits_config(data_dir)
    c.distill.objective = "defer"
    with pytest.raises(config_lib.ConfigError, match="needs a teacher"):
        train.train_and_evaluate(c, str(tmp_path))


def test_load_run_model_and_predict_match_results(teacher_run, data_dir):
    workdir, result = teacher_run
    model, cfg, info, step = runs.load_model(workdir)
    assert step == 150 and cfg.model.name == "mlp"
    src = data.get_source("digits", "test", data_dir=data_dir)
    logits, labels = runs.predict_split(runs.logits_fn, model, src, info, batch_size=64)
    assert logits.shape == (len(src), 10) and len(labels) == len(src)
    assert float(np.mean(logits.argmax(-1) == labels)) == pytest.approx(result["accuracy"], abs=1e-9)


def test_teacher_with_other_classes_refused(teacher_run):
    # Every offline dataset has 10 classes, so the student's data is described with 100 here.
    import dataclasses

    info = dataclasses.replace(data.dataset_info("digits"), num_classes=100, name="digits100")
    with pytest.raises(runs.TeacherMismatchError, match=r"10 classes.*'digits100' has 100 classes"):
        runs.load_teacher(teacher_run[0], info, dtype=jnp.float32)


def test_a_model_with_dropout_trains(data_dir, tmp_path):
    """A dropout stream keeps a typed PRNG key in the model state; the step's finiteness check cast every
    state leaf to float32 and failed on it ("Cannot convert_element_type from key<fry> to float32")."""
    c = digits_config(data_dir, total_steps=4, **{"log_every_steps": 2, "checkpoint.every_steps": 4})
    c.model.name = "mobilenet_v2"
    c.model.kwargs = ml_collections.ConfigDict({"width_mult": 0.25, "dropout": 0.2})
    out = train.train_and_evaluate(c, str(tmp_path))
    assert out["steps"] == 4 and np.isfinite(out["loss"])
