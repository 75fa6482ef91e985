"""One trainer for teachers (cross-entropy) and students (distillation): `train_and_evaluate`.

The train step is a pure function of arrays, jitted once over the mesh: the batch is sharded along
`data`, the student's variables and optimizer state are replicated, and its input buffers are
donated. A teacher enters the step as a separate, replicated argument: the optimizer is built over
the student's parameters only, the teacher's logits pass through `stop_gradient`, and the teacher
is never written into the student's checkpoint. So a teacher is frozen by construction.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from titans import checkpoint as ckpt_lib
from titans import config as config_lib
from titans import data as data_lib
from titans import logs, losses, models, parallel, teachers


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients stopped being finite; the run stopped, the last good checkpoint kept."""


class TeacherMismatchError(ValueError):
    """The teacher run does not fit the student's data (classes or input shape differ)."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the student's nnx.Param variables
    model_state: Any  # everything else of the student (BatchNorm statistics, RNG streams)
    opt_state: Any
    rng: jax.Array  # raw uint32 key data
    # First step whose loss or gradient norm was not finite (-1: none). From that step on the step
    # function leaves params and optimizer state as they were, so nothing bad reaches a checkpoint.
    nonfinite_step: jax.Array


@flax.struct.dataclass
class Teacher:
    """A frozen model: its graph (static) and its variables (arrays, passed into jitted steps)."""
    graphdef: Any = flax.struct.field(pytree_node=False)
    params: Any
    model_state: Any

    def apply(self, images):
        model = nnx.merge(self.graphdef, self.params, jax.tree.map(lambda x: x, self.model_state))
        return jax.lax.stop_gradient(model(images, train=False))


@dataclasses.dataclass(frozen=True)
class StudentHook:
    """What a method built on this trainer (e.g. the B-DISTIL ensemble) changes in a student run.

    Every field is optional; an empty hook is the plain trainer.
      frozen       a pytree of arrays (earlier ensemble members, per-example weight tables) passed,
                   replicated, into every train and eval step as an argument, never trained or saved;
      build_model  (config, info, seed, dtype, outputs) -> the nnx.Module to train, instead of
                   `build_model(config.model, ...)`;
      forward      (model, images, frozen, train) -> (logits, aux): the logits the loss, the metrics
                   and the evaluation see (e.g. earlier members' summed logits plus the student's),
                   and any pytree `aux` the loss needs;
      loss         (logits, aux, teacher_logits, batch, frozen, step) -> (per-example loss, weights),
                   instead of `make_loss_fn(config)`;
      needs_index  the loader puts each row's example index (into the train split) in batch["index"].
    """
    frozen: Any = None
    build_model: Callable | None = None
    forward: Callable | None = None
    loss: Callable | None = None
    needs_index: bool = False


def _forward(hook: StudentHook | None, model, images, frozen, train: bool):
    if hook is not None and hook.forward is not None:
        return hook.forward(model, images, frozen, train)
    return model(images, train=train), None


def compute_dtype(name: str):
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else jnp.float32
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def num_outputs(config, info) -> int:
    """Classes, plus one "defer" output for a learning-to-defer student."""
    return info.num_classes + (1 if config.distill.get("objective", "standard") == "defer" else 0)


def build_model(model_cfg, info, *, seed: int, dtype, outputs: int | None = None) -> nnx.Module:
    return models.create_model(model_cfg.name, num_classes=outputs or info.num_classes,
                               input_shape=tuple(info.image_shape), rngs=nnx.Rngs(seed), dtype=dtype,
                               **model_cfg.kwargs.to_dict())


def make_optimizer(config, total_steps: int, num_examples: int):
    """The optax optimizer and its learning-rate schedule (warm-up, then constant/cosine/step)."""
    o, s = config.optimizer, config.schedule
    lr, warmup = o.learning_rate, config_lib.warmup_steps(config, num_examples)
    decay_steps = max(1, total_steps - warmup)
    if s.name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    elif s.name == "step":
        main = optax.piecewise_constant_schedule(
            lr, {int(b * total_steps) - warmup: s.step_factor for b in s.step_boundaries})
    else:
        main = optax.constant_schedule(lr)
    schedule = optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup]) if warmup else main
    if o.name == "sgd":
        tx = optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov)
        if o.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(o.weight_decay), tx)
    elif o.name == "adamw":
        tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    else:
        tx = optax.adam(schedule, b1=o.b1, b2=o.b2)
    if o.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx, schedule


def make_loss_fn(config) -> Callable:
    """loss(student_logits, teacher_logits_or_None, labels, step) -> (per-example loss, weights).

    The batch objective is sum(weights * loss) / sum(weights): weights are 1 except for the
    easy-weighted objective, where they come from the teacher (see losses.easy_weights).
    """
    d = config.distill

    def loss_fn(logits, teacher_logits, labels, step):
        ones = jnp.ones(labels.shape, jnp.float32)
        if teacher_logits is None:
            return losses.cross_entropy(logits, labels, config.label_smoothing), ones
        if d.objective == "defer":
            return losses.defer_surrogate(logits, teacher_logits, labels, alpha=d.alpha,
                                          defer_weight=d.defer_weight), ones
        per_example = losses.distillation_loss(logits, teacher_logits, labels, kind=d.loss, alpha=d.alpha,
                                               temperature=d.temperature, label_smoothing=config.label_smoothing)
        if d.objective == "easy_weighted":
            weights = losses.easy_weights(teacher_logits, labels, logits, rule=d.easy.rule,
                                          sharpness=d.easy.sharpness, floor=d.easy.floor)
            if d.easy.rule == "agreement" and d.easy.warmup_steps:
                weights = jnp.where(step < d.easy.warmup_steps, ones, weights)
            return per_example, weights
        return per_example, ones
    return loss_fn


def make_train_step(graphdef, tx, loss_fn, info, dtype, schedule, hook: StudentHook | None = None):
    """Returns train_step(state, batch, teacher, frozen=None) -> (state, metrics); pure, to be jitted.

    `frozen` is `hook.frozen` (see StudentHook); without a hook it is ignored.
    """
    num_classes = info.num_classes

    def train_step(state: TrainState, batch, teacher: Teacher | None, frozen=None):
        images = data_lib.normalize(batch["image"], info, dtype)
        labels = batch["label"]
        if "teacher_logits" in batch:  # soft labels from a cache or the teacher service (titans.teachers)
            teacher_logits = batch["teacher_logits"]
        else:
            teacher_logits = teacher.apply(images) if teacher is not None else None

        def objective(params):
            model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, state.model_state))
            logits, aux = _forward(hook, model, images, frozen, True)
            if hook is not None and hook.loss is not None:
                per_example, weights = hook.loss(logits, aux, teacher_logits, batch, frozen, state.step)
            else:
                per_example, weights = loss_fn(logits, teacher_logits, labels, state.step)
            loss = jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1e-12)
            return loss, (logits[:, :num_classes], nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state.nonfinite_step < 0)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        new_state = state.replace(
            step=state.step + 1,
            params=keep_if_finite(params, state.params),
            model_state=keep_if_finite(model_state, state.model_state),
            opt_state=keep_if_finite(opt_state, state.opt_state),
            nonfinite_step=jnp.where(finite | (state.nonfinite_step >= 0), state.nonfinite_step, state.step),
        )
        metrics = {
            "loss": loss,
            "accuracy": jnp.mean(jnp.argmax(logits, -1) == labels),
            "grad_norm": grad_norm,
            "learning_rate": schedule(state.step),
        }
        if teacher_logits is not None:
            metrics["teacher_agreement"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, info, dtype, num_bins: int, hook: StudentHook | None = None):
    """Returns eval_step(params, model_state, batch, teacher, frozen=None) -> sums over the batch's real rows."""

    def eval_step(params, model_state, batch, teacher: Teacher | None, frozen=None):
        images = data_lib.normalize(batch["image"], info, dtype)
        labels, mask = batch["label"], batch["mask"]
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, model_state))
        logits = _forward(hook, model, images, frozen, False)[0]
        logits = logits.astype(jnp.float32)[:, :info.num_classes]  # drop a "defer" output
        m = mask.astype(jnp.float32)
        pred = jnp.argmax(logits, -1)
        out = {
            "count": m.sum(),
            "correct": ((pred == labels) * m).sum(),
            "loss": (losses.cross_entropy(logits, labels) * m).sum(),
            "calibration": losses.calibration_bins(logits, labels, mask, num_bins),
        }
        if teacher is not None:
            t_pred = jnp.argmax(teacher.apply(images), -1)
            out["teacher_agreement"] = ((pred == t_pred) * m).sum()
            out["teacher_correct"] = ((t_pred == labels) * m).sum()
        return out

    return eval_step


