"""B-DISTIL on Fashion-MNIST: an anytime ensemble of tiny CNNs distilled from the CNN teacher.

    python -m titans.main --config=configs/bdistil_fmnist.py:seed=0 --workdir=workdirs/bdistil_fmnist/seed0

With an existing teacher run (trained on train[:90%], e.g. configs/titans_fmnist.py's), skip the
teacher stage:

    python -m titans.main --config=configs/bdistil_fmnist.py:seed=0,teacher=workdirs/titans_fmnist/seed0/teacher \
        --workdir=workdirs/bdistil_fmnist/seed0

The teacher (conv 32-64, dense 128; 3 epochs) trains on train[:90%]. Then, in WORKDIR:
  bdistil         up to `rounds` members (4), each found by FIND-WL among tiny (conv 4-8, dense 16)
                  and small (conv 8-16, dense 32) CNNs, trained 2 epochs on F_{w-1} + f_w against the
                  teacher (KD, T=4, alpha=0.9) under the weight player's per-example weights; member
                  w >= 2 also reads member w-1's `features` (concat after a 16-wide projection);
  bdistil_noconn  the same without the connection;
  resched         independently distilled members of the same sizes, averaged (weights: val accuracy);
  no_resched      one CNN whose FLOPs are closest to the full B-DISTIL ensemble's.
Reported on the 10,000 test images (accuracy vs members and vs XLA-measured FLOPs, anytime curves):
WORKDIR/ensemble.json and ensemble.md. Rerunning the command resumes where it stopped.

arg: comma-separated key=value: seed (0), teacher ("" = train one here), rounds (4), epochs (2),
weights (example | example_class), gamma (0.01).
Runtime on 2 CPU cores: 16-30 minutes a seed with an existing teacher, measured on busy shared cores
(13-14 member runs of about 1 minute each, including the FIND-WL candidates that are rejected), +4
minutes to train a teacher.
Measured (seeds 0,1,2, docs/results/bdistil_fmnist.md): FIND-WL keeps 3 tiny members with the
connection (1 without); accuracy barely grows with members (about 88.2% -> 88.3%), below resched at
equal FLOPs (about 88.7%) and the single no-resched student (about 89.7%); the teacher is 91.3%.
"""

import os

import ml_collections

from titans.config import load_config_file
from titans.ensemble.config import defaults, model_entry

_HERE = os.path.dirname(__file__)


def _args(arg: str) -> dict:
    out = dict(seed="0", teacher="", rounds="4", epochs="2", weights="example", gamma="0.01")
    for part in filter(None, arg.split(",")):
        key, _, value = part.partition("=")
        if key not in out:
            raise ValueError(f"Unknown argument '{key}' for bdistil_fmnist.py; expected {sorted(out)}.")
        out[key] = value
    return out


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    a = _args(arg)
    seed = int(a["seed"])
    c = ml_collections.ConfigDict()
    c.stages = ml_collections.ConfigDict()
    if a["teacher"]:
        c.stage_order = ()
        teacher_ref = a["teacher"]
    else:
        teacher = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + ":3")
        teacher.seed = seed
        teacher.dataset.train_split = "train[:90%]"
        teacher.log_every_steps = 100
        c.stages.teacher = teacher
        c.stage_order = ("teacher",)
        teacher_ref = "@teacher"

    member = load_config_file(os.path.join(_HERE, "fmnist_teacher.py") + ":" + a["epochs"])
    member.name = "member"
    member.seed = seed
    member.dataset.train_split = "train[:90%]"
    member.log_every_steps = 100
    member.distill.teacher_workdir = teacher_ref
    member.distill.loss = "kd"
    member.distill.temperature = 4.0
    member.distill.alpha = 0.9

    e = defaults()
    e.member = member
    e.candidates = ml_collections.ConfigDict()
    e.candidates.tiny = model_entry("cnn", channels=(4, 8), dense=16)
    e.candidates.small = model_entry("cnn", channels=(8, 16), dense=32)
    e.rounds = int(a["rounds"])
    e.weights = a["weights"]
    e.eta = 1.0
    e.mix = 0.1
    e.gamma = float(a["gamma"])
    e.barrier_weight = 0.1
    e.barrier_t = 5.0
    e.connect.layer = "features"
    e.connect.join = "concat"
    e.connect.width = 16
    e.no_resched = ml_collections.ConfigDict()
    for ch, dense in ((6, 24), (8, 32), (10, 40), (12, 48), (16, 64)):
        e.no_resched[f"cnn{ch}"] = model_entry("cnn", channels=(ch, 2 * ch), dense=dense)
    e.val_split = "train[90%:]"
    e.test_split = "test"
    e.predict_batch_size = 1000
    c.ensemble = e
    return c
