"""Offline cascade analysis: accuracy and deferral rate for many thresholds at once, threshold choice.

Everything here works on precomputed per-example gate scores and predictions, so a whole
accuracy/deferral curve is one jitted call (``jax.vmap`` over thresholds) instead of a loop.
Convention everywhere (and in :class:`titans.cascade.runner.CascadeRunner`): an example is
deferred iff ``score > threshold``.

Two-stage: :func:`sweep`. k stages: :func:`cascade_predictions` (stage i keeps its answer unless
its score exceeds ``thresholds[i]``; the last stage always answers) and :func:`cascade_sweep`
over a grid of threshold tuples.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["cascade_predictions", "cascade_sweep", "rate_for_cost", "sweep", "threshold_for_cost", "threshold_for_rate"]


@functools.partial(jax.jit, static_argnames=("num_classes",))
def _sweep(scores, student_pred, teacher_pred, labels, thresholds, num_classes):
    class_count = jnp.zeros(num_classes).at[labels].add(1.0)

    def one(thr):
        defer = scores > thr
        pred = jnp.where(defer, teacher_pred, student_pred)
        per_class = jnp.zeros(num_classes).at[labels].add(defer.astype(jnp.float32))
        return {
            "accuracy": jnp.mean(pred == labels),
            "deferral_rate": jnp.mean(defer),
            "per_class_deferral_rate": per_class / jnp.maximum(class_count, 1.0),
        }

    return jax.vmap(one)(thresholds)


def sweep(scores, student_pred, teacher_pred, labels, thresholds, num_classes: int | None = None) -> dict:
    """Two-stage cascade metrics for every threshold, in one jitted call.

    Args: ``scores`` (N,) gate scores; ``student_pred``, ``teacher_pred``, ``labels`` (N,) ints;
    ``thresholds`` (T,). ``num_classes`` defaults to ``1 + max`` over labels and predictions.
    Returns a dict of arrays: ``accuracy`` (T,), ``deferral_rate`` (T,),
    ``per_class_deferral_rate`` (T, C) (the deferral rate among examples of each true class; 0 for
    a class with no examples), and ``thresholds`` (T,).
    """
    labels = np.asarray(labels)
    student_pred, teacher_pred = np.asarray(student_pred), np.asarray(teacher_pred)
    if num_classes is None:
        num_classes = int(max(labels.max(), student_pred.max(), teacher_pred.max())) + 1
    thresholds = jnp.atleast_1d(jnp.asarray(thresholds, jnp.float32))
    out = _sweep(
        jnp.asarray(scores, jnp.float32),
        jnp.asarray(student_pred, jnp.int32),
        jnp.asarray(teacher_pred, jnp.int32),
        jnp.asarray(labels, jnp.int32),
        thresholds,
        int(num_classes),
    )
    return {**out, "thresholds": thresholds}


def threshold_for_rate(scores, target_rate: float) -> float:
    """A threshold under which at most ``target_rate`` of ``scores`` are deferred (``score > t``).

    Exact semantics: with ``k = floor(target_rate * N)``, the returned threshold defers exactly the
    ``k`` highest scores when the k-th and (k+1)-th highest differ, and fewer (never more) when
    they tie. So the achieved rate is in ``[target_rate - 1/N, target_rate]`` on these scores
    without ties. The threshold lies halfway between the two scores around the cut (rounded to
    the scores' dtype), so recomputing the same scores with float noise does not move examples
    across it. ``target_rate`` 0 gives a value just above the largest score, 1 just below the
    smallest (by ``1e-5 * max(1, |score|)``, about 100 float32 steps).
    """
    if not 0.0 <= float(target_rate) <= 1.0:
        raise ValueError(f"target_rate must be in [0, 1], got {target_rate}")
    s = np.asarray(scores).ravel()
    if s.size == 0:
        raise ValueError("threshold_for_rate needs at least one score")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError("gate scores contain NaN or infinity")
    n = s.size
    k = int(np.floor(float(target_rate) * n + 1e-9))
    desc = np.sort(s)[::-1]
    # At the ends there is no neighbouring score; step a small relative margin outside instead.
    if k == 0:
        return float(desc[0] + _end_margin(desc[0]))
    if k >= n:
        return float(desc[-1] - _end_margin(desc[-1]))
    hi, lo = desc[k - 1], desc[k]
    mid = s.dtype.type(lo + (hi - lo) / 2)
    # Two adjacent floats have no midpoint; rounding up onto `hi` would keep `hi` from deferring.
    return float(lo if mid >= hi else mid)


def _end_margin(x):
    return 1e-5 * max(1.0, abs(float(x)))


def rate_for_cost(c_student: float, c_gate: float, c_teacher: float, target_cost: float) -> float:
    """The deferral rate whose amortized cost ``c_s + c_g + r * c_t`` equals ``target_cost``, clipped to 1.

    Raises when the student and gate alone already cost more than ``target_cost``.
    """
    if c_teacher <= 0:
        raise ValueError(f"c_teacher must be positive, got {c_teacher}")
    rate = (float(target_cost) - float(c_student) - float(c_gate)) / float(c_teacher)
    if rate < 0:
        raise ValueError(
            f"target cost {target_cost} is below the student + gate cost {c_student + c_gate}: "
            "no deferral rate reaches it"
        )
    return min(rate, 1.0)


def threshold_for_cost(scores, c_student: float, c_gate: float, c_teacher: float, target_cost: float) -> float:
    """:func:`threshold_for_rate` at the rate :func:`rate_for_cost` gives (cost at most ``target_cost``)."""
    return threshold_for_rate(scores, rate_for_cost(c_student, c_gate, c_teacher, target_cost))


def cascade_predictions(stage_scores, stage_preds, thresholds):
    """Predictions of a k-stage cascade and which stage answered each example.

    ``stage_scores``: k-1 arrays (N,) (a k-th, the last stage's, is accepted and ignored: the last
    stage always answers); ``stage_preds``: k arrays (N,); ``thresholds``: k-1 values (a list or a
    (k-1,) array, so the function can be vmapped over a (G, k-1) grid). Stage i answers iff every
    earlier stage deferred (``score > thr``) and it does not.
    Returns ``(predictions (N,), answered_by (N,) int32)``.
    """
    k = len(stage_preds)
    if k < 1:
        raise ValueError("a cascade needs at least one stage")
    if len(stage_scores) not in (k - 1, k):
        raise ValueError(f"{k} stages need {k - 1} score arrays, got {len(stage_scores)}")
    if not isinstance(thresholds, jax.Array) and len(thresholds) != k - 1:
        raise ValueError(f"{k} stages need {k - 1} thresholds, got {len(thresholds)}")
    thresholds = jnp.asarray(thresholds, jnp.float32).reshape(-1)
    answered_by = jnp.full(jnp.shape(stage_preds[0]), k - 1, jnp.int32)
    # Walk back from the last stage so that the earliest stage that keeps wins.
    for i in reversed(range(k - 1)):
        keep = ~(jnp.asarray(stage_scores[i]) > thresholds[i])
        answered_by = jnp.where(keep, i, answered_by)
    preds = jnp.stack([jnp.asarray(p) for p in stage_preds])
    predictions = jnp.take_along_axis(preds, answered_by[None], 0)[0]
    return predictions, answered_by


@jax.jit
def _cascade_sweep(stage_scores, stage_preds, labels, grid):
    k = len(stage_preds)

    def one(thr):
        pred, by = cascade_predictions(stage_scores, stage_preds, thr)
        reach = jnp.stack([jnp.mean(by >= i) for i in range(k)])
        return {
            "accuracy": jnp.mean(pred == labels),
            "reach_fraction": reach,
            "answered_fraction": jnp.stack([jnp.mean(by == i) for i in range(k)]),
        }

    return jax.vmap(one)(grid)


def cascade_sweep(stage_scores, stage_preds, labels, threshold_grid) -> dict:
    """k-stage metrics for every row of ``threshold_grid`` (G, k-1), in one jitted call.

    Returns ``accuracy`` (G,), ``reach_fraction`` (G, k) (fraction of examples each stage runs on;
    column 0 is 1), ``answered_fraction`` (G, k). ``reach_fraction`` feeds
    :func:`titans.cascade.cost.amortized_cost_k`.
    """
    k = len(stage_preds)
    grid = jnp.asarray(threshold_grid, jnp.float32).reshape(-1, k - 1)
    scores = [jnp.asarray(s, jnp.float32) for s in stage_scores[: k - 1]]
    preds = [jnp.asarray(p, jnp.int32) for p in stage_preds]
    return _cascade_sweep(scores, preds, jnp.asarray(labels, jnp.int32), grid)