def evaluate(eval_step, params, model_state, teacher, src, info, *, batch_size: int, mesh, frozen=None) -> dict:
    """Accuracy, loss, ECE (and agreement with the teacher) over a whole split."""
    totals = None
    for batch in data_lib.eval_batches(src, info, global_batch_size=batch_size,
                                       process_index=jax.process_index(), process_count=jax.process_count()):
        sums = eval_step(params, model_state, parallel.to_global(batch, mesh), teacher, frozen)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    n = float(totals["count"])
    result = {
        "num_examples": int(n),
        "accuracy": float(totals["correct"]) / n,
        "loss": float(totals["loss"]) / n,
        "ece": losses.expected_calibration_error(totals["calibration"]),
    }
    if "teacher_agreement" in totals:
        result["teacher_agreement"] = float(totals["teacher_agreement"]) / n
        result["teacher_accuracy"] = float(totals["teacher_correct"]) / n
    return result


def load_run_model(workdir: str, *, dtype=jnp.float32, step: int = -1):
    """Rebuilds a finished (or running) run's model from its config.json and checkpoint, frozen.

    Returns (Teacher, config, dataset info, step). Only the checkpoint's `model` item is read.
    """
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{workdir!r} is not a Titans run (no config.json); train a model there first.")
    with open(cfg_path) as f:
        cfg = ml_collections.ConfigDict(json.load(f))
    info = data_lib.dataset_info(cfg.dataset.name)
    model = build_model(cfg.model, info, seed=0, dtype=dtype, outputs=num_outputs(cfg, info))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ckpt = ckpt_lib.Checkpointer(workdir, read_only=True)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"The run {workdir} has no checkpoint yet.")
    use = steps[-1] if step < 0 else step
    if use not in steps:
        raise ValueError(f"Step {step} is not saved in {workdir}; saved: {steps}.")
    ckpt.check_meta(use, ckpt_lib.meta_for(cfg, info, num_outputs(cfg, info)))
    variables = ckpt.restore_model(use, {"params": nnx.to_pure_dict(params), "rest": nnx.to_pure_dict(rest)})
    nnx.replace_by_pure_dict(params, variables["params"])
    nnx.replace_by_pure_dict(rest, variables["rest"])
    return Teacher(graphdef, params, rest), cfg, info, use


