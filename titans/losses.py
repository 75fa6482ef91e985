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
import numpy as np

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
    teacher_logits,
    labels,
    student_logits,
    *,
    rule: str,
    sharpness: float = 1.0,
    floor: float = 0.0,
    strength: float = 1.0,
) -> jax.Array:
    """Per-example weights that concentrate the student's loss on examples it can get right.

    An "easiness" score s in [0, 1] comes from the teacher (no gradient flows through it):
      confidence   the teacher's max softmax probability,
      margin       the gap between the teacher's top two probabilities,
      correctness  the teacher's probability of the true label (needs labelled data),
      agreement    the student's own probability of the teacher's top class (meaningful after a
                   warm-up; the trainer uses weight 1 before `easy.warmup_steps`).
    weight = (floor + (1 - floor) * s ** sharpness) ** strength. sharpness 0 gives standard distillation;
    larger values push the weight further onto the easy examples; floor keeps some signal on the hard
    ones. `strength` (the strength sweep, `distill.easy.strength`) raises the whole weight, floor included,
    to a power: 1 is the weight above, larger values leave weight only where the teacher is sure (a teacher
    confident at 0.97 everywhere gives weights near 0.95 at strength 1 and 0.42 at strength 16).
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
    return jnp.power(floor + (1.0 - floor) * jnp.power(s, sharpness), strength)


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


def mozannar_sontag_defer(logits, teacher_logits, labels, *, defer_cost: float = 0.0) -> jax.Array:
    """The consistent learning-to-defer surrogate of Mozannar & Sontag (ICML 2020), with the teacher as
    the expert and the teacher's soft labels as the classifier's targets, per example:

        L = - sum_{k <= C} q_k log p_k  -  max(1[argmax g = y] - c, 0) * log p_defer,

    p = softmax over all C + 1 outputs (temperature 1, the scale the deferral rule
    "defer iff p_defer > max_k p_k" reads), q = softmax(g) the teacher's distribution over the C classes
    (their -log p_y with the label replaced by the teacher's soft label), 1[argmax g = y] the expert's
    correctness on the row (their 1[m = y]) and c (`distill.defer_cost`) the cost of one deferral. Both
    terms weigh 1, as in the surrogate: no extra factor on the classifier or the defer term, no T^2.
    The expert's correctness must come from a teacher that did not train on the row (cross-fitted
    teacher outputs, `distill.crossfit_teachers`), or it is 1 almost everywhere.
    """
    num_classes = logits.shape[-1] - 1
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    g = jax.lax.stop_gradient(teacher_logits).astype(jnp.float32)
    q = jax.nn.softmax(g)
    expert_right = (jnp.argmax(g, -1) == labels).astype(jnp.float32)
    classify = -jnp.sum(q * logp[:, :num_classes], axis=-1)
    return classify - jnp.maximum(expert_right - defer_cost, 0.0) * logp[:, num_classes]


# --- Budget-sized easy subsets: the hardest `rate` of the training rows are the teacher's. ---

HARDNESS_SCORES = ("teacher_loss", "student_loss", "teacher_right_student_wrong")
BUDGET_TREATMENTS = ("drop", "flatten", "defer")


def _np_cross_entropy(logits, labels) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -np.take_along_axis(logp, np.asarray(labels)[:, None], -1)[:, 0]


def hardness_scores(
    score: str, labels, teacher_logits=None, reference_logits=None, num_classes: int | None = None
) -> np.ndarray:
    """Per-row hardness over a whole training split (numpy, float64; higher = harder):

    teacher_loss                 the teacher's cross-entropy on the label;
    student_loss                 a reference standard-KD student's cross-entropy on the label (two
                                 passes: the reference run trained first, its logits on the rows);
    teacher_right_student_wrong  1 where the teacher's argmax is the label and the reference student's
                                 is not, else 0; ties are ordered by the teacher's advantage
                                 (student loss - teacher loss), squashed into [0, 0.5) so that it never
                                 outranks the indicator.
    """
    labels = np.asarray(labels)
    if score not in HARDNESS_SCORES:
        raise ValueError(f"Unknown hardness score {score!r}; expected one of {HARDNESS_SCORES}.")
    need_teacher = score != "student_loss"
    need_reference = score != "teacher_loss"
    if (need_teacher and teacher_logits is None) or (need_reference and reference_logits is None):
        raise ValueError(f"hardness score {score!r} needs the teacher's and/or the reference student's logits")
    if score == "teacher_loss":
        return _np_cross_entropy(teacher_logits, labels)
    s = np.asarray(reference_logits)[:, :num_classes]  # a defer reference: its C class outputs
    s_loss = _np_cross_entropy(s, labels)
    if score == "student_loss":
        return s_loss
    t = np.asarray(teacher_logits)
    indicator = (t.argmax(-1) == labels) & (s.argmax(-1) != labels)
    advantage = s_loss - _np_cross_entropy(t, labels)
    return indicator.astype(np.float64) + 0.5 / (1.0 + np.exp(-np.clip(advantage, -50, 50)))


def budget_rows(scores, rate: float) -> np.ndarray:
    """A 0/1 float32 mask of exactly round(rate * N) rows: those with the highest `scores` (ties: the
    lower index first). These are the rows a cascade deferring a fraction `rate` hands to the teacher."""
    scores = np.asarray(scores, np.float64)
    n = len(scores)
    k = int(round(rate * n))
    hard = np.zeros(n, np.float32)
    hard[np.argsort(-scores, kind="stable")[:k]] = 1.0
    return hard


def budget_loss(
    logits, teacher_logits, labels, hard, *, treatment: str, alpha: float = 0.9, temperature: float = 4.0
) -> tuple[jax.Array, jax.Array]:
    """(per-example loss, weight) with the rows marked `hard` (0/1, per example) treated as the teacher's:

    drop     standard Hinton KD, weight 0 on the hard rows (the easy rows keep weight 1);
    flatten  `flattened_distillation` with hardness = hard: uniform targets and no label term there;
    defer    a student with C + 1 outputs: the easy rows get (1 - alpha) (-log p_y) + alpha T^2 KL on
             the C class outputs (p over all C + 1), the hard rows -log p_defer (the abstain target).
    """
    hard = jax.lax.stop_gradient(jnp.asarray(hard, jnp.float32))
    ones = jnp.ones(labels.shape, jnp.float32)
    if treatment == "drop":
        return distillation_loss(logits, teacher_logits, labels, alpha=alpha, temperature=temperature), 1.0 - hard
    if treatment == "flatten":
        return flattened_distillation(logits, teacher_logits, labels, hard, alpha=alpha, temperature=temperature), ones
    if treatment == "defer":
        num_classes = logits.shape[-1] - 1
        logp = jax.nn.log_softmax(logits.astype(jnp.float32))
        ce = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
        kd = kd_divergence(logits[:, :num_classes], teacher_logits, temperature)
        easy = (1.0 - alpha) * ce + alpha * kd
        return (1.0 - hard) * easy - hard * logp[:, num_classes], ones
    raise ValueError(f"Unknown treatment {treatment!r}; expected one of {BUDGET_TREATMENTS}.")


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
    # Per-row inputs over the whole training split, computed before training (titans/train/method.py):
    # "teacher" (the teacher's logits on every training row, cross-fitted where distill.crossfit_teachers
    # names the fold teachers) and "reference" (distill.budget.reference_workdir's logits). An objective
    # that names any gets `rows(...)`'s arrays gathered per batch: loss(..., step, rows=...).
    row_inputs: ClassVar[tuple[str, ...]] = ()

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

    def reads_teacher_correctness(self) -> bool:
        """Whether the objective reads "is the teacher right on this row" (its probability of the label, its
        argmax against the label, or agreement with it). Such an objective is refused teacher outputs on
        rows the teacher trained on (titans/teachers/crossfit.py) unless distill.allow_in_sample_teacher."""
        return False

    def rows(self, labels, teacher=None, reference=None) -> dict[str, np.ndarray]:
        """Per-row arrays over the training split (the `row_inputs` given as numpy arrays), frozen into the
        steps and gathered by the batch's row indices into `loss(..., rows=...)`."""
        return {}

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
        return easy_weights(
            teacher_logits,
            labels,
            logits,
            rule=e.rule,
            sharpness=e.sharpness,
            floor=floor,
            strength=e.get("strength", 1.0),
        )


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

    def validate(self, where: str) -> None:
        super().validate(where)
        strength = self.distill.easy.get("strength", 1.0)
        if not strength > 0:
            raise config_lib.ConfigError(f"{where}: distill.easy.strength={strength!r} must be > 0.")

    def reads_teacher_correctness(self) -> bool:
        return self.distill.easy.rule in ("correctness", "agreement")

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

    def reads_teacher_correctness(self) -> bool:
        return self.distill.easy.rule in ("correctness", "agreement")

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

    def reads_teacher_correctness(self) -> bool:
        return True

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


