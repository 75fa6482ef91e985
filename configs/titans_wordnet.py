"""Cascades on text: the Transformer teacher of configs/wordnet_teacher.py and text students from a bag of
embeddings to a 2-layer Transformer, on WordNet supersenses (45 classes, docs/text.md).

    # once: the teacher (about an hour on 2 CPU cores; resumable), then its outputs on the students' split
    titans-train --config=configs/wordnet_teacher.py --workdir=workdirs/wordnet/teacher
    titans-cache --teacher_workdir=workdirs/wordnet/teacher --dataset=wordnet --split=train \
        --out=workdirs/wordnet/cache
    # per seed: every student from the cache, then the cascade evaluation
    titans-train --config=configs/titans_wordnet.py:seed=0 --workdir=workdirs/titans_wordnet/seed0

The teacher is not a stage: every seed shares it (`teacher_dir`). Students, with XLA FLOPs at 32 tokens as a
share of the teacher's 208 MFLOPs:
  bag       (text_bag: embedding 64, masked mean, MLP 64; 0.01%)
  cnn       (text_cnn: 1-D convolutions over tokens; 1.3%)
  tx_small  (transformer_small: 2 layers x 64 wide; 3.4%)
  tx_mid    (transformer, 2 layers x 128 wide x 4 heads; 13%: the equal-cost single-student baseline)
each distilled for `epochs` (AdamW, lr 1e-3 cosine with 100 warm-up steps, batch 128 grouped by length, the
teacher's soft labels from its cache: full float32 logits, so no student step runs the teacher) with the
`objectives` (standard Hinton KD, T = 4, alpha = 0.9; `easy`, which weighs rows by the teacher's confidence),
`baselines` with standard KD only. The objectives that read whether the teacher is right are left out: the
teacher trained on the students' rows, and issue 33's protocol asks for cross-fitted teacher outputs there.
Thresholds and operating points are chosen on the validation split (neither teacher nor students train on
it); results on the test split. FLOPs are XLA's, averaged over the test rows at each row's length bucket.

arg: comma-separated key=value: seed (0), epochs (3), sizes (bag+cnn+tx_small), objectives (standard+easy),
baselines (tx_mid), teacher_dir (workdirs/wordnet/teacher), cache_dir (workdirs/wordnet/cache), train_split
(train), val_split (validation), test_split (test); the splits let a test run it at small sizes.
"""

import os

import ml_collections

from titans.config import base_config
from titans.config_builders import cascade_pipeline, parse_config_arg, sizes_and_baselines, with_shared_teacher

STUDENTS = {
    "bag": ("text_bag", dict(embed_dim=64, hidden=(64,))),
    "cnn": ("text_cnn", {}),
    "tx_small": ("transformer_small", {}),
    "tx_mid": ("transformer", dict(depth=2, width=128, heads=4)),
}


def _student(size: str, seed: int, epochs: float, a: dict) -> ml_collections.ConfigDict:
    model, kwargs = STUDENTS[size]
    c = base_config()
    c.name = size
    c.seed = seed
    c.dataset.name = "wordnet"
    c.dataset.train_split = a["train_split"]
    c.dataset.eval_split = a["val_split"]
    c.dataset.group_by_length = 64
    c.model.name = model
    c.model.kwargs = ml_collections.ConfigDict(kwargs)
    c.dtype = "auto"
    c.batch_size = 128
    c.eval_batch_size = 512
    c.total_epochs = epochs
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = 1e-3
    c.optimizer.weight_decay = 0.01
    c.schedule.name = "cosine"
    c.schedule.warmup_steps = 100
    c.log_every_steps = 100
    c.distill.teacher_workdir = a["teacher_dir"]
    c.distill.teacher_mode = "cache"
    c.distill.cache.dir = a["cache_dir"]
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(
            seed="0",
            epochs="3",
            sizes="bag+cnn+tx_small",
            objectives="standard+easy",
            baselines="tx_mid",
            teacher_dir="workdirs/wordnet/teacher",
            cache_dir="workdirs/wordnet/cache",
            train_split="train",
            val_split="validation",
            test_split="test",
        ),
        "titans_wordnet.py",
    )
    seed, epochs = int(a["seed"]), float(a["epochs"])
    a["teacher_dir"], a["cache_dir"] = os.path.abspath(a["teacher_dir"]), os.path.abspath(a["cache_dir"])
    sizes, baselines = sizes_and_baselines(a["sizes"], a["baselines"])
    unknown = sorted(set(sizes) - set(STUDENTS))
    if unknown:
        raise ValueError(f"Unknown student sizes {unknown} for titans_wordnet.py; expected {sorted(STUDENTS)}.")
    students = {s: (lambda s=s: _student(s, seed, epochs, a)) for s in sizes}
    c = cascade_pipeline(
        ml_collections.ConfigDict(),  # no teacher stage: the shared teacher run is `teacher_dir`
        students,
        a["objectives"].split("+"),
        temperature=4.0,
        alpha=0.9,
        cascade=dict(
            val_split=a["val_split"],
            test_split=a["test_split"],
            batch_size=512,
            gates=("msp", "margin", "entropy", "learned"),
            runner_gates=("msp",),
        ),
        baselines=baselines,
    )
    return with_shared_teacher(c, a["teacher_dir"])
