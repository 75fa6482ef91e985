"""Titans cascades on ImageNet at paper scale: ResNet-50 teacher, ResNet-18 and MobileNetV2 students.

    python -m titans.main --config=configs/titans_imagenet.py:seed=0 --workdir=gs://BUCKET/titans_imagenet/seed0

Needs TFDS's imagenet2012 prepared (the manual download of the ILSVRC-2012 tars, then
`python -m titans.data.prepare imagenet2012 --manual_dir=DIR` with requirements-tf.txt). On a
multi-host TPU slice every host runs the same command; `jax.distributed` is initialised from the
environment (titans/parallel.py).
Recipe: SGD with Nesterov momentum 0.9, global batch 1024, lr 0.4 (0.1 per 256), 5 warm-up epochs,
cosine decay, weight decay 1e-4 (5e-5 for MobileNetV2), label smoothing 0.1 for the teacher; random
resized crop + flip at 224x224, bfloat16 compute ("auto") with float32 parameters. Teacher and
students train on train[:99%]; gate thresholds are chosen on train[99%:] (12,812 images), and results
are on the 50,000 validation images: WORKDIR/cascade.json and WORKDIR/cascade_*.png.

Stages: teacher (90 epochs), then {resnet18, mobilenet_v2} x {standard, easy, defer} (90 epochs each;
Hinton KD with T=2, alpha=0.9, the objectives of configs/titans_fmnist.py).

arg: comma-separated key=value: seed (0), epochs (90), students (resnet18+mobilenet_v2),
objectives (standard+easy+defer).

XLA FLOPs per example (forward, 224x224x3): resnet50 8.0 G, resnet18 3.4 G, mobilenet_v2 0.63 G.
Expected runtime, an ESTIMATE (no accelerator run of this config has been made in this repository):
a 90-epoch ResNet-50 run is about 1.1e8 examples x 24 GFLOPs; at the roughly 3,000 images/s a
single 8-GPU A100 machine or a TPU v4-32 slice sustains with bfloat16, about 10-11 h; each student,
which also runs the teacher forward, about 7-9 h; JPEG decoding must keep up (16+ CPU cores per
host). Expected accuracy (published recipes): teacher about 76-77% top-1, ResNet-18 KD about
71-72%, MobileNetV2 KD about 72%.
"""

import ml_collections

from titans.config import base_config
from titans.config_builders import cascade_pipeline, parse_config_arg


def _run(name: str, model: str, seed: int, epochs: float) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = name
    c.seed = seed
    c.dataset.name = "imagenet2012"
    c.dataset.train_split = "train[:99%]"
    c.dataset.eval_split = "validation"
    c.model.name = model
    c.batch_size = 1024
    c.eval_batch_size = 1000
    c.total_epochs = epochs
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.4
    c.optimizer.weight_decay = 5e-5 if model == "mobilenet_v2" else 1e-4
    c.schedule.name = "cosine"
    c.schedule.warmup_epochs = 5.0
    c.checkpoint.every_steps = 2500
    c.log_every_steps = 500
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = parse_config_arg(
        arg,
        dict(seed="0", epochs="90", students="resnet18+mobilenet_v2", objectives="standard+easy+defer"),
        "titans_imagenet.py",
    )
    seed, epochs = int(a["seed"]), float(a["epochs"])
    teacher = _run("teacher", "resnet50", seed, epochs)
    teacher.label_smoothing = 0.1
    students = {s: (lambda s=s: _run(s, s, seed, epochs)) for s in a["students"].split("+")}
    return cascade_pipeline(
        teacher,
        students,
        a["objectives"].split("+"),
        temperature=2.0,
        alpha=0.9,
        cascade=dict(val_split="train[99%:]", test_split="validation", batch_size=1024),
    )
