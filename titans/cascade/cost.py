"""Cost of a cascade per example: amortized FLOPs or seconds, and how to measure each stage's cost.

Two stages: ``c = c_student + c_gate + r * c_teacher`` with ``r`` the deferral rate. k stages: each
stage (and the gate after it) costs its price times the fraction of examples that reach it.
Costs can be FLOPs (from XLA, :func:`model_flops`) or seconds (:func:`measure_time_per_example`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import numpy as np

from titans import models

__all__ = ["amortized_cost", "amortized_cost_k", "measure_time_per_example", "model_flops"]


def amortized_cost(c_student, c_gate, c_teacher, deferral_rate):
    """``c_student + c_gate + deferral_rate * c_teacher``; broadcasts over arrays of rates."""
    return c_student + c_gate + np.asarray(deferral_rate) * c_teacher


def amortized_cost_k(stage_costs, gate_costs, reach_fractions):
    """k-stage amortized cost: ``sum_i reach_i * (stage_cost_i + gate_cost_i)``.

    ``stage_costs`` k values; ``gate_costs`` k-1 values (the last stage has no gate);
    ``reach_fractions`` (..., k), the fraction of examples each stage runs on (column 0 is 1), as
    returned by :func:`titans.cascade.curves.cascade_sweep`.
    """
    stage_costs = np.asarray(stage_costs, np.float64)
    gate_costs = np.asarray(gate_costs, np.float64)
    k = stage_costs.shape[0]
    if gate_costs.shape[0] != k - 1:
        raise ValueError(f"{k} stages need {k - 1} gate costs, got {gate_costs.shape[0]}")
    reach = np.asarray(reach_fractions, np.float64)
    if reach.shape[-1] != k:
        raise ValueError(f"reach_fractions must end in {k} (one per stage), got shape {reach.shape}")
    return reach @ (stage_costs + np.append(gate_costs, 0.0))


def measure_time_per_example(fn: Callable, batch, repeats: int = 10, warmup: int = 1) -> float:
    """Median wall seconds per example of ``jit(fn)(batch)`` over ``repeats`` timed calls.

    The first ``warmup`` calls compile and are not timed; each timed call waits for the result
    (``block_until_ready``), so asynchronous dispatch does not hide the work.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    f = jax.jit(fn)
    n = jax.tree.leaves(batch)[0].shape[0]
    for _ in range(max(1, warmup)):
        jax.block_until_ready(f(batch))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(f(batch))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) / n


def model_flops(model, input_shape, batch_size: int = 8) -> float:
    """XLA FLOPs of one eval-mode forward pass per example (``titans.models.flops_per_example``)."""
    return models.flops_per_example(model, input_shape, batch_size=batch_size)
