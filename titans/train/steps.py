"""The pure train and eval steps, and evaluation over a split.

The train step is a pure function of arrays, jitted once over the mesh: the batch is sharded along
`data`, the model's variables and optimizer state are replicated, and the state's buffers are
donated. A teacher enters the step as a separate, replicated argument: the optimizer is built over
the student's parameters only, the teacher's logits pass through `stop_gradient`, and the teacher is
never written into the student's checkpoint. So a teacher is frozen by construction.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from titans import data as data_lib
from titans import losses, parallel
from titans.runs import FrozenModel
from titans.train.method import Method
from titans.train.state import TrainState


def _teacher_logits(batch, teacher: FrozenModel | None, images):
    if "teacher_logits" in batch:  # soft labels from a cache or the teacher service (titans.teachers)
        return batch["teacher_logits"]
    return teacher.apply(images) if teacher is not None else None


def _numbers(tree):
    """The floating-point leaves of a state as float32 (BatchNorm statistics); PRNG keys and integer counters
    (a dropout stream's state) are left out of the finiteness check, which they cannot fail."""
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return [x.astype(jnp.float32) for x in leaves]


def _keep_if_finite(finite, new, old):
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def make_train_step(graphdef, tx, method: Method, info, dtype, schedule):
    """train_step(state, batch, teacher, frozen) -> (state, metrics); pure, to be jitted.

    `method` must be resolved (`titans.train.method.resolve`); `frozen` is its `frozen` arrays.
    """
    num_classes = info.num_classes

    def train_step(state: TrainState, batch, teacher: FrozenModel | None, frozen=None):
        images = data_lib.normalize(batch["image"], info, dtype)
        labels = batch["label"]
        teacher_logits = _teacher_logits(batch, teacher, images)

        def objective(params):
            model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, state.model_state))
            logits, aux = method.forward(model, images, frozen, True)
            per_example, weights = method.loss(logits, aux, teacher_logits, batch, frozen, state.step)
            loss = jnp.sum(weights * per_example) / jnp.maximum(jnp.sum(weights), 1e-12)
            return loss, (logits, aux, nnx.state(model, nnx.Not(nnx.Param)))

        (loss, (logits, aux, model_state)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm = optax.tree.norm(grads)
        # The update itself must be finite too: a finite loss and gradient can still overflow the
        # parameters (a huge learning rate), and such a state must never reach a checkpoint.
        new_norm = optax.tree.norm(params) + optax.tree.norm(_numbers(model_state))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(new_norm) & (state.nonfinite_step < 0)
        new_state = state.replace(
            step=state.step + 1,
            params=_keep_if_finite(finite, params, state.params),
            model_state=_keep_if_finite(finite, model_state, state.model_state),
            opt_state=_keep_if_finite(finite, opt_state, state.opt_state),
            nonfinite_step=jnp.where(finite | (state.nonfinite_step >= 0), state.nonfinite_step, state.step),
        )
        metrics = {"loss": loss, "grad_norm": grad_norm, "learning_rate": schedule(state.step)}
        if method.metrics is not None:
            metrics.update(method.metrics(logits, aux, batch))
            return new_state, metrics
        logits = logits[:, :num_classes]  # drop a "defer" output
        metrics["accuracy"] = jnp.mean(jnp.argmax(logits, -1) == labels)
        if teacher_logits is not None:
            metrics["teacher_agreement"] = jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, info, dtype, num_bins: int, method: Method):
    """eval_step(params, model_state, batch, teacher, frozen) -> sums over the batch's real rows."""

    def eval_step(params, model_state, batch, teacher: FrozenModel | None, frozen=None):
        images = data_lib.normalize(batch["image"], info, dtype)
        labels, mask = batch["label"], batch["mask"]
        model = nnx.merge(graphdef, params, jax.tree.map(lambda x: x, model_state))
        if method.eval_sums is not None:
            return method.eval_sums(model, images, batch, frozen)
        logits = method.forward(model, images, frozen, False)[0]
        logits = logits.astype(jnp.float32)[:, : info.num_classes]  # drop a "defer" output
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


def evaluate(
    eval_step, params, model_state, teacher, src, info, *, batch_size: int, mesh, frozen=None, summary=None
) -> dict:
    """Accuracy, loss, ECE (and agreement with the teacher) over a whole split, on every process; or
    `summary(totals)` of the eval step's sums, for a method with its own evaluation (`Method.eval_summary`)."""
    totals = None
    for batch in data_lib.eval_batches(
        src,
        info,
        global_batch_size=batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        by_length=True,  # only sums are kept: text rows sorted by length run at short buckets
    ):
        sums = eval_step(params, model_state, parallel.to_global(batch, mesh), teacher, frozen)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    totals = jax.device_get(totals)
    if summary is not None:
        return summary(totals)
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
