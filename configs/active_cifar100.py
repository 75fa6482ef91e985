"""Robust active distillation on CIFAR-100 at paper scale: which unlabelled images to buy ResNet soft labels for.

    python -m titans.active.main --config=configs/active_cifar100.py:teacher_dir=RUN,seed=0 \
        --workdir=workdirs/active_cifar100/seed0

Needs TFDS's cifar100 prepared once (`pip install -e ".[tf]"`, then `titans-prepare cifar100`) and a teacher
run that did not train on train[50%:], e.g. the ResNet-110 of configs/titans_cifar100.py with
`dataset.train_split=train[:50%]` (the flag of `titans-train`). Data: train[50%:] (25,000 images) is cut,
with `seed`, into 1,000 labelled images, a labelled validation split of 2,000 (used only to estimate the
teacher's mistakes m) and a pool of 22,000. Each strategy (random, margin, entropy, kcenter, robust) buys
`budget` (2,500) soft labels a round for `rounds` (4) rounds, budgets 2,500 to 10,000; after each round a
fresh ResNet-20 student is trained for 60 epochs over the labelled + bought images (cross-entropy on the
labels, KL to the teacher at T = 4 on the bought ones) and tested on the 10,000 test images.

arg: comma-separated key=value: teacher_dir (required), seed (0), strategies separated by '+' (default
all five), rounds (4), budget (2500), m (overall | informative | zero), epochs (60).
Expected runtime, an ESTIMATE (not run in this repository): the student dominates: 5 strategies x 4
rounds x 60 epochs over at most 11,000 images = about 13 M example-steps of ResNet-20 (76 MFLOPs forward)
a seed; on one H100/A100 in bfloat16, 1-2 h a seed (small ResNets are latency-bound), plus a teacher
forward over the pool each round (seconds); on a TPU v4-8 about the same. The 3-seed table of
docs/results/active_fmnist.md has its CIFAR-100 counterpart with the same commands and `titans-results`.
"""

import ml_collections

from titans.active.config import defaults
from titans.config_builders import parse_config_arg


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(
            teacher_dir="",
            seed="0",
            strategies="random+margin+entropy+kcenter+robust",
            rounds="4",
            budget="2500",
            m="overall",
            epochs="60",
        ),
        "active_cifar100.py",
    )
    if not a["teacher_dir"]:
        raise ValueError("active_cifar100.py needs teacher_dir=RUN (a teacher that did not train on train[50%:]).")
    c = defaults()
    c.name = "active_cifar100"
    c.seed = int(a["seed"])
    c.dataset.name = "cifar100"
    c.dataset.split = "train[50%:]"
    c.dataset.eval_split = "test"
    c.active.strategies = a["strategies"].replace("+", ",")
    c.active.num_labelled = 1000
    c.active.num_validation = 2000
    c.active.rounds = int(a["rounds"])
    c.active.budget_per_round = int(a["budget"])
    c.active.predict_batch_size = 1000
    c.active.m_estimate = a["m"]
    c.teacher.workdir = a["teacher_dir"]

    s = c.student
    s.model.name = "resnet20"
    s.model.kwargs = ml_collections.ConfigDict()
    s.dataset.augmentation = "crop_flip"
    s.batch_size = 128
    s.eval_batch_size = 1000
    s.total_steps = 0
    s.total_epochs = float(a["epochs"])
    s.optimizer.name = "sgd"
    s.optimizer.learning_rate = 0.1
    s.optimizer.weight_decay = 5e-4
    s.schedule.name = "cosine"
    s.distill.loss = "kd"
    s.distill.temperature = 4.0
    s.dtype = "auto"
    return c
