"""The weight player of the boosting game: weights over training examples (or example-class
pairs) that the current ensemble fits worst, updated multiplicatively.

After round w the ensemble's summed logits F_w are compared with the teacher's logits g on every
training example, giving a residual score per example (the temperature-T KL divergence from the
teacher's to the ensemble's distribution) or per example-class pair (the absolute difference of
the centred logits). The player then plays Hedge on those scores, scaled into [0, 1] as Hedge's
losses are:

    s = min(score / q, 1)          q = the `quantile` (0.99) of the scores,
    w_{w+1} = normalise(w_w * exp(eta * s)),  then mixed with the uniform distribution:
    w <- (1 - mix) * w + mix,

with weights normalised to mean 1 (so a weighted loss keeps the scale of an unweighted one).
Scaling by a high quantile rather than the mean matters: residuals are heavy-tailed (a few
examples the teacher itself finds ambiguous score 100x the mean), and exp(eta * score / mean)
hands almost all the weight to those few (measured on Fashion-MNIST: one round gave a max weight
of 28,731 with 90% of examples at the floor). Per round a weight grows by at most exp(eta). The
uniform mix keeps every example in play. Our reading of docs/methods.md#b-distil, where the exact update is
open.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from titans import losses

WEIGHT_MODES = ("example", "example_class")


def initial_weights(num_examples: int, num_classes: int, mode: str) -> np.ndarray:
    """Uniform weights, mean 1: shape (N,) for "example", (N, K) for "example_class"."""
    _check_mode(mode)
    shape = (num_examples,) if mode == "example" else (num_examples, num_classes)
    return np.ones(shape, np.float32)


def residual_scores(ensemble_logits, teacher_logits, mode: str, temperature: float = 4.0) -> np.ndarray:
    """How badly F (N, K) fits g (N, K): (N,) KL scores or (N, K) absolute centred-logit residuals."""
    _check_mode(mode)
    f = jnp.asarray(ensemble_logits, jnp.float32)
    g = jnp.asarray(teacher_logits, jnp.float32)
    if f.shape != g.shape:
        raise ValueError(f"ensemble logits {f.shape} and teacher logits {g.shape} differ in shape")
    if mode == "example":
        return np.asarray(losses.kd_divergence(f, g, temperature))
    return np.asarray(jnp.abs(losses.centred(g) - losses.centred(f)))


def update_weights(weights, scores, *, eta: float, mix: float = 0.1, quantile: float = 0.99) -> np.ndarray:
    """One multiplicative (Hedge) step of the weight player; returns weights of mean 1."""
    w = jnp.asarray(weights, jnp.float32)
    s = jnp.asarray(scores, jnp.float32)
    if w.shape != s.shape:
        raise ValueError(f"weights {w.shape} and scores {s.shape} differ in shape")
    if eta < 0 or not 0.0 <= mix <= 1.0 or not 0.0 < quantile <= 1.0:
        raise ValueError(
            f"need eta >= 0, 0 <= mix <= 1 and 0 < quantile <= 1, got eta={eta}, mix={mix}, quantile={quantile}"
        )
    s = jnp.minimum(s / jnp.maximum(jnp.quantile(s, quantile), 1e-12), 1.0)
    # Subtracting the max before exp only rescales all weights, which the normalisation undoes.
    logw = jnp.log(jnp.maximum(w, 1e-30)) + eta * s
    w = jnp.exp(logw - jnp.max(logw))
    w = w / jnp.mean(w)
    return np.asarray((1.0 - mix) * w + mix, np.float32)


def _check_mode(mode: str) -> None:
    if mode not in WEIGHT_MODES:
        raise ValueError(f"Unknown weight mode {mode!r}; expected one of {WEIGHT_MODES}.")
