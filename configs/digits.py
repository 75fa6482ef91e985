"""Smoke test on scikit-learn's digits (1,797 8x8 images, offline): an MLP in a few seconds.

    python -m titans.main --config=configs/digits.py --workdir=workdirs/digits

arg: optional teacher workdir, which turns the run into a distillation of a smaller MLP.
Runtime: about 10 s on 2 CPU cores, most of it compilation. Expected: about 95% test accuracy.
"""

import ml_collections

from titans.config import base_config


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "digits"
    c.dataset.name = "digits"
    c.model.name = "mlp"
    c.model.kwargs = ml_collections.ConfigDict(dict(hidden=(64,)))
    c.batch_size = 64
    c.eval_batch_size = 64
    c.total_steps = 200
    c.optimizer.learning_rate = 0.1
    c.log_every_steps = 50
    c.checkpoint.every_steps = 100
    if arg:
        c.name = "digits_student"
        c.model.kwargs = ml_collections.ConfigDict(dict(hidden=(16,)))
        c.distill.teacher_workdir = arg
    return c


def get_sweep(arg: str = "") -> dict:
    """A small sweep (the sweep runner's smoke test): learning rate x model width (zipped), 2 seeds.

    python -m titans.sweep --config=configs/digits.py --workdir=workdirs/digits_sweep --parallel=2
    """
    del arg
    return {
        "product": {"optimizer.learning_rate": [0.05, 0.2]},
        "zip": {"model.kwargs.hidden": [(16,), (64,)], "batch_size": [32, 64]},
        "seeds": [0, 1],
    }
