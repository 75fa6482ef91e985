"""The config of an active-distillation run: `defaults()` is the schema, `validate()` checks one.

    c.dataset   name, data_dir, split (where the labelled, validation and pool points are drawn
                from), eval_split (the student's test split)
    c.active    strategies, num_labelled, num_validation, pool_size, rounds, budget_per_round,
                m_estimate, informative_fraction, informativeness, kcenter_chunk, predict_batch_size
    c.teacher   workdir (a Titans run; trained there from `train` when it has no checkpoint yet),
                label_noise (fraction of the teacher's training labels replaced by a wrong class),
                noise_classes (empty: noise over every class; '6,2,4': only those classes' labels,
                each moved to the next class of the list),
                train (a base_config() run config, or empty)
    c.student   a base_config() run config: model, optimizer, batch_size, steps a round
                (total_steps, or total_epochs over that round's data), distill.loss/temperature
                (how the bought soft labels are fitted)

Unknown fields are refused with their close matches, as for run configs.
"""

from __future__ import annotations

import ml_collections

from titans import config as config_lib
from titans.active.selection import INFORMATIVENESS, STRATEGIES


def defaults() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "active"
    c.seed = 0

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "fashion_mnist"
    c.dataset.data_dir = ""
    c.dataset.split = "train[90%:]"  # labelled + validation + pool, disjoint, drawn with `seed`
    c.dataset.eval_split = "test"

    c.active = ml_collections.ConfigDict()
    c.active.strategies = ",".join(STRATEGIES)
    c.active.num_labelled = 200
    c.active.num_validation = 1000  # labelled; used only to estimate the teacher's mistakes m
    c.active.pool_size = 0  # 0 = every point of `split` not labelled or validation
    c.active.rounds = 4
    c.active.budget_per_round = 200  # b: teacher queries bought each round
    c.active.informativeness = "margin"  # robust: g = 1 - margin | normalised entropy
    c.active.m_estimate = "overall"  # overall | informative | zero (the m = 0 ablation; selection.estimate_mistakes)
    c.active.informative_fraction = 0.2
    c.active.kcenter_chunk = 1024
    c.active.predict_batch_size = 2048

    c.teacher = ml_collections.ConfigDict()
    c.teacher.workdir = ""
    c.teacher.label_noise = 0.0
    c.teacher.noise_classes = ""  # "" = every class; "6,2,4" = only these, each label moved to the next one
    c.teacher.train = ml_collections.ConfigDict()  # empty, or a base_config() run config

    c.student = config_lib.base_config()
    c.student.name = "student"
    c.student.model.name = "mlp"
    c.student.batch_size = 64
    c.student.total_steps = 300
    c.student.optimizer.name = "adam"
    c.student.optimizer.learning_rate = 1e-3
    c.student.optimizer.weight_decay = 0.0
    c.student.schedule.name = "cosine"
    c.student.distill.temperature = 1.0
    c.student.dtype = "float32"
    return c


def strategies(config) -> list[str]:
    names = [s.strip() for s in str(config.active.strategies).split(",") if s.strip()]
    for s in names:
        if s not in STRATEGIES:
            raise config_lib.ConfigError(
                f"active.strategies: unknown strategy {s!r}; expected some of {list(STRATEGIES)}."
            )
    if not names:
        raise config_lib.ConfigError("active.strategies is empty.")
    if len(set(names)) != len(names):
        raise config_lib.ConfigError(f"active.strategies names a strategy twice: {names}.")
    return names


def noise_classes(config) -> tuple[int, ...]:
    """teacher.noise_classes as class numbers: '6,2,4' (or '6+2+4') -> (6, 2, 4); '' -> ()."""
    text = str(config.teacher.noise_classes)
    try:
        classes = tuple(int(c) for c in text.replace("+", ",").split(",") if c.strip())
    except ValueError:
        raise config_lib.ConfigError(
            f"teacher.noise_classes={text!r}: expected class numbers separated by commas, e.g. '6,2,4'."
        ) from None
    if len(set(classes)) != len(classes) or len(classes) == 1 or min(classes, default=0) < 0:
        raise config_lib.ConfigError(
            f"teacher.noise_classes={text!r}: name two or more distinct classes (>= 0), or none."
        )
    return classes


def validate(config) -> ml_collections.ConfigDict:
    """Checks an active config against `defaults()`; returns it. Raises ConfigError."""
    if isinstance(config, dict):
        config = ml_collections.ConfigDict(config)
    known = config_lib._flat_keys(defaults())
    for name in config_lib._flat_keys(config):
        if name.startswith(("student.", "teacher.train.")):
            continue  # checked against the run schema below
        if name not in known:
            raise config_lib._unknown_error(name, known, "the active config")
    for name in ("dataset", "active", "teacher", "student"):
        if name not in config:
            raise config_lib.ConfigError(f"The active config has no '{name}' section.")
    config_lib.validate(config.student, where="active config 'student'")
    if config.student.distill.teacher_workdir:
        raise config_lib.ConfigError(
            "student.distill.teacher_workdir must be empty: the teacher is "
            "set in teacher.workdir and only queried on bought points."
        )
    if len(config.teacher.train):
        config_lib.validate(config.teacher.train, where="active config 'teacher.train'")
    a = config.active
    strategies(config)
    if a.informativeness not in INFORMATIVENESS:
        raise config_lib.ConfigError(
            f"active.informativeness={a.informativeness!r} is not one of {list(INFORMATIVENESS)}."
        )
    if a.m_estimate not in ("overall", "informative", "zero"):
        raise config_lib.ConfigError(f"active.m_estimate={a.m_estimate!r} is not 'overall', 'informative' or 'zero'.")
    for field in (
        "rounds",
        "budget_per_round",
        "num_labelled",
        "num_validation",
        "kcenter_chunk",
        "predict_batch_size",
    ):
        if int(a[field]) <= 0:
            raise config_lib.ConfigError(f"active.{field} must be positive, got {a[field]}.")
    if a.pool_size < 0:
        raise config_lib.ConfigError(f"active.pool_size must be >= 0 (0 = all), got {a.pool_size}.")
    if a.num_labelled < config.student.batch_size:
        raise config_lib.ConfigError(
            f"active.num_labelled={a.num_labelled} is smaller than student.batch_size={config.student.batch_size}."
        )
    if not 0.0 <= config.teacher.label_noise < 1.0:
        raise config_lib.ConfigError(f"teacher.label_noise={config.teacher.label_noise} must be in [0, 1).")
    if config.teacher.label_noise and not len(config.teacher.train):
        raise config_lib.ConfigError("teacher.label_noise applies when the teacher is trained here: set teacher.train.")
    if noise_classes(config) and not config.teacher.label_noise:
        raise config_lib.ConfigError("teacher.noise_classes confines teacher.label_noise, which is 0: set both.")
    if not config.teacher.workdir:
        raise config_lib.ConfigError("teacher.workdir is empty: name a Titans teacher run (or where to train one).")
    if not 0.0 < a.informative_fraction <= 1.0:
        raise config_lib.ConfigError(f"active.informative_fraction must be in (0, 1], got {a.informative_fraction}.")
    return config
