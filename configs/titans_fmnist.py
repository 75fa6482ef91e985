"""Titans cascades on Fashion-MNIST: a CNN teacher, students of two sizes, every student objective.

    python -m titans.main --config=configs/titans_fmnist.py:seed=0 --workdir=workdirs/titans_fmnist/seed0

Stages (each in WORKDIR/<stage>): the teacher (conv 32-64, dense 128; 3 epochs), then for each student
size (tiny: conv 4-8, dense 16; small: conv 8-16, dense 32) and each objective
  standard    Hinton KD (T=4, alpha=0.9), the baseline,
  easy        easy-weighted KD: weight = 0.1 + 0.9 * teacher_confidence**2,
  flatten     KD towards targets flattened to uniform by the hardness 1 - p_teacher(label), with the
              label term scaled by 1 - hardness: the student learns to be unsure where the teacher is,
  defer       a student with an extra "defer" output, learning-to-defer surrogate with the teacher as
              expert, its KD term at the same T=4 (with T^2) as standard KD,
  defer_cost  the same with a deferral cost c = 0.1 (a deferral pays only the teacher's advantage above c),
  (ablations, not in the default list: easy_correct, weight 0.1 + 0.9 * p_teacher(label)**4;
   easy_agree, weight 0.1 + 0.9 * p_student(teacher's class)**2 after 200 steps of plain KD)
a distilled student (2 epochs); and the equal-cost baseline, a `medium` student (conv 16-32, dense 64;
about a quarter of the teacher's FLOPs) distilled with standard KD. Students and teacher train on
train[:90%]; the cascade section then picks gate thresholds on the held-out train[90%:] (6,000 images;
an overlap with any stage's training split is refused) and reports on the 10,000 test images:
WORKDIR/cascade.json, WORKDIR/cascade_logits.npz (every stage's logits, float16) and WORKDIR/cascade_*.png.

arg: comma-separated key=value: seed (0), epochs (students, 2), teacher_epochs (3), sizes (tiny+small),
objectives (standard+easy+flatten+defer+defer_cost), baseline (medium; '' for none).
Runtime on 2 CPU cores: about 25 minutes a seed. Results over seeds 0,1,2: docs/results/titans_fmnist.md
(`titans-results rebuild` regenerates it from results/titans_fmnist/).
"""

import os

import ml_collections

from titans.config import load_config_file
from titans.config_builders import cascade_pipeline, parse_config_arg, sizes_and_baselines

_HERE = os.path.dirname(__file__)

STUDENT_SIZES = {
    "tiny": dict(channels=(4, 8), dense=16),
    "small": dict(channels=(8, 16), dense=32),
    "medium": dict(channels=(16, 32), dense=64),
}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(
            seed="0",
            epochs="2",
            teacher_epochs="3",
            sizes="tiny+small",
            objectives="standard+easy+flatten+defer+defer_cost",
            baseline="medium",
        ),
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

    sizes, baselines = sizes_and_baselines(a["sizes"], a["baseline"])
    students = {size: (lambda size=size: run(a["epochs"], **STUDENT_SIZES[size])) for size in sizes}
    return cascade_pipeline(
        run(a["teacher_epochs"]),
        students,
        a["objectives"].split("+"),
        temperature=4.0,
        alpha=0.9,
        cascade=dict(val_split="train[90%:]", test_split="test", batch_size=500),
        baselines=baselines,
    )
