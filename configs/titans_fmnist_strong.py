"""Cascades in the strong-teacher regime: the ResNet-20 teacher of configs/fmnist_strong_teacher.py and
students from a linear model on pixels to a ResNet-8, about 1000x apart in cost (issue: a wide gap).

    # once: the teacher (hours on 2 CPU cores; resumable), then its outputs on the students' split
    titans-train --config=configs/fmnist_strong_teacher.py --workdir=workdirs/fmnist_strong/teacher
    titans-cache --teacher_workdir=workdirs/fmnist_strong/teacher --dataset=fashion_mnist \
        --split='train[:90%]' --out=workdirs/fmnist_strong/cache
    # per seed: every student from the cache (student-only cost), then the cascade evaluation
    titans-train --config=configs/titans_fmnist_strong.py:seed=0 --workdir=workdirs/titans_fmnist_strong/seed0

The teacher is not a stage here: every seed shares it (one teacher, seed 0, as is usual); its run
directory is `teacher_dir`. Students, with XLA FLOPs as a share of the teacher's 56.9 MFLOPs:
  linear  (logistic regression on pixels, 0.03%)      mlp64  (784-64-10, 0.18%)
  tiny    (CNN 4-8 / 16, 0.34%)                        small  (CNN 8-16 / 32, 1.1%)
  medium  (CNN 16-32 / 64, 3.8%)                       large  (CNN 32-64 / 128, 14%)
  resnet8 (30.6%: the equal-cost baseline of the 25%-of-teacher budget)
each distilled (3 epochs, un-augmented: the cache holds one output per image) with the objectives of
configs/titans_fmnist.py (standard, easy, flatten, defer, defer_cost) for `sizes`, and with standard KD
for `baselines`. Soft labels come from the teacher cache (`distill.teacher_mode=cache`, full float32
logits), so no student step runs the ResNet. Thresholds and operating points are chosen on train[90%:]
(6,000 images neither teacher nor students train on); results on the 10,000 test images.

arg: comma-separated key=value: seed (0), epochs (3), sizes (linear+mlp64+tiny+small+medium),
objectives (standard+easy+flatten+defer+defer_cost), baselines (large+resnet8),
teacher_dir (workdirs/fmnist_strong/teacher), cache_dir (workdirs/fmnist_strong/cache).
Runtime on 2 CPU cores: 25-45 s a student for the
linear to small sizes, about 1-2 minutes for medium and large, 8 minutes for resnet8: about 30 minutes of
training a seed; then the cascade evaluation (the ResNet over 16,000 images once, every gate of every
student, the real runner with the msp gate) about 18 minutes. Results: docs/results/titans_fmnist_strong.md.
"""

import os

import ml_collections

from titans.config import base_config
from titans.config_builders import cascade_pipeline, parse_config_arg, sizes_and_baselines, with_shared_teacher

STUDENTS = {
    "linear": ("mlp", dict(hidden=())),
    "mlp64": ("mlp", dict(hidden=(64,))),
    "tiny": ("cnn", dict(channels=(4, 8), dense=16)),
    "small": ("cnn", dict(channels=(8, 16), dense=32)),
    "medium": ("cnn", dict(channels=(16, 32), dense=64)),
    "large": ("cnn", dict(channels=(32, 64), dense=128)),
    "resnet8": ("resnet8", {}),
}


def _student(size: str, seed: int, epochs: float, teacher_dir: str, cache_dir: str) -> ml_collections.ConfigDict:
    model, kwargs = STUDENTS[size]
    c = base_config()
    c.name = size
    c.seed = seed
    c.dataset.name = "fashion_mnist"
    c.dataset.train_split = "train[:90%]"
    c.model.name = model
    c.model.kwargs = ml_collections.ConfigDict(kwargs)
    c.batch_size = 128
    c.total_epochs = epochs
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 100
    c.log_every_steps = 100
    c.distill.teacher_workdir = teacher_dir
    c.distill.teacher_mode = "cache"
    c.distill.cache.dir = cache_dir
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(
            seed="0",
            epochs="3",
            sizes="linear+mlp64+tiny+small+medium",
            objectives="standard+easy+flatten+defer+defer_cost",
            baselines="large+resnet8",
            teacher_dir="workdirs/fmnist_strong/teacher",
            cache_dir="workdirs/fmnist_strong/cache",
        ),
        "titans_fmnist_strong.py",
    )
    seed, epochs = int(a["seed"]), float(a["epochs"])
    # Absolute: the trainer resolves a relative path from the current directory, the cascade evaluation
    # from the workdir; an absolute one means the same run to both.
    a["teacher_dir"], a["cache_dir"] = os.path.abspath(a["teacher_dir"]), os.path.abspath(a["cache_dir"])
    sizes, baselines = sizes_and_baselines(a["sizes"], a["baselines"])
    unknown = sorted(set(sizes) - set(STUDENTS))
    if unknown:
        raise ValueError(f"Unknown student sizes {unknown} for titans_fmnist_strong.py; expected {sorted(STUDENTS)}.")
    students = {s: (lambda s=s: _student(s, seed, epochs, a["teacher_dir"], a["cache_dir"])) for s in sizes}
    c = cascade_pipeline(
        ml_collections.ConfigDict(),  # no teacher stage: the shared teacher run is `teacher_dir`
        students,
        a["objectives"].split("+"),
        temperature=4.0,
        alpha=0.9,
        # The real runner (the ResNet over every deferred test row, 4 rates) is checked with the msp gate
        # only: for all 5 gates of 27 students it took about 2.5 minutes a student on 2 shared cores.
        cascade=dict(val_split="train[90%:]", test_split="test", batch_size=500, runner_gates=("msp",)),
        baselines=baselines,
    )
    return with_shared_teacher(c, a["teacher_dir"])
