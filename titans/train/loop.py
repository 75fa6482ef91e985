"""`fit`: the training loop every method runs, with logging, evaluation, checkpoints, preemption,
a NaN guard and the profiler. A method brings its own step function and loader; nothing else.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from titans import checkpoint as ckpt_lib
from titans import logs, parallel, paths
from titans.train.state import TrainState


class NonFiniteLossError(FloatingPointError):
    """The loss or the gradients stopped being finite; the run stopped, the last good checkpoint kept."""


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
        if self.requested:  # a second SIGTERM (an impatient scheduler): the save under way still finishes
            logging.warning("SIGTERM received again: the checkpoint is being saved; stopping once it is on disk.")
            return
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
        flags = parallel.process_allgather(np.array([self.requested]))
        return bool(np.any(flags))


def check_finite(state: TrainState, ckpt: ckpt_lib.Checkpointer | None) -> None:
    """Raises NonFiniteLossError (naming the last good checkpoint) once a step was not finite."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad < 0:
        return
    last = None
    if ckpt is not None:
        ckpt.wait()
        last = ckpt.latest_step()
    kept = (
        f"the last good checkpoint (step {last}) is kept in {ckpt.directory}"
        if last is not None
        else "no checkpoint had been saved yet"
    )
    raise NonFiniteLossError(
        f"The loss or gradient became NaN/inf at step {bad}; the run stopped and {kept}. "
        f"Lower the learning rate or enable optimizer.grad_clip_norm."
    )


@dataclasses.dataclass
class Checkpointing:
    """Where `fit` saves: a run's checkpointer, the meta that identifies it, and every how many steps."""

    ckpt: ckpt_lib.Checkpointer
    meta: dict
    every_steps: int
    prior_time_s: float = 0.0  # training time of earlier segments of this run (from the checkpoint)
    last_saved: int = -1
    started: float = dataclasses.field(default_factory=time.perf_counter)
    lock: Any = None  # the workdir's WorkdirLock: its holder file is re-checked at each save

    def save(self, step: int, state: TrainState, loader) -> None:
        if step == self.last_saved:  # a SIGTERM right after a periodic save: that save is the one
            return
        check_finite(state, self.ckpt)
        if self.lock is not None:
            self.lock.check()
        self.last_saved = step
        progress = {"step": step, "train_time_s": self.prior_time_s + time.perf_counter() - self.started}
        self.ckpt.save(
            step,
            model=state.model_vars(),
            train=state.train_vars(),
            loader=loader.get_state(),
            meta={**self.meta, "progress": progress},
        )


class _Profiler:
    """A profiler trace of `num_steps` steps from `start_step` (-1 = off), written to `trace_dir`."""

    def __init__(self, profile, trace_dir: str | None):
        self.start = profile.start_step if profile is not None and trace_dir else -1
        self.stop = self.start + (profile.num_steps if profile is not None else 0)
        self.trace_dir = trace_dir

    def before(self, step: int) -> None:
        if self.start >= 0 and step == self.start:
            jax.profiler.start_trace(self.trace_dir)

    def after(self, done: int, state) -> None:
        if self.start >= 0 and done == self.stop:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()


@dataclasses.dataclass
class FitResult:
    state: TrainState
    step: int  # the last step taken
    preempted: bool
    train_time_s: float
    examples_per_s: float  # over the whole call, compilation of the first step left out


@dataclasses.dataclass
class _Logger:
    """Averages step metrics between log steps; writes them and the progress line."""

    config: Any
    writer: logs.MetricWriter | None
    progress: logs.Progress
    pending: list = dataclasses.field(default_factory=list)

    def log(self, done: int, metrics: dict, state, ckpt) -> None:
        self.pending.append(metrics)
        if done % self.config.log_every_steps and done != self.progress.total:
            return
        check_finite(state, ckpt)
        avg = {k: float(np.mean([jax.device_get(m[k]) for m in self.pending])) for k in self.pending[0]}
        self.pending.clear()
        if self.writer is not None:
            self.writer.write(done, avg, prefix="train/")
        self.progress.update(done, avg)


def fit(
    state: TrainState,
    train_step: Callable,
    loader,
    config,
    *,
    total_steps: int,
    mesh,
    step_args=(),
    checkpointing: Checkpointing | None = None,
    writer: logs.MetricWriter | None = None,
    evaluate: Callable[[TrainState], dict] | None = None,
    workdir: str | None = None,
    verbose: bool = True,
) -> FitResult:
    """Runs `train_step(state, batch, *step_args)` from `state.step` to `total_steps` over `loader`.

    Uses the run config's log_every_steps, eval_every_steps and profile sections. Metrics are
    averaged over each log interval and written by `writer`; `evaluate(state)` runs every
    eval_every_steps (not at the end: the caller evaluates the final state); with `checkpointing`
    the state and the loader's position are saved every `every_steps`, at the end and on SIGTERM,
    after which `fit` returns with `preempted=True`. A non-finite step raises NonFiniteLossError at
    the next log step or save, whichever comes first, with nothing non-finite saved.
    """
    start = int(jax.device_get(state.step))
    ckpt = checkpointing.ckpt if checkpointing is not None else None
    logger = _Logger(config, writer, logs.Progress(total_steps, config.batch_size, config.name, enabled=verbose))
    profiler = _Profiler(config.get("profile"), paths.join(workdir, "profile") if workdir else None)
    done, preempted, t_first = start, False, None
    t0 = time.perf_counter()
    with PreemptionGuard() as guard:
        for step in range(start, total_steps):
            profiler.before(step)
            state, metrics = train_step(state, parallel.to_global(next(loader), mesh), *step_args)
            done = step + 1
            profiler.after(done, state)
            if step == start:
                jax.block_until_ready(state)
                t_first = time.perf_counter()
                logger.progress.start(done)  # leave compilation out of the throughput
            logger.log(done, metrics, state, ckpt)
            if (
                evaluate is not None
                and config.eval_every_steps
                and done % config.eval_every_steps == 0
                and done < total_steps
            ):
                ev = evaluate(state)
                if writer is not None:
                    writer.write(done, ev, prefix="eval/")
            if checkpointing is not None and done % checkpointing.every_steps == 0 and done < total_steps:
                checkpointing.save(done, state, loader)
            # Multi-process runs agree on stopping only at log steps, where all processes meet anyway.
            if (jax.process_count() == 1 or done % config.log_every_steps == 0) and guard.agreed():
                preempted = True
                break
        if checkpointing is not None and total_steps > start:
            checkpointing.save(done, state, loader)
        if ckpt is not None:
            ckpt.wait()  # inside the guard: a second SIGTERM must not kill the process mid-save
    t_end = time.perf_counter()
    rate = config.batch_size * (done - start - 1) / (t_end - t_first) if t_first and done - start > 1 else float("nan")
    return FitResult(state, done, preempted, t_end - t0, rate)
