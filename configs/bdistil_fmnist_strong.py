"""B-DISTIL in the strong-teacher regime at real budgets: members up to the cost of the ResNet-20 teacher,
each trained with its own epoch budget, FIND-WL's edge measured on rows the members never train on.

    # once: the teacher of configs/fmnist_strong_teacher.py, and its outputs on the members' rows
    titans-train --config=configs/fmnist_strong_teacher.py --workdir=workdirs/fmnist_strong/teacher
    titans-cache --teacher_workdir=workdirs/fmnist_strong/teacher --dataset=fashion_mnist \
        --split='train[:80%]' --out=workdirs/fmnist_strong/cache80
    # per seed (and per gamma of GAMMAS, and per game: weights=example | example_class)
    titans-train --config=configs/bdistil_fmnist_strong.py:seed=0,gamma=0.01 \
        --workdir=workdirs/bdistil_fmnist_strong_real/gamma0.01/seed0
    # raw outputs: titans-results collect into a study registered per gamma in titans/results/studies.py

Rows of Fashion-MNIST's train split: members train on train[:80%] (48,000); FIND-WL's edge is measured on
train[80%:90%] (6,000 rows no member trains on; the teacher did, as it did all of train[:90%]); train[90%:]
(6,000) weighs resched's average; results on the 10,000 test images.

Candidates (FIND-WL tries them in this order, by XLA FLOPs per 28x28x1 image, as a share of the teacher's
56.9 MFLOPs), each with its own epoch budget (`epochs` of the entry):
  medium       CNN 16-32 / 64                 2.15 MFLOPs    3.8%   15 epochs
  resnet20_w4  ResNet-20, widths 4-8-16       3.82 MFLOPs    6.7%   20 epochs
  large        CNN 32-64 / 128                7.97 MFLOPs   14.0%   15 epochs
  resnet20_w8  ResNet-20, widths 8-16-32     14.5 MFLOPs    25.6%   20 epochs
  resnet8      ResNet-8, widths 16-32-64     17.4 MFLOPs    30.6%   20 epochs
  resnet20_w12 ResNet-20, widths 12-24-48    32.2 MFLOPs    56.7%   25 epochs
  resnet20_w16 ResNet-20, widths 16-32-64    56.9 MFLOPs   100%     30 epochs (the teacher's architecture)
The no-resched curve picks, per B-DISTIL prefix, the closest of the same architectures plus ResNet-20 at
widths 24-48-96 (223%) and 32-64-128 (about 400%), with the same per-architecture budgets (40 epochs for the
two widest). The budgets are this config's choice of "trained to convergence" (the teacher reached its
accuracy in 30 epochs with augmentation; members read one cached output per image, so they train
un-augmented); each member's metrics.jsonl shows whether its curve had flattened.
Member training: SGD + Nesterov 0.9, lr 0.05, 100 warm-up steps then cosine, weight decay 5e-4, batch 128,
KD (T = 4, alpha = 0.9) on the summed logits, 4 rounds, the 32-wide `features` connection.

arg: comma-separated key=value: seed (0), gamma (0.01; the sweep: GAMMAS), weights (example |
example_class), rounds (4), teacher_dir (workdirs/fmnist_strong/teacher), cache_dir
(workdirs/fmnist_strong/cache80; "" = the teacher runs in every member step), edge_split (train[80%:90%];
"" = the edge on the members' training rows, as the earlier studies measured it).
Expected runtime, an ESTIMATE (not run here): far too slow for a 2-core CPU (one epoch of the widest
member alone is about 3 minutes there); on one H100 roughly 2-4 hours a seed and gamma with every variant.
Results: pending (no raw outputs yet; the committed bdistil_fmnist_strong study is the small-candidate one).
"""

import os

import ml_collections

from titans.config import base_config
from titans.config_builders import parse_config_arg
from titans.ensemble.config import defaults, model_entry

GAMMAS = (0.005, 0.01, 0.02, 0.05)  # the gamma sweep: one run per (seed, gamma), one study per gamma

# name -> (model, kwargs, epochs), smallest first (FIND-WL sorts by measured FLOPs anyway).
CANDIDATES = {
    "medium": ("cnn", dict(channels=(16, 32), dense=64), 15),
    "resnet20_w4": ("resnet20", dict(widths=(4, 8, 16)), 20),
    "large": ("cnn", dict(channels=(32, 64), dense=128), 15),
    "resnet20_w8": ("resnet20", dict(widths=(8, 16, 32)), 20),
    "resnet8": ("resnet8", {}, 20),
    "resnet20_w12": ("resnet20", dict(widths=(12, 24, 48)), 25),
    "resnet20_w16": ("resnet20", dict(widths=(16, 32, 64)), 30),
}
NO_RESCHED = {
    **CANDIDATES,
    "resnet20_w24": ("resnet20", dict(widths=(24, 48, 96)), 40),
    "resnet20_w32": ("resnet20", dict(widths=(32, 64, 128)), 40),
}


def _member(seed: int, teacher_dir: str, cache_dir: str) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = "member"
    c.seed = seed
    c.dataset.name = "fashion_mnist"
    c.dataset.train_split = "train[:80%]"
    c.batch_size = 128
    c.total_epochs = 15.0  # every entry below sets its own
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 100
    c.log_every_steps = 100
    c.distill.teacher_workdir = teacher_dir
    c.distill.loss = "kd"
    c.distill.temperature = 4.0
    c.distill.alpha = 0.9
    if cache_dir:  # soft labels from the teacher's cache over train[:80%]: members train at student-only cost
        c.distill.teacher_mode = "cache"
        c.distill.cache.dir = cache_dir
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(
            seed="0",
            gamma="0.01",
            weights="example",
            rounds="4",
            teacher_dir="workdirs/fmnist_strong/teacher",
            cache_dir="workdirs/fmnist_strong/cache80",
            edge_split="train[80%:90%]",
        ),
        "bdistil_fmnist_strong.py",
    )
    teacher_dir = os.path.abspath(a["teacher_dir"])
    cache_dir = os.path.abspath(a["cache_dir"]) if a["cache_dir"] else ""
    e = defaults()
    e.member = _member(int(a["seed"]), teacher_dir, cache_dir)
    e.candidates = ml_collections.ConfigDict(
        {n: model_entry(m, epochs=ep, **kw) for n, (m, kw, ep) in CANDIDATES.items()}
    )
    e.no_resched = ml_collections.ConfigDict(
        {n: model_entry(m, epochs=ep, **kw) for n, (m, kw, ep) in NO_RESCHED.items()}
    )
    e.rounds = int(a["rounds"])
    e.weights = a["weights"]
    e.gamma = float(a["gamma"])
    e.edge_split = a["edge_split"]
    e.connect.layer = "features"
    e.connect.join = "concat"
    e.connect.width = 32
    e.val_split = "train[90%:]"
    e.test_split = "test"
    e.predict_batch_size = 500
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict()
    c.stage_order = ()  # the shared teacher run is `teacher_dir`
    c.ensemble = e
    return c
