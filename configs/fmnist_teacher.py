"""Fashion-MNIST CNN teacher: conv(32)-conv(64)-dense(128) trained with cross-entropy.

    python -m titans.main --config=configs/fmnist_teacher.py --workdir=workdirs/fmnist_teacher

arg: number of epochs (default 3). Runtime on 2 laptop CPU cores: about 40 s an epoch.
Expected: about 91% test accuracy after 3 epochs (the quickstart's teacher, configs/quickstart.py).
"""

import ml_collections

from titans.config import base_config


def get_config(arg: str = "3") -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "teacher"
    c.dataset.name = "fashion_mnist"
    c.model.name = "cnn"
    c.model.kwargs = ml_collections.ConfigDict(dict(channels=(32, 64), dense=128))
    c.batch_size = 128
    c.total_epochs = float(arg)
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 100
    c.checkpoint.every_steps = 500
    return c
