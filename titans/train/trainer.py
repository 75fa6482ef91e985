"""`train_and_evaluate(config, workdir, method=None)`: one model (a teacher, or a student of a
teacher, or a method's model) trained with `fit` and evaluated; the run's files written through
`titans.runs.RunDir`.

A run holds its workdir's lock while it works (`titans.locks`), resumes only the run it was
(`titans.train.resume`), reads back instead of retraining when it already finished, and always
closes its checkpointer, so that no exit path (error, SIGTERM, a failed save) leaves it hanging.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import data as data_lib
from titans import locks, logs, models, parallel, runs, teachers
from titans.train import method as method_lib
from titans.train import pretrain
from titans.train import resume as resume_lib
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
    teacher_identity: dict | None = None
    soft_labels: teachers.SoftLabelSource | None = None
    init_identity: dict | None = None  # the run `init_from` named, and the step read


def _source(config, split: str):
    try:
        src = data_lib.get_source(config.dataset.name, split, data_dir=config.dataset.data_dir or None)
    except data_lib.DatasetNotFoundError:
        raise
    except Exception as e:  # TFDS and array_record raise several types for a bad or empty split
        raise ValueError(
            f"The split {split!r} of {config.dataset.name} cannot be read ({type(e).__name__}: {e}); is it "
            f"empty? Check dataset.train_split / dataset.eval_split."
        ) from e
    if len(src) == 0:
        raise ValueError(f"The split {split!r} of {config.dataset.name} is empty; check dataset.*_split.")
    return src


def _start(config, workdir: str) -> Setup:
    d = config.distributed
    parallel.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    shared = {k: v for k, v in config.to_dict().items() if k != "distributed"}  # process_id differs by design
    parallel.check_processes_agree(config=config_lib.fingerprint(shared), code=parallel.code_fingerprint())
    run = runs.RunDir(workdir)
    run.dir.mkdir(parents=True, exist_ok=True)
    mesh = parallel.make_mesh()
    train_src = _source(config, config.dataset.train_split)
    eval_src = _source(config, config.dataset.eval_split)
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh)
    info = data_lib.dataset_info(config.dataset.name)
    total = config_lib.steps(config, len(train_src))
    return Setup(config, run, mesh, runs.compute_dtype(config.dtype), info, train_src, eval_src, total)


def _open_teacher(s: Setup, pinned: dict | None) -> None:
    """The teacher (online) or the soft-label source (cache/service) at the resolved teacher step."""
    config = s.config
    if not config.distill.teacher_workdir:
        return
    step, s.teacher_identity = resume_lib.resolve_teacher(config, s.info, pinned)
    at_step = ml_collections.ConfigDict(config.to_dict())
    at_step.distill.teacher_step = step
    # distill.teacher_mode cache/service: the soft labels arrive with the batches (titans.teachers);
    # the cache's manifest and the service's workers are checked here, before the first step.
    s.soft_labels = teachers.open_soft_labels(at_step, s.info, s.train_src)
    if s.soft_labels is None:
        teacher, _ = runs.load_teacher(config.distill.teacher_workdir, s.info, dtype=s.dtype, step=step)
        s.teacher = parallel.replicate(teacher, s.mesh)


def _training_source(s: Setup):
    """The training split as the loader reads it: in RAM (`data.load_in_memory`) when `dataset.in_memory`
    says so ("auto": fixed-shape images, at most 1 GiB), else the TFDS source itself."""
    mode = s.config.dataset.in_memory
    if mode == "never" or s.info.augment == "imagenet":  # ImageNet's images differ in shape
        return s.train_src
    size = len(s.train_src) * int(np.prod(s.info.image_shape))
    if mode == "always" or size <= config_lib.IN_MEMORY_AUTO_BYTES:
        return data_lib.load_in_memory(s.train_src)
    return s.train_src


def _loader(s: Setup, method: method_lib.Method, source=None):
    needs_index = method.needs_index or (s.soft_labels is not None and s.soft_labels.needs_index)
    loader = data_lib.TrainLoader(
        _training_source(s) if source is None else source,
        s.info,
        global_batch_size=s.config.batch_size,
        seed=s.config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        augment=s.config.dataset.augment,
        augmentation=s.config.dataset.augmentation or None,
        with_index=needs_index,
        group_by_length=s.config.dataset.group_by_length,
    )
    return s.soft_labels.wrap(loader) if s.soft_labels is not None else loader


def _resume_step(s: Setup, ckpt: ckpt_lib.Checkpointer, meta: dict) -> tuple[int | None, dict]:
    """(step to resume from or None, its meta), after every check that it is this run's checkpoint."""
    saved = ckpt.all_steps()
    if not saved:
        return None, {}
    step = _newest_usable(s, ckpt) if s.config.checkpoint.restore_step < 0 else s.config.checkpoint.restore_step
    if step not in saved:
        raise ckpt_lib.CheckpointError(
            f"checkpoint.restore_step={step} is not saved in {ckpt.directory}; saved steps: {saved}."
        )
    found = ckpt.check_meta(step, meta)
    changes = resume_lib.config_changes(found.get("config"), s.config)
    resume_lib.check_changes(changes, s.config, step, s.run.path)
    return step, found


