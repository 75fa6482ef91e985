"""Deferral gates of a cascade: per-example scores saying how much an example needs the next stage.

A gate is a per-example function ``score(logits_row) -> scalar``; higher means more reason to defer.
It sees one row of the student's logits, shape ``(C,)`` or, for a learning-to-defer student,
``(C + 1,)`` with the last entry the "defer" output. Batch it with ``jax.vmap``; every gate here
is jittable.

Students with a defer output: the confidence gates (``msp``, ``margin``, ``entropy``) take a
``num_classes`` keyword. With ``num_classes=C`` they read only the first ``C`` logits, so the
same gate works on ``(C,)`` and ``(C + 1,)`` rows; without it they read the whole row.
``get_gate(name, num_classes=C)`` returns the gate with that keyword bound (the form to vmap).
``GATES`` is the registry of these fixed gates and ``FITTED_GATES`` of the gates fitted on held-out data
(``learned``); a new gate is one registered function (``@GATES.register("name")``), and a cascade
config's ``cascade.gates`` is checked against both (``check_gate_name``).
``defer_output`` always reads the whole row (it needs the defer entry), and with ``num_classes``
it checks that the row has ``C + 1`` entries.

The learned gate (Jitkrittum et al., NeurIPS 2023) is a small MLP over features of the student's
output, trained post hoc on held-out data to predict where the teacher beats the student; see
:func:`train_learned_gate`. ``posthoc_diff`` is that paper's "Diff-01" estimator: an MLP over the
student's probability vector regressing the gain of deferring, 1[teacher right] - 1[student right]
(:func:`train_posthoc_estimator`).

Gate cost: :func:`gate_flops` asks XLA for the FLOPs of the jitted, vmapped gate, per example.
XLA's ``flops`` excludes transcendentals (the ``exp`` of a softmax); those are reported
separately by XLA and not added here, so gate FLOPs are comparable with
``titans.models.flops_per_example``, which counts the same way.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from titans import config as config_lib

__all__ = [
    "FITTED_GATES",
    "GATES",
    "LearnedGate",
    "auroc",
    "check_gate_name",
    "defer_output",
    "deferral_targets",
    "entropy",
    "fit_learned_gate",
    "fit_posthoc_estimator",
    "gate_flops",
    "gate_names",
    "get_gate",
    "learned_gate_features",
    "margin",
    "msp",
    "posthoc_features",
    "supports",
    "train_learned_gate",
    "train_posthoc_estimator",
]


def _head(logits, num_classes):
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 1:
        raise ValueError(
            f"a gate scores one example: expected a (C,) row, got shape {logits.shape}; batch it with jax.vmap"
        )
    if num_classes is None:
        return logits
    if logits.shape[0] not in (num_classes, num_classes + 1):
        raise ValueError(
            f"gate built for {num_classes} classes got a row of {logits.shape[0]} logits "
            f"(expected {num_classes} or {num_classes + 1})"
        )
    return logits[:num_classes]


# The fixed gates: name -> per-example score. `extra_outputs`: outputs beyond the classes the student must
# have (a cascade evaluation skips the gate for students without them).
GATES = config_lib.Registry("gate", "cascade.gates")


@GATES.register("msp")
def msp(logits, num_classes: int | None = None):
    """Chow's rule: ``1 - max softmax probability``."""
    return 1.0 - jnp.max(jax.nn.softmax(_head(logits, num_classes)))


@GATES.register("margin")
def margin(logits, num_classes: int | None = None):
    """Minus the gap between the two largest softmax probabilities (a small gap means doubt)."""
    top2 = jax.lax.top_k(jax.nn.softmax(_head(logits, num_classes)), 2)[0]
    return -(top2[0] - top2[1])


@GATES.register("entropy")
def entropy(logits, num_classes: int | None = None):
    """Shannon entropy (nats) of the softmax."""
    logp = jax.nn.log_softmax(_head(logits, num_classes))
    return -jnp.sum(jnp.exp(logp) * logp)


