"""`train_and_evaluate(config, workdir, method=None)`: one model (a teacher, or a student of a
teacher, or a method's model) trained with `fit` and evaluated; the run's files written through
`titans.runs.RunDir`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from typing import Any

import jax
import ml_collections
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import data as data_lib
from titans import logs, models, parallel, runs, teachers
from titans.train import method as method_lib
from titans.train.loop import Checkpointing, FitResult, fit
from titans.train.optim import make_optimizer
from titans.train.state import TrainState
from titans.train.steps import evaluate, make_eval_step, make_train_step


@dataclasses.dataclass
class Setup:
    """What a run needs before its first step: mesh, data, duration, teacher or soft labels."""

    config: ml_collections.ConfigDict
    run: runs.RunDir
    mesh: Any
    dtype: Any
    info: data_lib.DatasetInfo
    train_src: Any
    eval_src: Any
    total_steps: int
    teacher: runs.FrozenModel | None = None
    soft_labels: teachers.SoftLabelSource | None = None


def _start(config, workdir: str) -> Setup:
    d = config.distributed
    parallel.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    shared = {k: v for k, v in config.to_dict().items() if k != "distributed"}  # process_id differs by design
    parallel.check_processes_agree(config=config_lib.fingerprint(shared), code=parallel.code_fingerprint())
    run = runs.RunDir(workdir)
    os.makedirs(run.path, exist_ok=True)
    mesh = parallel.make_mesh()
    info = data_lib.dataset_info(config.dataset.name)
    data_dir = config.dataset.data_dir or None
    train_src = data_lib.get_source(config.dataset.name, config.dataset.train_split, data_dir=data_dir)
    eval_src = data_lib.get_source(config.dataset.name, config.dataset.eval_split, data_dir=data_dir)
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh)
    setup = Setup(
        config,
        run,
        mesh,
        runs.compute_dtype(config.dtype),
        info,
        train_src,
        eval_src,
        config_lib.steps(config, len(train_src)),
    )
    # distill.teacher_mode cache/service: the soft labels arrive with the batches (titans.teachers);
    # the cache's manifest and the service's workers are checked here, before the first step.
    setup.soft_labels = teachers.open_soft_labels(config, info, train_src)
    if config.distill.teacher_workdir and setup.soft_labels is None:
        teacher, _ = runs.load_teacher(
            config.distill.teacher_workdir, info, dtype=setup.dtype, step=config.distill.teacher_step
        )
        setup.teacher = parallel.replicate(teacher, mesh)
    return setup


def _loader(s: Setup, method: method_lib.Method):
    needs_index = method.needs_index or (s.soft_labels is not None and s.soft_labels.needs_index)
    loader = data_lib.TrainLoader(
        s.train_src,
        s.info,
        global_batch_size=s.config.batch_size,
        seed=s.config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augment=s.config.dataset.augment,
        augmentation=s.config.dataset.augmentation or None,
        with_index=needs_index,
    )
    return s.soft_labels.wrap(loader) if s.soft_labels is not None else loader


def _resume(s: Setup, state: TrainState, loader, ckpt: ckpt_lib.Checkpointer, meta: dict) -> TrainState:
    saved = ckpt.all_steps()
    if not saved:
        return state
    step = saved[-1] if s.config.checkpoint.restore_step < 0 else s.config.checkpoint.restore_step
    if step not in saved:
        raise ckpt_lib.CheckpointError(
            f"checkpoint.restore_step={step} is not saved in {ckpt.directory}; saved steps: {saved}."
        )
    model_vars, train_vars, loader_state = ckpt.restore(
        step, model_like=state.model_vars(), train_like=state.train_vars(), expected_meta=meta
    )
    state = parallel.replicate(state.with_vars(model_vars, train_vars), s.mesh)
    loader.set_state(loader_state)
    logging.info("[%s] resumed from checkpoint step %d of %s", s.config.name, step, ckpt.directory)
    return state


def _report(s: Setup, fitted: FitResult, model, eval_fn) -> dict:
    config, state = s.config, fitted.state
    result = eval_fn(state)
    result.update(
        {
            "name": config.name,
            "model": config.model.name,
            "dataset": config.dataset.name,
            "split": config.dataset.eval_split,
            "steps": s.total_steps,
            "train_time_s": fitted.train_time_s,
            "train_examples_per_s": fitted.examples_per_s,
            "flops_per_example": models.flops_per_example(model, tuple(s.info.image_shape)),
            "param_count": models.param_count(model),
            "preempted": False,
        }
    )
    if s.soft_labels is not None or s.teacher is not None:
        result["teacher_workdir"] = config.distill.teacher_workdir
        result["objective"] = config.distill.objective
        result["teacher_mode"] = config.distill.teacher_mode if s.teacher is None else "online"
    if s.teacher is not None:
        result["teacher_flops_per_example"] = s.teacher.flops_per_example(s.info.image_shape)
    return result


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, method: method_lib.Method | None = None
) -> dict:
    """Trains one model (a teacher, or a student when distill.teacher_workdir is set) and evaluates it.

    `method` (optional, see titans.train.method) changes the model, its forward pass and loss, and
    passes frozen arrays into the step; everything else is this trainer's. Resumes from the newest
    checkpoint in `workdir` when there is one. Returns the final evaluation, also written to
    WORKDIR/results.json. A SIGTERM saves a checkpoint and returns early with
    `{"preempted": True, ...}`; rerunning the same command continues from there.
    """
    config = config_lib.validate(config)
    s = _start(config, workdir)
    method = method_lib.resolve(method, config)
    model = method_lib.build(method, config, s.info, s.dtype)
    tx, schedule = make_optimizer(config, s.total_steps, len(s.train_src))
    graphdef, state = TrainState.create(model, tx)
    state = parallel.replicate(state, s.mesh)
    frozen = parallel.replicate(method.frozen, s.mesh) if method.frozen is not None else None
    loader = _loader(s, method)
    ckpt = ckpt_lib.Checkpointer(s.run.path, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    meta = ckpt_lib.meta_for(config, s.info, runs.num_outputs(config, s.info))
    state = _resume(s, state, loader, ckpt, meta)
    writer_proc = logs.is_writer()
    if writer_proc:
        s.run.write_config(config)
    train_step = jax.jit(make_train_step(graphdef, tx, method, s.info, s.dtype, schedule), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(graphdef, s.info, s.dtype, config.ece_bins, method))

    def eval_fn(st):
        return evaluate(
            eval_step,
            st.params,
            st.model_state,
            s.teacher,
            s.eval_src,
            s.info,
            batch_size=config.eval_batch_size,
            mesh=s.mesh,
            frozen=frozen,
        )

    writer = logs.MetricWriter(s.run.path, enabled=writer_proc)
    with s.soft_labels or contextlib.nullcontext():
        fitted = fit(
            state,
            train_step,
            loader,
            config,
            total_steps=s.total_steps,
            mesh=s.mesh,
            step_args=(s.teacher, frozen),
            checkpointing=Checkpointing(ckpt, meta, config.checkpoint.every_steps),
            writer=writer,
            evaluate=eval_fn,
            workdir=s.run.path,
            verbose=writer_proc,
        )
    if fitted.preempted:
        ckpt.close()
        writer.close()
        logging.warning(
            "[%s] stopped by SIGTERM at step %d; checkpoint saved. Rerun the same command to resume.",
            config.name,
            fitted.step,
        )
        return {"preempted": True, "step": fitted.step}
    result = _report(s, fitted, nnx.merge(graphdef, fitted.state.params, fitted.state.model_state), eval_fn)
    writer.write(s.total_steps, {k: v for k, v in result.items() if isinstance(v, (int, float))}, prefix="final/")
    writer.close()
    ckpt.close()
    if writer_proc:
        s.run.write_results(result)
    return result


def ensure_trained(config: ml_collections.ConfigDict, workdir: str, *, method: method_lib.Method | None = None) -> dict:
    """The results of the run in `workdir`: read back if it finished, else trained (or resumed) now."""
    done = runs.RunDir(workdir).results()
    if done is not None:
        logging.info("[%s] already finished: %s", config.name, workdir)
        return done
    return train_and_evaluate(config, workdir, method=method)
