"""Fashion-MNIST student distilled from a teacher run: a CNN about 13x cheaper (FLOPs) than the teacher.

    python -m titans.main --config=configs/fmnist_student.py:workdirs/fmnist_teacher \
        --workdir=workdirs/fmnist_student

arg: the teacher's workdir[,epochs] (epochs default 3). Hinton KD at T=4 with alpha=0.9 on the soft
term. Runtime on 2 laptop CPU cores: about 30 s an epoch with the teacher's forward pass included.
Expected: a few points below the teacher (the quickstart's student, configs/quickstart.py, is this model).
"""

import ml_collections

from titans.config import load_config_file


def get_config(arg: str = "workdirs/fmnist_teacher") -> ml_collections.ConfigDict:
    teacher_workdir, _, epochs = arg.partition(",")
    import os

    c = load_config_file(os.path.join(os.path.dirname(__file__), "fmnist_teacher.py") + ":" + (epochs or "3"))
    c.name = "student"
    c.model.kwargs = ml_collections.ConfigDict(dict(channels=(8, 16), dense=32))
    c.distill.teacher_workdir = teacher_workdir
    c.distill.loss = "kd"
    c.distill.alpha = 0.9
    c.distill.temperature = 4.0
    return c


def get_sweep(arg: str = "workdirs/fmnist_teacher") -> dict:
    """KD ablation: temperature x alpha, 3 seeds (24 runs; about 3 min each on 2 CPU cores).

        python -m titans.sweep --config=configs/fmnist_student.py:workdirs/fmnist_teacher \
            --workdir=workdirs/kd_sweep --parallel=2
    """
    del arg
    return {"product": {"distill.temperature": [1.0, 2.0, 4.0, 8.0], "distill.alpha": [0.5, 0.9]}, "seeds": [0, 1, 2]}
