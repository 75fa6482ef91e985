"""The active-distillation student: a Method on the shared trainer, retrained from scratch each round.

Its loss is cross-entropy on labelled rows and the distillation loss (student.distill.loss,
temperature) against the bought teacher logits on bought rows. The per-row tables (has a label?
bought logits) have a fixed size (`capacity`), so every round reuses one compiled step; the data is
an in-memory subset fed through the trainer's own `TrainLoader` and `fit` loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from titans import config as config_lib
from titans import data as data_lib
from titans import losses, models, parallel, runs
from titans.train import Method, TrainState, evaluate, fit, make_eval_step, make_optimizer, make_train_step, resolve


def _probs_and_features(model: runs.FrozenModel, images):
    """(softmax probabilities, `features` embeddings) of raw images: what the selections read."""
    logits, acts = model.module()(model.normalize(images), train=False, capture=True)
    return jax.nn.softmax(logits.astype(jnp.float32)), acts["features"].astype(jnp.float32)


def student_method(student_cfg) -> Method:
    """CE on labelled rows, distillation against frozen["soft"] on bought rows (frozen["has_label"])."""
    d = student_cfg.distill
    if d.loss not in ("kd", "hard"):
        raise config_lib.ConfigError(f"student.distill.loss={d.loss!r}: the active loop supports 'kd' and 'hard'.")

    def loss(logits, aux, teacher_logits, batch, frozen, step):
        del aux, teacher_logits, step
        idx = batch["index"]
        ce = losses.cross_entropy(logits, batch["label"], student_cfg.label_smoothing)
        soft = frozen["soft"][idx]
        kd = (
            losses.kd_divergence(logits, soft, d.temperature)
            if d.loss == "kd"
            else losses.hard_distillation(logits, soft)
        )
        return jnp.where(frozen["has_label"][idx], ce, kd), jnp.ones(idx.shape, jnp.float32)

    return Method(loss=loss, needs_index=True)


class StudentTrainer:
    """Trains a fresh student on labelled rows (cross-entropy) + bought rows (distillation) with the
    trainer's jitted step and `fit`; one compilation for all rounds (the per-row tables have a fixed size)."""

    def __init__(self, student_cfg, info, capacity: int):
        self.cfg, self.info, self.capacity = student_cfg, info, capacity
        self.mesh = parallel.make_mesh()
        parallel.check_batch_size(student_cfg.batch_size, self.mesh)
        self.dtype = runs.compute_dtype(student_cfg.dtype)
        self.method = resolve(student_method(student_cfg), student_cfg)
        self.graphdef = TrainState.create(self._model(0), make_optimizer(student_cfg, 1, 1)[0])[0]
        self._steps: dict[int, tuple] = {}
        self.eval_step = jax.jit(make_eval_step(self.graphdef, info, self.dtype, student_cfg.ece_bins, self.method))

    def _model(self, seed: int):
        return models.build_model(self.cfg.model, self.info, seed=seed, dtype=self.dtype)

    def _step_fn(self, total_steps: int, num_examples: int):
        if total_steps not in self._steps:
            tx, schedule = make_optimizer(self.cfg, total_steps, num_examples)
            step = jax.jit(
                make_train_step(self.graphdef, tx, self.method, self.info, self.dtype, schedule), donate_argnums=(0,)
            )
            self._steps[total_steps] = (tx, step)
        return self._steps[total_steps]

    def _frozen(self, has_label, soft):
        n, k = len(has_label), self.info.num_classes
        frozen = {"has_label": np.zeros(self.capacity, bool), "soft": np.zeros((self.capacity, k), np.float32)}
        frozen["has_label"][:n] = has_label
        frozen["soft"][:n] = soft
        return parallel.replicate(jax.tree.map(jnp.asarray, frozen), self.mesh)

    def train(self, images, labels, has_label, soft, seed: int):
        """Returns the student's (params, rest) after training on these rows from scratch."""
        n = len(images)
        if n > self.capacity:
            raise ValueError(f"{n} training rows exceed the capacity {self.capacity}.")
        total = config_lib.steps(self.cfg, n)
        tx, step = self._step_fn(total, n)
        state = parallel.replicate(TrainState.create(self._model(seed), tx)[1], self.mesh)
        src = data_lib.ArraySource(images, labels)
        with data_lib.TrainLoader(
            src,
            self.info,
            global_batch_size=self.cfg.batch_size,
            seed=seed,
            augment=self.cfg.dataset.augment,
            augmentation=self.cfg.dataset.augmentation or None,
            with_index=True,
            group_by_length=self.cfg.dataset.group_by_length,
        ) as loader:
            fitted = fit(
                state,
                step,
                loader,
                self.cfg,
                total_steps=total,
                mesh=self.mesh,
                step_args=(None, self._frozen(has_label, soft)),
                verbose=False,
            )
        return jax.device_get(fitted.state.params), jax.device_get(fitted.state.model_state)

    def evaluate(self, params, rest, test_src) -> dict:
        return evaluate(
            self.eval_step, params, rest, None, test_src, self.info, batch_size=self.cfg.eval_batch_size, mesh=self.mesh
        )

    def predict(self, params, rest, images, batch: int):
        """(softmax probabilities, `features` embeddings) over `images`."""
        model = runs.FrozenModel(self.graphdef, params, rest, tuple(self.info.mean), tuple(self.info.std))
        return runs.predict(_probs_and_features, model, images, batch_size=batch, mesh=self.mesh)

    def abstract_variables(self):
        state = TrainState.create(self._model(0), make_optimizer(self.cfg, 1, 1)[0])[1]
        return (*state.model_vars().values(), state.params, state.model_state)
