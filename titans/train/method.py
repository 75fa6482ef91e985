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
    metrics      (logits, aux, batch) -> {name: scalar}: the training metrics in place of accuracy against the
                 labels (a masked-LM run's logits are per token, titans/train/pretrain.py);
    eval_sums    (model, images, batch, frozen) -> {name: sum over the batch's real rows}, with "count", in place
                 of the classification sums; `eval_summary(totals)` turns the split's totals into the result.

`resolve` fills the config's objective in, after checking that an objective reading the teacher's
correctness gets held-out teacher outputs (`teachers.crossfit.check_held_out`); an objective that ranks the
whole training split (`row_inputs`, e.g. easy_budget) gets its per-row arrays as `frozen`, read at
batch["index"].

B-DISTIL members (titans/ensemble/runner.py) and active-distillation students
(titans/active/student.py) are Methods; docs/architecture.md has a worked example.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from titans import data as data_lib
from titans import losses, models, runs, teachers


@dataclasses.dataclass(frozen=True)
class Method:
    frozen: Any = None
    build_model: Callable | None = None
    forward: Callable | None = None
    loss: Callable | None = None
    needs_index: bool = False
    metrics: Callable | None = None
    eval_sums: Callable | None = None
    eval_summary: Callable | None = None


def default_forward(model, images, frozen, train: bool):
    del frozen
    return model(images, train=train), None


def default_build_model(config, info, seed: int, dtype, outputs: int):
    return models.build_model(config.model, info, seed=seed, dtype=dtype, outputs=outputs)


def objective_loss(config) -> Callable:
    """The run config's objective (`distill.objective`, looked up in `losses.OBJECTIVES`) as a Method loss.

    An objective with `row_inputs` reads its per-row arrays (`frozen`, from `objective_rows`) at the
    batch's row indices."""
    objective = losses.objective(config)

    if objective.row_inputs:

        def row_loss(logits, aux, teacher_logits, batch, frozen, step):
            del aux
            rows = {k: v[batch["index"]] for k, v in frozen.items()}
            return objective.loss(logits, teacher_logits, batch["label"], step, rows=rows)

        return row_loss

    def loss(logits, aux, teacher_logits, batch, frozen, step):
        del aux, frozen
        return objective.loss(logits, teacher_logits, batch["label"], step)

    return loss


def objective_rows(config, objective, info, train_src) -> dict[str, np.ndarray]:
    """The per-row arrays an objective with `row_inputs` ranks the training split by, computed once before
    training: the teacher's logits on every row (cross-fitted where `distill.crossfit_teachers` is set) and
    the reference run's (`distill.budget.reference_workdir`), in the split's order."""
    inputs = {}
    if "teacher" in objective.row_inputs and config.distill.teacher_workdir:
        inputs["teacher"] = teachers.crossfit.row_logits(config, info, train_src)
    reference = config.distill.get("budget", {}).get("reference_workdir", "")
    if "reference" in objective.row_inputs and reference:
        inputs["reference"] = teachers.crossfit.row_logits(config, info, train_src, workdir=reference)
    labels = np.asarray([int(e["label"]) for e in train_src.__getitems__(range(len(train_src)))])
    return objective.rows(labels, **inputs)


def objective_method(config) -> Method:
    return Method(loss=objective_loss(config))


def resolve(method: Method | None, config) -> Method:
    """`method` with every unset field filled by the run config's defaults."""
    method = method or Method()
    if method.loss is None and config.distill.teacher_workdir:
        method = _with_objective_checks(method, config)
    return dataclasses.replace(
        method,
        build_model=method.build_model or default_build_model,
        forward=method.forward or default_forward,
        loss=method.loss or objective_loss(config),
    )


def _with_objective_checks(method: Method, config) -> Method:
    """The config's objective checked against its teacher's rows (`teachers.crossfit.check_held_out`), and
    given its per-row arrays as frozen inputs when it ranks the training split."""
    objective = losses.objective(config)
    info = data_lib.dataset_info(config.dataset.name)
    teachers.crossfit.check_held_out(config, objective, info)
    if not objective.row_inputs:
        return method
    src = data_lib.get_source(config.dataset.name, config.dataset.train_split, data_dir=config.dataset.data_dir or None)
    return dataclasses.replace(method, frozen=objective_rows(config, objective, info, src), needs_index=True)


def build(method: Method, config, info, dtype):
    """The model `method` trains for `config`, seeded by config.seed."""
    return method.build_model(config, info, config.seed, dtype, runs.num_outputs(config, info))