@GATES.register("defer_output", extra_outputs=1)
def defer_output(logits, num_classes: int | None = None):
    """Defer logit minus the largest class logit of a ``C + 1``-output student: ``log(p_defer / max_k p_k)``.

    The learning-to-defer surrogate is consistent for the rule "defer iff p_defer > max_k p_k", so
    this score is that rule's margin (defer iff score > 0). ``p_defer`` alone is not a useful score:
    its optimum grows with the teacher's confidence, which is highest on the easy examples.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 1:
        raise ValueError(f"a gate scores one example: expected a (C+1,) row, got shape {logits.shape}")
    if num_classes is not None and logits.shape[0] != num_classes + 1:
        raise ValueError(
            f"defer_output needs a student with {num_classes} + 1 outputs (the last one "
            f"'defer'); got a row of {logits.shape[0]} logits"
        )
    return logits[-1] - jnp.max(logits[:-1])


def get_gate(name: str, num_classes: int | None = None) -> Callable:
    """The gate called ``name`` as a one-argument per-example function (``num_classes`` bound)."""
    try:
        fn = GATES[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(GATES), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(
            f"Unknown gate {name!r}.{hint} Known gates: {', '.join(GATES)}; the learned gate "
            "is built with train_learned_gate(...)"
        ) from None
    if num_classes is None:
        return fn
    out = functools.partial(fn, num_classes=int(num_classes))
    functools.update_wrapper(out, fn)
    return out


def gate_flops(gate: Callable, num_outputs: int, feature_dim: int | None = None, batch_size: int = 128) -> float:
    """XLA's FLOPs per example of ``jit(vmap(gate))`` on rows of ``num_outputs`` logits.

    ``num_outputs`` is the width of the rows the gate will see (``C``, or ``C + 1`` for a defer
    student). ``feature_dim``: for a learned gate trained with penultimate features, their width.
    Only shapes are used; nothing runs.
    """
    args = [jax.ShapeDtypeStruct((batch_size, int(num_outputs)), jnp.float32)]
    if feature_dim is not None:
        args.append(jax.ShapeDtypeStruct((batch_size, int(feature_dim)), jnp.float32))
    cost = jax.jit(jax.vmap(gate)).lower(*args).compile().cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    flops = cost.get("flops") if cost else None
    if flops is None:
        raise RuntimeError("XLA's cost analysis reported no 'flops' for this backend")
    return float(flops) / batch_size


# --------------------------------------------------------------------------------------------
# Learned post-hoc gate.

DEFAULT_TOP_K = 5


def learned_gate_features(logits, num_classes: int, top_k: int = DEFAULT_TOP_K):
    """Per-example features of one row of student logits, shape ``(top_k + 3 [+ 1],)``.

    Sorted top-k softmax probabilities, entropy, top-1/top-2 margin, max logit, and for a
    ``C + 1``-output student also the softmax probability of the defer output.
    """
    logits = jnp.asarray(logits, jnp.float32)
    head = _head(logits, num_classes)
    logp = jax.nn.log_softmax(head)
    p = jnp.exp(logp)
    k = min(int(top_k), int(num_classes))
    top = jax.lax.top_k(p, max(k, 2))[0]
    feats = [top[:k], jnp.stack([-jnp.sum(p * logp), top[0] - top[1], jnp.max(head)])]
    if logits.shape[0] == num_classes + 1:
        feats.append(jax.nn.softmax(logits)[-1:])
    return jnp.concatenate(feats)


@flax.struct.dataclass
class LearnedGate:
    """A trained post-hoc gate: feature standardisation plus an MLP with one hidden layer.

    ``score(logits_row)`` (or ``score(logits_row, features_row)`` when trained with the
    student's penultimate activations) returns the logit of "the teacher beats the student";
    it is a per-example function like the built-in gates (vmappable, jittable). The gate is a
    pytree, so it can be passed into jitted functions as an argument.
    """

    params: Any
    mean: jax.Array
    std: jax.Array
    num_classes: int = flax.struct.field(pytree_node=False)
    top_k: int = flax.struct.field(pytree_node=False, default=DEFAULT_TOP_K)
    feature_dim: int | None = flax.struct.field(pytree_node=False, default=None)
    target: str = flax.struct.field(pytree_node=False, default="teacher_better")
    train_loss: float = flax.struct.field(pytree_node=False, default=float("nan"))

    def features(self, logits, features=None):
        f = learned_gate_features(logits, self.num_classes, self.top_k)
        if self.feature_dim is not None:
            if features is None:
                raise ValueError(
                    f"this gate was trained with {self.feature_dim} student features; "
                    "call score(logits_row, features_row)"
                )
            f = jnp.concatenate([f, jnp.asarray(features, jnp.float32).reshape(-1)])
        elif features is not None:
            raise ValueError("this gate was trained without student features; call score(logits_row)")
        return (f - self.mean) / self.std

    def score(self, logits, features=None):
        return _mlp(self.params, self.features(logits, features))

    def flops_per_example(self, num_outputs: int | None = None) -> float:
        """XLA FLOPs per example of the whole gate (features + MLP) on rows of ``num_outputs``."""
        return gate_flops(self.score, num_outputs or self.num_classes, self.feature_dim)


def _mlp(params, x):
    h = jax.nn.relu(x @ params["w1"] + params["b1"])
    return (h @ params["w2"] + params["b2"])[..., 0]


def _softmax_xent(logits, labels):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), labels[:, None], -1)[:, 0]


def deferral_targets(student_logits, teacher_logits, labels, target: str = "teacher_better") -> np.ndarray:
    """0/1 targets of the learned gate.

    ``teacher_better``: 1 where the teacher is correct and the student wrong.
    ``teacher_lower_loss``: 1 where the teacher's cross-entropy on the label is below the student's.
    The student is read on its first ``C`` logits (``C`` = the teacher's width).
    """
    t = jnp.asarray(teacher_logits, jnp.float32)
    C = t.shape[-1]
    s = jnp.asarray(student_logits, jnp.float32)[:, :C]
    y = jnp.asarray(labels, jnp.int32)
    if target == "teacher_better":
        out = (jnp.argmax(t, -1) == y) & (jnp.argmax(s, -1) != y)
    elif target == "teacher_lower_loss":
        out = _softmax_xent(t, y) < _softmax_xent(s, y)
    else:
        raise ValueError(f"Unknown learned-gate target {target!r}; use 'teacher_better' or 'teacher_lower_loss'")
    return np.asarray(out, np.float32)


def train_learned_gate(
    student_logits,
    teacher_logits,
    labels,
    *,
    student_features=None,
    hidden: int = 32,
    steps: int = 500,
    seed: int = 0,
    lr: float = 1e-2,
    weight_decay: float = 1e-4,
    target: str = "teacher_better",
    top_k: int = DEFAULT_TOP_K,
) -> LearnedGate:
    """Fits a :class:`LearnedGate` on held-out data (full-batch AdamW on the logistic loss).

    ``student_logits`` (N, C) or (N, C + 1); ``teacher_logits`` (N, C); ``labels`` (N,).
    ``student_features`` (N, D), optional: the student's penultimate activations, appended to
    the features (the gate is then scored as ``score(logits_row, features_row)``).
    Train on data the student and teacher were not trained on, or the target is biased toward
    "the student is right".
    """
    s = jnp.asarray(student_logits, jnp.float32)
    t = jnp.asarray(teacher_logits, jnp.float32)
    C = int(t.shape[-1])
    if s.ndim != 2 or s.shape[-1] not in (C, C + 1) or s.shape[0] != t.shape[0]:
        raise ValueError(f"student logits {s.shape} do not match teacher logits {t.shape}")
    y_t = jnp.asarray(deferral_targets(s, t, labels, target))
    feats = jax.vmap(lambda r: learned_gate_features(r, C, top_k))(s)
    feature_dim = None
    if student_features is not None:
        sf = jnp.asarray(student_features, jnp.float32).reshape(s.shape[0], -1)
        feature_dim = int(sf.shape[-1])
        feats = jnp.concatenate([feats, sf], -1)
    mean = feats.mean(0)
    std = feats.std(0) + 1e-6  # a constant feature (e.g. a saturated prob) must not divide by zero
    x = (feats - mean) / std

    k1, k2 = jax.random.split(jax.random.key(seed))
    d = x.shape[-1]
    params = {
        "w1": jax.random.normal(k1, (d, hidden)) * jnp.sqrt(2.0 / d),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 1)) * jnp.sqrt(1.0 / hidden),
        "b2": jnp.zeros(1),
    }
    tx = optax.adamw(lr, weight_decay=weight_decay)

    def loss_fn(p):
        return optax.sigmoid_binary_cross_entropy(_mlp(p, x), y_t).mean()

    @jax.jit
    def fit(params):
        def step(carry, _):
            p, o = carry
            loss, g = jax.value_and_grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), loss

        (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
        return params, loss_fn(params)

    params, final = fit(params)
    return LearnedGate(
        params=params,
        mean=mean,
        std=std,
        num_classes=C,
        top_k=top_k,
        feature_dim=feature_dim,
        target=target,
        train_loss=float(final),
    )


# Gates fitted on held-out data before they score: name -> fit(student_logits, teacher_logits, labels) ->
# (per-example score, its FLOPs per example, the indices of the held-out rows to choose thresholds on).
FITTED_GATES = config_lib.Registry("gate", "cascade.gates")


@FITTED_GATES.register("learned")
def fit_learned_gate(student_logits, teacher_logits, labels):
    """A `LearnedGate` fitted on the even-indexed rows, to be thresholded on the odd ones."""
    rows = np.arange(len(labels))
    fit, rest = rows[0::2], rows[1::2]
    gate = train_learned_gate(student_logits[fit], teacher_logits[fit], labels[fit], seed=0)
    return gate.score, gate.flops_per_example(student_logits.shape[-1]), rest


def posthoc_features(logits, num_classes: int):
    """Features of one student row for the post-hoc deferral estimator: its full probability vector over the
    classes (sorted top-k probabilities, entropy, margin and max logit, `learned_gate_features`) and the
    one-hot of its predicted class, so that the estimator can learn class-dependent deferral."""
    logits = jnp.asarray(logits, jnp.float32)
    head = _head(logits, num_classes)
    p = jax.nn.softmax(head)
    return jnp.concatenate(
        [learned_gate_features(logits, num_classes), p, jax.nn.one_hot(jnp.argmax(head), num_classes)]
    )


def train_posthoc_estimator(
    student_logits, teacher_logits, labels, *, hidden: int = 32, steps: int = 500, seed: int = 0
):
    """Jitkrittum et al. (NeurIPS 2023)'s post-hoc deferral estimator "Diff-01": an MLP over the student's
    probability vector regressing 1[teacher right] - 1[student right] (in {-1, 0, 1}) with the squared loss;
    its prediction is the expected gain of deferring, the score (defer the largest). Returns
    (score(logits_row), params) with the features standardised on the fitting rows."""
    s = jnp.asarray(student_logits, jnp.float32)
    t = jnp.asarray(teacher_logits, jnp.float32)
    y = jnp.asarray(labels, jnp.int32)
    C = int(t.shape[-1])
    gain = (jnp.argmax(t, -1) == y).astype(jnp.float32) - (jnp.argmax(s[:, :C], -1) == y).astype(jnp.float32)
    feats = jax.vmap(lambda r: posthoc_features(r, C))(s)
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    x = (feats - mean) / std
    k1, k2 = jax.random.split(jax.random.key(seed))
    d = x.shape[-1]
    params = {
        "w1": jax.random.normal(k1, (d, hidden)) * jnp.sqrt(2.0 / d),
        "b1": jnp.zeros(hidden),
        "w2": jax.random.normal(k2, (hidden, 1)) * jnp.sqrt(1.0 / hidden),
        "b2": jnp.zeros(1),
    }
    tx = optax.adamw(1e-2, weight_decay=1e-4)

    def loss_fn(p):
        return jnp.mean((_mlp(p, x) - gain) ** 2)

    @jax.jit
    def fit(params):
        def step(carry, _):
            p, o = carry
            g = jax.grad(loss_fn)(p)
            u, o = tx.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]

    params = fit(params)

    def score(row):
        return _mlp(params, (posthoc_features(row, C) - mean) / std)

    return score, params


@FITTED_GATES.register("posthoc_diff")
def fit_posthoc_estimator(student_logits, teacher_logits, labels):
    """`train_posthoc_estimator` fitted on the even-indexed held-out rows, to be thresholded on the odd ones."""
    rows = np.arange(len(labels))
    fit, rest = rows[0::2], rows[1::2]
    score, _ = train_posthoc_estimator(student_logits[fit], teacher_logits[fit], labels[fit])
    return score, gate_flops(score, student_logits.shape[-1]), rest


def gate_names() -> tuple[str, ...]:
    """Every name `cascade.gates` may hold: the fixed gates, then the fitted ones."""
    return (*GATES, *FITTED_GATES)


def check_gate_name(name: str, where: str = "the config") -> None:
    """Raises ConfigError (with close matches) unless `name` is a registered gate, fixed or fitted."""
    if name not in GATES and name not in FITTED_GATES:
        raise GATES.unknown(name, where, also=FITTED_GATES)


def supports(name: str, extra_outputs: int) -> bool:
    """Whether gate `name` can score a student with `extra_outputs` outputs beyond the classes."""
    registry = GATES if name in GATES else FITTED_GATES
    return registry.meta(name).get("extra_outputs", 0) <= extra_outputs


def auroc(scores, targets) -> float:
    """Area under the ROC curve of ``scores`` for binary ``targets`` (ties count one half)."""
    scores = np.asarray(scores, np.float64).ravel()
    targets = np.asarray(targets).astype(bool).ravel()
    n_pos, n_neg = int(targets.sum()), int((~targets).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks over ties (Mann-Whitney U).
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    avg = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(avg, counts)
    return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))
