"""Cascades in the strong-teacher regime, trained fairly and at the strength the paper implies (issue 33).

The students and baselines of configs/titans_fmnist_strong.py, with three changes:

1. **One recipe for every student** (`titans.cascade.fair.apply_recipe`): cascade students and equal-cost
   single-student baselines alike train `epochs` epochs (default 30, the teacher's), un-augmented (their soft
   labels are one per row: cross-fitted, so no student can augment; none does), with SGD + Nesterov, cosine
   schedule, batch 128, and the same learning-rate search over `lrs` (default 0.02, 0.05, 0.1): one stage per
   rate, `<stage>_lr<i>`, the rate chosen per student by its accuracy on train[90%:] (the threshold split,
   held out from every stage; never the test split; `titans.cascade.fair.select`).
2. **Held-out teacher outputs**: soft labels and every "is the teacher right" target come from cross-fitted
   teachers (`crossfit`: K teacher runs separated by ';', each trained on train[:90%] without its fold),
   `distill.crossfit_teachers`; the cascade's teacher is still `teacher_dir`.
3. **Objectives at strength**: standard KD; easy-weighted KD at strengths `strengths` (weight ** strength,
   default 1, 4, 16); the budget-sized easy subset (`easy_budget`) at deferral rate `rate` (default 0.25) by
   the teacher's loss with each treatment (drop, flatten, defer) and, given `reference_dir` (a finished first
   pass of this config: its `<size>_standard_lr0` runs), by "teacher right, student wrong"; and learning to
   defer weighted as the Mozannar-Sontag surrogate (`defer_ms`). Gates add the post-hoc estimator
   (`posthoc_diff`).

    titans-train --config=configs/titans_fmnist_strong_fair.py:seed=0,teacher_dir=T,crossfit=F0;F1 --workdir=W/seed0

arg: comma-separated key=value: seed (0), epochs (30), lrs (0.02+0.05+0.1), sizes (tiny+small), baselines
(large+resnet8), strengths (1+4+16), rate (0.25), teacher_dir, crossfit (';'-separated fold teacher runs),
reference_dir (''). Expected: not yet run (about 4 CPU-hours a seed for the default sizes).
"""

import os

import ml_collections

from titans.cascade import fair
from titans.config import load_config_file
from titans.config_builders import parse_config_arg

STRONG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "titans_fmnist_strong.py")


def _variant(base: ml_collections.ConfigDict, name: str, **distill) -> ml_collections.ConfigDict:
    s = ml_collections.ConfigDict(base.to_dict())
    s.name = name
    for key, value in distill.items():
        node = s.distill
        *path, leaf = key.split(".")
        for p in path:
            node = node[p]
        node[leaf] = value
    return s


def _objectives(c, sizes, a) -> None:
    """Adds the objective stages of every size, built from its standard stage."""
    for size in sizes:
        base = c.stages[f"{size}_standard"]
        extra = {}
        for k in a["strengths"].split("+"):
            extra[f"{size}_easy_s{k}"] = {"objective": "easy_weighted", "easy.strength": float(k)}
        for t in ("drop", "flatten", "defer"):
            extra[f"{size}_budget_{t}"] = {
                "objective": "easy_budget",
                "budget.rate": float(a["rate"]),
                "budget.treatment": t,
            }
            if a["reference_dir"]:
                extra[f"{size}_budget2_{t}"] = {
                    "objective": "easy_budget",
                    "budget.rate": float(a["rate"]),
                    "budget.treatment": t,
                    "budget.score": "teacher_right_student_wrong",
                    "budget.reference_workdir": os.path.join(
                        os.path.abspath(a["reference_dir"]), f"{size}_standard_lr0"
                    ),
                }
        extra[f"{size}_defer_ms"] = {"objective": "defer_ms"}
        for name, fields in extra.items():
            c.stages[name] = _variant(base, name, **fields)
        at = list(c.stage_order).index(f"{size}_standard") + 1
        c.stage_order = (*c.stage_order[:at], *extra, *c.stage_order[at:])
        c.cascade.students = (*c.cascade.students, *extra)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(
            seed="0",
            epochs="30",
            lrs="0.02+0.05+0.1",
            sizes="tiny+small",
            baselines="large+resnet8",
            strengths="1+4+16",
            rate="0.25",
            teacher_dir="workdirs/fmnist_strong/teacher",
            crossfit="workdirs/fmnist_strong/teacher_fold0;workdirs/fmnist_strong/teacher_fold1",
            reference_dir="",
        ),
        "titans_fmnist_strong_fair.py",
    )
    sizes = a["sizes"].split("+")
    c = load_config_file(
        f"{STRONG}:seed={a['seed']},epochs={a['epochs']},sizes={a['sizes']},objectives=standard,"
        f"baselines={a['baselines']},teacher_dir={a['teacher_dir']},cache_dir=unused"
    )
    folds = ",".join(os.path.abspath(d) for d in a["crossfit"].split(";") if d)
    for name in c.stage_order:
        d = c.stages[name].distill
        d.teacher_mode, d.cache.dir, d.crossfit_teachers = "online", "", folds
    _objectives(c, sizes, a)
    c.cascade.gates = (*c.cascade.gates, "posthoc_diff")
    return fair.apply_recipe(
        c,
        epochs=float(a["epochs"]),
        augment=False,
        learning_rates=tuple(float(x) for x in a["lrs"].split("+")),
        select_split=c.cascade.val_split,
    )