def _newest_usable(s: Setup, ckpt: ckpt_lib.Checkpointer) -> int:
    """The newest saved step, or, when its save never completed (no recorded checksums: the process died
    while hashing it), the newest verified one before it; the unverified steps are then moved aside by
    `_restore` (kept, not deleted). With no verified step at all, the newest one is returned and
    `Checkpointer.verify` refuses it unless `checkpoint.allow_unverified`."""
    saved = ckpt.all_steps()
    verified = ckpt.verified_steps()
    if s.config.checkpoint.allow_unverified or not verified or verified[-1] == saved[-1]:
        return saved[-1]
    logging.warning(
        "Checkpoint step(s) %s in %s have no recorded checksums (their save did not complete); resuming from "
        "step %d, the newest verified one.",
        [x for x in saved if x > verified[-1]],
        ckpt.directory,
        verified[-1],
    )
    return verified[-1]


def _restore(s: Setup, state: TrainState, loader, ckpt, meta: dict, step: int) -> TrainState:
    if step != ckpt.all_steps()[-1]:
        ckpt.supersede_after(step)  # restarting from an earlier step: later ones are kept aside
    model_vars, train_vars, loader_state = ckpt.restore(
        step,
        model_like=state.model_vars(),
        train_like=state.train_vars(),
        expected_meta=meta,
        allow_unverified=s.config.checkpoint.allow_unverified,
    )
    loader.set_state(loader_state)
    logs.progress_note(s.config.name, f"resumed from checkpoint step {step}", logs.is_writer())
    return parallel.replicate(state.with_vars(model_vars, train_vars), s.mesh)


def _report(s: Setup, fitted: FitResult, model, eval_fn, train_time_s: float) -> dict:
    config, state = s.config, fitted.state
    result = eval_fn(state)
    result.update(
        {
            "name": config.name,
            "model": config.model.name,
            "dataset": config.dataset.name,
            "split": config.dataset.eval_split,
            "steps": s.total_steps,
            "train_time_s": train_time_s,
            "train_examples_per_s": fitted.examples_per_s,
            "flops_per_example": models.flops_per_example(model, tuple(s.info.image_shape)),
            "param_count": models.param_count(model),
            "preempted": False,
        }
    )
    if s.init_identity is not None:
        result["init_from"] = s.init_identity
    if s.teacher_identity is not None:
        result["teacher_workdir"] = config.distill.teacher_workdir
        result["teacher_step"] = s.teacher_identity["step"]
        result["objective"] = config.distill.objective
        result["teacher_mode"] = config.distill.teacher_mode if s.teacher is None else "online"
    if s.teacher is not None:
        result["teacher_flops_per_example"] = s.teacher.flops_per_example(s.info.image_shape)
    return result


