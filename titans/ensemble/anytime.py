"""Anytime inference over an ensemble: evaluate members in order, stop early.

An example stops after member w (answering with argmax F_w, F_w = f_1 + ... + f_w) at the first w
where the ensemble's confidence max softmax(F_w) reaches the threshold, or where running member
w+1 would take the cumulative cost past the budget; the last member always answers. Like the
cascade gates (titans/cascade/curves.py), everything works on precomputed per-member logits, so
a whole accuracy/cost curve is one jitted call, ``jax.vmap`` over thresholds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def prefix_logits(member_logits) -> np.ndarray:
    """(N, W, K) own logits of each member -> (N, W, K) summed logits F_1..F_W."""
    return np.cumsum(np.asarray(member_logits, np.float32), axis=1)


def affordable_members(cumulative_cost, budget: float) -> int:
    """How many members fit in `budget` (at least 1: the first member always runs)."""
    c = np.asarray(cumulative_cost, np.float64)
    return max(1, int(np.sum(c <= budget * (1 + 1e-9))))


@jax.jit
def _sweep(prefix, labels, cost, thresholds, max_members):
    conf = jnp.max(jax.nn.softmax(prefix, axis=-1), axis=-1)  # (N, W)
    pred = jnp.argmax(prefix, axis=-1)  # (N, W)
    num = prefix.shape[1]
    position = jnp.arange(num)

    def one(thr):
        # Exit at the first confident member, else at the last affordable one.
        hit = (conf >= thr) | (position[None, :] >= max_members - 1)
        exit_at = jnp.argmax(hit, axis=1)
        answer = jnp.take_along_axis(pred, exit_at[:, None], axis=1)[:, 0]
        return {
            "accuracy": jnp.mean(answer == labels),
            "mean_cost": jnp.mean(cost[exit_at]),
            "mean_members": jnp.mean(exit_at + 1.0),
        }

    return jax.vmap(one)(thresholds)


def sweep(member_logits, labels, cumulative_cost, thresholds, budget: float = float("inf")) -> dict:
    """Anytime accuracy, mean cost and mean number of members for every threshold, in one call.

    member_logits (N, W, K) own logits per member; labels (N,); cumulative_cost (W,) cost of
    running members 1..w; thresholds (T,) on max softmax(F_w) (a threshold above 1 never exits
    early); budget caps the cumulative cost. Returns arrays of shape (T,) and the thresholds.
    """
    logits = np.asarray(member_logits, np.float32)
    if logits.ndim != 3:
        raise ValueError(f"member_logits must be (N, W, K), got shape {logits.shape}")
    return sweep_prefix(prefix_logits(logits), labels, cumulative_cost, thresholds, budget)


def sweep_prefix(prefix, labels, cumulative_cost, thresholds, budget: float = float("inf")) -> dict:
    """`sweep` on the ensemble's predictions after each member, (N, W, K), whatever combines them
    (a sum for B-DISTIL, a weighted average for the resched baseline)."""
    prefix = np.asarray(prefix, np.float32)
    if prefix.ndim != 3:
        raise ValueError(f"prefix logits must be (N, W, K), got shape {prefix.shape}")
    cost = np.asarray(cumulative_cost, np.float32)
    if cost.shape != (prefix.shape[1],):
        raise ValueError(f"cumulative_cost must have one entry per member ({prefix.shape[1]}), got {cost.shape}")
    if len(labels) != prefix.shape[0]:
        raise ValueError(f"{len(labels)} labels for {prefix.shape[0]} examples")
    thresholds = jnp.atleast_1d(jnp.asarray(thresholds, jnp.float32))
    out = _sweep(
        jnp.asarray(prefix),
        jnp.asarray(labels, jnp.int32),
        jnp.asarray(cost),
        thresholds,
        affordable_members(cost, budget),
    )
    return {k: np.asarray(v) for k, v in {**out, "thresholds": thresholds}.items()}


def predict_loop(member_logits, cumulative_cost, threshold: float, budget: float = float("inf")):
    """The same rule one example and one member at a time (the reference the sweep is tested on).

    Returns (predictions (N,), members used (N,), cost (N,))."""
    logits = np.asarray(member_logits, np.float64)
    cost = np.asarray(cumulative_cost, np.float64)
    preds, used, spent = [], [], []
    for x in logits:
        total = np.zeros(x.shape[-1])
        for w in range(x.shape[0]):
            total = total + x[w]
            p = np.exp(total - total.max())
            p /= p.sum()
            last = w == x.shape[0] - 1 or cost[w + 1] > budget * (1 + 1e-9)
            if p.max() >= threshold or last:
                break
        preds.append(int(np.argmax(total)))
        used.append(w + 1)
        spent.append(cost[w])
    return np.array(preds), np.array(used), np.array(spent)


def accuracy_by_members(member_logits, labels) -> list[float]:
    """Accuracy of argmax F_w for w = 1..W."""
    prefix = prefix_logits(member_logits)
    return [float(np.mean(np.argmax(prefix[:, w], -1) == np.asarray(labels))) for w in range(prefix.shape[1])]


__all__ = ["accuracy_by_members", "affordable_members", "predict_loop", "prefix_logits", "sweep", "sweep_prefix"]
