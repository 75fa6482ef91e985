"""Teacher/student cascades ("When in Doubt, Summon the Titans"): gates, threshold sweeps, costs, runner.

    from titans import cascade
    gate = cascade.get_gate("msp", num_classes=10)          # per-example score; higher = defer
    thr = cascade.threshold_for_rate(val_scores, 0.3)       # defer iff score > thr
    curve = cascade.sweep(scores, s_pred, t_pred, labels, thresholds)   # one jitted call
    runner = cascade.CascadeRunner([student_fn, teacher.apply], [gate], [thr])
    out = runner(images)                                    # the teacher runs on deferred rows only

``titans.cascade.evaluate`` (evaluation of a finished pipeline run) is not imported here: it pulls
in the data and training layers.
"""

from titans.cascade.cost import amortized_cost, amortized_cost_k, measure_time_per_example, model_flops
from titans.cascade.curves import (
    cascade_predictions,
    cascade_sweep,
    rate_for_cost,
    sweep,
    threshold_for_cost,
    threshold_for_rate,
)
from titans.cascade.gates import (
    GATES,
    LearnedGate,
    auroc,
    defer_output,
    deferral_targets,
    entropy,
    gate_flops,
    get_gate,
    learned_gate_features,
    margin,
    msp,
    train_learned_gate,
)
from titans.cascade.runner import CascadeOutput, CascadeRunner, capacity_ladder, plan_buffers, pow2_capacities

__all__ = [
    "GATES",
    "CascadeOutput",
    "CascadeRunner",
    "LearnedGate",
    "amortized_cost",
    "amortized_cost_k",
    "auroc",
    "capacity_ladder",
    "cascade_predictions",
    "cascade_sweep",
    "pow2_capacities",
    "defer_output",
    "deferral_targets",
    "entropy",
    "gate_flops",
    "get_gate",
    "learned_gate_features",
    "margin",
    "measure_time_per_example",
    "model_flops",
    "msp",
    "plan_buffers",
    "rate_for_cost",
    "sweep",
    "threshold_for_cost",
    "threshold_for_rate",
    "train_learned_gate",
]
