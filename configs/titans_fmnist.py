"""Titans cascades on Fashion-MNIST: a CNN teacher, students of two sizes, every student objective.

    python -m titans.main --config=configs/titans_fmnist.py:seed=0 --workdir=workdirs/titans_fmnist/seed0

Stages (each in WORKDIR/<stage>): the teacher (conv 32-64, dense 128; 3 epochs), then for each student
size (tiny: conv 4-8, dense 16; small: conv 8-16, dense 32) and each objective
  standard  Hinton KD (T=4, alpha=0.9), the baseline,
  easy      easy-weighted KD: weight = 0.1 + 0.9 * teacher_confidence**2,
  (ablations, not in the default list: easy_correct, weight 0.1 + 0.9 * p_teacher(label)**4;
   easy_agree, weight 0.1 + 0.9 * p_student(teacher's class)**2 after 200 steps of plain KD)
  defer     a student with an extra "defer" output, learning-to-defer surrogate with the teacher as expert,
a distilled student (2 epochs). Students and teacher train on train[:90%]; the cascade section then
picks gate thresholds on the held-out train[90%:] (6,000 images) and reports on the 10,000 test images:
WORKDIR/cascade.json and WORKDIR/cascade_*.png.

arg: comma-separated key=value: seed (0), epochs (students, 2), teacher_epochs (3), sizes (tiny+small),
objectives (standard+easy+defer).
Runtime on 2 CPU cores: about 12 minutes a seed. Results over seeds 0,1,2: docs/results/titans_fmnist.md.
"""

import os

import ml_collections

from titans.config import load_config_file

_HERE = os.path.dirname(__file__)

STUDENT_SIZES = {
    "tiny": dict(channels=(4, 8), dense=16),
    "small": dict(channels=(8, 16), dense=32),
    "medium": dict(channels=(16, 32), dense=64),
}


# objective name -> (distill.objective, distill.easy fields)
OBJECTIVES = {
    "standard": ("standard", {}),
    "easy": ("easy_weighted", dict(rule="confidence", sharpness=2.0, floor=0.1)),
    "easy_correct": ("easy_weighted", dict(rule="correctness", sharpness=4.0, floor=0.1)),
    # The student's own probability of the teacher's class, after 200 steps (~half an epoch) of plain KD.
    "easy_agree": ("easy_weighted", dict(rule="agreement", sharpness=2.0, floor=0.1, warmup_steps=200)),
    "defer": ("defer", {}),
}


def _args(arg: str) -> dict:
    out = dict(seed="0", epochs="2", teacher_epochs="3", sizes="tiny+small", objectives="standard+easy+defer")
    for part in filter(None, arg.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise ValueError(f"Unknown argument '{key}' for titans_fmnist.py; expected {sorted(out)}.")
        out[key] = value
    return out


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = _args(arg)
    seed = int(a["seed"])
    teacher = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + ":" + a["teacher_epochs"])
    teacher.seed = seed
    teacher.dataset.train_split = "train[:90%]"
    teacher.log_every_steps = 100

    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict()
    c.stages.teacher = teacher
    order = ["teacher"]
    for size in a["sizes"].split("+"):
        for objective in a["objectives"].split("+"):
            s = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + ":" + a["epochs"])
            s.name = f"{size}_{objective}"
            s.seed = seed
            s.dataset.train_split = "train[:90%]"
            s.log_every_steps = 100
            s.model.kwargs = ml_collections.ConfigDict(STUDENT_SIZES[size])
            s.distill.teacher_workdir = "@teacher"
            s.distill.loss = "kd"
            s.distill.temperature = 4.0
            s.distill.alpha = 0.9
            if objective not in OBJECTIVES:
                raise ValueError(f"Unknown objective '{objective}' for titans_fmnist.py; expected {sorted(OBJECTIVES)}.")
            kind, easy = OBJECTIVES[objective]
            s.distill.objective = kind
            s.distill.easy.update(easy)
            c.stages[s.name] = s
            order.append(s.name)
    c.stage_order = tuple(order)

    c.cascade = ml_collections.ConfigDict()
    c.cascade.teacher = "teacher"
    c.cascade.students = tuple(order[1:])
    c.cascade.val_split = "train[90%:]"
    c.cascade.test_split = "test"
    c.cascade.gates = ("msp", "margin", "entropy", "defer_output", "learned")
    c.cascade.num_thresholds = 201
    c.cascade.batch_size = 500
    c.cascade.target_deferral_rates = (0.1, 0.2, 0.3, 0.5)
    return c
