"""The method plug-in interface: what a distillation method changes in a training run.

A `Method` is the whole contract between the trainer and a method. The trainer owns the loop, the
state, the optimizer, the data order, checkpoints, logging and evaluation; a method supplies only the
parts that differ. Every field has a default, and `objective_method(config)` is the method that
teachers (cross-entropy) and plain students use: the objective the run config's `distill.objective`
names in `titans.losses.OBJECTIVES` (Hinton KD, hard KD, easy-weighted KD, flattened KD, learning to
defer, or one a plug-in registers):

    build_model  (config, info, seed, dtype, outputs) -> the nnx.Module to train
                 (default: the config's `model` section);
    frozen       a pytree of arrays passed, replicated, into every train and eval step as an
                 argument, never trained and never saved (earlier ensemble members, weight tables);
    forward      (model, images, frozen, train) -> (logits, aux): what the loss, the metrics and the
                 evaluation see, plus any pytree `aux` the loss needs (default: model(images));
    loss         (logits, aux, teacher_logits, batch, frozen, step) -> (per-example loss, weights);
                 the batch objective is sum(weights * loss) / sum(weights);
    needs_index  the loader puts each row's index into the train split in batch["index"].

B-DISTIL members (titans/ensemble/runner.py) and active-distillation students
(titans/active/student.py) are Methods; docs/architecture.md has a worked example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from titans import losses, models, runs


@dataclasses.dataclass(frozen=True)
class Method:
    frozen: Any = None
    build_model: Callable | None = None
    forward: Callable | None = None
    loss: Callable | None = None
    needs_index: bool = False


def default_forward(model, images, frozen, train: bool):
    del frozen
    return model(images, train=train), None


def default_build_model(config, info, seed: int, dtype, outputs: int):
    return models.build_model(config.model, info, seed=seed, dtype=dtype, outputs=outputs)


def objective_loss(config) -> Callable:
    """The run config's objective (`distill.objective`, looked up in `losses.OBJECTIVES`) as a Method loss."""
    objective = losses.objective(config)

    def loss(logits, aux, teacher_logits, batch, frozen, step):
        del aux, frozen
        return objective.loss(logits, teacher_logits, batch["label"], step)

    return loss


def objective_method(config) -> Method:
    return Method(loss=objective_loss(config))


def resolve(method: Method | None, config) -> Method:
    """`method` with every unset field filled by the run config's defaults."""
    method = method or Method()
    return dataclasses.replace(
        method,
        build_model=method.build_model or default_build_model,
        forward=method.forward or default_forward,
        loss=method.loss or objective_loss(config),
    )


def build(method: Method, config, info, dtype):
    """The model `method` trains for `config`, seeded by config.seed."""
    return method.build_model(config, info, config.seed, dtype, runs.num_outputs(config, info))