@OBJECTIVES.register("defer_ms")
class DeferMozannarSontag(Objective):
    """Learning to defer weighted as the surrogate it reads (`mozannar_sontag_defer`): classifier term and
    defer term at weight 1, teacher soft labels as the classifier's targets, the teacher's correctness
    (held out) as the expert's."""

    extra_outputs = 1

    def reads_teacher_correctness(self) -> bool:
        return True

    def loss(self, logits, teacher_logits, labels, step):
        per_example = mozannar_sontag_defer(logits, teacher_logits, labels, defer_cost=self.distill.defer_cost)
        return per_example, jnp.ones(labels.shape, jnp.float32)


@OBJECTIVES.register("easy_budget")
class EasyBudget(Objective):
    """Budget-sized easy subset: the hardest `distill.budget.rate` of the training rows by
    `distill.budget.score` (`hardness_scores`, ranked over the whole split before training) are the
    teacher's; `distill.budget.treatment` says what the student learns on them (`budget_loss`)."""

    row_inputs = ("teacher", "reference")

    @property
    def extra_outputs(self) -> int:
        return int(self.distill.budget.treatment == "defer")

    def validate(self, where: str) -> None:
        super().validate(where)
        b = self.distill.budget
        if not 0.0 < b.rate < 1.0:
            raise config_lib.ConfigError(f"{where}: distill.budget.rate={b.rate!r} must be in (0, 1).")
        for field, value, options in (
            ("score", b.score, HARDNESS_SCORES),
            ("treatment", b.treatment, BUDGET_TREATMENTS),
        ):
            if value not in options:
                raise config_lib.ConfigError(
                    f"{where}: distill.budget.{field}={value!r} is not one of {list(options)}."
                )
        if b.score != "teacher_loss" and not b.reference_workdir:
            raise config_lib.ConfigError(
                f"{where}: distill.budget.score={b.score!r} reads a reference standard-KD student: set "
                f"distill.budget.reference_workdir to its finished run (the first of the two passes)."
            )
        if b.treatment == "flatten" and self.distill.loss != "kd":
            raise config_lib.ConfigError(f"{where}: distill.budget.treatment='flatten' needs distill.loss='kd'.")

    def reads_teacher_correctness(self) -> bool:
        return self.distill.budget.score != "student_loss"

    def rows(self, labels, teacher=None, reference=None) -> dict[str, np.ndarray]:
        b = self.distill.budget
        num_classes = None if teacher is None else teacher.shape[-1]
        scores = hardness_scores(b.score, labels, teacher, reference, num_classes=num_classes)
        return {"hard": budget_rows(scores, b.rate)}

    def loss(self, logits, teacher_logits, labels, step, rows=None):
        d = self.distill
        return budget_loss(
            logits,
            teacher_logits,
            labels,
            rows["hard"],
            treatment=d.budget.treatment,
            alpha=d.alpha,
            temperature=d.temperature,
        )


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
