"""Titans cascades on CIFAR-100 at paper scale: ResNet-110 (or WRN-40-2) teacher, ResNet-8/20 students.

    python -m titans.main --config=configs/titans_cifar100.py:seed=0 --workdir=workdirs/titans_cifar100/seed0
    python -m titans.main --config=configs/titans_cifar100.py:teacher=wrn_40_2,seed=0 --workdir=...

Needs TFDS's cifar100 prepared once (`pip install -r requirements-tf.txt`, then
`python -m titans.data.prepare cifar100`). Recipe of the CRD / KD benchmarks: SGD with Nesterov
momentum, batch 64, lr 0.05, weight decay 5e-4, 240 epochs with
the learning rate divided by 10 at epochs 150, 180 and 210; random crop + flip. Teacher and students
train on train[:90%]; gate thresholds are chosen on train[90%:] (5,000 images), results on the
10,000 test images: WORKDIR/cascade.json and WORKDIR/cascade_*.png.

Stages: teacher, then {resnet8, resnet20} x {standard, easy, flatten, defer, defer_cost} (the objectives
of configs/titans_fmnist.py; Hinton KD with T=4, alpha=0.9), and the equal-cost baseline resnet32 (about
a quarter of the ResNet-110 teacher's FLOPs) with standard KD.

arg: comma-separated key=value: seed (0), teacher (resnet110 | wrn_40_2), epochs (240, students and
teacher), students (resnet8+resnet20), objectives (standard+easy+flatten+defer+defer_cost), baseline
(resnet32; '' for none), teacher_split (train[:90%]). With students= and baseline= both empty the config
is the teacher alone (e.g. `students=,baseline=,teacher_split=train[:50%]` for configs/active_cifar100.py).

XLA FLOPs per example (forward, 32x32x3, 100 classes): resnet110 486 M, wrn_40_2 598 M, resnet20 76 M,
resnet8 24 M; resnet32 129 M (26% of resnet110).
Expected runtime, an ESTIMATE (no accelerator run of this config has been made in this repository):
small CIFAR ResNets at batch 64 are bound by per-layer latency, not FLOPs; on one H100 or A100 in
bfloat16, about 0.5-1 h for the ResNet-110 teacher and 10-20 min per student (the teacher forward
adds to each), so 3-5 h a seed; on a TPU v4-8, similar. Expected accuracy (published numbers for this
recipe): teacher about 74%, ResNet-20 KD about 70-71%, ResNet-8 KD about 60-61%.
"""

import ml_collections

from titans.config import base_config
from titans.config_builders import cascade_pipeline, parse_config_arg, sizes_and_baselines

STUDENTS = ("resnet8", "resnet20")


def _run(name: str, model: str, seed: int, epochs: float, split: str = "train[:90%]") -> ml_collections.ConfigDict:
    c = base_config()
    c.name = name
    c.seed = seed
    c.dataset.name = "cifar100"
    c.dataset.train_split = split
    c.model.name = model
    c.batch_size = 64
    c.eval_batch_size = 500
    c.total_epochs = epochs
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "step"
    c.schedule.step_boundaries = (150 / 240, 180 / 240, 210 / 240)
    c.schedule.step_factor = 0.1
    c.checkpoint.every_steps = 2000
    c.log_every_steps = 200
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(
            seed="0",
            teacher="resnet110",
            epochs="240",
            students="+".join(STUDENTS),
            objectives="standard+easy+flatten+defer+defer_cost",
            baseline="resnet32",
            teacher_split="train[:90%]",
        ),
        "titans_cifar100.py",
    )
    seed, epochs = int(a["seed"]), float(a["epochs"])
    if not a["students"] and not a["baseline"]:  # the teacher alone, as one plain run
        return _run("teacher", a["teacher"], seed, epochs, a["teacher_split"])
    names, baselines = sizes_and_baselines(a["students"], a["baseline"])
    students = {s: (lambda s=s: _run(s, s, seed, epochs)) for s in names}
    return cascade_pipeline(
        _run("teacher", a["teacher"], seed, epochs),
        students,
        a["objectives"].split("+"),
        temperature=4.0,
        alpha=0.9,
        cascade=dict(val_split="train[90%:]", test_split="test", batch_size=1000),
        baselines=baselines,
    )
