"""The optimizer and learning-rate schedule of a run config (`optimizer`, `schedule` sections)."""

from __future__ import annotations

import optax

from titans import config as config_lib


def _schedule(config, total_steps: int, num_examples: int):
    o, s = config.optimizer, config.schedule
    lr, warmup = o.learning_rate, config_lib.warmup_steps(config, num_examples)
    decay_steps = max(1, total_steps - warmup)
    if s.name == "cosine":
        main = optax.cosine_decay_schedule(lr, decay_steps)
    elif s.name == "step":
        main = optax.piecewise_constant_schedule(
            lr, {int(b * total_steps) - warmup: s.step_factor for b in s.step_boundaries}
        )
    else:
        main = optax.constant_schedule(lr)
    if not warmup:
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def make_optimizer(config, total_steps: int, num_examples: int):
    """(optax transformation, learning-rate schedule): warm-up, then constant/cosine/step."""
    o = config.optimizer
    schedule = _schedule(config, total_steps, num_examples)
    if o.name == "sgd":
        tx = optax.sgd(schedule, momentum=o.momentum or None, nesterov=o.nesterov)
        if o.weight_decay:
            tx = optax.chain(optax.add_decayed_weights(o.weight_decay), tx)
    elif o.name == "adamw":
        tx = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    else:
        tx = optax.adam(schedule, b1=o.b1, b2=o.b2)
    if o.grad_clip_norm:
        tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
    return tx, schedule
