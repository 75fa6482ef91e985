"""Losses and calibration metrics: pure functions of arrays, per example, in float32.

Every loss returns one value per example, so that callers can weight examples (the cascade's
easy-focused objectives do) before averaging. Teacher logits are passed through `stop_gradient`
here as well as by the trainer: a loss never trains the teacher, whoever calls it.

`OBJECTIVES` is the registry of student objectives a run config selects by name (`distill.objective`):
each is one `Objective` class holding its loss, its extra outputs and its config checks.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp

from titans import config as config_lib


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """Per-example softmax cross-entropy against integer labels, with optional label smoothing."""
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    logp = jax.nn.log_softmax(logits)
    target = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        target = target * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -jnp.sum(target * logp, axis=-1)


def kd_divergence(student_logits: jax.Array, teacher_logits: jax.Array, temperature: float) -> jax.Array:
    """Hinton et al. (2015): T^2 * KL(softmax(teacher/T) || softmax(student/T)), per example.

    The T^2 factor keeps the gradient scale of the soft term independent of T.
    """
    t = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    s = student_logits.astype(jnp.float32) / temperature
    log_pt = jax.nn.log_softmax(t)
    log_ps = jax.nn.log_softmax(s)
    kl = jnp.sum(jnp.exp(log_pt) * (log_pt - log_ps), axis=-1)
    return (temperature**2) * kl


def hard_distillation(student_logits: jax.Array, teacher_logits: jax.Array) -> jax.Array:
    """Cross-entropy against the teacher's argmax (hard-label distillation), per example."""
    return cross_entropy(student_logits, jnp.argmax(jax.lax.stop_gradient(teacher_logits), axis=-1))


def distillation_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    kind: str = "kd",
    alpha: float = 0.9,
    temperature: float = 4.0,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """alpha * distillation term + (1 - alpha) * cross-entropy on the true labels, per example."""
    if kind == "kd":
        soft = kd_divergence(student_logits, teacher_logits, temperature)
    elif kind == "hard":
        soft = hard_distillation(student_logits, teacher_logits)
    else:
        raise ValueError(f"Unknown distillation loss '{kind}' (expected 'kd' or 'hard').")
    if alpha == 1.0:
        return soft
    return alpha * soft + (1.0 - alpha) * cross_entropy(student_logits, labels, label_smoothing)


