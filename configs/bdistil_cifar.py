"""B-DISTIL on CIFAR-10 or CIFAR-100: an anytime ensemble of small CIFAR ResNets from a ResNet teacher.

    python -m titans.main --config=configs/bdistil_cifar.py:dataset=cifar100,seed=0 --workdir=workdirs/bdistil_cifar100/seed0
    python -m titans.main --config=configs/bdistil_cifar.py:dataset=cifar10,seed=0,teacher=RUN_DIR --workdir=...

Needs TFDS's cifar10/cifar100 prepared once (`pip install -r requirements-tf.txt`, then
`python -m titans.data.prepare cifar100`). Without `teacher=`, a teacher stage (resnet56 by default,
`teacher_model=resnet110` for the paper-scale one) trains first with the CRD/KD recipe (SGD Nesterov,
lr 0.05, wd 5e-4, batch 64, step decay at 62.5/75/87.5% of training, crop+flip). Everything trains on
train[:90%]; train[90%:] (5,000 images) is the validation split; results on the 10,000 test images.

Members: FIND-WL among resnet8 < resnet14 < resnet20 (by FLOPs), up to `rounds` (4), each trained
`epochs` (60) against the teacher (KD, T=4, alpha=0.9) on F_{w-1} + f_w under the weight player's
weights; member w >= 2 reads member w-1's pooled `features` (64 wide; concat after a 32-wide
projection). Baselines: resched (same sizes, independently distilled, val-accuracy-weighted average)
and the no-resched curve (per B-DISTIL prefix, the one of resnet14..56 whose FLOPs are closest).

arg: comma-separated key=value: dataset (cifar100 | cifar10), seed (0), teacher ("" = train one),
teacher_model (resnet56), teacher_epochs (240), epochs (60), rounds (4), weights (example |
example_class), gamma (0.02).
XLA FLOPs per example (32x32x3, 100 classes): resnet8 24 M, resnet20 76 M, resnet56 ~250 M, resnet110 486 M.
Expected runtime, an ESTIMATE (not run in this repository): on one H100/A100 in bfloat16 about 30-60
min for the teacher and 3-6 min per member-epoch block of 60 epochs, so roughly 2-4 h a seed for all
variants; far too slow for a CPU. Expected result: not measured here; the paper reports B-DISTIL
ensembles beating resched at equal FLOPs on CIFAR-10/100.
"""

import ml_collections

from titans.config import base_config
from titans.ensemble.config import defaults, model_entry


def _args(arg: str) -> dict:
    out = dict(
        dataset="cifar100",
        seed="0",
        teacher="",
        teacher_model="resnet56",
        teacher_epochs="240",
        epochs="60",
        rounds="4",
        weights="example",
        gamma="0.02",
    )
    for part in filter(None, arg.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise ValueError(f"Unknown argument '{key}' for bdistil_cifar.py; expected {sorted(out)}.")
        out[key] = value
    if out["dataset"] not in ("cifar10", "cifar100"):
        raise ValueError(f"dataset={out['dataset']!r}: expected cifar10 or cifar100.")
    return out


def _run(name: str, dataset: str, model: str, seed: int, epochs: float) -> ml_collections.ConfigDict:
    c = base_config()
    c.name = name
    c.seed = seed
    c.dataset.name = dataset
    c.dataset.train_split = "train[:90%]"
    c.model.name = model
    c.batch_size = 64
    c.eval_batch_size = 500
    c.total_epochs = epochs
    c.optimizer.name = "sgd"
    c.optimizer.learning_rate = 0.05
    c.optimizer.weight_decay = 5e-4
    c.schedule.name = "step"
    c.schedule.step_boundaries = (0.625, 0.75, 0.875)
    c.schedule.step_factor = 0.1
    c.checkpoint.every_steps = 2000
    c.log_every_steps = 200
    return c


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = _args(arg)
    seed, dataset = int(a["seed"]), a["dataset"]
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict()
    if a["teacher"]:
        c.stage_order = ()
        teacher_ref = a["teacher"]
    else:
        c.stages.teacher = _run("teacher", dataset, a["teacher_model"], seed, float(a["teacher_epochs"]))
        c.stage_order = ("teacher",)
        teacher_ref = "@teacher"

    member = _run("member", dataset, "resnet8", seed, float(a["epochs"]))
    member.distill.teacher_workdir = teacher_ref
    member.distill.loss = "kd"
    member.distill.temperature = 4.0
    member.distill.alpha = 0.9

    e = defaults()
    e.member = member
    e.candidates = ml_collections.ConfigDict({n: model_entry(n) for n in ("resnet8", "resnet14", "resnet20")})
    e.rounds = int(a["rounds"])
    e.weights = a["weights"]
    e.gamma = float(a["gamma"])
    e.connect.layer = "features"
    e.connect.join = "concat"
    e.connect.width = 32
    e.no_resched = ml_collections.ConfigDict(
        {n: model_entry(n) for n in ("resnet14", "resnet20", "resnet32", "resnet44", "resnet56")}
    )
    e.val_split = "train[90%:]"
    e.test_split = "test"
    e.predict_batch_size = 500
    c.ensemble = e
    return c