def load_teacher(teacher_workdir: str, info, *, dtype, step: int = -1) -> tuple[Teacher, ml_collections.ConfigDict]:
    """Loads a teacher run for a student on dataset `info`, refusing one trained for other data."""
    if not os.path.exists(os.path.join(teacher_workdir, "config.json")):
        raise FileNotFoundError(f"distill.teacher_workdir={teacher_workdir!r} is not a Titans run "
                                f"(no config.json); train the teacher there first.")
    with open(os.path.join(teacher_workdir, "config.json")) as f:
        t_cfg = ml_collections.ConfigDict(json.load(f))
    t_info = data_lib.dataset_info(t_cfg.dataset.name)
    if t_info.num_classes != info.num_classes or tuple(t_info.image_shape) != tuple(info.image_shape):
        raise TeacherMismatchError(
            f"The teacher in {teacher_workdir} was trained on '{t_cfg.dataset.name}' "
            f"({t_info.num_classes} classes, input {tuple(t_info.image_shape)}), but this run's data "
            f"'{info.name}' has {info.num_classes} classes and input {tuple(info.image_shape)}.")
    teacher, t_cfg, _, _ = load_run_model(teacher_workdir, dtype=dtype, step=step)
    return teacher, t_cfg


def predict_logits(model: Teacher, src, info, *, batch_size: int, mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """Logits of a frozen model over a whole split, in the split's order: (logits (N, K), labels (N,)).

    Single-process (analysis on one host; any number of local devices).
    """
    if jax.process_count() > 1:
        raise RuntimeError("predict_logits runs in a single process (it gathers the whole split on this host).")
    mesh = mesh or parallel.make_mesh()
    model = parallel.replicate(model, mesh)
    apply = jax.jit(lambda m, images: m.apply(data_lib.normalize(images, info, jnp.float32)).astype(jnp.float32))
    outs, labels = [], []
    for batch in data_lib.eval_batches(src, info, global_batch_size=batch_size, process_index=0, process_count=1):
        keep = np.asarray(batch["mask"])
        logits = np.asarray(jax.device_get(apply(model, parallel.to_global({"x": batch["image"]}, mesh)["x"])))
        outs.append(logits[keep])
        labels.append(np.asarray(batch["label"])[keep])
    return np.concatenate(outs), np.concatenate(labels)


class PreemptionGuard:
    """Turns SIGTERM (what preemptible machines and schedulers send) into a flag the loop checks."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        logging.warning("SIGTERM received: saving a checkpoint and stopping.")
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def agreed(self) -> bool:
        """True when any process was asked to stop (a collective in multi-process runs)."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        flags = multihost_utils.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))


def _check_finite(state: TrainState, ckpt: ckpt_lib.Checkpointer) -> None:
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
        ckpt.wait()
        last = ckpt.latest_step()
        kept = f"the last good checkpoint (step {last}) is kept in {ckpt.directory}" if last is not None \
            else "no checkpoint had been saved yet"
        raise NonFiniteLossError(f"The loss or gradient became NaN/inf at step {bad}; the run stopped and {kept}. "
                                 f"Lower the learning rate or enable optimizer.grad_clip_norm.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *, hook: StudentHook | None = None) -> dict:
    """Trains one model (a teacher, or a student when distill.teacher_workdir is set) and evaluates it.

    `hook` (optional, see StudentHook) lets a method change the model, its forward pass and loss,
    and pass frozen arrays into the step, reusing everything else here.

    Resumes from the newest checkpoint in `workdir` when there is one. Returns the final evaluation,
    also written to WORKDIR/results.json. A SIGTERM saves a checkpoint and returns early with
    `{"preempted": True, ...}`; rerunning the same command continues from there.
    """
    config = config_lib.validate(config)
    d = config.distributed
    parallel.maybe_initialize_distributed(d.coordinator_address, d.num_processes, d.process_id)
    shared = {k: v for k, v in config.to_dict().items() if k != "distributed"}  # process_id differs by design
    parallel.check_processes_agree(config=config_lib.fingerprint(shared), code=parallel.code_fingerprint())
    writer_proc = logs.is_writer()
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    mesh = parallel.make_mesh()
    dtype = compute_dtype(config.dtype)

    info = data_lib.dataset_info(config.dataset.name)
    data_dir = config.dataset.data_dir or None
    train_src = data_lib.get_source(config.dataset.name, config.dataset.train_split, data_dir=data_dir)
    eval_src = data_lib.get_source(config.dataset.name, config.dataset.eval_split, data_dir=data_dir)
    parallel.check_batch_size(config.batch_size, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh)
    num_train = len(train_src)
    total_steps = config_lib.steps(config, num_train)

    teacher = None
    # distill.teacher_mode cache/service: the soft labels arrive with the batches (titans.teachers);
    # the cache's manifest and the service's workers are checked here, before the first step.
    soft_labels = teachers.open_soft_labels(config, info, train_src)
    if config.distill.teacher_workdir and soft_labels is None:
        teacher, _ = load_teacher(config.distill.teacher_workdir, info, dtype=dtype, step=config.distill.teacher_step)
        teacher = parallel.replicate(teacher, mesh)

    if hook is not None and hook.build_model is not None:
        model = hook.build_model(config, info, config.seed, dtype, num_outputs(config, info))
    else:
        model = build_model(config.model, info, seed=config.seed, dtype=dtype, outputs=num_outputs(config, info))
    frozen = parallel.replicate(hook.frozen, mesh) if hook is not None and hook.frozen is not None else None
    graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
    tx, schedule = make_optimizer(config, total_steps, num_train)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=model_state,
                       opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(config.seed)),
                       nonfinite_step=jnp.full((), -1, jnp.int32))
    state = parallel.replicate(state, mesh)
    loader = data_lib.TrainLoader(train_src, info, global_batch_size=config.batch_size, seed=config.seed,
                                  process_index=jax.process_index(), process_count=jax.process_count(),
                                  augment=config.dataset.augment,
                                  with_index=(hook is not None and hook.needs_index)
                                  or (soft_labels is not None and soft_labels.needs_index))
    if soft_labels is not None:
        loader = soft_labels.wrap(loader)

    ckpt = ckpt_lib.Checkpointer(workdir, keep=config.checkpoint.keep, async_save=config.checkpoint.async_save)
    meta = ckpt_lib.meta_for(config, info, num_outputs(config, info))
    saved = ckpt.all_steps()
    if saved:
        step = saved[-1] if config.checkpoint.restore_step < 0 else config.checkpoint.restore_step
        if step not in saved:
            raise ckpt_lib.CheckpointError(f"checkpoint.restore_step={step} is not saved in {ckpt.directory}; "
                                           f"saved steps: {saved}.")
        model_vars, train_vars, loader_state = ckpt.restore(
            step, model_like=_model_vars(state), train_like=_train_vars(state), expected_meta=meta)
        state = _with_vars(state, model_vars, train_vars)
        state = parallel.replicate(state, mesh)
        loader.set_state(loader_state)
        logging.info("Resumed from step %d of %s", step, ckpt.directory)
        if writer_proc:
            print(f"[{config.name}] resumed from checkpoint step {step}", flush=True)
    if writer_proc:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    train_step = jax.jit(make_train_step(graphdef, tx, make_loss_fn(config), info, dtype, schedule, hook),
                         donate_argnums=(0,))
    eval_step = jax.jit(make_eval_step(graphdef, info, dtype, config.ece_bins, hook))
    writer = logs.MetricWriter(workdir, enabled=writer_proc)
    start = int(jax.device_get(state.step))
    progress = logs.Progress(total_steps, config.batch_size, config.name, enabled=writer_proc)
    pending: list[dict] = []
    preempted = False
    t_start = time.perf_counter()
    trace_dir = os.path.join(workdir, "profile")

    def save(step):
        _check_finite(state, ckpt)
        ckpt.save(step, model=_model_vars(state), train=_train_vars(state), loader=loader.get_state(), meta=meta)

    with PreemptionGuard() as guard, (soft_labels or contextlib.nullcontext()):
        for step in range(start, total_steps):
            profiling = config.profile.start_step >= 0
            if profiling and step == config.profile.start_step:
                jax.profiler.start_trace(trace_dir)
            batch = parallel.to_global(next(loader), mesh)
            state, metrics = train_step(state, batch, teacher, frozen)
            pending.append(metrics)
            done = step + 1
            if profiling and done == config.profile.start_step + config.profile.num_steps:
                jax.block_until_ready(state)
                jax.profiler.stop_trace()
            if step == start:
                jax.block_until_ready(state)
                progress.start(done)  # leave compilation out of the throughput
            if done % config.log_every_steps == 0 or done == total_steps:
                _check_finite(state, ckpt)
                avg = {k: float(np.mean([jax.device_get(m[k]) for m in pending])) for k in pending[0]}
                pending.clear()
                writer.write(done, avg, prefix="train/")
                progress.update(done, avg)
            if config.eval_every_steps and done % config.eval_every_steps == 0 and done < total_steps:
                ev = evaluate(eval_step, state.params, state.model_state, teacher, eval_src, info,
                              batch_size=config.eval_batch_size, mesh=mesh, frozen=frozen)
                writer.write(done, ev, prefix="eval/")
            if done % config.checkpoint.every_steps == 0 and done < total_steps:
                save(done)
            # Multi-process runs agree on stopping only at log steps, where all processes meet anyway.
            check_now = jax.process_count() == 1 or done % config.log_every_steps == 0
            if check_now and guard.agreed():
                save(done)
                preempted = True
                break
        if not preempted and total_steps > start:
            save(total_steps)
    ckpt.wait()
    train_time = time.perf_counter() - t_start

    if preempted:
        ckpt.close()
        writer.close()
        if writer_proc:
            print(f"[{config.name}] stopped by SIGTERM at step {done}; checkpoint saved. "
                  f"Rerun the same command to resume.", flush=True)
        return {"preempted": True, "step": done}

    result = evaluate(eval_step, state.params, state.model_state, teacher, eval_src, info,
                      batch_size=config.eval_batch_size, mesh=mesh, frozen=frozen)
    result.update({
        "name": config.name,
        "model": config.model.name,
        "dataset": config.dataset.name,
        "split": config.dataset.eval_split,
        "steps": total_steps,
        "train_time_s": train_time,
        "train_examples_per_s": progress.examples_per_s,
        "flops_per_example": models.flops_per_example(nnx.merge(graphdef, state.params, state.model_state),
                                                      tuple(info.image_shape)),
        "param_count": models.param_count(model),
        "preempted": False,
    })
    if soft_labels is not None:
        result["teacher_workdir"] = config.distill.teacher_workdir
        result["objective"] = config.distill.objective
        result["teacher_mode"] = config.distill.teacher_mode
    if teacher is not None:
        result["teacher_mode"] = "online"
        result["teacher_workdir"] = config.distill.teacher_workdir
        result["objective"] = config.distill.objective
        result["teacher_flops_per_example"] = models.flops_per_example(
            nnx.merge(teacher.graphdef, teacher.params, teacher.model_state), tuple(info.image_shape))
    writer.write(total_steps, {k: v for k, v in result.items() if isinstance(v, (int, float))}, prefix="final/")
    writer.close()
    ckpt.close()
    if writer_proc:
        with open(os.path.join(workdir, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
    return result


def _model_vars(state: TrainState) -> dict:
    return {"params": nnx.to_pure_dict(state.params), "rest": nnx.to_pure_dict(state.model_state)}


def _train_vars(state: TrainState) -> dict:
    return {"step": state.step, "opt_state": state.opt_state, "rng": state.rng, "nonfinite_step": state.nonfinite_step}


def _with_vars(state: TrainState, model_vars: dict, train_vars: dict) -> TrainState:
    params = jax.tree.map(lambda x: x, state.params)
    rest = jax.tree.map(lambda x: x, state.model_state)
    nnx.replace_by_pure_dict(params, model_vars["params"])
    nnx.replace_by_pure_dict(rest, model_vars["rest"])
    return state.replace(params=params, model_state=rest, step=train_vars["step"],
                         opt_state=train_vars["opt_state"], rng=train_vars["rng"],
                         nonfinite_step=train_vars["nonfinite_step"])

