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
from titans.config_builders import cascade_pipeline, parse_config_arg

_HERE = os.path.dirname(__file__)

STUDENT_SIZES = {
    "tiny": dict(channels=(4, 8), dense=16),
    "small": dict(channels=(8, 16), dense=32),
    "medium": dict(channels=(16, 32), dense=64),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(seed="0", epochs="2", teacher_epochs="3", sizes="tiny+small", objectives="standard+easy+defer"),
        "titans_fmnist.py",
    )
    seed = int(a["seed"])

    def run(epochs: str, **model_kwargs) -> ml_collections.ConfigDict:
        c = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + ":" + epochs)
        c.seed = seed
        c.dataset.train_split = "train[:90%]"
        c.log_every_steps = 100
        if model_kwargs:
            c.model.kwargs = ml_collections.ConfigDict(model_kwargs)
        return c

    students = {size: (lambda size=size: run(a["epochs"], **STUDENT_SIZES[size])) for size in a["sizes"].split("+")}
    return cascade_pipeline(
        run(a["teacher_epochs"]),
        students,
        a["objectives"].split("+"),
        temperature=4.0,
        alpha=0.9,
        cascade=dict(val_split="train[90%:]", test_split="test", batch_size=500),
    )