def calibration_bins(logits: jax.Array, labels: jax.Array, mask: jax.Array, num_bins: int):
    """Per-bin (count, sum of confidence, sum of correctness) of the max-softmax confidence.

    Summable over batches and devices; `expected_calibration_error` turns the totals into ECE.
    Bins are [0, 1/n), ..., [(n-1)/n, 1].
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32))
    conf = jnp.max(probs, axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == labels).astype(jnp.float32)
    idx = jnp.clip(jnp.floor(conf * num_bins).astype(jnp.int32), 0, num_bins - 1)
    onehot = jax.nn.one_hot(idx, num_bins) * mask.astype(jnp.float32)[:, None]
    return jnp.stack([onehot.sum(0), (onehot * conf[:, None]).sum(0), (onehot * correct[:, None]).sum(0)])


def expected_calibration_error(bins) -> float:
    """ECE = sum_b (n_b / N) |acc_b - conf_b| from the totals of `calibration_bins`."""
    count, conf_sum, correct_sum = (jnp.asarray(b) for b in bins)
    total = jnp.maximum(count.sum(), 1.0)
    return float(jnp.sum(jnp.abs(correct_sum - conf_sum)) / total)


# --- Cascade objectives ("When in Doubt, Summon the Titans"): the student aims at the easy part. ---

EASY_RULES = ("confidence", "margin", "correctness", "agreement")


def easy_weights(
    teacher_logits, labels, student_logits, *, rule: str, sharpness: float = 1.0, floor: float = 0.0
) -> jax.Array:
    """Per-example weights that concentrate the student's loss on examples it can get right.

    An "easiness" score s in [0, 1] comes from the teacher (no gradient flows through it):
      confidence   the teacher's max softmax probability,
      margin       the gap between the teacher's top two probabilities,
      correctness  the teacher's probability of the true label (needs labelled data),
      agreement    the student's own probability of the teacher's top class (meaningful after a
                   warm-up; the trainer uses weight 1 before `easy.warmup_steps`).
    weight = floor + (1 - floor) * s ** sharpness. sharpness 0 gives standard distillation; larger
    values push the weight further onto the easy examples; floor keeps some signal on the hard ones.
    """
    t = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32))
    if rule == "confidence":
        s = t.max(-1)
    elif rule == "margin":
        top2 = jax.lax.top_k(t, 2)[0]
        s = top2[:, 0] - top2[:, 1]
    elif rule == "correctness":
        s = jnp.take_along_axis(t, labels[:, None], axis=-1)[:, 0]
    elif rule == "agreement":
        p_s = jax.nn.softmax(jax.lax.stop_gradient(student_logits).astype(jnp.float32))
        s = jnp.take_along_axis(p_s, jnp.argmax(t, -1)[:, None], axis=-1)[:, 0]
    else:
        raise ValueError(f"Unknown easy-weighting rule '{rule}'; expected one of {EASY_RULES}.")
    return floor + (1.0 - floor) * jnp.power(s, sharpness)


def defer_surrogate(
    logits,
    teacher_logits,
    labels,
    *,
    alpha: float = 0.9,
    defer_weight: float = 1.0,
    temperature: float = 1.0,
    defer_cost: float = 0.0,
) -> jax.Array:
    """Learning-to-defer loss for a student with C + 1 outputs, the last one meaning "defer".

    The consistent cross-entropy surrogate of Mozannar & Sontag (ICML 2020),
        L = -log p_y - 1[expert correct] * log p_defer,
    with the teacher as the expert (our reading, docs/methods.md#cascades), distilled like the standard student:
        L = (1 - alpha) * (-log p_y) + alpha * T^2 * KL(softmax(g / T) || softmax(s_{1..C} / T))
            - defer_weight * max(t_y - c, 0) * log p_defer,
    where p = softmax over all C + 1 outputs (temperature 1: the deferral rule "defer iff
    p_defer > max_k p_k" reads it), the KL term is the standard student's Hinton term on the C class
    outputs at the same temperature T (with T^2, so the two objectives are compared on equal terms),
    t_y is the teacher's probability of the true label (a soft "the expert is right"), and c
    (`defer_cost`, in [0, 1]) is what one deferral costs: deferring is rewarded only by the teacher's
    advantage net of that cost (c = 0: the cost-free surrogate).
    """
    num_classes = logits.shape[-1] - 1
    logits = logits.astype(jnp.float32)
    logp = jax.nn.log_softmax(logits)
    t = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32))
    t_y = jnp.take_along_axis(t, labels[:, None], axis=-1)[:, 0]
    ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    kd = kd_divergence(logits[:, :num_classes], teacher_logits, temperature)
    defer = jnp.maximum(t_y - defer_cost, 0.0) * logp[:, num_classes]
    return (1.0 - alpha) * ce + alpha * kd - defer_weight * defer


def flattened_distillation(
    logits, teacher_logits, labels, hardness, *, alpha: float = 0.9, temperature: float = 4.0
) -> jax.Array:
    """Distillation that teaches the student to be *unsure* where the teacher finds an example hard.

    With h in [0, 1] the per-example hardness (no gradient), the soft target is the teacher's
    distribution flattened towards uniform, q = (1 - h) * softmax(g / T) + h / C, and the label term
    is switched off in proportion:
        L = alpha * T^2 * KL(q || softmax(s / T)) + (1 - alpha) * (1 - h) * (-log p_y).
    h = 0 is standard Hinton KD; h = 1 makes the uniform distribution the optimum, so a confidence
    gate (msp, margin, entropy) reads the student's low confidence there and defers. Down-weighting
    hard examples alone cannot do that: it only removes their signal.
    """
    num_classes = logits.shape[-1]
    h = jax.lax.stop_gradient(hardness).astype(jnp.float32)[:, None]
    t = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / temperature)
    q = (1.0 - h) * t + h / num_classes
    log_s = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature)
    kl = jnp.sum(jnp.where(q > 0, q * (jnp.log(jnp.where(q > 0, q, 1.0)) - log_s), 0.0), axis=-1)
    ce = -jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)), labels[:, None], axis=-1)[:, 0]
    return alpha * temperature**2 * kl + (1.0 - alpha) * (1.0 - h[:, 0]) * ce


# --- Objectives: what `distill.objective` selects, each defined (loss, outputs, checks) in one class. ---

OBJECTIVES = config_lib.Registry("objective", "distill.objective")


class Objective:
    """A student objective, selected by a run config's `distill.objective` and defined in one place:

        @losses.OBJECTIVES.register("my_objective")
        class MyObjective(losses.Objective):
            extra_outputs = 0        # outputs beyond the classes (learning to defer: 1)
            def validate(self, where): ...          # optional: super().validate(where), then own checks
            def loss(self, logits, teacher_logits, labels, step):
                return per_example_loss, per_example_weights

    An instance holds the run config (`self.config`, `self.distill`). The registry is read by the
    trainer's default Method loss (titans/train/method.py), by `runs.num_outputs` (the model's width)
    and by `config.validate` (the name, then `validate`). The trainer's batch objective is
    sum(weights * loss) / sum(weights); `logits` has `num_classes + extra_outputs` columns.
    """

    extra_outputs: ClassVar[int] = 0
    needs_teacher: ClassVar[bool] = True  # refused without distill.teacher_workdir

    def __init__(self, config):
        self.config = config
        self.distill = config.distill

    def validate(self, where: str) -> None:
        """Raises ConfigError where the run config cannot train this objective."""
        if self.needs_teacher and not self.distill.teacher_workdir:
            raise config_lib.ConfigError(
                f"{where}: distill.objective={self.distill.objective!r} needs a teacher (set distill.teacher_workdir)."
            )

    def loss(self, logits, teacher_logits, labels, step) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError(f"{type(self).__name__} defines no loss")

    def distillation(self, logits, teacher_logits, labels) -> jax.Array:
        """The config's distillation loss (`distill.loss`, alpha, temperature, label smoothing), per example."""
        d = self.distill
        return distillation_loss(
            logits,
            teacher_logits,
            labels,
            kind=d.loss,
            alpha=d.alpha,
            temperature=d.temperature,
            label_smoothing=self.config.label_smoothing,
        )

    def easiness(self, teacher_logits, labels, logits, floor: float) -> jax.Array:
        """`easy_weights` with the config's rule and sharpness (`distill.easy`)."""
        e = self.distill.easy
        return easy_weights(teacher_logits, labels, logits, rule=e.rule, sharpness=e.sharpness, floor=floor)


def objective(config, where: str = "the config") -> Objective:
    """The objective `config.distill.objective` names, for `config` (ConfigError with close matches if unknown)."""
    return OBJECTIVES.get(config.distill.get("objective", "standard"), where)(config)


def _check_objective(config, where: str) -> None:
    objective(config, where).validate(where)


config_lib.register_check(_check_objective)


@OBJECTIVES.register("standard")
class Standard(Objective):
    """Distillation (`distill.loss`: Hinton KD or hard KD) mixed with CE; CE alone for a run without a teacher."""

    needs_teacher = False

    def loss(self, logits, teacher_logits, labels, step):
        ones = jnp.ones(labels.shape, jnp.float32)
        if teacher_logits is None:
            return cross_entropy(logits, labels, self.config.label_smoothing), ones
        return self.distillation(logits, teacher_logits, labels), ones


@OBJECTIVES.register("easy_weighted")
class EasyWeighted(Objective):
    """The standard distillation loss weighted by `easy_weights` (weight 1 before `easy.warmup_steps` for
    the "agreement" rule, whose easiness is the student's own)."""

    def loss(self, logits, teacher_logits, labels, step):
        e = self.distill.easy
        weights = self.easiness(teacher_logits, labels, logits, e.floor)
        if e.rule == "agreement" and e.warmup_steps:
            weights = jnp.where(step < e.warmup_steps, jnp.ones(labels.shape, jnp.float32), weights)
        return self.distillation(logits, teacher_logits, labels), weights


@OBJECTIVES.register("flatten")
class Flatten(Objective):
    """`flattened_distillation` with hardness 1 - easiness (the config's rule, no floor)."""

    def validate(self, where: str) -> None:
        super().validate(where)
        if self.distill.loss != "kd":
            raise config_lib.ConfigError(
                f"{where}: distill.objective='flatten' flattens soft targets; it needs distill.loss='kd'."
            )

    def loss(self, logits, teacher_logits, labels, step):
        d = self.distill
        hardness = 1.0 - self.easiness(teacher_logits, labels, logits, 0.0)
        per_example = flattened_distillation(
            logits, teacher_logits, labels, hardness, alpha=d.alpha, temperature=d.temperature
        )
        return per_example, jnp.ones(labels.shape, jnp.float32)


@OBJECTIVES.register("defer")
class Defer(Objective):
    """Learning to defer (`defer_surrogate`): the student has one more output, "defer"."""

    extra_outputs = 1

    def loss(self, logits, teacher_logits, labels, step):
        d = self.distill
        per_example = defer_surrogate(
            logits,
            teacher_logits,
            labels,
            alpha=d.alpha,
            defer_weight=d.defer_weight,
            temperature=d.temperature,
            defer_cost=d.defer_cost,
        )
        return per_example, jnp.ones(labels.shape, jnp.float32)


# --- Progressive ensemble distillation (B-DISTIL, docs/methods.md#b-distil): a member fits what the ensemble misses. ---


def log_barrier_extension(z: jax.Array, t: float) -> jax.Array:
    """A log barrier for the constraint z <= 0, relaxed so that it is defined everywhere.

    Kervadec et al. (2019)'s extension: -log(-z) / t while z <= -1/t**2, and beyond that the
    tangent line t*z - log(1/t**2)/t + 1/t, so an infeasible point (where a true barrier is
    +inf) gets a finite loss whose gradient pushes it towards feasibility. Larger t is closer to
    the hard constraint. Continuous with a continuous first derivative at z = -1/t**2.
    """
    z = jnp.asarray(z, jnp.float32)
    edge = -1.0 / t**2
    inside = -jnp.log(-jnp.minimum(z, edge)) / t
    outside = t * z - jnp.log(1.0 / t**2) / t + 1.0 / t
    return jnp.where(z <= edge, inside, outside)


def centred(logits: jax.Array) -> jax.Array:
    """Logits minus their mean over classes (softmax is blind to that shift)."""
    logits = logits.astype(jnp.float32)
    return logits - jnp.mean(logits, axis=-1, keepdims=True)


def boosting_residual_loss(
    ensemble_logits,
    teacher_logits,
    labels,
    *,
    pair_weights=None,
    kind: str = "kd",
    alpha: float = 0.9,
    temperature: float = 4.0,
) -> jax.Array:
    """How far the ensemble's summed logits F are from the teacher g, per example.

    Without `pair_weights`: the distillation loss of F (`distillation_loss`). With weights over
    example-class pairs (B, K): sum_k w_ik (centred(g) - centred(F))_k**2 / K, the weighted squared
    logit residual (the weight player then decides which classes of which examples matter).
    """
    if pair_weights is None:
        return distillation_loss(
            ensemble_logits, teacher_logits, labels, kind=kind, alpha=alpha, temperature=temperature
        )
    r = centred(jax.lax.stop_gradient(teacher_logits)) - centred(ensemble_logits)
    return jnp.mean(pair_weights * r**2, axis=-1)


def weak_learner_loss(
    ensemble_logits,
    previous_logits,
    teacher_logits,
    labels,
    *,
    pair_weights=None,
    example_weights=None,
    gamma: float = 0.05,
    barrier_weight: float = 0.1,
    barrier_t: float = 5.0,
    kind: str = "kd",
    alpha: float = 0.9,
    temperature: float = 4.0,
) -> jax.Array:
    """A new member's per-example objective: the residual loss of F_w = F_{w-1} + f_w, plus a
    log-barrier relaxation of the weak-learning condition on the batch as a whole.

    The condition asks the member to remove at least a fraction `gamma` of the (weighted) residual
    loss that F_{w-1} leaves (`previous_logits`, frozen), in aggregate, as the acceptance test of
    FIND-WL does:  sum_i w_i l_i(F_w) <= (1 - gamma) sum_i w_i l_i(F_{w-1}). Written scale-free as
        z = (sum_i w_i l_i(F_w) - (1 - gamma) sum_i w_i l_i(F_{w-1})) / sum_i w_i l_i(F_{w-1}) <= 0,
    it enters through `log_barrier_extension(z, barrier_t)` scaled by `barrier_weight` (0 turns it
    off), added to every row: the trainer's weighted mean of the rows is then the weighted residual
    loss plus the barrier of the batch's condition. `example_weights` are the weight player's weights
    over examples (the trainer applies them to the rows too); in example-class mode they are ones and
    `pair_weights` weight the residual inside l_i. Under data parallelism the sums run over the global
    batch.
    """
    loss = boosting_residual_loss(
        ensemble_logits,
        teacher_logits,
        labels,
        pair_weights=pair_weights,
        kind=kind,
        alpha=alpha,
        temperature=temperature,
    )
    if not barrier_weight:
        return loss
    before = jax.lax.stop_gradient(
        boosting_residual_loss(
            previous_logits,
            teacher_logits,
            labels,
            pair_weights=pair_weights,
            kind=kind,
            alpha=alpha,
            temperature=temperature,
        )
    )
    w = jnp.ones_like(loss) if example_weights is None else jnp.asarray(example_weights, jnp.float32)
    total_before = jnp.maximum(jnp.sum(w * before), 1e-6)
    z = (jnp.sum(w * loss) - (1.0 - gamma) * jnp.sum(w * before)) / total_before
    return loss + barrier_weight * log_barrier_extension(z, barrier_t)