def _finished(s: Setup) -> dict | None:
    """results.json of a run that already reached its last step (and is not asked to restart)."""
    done = s.run.results()
    if done is None or s.config.checkpoint.restore_step >= 0:
        return None
    if (s.run.checkpoint_steps() or [None])[-1] != s.total_steps or done.get("steps") != s.total_steps:
        return None
    resume_lib.check_finished(s.run, s.config)
    logs.progress_note(s.config.name, f"already finished: {s.run.path} (results.json kept)", logs.is_writer())
    return done


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, *, method: method_lib.Method | None = None
) -> dict:
    """Trains one model (a teacher, or a student when distill.teacher_workdir is set) and evaluates it.

    `method` (optional, see titans.train.method) changes the model, its forward pass and loss, and
    passes frozen arrays into the step; everything else is this trainer's. Resumes from the newest
    checkpoint in `workdir` when there is one (refusing one of another config or teacher). Returns
    the final evaluation, also written to WORKDIR/results.json; a finished run's results are read
    back. A SIGTERM saves a checkpoint and returns early with `{"preempted": True, ...}`; rerunning
    the same command continues from there.
    """
    config = config_lib.validate(config)
    s = _start(config, workdir)
    with locks.WorkdirLock(s.run.path, "training", enabled=logs.is_writer()) as lock:
        done = _finished(s)
        if done is not None:
            return done
        ckpt = ckpt_lib.Checkpointer(s.run.path, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
        try:
            return _train(s, method, ckpt, lock)
        finally:
            with contextlib.suppress(Exception):  # the error that stopped the run is the one reported
                ckpt.close()


def _build(s: Setup, method: method_lib.Method | None):
    """(method resolved, optimizer, schedule, graphdef, initial state): what the steps are made of."""
    if method is None and s.config.mlm.enabled:
        method = pretrain.mlm_method()
    method = method_lib.resolve(method, s.config)
    model = method_lib.build(method, s.config, s.info, s.dtype)
    s.init_identity = pretrain.initial_params(model, s.config, s.info)  # a resumed run's checkpoint then overwrites
    tx, schedule = make_optimizer(s.config, s.total_steps, len(s.train_src))
    graphdef, state = TrainState.create(model, tx)
    return method, tx, schedule, graphdef, state


def _steps(s: Setup, method: method_lib.Method, graphdef, tx, schedule):
    """(jitted train step, jitted eval step, the method's frozen arrays replicated)."""
    frozen = parallel.replicate(method.frozen, s.mesh) if method.frozen is not None else None
    train_step = jax.jit(make_train_step(graphdef, tx, method, s.info, s.dtype, schedule), donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(graphdef, s.info, s.dtype, s.config.ece_bins, method))
    return train_step, eval_step, frozen


def _train(s: Setup, method: method_lib.Method | None, ckpt: ckpt_lib.Checkpointer, lock=None) -> dict:
    config = s.config
    method, tx, schedule, graphdef, state = _build(s, method)
    meta = ckpt_lib.meta_for(config, s.info, runs.num_outputs(config, s.info))
    step, found = _resume_step(s, ckpt, meta)
    _open_teacher(s, found.get("teacher"))
    if step is not None:
        resume_lib.record_changes(s.run.path, step, resume_lib.config_changes(found.get("config"), config))
    loader = _loader(s, method)
    state = parallel.replicate(state, s.mesh)
    if step is not None:
        state = _restore(s, state, loader, ckpt, meta, step)
    writer_proc = logs.is_writer()
    if writer_proc:
        s.run.write_config(config)
    meta = {**meta, "config": config.to_dict(), "teacher": s.teacher_identity}
    train_step, eval_step, frozen = _steps(s, method, graphdef, tx, schedule)

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
            summary=method.eval_summary,
        )

    prior_time = float((found.get("progress") or {}).get("train_time_s", 0.0))
    checkpointing = Checkpointing(ckpt, meta, config.checkpoint.every_steps, prior_time_s=prior_time, lock=lock)
    writer = logs.MetricWriter(s.run.path, enabled=writer_proc, keep_through_step=step or 0)
    try:
        with s.soft_labels or contextlib.nullcontext():
            fitted = fit(
                state,
                train_step,
                loader,
                config,
                total_steps=s.total_steps,
                mesh=s.mesh,
                step_args=(s.teacher, frozen),
                checkpointing=checkpointing,
                writer=writer,
                evaluate=eval_fn,
                workdir=s.run.path,
                verbose=writer_proc,
            )
        if fitted.preempted:
            logs.progress_note(
                config.name,
                f"stopped by SIGTERM at step {fitted.step}; checkpoint saved. Rerun the same command to resume.",
                writer_proc,
            )
            return {"preempted": True, "step": fitted.step}
        module = nnx.merge(graphdef, fitted.state.params, fitted.state.model_state)
        result = _report(s, fitted, module, eval_fn, prior_time + fitted.train_time_s)
        writer.write(s.total_steps, {k: v for k, v in result.items() if isinstance(v, int | float)}, prefix="final/")
    finally:
        writer.close()
    if writer_proc:
        s.run.write_results(result)
    return result


def ensure_trained(config: ml_collections.ConfigDict, workdir: str, *, method: method_lib.Method | None = None) -> dict:
    """The results of the run in `workdir`: read back if it finished, else trained (or resumed) now."""
    run = runs.RunDir(workdir)
    done = run.results()
    if done is not None:
        resume_lib.check_finished(run, config_lib.validate(config))
        logging.info("[%s] already finished: %s", config.name, workdir)
        return done
    return train_and_evaluate(config, workdir, method=method)
