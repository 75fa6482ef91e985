"""The `cascade` section of a pipeline config: its fields, defaults and checks.

A cascade config is a pipeline config (`stages`, `stage_order`) plus a `cascade` section, evaluated
after the stages by `titans.cascade.evaluate.evaluate_cascades`:

  teacher               the teacher: a stage name, or a run directory
  students              the students, each evaluated with every gate: stage names or run directories
  baselines             students that are the equal-cost single-student baselines (the report compares them)
  gates                 gates to evaluate: names in `gates.GATES` or `gates.FITTED_GATES` (`learned`)
  runner_gates          gates whose operating points are checked with the real cascade runner (costly
                        with a large teacher); default: every gate in `gates`
  val_split             the split thresholds are chosen on (no stage may train on it)
  test_split            the split the curves and operating points are reported on
  batch_size            global batch of the predictions and of the runner
  num_thresholds        thresholds of each curve (validation deferral rates evenly spaced in [0, 1])
  target_deferral_rates the operating points checked with the runner
  fair                  the shared training recipe of every student (titans/cascade/fair.py), as applied

Unknown fields are refused with their close matches, as for run configs; `validate` runs before any
stage trains (titans/experiment.py).
"""

from __future__ import annotations

import numbers

import ml_collections

from titans import config as config_lib
from titans.cascade import gates as gates_lib

_NAMES = ("students", "baselines", "gates", "runner_gates")


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.teacher = "teacher"
    c.students = ()
    c.baselines = ()
    c.gates = ("msp", "margin", "entropy", "defer_output", "learned")
    c.runner_gates = c.gates  # filled in by `section` with the config's own `gates` when absent
    c.val_split = "train[90%:]"
    c.test_split = "test"
    c.batch_size = 512
    c.num_thresholds = 201
    c.target_deferral_rates = (0.1, 0.2, 0.3, 0.5)
    c.fair = fair_defaults()  # the shared recipe of titans/cascade/fair.py (empty: none recorded)
    return c


def fair_defaults() -> ml_collections.ConfigDict:
    """`cascade.fair`: the recipe `titans.cascade.fair.apply_recipe` gave every student (recorded, not applied)."""
    f = ml_collections.ConfigDict()
    f.epochs = 0.0
    f.augment = False
    f.learning_rates = ()
    f.select_split = ""
    return f


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Checks config.cascade; raises config_lib.ConfigError naming the field (and close matches)."""
    if "cascade" not in config:
        raise config_lib.ConfigError("the config has no `cascade` section")
    given = config.cascade
    known = defaults()
    for name in given:
        if name not in known:
            raise config_lib._unknown_error("cascade." + name, ["cascade." + k for k in known], "the config")
    c = section(config, checked=False)
    _check_types(c)
    for gate in (*c.gates, *c.runner_gates):
        gates_lib.check_gate_name(gate, where="cascade")
    for field, names, within in (("runner_gates", c.runner_gates, c.gates), ("baselines", c.baselines, c.students)):
        for name in names:
            if name not in within:
                raise config_lib.ConfigError(f"cascade.{field} names {name!r}, which is not in {list(within)}.")
    stages = list(config.get("stages", {}))
    for field, name in [("teacher", c.teacher), *(("students", s) for s in c.students)]:
        if name not in stages and "/" not in name:  # a stage of this pipeline, or a run directory
            raise config_lib.ConfigError(
                f"cascade.{field} names {name!r}, which is neither a stage of this pipeline ({stages}) nor a run "
                "directory (a path with '/')."
            )
    return config


def _check_types(c: ml_collections.ConfigDict) -> None:
    def fail(field, want):
        raise config_lib.ConfigError(f"cascade.{field}={c[field]!r} must be {want}.")

    for field in ("teacher", "val_split", "test_split"):
        if not isinstance(c[field], str) or not c[field]:
            fail(field, "a non-empty string")
    for field in _NAMES:
        if isinstance(c[field], str) or not all(isinstance(x, str) for x in c[field]):
            fail(field, "a tuple of names")
    if not c.students:
        fail("students", "at least one student")
    if not c.gates:
        fail("gates", "at least one gate")
    for field, least in (("batch_size", 1), ("num_thresholds", 2)):
        if not isinstance(c[field], int) or isinstance(c[field], bool) or c[field] < least:
            fail(field, f"an integer >= {least}")
    rates = c.target_deferral_rates
    if isinstance(rates, str) or not all(isinstance(r, numbers.Real) and 0.0 <= r <= 1.0 for r in rates):
        fail("target_deferral_rates", "a tuple of rates in [0, 1]")


def section(config: ml_collections.ConfigDict, *, checked: bool = True) -> ml_collections.ConfigDict:
    """config.cascade completed with defaults for the fields it leaves out (`runner_gates`: its `gates`)."""
    if checked:
        validate(config)
    given = config.cascade.to_dict()
    full = {**defaults().to_dict(), **given}  # a plain merge: the types are checked by `validate`, not coerced
    if "runner_gates" not in given:
        full["runner_gates"] = full["gates"]
    return ml_collections.ConfigDict(full)
