"""Training: the train state, the pure steps, the `fit` loop and `train_and_evaluate`.

    state.py    TrainState: create, and its checkpoint items
    optim.py    make_optimizer (optax + schedule) from the run config
    method.py   Method: the plug-in interface every distillation method uses; the config's objectives
    steps.py    make_train_step / make_eval_step (pure, jitted once over the mesh), evaluate
    loop.py     fit: steps, logging, evaluation, checkpoints, preemption, NaN guard, profiler
    trainer.py  train_and_evaluate(config, workdir, method=None): set-up + fit + report

Training sits above data, models, checkpoints, model loading (titans.runs) and soft-label sources
(titans.teachers), and below the methods (cascade, ensemble, active) that plug into it.
"""

from titans.train.loop import Checkpointing, FitResult, NonFiniteLossError, PreemptionGuard, check_finite, fit
from titans.train.method import Method, objective_loss, objective_method, resolve
from titans.train.optim import make_optimizer
from titans.train.state import TrainState
from titans.train.steps import evaluate, make_eval_step, make_train_step
from titans.train.trainer import ensure_trained, train_and_evaluate

__all__ = [
    "Checkpointing",
    "FitResult",
    "Method",
    "NonFiniteLossError",
    "PreemptionGuard",
    "TrainState",
    "check_finite",
    "ensure_trained",
    "evaluate",
    "fit",
    "make_eval_step",
    "make_optimizer",
    "make_train_step",
    "objective_loss",
    "objective_method",
    "resolve",
    "train_and_evaluate",
]
