"""Helpers for config files: their `:ARG` string, and teacher -> students cascade pipelines.

Light on purpose (ml_collections only): config files are loaded before JAX starts.
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

# Student objectives of the cascade configs: name -> (distill.objective, distill.easy fields, other distill fields).
# The committed studies read teacher correctness on the teacher's own training rows (in-sample): those
# objectives say so with allow_in_sample_teacher; configs/titans_fmnist_strong_fair.py cross-fits instead.
_IN_SAMPLE = dict(allow_in_sample_teacher=True)
STUDENT_OBJECTIVES = {
    "standard": ("standard", {}, {}),
    "easy": ("easy_weighted", dict(rule="confidence", sharpness=2.0, floor=0.1), {}),
    "easy_correct": ("easy_weighted", dict(rule="correctness", sharpness=4.0, floor=0.1), _IN_SAMPLE),
    # The student's own probability of the teacher's class, after 200 steps of plain KD.
    "easy_agree": (
        "easy_weighted",
        dict(rule="agreement", sharpness=2.0, floor=0.1, warmup_steps=200),
        _IN_SAMPLE,
    ),
    # Soft targets flattened towards uniform by the hardness 1 - p_teacher(label): the student learns to be
    # unsure where the teacher is wrong or unsure, which a confidence gate can read.
    "flatten": ("flatten", dict(rule="correctness", sharpness=1.0, floor=0.0), _IN_SAMPLE),
    "defer": ("defer", {}, _IN_SAMPLE),
    # The cost-sensitive surrogate: a deferral pays only the teacher's advantage above c = 0.1.
    "defer_cost": ("defer", {}, dict(defer_cost=0.1, **_IN_SAMPLE)),
}


def parse_config_arg(arg: str, defaults: dict, config_name: str) -> dict:
    """`key=value,key=value` -> dict over `defaults`; an unknown key names the config and the known keys."""
    out = dict(defaults)
    for part in filter(None, (arg or "").split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise ValueError(f"Unknown argument '{key}' for {config_name}; expected {sorted(out)}.")
        out[key] = value
    return out


def sizes_and_baselines(sizes: str, baselines: str) -> tuple[list[str], tuple[str, ...]]:
    """A config's `sizes` and `baseline(s)` args ('a+b', '' for none) -> every student size to build (the
    sizes, then baselines not among them) and the baseline sizes, for `cascade_pipeline`."""
    size_list = [s for s in sizes.split("+") if s]
    base = tuple(b for b in baselines.split("+") if b)
    return [*size_list, *(b for b in base if b not in size_list)], base


def cascade_pipeline(
    teacher: ml_collections.ConfigDict,
    students: dict[str, Callable[[], ml_collections.ConfigDict]],
    objectives: list[str],
    *,
    temperature: float,
    alpha: float,
    cascade: dict,
    baselines: tuple[str, ...] = (),
) -> ml_collections.ConfigDict:
    """A pipeline: the teacher stage, then every student size x objective distilled from it, then `cascade`.

    `students` maps a size name to a function returning that student's run config (model, data,
    schedule); this adds the distillation fields. Stages are named `<size>_<objective>`. Sizes named in
    `baselines` are trained with the standard objective only: the equal-cost single students a cascade
    has to beat (the cascade report compares them).
    """
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict()
    c.stages.teacher = teacher
    order = ["teacher"]
    for size, make in students.items():
        for objective in ("standard",) if size in baselines else objectives:
            if objective not in STUDENT_OBJECTIVES:
                raise ValueError(f"Unknown objective '{objective}'; expected {sorted(STUDENT_OBJECTIVES)}.")
            s = make()
            s.name = f"{size}_{objective}"
            s.distill.teacher_workdir = "@teacher"
            s.distill.loss = "kd"
            s.distill.temperature = temperature
            s.distill.alpha = alpha
            kind, easy, extra = STUDENT_OBJECTIVES[objective]
            s.distill.objective = kind
            s.distill.easy.update(easy)
            s.distill.update(extra)
            c.stages[s.name] = s
            order.append(s.name)
    unknown = set(baselines) - set(students)
    if unknown:
        raise ValueError(f"Baseline sizes {sorted(unknown)} are not student sizes {sorted(students)}.")
    c.stage_order = tuple(order)
    defaults = dict(
        teacher="teacher",
        students=tuple(order[1:]),
        gates=("msp", "margin", "entropy", "defer_output", "learned"),
        num_thresholds=201,
        target_deferral_rates=(0.1, 0.2, 0.3, 0.5),
        baselines=tuple(f"{size}_standard" for size in baselines),
    )
    c.cascade = ml_collections.ConfigDict({**defaults, **cascade})  # `cascade` may replace a default
    return c


def with_shared_teacher(c: ml_collections.ConfigDict, teacher_dir: str) -> ml_collections.ConfigDict:
    """A `cascade_pipeline` without its teacher stage: every seed shares the finished teacher run `teacher_dir`,
    which the cascade and every student stage read instead of "@teacher"."""
    del c.stages["teacher"]
    c.stage_order = tuple(n for n in c.stage_order if n != "teacher")
    c.cascade.teacher = teacher_dir
    for name in c.stage_order:
        c.stages[name].distill.teacher_workdir = teacher_dir
    return c
